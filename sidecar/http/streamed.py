"""Answers streamed from a Postgres server-side cursor, as JSON or CSV: a report of any
size is sent a chunk at a time, never built in memory (the usage summary, the gateway
drift report)."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Protocol

import asyncpg
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from sidecar.catalog import TruthUnavailable
from sidecar.http.errors import ApiError

CHUNK_ROWS = 2000  # rows fetched from the cursor, and sent, at a time
# Postgres did not answer, or went away: nothing was sent yet.
UNREACHABLE = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
)


def wants_csv(request: Request) -> bool:
    accept = [part.split(";")[0].strip().lower() for part in request.headers.get("accept", "").split(",")]
    return "text/csv" in accept


def csv_bytes(rows: Iterable[Iterable[object]]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerows(rows)
    return out.getvalue().encode()


class Form(Protocol):
    """How an answer's head, rows and tail are written."""

    csv: bool

    def head(self) -> bytes: ...

    def rows(self, records: Sequence[asyncpg.Record]) -> bytes: ...

    def tail(self) -> bytes: ...


async def _chunks(pool: asyncpg.Pool, sql: str, args: Sequence[object], form: Form) -> AsyncIterator[bytes]:
    """The answer's bytes, read from a server-side cursor CHUNK_ROWS at a time. The
    first chunk (the head and the first rows) comes once the query has answered."""
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        cursor = await conn.cursor(sql, *args)
        records = await cursor.fetch(CHUNK_ROWS)
        yield form.head() + form.rows(records)
        while len(records) == CHUNK_ROWS:
            records = await cursor.fetch(CHUNK_ROWS)
            yield form.rows(records)
    yield form.tail()


async def stream(pool: asyncpg.Pool, sql: str, args: Sequence[object], form: Form, filename: str) -> Response:
    """The streamed answer. Errors until the query answers are answered as errors (503
    when Postgres is away or the query times out); later ones cut the stream short."""
    chunks = _chunks(pool, sql, args, form)
    try:
        first = await anext(chunks)
    except UNREACHABLE as exc:
        raise TruthUnavailable(f"postgres unreachable: {exc!r}") from exc
    except (TimeoutError, asyncpg.QueryCanceledError):
        raise ApiError(
            503,
            "query_timeout",
            "the query took too long: ask for a shorter range or a coarser granularity",
            headers={"Retry-After": "1"},
        ) from None

    async def body() -> AsyncIterator[bytes]:
        try:
            yield first
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()

    if form.csv:
        return StreamingResponse(
            body(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )
    return StreamingResponse(body(), media_type="application/json")
