"""The published contract (issue 18): /openapi.json names every route of the app with
its roles, parameters, bodies and answers from the handlers' own Structs; /docs renders
it from assets the sidecar serves itself; and schemathesis, run against a live sidecar
(Redis and Postgres behind it) on the HTTP port and on the decision port, finds no
5xx and no answer that breaks the document."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from sidecar.grpc.sidecar_service import SidecarService
from sidecar.http.access import ACCESS, GATEWAY, OPEN
from sidecar.http.contract import OPERATIONS
from sidecar.integrations.secret_box import new_key
from sidecar.server import build_app
from tests.conftest import ADMIN_TOKEN, SidecarProcess, make_settings

ROOT = Path(__file__).resolve().parent.parent


async def _document(client: httpx.AsyncClient) -> dict:
    response = await client.get("/openapi.json")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    return response.json()


async def test_every_route_is_in_the_document_with_its_roles(client: httpx.AsyncClient) -> None:
    doc = await _document(client)
    assert doc["openapi"] == "3.1.0"
    named = {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert named == set(ACCESS) == set(OPERATIONS)
    for (method, path), rule in ACCESS.items():
        op = doc["paths"][path][method.lower()]
        if rule == OPEN:
            assert op["security"] == []
        elif rule == GATEWAY:
            assert op["security"] == [{}, {"bearer": []}]  # only when the sidecar requires it
        elif not isinstance(rule, str):
            assert op["x-aforo-roles"] == sorted(role.value for role in rule)
            assert {"401", "403", "429"} <= set(op["responses"])
        for status, answer in op["responses"].items():
            if int(status) not in OPERATIONS[(method, path)].ok:  # an error: the envelope
                schema = answer["content"]["application/json"]["schema"]
                refs = re.findall(r"#/components/schemas/(\w+)", str(schema))
                assert "Envelope" in refs, (method, path, status)
    # The schemas are the handlers' Structs: a field added to one shows here.
    schemas = doc["components"]["schemas"]
    assert {"AuthorizeRequest", "Decision", "Plan", "ConsumerView", "TokenRequest", "Envelope"} <= set(
        schemas
    )
    assert "scopes" in schemas["KeyRequest"]["properties"]
    # A field the path gives is not required of the body (PUT /v1/admin/plans/{plan_id}).
    assert "id" in schemas["Plan"]["required"] and "id" not in schemas["PlanBody"].get("required", [])


def test_the_document_carries_the_grpc_api_the_sidecar_serves() -> None:
    doc = json.loads(build_app(make_settings()).state.openapi)
    services = {s["name"]: s for s in doc["x-grpc"]["services"]}
    sidecar = services["aforo.sidecar.v1.Sidecar"]
    assert (ROOT / sidecar["file"]).is_file()  # the .proto the stubs come from
    for method in sidecar["methods"]:
        assert method["name"] in vars(SidecarService), method["name"]  # implemented, not the stub's
        assert method["input"] in doc["x-grpc"]["messages"] and method["output"] in doc["x-grpc"]["messages"]
    assert {m["name"] for m in sidecar["methods"]} >= {"Authorize", "ReportUsage", "GetConsumerStatus"}
    report = next(m for m in sidecar["methods"] if m["name"] == "ReportUsage")
    assert report["client_streaming"] is True
    assert "envoy.service.ratelimit.v3.RateLimitService" in services
    fields = {f["name"]: f for f in doc["x-grpc"]["messages"]["aforo.sidecar.v1.UsageEvent"]}
    assert fields["headers"]["type"] == "map<string, string>" and not fields["headers"]["repeated"]


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.urls.append(value)


async def test_the_docs_page_loads_everything_from_the_sidecar(client: httpx.AsyncClient) -> None:
    page = await client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    parser = _Assets()
    parser.feed(page.text)
    assert set(parser.urls) == {"/docs/docs.css", "/docs/docs.js", "/openapi.json"}
    types = {
        "/docs/docs.css": "text/css",
        "/docs/docs.js": "text/javascript",
        "/openapi.json": "application/json",
    }
    for url in parser.urls:
        asset = await client.get(url)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(types[url])
        # Nothing from another origin: no CDN, no web font, no analytics.
        assert not re.search(r"(https?:)?//[a-z0-9]", asset.text.replace("/openapi.json", "")), url
    script = (await client.get("/docs/docs.js")).text
    assert re.findall(r"fetch\(([^)]*)\)", script) == ['"/openapi.json"']


# --- schemathesis against a live sidecar ------------------------------------------------

SECRET = "ingest-secret-for-schemathesis"


def _schemathesis(sidecar: SidecarProcess, folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``st run`` in ``folder`` (where it keeps its cache of crashes)."""
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{sidecar.url}/openapi.json",
        "--header",
        f"Authorization: Bearer {ADMIN_TOKEN}",
        "--header",
        f"X-Aforo-Ingest-Secret: {SECRET}",
        # Every check but positive_data_acceptance: the schemas are the Structs' types;
        # rules on values (an id's characters, a limit's range, cross-field rules) are the
        # handlers' and answer a documented 400 (tests/test_error_codes.py).
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--seed",
        "20261206",
        "--workers",
        "2",
        "--no-color",
        "--max-failures",
        "50",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=folder)


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_answer_off_the_contract(
    start_sidecar, redis_url: str, prefix: str, migrated_database: str, tmp_path: Path
) -> None:
    env = {
        "AFORO_REDIS_URL": redis_url,
        "AFORO_KEY_PREFIX": prefix,
        "AFORO_DATABASE_URL": migrated_database,
        "AFORO_INGEST_SECRETS": f"default={SECRET}",
        "AFORO_SECRET_KEYS": f"k1={new_key()}",  # webhook and connection secrets are sealed
        # The negative cases send no credentials on purpose, hundreds of times.
        "AFORO_AUTH_FAILURE_LIMIT": "1000000",
    }
    sidecar = start_sidecar(env)
    http_port = _schemathesis(sidecar, tmp_path, "--max-examples", "40")
    assert http_port.returncode == 0, http_port.stdout[-6000:] + http_port.stderr[-2000:]
    assert "passed" in http_port.stdout and "5xx" not in http_port.stdout
    # The decision port answers the two decision endpoints by the same document.
    decision_port = _schemathesis(
        sidecar,
        tmp_path,
        "--url",
        sidecar.decision_url,
        "--include-path",
        "/v1/authorize",
        "--include-path",
        "/integrations/apigee/authorize",
        "--max-examples",
        "100",
    )
    assert decision_port.returncode == 0, decision_port.stdout[-6000:] + decision_port.stderr[-2000:]
    assert "Selected: 2/" in decision_port.stdout
