-- 0002: gateway events may stand for many requests (aggregated Apigee analytics).
ALTER TABLE gateway_events
    ADD COLUMN count bigint NOT NULL DEFAULT 1 CHECK (count >= 0),
    ADD COLUMN errors bigint NOT NULL DEFAULT 0 CHECK (errors >= 0);
