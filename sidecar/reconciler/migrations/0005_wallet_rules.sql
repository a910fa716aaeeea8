-- 0005: the wallet rules of a consumer, and the notices they record.
-- suspend_at_zero NULL means the default (on); auto_topup NULL means none configured,
-- otherwise {"enabled", "threshold", "amount", "currency"} with amounts in micros.
ALTER TABLE consumers ADD COLUMN suspend_at_zero boolean;
ALTER TABLE consumers ADD COLUMN auto_topup jsonb CHECK (auto_topup IS NULL OR jsonb_typeof(auto_topup) = 'object');

-- What the wallet rules did (drained from each consumer's Redis notices stream):
-- suspended (a prepaid wallet ran dry: reason wallet_empty), resumed (a top-up lifted
-- it), topup_requested (the balance fell below the auto top-up threshold). The id is
-- the stream entry id, so a drain that runs twice records a notice once.
CREATE TABLE wallet_notices (
    tenant      text NOT NULL,
    consumer_id text NOT NULL,
    id          text NOT NULL,
    type        text NOT NULL CHECK (type IN ('suspended', 'resumed', 'topup_requested')),
    at          timestamptz NOT NULL,
    balance     bigint NOT NULL,
    threshold   bigint,
    amount      bigint,
    currency    text,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, consumer_id, id)
);
CREATE INDEX wallet_notices_type ON wallet_notices (tenant, type, at);
