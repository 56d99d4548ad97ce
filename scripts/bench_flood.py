"""Memory under a sustained flood (scripts/bench-flood).

Starts one real ``citynode run`` process and has ``--clients`` clients (default 100)
publish one record per request over HTTPS for ``--seconds`` (default 600), then leaves
it idle for ``--idle`` seconds. Samples the node's RSS every 10 s and prints it, then
compares the RSS at the end of the flood and after the idle time with the RSS after
the first minute (the first tenth of the run when it is shorter). Target: both within
20% of it (issue 16: memory flat under load). The last line is one JSON object.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from citynode.cluster import Cluster, LocalNode
from citynode.errors import PeerError


def rss_mb(node: LocalNode) -> float:
    assert node.proc is not None
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def run(a: argparse.Namespace) -> dict[str, object]:
    base = Path(tempfile.mkdtemp(prefix="citynode-flood-"))
    c = Cluster(base)
    (node,) = c.create(["A"])
    await c.start()
    published = failed = 0
    stop = time.monotonic() + a.seconds
    first = max(10.0, min(60.0, a.seconds / 10))
    samples: list[tuple[float, float]] = []

    async def client(i: int) -> None:
        nonlocal published, failed
        while time.monotonic() < stop:
            try:
                await node.publish("flood", "org.example.Test",
                                   [{"client": i, "n": published, "pad": "x" * 200}])
                published += 1
            except PeerError:
                failed += 1

    async def sample() -> None:
        t0 = time.monotonic()
        while time.monotonic() < stop + a.idle:
            t = time.monotonic() - t0
            samples.append((t, rss_mb(node)))
            print(f"t={t:6.1f}s  rss={samples[-1][1]:6.1f} MB  records={published}",
                  flush=True)
            await asyncio.sleep(min(10.0, first / 2))

    try:
        await asyncio.gather(sample(), *(client(i) for i in range(a.clients)))
    finally:
        await c.close()
        c.stop()
        shutil.rmtree(base, ignore_errors=True)
    at_first = next(r for t, r in samples if t >= first)
    flood_end = [r for t, r in samples if t <= a.seconds][-1]
    idle = samples[-1][1]
    return {"bench": "flood", "clients": a.clients, "seconds": a.seconds,
            "records": published, "failed": failed, "rss_first_mb": round(at_first, 1),
            "rss_end_mb": round(flood_end, 1), "rss_idle_mb": round(idle, 1),
            "growth": round(flood_end / at_first, 3), "idle_ratio": round(idle / at_first, 3),
            "pass": flood_end <= 1.2 * at_first and idle <= 1.2 * at_first}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--idle", type=float, default=30.0)
    a = ap.parse_args()
    out = asyncio.run(run(a))
    print(f"RSS after the first {'minute' if a.seconds >= 600 else 'tenth'}: "
          f"{out['rss_first_mb']} MB; at the end of the flood {out['rss_end_mb']} MB "
          f"({out['growth']}x); after {a.idle:.0f} s idle {out['rss_idle_mb']} MB "
          f"(target <= 1.2x both)")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
