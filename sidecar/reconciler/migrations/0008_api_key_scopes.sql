-- API keys may expire and be limited to scopes (sidecar/core/api_keys.py): a product
-- id, or product:operation. Empty: every product of the consumer's plan.
ALTER TABLE api_keys
    ADD COLUMN expires_at timestamptz,
    ADD COLUMN scopes text[] NOT NULL DEFAULT '{}';
