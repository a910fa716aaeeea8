-- 0009: alerts and their delivery to webhooks through a transactional outbox.
--
-- An alert is written by the reconciler in the same transaction as the ledger change
-- that caused it (the usage row whose decision crossed a quota level, the wallet notice),
-- and its deliveries (one per subscribed webhook) in that transaction too: an alert is
-- never lost nor invented, and a batch drained again after a crash adds nothing (the
-- alert's key is unique). The dispatcher (sidecar/reconciler/webhooks.py) sends what is
-- pending, one consumer's deliveries to one endpoint in order, and logs every attempt.

CREATE TABLE alerts (
    id          bigserial PRIMARY KEY,
    tenant      text NOT NULL,
    consumer_id text NOT NULL,
    type        text NOT NULL,   -- sidecar/core/alerts.py:AlertType
    key         text NOT NULL,   -- what makes it once: window:level:period end; a notice id
    at          timestamptz NOT NULL,  -- when it happened (the crossing call's time)
    recorded_at timestamptz NOT NULL DEFAULT now(),
    data        jsonb NOT NULL CHECK (jsonb_typeof(data) = 'object'),
    UNIQUE (tenant, consumer_id, type, key)
);
CREATE INDEX alerts_tenant ON alerts (tenant, id);

-- A tenant's alert rules (sidecar/core/alerts.py:AlertRules); none: the defaults.
CREATE TABLE alert_rules (
    tenant      text PRIMARY KEY,
    rules       jsonb NOT NULL CHECK (jsonb_typeof(rules) = 'object'),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- The signing secret is sealed with AES-256-GCM (sidecar/integrations/secret_box.py,
-- bound to the row), shown once when made, and kept out of the audit log.
CREATE TABLE webhooks (
    tenant        text NOT NULL,
    id            text NOT NULL,
    url           text NOT NULL,
    events        text[] NOT NULL,
    enabled       boolean NOT NULL DEFAULT true,
    description   text NOT NULL DEFAULT '',
    sealed_secret text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    deleted_at    timestamptz,
    PRIMARY KEY (tenant, id)
);

CREATE TABLE webhook_deliveries (
    id              bigserial PRIMARY KEY,
    tenant          text NOT NULL,
    webhook_id      text NOT NULL,
    alert_id        bigint NOT NULL REFERENCES alerts (id),
    message_id      text NOT NULL,   -- the webhook-id header, the same on every attempt
    event_type      text NOT NULL,
    consumer_id     text NOT NULL,   -- one consumer's deliveries to an endpoint go in id order
    payload         text NOT NULL,   -- the exact body that is signed and sent
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    retry_since     timestamptz NOT NULL DEFAULT now(),  -- retried for a period from here
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_until     timestamptz,     -- a dispatcher is sending it until then
    last_attempt_at timestamptz,
    last_status     integer,
    last_error      text,
    delivered_at    timestamptz,
    UNIQUE (tenant, webhook_id, alert_id),
    FOREIGN KEY (tenant, webhook_id) REFERENCES webhooks (tenant, id)
);
CREATE INDEX webhook_deliveries_pending
    ON webhook_deliveries (tenant, webhook_id, consumer_id, id) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_log ON webhook_deliveries (tenant, webhook_id, id);

CREATE TABLE webhook_attempts (
    delivery_id bigint NOT NULL REFERENCES webhook_deliveries (id),
    attempt     integer NOT NULL,
    at          timestamptz NOT NULL,
    status      integer,         -- the receiver's HTTP status (NULL: no answer)
    error       text NOT NULL,   -- why it failed ('' when delivered)
    duration_ms integer NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
);
