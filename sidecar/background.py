"""Running coroutines: one in the background for the life of a block (cancelled at its
end), or many at once with a bound on how many are in flight."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterable
from typing import Any, TypeVar

log = logging.getLogger("aforo.background")
T = TypeVar("T")
# How long the end of the block waits for the cancelled work to finish. A library that
# does not honour cancellation promptly (redis-py's pub/sub close has been seen to hang
# for minutes) must not hold a shutdown hostage.
STOP_GRACE_S = 2.0


@contextlib.asynccontextmanager
async def in_background(
    work: Coroutine[Any, Any, None], grace_s: float = STOP_GRACE_S
) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(work)
    try:
        yield task
    finally:
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=grace_s)
        if not done:
            log.warning(
                "%s did not stop within %.1f s of its cancellation; left behind", task.get_name(), grace_s
            )
        elif not task.cancelled() and task.exception() is not None:
            log.warning("%s ended with %r", task.get_name(), task.exception())


async def gather_bounded(work: Iterable[Awaitable[T]], limit: int) -> list[T]:
    """``asyncio.gather`` with at most ``limit`` awaitables in flight (each may hold a
    pooled connection: redis-py refuses past its pool's cap instead of waiting)."""
    gate = asyncio.Semaphore(limit)

    async def one(step: Awaitable[T]) -> T:
        async with gate:
            return await step

    return await asyncio.gather(*(one(step) for step in work))
