"""A stub of Kong's Admin API, run as a real process on loopback: what the sidecar's
Kong import reads and writes, with the shapes of the Kong Gateway Admin API reference
(https://developer.konghq.com/api/gateway/admin-ee/, entities Consumer, Consumer Group,
Plugin, Key Auth, Service):

- list endpoints answer ``{"data": [...], "next": "<path>?offset=<token>&size=<n>" | null,
  "offset": "<token>"}`` (``next`` is absent on the last page as ``null``), ``size``
  1-1000, default 100 ("Pagination" in the reference);
- ``GET /consumer_groups/{id}/consumers`` lists a group's consumers (same paging);
- ``GET /status``: the node's status (``database.reachable``, ``server``);
- ``POST /consumer_groups/{id}/plugins`` creates a plugin scoped to the group and
  ``PATCH /consumer_groups/{id}/plugins/{plugin id}`` updates its ``config``;
- with a token configured, ``Kong-Admin-Token`` must carry it (RBAC), else 401
  ``{"message": "Invalid credentials. Token or User credentials required"}``;
- ``GET /consumers/{id or username}``, ``GET /consumers?custom_id=``; the ACL plugin's
  credentials: ``GET|POST /consumers/{consumer}/acls``, ``DELETE .../acls/{id}``;
- a workspace, when given, prefixes every path (``/{workspace}/consumers``).

Konnect mode (``"konnect": "<control plane id>"`` in the faults): the same entities under
``/v2/control-planes/{id}/core-entities`` of Konnect's Control Planes Config API
(https://developer.konghq.com/api/konnect/control-planes-config/), authenticated with
``Authorization: Bearer <token>``, paged by ``offset`` alone (no ``next``), and
``GET /v2/control-planes/{id}`` answering the control plane.

Test control, not part of Kong: ``PUT /_stub/state`` (the catalog), ``PUT /_stub/faults``
(``{"token", "workspace", "konnect", "faults": [{"path", "page", "status", "times",
"retry_after"}]}``: the page-th page of ``path`` answers ``status`` the next ``times``
times), ``GET /_stub/calls`` (every Admin API request: method, path, raw path, query, body).

    python -m tests.stubs.kong_admin --port 8001
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tests.stubs import run_stub, stub_app

LISTS = {
    "consumers": "consumers",
    "consumer_groups": "groups",
    "plugins": "plugins",
    "key-auths": "key_auths",
    "services": "services",
    "routes": "routes",
}


class Stub:
    def __init__(self) -> None:
        self.state: dict[str, Any] = {name: [] for name in LISTS.values()} | {"members": {}}
        self.token: str | None = None
        self.workspace: str | None = None
        self.konnect: str | None = None  # a control plane id: Konnect mode
        self.faults: list[dict[str, Any]] = []
        self.calls: list[dict[str, Any]] = []


stub = Stub()


def _offset(index: int) -> str:
    return base64.urlsafe_b64encode(json.dumps([index]).encode()).decode().rstrip("=")


def _index(token: str) -> int:
    return json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))[0]


def _page(request: Request, path: str, items: list[dict[str, Any]]) -> Response:
    try:
        size = int(request.query_params.get("size", "100"))
        start = _index(request.query_params["offset"]) if "offset" in request.query_params else 0
    except (ValueError, KeyError, json.JSONDecodeError):
        return JSONResponse({"message": "invalid offset or size"}, 400)
    if not 1 <= size <= 1000:
        return JSONResponse({"message": "size must be an integer between 1 and 1000"}, 400)
    page_number = start // size + 1
    for fault in stub.faults:
        if fault["path"] == path and fault.get("page", 1) == page_number and fault.get("times", 1) > 0:
            fault["times"] = fault.get("times", 1) - 1
            headers = {"Retry-After": str(fault["retry_after"])} if "retry_after" in fault else {}
            return JSONResponse({"message": "injected"}, fault["status"], headers=headers)
    end = start + size
    more = end < len(items)
    prefix = f"/{stub.workspace}" if stub.workspace else ""
    body: dict[str, Any] = {
        "data": items[start:end],
        "next": f"{prefix}{path}?offset={_offset(end)}&size={size}" if more else None,
    }
    if more:
        body["offset"] = _offset(end)
    if stub.konnect is not None:
        del body["next"]  # Konnect pages by offset alone
    return JSONResponse(body)


async def admin_api(request: Request) -> Response:
    path = raw = "/" + request.path_params["path"]
    if stub.konnect is not None:
        plane = f"/v2/control-planes/{stub.konnect}"
        if request.headers.get("authorization") != f"Bearer {stub.token}":
            return JSONResponse({"status": 401, "title": "Unauthorized"}, 401)
        if path == plane and request.method == "GET":
            return JSONResponse(
                {"id": stub.konnect, "name": "default", "config": {"control_plane_endpoint": ""}}
            )
        if not path.startswith(f"{plane}/core-entities/"):
            return JSONResponse({"status": 404, "title": "Not Found"}, 404)
        path = path[len(f"{plane}/core-entities") :]
    elif stub.workspace:
        if not path.startswith(f"/{stub.workspace}/"):
            return JSONResponse({"message": "Not found"}, 404)
        path = path[len(stub.workspace) + 1 :]
    body = await request.body()
    stub.calls.append(
        {
            "method": request.method,
            "path": path,  # without the workspace or Konnect prefix
            "raw": raw,
            "query": dict(request.query_params),
            "body": json.loads(body) if body else None,
        }
    )
    if (
        stub.konnect is None
        and stub.token is not None
        and request.headers.get("kong-admin-token") != stub.token
    ):
        return JSONResponse({"message": "Invalid credentials. Token or User credentials required"}, 401)
    parts = path.strip("/").split("/")
    if request.method == "GET" and parts == ["status"]:
        return JSONResponse({"database": {"reachable": True}, "server": {"connections_active": 1}})
    if request.method == "GET" and len(parts) == 1 and parts[0] in LISTS:
        items = stub.state[LISTS[parts[0]]]
        if parts[0] == "consumers" and "custom_id" in request.query_params:  # Kong's filter
            items = [c for c in items if c.get("custom_id") == request.query_params["custom_id"]]
        return _page(request, path, items)
    if len(parts) >= 2 and parts[0] == "consumer_groups":
        group = next((g for g in stub.state["groups"] if parts[1] in (g["id"], g["name"])), None)
        if group is None:
            return JSONResponse({"message": "Not found"}, 404)
        if request.method == "GET" and parts[2:] == ["consumers"]:
            ids = set(stub.state["members"].get(group["id"], []))
            return _page(request, path, [c for c in stub.state["consumers"] if c["id"] in ids])
        if parts[2:] == ["plugins"] and request.method == "POST":
            plugin = {
                "id": str(uuid.uuid4()),
                "enabled": True,
                **json.loads(body),
                "consumer_group": {"id": group["id"]},
            }
            stub.state["plugins"].append(plugin)
            return JSONResponse(plugin, 201)
        if len(parts) == 4 and parts[2] == "plugins" and request.method == "PATCH":
            plugin = next((p for p in stub.state["plugins"] if p["id"] == parts[3]), None)
            if plugin is None:
                return JSONResponse({"message": "Not found"}, 404)
            change = json.loads(body)
            plugin["config"] = {**plugin.get("config", {}), **change.get("config", {})}
            return JSONResponse(plugin)
    if len(parts) >= 2 and parts[0] == "consumers":
        return _consumer_api(request, path, parts, body)
    return JSONResponse({"message": "Not found"}, 404)


def _consumer_api(request: Request, path: str, parts: list[str], body: bytes) -> Response:
    """``GET /consumers/{id or username}``, ``GET|POST /consumers/{c}/acls`` and
    ``DELETE /consumers/{c}/acls/{id}`` (the ACL plugin's credential entity)."""
    consumer = next((c for c in stub.state["consumers"] if parts[1] in (c["id"], c.get("username"))), None)
    if consumer is None:
        return JSONResponse({"message": "Not found"}, 404)
    acls = stub.state.setdefault("acls", [])
    if request.method == "GET" and len(parts) == 2:
        return JSONResponse(consumer)
    if parts[2:] == ["acls"] and request.method == "GET":
        return _page(request, path, [a for a in acls if a["consumer"]["id"] == consumer["id"]])
    if parts[2:] == ["acls"] and request.method == "POST":
        acl = {"id": str(uuid.uuid4()), "consumer": {"id": consumer["id"]}, **json.loads(body)}
        acls.append(acl)
        return JSONResponse(acl, 201)
    if len(parts) == 4 and parts[2] == "acls" and request.method == "DELETE":
        kept = [a for a in acls if not (a["id"] == parts[3] and a["consumer"]["id"] == consumer["id"])]
        if len(kept) == len(acls):
            return JSONResponse({"message": "Not found"}, 404)
        stub.state["acls"] = kept
        return Response(status_code=204)
    return JSONResponse({"message": "Not found"}, 404)


async def put_state(request: Request) -> Response:
    given = await request.json()
    stub.state = {name: given.get(name, []) for name in LISTS.values()} | {
        "members": given.get("members", {}),
        "acls": given.get("acls", []),
    }
    return JSONResponse({"ok": True})


async def put_faults(request: Request) -> Response:
    given = await request.json()
    stub.token = given.get("token")
    stub.workspace = given.get("workspace")
    stub.konnect = given.get("konnect")
    stub.faults = given.get("faults", [])
    return JSONResponse({"ok": True})


async def get_state(request: Request) -> Response:
    return JSONResponse(stub.state)


app = stub_app(
    admin_api,
    ["GET", "POST", "PATCH", "PUT", "DELETE"],
    stub.calls,
    put_state=put_state,
    put_faults=put_faults,
    get_state=get_state,
)


if __name__ == "__main__":
    run_stub(app, __doc__.splitlines()[0])
