"""The benchmark scripts still run, end to end, at a toy size.

Their figures are quoted in closing notes and READMEs, so a script that rots is a
defect; their speed is not judged here (benchmarks measure speed, tests do not). Each
runs as a user runs it, in a subprocess, and must exit 0 with one JSON object on its
last line holding the figures it promises.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

CASES = {
    "bench_backup.py": (["--records", "2000"],
                        {"records", "backup_s", "backup_bytes", "copy_s", "ratio_to_copy",
                         "writer_max_ms_during", "restore_s", "pass"}),
    "bench_console.py": (["--stations", "3", "--readings", "2", "--loads", "2"],
                         {"records", "fcp_ms_cold", "fcp_ms_median", "first_paint_ms_median",
                          "ready_ms_median", "limit_ms", "pass"}),
    "bench_bridge.py": (["--messages", "200", "--latency-messages", "20", "--rate", "100"],
                        {"bulk_publish_per_s", "mqtt_in_per_s", "ratio", "p50_ms", "p99_ms",
                         "exactly_once"}),
    "bench_flood.py": (["--clients", "4", "--seconds", "12", "--idle", "2"],
                       {"records", "rss_first_mb", "rss_end_mb", "rss_idle_mb", "growth",
                        "idle_ratio", "pass"}),
    "bench_core.py": (["--records", "300", "--rounds", "1", "--what-if-free-decode"],
                      {"raw_verify_per_s", "pipeline_per_s", "ratio", "paired_ratio_median",
                       "what_if_free_decode_paired_ratio_median"}),
    "bench_audit.py": (["--records", "400"],
                       {"raw_verify_per_s", "audit_per_s", "ratio", "raw_verify_all_cores_per_s",
                        "ratio_to_all_cores", "ratio_single_thread"}),
    "bench_ingest.py": (["--records", "400", "--origins", "2", "--batch", "100",
                         "--publish", "200", "--publish-batch", "100"],
                        {"ingest_per_s", "pipeline_limit_per_s", "ratio", "publish_per_s"}),
    "bench_ingest.py --batch 1": (["--records", "40", "--origins", "4", "--batch", "1",
                                   "--concurrency", "4", "--publish", "0"],
                                  {"ingest_per_s", "noop_requests_per_s", "ratio_to_noop",
                                   "in_flight"}),
    "bench_ingest.py --batch 1 --client peer": (
        ["--records", "40", "--origins", "4", "--batch", "1", "--concurrency", "4",
         "--publish", "0", "--client", "peer"],
        {"ingest_per_s", "noop_requests_per_s", "client"}),
    "bench_stream.py": (["--subscribers", "4", "--procs", "2", "--rate", "200",
                         "--seconds", "1.5", "--idle-timeout", "20"],
                        {"p50_ms", "p99_ms", "first_sub_p99_ms", "last_sub_p99_ms",
                         "node_cpu_pct", "all_delivered_in_order"}),
    "bench_stream.py --format envelope": (
        ["--subscribers", "4", "--procs", "2", "--rate", "200", "--seconds", "1.5",
         "--idle-timeout", "20", "--format", "envelope"],
        {"p50_ms", "p99_ms", "format", "all_delivered_in_order"}),
    "bench_sim.py": (["--nodes", "40", "--forkers", "2"],
                     {"rounds", "rounds_target", "copies_per_record", "bytes_ratio",
                      "in_sync_round_bytes_5000_chains", "fork_rounds", "wall_s", "pass"}),
    "bench_mesh.py": (["--nodes", "3", "--records", "200", "--batch", "50",
                       "--latency-samples", "5", "--offered-rate", "20",
                       "--offered-seconds", "1"],
                      {"p50_ms", "p99_ms", "records_per_s", "copies_per_record",
                       "loaded_p99_ms", "ratio_to_ceiling", "verified_per_record"}),
    "bench_engines.py": (["--records", "2000", "--multi-records", "600", "--feeds", "1",
                          "--origins", "2", "--first", "1000", "--query-samples", "400"],
                         {"records", "pipeline_limit_per_s", "sqlite", "postgresql",
                          "postgresql_multi_ingest_per_s", "pg_over_sqlite_ingest",
                          "pass"}),
    "bench_storage.py": (["--records", "3000", "--batch", "500", "--window", "1000"],
                         {"records", "envelope_bytes_per_record", "rss_mb", "rss_peak_mb",
                          "rate_start_per_s", "rate_per_s", "rate_ratio",
                          "disk_bytes_per_record", "disk_ratio", "pass"}),
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
    if script == "bench_storage.py":
        # Every record published is held, and measured at the end.
        assert figures["records"] == 3000
        assert figures["envelope_bytes_per_record"] > 100
        assert set(figures["rss_mb"]) == {"3000"}
        # Then every payload pruned by retention: all gone, the file smaller.
        p = figures["prune"]
        assert p["payloads_dropped"] == p["pruned"] == p["records"] == 3000
        assert p["db_bytes_after"] < p["db_bytes_before"]
    if script == "bench_engines.py":
        # Both engines loaded and measured; PostgreSQL with 2 and 3 processes too.
        for engine in ("sqlite", "postgresql"):
            m = figures[engine]["2000"]
            assert m["ingest_per_s"] > 0 and m["query_p99_ms"] > 0
            assert m["catch_up_per_s"] > 0 and m["bytes_per_record"] > 100
        assert set(figures["postgresql_multi_ingest_per_s"]) == {"2", "3"}
        # ... with the same four figures measured by 2 and 3 processes at once.
        assert set(figures["postgresql_processes"]) == {"2", "3"}
        for m in figures["postgresql_processes"].values():
            assert m["records"] == 600 and m["ingest_per_s"] > 0
            assert m["query_p99_ms"] > 0 and m["bytes_per_record"] > 100
            assert m["catch_up_per_s"] > 0 and m["catch_up_per_reader_per_s"] > 0
        # The limit is decode + verify + hash, measured around each of the 4 phases.
        assert len(figures["pipeline_limit_samples_per_s"]) == 5
        assert figures["query_kinds"] == ["window", "wide_deep", "no_range", "time_deep"]
        kinds = set(figures["query_kinds"])
        for engine in ("sqlite", "postgresql"):  # each kind measured and judged alone
            assert set(figures[engine]["2000"]["query_p99_by_kind_ms"]) == kinds
            assert set(figures["pass"]["query_p99_log_n_by_kind"][engine]) == kinds
            # both sizes side by side, query by query in turn, each kind at each size
            by_kind = figures[engine]["query_p99_side_by_side_by_kind_ms"]
            assert set(by_kind) == kinds
            assert all(set(v) == {"1000", "2000"} for v in by_kind.values())
    if script == "bench_bridge.py":
        # Every message became exactly one record (the bridge's promise, measured).
        assert figures["exactly_once"] is True
        # CloudEvents out: every record delivered once, in order, each event the SDK reads.
        assert figures["cloudevents_in_order_once"] is True
        assert figures["cloudevents_sdk_errors"] == 0 and figures["cloudevents_per_s"] > 0
    if script == "bench_stream.py":
        assert figures["format"] == ("envelope" if "envelope" in args else "json")
        # The stream benchmark checks delivery too: every event exactly once, in order.
        assert figures["all_delivered_in_order"] is True
        assert figures["events_delivered"] == figures["events_expected"] > 0


# ------------------------------------------------------------------ the stream reader


def _stream_reader() -> Any:
    """scripts/bench_stream.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_stream", SCRIPTS / "bench_stream.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _events(n: int, start: int = 1, *, readers: list[bytes] | None = None) -> bytes:
    """``n`` SSE events exactly as the node renders them, for a chain from ``start``."""
    from citynode.core.keys import SigningKey
    from citynode.core.records import sign_record
    from citynode.transport.api_stream import sse_event

    key = SigningKey(bytes([9]) * 32)
    out, prev = [], None
    for seq in range(1, start + n):
        rec = sign_record(key, feed="stream-bench", seq=seq, prev=prev,
                          time_ms=1_764_340_000_000 + seq, type="org.example.Bench",
                          data={"n": seq - 1, "t": 1764340000.25 + seq}, readers=readers)
        prev = rec.id
        if seq >= start:
            out.append(sse_event(SimpleNamespace(rowid=100 + seq, envelope=rec.envelope)))
    return "".join(out).encode()


@pytest.mark.parametrize("full", [False, True])
def test_stream_reader_reads_what_the_node_renders(full: bool) -> None:
    bs = _stream_reader()
    block = b"id: 104\r\n\r\n" + _events(3, start=5) + b": ping\r\n\r\n" + _events(1, start=8)
    seqs, ns, ts = bs.read_json_events(block, full)
    assert seqs == [5, 6, 7, 8]
    assert ns == [4, 5, 6, 7]
    assert [float(t) for t in ts] == [1764340000.25 + s for s in (5, 6, 7, 8)]
    assert bs.read_json_events(b": ping\r\n\r\n", full) == ([], [], [])


@pytest.mark.parametrize("full", [False, True])
def test_stream_reader_refuses_an_event_it_cannot_read(full: bool) -> None:
    """Every event must be read: a record of another shape (here sealed, so no payload)
    or another kind of event fails the run instead of going uncounted."""
    from citynode.core.keys import SigningKey

    bs = _stream_reader()
    sealed = _events(1, readers=[SigningKey(bytes([3]) * 32).public_key])
    error = b'event: error\r\ndata: {"error": "query_too_slow"}\r\n\r\n'
    for bad in (sealed, _events(2) + error):
        with pytest.raises(ValueError):
            bs.read_json_events(bad, full)


def test_full_stream_reader_checks_framing_and_values() -> None:
    """The full reader (one per process) refuses an event that is not a record event or
    a keep-alive, and a scan that disagrees with the JSON."""
    bs = _stream_reader()
    stray = _events(2) + b"data: hello\r\n\r\n"
    assert bs.read_json_events(stray, False)[0] == [1, 2]  # the fast reader cannot tell
    with pytest.raises(ValueError, match="events"):
        bs.read_json_events(stray, True)
    # Same seq and payload text for the scan, another value for the JSON parser:
    # a second "seq" key (JSON keeps the last) is invisible to the scan.
    twisted = _events(1).replace(b'"envelope": ', b'"seq": 99, "envelope": ')
    assert bs.read_json_events(twisted, False)[0] == [1]
    with pytest.raises(ValueError, match="misread"):
        bs.read_json_events(twisted, True)
