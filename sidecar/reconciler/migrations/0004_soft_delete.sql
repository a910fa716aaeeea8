-- 0004: nothing billable is ever hard-deleted. A deleted plan or consumer keeps its
-- row (and a consumer its wallet, transactions, usage and keys) with deleted_at set;
-- the reconciler removes it from Redis. Writing the same id again restores it.
ALTER TABLE plans ADD COLUMN deleted_at timestamptz;
ALTER TABLE consumers ADD COLUMN deleted_at timestamptz;
