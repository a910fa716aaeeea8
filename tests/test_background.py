"""Background work tied to a block: cancelled at its end, and never able to hold that
end hostage (a library that ignores its cancellation is left behind after a grace)."""

from __future__ import annotations

import asyncio
import time

from sidecar.background import in_background


async def test_work_is_cancelled_when_the_block_ends():
    ran = asyncio.Event()

    async def forever() -> None:
        ran.set()
        await asyncio.Event().wait()

    async with in_background(forever()) as task:
        await ran.wait()
    assert task.cancelled()


async def test_work_that_ignores_its_cancellation_does_not_hold_the_end_of_the_block(caplog):
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue  # swallowed, as a misbehaving library might

    started = time.monotonic()
    async with in_background(stubborn(), grace_s=0.2) as task:
        await asyncio.sleep(0)
    assert 0.2 <= time.monotonic() - started < 2.0
    assert not task.done()
    assert "did not stop within 0.2 s" in caplog.text
    release.set()
    task.cancel()
    await asyncio.wait({task}, timeout=1)
    assert task.done()
