-- 0006: connections to gateway management APIs (Kong Admin API, Konnect, Apigee).
-- A connection's settings are kept without its secrets; the secrets are sealed with
-- AES-256-GCM (sidecar/integrations/secret_box.py) in their own table, so neither the
-- settings nor the audit log ever hold them, not even sealed.
CREATE TABLE connections (
    tenant      text NOT NULL,
    id          text NOT NULL,
    type        text NOT NULL CHECK (type IN ('kong', 'konnect', 'apigee')),
    spec        jsonb NOT NULL CHECK (jsonb_typeof(spec) = 'object'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    last_sync   jsonb,
    PRIMARY KEY (tenant, id)
);

CREATE TABLE connection_secrets (
    tenant      text NOT NULL,
    id          text NOT NULL,
    fields      text[] NOT NULL,  -- which secrets are set (token, password)
    sealed      text NOT NULL,    -- v1.<key id>.<base64url(nonce || ciphertext || tag)>
    key_id      text NOT NULL,
    PRIMARY KEY (tenant, id),
    FOREIGN KEY (tenant, id) REFERENCES connections (tenant, id) ON DELETE CASCADE
);

-- What an import of a connection brought in: only these may be revoked when the
-- gateway no longer has them (a consumer created by hand is never touched).
CREATE TABLE connection_objects (
    tenant        text NOT NULL,
    connection_id text NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('plan', 'consumer')),
    object_id     text NOT NULL,
    PRIMARY KEY (tenant, connection_id, kind, object_id)
);
