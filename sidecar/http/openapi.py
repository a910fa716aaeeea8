"""The API's contract as OpenAPI 3.1, built from what the app runs on.

``document`` walks the app's routes and, for each, puts together:

- who may call it, from ``ACCESS`` (sidecar/http/access.py): the security scheme and
  the roles (``x-aforo-roles``);
- what it takes and answers, from ``OPERATIONS`` (sidecar/http/contract.py): the very
  msgspec Structs the handler decodes and encodes, turned into JSON Schema by msgspec
  (no schema is written by hand), its query parameters, its success statuses and the
  error statuses it can answer, each with the error envelope
  (``{"error": {"code", "message", "field"}}``).

A route without an operation, or an operation without a route, is an error at start
(as for ``ACCESS``), so the document cannot drift from the app. Served at
``GET /openapi.json``; ``GET /docs`` renders it with a page and script shipped in this
package (sidecar/http/docs/), so it works with no network.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from sidecar import __version__
from sidecar.http.access import ACCESS, GATEWAY, INGEST_SECRET, OPEN, Rule
from sidecar.http.contract import OPERATIONS, PATH_PARAMS, Operation, Param
from sidecar.http.errors import Envelope
from sidecar.http.ingest import SECRET_HEADER, TENANT_HEADER

_REF = "#/components/schemas/{name}"
_PATH_PARAM = re.compile(r"\{([^}:]+)(?::[^}]+)?\}")
_STATUS_TEXT = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    400: "Invalid input: nothing was changed",
    401: "No credentials, or credentials that are not valid",
    403: "Valid credentials without the role this needs",
    404: "No such object (or one of another tenant)",
    409: "Conflicts with the current state: nothing was changed",
    413: "Body larger than the limit",
    429: "Too many requests (failed authentications, or a per-caller limit)",
    501: "Needs a setting this sidecar does not have (Postgres)",
    502: "The gateway answered with an error",
    503: "The store (Redis or Postgres) did not answer: retry",
}


def _openapi_path(path: str) -> str:
    """Starlette's ``{kind:str}`` as OpenAPI's ``{kind}``."""
    return _PATH_PARAM.sub(lambda m: "{" + m.group(1) + "}", path)


def _security(rule: Rule) -> tuple[list[dict[str, list[str]]], list[str]]:
    """(security requirements, roles) of an ACCESS rule."""
    if rule == OPEN:
        return [], []
    if rule == GATEWAY:
        # A gateway token only when the sidecar is set to require one.
        return [{}, {"bearer": []}], ["gateway"]
    if rule == INGEST_SECRET:
        return [{"ingestSecret": []}], []
    assert not isinstance(rule, str)
    return [{"bearer": []}], sorted(role.value for role in rule)


def _parameter(param: Param, where: str) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": param.type}
    if param.pattern is not None:
        schema["pattern"] = f"^(?:{param.pattern})$"
    if param.minimum is not None:
        schema["minimum"] = param.minimum
    if param.maximum is not None:
        schema["maximum"] = param.maximum
    if param.enum:
        schema["enum"] = list(param.enum)
    return {
        "name": param.name,
        "in": where,
        "required": where == "path" or param.required,
        "description": param.description,
        "schema": schema,
    }


# (a schema to fill, the type it is, fields not required there)
Waiting = list[tuple[dict[str, Any], Any, tuple[str, ...]]]


def _schema(kind: Any, waiting: Waiting, optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """A schema object for ``kind`` (a tuple: any of those), filled once every type is
    known; ``optional``: required fields of the type this place does not require."""
    if isinstance(kind, tuple):
        return {"anyOf": [_schema(one, waiting, optional) for one in kind]}
    place: dict[str, Any] = {}
    waiting.append((place, kind, optional))
    return place


def _fill(waiting: Waiting) -> dict[str, Any]:
    """Every waiting place filled with its type's schema; the components they refer to.
    A place with optional fields gets a component of its own, ``<Name>Body``."""
    kinds = list(dict.fromkeys(kind for _, kind, _ in waiting))
    refs, components = msgspec.json.schema_components(kinds, ref_template=_REF)
    for place, kind, optional in waiting:
        ref = refs[kinds.index(kind)]
        name = ref.get("$ref", "").rpartition("/")[2]
        if optional and name in components:
            body = copy.deepcopy(components[name])
            body["required"] = [f for f in body.get("required", []) if f not in optional]
            components[f"{name}Body"] = body
            ref = {"$ref": _REF.format(name=f"{name}Body")}
        place.update(ref)
    return components


def _operation(method: str, path: str, op: Operation, rule: Rule, waiting: Waiting) -> dict[str, Any]:
    """The operation object; its schemas are filled at the end (``waiting``)."""
    security, roles = _security(rule)
    body: dict[str, Any] = {
        "operationId": f"{method.lower()}{re.sub(r'[^A-Za-z0-9]+', '_', _openapi_path(path))}".rstrip("_"),
        "summary": op.summary,
        "tags": [op.tag],
        "security": security,
    }
    if roles:
        body["x-aforo-roles"] = roles
        body["description"] = "Roles: " + ", ".join(roles) + ("." if rule != GATEWAY else " (when required).")
    path_names = _PATH_PARAM.findall(path)
    params = [_parameter(PATH_PARAMS[name], "path") for name in path_names]
    params += [_parameter(q, "query") for q in op.query]
    if rule == INGEST_SECRET:
        # Not a header parameter: a header the operation does not name is no error.
        body["description"] = f"The {TENANT_HEADER} header names the tenant (default: default)."
    if params:
        body["parameters"] = params
    if op.body is not None:
        body["requestBody"] = {
            "required": op.body_required,
            "content": {"application/json": {"schema": _schema(op.body, waiting, op.from_path)}},
        }
    responses: dict[str, Any] = {}
    for status, answer in op.ok.items():
        entry: dict[str, Any] = {"description": answer.description or _STATUS_TEXT.get(status, "")}
        if answer.media_type is not None:
            if answer.schema is not None:
                schema = _schema(answer.schema, waiting)
            elif answer.media_type == "application/json":
                schema = {"type": "object"}
            else:
                schema = {"type": "string"}
            entry["content"] = {answer.media_type: {"schema": schema}}
            for media_type in answer.also:
                entry["content"][media_type] = {"schema": {"type": "string"}}
        responses[str(status)] = entry
    errors = set(op.errors) | op.implied_errors(rule, bool(path_names), bool(op.query))
    for status in sorted(errors):
        error = _schema(Envelope, waiting)
        answer = responses.get(str(status))
        if answer is not None:  # an answer of that status, or an error (a decision's 401)
            content = answer["content"]["application/json"]
            content["schema"] = {"anyOf": [content["schema"], error]}
            answer["description"] += " Or an error: " + _STATUS_TEXT.get(status, "")
            continue
        responses[str(status)] = {
            "description": _STATUS_TEXT.get(status, "Error"),
            "content": {"application/json": {"schema": error}},
        }
    body["responses"] = responses
    return body


def document(routes: Sequence[BaseRoute], extensions: dict[str, Any] | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes`` (ValueError when a route has no operation
    in OPERATIONS or an operation no route), with ``extensions`` (``x-...`` keys) at its
    top level: the composition root adds the gRPC API (``x-grpc``)."""
    paths: dict[str, dict[str, Any]] = {}
    waiting: Waiting = []
    served = set()
    for route in routes:
        assert isinstance(route, Route)
        for method in sorted((route.methods or set()) - {"HEAD"}):
            key = (method, route.path)
            served.add(key)
            op = OPERATIONS.get(key)
            if op is None:
                raise ValueError(f"{method} {route.path} has no operation in sidecar/http/contract.py")
            entry = _operation(method, route.path, op, ACCESS[key], waiting)
            paths.setdefault(_openapi_path(route.path), {})[method.lower()] = entry
    stale = set(OPERATIONS) - served
    if stale:
        raise ValueError(f"operations without a route: {sorted(stale)}")
    components = _fill(waiting)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Aforo gateway sidecar",
            "version": __version__,
            "description": (
                "Decisions (may this consumer call this product now, at this cost?), usage, "
                "and the admin API of plans, consumers, wallets, keys and tokens. Every error "
                'answers {"error": {"code", "message", "field"}} with a stable code. The '
                "decision port (AFORO_DECISION_PORT) answers POST /v1/authorize and POST "
                "/integrations/apigee/authorize the same way; gRPC: proto/aforo/sidecar/v1/sidecar.proto."
            ),
        },
        **(extensions or {}),
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API token (aft_...) of the tenant, or the bootstrap admin token.",
                },
                "ingestSecret": {
                    "type": "apiKey",
                    "in": "header",
                    "name": SECRET_HEADER,
                    "description": "The tenant's ingestion shared secret.",
                },
            },
        },
    }


# --- serving ------------------------------------------------------------------------

_DOCS = Path(__file__).parent / "docs"


async def openapi_json(request: Request) -> Response:
    return Response(request.app.state.openapi, media_type="application/json")


def _file(name: str, media_type: str) -> Any:
    async def endpoint(request: Request) -> Response:
        return Response((_DOCS / name).read_bytes(), media_type=media_type)

    return endpoint


ROUTES = [
    Route("/openapi.json", openapi_json, methods=["GET"]),
    Route("/docs", _file("index.html", "text/html"), methods=["GET"]),
    Route("/docs/docs.js", _file("docs.js", "text/javascript"), methods=["GET"]),
    Route("/docs/docs.css", _file("docs.css", "text/css"), methods=["GET"]),
]
