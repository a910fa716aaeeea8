"""The Postgres side: schema and migrations, the ledger (truth), full sync and change
feed into Redis, usage drain and wallet settlement, the reconciliation report, the
audit chain."""
