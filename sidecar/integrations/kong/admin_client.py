"""Kong's Admin API: walk the catalog (consumers, consumer groups and their members,
plugins, key-auth credentials), count it, and push consumer group rate limits.

Follows the Kong Gateway Admin API reference
(https://developer.konghq.com/api/gateway/admin-ee/): list endpoints answer
``{"data": [...], "next": "<path with offset>" | null}`` and take ``size`` (up to 1000);
``Kong-Admin-Token`` authenticates (RBAC); a workspace prefixes every path.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import msgspec

from sidecar.integrations.gateway_http import GatewayError, GatewayHttp
from sidecar.integrations.kong.mapping import (
    KongConsumer,
    KongEntity,
    KongGroup,
    KongKeyAuth,
    KongPlugin,
    KongSnapshot,
)

PAGE_SIZE = 1000
MAX_PAGES = 100_000  # a `next` that never ends is a broken gateway, not a big one


class KongAdminClient:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        workspace: str | None = None,
        page_size: int = PAGE_SIZE,
        control_plane_id: str | None = None,
        **http: Any,
    ) -> None:
        """Kong's Admin API, or with ``control_plane_id`` a Konnect control plane's
        (``{region}/v2/control-planes/{id}/core-entities``, a Bearer access token)."""
        headers = {"Accept": "application/json"}
        self._page_size = page_size
        self.control_plane = None if control_plane_id is None else f"/v2/control-planes/{control_plane_id}"
        if self.control_plane is not None:
            self.prefix = f"{self.control_plane}/core-entities"
            if token:
                headers["Authorization"] = f"Bearer {token}"
        else:
            self.prefix = f"/{workspace}" if workspace else ""
            if token:
                headers["Kong-Admin-Token"] = token
        self.http = GatewayHttp(base_url.rstrip("/"), headers, **http)

    async def walk(self, path: str) -> list[dict[str, Any]]:
        """Every object of a list endpoint, page after page to the end; a page that fails
        fails the whole walk (GatewayError), so a partial list is never returned."""
        items: list[dict[str, Any]] = []
        url: str | None = f"{self.prefix}{path}"
        params: dict[str, Any] | None = {"size": self._page_size}
        for _ in range(MAX_PAGES):
            if url is None:
                return items
            page = await self.http.request("GET", url, params=params)
            if not isinstance(page, dict) or not isinstance(page.get("data"), list):
                raise GatewayError("bad_response", f"GET {url}: no data list")
            items += page["data"]
            if page.get("next"):
                url, params = page["next"], None  # Kong: `next` carries size and offset
            elif page.get("offset"):
                params = {"size": self._page_size, "offset": page["offset"]}  # Konnect: offset only
            else:
                url = None
        raise GatewayError("bad_response", f"GET {path}: more than {MAX_PAGES} pages")

    async def snapshot(self) -> KongSnapshot:
        """The whole catalog, or GatewayError: nothing partial."""
        try:
            groups = msgspec.convert(await self.walk("/consumer_groups"), list[KongGroup])
            members = {
                g.id: [c["id"] for c in await self.walk(f"/consumer_groups/{g.id}/consumers")] for g in groups
            }
            return KongSnapshot(
                consumers=msgspec.convert(await self.walk("/consumers"), list[KongConsumer]),
                groups=groups,
                members=members,
                plugins=msgspec.convert(await self.walk("/plugins"), list[KongPlugin]),
                keys=msgspec.convert(await self.walk("/key-auths"), list[KongKeyAuth]),
                services=msgspec.convert(await self.walk("/services"), list[KongEntity]),
                routes=msgspec.convert(await self.walk("/routes"), list[KongEntity]),
            )
        except (msgspec.ValidationError, KeyError, TypeError) as exc:
            raise GatewayError(
                "bad_response", f"an Admin API object has an unexpected shape: {exc!r}"
            ) from None

    async def counts(self) -> dict[str, int]:
        """What a connection test reports (for Konnect, the control plane first)."""
        found = {}
        if self.control_plane is not None:
            plane = await self.http.request("GET", self.control_plane)
            if not isinstance(plane, dict) or "id" not in plane:
                raise GatewayError("bad_response", f"GET {self.control_plane}: not a control plane")
            found["control_planes"] = 1
        return found | {
            "consumers": len(await self.walk("/consumers")),
            "consumer_groups": len(await self.walk("/consumer_groups")),
            "services": len(await self.walk("/services")),
        }

    async def status(self) -> dict[str, Any]:
        """The node's status (``GET /status``): reachable, and whether its database is."""
        answer = await self.http.request("GET", f"{self.prefix}/status")
        if not isinstance(answer, dict):
            raise GatewayError("bad_response", "GET /status: not an object")
        return answer

    async def aclose(self) -> None:
        await self.http.aclose()


async def enforce_group(client: KongAdminClient, group: str, config: dict[str, int]) -> str:
    """Make the consumer group's ``rate-limiting`` plugin limit exactly ``config``:
    "created", "updated" or "unchanged" (no write at all: a repeated push is a no-op)."""
    groups = await client.walk("/consumer_groups")
    found = next((g for g in groups if group in (g.get("id"), g.get("name"))), None)
    if found is None:
        raise GatewayError("not_found", f"consumer group {group!r} is not in Kong", 404)
    plugins = [
        p
        for p in await client.walk("/plugins")
        if p.get("name") == "rate-limiting" and (p.get("consumer_group") or {}).get("id") == found["id"]
    ]
    path = f"{client.prefix}/consumer_groups/{found['id']}/plugins"
    # Every window is set: one the plan does not limit is cleared (null).
    wanted = {window: config.get(window) for window in ("minute", "hour", "day", "month")}
    if not plugins:
        await client.http.request("POST", path, json={"name": "rate-limiting", "config": wanted})
        return "created"
    current = plugins[0].get("config") or {}
    if all(current.get(window) == limit for window, limit in wanted.items()):
        return "unchanged"
    await client.http.request("PATCH", f"{path}/{plugins[0]['id']}", json={"config": wanted})
    return "updated"


async def set_denied(client: KongAdminClient, consumer: str, field: str, group: str, denied: bool) -> str:
    """Put the consumer (``consumer`` is its ``field``: id, username or custom_id) in the
    ACL group ``group`` (``denied``) or take it out, through the ACL plugin's credentials:
    "updated", or "unchanged" without any write. Services that Kong should close to such
    consumers carry the ``acl`` plugin with ``deny: [group]``."""
    if field == "custom_id":
        found = await client.http.request("GET", f"{client.prefix}/consumers", params={"custom_id": consumer})
        matches = found.get("data") if isinstance(found, dict) else None
        if not matches:
            raise GatewayError("not_found", f"no Kong consumer has custom_id {consumer!r}", 404)
        kong_id = matches[0]["id"]
    else:
        found = await client.http.request("GET", f"{client.prefix}/consumers/{quote(consumer, safe='')}")
        if not isinstance(found, dict) or not isinstance(found.get("id"), str):
            raise GatewayError("bad_response", f"GET /consumers/{consumer}: not a consumer")
        kong_id = found["id"]
    path = f"/consumers/{kong_id}/acls"
    present = [acl for acl in await client.walk(path) if acl.get("group") == group]
    if denied and not present:
        await client.http.request("POST", f"{client.prefix}{path}", json={"group": group, "tags": ["aforo"]})
        return "updated"
    if not denied and present:
        for acl in present:
            await client.http.request("DELETE", f"{client.prefix}{path}/{acl['id']}")
        return "updated"
    return "unchanged"
