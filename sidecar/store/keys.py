"""The Redis key layout. Every key of one consumer shares the hash tag
``{tenant:consumer}``, so a decision touches one Redis Cluster slot.

    <prefix>{t:c}:c                consumer hash: status, plan binding, wallet, key hashes
    <prefix>{t:c}:q:<window>:<ms>  counter of one window period (expires after its reset)
    <prefix>{t:c}:r:<request id>   first decision of a request id (idempotency)
    <prefix>{t:c}:u                usage stream (drained by the reconciler)
    <prefix>{t:c}:t:<reference>    top-up reference already applied
    <prefix>{t:c}:g                gateway usage events (ReportUsage, ingestion)
    <prefix>{t:c}:e:<request id>   gateway event already recorded (deduplication)
    <prefix>{t:c}:n                wallet notices: suspended, resumed, topup_requested
    <prefix>plan:{t}:<plan>        plan definition (JSON) and version
    <prefix>plan:{t}:<plan>:m      set of consumer ids bound to the plan
    <prefix>plans:{t}              sorted set of the tenant's plan ids (listing)
    <prefix>consumers:{t}          sorted set of the tenant's consumer ids (listing)
    <prefix>key:<t>:<sha256>       API key hash -> consumer id (lookup index)
    <prefix>token:<id>             API token hash: r = its record (JSON), u = last use (ms)
    <prefix>tokens:{t}             set of the tenant's token ids (listing)
    <prefix>invalidate             pub/sub channel: "<message id> tenant:consumer" changed
    <prefix>invalidate:ack:<id>    listeners that dropped what message <id> named (60 s)
    <prefix>dirty                  set of "u|g|n:tenant:consumer": streams with new entries
    <prefix>reconciler             the reconciler's heartbeat (ms of its last drain pass)
"""

from __future__ import annotations

from sidecar.core.windows import WINDOWS


class KeySpace:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def tag(self, tenant: str, consumer_id: str) -> str:
        return f"{self.prefix}{{{tenant}:{consumer_id}}}"

    def consumer(self, tenant: str, consumer_id: str) -> str:
        return f"{self.tag(tenant, consumer_id)}:c"

    def counters(self, tenant: str, consumer_id: str, starts_ms: tuple[int, ...]) -> list[str]:
        tag = self.tag(tenant, consumer_id)
        return [f"{tag}:q:{w.value}:{start}" for w, start in zip(WINDOWS, starts_ms, strict=True)]

    def request(self, tenant: str, consumer_id: str, request_id: str) -> str:
        return f"{self.tag(tenant, consumer_id)}:r:{request_id}"

    def usage(self, tenant: str, consumer_id: str) -> str:
        return f"{self.tag(tenant, consumer_id)}:u"

    def topup(self, tenant: str, consumer_id: str, reference: str) -> str:
        return f"{self.tag(tenant, consumer_id)}:t:{reference}"

    def events(self, tenant: str, consumer_id: str) -> str:
        return f"{self.tag(tenant, consumer_id)}:g"

    def event_marker(self, tenant: str, consumer_id: str, request_id: str) -> str:
        return f"{self.tag(tenant, consumer_id)}:e:{request_id}"

    def notices(self, tenant: str, consumer_id: str) -> str:
        return f"{self.tag(tenant, consumer_id)}:n"

    def plan(self, tenant: str, plan_id: str) -> str:
        return f"{self.prefix}plan:{{{tenant}}}:{plan_id}"

    def plan_members(self, tenant: str, plan_id: str) -> str:
        return f"{self.plan(tenant, plan_id)}:m"

    def plans_index(self, tenant: str) -> str:
        return f"{self.prefix}plans:{{{tenant}}}"

    def consumers_index(self, tenant: str) -> str:
        return f"{self.prefix}consumers:{{{tenant}}}"

    def dirty(self) -> str:
        return f"{self.prefix}dirty"

    def heartbeat(self) -> str:
        return f"{self.prefix}reconciler"

    def invalidations(self) -> str:
        return f"{self.prefix}invalidate"

    def invalidation_ack(self, message_id: str) -> str:
        return f"{self.prefix}invalidate:ack:{message_id}"

    def api_key(self, tenant: str, key_hash: str) -> str:
        return f"{self.prefix}key:{tenant}:{key_hash}"

    def token(self, token_id: str) -> str:
        return f"{self.prefix}token:{token_id}"

    def tokens_index(self, tenant: str) -> str:
        return f"{self.prefix}tokens:{{{tenant}}}"
