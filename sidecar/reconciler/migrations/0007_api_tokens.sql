-- 0007: API tokens (sidecar/core/access.py). Only the SHA-256 of each secret is kept;
-- after a rotation the previous hash stays valid until previous_until_ms. Changes are
-- audited by the admin API (audit_log rows without any hash); a token's last use is
-- a plain update, not audited.
CREATE TABLE api_tokens (
    id                 text PRIMARY KEY,
    tenant             text NOT NULL,
    role               text NOT NULL CHECK (role IN ('admin', 'billing', 'viewer', 'developer', 'gateway')),
    name               text NOT NULL,
    consumers          text[] NOT NULL DEFAULT '{}',
    secret_hash        text NOT NULL,
    previous_hash      text,
    previous_until_ms  bigint,
    created_ms         bigint NOT NULL,
    created_by         text NOT NULL,
    expires_ms         bigint,
    revoked_ms         bigint,
    last_used_ms       bigint
);
CREATE INDEX api_tokens_tenant ON api_tokens (tenant, created_ms);
