"""Stream benchmark: many SSE subscribers on one ``citynode run`` process over HTTPS.

One node; ``--subscribers`` anonymous subscribers of ``GET /v1/stream?feed=...`` (a public
feed), spread over ``--procs`` subscriber processes, each reading every event: the seq
and payload of every record event, scanned in C per received block (one subscriber per
process also checks the SSE framing and parses every record as JSON; with ``--format
envelope`` every subscriber decodes each signed envelope's body instead). A publisher
drives the node through the operator publish API at ``--rate`` records per second for
``--seconds`` seconds, a batch every ``--batch-ms``, paced by a monotonic clock (up to
``--max-inflight`` publish calls overlap). Each payload carries the wall time
(``time.time()``) taken just before its batch's publish call; a subscriber's delivery
latency is the time (``time.time()`` in its own process) it has received the whole event,
after the JSON parse for the subscriber that parses, minus that. Every subscriber must get
every record exactly once (payload numbers) and in feed order (seq 1, 2, 3, ... without
gaps).

The subscribers share the machine with the node, as 100 real subscribers on 100 machines
would not: the less CPU they use, the less they hold the node back. They print theirs.

Prints records published, events delivered (and whether that is records x subscribers),
p50 / p99 / max delivery latency, per record the latency of its first and of its last
subscriber (the node's own path, then the fan-out to every stream), the achieved publish
rate, the node's CPU use (utime + stime from /proc over the run), how long the node's
event-loop thread was runnable but waiting for a CPU (/proc schedstat: the share of the
machine other processes took), and the subscriber processes' CPU use. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import gc
import itertools
import json
import multiprocessing as mp
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any

import aiohttp
import msgpack

from citynode.cluster import Cluster
from citynode.core.records import decode_record

FEED = "stream-bench"
TYPE = "org.example.Bench"


# ------------------------------------------------------------------ subscriber processes


class Sub:
    """One subscriber's tally: payload numbers seen, feed order, and latencies."""

    def __init__(self) -> None:
        self.next_seq = 1  # the feed is new: in order means seq 1, 2, 3, ... without gaps
        self.count = 0
        self.out_of_order = 0  # events whose seq was not the one expected next
        self.seen: set[int] = set()
        self.dupes = 0
        self.lat = array.array("d")


# The part of one record event of the node's JSON view that the bench reads: seq and
# payload (json.dumps keeps the record's key order, and the payload's keys are in
# canonical order "n", "t"). One scan per received block, in C, starting at a literal:
# reading 100,000 events a second event by event in Python took the load generator most
# of a core of the two it shares with the node, and its CPU, not the node's, then set
# the tail latency.
_EVENT = re.compile(
    rb'"seq": (\d+), "prev": [^,]*, "time": \d+, "time_iso": "[^"]*", "type": "[^"]*", '
    rb'"data": \{"n": (-?\d+), "t": ([0-9.e+-]+)\}')
_EVENT_LINE = b"\r\nevent: "
_RECORD_EVENT = b"\r\nevent: record\r\n"
_PING = b": ping\r\n\r\n"  # aiohttp-sse's keep-alive comment
# The node's first event: the cursor the stream starts after, alone.
_CURSOR_ONLY = re.compile(rb"id: [0-9]+\r\n\r\n")
_ENV_HEAD = b"\r\nevent: record\r\ndata: "


def _read_envelope_event(ev: bytes) -> tuple[int, int, float] | None:
    """``(seq, n, t)`` of one ``format=envelope`` event (its data: the base64 envelope,
    whose body and payload are decoded whole), or None for a keep-alive comment or the starting
    cursor. Raises ValueError otherwise."""
    if ev.startswith(b":") or _CURSOR_ONLY.fullmatch(ev + b"\r\n\r\n"):
        return None
    i = ev.find(_ENV_HEAD)
    if not ev.startswith(b"id: ") or i < 0:
        raise ValueError(f"unexpected event: {ev[:200]!r}")
    body, _sig, payload = decode_record(base64.b64decode(ev[i + len(_ENV_HEAD):],
                                                       validate=True))
    if payload is None:
        raise ValueError("a record event without its payload")
    # the payload is the salted map {data, salt, ...} (docs/PROTOCOL.md)
    f, data = msgpack.unpackb(body), msgpack.unpackb(payload)["data"]
    return f["seq"], data["n"], data["t"]


def read_json_events(block: bytes, full: bool) -> tuple[list[int], list[int], list[bytes]]:
    """The seqs, payload numbers and payload times (as sent) of the record events in
    ``block`` (whole events, each ending in a blank line), in order. Raises ValueError if
    an event is not read: every event must be a record event that matches.

    ``full`` (one subscriber per process): also check the framing (every event is a record
    event, a keep-alive or the starting cursor) and parse each event's data as JSON,
    checking the scan read the same values. Every stream of one filter is written the
    same bytes, so the full reader's checks hold for the others of its process.
    """
    found = _EVENT.findall(block)
    if block.count(_EVENT_LINE) != len(found):
        raise ValueError(f"{block.count(_EVENT_LINE)} events but {len(found)} records read: "
                         f"{block[:200]!r}")
    if not found:
        return [], [], []
    seqs, ns, ts = zip(*found, strict=True)
    seq_list, n_list = list(map(int, seqs)), list(map(int, ns))
    if full:
        events = block.count(b"\r\n\r\n")
        pings = block.count(_PING)
        cursors = len(_CURSOR_ONLY.findall(block))
        if block.count(_RECORD_EVENT) + pings + cursors != events:
            raise ValueError(f"{events} events, {pings} keep-alives, {cursors} cursors, "
                             f"{block.count(_RECORD_EVENT)} records: {block[:200]!r}")
        datas = [ev[ev.index(b"data: ") + 6:] for ev in block.split(b"\r\n\r\n")
                 if _RECORD_EVENT in ev]
        for seq, n, t, data in zip(seq_list, n_list, ts, datas, strict=True):
            rj = json.loads(data)
            if (rj["seq"], rj["data"]["n"], rj["data"]["t"]) != (seq, n, float(t)):
                raise ValueError(f"event misread: {data[:200]!r}")
    return seq_list, n_list, list(ts)


async def _follow(session: aiohttp.ClientSession, url: str, sub: Sub,
                  connected: asyncio.Event, counter: list[int], n_subs: int,
                  progress: list[float], full: bool) -> None:
    """Read one SSE stream until cancelled (or it fails).

    Whole events (up to the last ``\\r\\n\\r\\n`` received) are read together by
    :func:`read_json_events`; ``full`` subscribers (one per process) also parse each
    record as JSON and check the scan read the same values. Parsing 100,000 JSON
    records a second would take a core of its own: the load generator, not the node,
    would set the latency (100 real subscribers run on 100 machines).
    """
    async with session.get(url, headers={"Accept": "text/event-stream"},
                           timeout=aiohttp.ClientTimeout(total=None)) as r:
        if r.status != 200:
            raise RuntimeError(f"stream answered {r.status}: {(await r.read())[:200]!r}")
        # The node registers the subscriber before it sends the headers: from here on
        # nothing published is missed.
        counter[0] += 1
        if counter[0] == n_subs:
            connected.set()
        buf = b""
        envelope = "format=envelope" in url
        while True:
            chunk = await r.content.readany()
            if not chunk:
                raise RuntimeError("stream closed by the node")
            buf += chunk
            end = buf.rfind(b"\r\n\r\n") + 4  # whole events only; the rest waits
            if end < 4:
                continue
            block, buf = buf[:end], buf[end:]
            now = time.time()
            if envelope:
                # Every subscriber decodes the whole body (no shortcut to misread); the
                # signature is the client's own cost, not the node's: not checked.
                got = [e for e in map(_read_envelope_event, block.split(b"\r\n\r\n")[:-1])
                       if e is not None]
                seqs = [g[0] for g in got]
                ns = [g[1] for g in got]
                ts: Sequence[float | bytes] = [g[2] for g in got]  # bytes: JSON, as sent
            else:
                seqs, ns, ts = read_json_events(block, full)
                if full:
                    now = time.time()  # after the JSON parse: it is this reader's cost
            progress[0] = now
            if not seqs:
                continue
            # In C, not per event in Python (see _EVENT): the seqs must be the next ones
            # in feed order, the payload numbers new; the times are mostly one per
            # publish batch, so one subtraction per run of equal times.
            k = len(seqs)
            if seqs != list(range(sub.next_seq, sub.next_seq + k)):
                sub.out_of_order += sum(
                    s != e for s, e in zip(seqs, [sub.next_seq, *(x + 1 for x in seqs[:-1])],
                                           strict=True))
            sub.next_seq = seqs[-1] + 1
            before = len(sub.seen)
            sub.seen.update(ns)
            sub.dupes += k - (len(sub.seen) - before)
            for t, run in itertools.groupby(ts):
                sub.lat.extend(itertools.repeat(now - float(t), len(list(run))))
            sub.count += k


async def _subscriber_main(wid: int, url: str, fingerprint: bytes, n_subs: int,
                           idle_timeout: float, conn: Connection) -> None:
    subs = [Sub() for _ in range(n_subs)]
    connected = asyncio.Event()
    counter = [0]
    progress = [time.time()]
    connector = aiohttp.TCPConnector(ssl=aiohttp.Fingerprint(fingerprint), limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.create_task(_follow(session, url, s, connected, counter, n_subs,
                                             progress, full=i == 0))
                 for i, s in enumerate(subs)]
        waiter = asyncio.create_task(connected.wait())
        done, _ = await asyncio.wait([waiter, *tasks], timeout=60,
                                     return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            errs = [repr(t.exception()) for t in tasks if t.done() and t.exception()]
            conn.send(("error", wid, f"subscribers not connected: {errs or 'timeout'}"))
            for t in tasks:
                t.cancel()
            return
        # The load generator's own collector pauses (tens of ms, in every subscriber
        # process at once) are not the node's latency: off while measuring.
        gc.collect()
        gc.freeze()
        gc.disable()
        conn.send(("ready", wid, None))
        cpu0 = time.process_time()
        # When publishing is over the main process sends the number of records published;
        # wait until every subscriber has that many, or until this process has received
        # nothing for idle_timeout seconds. (Polling here only decides when to stop: each
        # event's latency is taken when it is parsed.)
        ctl = asyncio.create_task(asyncio.to_thread(conn.recv))
        while True:
            await asyncio.wait([ctl], timeout=0.2)
            if ctl.done():
                total = ctl.result()
                if all(s.count >= total for s in subs) or all(t.done() for t in tasks):
                    break
                if time.time() - progress[0] > idle_timeout:
                    break
        errors = [repr(t.exception()) for t in tasks
                  if t.done() and not t.cancelled() and t.exception()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        cpu = time.process_time() - cpu0
    lat = array.array("d")
    for s in subs:
        lat.extend(s.lat)
    conn.send(("result", wid, {
        "subs": [{"count": s.count, "unique": len(s.seen), "dupes": s.dupes,
                  "out_of_order": s.out_of_order} for s in subs],
        "lat": lat.tobytes(), "last_recv": progress[0], "cpu_s": cpu, "errors": errors[:5],
    }))


def subscriber_process(wid: int, url: str, fingerprint: bytes, n_subs: int,
                       idle_timeout: float, conn: Connection) -> None:
    """Entry point of one subscriber process (multiprocessing, spawn)."""
    try:
        asyncio.run(_subscriber_main(wid, url, fingerprint, n_subs, idle_timeout, conn))
    except Exception as exc:  # reported to the main process, which fails the run
        conn.send(("error", wid, repr(exc)))


# ------------------------------------------------------------------ main process


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` in seconds (Linux /proc)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def runqueue_wait_seconds(pid: int) -> float:
    """Time the main thread of ``pid`` spent runnable but not running (Linux schedstat)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9


async def recv(conn: Connection, timeout: float) -> tuple[str, int, Any]:
    """The next message from a subscriber process, or TimeoutError."""
    if not await asyncio.to_thread(conn.poll, timeout):
        raise TimeoutError("a subscriber process did not answer in time")
    msg: tuple[str, int, Any] = conn.recv()
    if msg[0] == "error":
        raise RuntimeError(f"subscriber process {msg[1]}: {msg[2]}")
    return msg


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="citynode-bench-stream-"))
    cluster = Cluster(base)
    (node,) = cluster.create(["bench"], settings={("checkpoints", "interval_seconds"): 3600.0})
    batch = max(1, round(args.rate * args.batch_ms / 1000))
    interval = batch / args.rate
    batches = max(1, round(args.rate * args.seconds / batch))
    ctx = mp.get_context("spawn")  # no fork of a process with a running event loop
    procs: list[SpawnProcess] = []
    conns: list[Connection] = []
    results: list[dict[str, Any]] = []
    try:
        await cluster.start()
        assert node.proc is not None
        pid = node.proc.pid
        await node.publish("warmup", TYPE, [{"n": -1, "t": time.time()}])
        url = f"{node.url}/v1/stream?feed={FEED}" + (
            "&format=envelope" if args.format == "envelope" else "")
        per = [args.subscribers // args.procs + (i < args.subscribers % args.procs)
               for i in range(args.procs)]
        for wid, k in enumerate(per):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=subscriber_process, daemon=True,
                            args=(wid, url, node.fingerprint, k, args.idle_timeout, child))
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        for c in conns:
            await recv(c, 90)
        # Publish: batch k is due at t0 + k * interval (monotonic). A durable commit can
        # take longer than the interval, so up to --max-inflight calls overlap (the node
        # serializes them on the feed's lock; the wait counts as latency). A batch that
        # cannot start on time starts late, and none starts after --seconds: a node that
        # cannot keep up publishes fewer records, and the achieved rate shows it.
        cpu0, wait0 = cpu_seconds(pid), runqueue_wait_seconds(pid)
        w0 = time.time()
        t0 = time.monotonic()
        publish_calls: list[float] = []
        slots = asyncio.Semaphore(args.max_inflight)

        async def publish_batch(k: int) -> None:
            try:
                ts = time.time()
                c0 = time.perf_counter()
                out = await node.publish(FEED, TYPE, [{"n": k * batch + j, "t": ts}
                                                      for j in range(batch)])
                publish_calls.append(time.perf_counter() - c0)
                if len(out["ids"]) != batch:
                    raise RuntimeError(f"publish returned {len(out['ids'])} ids for {batch}")
            finally:
                slots.release()

        calls: list[asyncio.Task[None]] = []
        for k in range(batches):
            delay = t0 + k * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await slots.acquire()
            if time.monotonic() - t0 >= args.seconds or any(
                    c.done() and c.exception() for c in calls):
                slots.release()
                break
            calls.append(asyncio.create_task(publish_batch(k)))
        await asyncio.gather(*calls)
        pub_elapsed = time.monotonic() - t0
        w_pub_end = time.time()
        total = len(calls) * batch
        for c in conns:
            c.send(total)
        results = [(await recv(c, args.idle_timeout + 600))[2] for c in conns]
        w1 = time.time()
        cpu1, wait1 = cpu_seconds(pid), runqueue_wait_seconds(pid)
    finally:
        # After a failure the subscriber processes wait for a count that never comes.
        for p in procs:
            p.join(5 if results else 0)
            if p.is_alive():
                p.terminate()
                p.join()
        for c in conns:
            c.close()
        await cluster.close()
        cluster.stop()
        if results:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"node data and log kept in {base}", file=sys.stderr)
    subs = [s for r in results for s in r["subs"]]
    lat = array.array("d")
    for r in results:
        lat.frombytes(r["lat"])
    first_ms, last_ms = _first_last(results, total)
    lat_ms = sorted(x * 1000 for x in lat)
    last_recv = max(r["last_recv"] for r in results)
    publish_calls.sort()
    return {
        "published": total, "scheduled": batches * batch, "batch": batch,
        "pub_elapsed": pub_elapsed, "rate": total / pub_elapsed,
        "delivered": sum(s["count"] for s in subs),
        "complete_in_order": sum(s["unique"] == total and s["count"] == total
                                 and s["out_of_order"] == 0 for s in subs),
        "dupes": sum(s["dupes"] for s in subs),
        "missing": sum(total - s["unique"] for s in subs),
        "out_of_order": sum(s["out_of_order"] for s in subs),
        "p50_ms": statistics.median(lat_ms) if lat_ms else float("nan"),
        "p99_ms": lat_ms[min(len(lat_ms) - 1, int(len(lat_ms) * 0.99))] if lat_ms
        else float("nan"),
        "max_ms": lat_ms[-1] if lat_ms else float("nan"),
        "first_p50_ms": _pct(first_ms, 0.5), "first_p99_ms": _pct(first_ms, 0.99),
        "last_p50_ms": _pct(last_ms, 0.5), "last_p99_ms": _pct(last_ms, 0.99),
        "publish_call_p50_ms": statistics.median(publish_calls) * 1000,
        "publish_call_max_ms": publish_calls[-1] * 1000,
        "tail_s": max(0.0, last_recv - w_pub_end),
        "node_cpu_pct": 100 * (cpu1 - cpu0) / (w1 - w0),
        "node_wait_pct": 100 * (wait1 - wait0) / (w1 - w0),
        "run_s": w1 - w0,
        "sub_cpu_pct": [100 * r["cpu_s"] / (w1 - w0) for r in results],
        "errors": [e for r in results for e in r["errors"]],
    }


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


def _first_last(results: list[dict[str, Any]], total: int) -> tuple[list[float], list[float]]:
    """Per record, the latency of the first and of the last subscriber to get it (ms,
    each list sorted), if every subscriber got every record in order (a subscriber's
    latencies are then in seq order); else two empty lists. The first is the node's
    path (publish, commit, tail); the gap to the last is the fan-out to all streams."""
    per_sub: list[array.array[float]] = []
    for r in results:
        lat = array.array("d")
        lat.frombytes(r["lat"])
        at = 0
        for s in r["subs"]:
            if s["count"] != total or s["out_of_order"] or s["unique"] != total:
                return [], []
            per_sub.append(lat[at: at + total])
            at += total
    if not per_sub:
        return [], []
    per_record = list(zip(*per_sub, strict=True))
    return (sorted(min(x) * 1000 for x in per_record),
            sorted(max(x) * 1000 for x in per_record))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subscribers", type=int, default=100)
    ap.add_argument("--rate", type=float, default=1000.0, help="records per second")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--batch-ms", type=float, default=50.0,
                    help="publish a batch every this many ms")
    ap.add_argument("--max-inflight", type=int, default=4,
                    help="publish calls allowed to overlap (1: strictly one after another)")
    ap.add_argument("--procs", type=int, default=4, help="subscriber processes")
    ap.add_argument("--format", choices=["json", "envelope"], default="json",
                    help="the stream's event format: json (the node's JSON view, what any "
                    "SSE consumer reads) or envelope (the signed envelope alone, what "
                    "citynode.client and citynode subscribe read)")
    ap.add_argument("--idle-timeout", type=float, default=30.0,
                    help="after publishing, a subscriber process stops waiting once it "
                    "has received nothing for this many seconds")
    args = ap.parse_args()
    if args.max_inflight < 1:
        ap.error("--max-inflight must be at least 1")
    if not 1 <= args.procs <= args.subscribers:
        ap.error("--procs must be between 1 and --subscribers")
    r = asyncio.run(run(args))
    n, subs = r["published"], args.subscribers
    expected = n * subs
    ok = r["delivered"] == expected and r["complete_in_order"] == subs
    load = os.getloadavg()
    print(f"1 node, {subs} SSE subscribers ({args.format} events) over HTTPS in {args.procs} "
          "subscriber processes, "
          f"{os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"published: {n} of {r['scheduled']} scheduled records in {r['pub_elapsed']:.1f} s "
          f"= {r['rate']:.0f} records/s (target {args.rate:.0f}; batches of {r['batch']}; "
          f"publish call p50 {r['publish_call_p50_ms']:.1f} ms, "
          f"max {r['publish_call_max_ms']:.1f} ms)")
    print(f"delivered: {r['delivered']} events of {expected} expected (records x subscribers); "
          f"{r['complete_in_order']}/{subs} subscribers got every record exactly once in "
          f"order; missing {r['missing']}, duplicates {r['dupes']}, out of order "
          f"{r['out_of_order']}" + ("" if ok else "  <-- FAILED"))
    print(f"delivery latency: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, max "
          f"{r['max_ms']:.1f} ms (target p99 <= 100 ms); last event {r['tail_s']:.1f} s "
          "after the last publish")
    print(f"per record: first subscriber p50 {r['first_p50_ms']:.1f} ms, p99 "
          f"{r['first_p99_ms']:.1f} ms (publish, commit, tail); last of the {subs} p50 "
          f"{r['last_p50_ms']:.1f} ms, p99 {r['last_p99_ms']:.1f} ms (+ fan-out to every "
          "stream)")
    print(f"node CPU: {r['node_cpu_pct']:.0f}% of one core over {r['run_s']:.1f} s (its event "
          f"loop waited for a CPU {r['node_wait_pct']:.0f}% of that time); subscriber "
          "processes: " + ", ".join(f"{c:.0f}%" for c in r["sub_cpu_pct"]))
    for e in r["errors"]:
        print(f"subscriber error: {e}")
    print(json.dumps({
        "bench": "stream", "subscribers": subs, "subscriber_procs": args.procs,
        "format": args.format,
        "records": n, "events_delivered": r["delivered"], "events_expected": expected,
        "all_delivered_in_order": ok, "p50_ms": round(r["p50_ms"], 2),
        "p99_ms": round(r["p99_ms"], 2), "max_ms": round(r["max_ms"], 2),
        "first_sub_p50_ms": round(r["first_p50_ms"], 2),
        "first_sub_p99_ms": round(r["first_p99_ms"], 2),
        "last_sub_p50_ms": round(r["last_p50_ms"], 2),
        "last_sub_p99_ms": round(r["last_p99_ms"], 2),
        "publish_rate": round(r["rate"], 1), "target_rate": args.rate,
        "tail_s": round(r["tail_s"], 2), "node_cpu_pct": round(r["node_cpu_pct"], 1),
        "node_cpu_wait_pct": round(r["node_wait_pct"], 1),
        "subscriber_cpu_pct": [round(c, 1) for c in r["sub_cpu_pct"]],
        "load_avg_1m": round(load[0], 2), "cores": os.cpu_count(),
        "python": sys.version.split()[0],
    }))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
