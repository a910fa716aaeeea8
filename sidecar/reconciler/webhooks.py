"""The webhook dispatcher: sends the outbox's pending deliveries, signed, and logs them.

Runs in the reconciler, never on the decision path: a slow or dead receiver holds only
its own deliveries. Rules:

- One consumer's deliveries to one endpoint go in order: only the oldest pending one
  (the head) is sent; the next waits until it is delivered or given up.
- A delivery is claimed with a lease (the timeout plus a margin), so several
  reconcilers never send it at once; a dispatcher killed mid-send leaves the lease to
  expire and the delivery is sent again: at least once, with the same ``webhook-id``,
  which receivers deduplicate on.
- A 2xx answer delivers it; anything else (another status, no answer in time, no
  connection) is an attempt logged with its error and retried per the RetryPolicy;
  past the retry period it is given up (``failed``) and can be redelivered by hand.
- Redirects are not followed: the endpoint is the URL registered.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg
import httpx
import msgspec

from sidecar import metrics
from sidecar.core.clock import now_ms
from sidecar.core.webhooks import RetryPolicy, sign
from sidecar.integrations.secret_box import SecretBox, SecretBoxError
from sidecar.reconciler.webhook_store import secret_context

log = logging.getLogger("aforo.webhooks")
LEASE_MARGIN_S = 30.0
MAX_ERROR = 300
USER_AGENT = "aforo-webhooks/1"


class Claimed(msgspec.Struct):
    id: int
    tenant: str
    webhook_id: str
    message_id: str
    payload: str
    attempts: int
    retry_since_s: float
    url: str
    sealed_secret: str
    lease: datetime


class Outcome(msgspec.Struct):
    ok: bool
    status: int | None
    error: str
    duration_ms: int


def _at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


class Dispatcher:
    def __init__(
        self,
        pool: asyncpg.Pool,
        box: SecretBox | None,
        policy: RetryPolicy,
        *,
        timeout_s: float = 10.0,
        concurrency: int = 16,
        clock: Callable[[], int] = now_ms,
        rng: random.Random | None = None,
    ) -> None:
        self.pool = pool
        self.box = box
        self.policy = policy
        self.timeout_s = timeout_s
        self.concurrency = concurrency
        self.clock = clock
        self.rng = rng or random.Random()
        self.client = httpx.AsyncClient(
            timeout=timeout_s,
            follow_redirects=False,
            limits=httpx.Limits(max_connections=concurrency),
            headers={"user-agent": USER_AGENT},
        )

    async def close(self) -> None:
        await self.client.aclose()

    async def run(self, stop: asyncio.Event, poll_s: float) -> None:
        """Until ``stop``: keep up to ``concurrency`` deliveries in flight, each on its
        own, so a slow receiver holds a slot, never the others' deliveries; look for due
        ones again as soon as one ends, or every ``poll_s``."""
        in_flight: set[asyncio.Task[None]] = set()
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                free = self.concurrency - len(in_flight)
                claimed = await self._claim(free) if free > 0 else []
                for delivery in claimed:
                    in_flight.add(asyncio.ensure_future(self._deliver(delivery)))
                if claimed and len(in_flight) < self.concurrency:
                    continue  # there may be more due
                done, _ = await asyncio.wait(
                    {*in_flight, stopping}, timeout=poll_s, return_when="FIRST_COMPLETED"
                )
                for task in done - {stopping}:
                    in_flight.discard(task)
                    task.result()  # a database failure ends the session (the reconciler retries)
        finally:
            stopping.cancel()
            if in_flight:  # each ends within the timeout; a lease outlives it
                await asyncio.wait(in_flight, timeout=self.timeout_s + 1)

    async def run_once(self) -> int:
        """Claim the due heads (one per endpoint and consumer) and send them; returns how
        many were attempted."""
        claimed = await self._claim(self.concurrency)
        if claimed:
            await asyncio.gather(*(self._deliver(c) for c in claimed))
        return len(claimed)

    async def _claim(self, limit: int) -> list[Claimed]:
        now = self.clock() / 1000
        lease = _at(now + self.timeout_s + LEASE_MARGIN_S)
        rows = await self.pool.fetch(
            """WITH heads AS (
                   SELECT DISTINCT ON (d.tenant, d.webhook_id, d.consumer_id)
                       d.id, d.next_attempt_at, d.lease_until
                   FROM webhook_deliveries d
                   JOIN webhooks w ON w.tenant = d.tenant AND w.id = d.webhook_id
                       AND w.deleted_at IS NULL AND w.enabled
                   WHERE d.status = 'pending'
                   ORDER BY d.tenant, d.webhook_id, d.consumer_id, d.id
               ), due AS (
                   SELECT id FROM heads
                   WHERE next_attempt_at <= $1 AND (lease_until IS NULL OR lease_until <= $1)
                   ORDER BY next_attempt_at, id LIMIT $3
               )
               UPDATE webhook_deliveries d SET lease_until = $2
               FROM due, webhooks w
               WHERE d.id = due.id AND w.tenant = d.tenant AND w.id = d.webhook_id
                   AND d.status = 'pending' AND (d.lease_until IS NULL OR d.lease_until <= $1)
               RETURNING d.id, d.tenant, d.webhook_id, d.message_id, d.payload, d.attempts,
                   extract(epoch FROM d.retry_since)::float8 AS retry_since_s, w.url, w.sealed_secret""",
            _at(now),
            lease,
            limit,
        )
        return [Claimed(**dict(r), lease=lease) for r in rows]

    async def _send(self, delivery: Claimed) -> Outcome:
        started = time.monotonic()

        def took() -> int:
            return int((time.monotonic() - started) * 1000)

        try:
            if self.box is None:
                raise SecretBoxError("no secret keys configured (AFORO_SECRET_KEYS)")
            secret = self.box.open(
                delivery.sealed_secret, secret_context(delivery.tenant, delivery.webhook_id)
            )
        except SecretBoxError as exc:
            return Outcome(False, None, f"secret_unavailable: {exc}", took())
        body = delivery.payload.encode()
        timestamp = self.clock() // 1000
        headers = {
            "content-type": "application/json",
            "webhook-id": delivery.message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, delivery.message_id, timestamp, body),
        }
        try:
            response = await self.client.post(delivery.url, content=body, headers=headers)
        except httpx.TimeoutException:
            return Outcome(False, None, f"timeout: no answer within {self.timeout_s:g} s", took())
        except httpx.HTTPError as exc:
            return Outcome(False, None, f"{type(exc).__name__}: {exc}"[:MAX_ERROR], took())
        if 200 <= response.status_code < 300:
            return Outcome(True, response.status_code, "", took())
        return Outcome(False, response.status_code, f"HTTP {response.status_code}", took())

    async def _deliver(self, delivery: Claimed) -> None:
        outcome = await self._send(delivery)
        now = self.clock() / 1000
        attempt = delivery.attempts + 1
        if outcome.ok:
            status, next_at, result = "delivered", None, "delivered"
        else:
            next_s = self.policy.next_attempt(attempt, delivery.retry_since_s, now, self.rng)
            status, next_at = ("pending", _at(next_s)) if next_s is not None else ("failed", None)
            result = "failed" if next_s is not None else "gave_up"
        async with self.pool.acquire() as conn, conn.transaction():
            # Only while the lease is ours: a dispatcher that outlived its lease lets the
            # one that took over record the delivery.
            updated = await conn.fetchval(
                """UPDATE webhook_deliveries SET status = $3, attempts = $4, lease_until = NULL,
                       next_attempt_at = coalesce($5, next_attempt_at), last_attempt_at = $6,
                       last_status = $7, last_error = $8,
                       delivered_at = CASE WHEN $3 = 'delivered' THEN $6 ELSE delivered_at END
                   WHERE id = $1 AND lease_until = $2 RETURNING 1""",
                delivery.id,
                delivery.lease,
                status,
                attempt,
                next_at,
                _at(now),
                outcome.status,
                outcome.error,
            )
            if updated:
                await conn.execute(
                    """INSERT INTO webhook_attempts (delivery_id, attempt, at, status, error, duration_ms)
                       VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING""",
                    delivery.id,
                    attempt,
                    _at(now),
                    outcome.status,
                    outcome.error,
                    outcome.duration_ms,
                )
        metrics.WEBHOOK_DELIVERIES.labels(result).inc()
        if not outcome.ok:
            log.warning(
                "webhook %s/%s delivery %d attempt %d failed (%s)%s",
                delivery.tenant,
                delivery.webhook_id,
                delivery.id,
                attempt,
                outcome.error,
                "; given up" if status == "failed" else "",
            )
