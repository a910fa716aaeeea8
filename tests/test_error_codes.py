"""The README's error table and the code agree: every error code a code path can return
is in the table with its HTTP status, and every code in the table is one the code
returns. The codes are read from the source itself (its syntax tree), so a new code
path with a new code fails this test until the README names it."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# Exceptions the HTTP layer maps to a fixed status (sidecar/http/errors.py).
FIXED_STATUS = {"InvalidInput": 400, "NotFound": 404, "Conflict": 409}
DEFAULT_INVALID = "invalid_request"  # InvalidInput's default code
# The decision port's own answers: (status, error_body(code, ...)).
REPLIES = ("_reply_now", "_refuse")


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def _text(node: ast.expr | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _status(node: ast.expr | None) -> int | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, int) else None


def codes_in_source() -> dict[str, set[int | None]]:
    """Every constant error code in sidecar/ with the statuses it is sent with (None:
    the status is decided elsewhere, e.g. a prepared error body)."""
    found: dict[str, set[int | None]] = defaultdict(set)
    for path in (ROOT / "sidecar").rglob("*.py"):
        if "gen" in path.parts:
            continue
        tree = ast.parse(path.read_text(), str(path))
        placed: set[int] = set()  # error_body calls whose status the enclosing call gives
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict) and path.name == "errors.py":
                # the framework's HTTP errors: {404: "not_found", 405: "method_not_allowed"}
                for key, value in zip(node.keys, node.values, strict=True):
                    if _status(key) is not None and _text(value):
                        found[_text(value)].add(_status(key))  # type: ignore[index]
            if not isinstance(node, ast.Call):
                continue
            name = _name(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if name in FIXED_STATUS:
                code = _text(keywords.get("code")) or (DEFAULT_INVALID if name == "InvalidInput" else None)
                if code:
                    found[code].add(FIXED_STATUS[name])
            elif name in ("ApiError", "error_response") and len(node.args) >= 2 and _text(node.args[1]):
                found[_text(node.args[1])].add(_status(node.args[0]))  # type: ignore[index]
            elif name in REPLIES and len(node.args) >= 2 and isinstance(node.args[1], ast.Call):
                inner = node.args[1]
                if _name(inner.func) == "error_body" and inner.args and _text(inner.args[0]):
                    found[_text(inner.args[0])].add(_status(node.args[0]))  # type: ignore[index]
                    placed.add(id(inner))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and _name(node.func) == "error_body"
                and id(node) not in placed
                and node.args
                and _text(node.args[0])
            ):
                found[_text(node.args[0])].add(None)  # type: ignore[index]
    found["http_error"].add(None)  # any other status the framework raises
    return found


def codes_in_readme() -> dict[str, set[int]]:
    """The README's error table: code -> the statuses its row names."""
    text = README.read_text()
    table = text[text.index("### Errors") :]
    table = table[: table.index("\n## ")]
    rows: dict[str, set[int]] = defaultdict(set)
    for line in table.splitlines():
        match = re.match(r"\| `([a-z_]+)` \| ([^|]*) \|", line)
        if match:
            rows[match.group(1)] |= {int(s) for s in re.findall(r"\b[1-5]\d\d\b", match.group(2))}
    return rows


def test_every_error_code_the_code_returns_is_in_the_readme_with_its_status():
    source, readme = codes_in_source(), codes_in_readme()
    missing = sorted(set(source) - set(readme))
    assert not missing, f"error codes the README's table lacks: {missing}"
    for code, statuses in source.items():
        known = {s for s in statuses if s is not None}
        assert known <= readme[code], (
            f"{code}: sent with {sorted(known)}, the README says {sorted(readme[code])}"
        )


def test_every_code_in_the_readme_is_one_the_code_returns():
    stale = sorted(set(codes_in_readme()) - set(codes_in_source()))
    assert not stale, f"the README's table names codes no code path returns: {stale}"


def test_the_source_scan_sees_the_codes_it_must():
    """Guard against a scan that finds nothing: codes of every kind of code path."""
    source = codes_in_source()
    assert {400} <= source["invalid_identifier"] and {404} <= source["consumer_not_found"]
    assert 401 in source["unauthorized"] and 503 in source["store_unavailable"]
    assert 413 in source["batch_too_large"] and 400 in source["batch_too_large"]
    assert 400 in source["bad_request"] and None in source["internal_error"]
    assert 404 in source["not_found"] and 405 in source["method_not_allowed"]
