"""A stub of Apigee's Management API, run as a real process on loopback: what the
sidecar's Apigee import reads and writes, with the shapes of the Apigee API reference
(Apigee X / hybrid: https://cloud.google.com/apigee/docs/reference/apis/apigee/rest,
resources organizations, organizations.apiproducts, organizations.developers,
organizations.apps, organizations.developers.apps; Edge: https://apidocs.apigee.com/docs,
"API Products", "Developers", "Apps", "Developer Apps"):

- every path is under ``/v1/organizations/{org}``; ``GET`` of the organization itself
  answers it (``runtimeType`` on X, ``type`` on Edge);
- ``GET /apiproducts?expand=true&count=N&startKey=K`` -> ``{"apiProduct": [...]}``,
  ``GET /developers?expand=true&count=N&startKey=K`` -> ``{"developer": [...]}``: objects
  sorted by name / email, the page starting *with* ``startKey``, ``count`` at most 1000;
- apps: on Edge ``GET /apps?expand=true&rows=N&startKey=<appId>`` (same semantics, by
  appId); on X ``GET /apps?expand=true&pageSize=N&pageToken=T`` -> ``{"app": [...],
  "nextPageToken": "..."}`` (no token on the last page); an empty list is answered ``{}``
  on X, as the reference's JSON omits empty repeated fields;
- ``GET /apiproducts/{name}``; ``PUT /apiproducts/{name}`` replaces the product (update);
- ``GET /apps/{appId}``, ``GET /developers/{email or id}``;
- ``POST /developers/{email}/apps/{name}?action=approve|revoke`` with ``Content-Type:
  application/octet-stream`` sets the app's status (204);
- authentication: ``Authorization: Bearer <token>`` or Basic ``username:password`` (Edge),
  else 401 ``{"error": {"code": 401, "status": "UNAUTHENTICATED"}}``; an unknown
  organization is a 404 (403 on X for a project one may not see: the stub says 404).

Test control, not part of Apigee: ``PUT|GET /_stub/state`` (``{"products", "developers",
"apps"}``), ``PUT /_stub/faults`` (``{"api": "x"|"edge", "organization", "token",
"basic": [user, password], "faults": [{"path", "page", "status", "times",
"retry_after"}]}``), ``GET /_stub/calls`` (every Management API request: method, path
under the organization, query, body, content type).

    python -m tests.stubs.apigee_mgmt --port 8002
"""

from __future__ import annotations

import base64
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tests.stubs import run_stub, stub_app

MAX_COUNT = 1000
# list path -> (state field, response field, sort key)
LISTS = {
    "apiproducts": ("products", "apiProduct", "name"),
    "developers": ("developers", "developer", "email"),
    "apps": ("apps", "app", "appId"),
}


class Stub:
    def __init__(self) -> None:
        self.state: dict[str, list[dict[str, Any]]] = {"products": [], "developers": [], "apps": []}
        self.api = "x"
        self.organization = "acme"
        self.token: str | None = "ya29.stub-token"
        self.basic: tuple[str, str] | None = None
        self.faults: list[dict[str, Any]] = []
        self.calls: list[dict[str, Any]] = []


stub = Stub()


def _error(status: int, text: str) -> JSONResponse:
    return JSONResponse({"error": {"code": status, "message": text, "status": text.upper()}}, status)


def _authorized(request: Request) -> bool:
    header = request.headers.get("authorization", "")
    if stub.token is not None and header == f"Bearer {stub.token}":
        return True
    if stub.basic is not None:
        expected = base64.b64encode(":".join(stub.basic).encode()).decode()
        return header == f"Basic {expected}"
    return False


def _fault(path: str, page: int) -> Response | None:
    for fault in stub.faults:
        if fault["path"] == path and fault.get("page", 1) == page and fault.get("times", 1) > 0:
            fault["times"] = fault.get("times", 1) - 1
            headers = {"Retry-After": str(fault["retry_after"])} if "retry_after" in fault else {}
            return JSONResponse(
                {"error": {"code": fault["status"], "message": "injected"}}, fault["status"], headers=headers
            )
    return None


def _list(request: Request, name: str) -> Response:
    state, field, key = LISTS[name]
    items = sorted(stub.state[state], key=lambda item: item[key])
    query = request.query_params
    if query.get("expand") != "true":
        return JSONResponse([item[key] for item in items])  # names only, as the reference
    token_paging = name == "apps" and stub.api == "x"
    try:
        if token_paging:
            size = int(query.get("pageSize", "1000"))
            start = int(base64.b64decode(query["pageToken"]).decode()) if "pageToken" in query else 0
        else:
            size = int(query.get("rows" if name == "apps" else "count", "1000"))
            start = 0
            if "startKey" in query:
                start = next(i for i, item in enumerate(items) if item[key] >= query["startKey"])
    except (ValueError, StopIteration):
        return _error(400, "invalid_argument")
    if not 1 <= size <= MAX_COUNT:
        return _error(400, "invalid_argument")
    # The page's number, for faults: a startKey page begins with the previous page's last.
    page = start // size + 1 if token_paging else 1 + start // max(size - 1, 1)
    fault = _fault(f"/{name}", page)
    if fault is not None:
        return fault
    batch = items[start : start + size]
    body: dict[str, Any] = {field: batch} if batch or stub.api == "edge" else {}
    if token_paging and start + size < len(items):
        body["nextPageToken"] = base64.b64encode(str(start + size).encode()).decode()
    return JSONResponse(body)


def _find(state: str, value: str, *keys: str) -> dict[str, Any] | None:
    return next((item for item in stub.state[state] if value in (item.get(k) for k in keys)), None)


async def management_api(request: Request) -> Response:
    org = f"v1/organizations/{stub.organization}"
    raw = request.path_params["path"]
    if not _authorized(request):
        return _error(401, "unauthenticated")
    if raw != org and not raw.startswith(f"{org}/"):
        return _error(404, "not_found")
    path = raw[len(org) :] or "/"
    body = await request.body()
    stub.calls.append(
        {
            "method": request.method,
            "path": path,
            "query": dict(request.query_params),
            "body": json.loads(body)
            if body and request.headers.get("content-type") == "application/json"
            else None,
            "content_type": request.headers.get("content-type"),
        }
    )
    parts = path.strip("/").split("/") if path != "/" else []
    method = request.method
    if method == "GET" and not parts:
        fact = {"runtimeType": "CLOUD"} if stub.api == "x" else {"type": "paid"}
        return JSONResponse({"name": stub.organization, **fact})
    if method == "GET" and len(parts) == 1 and parts[0] in LISTS:
        return _list(request, parts[0])
    if len(parts) == 2 and parts[0] == "apiproducts":
        product = _find("products", parts[1], "name")
        if product is None:
            return _error(404, "not_found")
        if method == "GET":
            return JSONResponse(product)
        if method == "PUT":
            update = json.loads(body)
            if update.get("name", parts[1]) != parts[1]:
                return _error(400, "invalid_argument")
            product.clear()
            product.update(update | {"name": parts[1], "lastModifiedAt": "1"})
            return JSONResponse(product)
    if method == "GET" and len(parts) == 2 and parts[0] == "apps":
        app = _find("apps", parts[1], "appId")
        return JSONResponse(app) if app is not None else _error(404, "not_found")
    if method == "GET" and len(parts) == 2 and parts[0] == "developers":
        developer = _find("developers", parts[1], "email", "developerId")
        return JSONResponse(developer) if developer is not None else _error(404, "not_found")
    if method == "POST" and len(parts) == 4 and parts[0] == "developers" and parts[2] == "apps":
        developer = _find("developers", parts[1], "email")
        app = next(
            (
                a
                for a in stub.state["apps"]
                if developer is not None
                and a["name"] == parts[3]
                and a.get("developerId") == developer["developerId"]
            ),
            None,
        )
        if app is None:
            return _error(404, "not_found")
        action = request.query_params.get("action")
        if (
            action not in ("approve", "revoke")
            or request.headers.get("content-type") != "application/octet-stream"
        ):
            return _error(400, "invalid_argument")
        app["status"] = "approved" if action == "approve" else "revoked"
        return Response(status_code=204)
    return _error(404, "not_found")


async def put_state(request: Request) -> Response:
    given = await request.json()
    stub.state = {name: given.get(name, []) for name in ("products", "developers", "apps")}
    stub.calls.clear()
    return JSONResponse({"ok": True})


async def get_state(request: Request) -> Response:
    return JSONResponse(stub.state)


async def put_faults(request: Request) -> Response:
    given = await request.json()
    stub.api = given.get("api", stub.api)
    stub.organization = given.get("organization", stub.organization)
    stub.token = given.get("token", stub.token)
    stub.basic = tuple(given["basic"]) if given.get("basic") else None
    stub.faults = given.get("faults", [])
    return JSONResponse({"ok": True})


app = stub_app(
    management_api,
    ["GET", "PUT", "POST", "DELETE"],
    stub.calls,
    put_state=put_state,
    put_faults=put_faults,
    get_state=get_state,
)


if __name__ == "__main__":
    run_stub(app, __doc__.splitlines()[0])
