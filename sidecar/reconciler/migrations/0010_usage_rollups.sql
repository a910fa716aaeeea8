-- 0010: usage rollups, hourly and daily, what GET /v1/usage/summary reads.
--
-- One row per (tenant, bucket start in UTC, consumer, product, plan, outcome):
--   outcome 'allowed'       the usage ledger: allowed decisions; calls = sum(hits),
--                           charged = sum(cost) in micros
--   outcome '1xx' .. '5xx'  gateway events with an HTTP status: its class; calls = the
--                           event's count; bytes = request_size + response_size
--   outcome 'ok' / 'error'  gateway events without a status (Apigee analytics aggregates,
--                           usage reports that name none): count - errors and errors;
--                           the bytes go with 'ok'
-- plan_id is the consumer's plan when the row was settled ('' for a consumer Postgres
-- never had). A ledger row is bucketed by its decision time (ts), a gateway event by
-- when the gateway says it started (recorded_at when it names no start).
--
-- The reconciler adds to them in the transaction that records the rows
-- (sidecar/reconciler/rollups.py), only the rows that were new in it, so a batch drained
-- again after a crash adds nothing twice. aforo_rollup_rebuild recomputes a range from
-- the raw tables (this migration builds the rollups of an existing database with it).

CREATE TABLE usage_rollup_hourly (
    tenant      text NOT NULL,
    bucket      timestamptz NOT NULL,
    consumer_id text NOT NULL,
    product     text NOT NULL,
    plan_id     text NOT NULL,
    outcome     text NOT NULL,
    calls       bigint NOT NULL DEFAULT 0,
    charged     bigint NOT NULL DEFAULT 0,
    bytes       bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, bucket, consumer_id, product, plan_id, outcome)
);
CREATE TABLE usage_rollup_daily (LIKE usage_rollup_hourly INCLUDING ALL);
-- A consumer's rows (the summary filtered by consumer_id).
CREATE INDEX usage_rollup_hourly_consumer ON usage_rollup_hourly (tenant, consumer_id, bucket);
CREATE INDEX usage_rollup_daily_consumer ON usage_rollup_daily (tenant, consumer_id, bucket);

-- Raw ranges that retention dropped (sidecar/reconciler/partitions.py): their rollups
-- stay, and can no longer be rebuilt.
CREATE TABLE dropped_partitions (
    name        text PRIMARY KEY,
    parent      text NOT NULL,
    range_start timestamptz NOT NULL,
    range_end   timestamptz NOT NULL,
    dropped_at  timestamptz NOT NULL DEFAULT now()
);

-- The outcomes of one gateway event (see above).
CREATE FUNCTION aforo_event_outcomes(status integer, n bigint, errors bigint, size bigint)
RETURNS TABLE (outcome text, calls bigint, bytes bigint) LANGUAGE sql IMMUTABLE AS $$
    SELECT (status / 100)::text || 'xx', n, size WHERE status BETWEEN 100 AND 599
    UNION ALL
    SELECT 'ok', greatest(n - errors, 0), size WHERE NOT status BETWEEN 100 AND 599
    UNION ALL
    SELECT 'error', least(errors, n), 0 WHERE NOT status BETWEEN 100 AND 599 AND errors > 0
$$;

-- Recompute the rollups of [lo, hi) (whole UTC days) from usage_records and
-- gateway_events; returns the number of hourly rows written. Refused for a range
-- retention has dropped raw rows of (it would recompute from nothing). Settlements wait
-- while it runs (the lock), so none is counted twice or lost.
CREATE FUNCTION aforo_rollup_rebuild(lo timestamptz, hi timestamptz) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    written bigint;
    dropped_until timestamptz;
BEGIN
    IF lo IS NULL OR hi IS NULL OR lo >= hi
       OR lo <> date_trunc('day', lo, 'UTC') OR hi <> date_trunc('day', hi, 'UTC') THEN
        RAISE EXCEPTION 'aforo_rollup_rebuild: [%, %) is not a range of whole UTC days', lo, hi;
    END IF;
    SELECT max(range_end) INTO dropped_until FROM dropped_partitions;
    IF dropped_until IS NOT NULL AND lo < dropped_until THEN
        RAISE EXCEPTION 'aforo_rollup_rebuild: raw rows before % were dropped by retention', dropped_until;
    END IF;
    LOCK TABLE usage_rollup_hourly, usage_rollup_daily IN SHARE ROW EXCLUSIVE MODE;
    DELETE FROM usage_rollup_hourly WHERE bucket >= lo AND bucket < hi;
    DELETE FROM usage_rollup_daily WHERE bucket >= lo AND bucket < hi;
    WITH rows AS (
        SELECT u.tenant, date_trunc('hour', u.ts, 'UTC') AS bucket, u.consumer_id, u.product,
               coalesce(c.plan_id, '') AS plan_id, 'allowed' AS outcome,
               sum(u.hits)::bigint AS calls, sum(u.cost)::bigint AS charged, 0::bigint AS bytes
        FROM usage_records u LEFT JOIN consumers c ON c.tenant = u.tenant AND c.id = u.consumer_id
        WHERE u.ts >= lo AND u.ts < hi
        GROUP BY 1, 2, 3, 4, 5
        UNION ALL
        SELECT g.tenant, date_trunc('hour', coalesce(g.started_at, g.recorded_at), 'UTC'), g.consumer_id,
               g.product, coalesce(c.plan_id, ''), o.outcome, sum(o.calls)::bigint, 0, sum(o.bytes)::bigint
        FROM gateway_events g LEFT JOIN consumers c ON c.tenant = g.tenant AND c.id = g.consumer_id
        CROSS JOIN LATERAL aforo_event_outcomes(g.status, g.count, g.errors,
                                                g.request_size + g.response_size) o
        WHERE coalesce(g.started_at, g.recorded_at) >= lo AND coalesce(g.started_at, g.recorded_at) < hi
        GROUP BY 1, 2, 3, 4, 5, 6
    )
    INSERT INTO usage_rollup_hourly (tenant, bucket, consumer_id, product, plan_id, outcome, calls, charged, bytes)
    SELECT * FROM rows;
    GET DIAGNOSTICS written = ROW_COUNT;
    INSERT INTO usage_rollup_daily (tenant, bucket, consumer_id, product, plan_id, outcome, calls, charged, bytes)
    SELECT tenant, date_trunc('day', bucket, 'UTC'), consumer_id, product, plan_id, outcome,
           sum(calls), sum(charged), sum(bytes)
    FROM usage_rollup_hourly WHERE bucket >= lo AND bucket < hi
    GROUP BY 1, 2, 3, 4, 5, 6;
    RETURN written;
END $$;

-- The rollups of what this database already holds.
DO $$
DECLARE
    lo timestamptz;
    hi timestamptz;
BEGIN
    SELECT min(at), max(at) INTO lo, hi FROM (
        SELECT min(ts) AS at FROM usage_records UNION ALL SELECT max(ts) FROM usage_records
        UNION ALL SELECT min(coalesce(started_at, recorded_at)) FROM gateway_events
        UNION ALL SELECT max(coalesce(started_at, recorded_at)) FROM gateway_events
    ) bounds;
    IF lo IS NOT NULL THEN
        PERFORM aforo_rollup_rebuild(date_trunc('day', lo, 'UTC'), date_trunc('day', hi, 'UTC') + interval '24 hours');
    END IF;
END $$;
