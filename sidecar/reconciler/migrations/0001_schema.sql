-- 0001: the source of truth. Plans, consumers, API keys (hashes only), wallets and
-- their transactions, the usage ledger, gateway events and the audit log.
-- Money is bigint micro-units everywhere.

CREATE TABLE tenants (
    id          text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE plans (
    tenant      text NOT NULL REFERENCES tenants (id),
    id          text NOT NULL,
    name        text NOT NULL DEFAULT '',
    -- {"minute": 5, "day": 1000}: window name -> limit
    windows     jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(windows) = 'object'),
    price       bigint NOT NULL DEFAULT 0 CHECK (price >= 0),
    products    text[] NOT NULL DEFAULT '{}',
    version     bigint NOT NULL DEFAULT 1,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, id)
);

CREATE TABLE consumers (
    tenant      text NOT NULL REFERENCES tenants (id),
    id          text NOT NULL,
    plan_id     text NOT NULL,
    status      text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended', 'revoked')),
    wallet_mode text NOT NULL DEFAULT 'prepaid' CHECK (wallet_mode IN ('prepaid', 'postpaid')),
    version     bigint NOT NULL DEFAULT 1,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, id),
    FOREIGN KEY (tenant, plan_id) REFERENCES plans (tenant, id)
);
CREATE INDEX consumers_plan ON consumers (tenant, plan_id);

CREATE TABLE api_keys (
    tenant      text NOT NULL,
    key_hash    text NOT NULL CHECK (key_hash ~ '^[0-9a-f]{64}$'),
    consumer_id text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    PRIMARY KEY (tenant, key_hash),
    FOREIGN KEY (tenant, consumer_id) REFERENCES consumers (tenant, id)
);
CREATE INDEX api_keys_consumer ON api_keys (tenant, consumer_id);

-- balance: what the consumer has, settled (top-ups minus settled debits).
-- settled_debits: cumulative debits settled from usage; version: bumped on every change.
CREATE TABLE wallets (
    tenant          text NOT NULL,
    consumer_id     text NOT NULL,
    balance         bigint NOT NULL DEFAULT 0,
    settled_debits  bigint NOT NULL DEFAULT 0 CHECK (settled_debits >= 0),
    currency        text NOT NULL DEFAULT 'USD',
    version         bigint NOT NULL DEFAULT 1,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, consumer_id),
    FOREIGN KEY (tenant, consumer_id) REFERENCES consumers (tenant, id)
);

CREATE TABLE wallet_transactions (
    id          bigserial PRIMARY KEY,
    tenant      text NOT NULL,
    consumer_id text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('topup', 'usage', 'adjustment')),
    amount      bigint NOT NULL,  -- positive credits, negative debits
    reference   text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (tenant, consumer_id) REFERENCES wallets (tenant, consumer_id)
);
CREATE UNIQUE INDEX wallet_transactions_reference
    ON wallet_transactions (tenant, consumer_id, reference) WHERE reference IS NOT NULL;

-- The billing ledger: one row per allowed decision. Unique on the same scope as the
-- hot store's idempotency (tenant, consumer, request id), so a row is never doubled.
CREATE TABLE usage_records (
    tenant      text NOT NULL,
    consumer_id text NOT NULL,
    request_id  text NOT NULL,
    decision_id text NOT NULL,
    ts          timestamptz NOT NULL,
    product     text NOT NULL,
    operation   text NOT NULL DEFAULT '',
    cost        bigint NOT NULL CHECK (cost >= 0),
    hits        bigint NOT NULL CHECK (hits >= 1),
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, consumer_id, request_id)
);
CREATE INDEX usage_records_ts ON usage_records (tenant, consumer_id, ts);

-- What gateways observed (the Kong plugin's log phase, ingested access logs).
CREATE TABLE gateway_events (
    tenant              text NOT NULL,
    consumer_id         text NOT NULL,
    request_id          text NOT NULL,
    product             text NOT NULL DEFAULT '',
    route               text NOT NULL DEFAULT '',
    service             text NOT NULL DEFAULT '',
    method              text NOT NULL DEFAULT '',
    status              integer NOT NULL DEFAULT 0,
    started_at          timestamptz,
    latency_ms          bigint NOT NULL DEFAULT 0,
    upstream_latency_ms bigint NOT NULL DEFAULT 0,
    gateway_latency_ms  bigint NOT NULL DEFAULT 0,
    request_size        bigint NOT NULL DEFAULT 0,
    response_size       bigint NOT NULL DEFAULT 0,
    decision_id         text NOT NULL DEFAULT '',
    headers             jsonb NOT NULL DEFAULT '{}'::jsonb,
    recorded_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, consumer_id, request_id)
);

-- Append-only audit trail. Each row's hash covers its content and the previous row's
-- hash, so editing, deleting or inserting a row breaks the chain (audit verify).
CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor       text NOT NULL,
    action      text NOT NULL,
    tenant      text NOT NULL,
    target      text NOT NULL,
    before      jsonb,
    after       jsonb,
    prev_hash   text NOT NULL,
    hash        text NOT NULL
);

-- The canonical text a row's hash covers; `aforo-sidecar audit verify` recomputes it.
CREATE FUNCTION aforo_audit_text(r audit_log) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT r.prev_hash || '|' || r.id || '|' || (extract(epoch FROM r.at) * 1000000)::bigint
        || '|' || r.actor || '|' || r.action || '|' || r.tenant || '|' || r.target
        || '|' || coalesce(r.before::text, '') || '|' || coalesce(r.after::text, '')
$$;

CREATE FUNCTION aforo_audit_chain() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- One writer at a time extends the chain.
    PERFORM pg_advisory_xact_lock(7261846);
    SELECT hash INTO NEW.prev_hash FROM audit_log ORDER BY id DESC LIMIT 1;
    NEW.prev_hash := coalesce(NEW.prev_hash, 'genesis');
    NEW.hash := encode(sha256(convert_to(aforo_audit_text(NEW), 'UTF8')), 'hex');
    RETURN NEW;
END $$;
CREATE TRIGGER audit_log_chain BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION aforo_audit_chain();

CREATE FUNCTION aforo_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END $$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION aforo_audit_append_only();

-- Every change to the truth is audited (admin API or plain SQL alike: a billing job
-- suspending a consumer is recorded too) and announced to the reconciler.
-- The admin API names itself with SET LOCAL aforo.actor; otherwise the database user.
CREATE FUNCTION aforo_track() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    row_tenant text;
    row_target text;
    before_row jsonb;
    after_row jsonb;
BEGIN
    IF TG_OP = 'DELETE' THEN
        before_row := to_jsonb(OLD);
        row_tenant := OLD.tenant;
    ELSE
        after_row := to_jsonb(NEW);
        row_tenant := NEW.tenant;
        IF TG_OP = 'UPDATE' THEN
            before_row := to_jsonb(OLD);
        END IF;
    END IF;
    row_target := CASE TG_TABLE_NAME
        WHEN 'plans' THEN coalesce(after_row, before_row) ->> 'id'
        WHEN 'consumers' THEN coalesce(after_row, before_row) ->> 'id'
        WHEN 'api_keys' THEN coalesce(after_row, before_row) ->> 'consumer_id'
        WHEN 'wallets' THEN coalesce(after_row, before_row) ->> 'consumer_id'
    END;
    -- Settling usage moves wallets constantly; it is in the usage ledger, not the audit.
    IF NOT (TG_TABLE_NAME = 'wallets' AND coalesce(current_setting('aforo.origin', true), '') = 'settlement')
       AND (before_row IS DISTINCT FROM after_row) THEN
        INSERT INTO audit_log (actor, action, tenant, target, before, after, prev_hash, hash)
        VALUES (
            coalesce(nullif(current_setting('aforo.actor', true), ''), session_user),
            TG_TABLE_NAME || '.' || lower(TG_OP),
            row_tenant, row_target, before_row, after_row, '', ''
        );
    END IF;
    PERFORM pg_notify('aforo_changes', json_build_object(
        'table', TG_TABLE_NAME, 'tenant', row_tenant, 'id', row_target,
        'origin', coalesce(current_setting('aforo.origin', true), '')
    )::text);
    RETURN NULL;
END $$;

CREATE TRIGGER plans_track AFTER INSERT OR UPDATE OR DELETE ON plans
    FOR EACH ROW EXECUTE FUNCTION aforo_track();
CREATE TRIGGER consumers_track AFTER INSERT OR UPDATE OR DELETE ON consumers
    FOR EACH ROW EXECUTE FUNCTION aforo_track();
CREATE TRIGGER api_keys_track AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION aforo_track();
CREATE TRIGGER wallets_track AFTER INSERT OR UPDATE OR DELETE ON wallets
    FOR EACH ROW EXECUTE FUNCTION aforo_track();

-- Versions move forward on every update, whoever makes it.
CREATE FUNCTION aforo_bump_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW IS DISTINCT FROM OLD THEN
        NEW.version := OLD.version + 1;
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER plans_version BEFORE UPDATE ON plans
    FOR EACH ROW EXECUTE FUNCTION aforo_bump_version();
CREATE TRIGGER consumers_version BEFORE UPDATE ON consumers
    FOR EACH ROW EXECUTE FUNCTION aforo_bump_version();
CREATE TRIGGER wallets_version BEFORE UPDATE ON wallets
    FOR EACH ROW EXECUTE FUNCTION aforo_bump_version();

-- A consumer always has a wallet, however it was created.
CREATE FUNCTION aforo_open_wallet() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO wallets (tenant, consumer_id) VALUES (NEW.tenant, NEW.id) ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;
CREATE TRIGGER consumers_wallet AFTER INSERT ON consumers
    FOR EACH ROW EXECUTE FUNCTION aforo_open_wallet();
