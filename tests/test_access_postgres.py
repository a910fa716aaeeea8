"""API tokens with Postgres configured: kept in Postgres (only hashes), every change
audited with the token that made it, a revocation made through one sidecar refused by
another on its next call."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ADMIN, seed
from tests.test_access import bearer, mint
from tests.test_postgres import stack

pytestmark = pytest.mark.slow


async def test_tokens_live_in_postgres_and_the_audit_log_names_them(migrated_database, redis_url, prefix):
    async with (
        stack(migrated_database, redis_url, prefix, decision_port=0) as one,
        stack(migrated_database, redis_url, prefix, decision_port=0) as two,
    ):
        await seed(one.http, windows={"day": 10}, consumer_id="c1", balance=100)
        raw = await mint(one.http, "billing", name="finance job")
        token_id, secret = raw.split("_")[1], raw.split("_", 2)[2]
        row = await one.db.fetchrow("SELECT * FROM api_tokens WHERE id = $1", token_id)
        assert (row["tenant"], row["role"], row["name"]) == ("default", "billing", "finance job")
        assert row["created_by"].startswith("admin-token@")
        # Only a hash is kept, and nowhere in the database is the secret.
        assert len(row["secret_hash"]) == 64 and secret not in row["secret_hash"]
        dump = await one.db.fetch("SELECT row_to_json(a)::text AS r FROM audit_log a")
        dump += await one.db.fetch("SELECT row_to_json(t)::text AS r FROM api_tokens t")
        assert all(secret not in r["r"] for r in dump)

        # A change made with the token is audited under its id and name (both sidecars).
        topup = await two.http.post("/v1/admin/consumers/c1/topup", json={"amount": 5}, headers=bearer(raw))
        assert topup.status_code == 200, topup.text
        audit = await one.db.fetch("SELECT actor, action, after::text AS after FROM audit_log ORDER BY id")
        assert audit[-1]["actor"].startswith(f"token:{token_id} finance job@")
        assert audit[-1]["action"] == "wallets.update"
        minted = [r for r in audit if r["action"] == "token.create"]
        assert len(minted) == 1 and "hash" not in minted[0]["after"]
        assert json.loads(minted[0]["after"])["id"] == token_id

        # Revoked through one sidecar, refused by the other on its very next call.
        assert (await one.http.delete(f"/v1/admin/tokens/{token_id}", headers=ADMIN)).status_code == 200
        refused = await two.http.get("/v1/admin/consumers", headers=bearer(raw))
        assert refused.status_code == 401
        actions = [r["action"] for r in await one.db.fetch("SELECT action FROM audit_log ORDER BY id")]
        assert actions[-1] == "token.revoke"
        listed = (await two.http.get("/v1/admin/tokens", headers=ADMIN)).json()["items"]
        assert [t["id"] for t in listed] == [token_id] and listed[0]["revoked_at_ms"] is not None
        # The hot store holds no token when Postgres is the truth.
        assert await one.store.get_token(token_id) is None


async def test_a_tenant_token_gets_the_reconciliation_of_its_own_tenant(migrated_database, redis_url, prefix):
    async with stack(migrated_database, redis_url, prefix, decision_port=0) as s:
        await seed(s.http, windows={"day": 10}, consumer_id="a1")
        await seed(s.http, windows={"day": 10}, consumer_id="b1", tenant="other")
        everyone = (await s.http.get("/v1/admin/reconciliation", headers=ADMIN)).json()
        assert {(r["tenant"], r["consumer_id"]) for r in everyone["rows"]} == {
            ("default", "a1"),
            ("other", "b1"),
        }
        viewer = bearer(await mint(s.http, "viewer", tenant="other"))
        own = (await s.http.get("/v1/admin/reconciliation", headers=viewer)).json()
        assert {(r["tenant"], r["consumer_id"]) for r in own["rows"]} == {("other", "b1")}
