-- 0012: drift against the gateway's own counts (sidecar/core/drift.py): each stored run
-- (the reconciler's daily one, or one asked for through the API) with the rows it
-- compared; flagged rows raise gateway.drift alerts in the run's transaction.
CREATE TABLE gateway_drift_runs (
    id            bigserial PRIMARY KEY,
    tenant        text NOT NULL,
    range_start   timestamptz NOT NULL,
    range_end     timestamptz NOT NULL,
    threshold_pct double precision NOT NULL,
    requested_by  text NOT NULL,   -- 'schedule' or the API caller
    created_at    timestamptz NOT NULL DEFAULT now(),
    rows_compared integer NOT NULL,
    rows_flagged  integer NOT NULL
);
CREATE INDEX gateway_drift_runs_tenant ON gateway_drift_runs (tenant, range_start);

CREATE TABLE gateway_drift_rows (
    run_id      bigint NOT NULL REFERENCES gateway_drift_runs (id) ON DELETE CASCADE,
    consumer_id text NOT NULL,
    product     text NOT NULL,
    hour        timestamptz NOT NULL,
    allowed     bigint NOT NULL,
    gateway     bigint NOT NULL,
    drift_pct   double precision NOT NULL,
    flagged     boolean NOT NULL,
    PRIMARY KEY (run_id, consumer_id, product, hour)
);
