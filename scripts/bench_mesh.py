"""Mesh benchmark: 10 ``citynode run`` processes in a degree-3 partial mesh over HTTPS.

Prints publish-to-all latency (p50, p99) of single records on an idle mesh and at an
offered load (``--offered-rate`` records/s) with its breakdown by hops from the
publisher and the CPU the nodes used meanwhile, sustained fully-replicated records per
second and its ratio to the machine's ceiling, copies received per record needed, and
record signatures verified per record needed (a relay verifies each record once). Every node
verifies every record it stores, so the mesh's throughput is bounded by the machine:
the ceiling printed alongside is cores x raw verify rate / (nodes - 1). So is the
ceiling of a node's own storage pipeline, measured in the same run: strict decode,
record id, verify and store (SQLite, in batches of ``--batch``) on one core, with no
network at all, times cores / (nodes - 1) -- what the mesh could reach if sending,
receiving and relaying cost nothing. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import nacl.bindings
from bench_ingest import make_feeds, pipeline_limit  # scripts/ is on sys.path

from citynode.cluster import Cluster, LocalNode
from citynode.core.keys import DOMAIN_RECORD, SigningKey
from citynode.core.records import sign_record


def mesh_edges(n: int) -> list[tuple[int, int]]:
    """A ring plus the diameters: every node has exactly 3 partners (n even)."""
    edges = {(i, (i + 1) % n) for i in range(n)} | {(i, i + n // 2) for i in range(n // 2)}
    return sorted((min(a, b), max(a, b)) for a, b in edges)


class Watcher:
    """One SSE stream per node (operator view): when did each record id arrive where."""

    def __init__(self, nodes: list[LocalNode]) -> None:
        self.nodes = nodes
        self.seen: dict[str, dict[str, float]] = {}  # record id -> node name -> time
        self.events: dict[str, asyncio.Event] = {}
        self.want = len(nodes)
        self.tasks: list[asyncio.Task[None]] = []

    def expect(self, rid: str) -> asyncio.Event:
        return self.events.setdefault(rid, asyncio.Event())

    async def _follow(self, n: LocalNode) -> None:
        s = await n.session()
        headers = {"Authorization": f"Bearer {n.token}", "Accept": "text/event-stream"}
        async with s.get(n.url + "/v1/stream", headers=headers,
                         timeout=aiohttp.ClientTimeout(total=None)) as r:
            data = None
            async for raw in r.content:
                line = raw.decode()
                if line.startswith("data:"):
                    data = line[5:].strip()
                elif line.strip() == "" and data:
                    rid = json.loads(data)["id"]
                    t = time.perf_counter()
                    where = self.seen.setdefault(rid, {})
                    where.setdefault(n.name, t)
                    if len(where) == self.want:
                        self.expect(rid).set()
                    data = None

    async def start(self) -> None:
        self.tasks = [asyncio.create_task(self._follow(n)) for n in self.nodes]
        await asyncio.sleep(1.0)

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def metric_sum(nodes: list[LocalNode], name: str) -> float:
    total = 0.0
    for n in nodes:
        text = (await n.api("GET", "/metrics", raw=True)).decode()
        for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M):
            total += float(m.group(1))
    return total


def arrivals_by_hops(published: dict[str, tuple[int, float, float]],
                     seen: dict[str, dict[str, float]], edges: list[tuple[int, int]],
                     names: list[str]) -> dict[str, tuple[float, float]]:
    """Per-hop breakdown: for the nodes ``d`` links away from a record's publisher (0:
    the publisher itself, its own stream), the p50 and p99 of the time from the publish
    call to the record's arrival there, in ms; "call": the publish call itself."""
    nbrs: dict[int, list[int]] = {i: [] for i in range(len(names))}
    for a, b in edges:
        nbrs[a].append(b)
        nbrs[b].append(a)
    times: dict[str, list[float]] = {"call": []}
    for rid, (k, t0, t1) in published.items():
        dist, level = {k: 0}, [k]
        while level:
            nxt = []
            for a in level:
                for b in nbrs[a]:
                    if b not in dist:
                        dist[b] = dist[a] + 1
                        nxt.append(b)
            level = nxt
        times["call"].append((t1 - t0) * 1000)
        for i, name in enumerate(names):
            if name in seen.get(rid, {}):
                times.setdefault(str(dist[i]), []).append((seen[rid][name] - t0) * 1000)
    out: dict[str, tuple[float, float]] = {}
    for d, v in times.items():
        v.sort()
        out[d] = (statistics.median(v), v[min(len(v) - 1, int(len(v) * 0.99))])
    return out


def cpu_seconds(nodes: list[LocalNode]) -> float:
    """CPU time (user + system) the node processes have used so far (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for n in nodes:
        if n.proc is None:
            continue
        try:
            fields = Path(f"/proc/{n.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def machine_busy() -> tuple[float, float]:
    """(busy, all) CPU time of the whole machine so far, in ticks (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def raw_verify_rate(rounds: int = 5) -> float:
    """Ed25519 verifications per second on one core: the best of ``rounds`` short
    runs (the machines are shared: the best run is closest to what a core can do)."""
    k = SigningKey(b"\x05" * 32)
    r = sign_record(k, feed="x", seq=1, prev=None, time_ms=0, type="org.example.T", data={"n": 1})
    sm = r.sig + DOMAIN_RECORD + r.body
    best = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(1000):
            nacl.bindings.crypto_sign_open(sm, k.public_key)
        best = max(best, 1000 / (time.perf_counter() - t))
    return best


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="citynode-bench-mesh-"))
    cluster = Cluster(base)
    names = [f"city{i}" for i in range(args.nodes)]
    nodes = cluster.create(names, settings={
        ("federation", "pull_interval_seconds"): 10.0,  # the default
        ("federation", "push_batch"): 500,
        ("checkpoints", "interval_seconds"): 3600.0,
    })
    try:
        await cluster.start()
        for a, b in mesh_edges(args.nodes):
            await cluster.link(nodes[a], nodes[b])
        watcher = Watcher(nodes)
        await watcher.start()
        # Warm up: every node publishes once in each feed measured below, so every card
        # and vouch has spread. (A relay holds records of a feed missing from its
        # origin's card until the card that lists it arrives, by pull: the first record
        # of a brand-new feed takes up to a pull interval longer. Steady state is
        # measured here.)
        for feed in ("latency", "load"):
            for n in nodes:
                out = await n.publish(feed, "org.example.Bench", [{"n": -1}])
                await asyncio.wait_for(watcher.expect(out["ids"][0]).wait(), 60)
        # 1. Latency of single records on an idle mesh.
        lat, hop, pub = [], [], []
        edges = mesh_edges(args.nodes)
        for i in range(args.latency_samples):
            k = i % len(nodes)
            n = nodes[k]
            partners = [nodes[b if a == k else a].name for a, b in edges if k in (a, b)]
            t0 = time.perf_counter()
            out = await n.publish("latency", "org.example.Bench", [{"n": i}])
            t1 = time.perf_counter()  # signed and durably stored: now it travels
            rid = out["ids"][0]
            await asyncio.wait_for(watcher.expect(rid).wait(), 30)
            lat.append(max(watcher.seen[rid].values()) - t0)
            pub.append(t1 - t0)
            hop.append(min(watcher.seen[rid][p] for p in partners) - t1)
            await asyncio.sleep(0.02)
        hop.sort()
        hop50 = statistics.median(hop) * 1000
        pub50 = statistics.median(pub) * 1000
        lat.sort()
        p50 = statistics.median(lat) * 1000
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
        # 2. Latency under an offered load: single records published at a steady rate,
        # round-robin over the nodes, each timed from its publish call to everywhere.
        loaded: list[float] = []
        # record id -> (publishing node, publish call started, answered)
        t0s: dict[str, tuple[int, float, float]] = {}

        async def one(k: int, i: int) -> None:
            t0 = time.perf_counter()
            out = await nodes[k].publish("latency", "org.example.Bench", [{"n": i}])
            rid = out["ids"][0]
            t0s[rid] = (k, t0, time.perf_counter())
            await asyncio.wait_for(watcher.expect(rid).wait(), 60)
            loaded.append(max(watcher.seen[rid].values()) - t0)

        offered = []
        cpu0, busy0, bench0 = cpu_seconds(nodes), machine_busy(), time.process_time()
        start = time.perf_counter()
        for i in range(int(args.offered_rate * args.offered_seconds)):
            delay = start + i / args.offered_rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            offered.append(asyncio.create_task(one(i % len(nodes), 10_000 + i)))
        await asyncio.gather(*offered)
        span = time.perf_counter() - start
        busy1 = machine_busy()
        loaded_cpu = {
            # the nodes' CPU per record offered, and their share of the machine's cores
            "nodes_ms_per_record": (cpu_seconds(nodes) - cpu0) * 1000 / len(loaded),
            "nodes_cores": (cpu_seconds(nodes) - cpu0) / span,
            "bench_cores": (time.process_time() - bench0) / span,
            "machine_busy": (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]),
        }
        by_hops = arrivals_by_hops(t0s, watcher.seen, edges, [n.name for n in nodes])
        if args.dump:
            with open(args.dump, "w") as fh:
                json.dump({"published": t0s, "seen": {r: watcher.seen[r] for r in t0s},
                           "edges": edges, "names": [n.name for n in nodes]}, fh)
        loaded.sort()
        lp50 = statistics.median(loaded) * 1000
        lp99 = loaded[min(len(loaded) - 1, int(len(loaded) * 0.99))] * 1000
        # 3. Sustained throughput: publish many records on all nodes at once.
        recv0 = await metric_sum(nodes, "citynode_records_received_total")
        vias = ("sync", "graft", "gap")
        via0 = {v: await metric_sum(nodes, f'citynode_records_received_total{{via="{v}"}}')
                for v in vias}
        dup0 = {v: await metric_sum(nodes, f'citynode_records_duplicate_total{{via="{v}"}}')
                for v in ("push", *vias)}
        stored0 = await metric_sum(nodes, 'citynode_records_stored_total{kind="replica"}')
        verified0 = await metric_sum(nodes, "citynode_records_verified_total")
        per_node = args.records // len(nodes)
        batch = args.batch
        last_ids: list[str] = []

        async def publisher(n: LocalNode) -> None:
            for j in range(0, per_node, batch):
                out = await n.publish("load", "org.example.Bench",
                                      [{"n": j + k} for k in range(min(batch, per_node - j))])
                if j + batch >= per_node:
                    last_ids.append(out["ids"][-1])

        t0 = time.perf_counter()
        await asyncio.gather(*(publisher(n) for n in nodes))
        for rid in last_ids:  # each node's last record everywhere => all of it (seq order)
            await asyncio.wait_for(watcher.expect(rid).wait(), 600)
        elapsed = time.perf_counter() - t0
        total = per_node * len(nodes)
        rate = total / elapsed
        recv = await metric_sum(nodes, "citynode_records_received_total") - recv0
        via1 = {v: await metric_sum(nodes, f'citynode_records_received_total{{via="{v}"}}')
                for v in vias}
        fetched = {v: (via1[v] - via0[v]) / total / (len(nodes) - 1) for v in vias}
        dup1 = {v: await metric_sum(nodes, f'citynode_records_duplicate_total{{via="{v}"}}')
                for v in ("push", *vias)}
        dups = {v: (dup1[v] - dup0[v]) / total / (len(nodes) - 1) for v in dup0}
        needed = total * (len(nodes) - 1)
        stored = await metric_sum(
            nodes, 'citynode_records_stored_total{kind="replica"}') - stored0
        verified = await metric_sum(nodes, "citynode_records_verified_total") - verified0
        await watcher.stop()
    finally:
        await cluster.close()
        cluster.stop()
        # Ten nodes' data dirs (hundreds of MB after a long run): left behind, every run
        # filled /tmp.
        shutil.rmtree(base, ignore_errors=True)
    return {"p50_ms": p50, "p99_ms": p99, "hop50_ms": hop50, "publish50_ms": pub50, "rate": rate,
            "records": total,
            "copies": recv / needed, "fetched": fetched, "dups": dups,
            "stored_ok": stored == needed, "verified": verified / needed,
            "loaded_p50_ms": lp50, "loaded_p99_ms": lp99, "loaded_n": len(loaded),
            "loaded_cpu": loaded_cpu, "by_hops": by_hops}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--records", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--latency-samples", type=int, default=100)
    ap.add_argument("--offered-rate", type=float, default=100.0,
                    help="records/s published (round-robin) for the loaded latency")
    ap.add_argument("--offered-seconds", type=float, default=10.0)
    ap.add_argument("--dump", metavar="PATH",
                    help="write the loaded phase's arrival times (per record, per node) "
                    "as JSON to PATH")
    args = ap.parse_args()
    raw = raw_verify_rate()
    feeds = make_feeds(max(800, min(4000, args.records)), 8)
    pipe = pipeline_limit(feeds, args.batch)
    r = asyncio.run(run(args))
    # before and after the run, as the rest is noisy
    raw = max(raw, raw_verify_rate())
    pipe = max(pipe, pipeline_limit(feeds, args.batch))
    cores = os.cpu_count() or 1
    ceiling = cores * raw / (args.nodes - 1)
    pipe_ceiling = cores * pipe / (args.nodes - 1)
    print(f"{args.nodes} nodes, degree-3 mesh ({len(mesh_edges(args.nodes))} links), HTTPS")
    print(f"publish-to-all latency, idle: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms "
          "(targets 10 / 50 ms)")
    print(f"  of which the publish call (sign + durable commit + HTTPS answer): p50 "
          f"{r['publish50_ms']:.1f} ms")
    print(f"one hop (stored at the publisher -> first direct partner has it), idle: "
          f"p50 {r['hop50_ms']:.1f} ms")
    print(f"publish-to-all latency at an offered load of {args.offered_rate:g} records/s "
          f"({r['loaded_n']} records): p50 {r['loaded_p50_ms']:.1f} ms, "
          f"p99 {r['loaded_p99_ms']:.1f} ms (target p99 <= 50 ms)")
    print("  by hops from the publisher, p50 / p99 ms: " + ", ".join(
        f"{d} {p50:.0f} / {p99:.0f}" for d, (p50, p99) in r["by_hops"].items()))
    c = r["loaded_cpu"]
    print(f"  meanwhile: the {args.nodes} nodes used {c['nodes_cores']:.2f} of {cores} cores "
          f"({c['nodes_ms_per_record']:.1f} ms CPU per record, all nodes together), this "
          f"bench {c['bench_cores']:.2f}; the machine was {100 * c['machine_busy']:.0f}% busy")
    print(f"sustained, fully replicated:  {r['rate']:.0f} records/s over {r['records']:.0f} "
          "records")
    print(f"  machine ceiling (every node verifies every record): {cores} cores x "
          f"{raw:.0f} verify/s / {args.nodes - 1} = {ceiling:.0f} records/s")
    print(f"  ratio to the ceiling: {r['rate'] / ceiling:.3f} (target >= 0.6)")
    print(f"  storage-pipeline ceiling (decode + id + verify + store, batches of "
          f"{args.batch}, no network): {cores} cores x {pipe:.0f} records/s / "
          f"{args.nodes - 1} = {pipe_ceiling:.0f} records/s, ratio "
          f"{pipe_ceiling / ceiling:.3f} to the verify ceiling; the mesh reached "
          f"{r['rate'] / pipe_ceiling:.3f} of it")
    print(f"record signatures verified per record needed: {r['verified']:.3f} (a relay "
          "verifies a record once: target <= 1.0)")
    print(f"copies received per record needed: {r['copies']:.2f} (target <= 1.2); fetched: "
          + ", ".join(f"{v} {x:.2f}" for v, x in r["fetched"].items()))
    print("  duplicates (copies of records already held) per record needed: "
          + ", ".join(f"{v} {x:.2f}" for v, x in r["dups"].items()))
    print(json.dumps({
        "bench": "mesh", "nodes": args.nodes, "p50_ms": round(r["p50_ms"], 2),
        "p99_ms": round(r["p99_ms"], 2), "hop_p50_ms": round(r["hop50_ms"], 2),
        "publish_call_p50_ms": round(r["publish50_ms"], 2),
        "loaded_offered_per_s": args.offered_rate,
        "loaded_p50_ms": round(r["loaded_p50_ms"], 2),
        "loaded_p99_ms": round(r["loaded_p99_ms"], 2),
        "loaded_by_hops_p50_p99_ms": {d: [round(a, 1), round(b, 1)]
                                      for d, (a, b) in r["by_hops"].items()},
        "loaded_nodes_cpu_ms_per_record": round(c["nodes_ms_per_record"], 2),
        "loaded_nodes_cores": round(c["nodes_cores"], 2),
        "loaded_machine_busy": round(c["machine_busy"], 3),
        "records_per_s": round(r["rate"]),
        "ceiling_records_per_s": round(ceiling),
        "ratio_to_ceiling": round(r["rate"] / ceiling, 3),
        "pipeline_per_s": round(pipe),
        "pipeline_ceiling_records_per_s": round(pipe_ceiling),
        "pipeline_ceiling_ratio": round(pipe_ceiling / ceiling, 3),
        "ratio_to_pipeline_ceiling": round(r["rate"] / pipe_ceiling, 3),
        "verified_per_record": round(r["verified"], 3), "copies_per_record": round(r["copies"], 3),
        "fetched_per_record": {v: round(x, 3) for v, x in r["fetched"].items()},
        "duplicates_per_record": {v: round(x, 3) for v, x in r["dups"].items()},
        "raw_verify_per_s": round(raw), "all_stored": r["stored_ok"],
        "python": sys.version.split()[0],
    }))


if __name__ == "__main__":
    main()
