"""A lean load of decisions for the multi-process tests: keep-alive HTTP/1.1
connections to sidecars' decision ports, one request in flight per connection (a
gateway worker's pattern). httpx costs a millisecond of CPU per request on this
machine; this costs a few dozen microseconds, so 20,000 decisions take seconds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import httpx
import msgspec


class Answer(NamedTuple):
    status: int
    body: dict[str, Any]
    sent: float  # time.monotonic() the request left
    job: int  # index of the request in the jobs given


class DecisionConnection:
    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        payload = msgspec.json.encode(body)
        self.writer.write(
            b"POST %b HTTP/1.1\r\nhost: sidecar\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%b" % (path.encode(), len(payload), payload)
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        data = await self.reader.readexactly(length)
        return status, msgspec.json.decode(data)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def hammer(
    ports: list[int], jobs: Iterable[tuple[str, dict[str, Any]]], clients: int = 64
) -> list[Answer]:
    """Send every (path, body) of ``jobs`` from ``clients`` concurrent connections,
    spread round-robin over the sidecars' decision ``ports``."""
    numbered: Iterator[tuple[int, tuple[str, dict[str, Any]]]] = iter(enumerate(jobs))
    answers: list[Answer] = []

    async def client(n: int) -> None:
        connection = DecisionConnection(ports[n % len(ports)])
        try:
            for index, (path, body) in numbered:
                sent = time.monotonic()
                status, answer = await connection.post(path, body)
                answers.append(Answer(status, answer, sent, index))
        finally:
            connection.close()

    await asyncio.gather(*(client(n) for n in range(clients)))
    return answers


def steady_jobs(consumers: list[str], until: float) -> Iterator[tuple[str, dict[str, Any]]]:
    """Decisions for ``consumers`` in turn, each with a request id of its own, until
    time.monotonic() reaches ``until``."""
    i = 0
    while time.monotonic() < until:
        consumer_id = consumers[i % len(consumers)]
        yield (
            "/v1/authorize",
            {"consumer_id": consumer_id, "product": "api", "request_id": f"{consumer_id}-{i}"},
        )
        i += 1


async def poll_readiness(url: str, until: float, every: float = 0.1) -> list[tuple[float, int]]:
    """(time.monotonic(), status) of GET /readyz every ``every`` seconds until ``until``."""
    seen: list[tuple[float, int]] = []
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        while time.monotonic() < until:
            response = await http.get("/readyz")
            seen.append((time.monotonic(), response.status_code))
            await asyncio.sleep(every)
    return seen
