"""The reconciliation report: per consumer and window, Redis counters against
Postgres usage (plus what is still in the stream on its way there)."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from sidecar.core.clock import now_ms
from sidecar.core.windows import WINDOWS, all_bounds
from sidecar.reconciler.ledger import Ledger
from sidecar.store.redis_store import RedisStore


class ReportRow(msgspec.Struct):
    tenant: str
    consumer_id: str
    window: str
    period_start: int  # epoch seconds
    redis: int  # the window counter in Redis
    postgres: int  # hits recorded in the usage ledger for the period
    in_flight: int  # hits still in the usage stream, not drained yet
    drift: int  # redis - (postgres + in_flight)
    drift_pct: float
    flagged: bool


class Report(msgspec.Struct):
    generated_at: int  # epoch seconds
    threshold_pct: float
    rows: list[ReportRow]
    flagged: int


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


async def reconciliation_report(
    ledger: Ledger, store: RedisStore, threshold_pct: float, tenant: str | None = None
) -> Report:
    """Redis's window counters against the ledger, per consumer (of ``tenant``; None: all)."""
    moment = now_ms()
    bounds = all_bounds(moment)
    starts = tuple(start for start, _ in bounds)
    plans = {(p.plan.tenant, p.plan.id): p.plan for p in await ledger.plans()}
    rows: list[ReportRow] = []
    for consumer in await ledger.consumers(tenant):
        limits = plans[(consumer.tenant, consumer.plan_id)].limits()
        if all(limit is None for limit in limits):
            continue
        counts = await store.window_counts(consumer.tenant, consumer.id, starts)
        in_stream = await store.usage(consumer.tenant, consumer.id)
        for i, (window, limit) in enumerate(zip(WINDOWS, limits, strict=True)):
            if limit is None:
                continue
            start, reset = bounds[i]
            recorded = await ledger.usage_hits(consumer.tenant, consumer.id, _dt(start), _dt(reset))
            flying = sum(r.hits for r in in_stream if start <= r.ts_ms < reset)
            drift = counts[i] - (recorded + flying)
            pct = abs(drift) * 100.0 / max(counts[i], recorded + flying, 1)
            rows.append(
                ReportRow(
                    tenant=consumer.tenant,
                    consumer_id=consumer.id,
                    window=window.value,
                    period_start=start // 1000,
                    redis=counts[i],
                    postgres=recorded,
                    in_flight=flying,
                    drift=drift,
                    drift_pct=round(pct, 3),
                    flagged=pct > threshold_pct,
                )
            )
    return Report(
        generated_at=moment // 1000,
        threshold_pct=threshold_pct,
        rows=rows,
        flagged=sum(r.flagged for r in rows),
    )


def render_table(report: Report) -> str:
    header = f"{'tenant':<12} {'consumer':<24} {'window':<7} {'redis':>9} {'postgres':>9} "
    header += f"{'flying':>7} {'drift%':>7}"
    lines = [header, "-" * len(header)]
    for r in report.rows:
        mark = "  DRIFT" if r.flagged else ""
        lines.append(
            f"{r.tenant:<12} {r.consumer_id:<24} {r.window:<7} {r.redis:>9} {r.postgres:>9} "
            f"{r.in_flight:>7} {r.drift_pct:>7.2f}{mark}"
        )
    lines.append(f"{len(report.rows)} rows, {report.flagged} above {report.threshold_pct}% drift")
    return "\n".join(lines)
