"""Module boundaries that ship apart: ``kong_plugin/`` goes to Kong hosts and may import
nothing of the service but the generated gRPC stubs; what it must agree on with the
service (id rules, error trailers) it holds itself, checked equal here. The clock lives
in the core, which imports nothing of the stores or the transports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = "sidecar.grpc.gen"


def _imports(folder: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in folder.rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def test_kong_plugin_imports_only_the_grpc_stubs_of_the_service() -> None:
    offending = {
        path: sorted(n for n in names if n.split(".")[0] == "sidecar" and not n.startswith(ALLOWED))
        for path, names in _imports(ROOT / "kong_plugin").items()
    }
    assert {p: n for p, n in offending.items() if n} == {}


def test_importing_the_plugin_loads_no_service_module() -> None:
    """At run time too (a package __init__ could pull the service in)."""
    code = (
        "import sys, kong_plugin.aforo_authorize, kong_plugin.server, kong_plugin.handler_threads;"
        "print('\\n'.join(m for m in sys.modules if m.split('.')[0] == 'sidecar'))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert loaded, "the plugin uses the gRPC stubs"
    assert [m for m in loaded if m not in ("sidecar", "sidecar.grpc") and not m.startswith(ALLOWED)] == []


def test_what_the_plugin_holds_itself_equals_the_service() -> None:
    from kong_plugin import client, schema
    from sidecar.core import models
    from sidecar.grpc import errors

    assert schema.TENANT_RE.pattern == models.TENANT_RE.pattern
    assert schema.PRODUCT_RE.pattern == models.PRODUCT_RE.pattern
    assert (client.ERROR_CODE_KEY, client.ERROR_FIELD_KEY) == (errors.ERROR_CODE_KEY, errors.ERROR_FIELD_KEY)


def test_the_core_imports_no_store_transport_or_service_module() -> None:
    offending = {
        path: sorted(n for n in names if n.startswith("sidecar.") and not n.startswith("sidecar.core"))
        for path, names in _imports(ROOT / "sidecar" / "core").items()
    }
    assert {p: n for p, n in offending.items() if n} == {}
