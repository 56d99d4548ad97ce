"""The README's main job: the four-city demo runs start to finish and converges."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_demo_runs_and_every_city_holds_every_record(tmp_path: Path) -> None:
    base = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "citynode", "demo", "--duration", "6", "--dir", str(base)],
        capture_output=True, text=True, timeout=240,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "converged" in r.stdout
    assert "stopped all node processes" in r.stdout
    for city in ("jakarta", "seoul", "surabaya", "singapore"):
        d = base / city
        assert (d / "node.key").exists() and (d / "citynode.db").exists()
        # Every node process was stopped: its data dir is free again.
        check = subprocess.run([sys.executable, "-m", "citynode", "check", "-d", str(d)],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        assert "0 problem(s)" in check.stdout
