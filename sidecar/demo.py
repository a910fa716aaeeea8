"""The demo catalog `aforo-sidecar demo` loads into the embedded store."""

from __future__ import annotations

from sidecar.core.api_keys import generate_api_key, hash_api_key
from sidecar.core.models import ConsumerKey, ConsumerSpec, Plan, WalletMode
from sidecar.store.base import Store

PLANS = (
    Plan(id="free", name="Free", windows={"minute": 5, "day": 100}, price=0),
    Plan(
        id="pro",
        name="Pro",
        windows={"minute": 600, "day": 1000, "month": 20_000},
        price=50_000,  # 0.05 per call
        products=["premium-api", "weather-api"],
    ),
    Plan(id="metered", name="Metered", windows={"hour": 10_000}, price=1_000),
)
CONSUMERS = (
    ConsumerSpec(id="app-free", plan_id="free"),
    ConsumerSpec(id="app-pro", plan_id="pro"),
    ConsumerSpec(id="app-metered", plan_id="metered", wallet_mode=WalletMode.POSTPAID),
)
PRO_BALANCE = 10_000_000  # 10.00: 200 calls at 0.05


async def load_demo(store: Store, now_ms: int) -> str:
    """Load the catalog; returns a raw API key registered to app-pro."""
    for plan in PLANS:
        await store.put_plan(plan.validated())
    for consumer in CONSUMERS:
        await store.put_consumer(consumer.validated(), now_ms)
    await store.top_up("default", "app-pro", PRO_BALANCE, "demo-initial-credit")
    raw = generate_api_key()
    await store.add_key("default", "app-pro", ConsumerKey(hash_api_key(raw)))
    return raw


def curl_examples(base: str, admin_token: str, api_key: str) -> str:
    auth = f'-H "Authorization: Bearer {admin_token}"'
    json_h = '-H "Content-Type: application/json"'
    return "\n".join(
        [
            "# allowed, then 429 after 5 calls in a minute (plan free: 5/minute, 100/day)",
            f'curl -s {json_h} -d \'{{"consumer_id":"app-free","product":"any-api"}}\' {base}/v1/authorize',
            "# the Apigee seed contract, charged 0.05 from a 10.00 wallet",
            f'curl -s {json_h} -d \'{{"appId":"app-pro","apiProduct":"premium-api",'
            f'"operation":"GET /quotes","estimatedCost":0.05}}\' {base}/integrations/apigee/authorize',
            "# by API key (hashed, looked up; the raw key is never stored)",
            f'curl -s {json_h} -d \'{{"api_key":"{api_key}","product":"weather-api"}}\' {base}/v1/authorize',
            "# suspend, then every decision is 403 suspended",
            f'curl -s {auth} {json_h} -d \'{{"consumer_id":"app-pro"}}\' {base}/integrations/kong/suspend',
            f"curl -s {auth} -X POST {base}/v1/admin/consumers/app-pro/resume",
            "# top up 5.00 (amounts in micros), idempotent on the reference",
            f'curl -s {auth} {json_h} -d \'{{"amount":5000000,"reference":"inv-1"}}\' '
            f"{base}/v1/admin/consumers/app-pro/topup",
            f"curl -s {auth} {base}/v1/admin/consumers/app-pro",
            f"curl -s {base}/metrics | grep aforo_decisions_total",
        ]
    )
