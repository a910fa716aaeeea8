-- 0003: one ledger row per decision. The hot store remembers a request id for
-- idempotency_ttl_seconds; a retry inside that window is replayed and never reaches
-- the ledger twice. A request id sent again after the window is decided, counted and
-- charged again in Redis, so the ledger records it too (a key on the request id alone
-- would drop it, and Redis and Postgres would disagree on the balance for good). A
-- drain that re-reads a batch after a crash finds the same decision ids: no double row.
ALTER TABLE usage_records DROP CONSTRAINT usage_records_pkey;
ALTER TABLE usage_records ADD PRIMARY KEY (tenant, consumer_id, decision_id);
CREATE INDEX usage_records_request ON usage_records (tenant, consumer_id, request_id);
