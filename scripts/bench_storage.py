"""Storage benchmark: memory, disk and publish rate as one node's history grows.

Runs a real ``citynode run`` process, publishes ``--records`` records (default 1M) to one
feed in batches of 1,000 over ``/v1/publish`` (one request at a time, as an operator's
importer does), and at 100k records and at the end prints:

* the node's RSS (``VmRSS`` of the process; and its peak, ``VmHWM``),
* the publish rate over the last window of records, against the rate at the start,
* database bytes per record (main file + write-ahead log while running; the file alone
  after a clean stop) against the envelope bytes per record.

Targets (issue 11, point 10): RSS <= 150 MB at 1M records and flat from 1M on (state is
proportional to chains and partners, not to records); disk <= 1.5 x envelope bytes;
publish rate at the end >= 0.8 x the rate at the start. The last line is one JSON
object with the figures and ``pass`` per target.

Then retention (issue 13, point 3): with the node stopped, every record is pruned as a
retention that they are all past would (``Storage.prune`` in bounded batches, as the
node's prune task does, then ``Storage.reclaim``), and the database size before and
after is printed, in bytes and per record: the skeletons (signed bodies, the chain, the
Merkle tree, the indexes) stay, the payloads go. ``--no-prune`` skips it.

A 10M run (RSS must stay flat from 1M to 10M; about 30-60 minutes on a 2-core machine
and ~6 GB of disk under $TMPDIR)::

    scripts/bench-storage --records 10000000

RSS is also sampled at every multiple of 1M, so a 10M run prints the curve; the
``rss_flat`` target compares the RSS at the end with the RSS at 1M (within 10 MB).
Checkpoints are signed every ``--checkpoint-seconds`` (10 s) so that the Merkle tree of
the growing feed is built and extended all along, as on a live node.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_data import PAYLOAD  # scripts/ is on sys.path when run as a script

from citynode.cluster import Cluster
from citynode.storage import Storage

MB = 1024 * 1024


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def disk_bytes(db: Path) -> int:
    total = 0
    for suffix in ("", "-wal"):
        p = Path(f"{db}{suffix}")
        if p.exists():
            total += p.stat().st_size
    return total


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="citynode-bench-storage-", dir=args.dir))
    cluster = Cluster(base)
    (node,) = cluster.create(["Storage"], settings={
        ("checkpoints", "interval_seconds"): float(args.checkpoint_seconds)})
    db = node.dir / "citynode.db"
    n, batch = args.records, args.batch
    window = max(batch, min(args.window, n // 10 // batch * batch))
    marks = sorted({m for m in (100_000, n) if m <= n}
                   | set(range(1_000_000, n + 1, 1_000_000)))
    at: dict[int, dict[str, Any]] = {}
    times: list[float] = []  # wall time after each batch
    try:
        await cluster.start()
        assert node.proc is not None
        pid = node.proc.pid
        idle = proc_status(pid)["VmRSS"]
        done = 0
        t0 = time.perf_counter()
        while done < n:
            k = min(batch, n - done)
            items = [dict(PAYLOAD, pm25=float((done + i) % 90)) for i in range(k)]
            out = await node.publish("bench", "AirQualityObserved", items)
            if out["last_seq"] != done + k:
                raise SystemExit(f"published up to seq {out['last_seq']}, expected {done + k}")
            done += k
            times.append(time.perf_counter())
            if done in marks:
                i = len(times) - 1
                w = window // batch
                start = times[i - w] if i >= w else t0
                st = proc_status(pid)
                at[done] = {"rss": st["VmRSS"], "hwm": st["VmHWM"], "disk": disk_bytes(db),
                            "rate": min(w, i + 1) * batch / (times[i] - start),
                            "elapsed": times[i] - t0}
                print(f"  {done:>10,} records: RSS {st['VmRSS'] / MB:6.1f} MB "
                      f"(peak {st['VmHWM'] / MB:6.1f}), rate {at[done]['rate']:7.0f}/s, "
                      f"disk {at[done]['disk'] / done:6.1f} B/record (live, with WAL)",
                      flush=True)
        w = window // batch
        rate0 = w * batch / (times[w - 1] - t0) if len(times) >= w else float("nan")
    finally:
        await cluster.close()
        cluster.stop()
    st_ = Storage.open(db)
    try:
        count, env_bytes = st_.space()
    finally:
        st_.close()
    final_disk = disk_bytes(db)
    pruned = None if args.no_prune else prune_all(db)
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return {"idle_rss": idle, "at": at, "rate0": rate0, "count": count,
            "env_bytes": env_bytes, "final_disk": final_disk, "prune": pruned}


def prune_all(db: Path) -> dict[str, Any]:
    """Prune every payload of the database (a retention every record is past), give the
    pages back, and measure the file before and after (each after a clean close)."""
    before = disk_bytes(db)
    st = Storage.open(db)
    t = time.perf_counter()
    dropped = 0
    try:
        for (origin, feed) in st.heads():
            after: int | None = 0
            while after is not None:
                n, after = st.prune(origin, feed, 2**62, after_seq=after,
                                    limit=5000).result()
                dropped += n
        freed_pages = st.reclaim().result()
        seconds = time.perf_counter() - t
        erased, pruned = st.tombstones()
        count = st.count()
    finally:
        st.close()
    after_bytes = disk_bytes(db)
    return {"records": count, "dropped": dropped, "pruned": pruned, "erased": erased,
            "pages_freed": freed_pages, "seconds": seconds,
            "before_bytes": before, "after_bytes": after_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000,
                    help="records to publish (default 1,000,000; 10,000,000 for the 10M run)")
    ap.add_argument("--batch", type=int, default=1000, help="records per /v1/publish call")
    ap.add_argument("--window", type=int, default=20_000,
                    help="records over which a rate is measured (default 20,000)")
    ap.add_argument("--checkpoint-seconds", type=float, default=10.0)
    ap.add_argument("--dir", default=None, help="where the node's data directory goes")
    ap.add_argument("--keep", action="store_true", help="keep the data directory")
    ap.add_argument("--no-prune", action="store_true",
                    help="skip pruning every payload by retention at the end")
    args = ap.parse_args()
    r = asyncio.run(run(args))
    n, at = args.records, r["at"]
    env_per = r["env_bytes"] / r["count"]
    disk_per = r["final_disk"] / r["count"]
    end = at[n]
    one_m = at.get(1_000_000)
    rss_mark = at[min(at)]
    print(f"records: {r['count']:,} in one feed, batches of {args.batch} over /v1/publish; "
          f"envelopes average {env_per:.0f} bytes")
    print(f"RSS idle {r['idle_rss'] / MB:.1f} MB; at {min(at):,}: {rss_mark['rss'] / MB:.1f} MB;"
          f" at {n:,}: {end['rss'] / MB:.1f} MB (peak {end['hwm'] / MB:.1f})  "
          "(target <= 150 MB at 1M, flat after)")
    print(f"publish rate: start {r['rate0']:.0f}/s, at {n:,} {end['rate']:.0f}/s, ratio "
          f"{end['rate'] / r['rate0']:.2f}  (target >= 0.8)")
    print(f"disk: {disk_per:.0f} bytes/record after a clean stop = {disk_per / env_per:.2f} x "
          f"envelope bytes  (target <= 1.5)")
    rss_target = one_m["rss"] if one_m else end["rss"]
    figures: dict[str, Any] = {
        "bench": "storage", "records": r["count"],
        "envelope_bytes_per_record": round(env_per, 1),
        "rss_idle_mb": round(r["idle_rss"] / MB, 1),
        "rss_mb": {str(k): round(v["rss"] / MB, 1) for k, v in sorted(at.items())},
        "rss_peak_mb": round(end["hwm"] / MB, 1),
        "rate_start_per_s": round(r["rate0"]),
        "rate_per_s": {str(k): round(v["rate"]) for k, v in sorted(at.items())},
        "rate_ratio": round(end["rate"] / r["rate0"], 3),
        "disk_live_bytes_per_record": {str(k): round(v["disk"] / k, 1)
                                       for k, v in sorted(at.items())},
        "disk_bytes_per_record": round(disk_per, 1),
        "disk_ratio": round(disk_per / env_per, 3),
        "pass": {
            "rss_le_150mb_at_1m": rss_target / MB <= 150 if one_m else None,
            "rss_flat_after_1m": (end["rss"] - one_m["rss"]) / MB <= 10
            if one_m and n > 1_000_000 else None,
            "disk_le_1_5x": disk_per / env_per <= 1.5,
            "rate_ge_0_8x": end["rate"] / r["rate0"] >= 0.8,
        },
        "python": sys.version.split()[0],
    }
    p = r["prune"]
    if p is not None:
        c = max(p["records"], 1)
        print(f"retention: pruned {p['dropped']:,} payloads in {p['seconds']:.1f} s; database "
              f"{p['before_bytes'] / MB:.1f} MB ({p['before_bytes'] / c:.0f} B/record) before, "
              f"{p['after_bytes'] / MB:.1f} MB ({p['after_bytes'] / c:.0f} B/record) after = "
              f"{p['after_bytes'] / max(p['before_bytes'], 1):.2f} x")
        figures["prune"] = {
            "records": p["records"], "payloads_dropped": p["dropped"],
            "pruned": p["pruned"], "seconds": round(p["seconds"], 2),
            "pages_freed": p["pages_freed"],
            "db_bytes_before": p["before_bytes"], "db_bytes_after": p["after_bytes"],
            "bytes_per_record_before": round(p["before_bytes"] / c, 1),
            "bytes_per_record_after": round(p["after_bytes"] / c, 1),
            "ratio": round(p["after_bytes"] / max(p["before_bytes"], 1), 3),
        }
        figures["pass"]["prune_shrinks"] = p["after_bytes"] < p["before_bytes"]
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
