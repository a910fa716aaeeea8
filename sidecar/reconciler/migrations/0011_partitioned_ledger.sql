-- 0011: the usage ledger and the gateway events, range-partitioned by month (UTC).
--
-- usage_records is partitioned by ts, the decision's time. A partitioned table's unique
-- keys must hold the partition key, so the primary key becomes (tenant, consumer_id,
-- decision_id, ts): as unique as before, because a decision's ts never changes (it is
-- written by the decision into the usage stream and read back from there as it is), so a
-- batch drained again after a crash routes every row to the partition that already holds
-- it and ON CONFLICT finds it there.
--
-- gateway_events is partitioned by received_at, a new column: when Redis accepted the
-- event, the time of its entry in the consumer's event stream (the entry id's
-- milliseconds). It is always set, by the Redis clock, so new rows land in the current
-- month's partition and retention means "received more than N months ago"; and it is
-- the same when a batch is drained again after a crash (the entries are read again with
-- their ids), so the primary key (tenant, consumer_id, request_id, received_at) keeps an
-- event once and ON CONFLICT skips a re-drained one. An event sent again later is kept
-- out by the hot store first (event.lua's marker for event_dedupe_ttl_seconds); one sent
-- again after that is stored and rated again, in Redis and here alike. started_at was
-- not chosen: it is what a gateway says (absent for many events, any year a gateway's
-- clock or a client sends) and would scatter rows into the default partition. Rows
-- already stored take their recorded_at.
--
-- Each table gets a DEFAULT partition as a safety net (a row no monthly partition
-- covers); aforo_ensure_partition moves its rows of a month into that month's partition
-- when it creates it. The reconciler creates the current month and the next two at start
-- and every hour (sidecar/reconciler/partitions.py); retention (usage_retention_months)
-- drops monthly partitions whose whole month is older than the limit, and the rollups of
-- migration 0010 stay. An existing database is converted here: old tables renamed, the
-- partitioned ones created with partitions for every month holding rows, rows copied,
-- old tables dropped.

-- The column a ledger table is partitioned by.
CREATE FUNCTION aforo_partition_key(parent text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE parent WHEN 'usage_records' THEN 'ts' WHEN 'gateway_events' THEN 'received_at' END
$$;

-- The monthly partition of ``parent`` for the UTC month holding ``within``: created when
-- missing (with the default partition's rows of that month); its name if created.
CREATE FUNCTION aforo_ensure_partition(parent text, within timestamptz) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    key text := aforo_partition_key(parent);
    month_start timestamp := date_trunc('month', within AT TIME ZONE 'UTC');
    lo timestamptz := month_start AT TIME ZONE 'UTC';
    hi timestamptz := (month_start + interval '1 month') AT TIME ZONE 'UTC';
    part text := parent || '_p' || to_char(month_start, 'YYYYMM');
BEGIN
    IF key IS NULL THEN
        RAISE EXCEPTION '% is not a partitioned ledger table', parent;
    END IF;
    IF to_regclass(part) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    PERFORM pg_advisory_xact_lock(72618, 1100);  -- one creator at a time
    IF to_regclass(part) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part, parent);
    EXECUTE format(
        'WITH moved AS (DELETE FROM %I WHERE %I >= $1 AND %I < $2 RETURNING *) INSERT INTO %I SELECT * FROM moved',
        parent || '_default', key, key, part
    ) USING lo, hi;
    EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)', parent, part, lo, hi);
    RETURN part;
END $$;

-- Retention: drop the monthly partitions of ``parent`` whose month ended at or before
-- ``cutoff`` (and delete the default partition's rows before it), each recorded in
-- dropped_partitions; returns the names dropped.
CREATE FUNCTION aforo_drop_partitions(parent text, cutoff timestamptz) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    key text := aforo_partition_key(parent);
    part text;
    lo timestamptz;
    hi timestamptz;
    deleted bigint;
BEGIN
    IF key IS NULL THEN
        RAISE EXCEPTION '% is not a partitioned ledger table', parent;
    END IF;
    FOR part IN
        SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = parent::regclass AND c.relname ~ ('^' || parent || '_p[0-9]{6}$')
        ORDER BY c.relname
    LOOP
        lo := make_timestamptz(substr(right(part, 6), 1, 4)::int, substr(right(part, 6), 5, 2)::int, 1, 0, 0, 0, 'UTC');
        hi := ((lo AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC';
        IF hi <= cutoff THEN
            INSERT INTO dropped_partitions (name, parent, range_start, range_end)
            VALUES (part, parent, lo, hi)
            ON CONFLICT (name) DO UPDATE SET dropped_at = now();
            EXECUTE format('DROP TABLE %I', part);
            RETURN NEXT part;
        END IF;
    END LOOP;
    EXECUTE format('DELETE FROM %I WHERE %I < $1', parent || '_default', key) USING cutoff;
    GET DIAGNOSTICS deleted = ROW_COUNT;
    IF deleted > 0 THEN
        INSERT INTO dropped_partitions (name, parent, range_start, range_end)
        VALUES (parent || '_default', parent, '-infinity', cutoff)
        ON CONFLICT (name) DO UPDATE
        SET range_end = greatest(dropped_partitions.range_end, EXCLUDED.range_end), dropped_at = now();
        RETURN NEXT parent || '_default';
    END IF;
END $$;

-- usage_records
ALTER TABLE usage_records RENAME TO usage_records_unpartitioned;
ALTER INDEX usage_records_pkey RENAME TO usage_records_unpartitioned_pkey;
ALTER INDEX usage_records_ts RENAME TO usage_records_unpartitioned_ts;
ALTER INDEX usage_records_request RENAME TO usage_records_unpartitioned_request;
CREATE TABLE usage_records (
    LIKE usage_records_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
    PRIMARY KEY (tenant, consumer_id, decision_id, ts)
) PARTITION BY RANGE (ts);
CREATE INDEX usage_records_ts ON usage_records (tenant, consumer_id, ts);
CREATE INDEX usage_records_request ON usage_records (tenant, consumer_id, request_id);
CREATE TABLE usage_records_default PARTITION OF usage_records DEFAULT;

-- gateway_events
ALTER TABLE gateway_events RENAME TO gateway_events_unpartitioned;
ALTER INDEX gateway_events_pkey RENAME TO gateway_events_unpartitioned_pkey;
CREATE TABLE gateway_events (
    LIKE gateway_events_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
    received_at timestamptz NOT NULL,
    PRIMARY KEY (tenant, consumer_id, request_id, received_at)
) PARTITION BY RANGE (received_at);
CREATE TABLE gateway_events_default PARTITION OF gateway_events DEFAULT;

-- A partition for every month holding rows, and the current month and the next two.
DO $$
DECLARE
    m timestamptz;
BEGIN
    FOR m IN
        SELECT date_trunc('month', ts, 'UTC') FROM usage_records_unpartitioned
        UNION SELECT (date_trunc('month', now() AT TIME ZONE 'UTC') + n * interval '1 month') AT TIME ZONE 'UTC'
              FROM generate_series(0, 2) n
    LOOP
        PERFORM aforo_ensure_partition('usage_records', m);
    END LOOP;
    FOR m IN
        SELECT date_trunc('month', recorded_at, 'UTC') FROM gateway_events_unpartitioned
        UNION SELECT (date_trunc('month', now() AT TIME ZONE 'UTC') + n * interval '1 month') AT TIME ZONE 'UTC'
              FROM generate_series(0, 2) n
    LOOP
        PERFORM aforo_ensure_partition('gateway_events', m);
    END LOOP;
END $$;

INSERT INTO usage_records SELECT * FROM usage_records_unpartitioned;
INSERT INTO gateway_events SELECT *, recorded_at FROM gateway_events_unpartitioned;
DROP TABLE usage_records_unpartitioned;
DROP TABLE gateway_events_unpartitioned;
