"""The benchmark scripts still run, end to end, at a toy size.

Their figures are quoted in closing notes and READMEs, so a script that rots is a
defect; their speed is not judged here (benchmarks measure speed, tests do not). Each
runs as a user runs it, in a subprocess, and must exit 0 with one JSON object on its
last line holding the figures it promises.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

CASES = {
    "bench_core.py": (["--records", "300", "--rounds", "1", "--what-if-free-decode"],
                      {"raw_verify_per_s", "pipeline_per_s", "ratio", "paired_ratio_median",
                       "what_if_free_decode_paired_ratio_median"}),
    "bench_audit.py": (["--records", "400"],
                       {"raw_verify_per_s", "audit_per_s", "ratio"}),
    "bench_ingest.py": (["--records", "400", "--origins", "2", "--batch", "100",
                         "--publish", "200", "--publish-batch", "100"],
                        {"ingest_per_s", "pipeline_limit_per_s", "ratio", "publish_per_s"}),
    "bench_stream.py": (["--subscribers", "4", "--procs", "2", "--rate", "200",
                         "--seconds", "1.5", "--idle-timeout", "20"],
                        {"p50_ms", "p99_ms", "first_sub_p99_ms", "last_sub_p99_ms",
                         "node_cpu_pct", "all_delivered_in_order"}),
    "bench_stream.py --format envelope": (
        ["--subscribers", "4", "--procs", "2", "--rate", "200", "--seconds", "1.5",
         "--idle-timeout", "20", "--format", "envelope"],
        {"p50_ms", "p99_ms", "format", "all_delivered_in_order"}),
    "bench_mesh.py": (["--nodes", "3", "--records", "200", "--batch", "50",
                       "--latency-samples", "5"],
                      {"p50_ms", "p99_ms", "records_per_s", "copies_per_record"}),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_bench_runs_and_prints_its_json(script: str, tmp_path: Path) -> None:
    args, keys = CASES[script]
    script = script.split()[0]
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    last = proc.stdout.strip().splitlines()[-1]
    figures = json.loads(last)
    assert figures["bench"] == script.removeprefix("bench_").removesuffix(".py")
    assert keys <= figures.keys(), f"missing {keys - figures.keys()} in {last}"
    if script == "bench_stream.py":
        assert figures["format"] == ("envelope" if "envelope" in args else "json")
        # The stream benchmark checks delivery too: every event exactly once, in order.
        assert figures["all_delivered_in_order"] is True
        assert figures["events_delivered"] == figures["events_expected"] > 0
