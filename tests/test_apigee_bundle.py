"""The Apigee shared flow and example proxy (apigee_policy/): the Node tests of their
JavaScript resources and apigeelint on both bundles, run as subprocesses so that the
project's one test command (`pytest`) covers them. A failure shows the tool's output."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

APIGEE = Path(__file__).resolve().parents[1] / "apigee_policy"
BUNDLES = ("sharedflowbundle", "apiproxy")
# Edge (apigee) and X/hybrid (apigeex): the bundles are meant for both.
PROFILES = ("apigee", "apigeex")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH: the Apigee tests need Node.js 20+ and npm")
    return path


def run(
    command: list[str], *, timeout: float, env: dict[str, str] | None = None, ok: tuple[int, ...] = (0,)
) -> str:
    """Run a tool from apigee_policy/; fail the test with its whole output unless its exit
    code is one of `ok`."""
    try:
        result = subprocess.run(
            command, cwd=APIGEE, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(command)} did not finish in {timeout} s\n{exc.stdout}\n{exc.stderr}")
    if result.returncode not in ok:
        pytest.fail(
            f"{' '.join(command)} exited {result.returncode}\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
        )
    return result.stdout


def node_test(paths: list[str], *, timeout: float, env: dict[str, str] | None = None) -> str:
    """`node --test` on paths under apigee_policy/; fails unless every test passed."""
    output = run([tool("node"), "--test", *paths], timeout=timeout, env=env)
    counts = re.findall(r"^# (pass|fail|skipped|cancelled|todo) (\d+)$", output, re.M)
    summary = {name: int(count) for name, count in counts}
    assert {"pass", "fail", "skipped"} <= summary.keys(), f"no node:test summary in the output:\n{output}"
    assert summary["fail"] == 0 and summary.get("cancelled", 0) == 0, output
    # Every test must run here: a skip means its environment (e.g. the sidecar URL) is missing.
    assert summary["skipped"] == 0, f"node tests were skipped:\n{output}"
    assert summary["pass"] > 0, f"no node test passed:\n{output}"
    return output


@pytest.fixture(scope="session")
def apigeelint() -> Path:
    """apigeelint from apigee_policy's lockfile: `npm ci` when node_modules is missing or
    older than package-lock.json (a fresh clone, or a changed lockfile)."""
    cli = APIGEE / "node_modules" / "apigeelint" / "cli.js"
    installed = APIGEE / "node_modules" / ".package-lock.json"
    lock = APIGEE / "package-lock.json"
    if not cli.exists() or not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        run([tool("npm"), "ci", "--no-audit", "--no-fund"], timeout=600)
    assert cli.exists(), "npm ci did not install apigeelint"
    return cli


def documented_warnings() -> set[tuple[str, str, str]]:
    """(bundle, file, rule) of each apigeelint warning apigee_policy/README.md lists as
    accepted (the table under "## apigeelint warnings")."""
    readme = (APIGEE / "README.md").read_text()
    section = readme.split("## apigeelint warnings", 1)[1].split("\n## ", 1)[0]
    rows = set()
    for line in section.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0] in BUNDLES:
            rows.add((cells[0], cells[1], cells[2]))
    return rows


def test_javascript_resources_pass_their_node_tests():
    """The JS resources under Node's test runner with an Apigee-like `context`, plus the
    bundle consistency checks and the flow player's own building blocks."""
    node_test(["tests/unit/"], timeout=120)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("bundle", BUNDLES)
def test_apigeelint_finds_no_errors(apigeelint: Path, bundle: str, profile: str):
    # apigeelint exits 1 when it finds errors: the report says which, below.
    output = run(
        [tool("node"), str(apigeelint), "-s", bundle, "-f", "json.js", "--profile", profile, "--norc"],
        timeout=180,
        ok=(0, 1),
    )
    try:
        report = json.loads(output)
    except json.JSONDecodeError:
        pytest.fail(f"apigeelint did not print a JSON report:\n{output}")
    messages = [
        (Path(entry["filePath"]).relative_to(APIGEE / bundle).as_posix() or ".", m)
        for entry in report
        for m in entry["messages"]
    ]
    errors = [
        f"  {bundle}/{file}:{m.get('line', '?')} {m['ruleId']} {m['message']}"
        for file, m in messages
        if m["severity"] == 2
    ]
    assert not errors, f"apigeelint --profile {profile}: {len(errors)} error(s)\n" + "\n".join(errors)
    accepted = {row for row in documented_warnings() if row[0] == bundle}
    undocumented = [
        f"  {bundle}/{file}:{m.get('line', '?')} {m['ruleId']} {m['message']}"
        for file, m in messages
        if m["severity"] == 1 and (bundle, file, m["ruleId"]) not in accepted
    ]
    assert not undocumented, (
        f"apigeelint --profile {profile}: warnings not listed (with a reason) under "
        "'## apigeelint warnings' in apigee_policy/README.md:\n" + "\n".join(undocumented)
    )
