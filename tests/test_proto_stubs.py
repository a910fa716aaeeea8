"""The committed gRPC stubs are exactly what proto/ generates."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "sidecar" / "grpc" / "gen"


def _files(folder: Path) -> set[str]:
    return {
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    fresh, committed = _files(tmp_path), _files(COMMITTED)
    assert fresh == committed, f"missing: {fresh - committed}, extra: {committed - fresh}"
    differing = [
        name for name in sorted(fresh) if not filecmp.cmp(tmp_path / name, COMMITTED / name, shallow=False)
    ]
    assert differing == [], f"stale stubs (run scripts/gen_proto.py): {differing}"
