"""Apigee's Management API: walk the catalog (API products, developers, apps with their
credentials), count it, update a product's quota and set an app's status.

Follows the Apigee API reference (X and hybrid: https://cloud.google.com/apigee/docs/
reference/apis/apigee/rest, base ``https://apigee.googleapis.com/v1``, an OAuth bearer
token; Edge: https://apidocs.apigee.com/docs, base ``https://api.enterprise.apigee.com/v1``,
basic credentials or a bearer token). Lists take ``expand=true`` and page by ``startKey``
and ``count`` (apps on Edge: ``rows``), the next page starting *with* the key it names;
Apigee X pages its org-wide app list by ``pageSize`` and ``pageToken`` (``nextPageToken``).
An empty list may be answered as ``{}``.
"""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import quote

import msgspec

from sidecar.integrations.apigee.mapping import ApigeeApp, ApigeeDeveloper, ApigeeProduct, ApigeeSnapshot
from sidecar.integrations.gateway_http import GatewayError, GatewayHttp

PAGE_SIZE = 1000  # the largest count the reference allows on every list used here
MAX_PAGES = 100_000


class ApigeeClient:
    def __init__(
        self,
        base_url: str,
        organization: str,
        *,
        api: str = "x",
        token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        page_size: int = PAGE_SIZE,
        **http: Any,
    ) -> None:
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        elif username and password:
            basic = base64.b64encode(f"{username}:{password}".encode()).decode()
            headers["Authorization"] = f"Basic {basic}"
        self.api = api
        self.org = f"/organizations/{quote(organization, safe='')}"
        self._page_size = page_size
        self.http = GatewayHttp(base_url.rstrip("/"), headers, **http)

    async def _page(self, path: str, params: dict[str, Any], field: str) -> tuple[list[dict[str, Any]], Any]:
        page = await self.http.request("GET", f"{self.org}{path}", params=params)
        if not isinstance(page, dict):
            raise GatewayError("bad_response", f"GET {path}: not an object")
        items = page.get(field, [])
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise GatewayError("bad_response", f"GET {path}: {field!r} is not a list of objects")
        return items, page.get("nextPageToken")

    async def walk(self, path: str, field: str, key: str, size_param: str = "count") -> list[dict[str, Any]]:
        """Every object of a list, page after page by ``startKey`` (the last page is the
        one shorter than asked); a page that fails fails the whole walk."""
        items: list[dict[str, Any]] = []
        start: str | None = None
        for _ in range(MAX_PAGES):
            params: dict[str, Any] = {"expand": "true", size_param: self._page_size}
            if start is not None:
                params["startKey"] = start
            batch, _ = await self._page(path, params, field)
            full = len(batch) >= self._page_size
            if start is not None and batch and batch[0].get(key) == start:
                batch = batch[1:]  # the page starts with the key it was asked from
            items += batch
            if not full or not batch:
                return items
            start = batch[-1].get(key)
            if not isinstance(start, str):
                raise GatewayError("bad_response", f"GET {path}: an object without {key!r}")
        raise GatewayError("bad_response", f"GET {path}: more than {MAX_PAGES} pages")

    async def _walk_tokens(self, path: str, field: str) -> list[dict[str, Any]]:
        """Apigee X's ``pageSize``/``pageToken`` paging, to the last page (no token)."""
        items: list[dict[str, Any]] = []
        params: dict[str, Any] = {"expand": "true", "pageSize": self._page_size}
        for _ in range(MAX_PAGES):
            batch, token = await self._page(path, params, field)
            items += batch
            if not token:
                return items
            params = {"expand": "true", "pageSize": self._page_size, "pageToken": token}
        raise GatewayError("bad_response", f"GET {path}: more than {MAX_PAGES} pages")

    async def apps(self) -> list[dict[str, Any]]:
        if self.api == "x":
            return await self._walk_tokens("/apps", "app")
        return await self.walk("/apps", "app", "appId", size_param="rows")

    async def products(self) -> list[dict[str, Any]]:
        return await self.walk("/apiproducts", "apiProduct", "name")

    async def developers(self) -> list[dict[str, Any]]:
        return await self.walk("/developers", "developer", "email")

    async def snapshot(self) -> ApigeeSnapshot:
        """The whole catalog, or GatewayError: nothing partial."""
        try:
            return ApigeeSnapshot(
                products=msgspec.convert(await self.products(), list[ApigeeProduct]),
                apps=msgspec.convert(await self.apps(), list[ApigeeApp]),
                developers=msgspec.convert(await self.developers(), list[ApigeeDeveloper]),
            )
        except msgspec.ValidationError as exc:
            raise GatewayError(
                "bad_response", f"a Management API object has an unexpected shape: {exc}"
            ) from None

    async def counts(self) -> dict[str, int]:
        return {
            "products": len(await self.products()),
            "apps": len(await self.apps()),
            "developers": len(await self.developers()),
        }

    async def organization(self) -> dict[str, Any]:
        """``GET /organizations/{org}``: reachable, and the credentials are good."""
        answer = await self.http.request("GET", self.org)
        if not isinstance(answer, dict):
            raise GatewayError("bad_response", f"GET {self.org}: not an object")
        return answer

    async def product(self, name: str) -> dict[str, Any]:
        answer = await self.http.request("GET", f"{self.org}/apiproducts/{quote(name, safe='')}")
        if not isinstance(answer, dict):
            raise GatewayError("bad_response", f"GET apiproducts/{name}: not an object")
        return answer

    async def set_quota(self, name: str, fields: dict[str, str]) -> str:
        """Make the product's quota exactly ``fields`` (quota, quotaInterval,
        quotaTimeUnit): "updated", or "unchanged" without any write. The reference's
        update replaces the whole product, so the product read is sent back whole."""
        product = await self.product(name)
        if all(str(product.get(field, "")) == value for field, value in fields.items()):
            return "unchanged"
        body = {k: v for k, v in product.items() if k not in ("createdAt", "lastModifiedAt")} | fields
        await self.http.request("PUT", f"{self.org}/apiproducts/{quote(name, safe='')}", json=body)
        return "updated"

    async def set_app_status(self, app_id: str, approved: bool) -> str:
        """Approve or revoke a developer app (``POST .../developers/{email}/apps/{name}
        ?action=approve|revoke``): "updated", or "unchanged" when it already is."""
        app = await self.http.request("GET", f"{self.org}/apps/{quote(app_id, safe='')}")
        if not isinstance(app, dict) or not isinstance(app.get("name"), str):
            raise GatewayError("bad_response", f"GET apps/{app_id}: not an app")
        wanted = "approved" if approved else "revoked"
        if app.get("status") == wanted:
            return "unchanged"
        developer = await self.http.request(
            "GET", f"{self.org}/developers/{quote(str(app.get('developerId')))}"
        )
        if not isinstance(developer, dict) or not isinstance(developer.get("email"), str):
            raise GatewayError("bad_response", f"the developer of app {app_id} has no email")
        path = (
            f"{self.org}/developers/{quote(developer['email'], safe='@')}/apps/{quote(app['name'], safe='')}"
        )
        await self.http.request(
            "POST",
            path,
            params={"action": "approve" if approved else "revoke"},
            headers={"Content-Type": "application/octet-stream"},
        )
        return "updated"

    async def app_id_named(self, name: str) -> str:
        """The appId of the one app called ``name`` (app names are unique per developer
        only: two apps of that name are a conflict to resolve in Apigee)."""
        ids = [app.get("appId") for app in await self.apps() if app.get("name") == name]
        if len(ids) != 1 or not isinstance(ids[0], str):
            raise GatewayError("not_found", f"{len(ids)} apps are named {name!r}: expected exactly one", 404)
        return ids[0]

    async def aclose(self) -> None:
        await self.http.aclose()
