"""Fault scenarios with real ``citynode`` processes (scripts/chaos).

Each scenario starts real nodes (``citynode run``, real HTTPS, real SQLite files),
injects one kind of fault, and measures what an operator cares about:

* ``kill9``      -- kill -9 of the publishing node at random moments while a client
                    publishes one record per request and notes every acknowledged id;
                    then of the receiving partner. Acknowledged records lost, own-feed
                    forks, ``citynode check`` failures, time for the partner to converge.
* ``partition``  -- two nodes in Linux network namespaces joined by veth pairs (made and
                    removed here; root), with latency (``tc netem``, or where the kernel
                    lacks it a userspace delaying relay, scripts/chaos_delay.py: it
                    delays the data, not each packet) and loss (nftables) on the links;
                    the link is cut while the origin publishes, then healed.
* ``disk_full``  -- a small tmpfs under the publisher, then under the receiving partner.
* ``clock_skew`` -- a node whose clock runs ahead and behind by more than the tolerance
                    (libfaketime, Debian's ``faketime``), then within it.
* ``restore``    -- a data dir copied back from a stale copy, with the partner up and
                    with it down: no seq is signed twice.
* ``relay``      -- line A-B-C: A down, B restarted: C gets A's records from B.
* ``hostile``    -- A and B exchange records with and without a hostile partner of A
                    (scripts/hostile_partner.py: floods, forks, gaps, huge frontiers,
                    replays, slowloris, advertised records never served): p99
                    publish-to-receive latency, A's peak RSS, refusals by reason.

Targets: 0 acknowledged records lost, 0 forks, 0 duplicates, convergence within two
sync intervals (the interval here is 1 s). Prints figures per scenario, then one JSON
line. ``--small`` is the short run the test suite uses; the default is the full run
(100 kill -9 cycles). Needs root for namespaces, tc and tmpfs (CI runs as root).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from citynode.cluster import Cluster, LocalNode  # noqa: E402
from citynode.errors import PeerError, PeerRejected  # noqa: E402

SYNC_S = 1.0
FAST = {("federation", "pull_interval_seconds"): SYNC_S,
        ("federation", "backoff_max_seconds"): 2.0}
TYPE = "org.example.Test"
FEED = "chaos"
FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "citynode", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


#: Administration tools live in /usr/sbin, which a non-login PATH may lack.
_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
_TOOLS = ("ip", "nft", "tc", "mount", "umount")


def _tool(name: str) -> str:
    return shutil.which(name, path=_SBIN_PATH) or name


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command (its administration tools found in /usr/sbin too, also after
    ``ip netns exec NS``); a failure raises with the command's stderr in the message."""
    args = list(cmd)
    for i in (0, 4) if cmd[1:3] == ("netns", "exec") else (0,):
        args[i] = _tool(args[i]) if args[i] in _TOOLS else args[i]
    r = subprocess.run(args, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


async def held(node: LocalNode, origin: LocalNode, feed: str = FEED) -> tuple[int, int]:
    """(head seq, records held) of ``origin``'s ``feed`` at ``node`` (0, 0 if none)."""
    for f in await node.feeds():
        if f["origin"] == origin.node_id and f["feed"] == feed:
            return int(f["seq"]), int(f["count"])
    return 0, 0


async def ids_held(node: LocalNode, origin: LocalNode, feed: str = FEED) -> set[str]:
    """Every record id of ``origin``'s ``feed`` held at ``node``."""
    out: set[str] = set()
    after: str | None = None
    while True:
        q = f"/v1/records?origin={origin.node_id}&feed={feed}&limit=1000"
        page = await node.api("GET", q + (f"&after={after}" if after else ""))
        out.update(r["id"] for r in page["records"])
        after = page.get("next")
        if not after or not page["records"]:
            return out


async def converge(node: LocalNode, origin: LocalNode, seq: int, timeout: float) -> float:
    """Seconds until ``node`` holds ``origin``'s feed up to ``seq`` (inf on timeout)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        with contextlib.suppress(PeerError):
            if (await held(node, origin))[0] >= seq:
                return time.monotonic() - start
        await asyncio.sleep(0.05)
    return float("inf")


def forks_at(node: LocalNode) -> int:
    """Fork and split-view proofs ``node`` holds (`citynode forks --json`)."""
    r = cli("forks", "-d", str(node.dir), "--json")
    if r.returncode != 0:
        raise RuntimeError(f"citynode forks failed: {r.stderr.strip()}")
    return len(json.loads(r.stdout)["forks"])


def check_ok(node: LocalNode) -> bool:
    """`citynode check` on a stopped node's data dir."""
    return cli("check", "-d", str(node.dir), timeout=300).returncode == 0


class Publisher:
    """A client publishing one record per request to ``node`` until stopped, noting
    every acknowledged (seq, id); failures (the node killed mid-request) are retried."""

    def __init__(self, node: LocalNode) -> None:
        self.node = node
        self.acked: dict[int, str] = {}
        self.failures = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.n = 0

    async def _run(self) -> None:
        while not self._stop.is_set():
            self.n += 1
            try:
                out = await self.node.publish(FEED, TYPE, [{"n": self.n}])
            except (TimeoutError, PeerError, OSError):
                self.failures += 1
                await asyncio.sleep(0.05)
                continue
            for i, rid in enumerate(out["ids"]):
                seq = out["first_seq"] + i
                if seq in self.acked and self.acked[seq] != rid:
                    raise AssertionError(f"seq {seq} acknowledged twice with two ids")
                self.acked[seq] = rid

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


@contextlib.asynccontextmanager
async def cluster_of(base: Path, names: list[str], **kw: Any) -> AsyncIterator[Cluster]:
    c = Cluster(base)
    c.create(names, settings=FAST, **kw)
    try:
        yield c
    finally:
        await c.close()
        c.stop()


async def restart(node: LocalNode, *, kill: bool) -> None:
    await node.close()
    node.kill() if kill else node.stop()
    node.start()
    await node.wait_ready(60)


# ---- scenarios ------------------------------------------------------------------------


async def kill9(base: Path, cycles: int, rng: random.Random) -> dict[str, Any]:
    """kill -9 of the publisher (``cycles``), then of the receiving partner."""
    async with cluster_of(base, ["A", "B"]) as c:
        a, b = c.nodes["A"], c.nodes["B"]
        await c.start()
        await c.link(a, b)
        pub = Publisher(a)
        pub.start()
        check_failures = 0
        for i in range(cycles):
            await asyncio.sleep(rng.uniform(0.1, 0.6))
            await a.close()
            a.kill()
            if i % 10 == 9:  # every tenth cycle: check the crashed file itself
                check_failures += not check_ok(a)
            a.start()
            await a.wait_ready(60)
        for _ in range(max(1, cycles // 4)):  # now the receiving partner dies
            await asyncio.sleep(rng.uniform(0.1, 0.6))
            await restart(b, kill=True)
        await asyncio.sleep(0.3)
        await pub.stop()
        head, _count = await held(a, a)
        t = await converge(b, a, head, 30)
        have = await ids_held(a, a)
        lost = sum(rid not in have for rid in pub.acked.values())
        at_b = await ids_held(b, a)
        own_forked = len((await a.api("GET", "/v1/admin/status"))["own_forked"])
        await c.close()
        c.stop()
        forks = forks_at(a) + forks_at(b)
        check_failures += (not check_ok(a)) + (not check_ok(b))
        return {"cycles": cycles, "acknowledged": len(pub.acked), "lost": lost,
                "forks": forks + own_forked, "check_failures": check_failures,
                "partner_missing": len(have - at_b), "converge_s": round(t, 2),
                "failed_requests": pub.failures}


@contextlib.contextmanager
def namespaces(n: int, prefix: str) -> Iterator[list[str]]:
    """``n`` network namespaces, each joined to a bridge in this one by a veth pair,
    at 10.231.0.(i+1)/24 (this namespace is 10.231.0.254). Removed on exit."""
    br = f"{prefix}br"
    made: list[str] = []
    try:
        sh("ip", "link", "add", br, "type", "bridge")
        sh("ip", "addr", "add", "10.231.0.254/24", "dev", br)
        sh("ip", "link", "set", br, "up")
        for i in range(n):
            ns, host, peer = f"{prefix}{i}", f"{prefix}h{i}", f"{prefix}p{i}"
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "link", "add", host, "type", "veth", "peer", "name", peer)
            sh("ip", "link", "set", peer, "netns", ns)
            sh("ip", "link", "set", host, "master", br)
            sh("ip", "link", "set", host, "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"10.231.0.{i + 1}/24",
               "dev", peer)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", peer, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield made
    finally:
        for ns in made:
            sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", br, check=False)


def netem(ns: str, dev: str, spec: list[str]) -> str | None:
    """Latency on ``dev`` inside ``ns`` with ``tc netem``; returns why not, if the
    kernel has no netem (CONFIG_NET_SCH_NETEM unset, as on some VM kernels)."""
    r = sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "netem",
           *spec, check=False)
    return None if r.returncode == 0 else f"tc netem refused: {r.stderr.strip()}"


def delay_links(prefix: str, links: list[tuple[str, str, str, int]], delay_ms: float,
                jitter_ms: float) -> list[subprocess.Popen[bytes]]:
    """Latency without ``tc netem``: for each ``(ns, own_ip, other_ip, other_port)``, a
    delaying TCP relay (scripts/chaos_delay.py) inside ``ns``, and an nftables redirect
    sending the node's connections to ``other_ip:other_port`` through it. The relay
    connects on from an address of its own (own_ip + 100), which the redirect leaves
    alone; its packets take the real link, so nftables loss and cuts still apply to
    them. Returns the relay processes (kill them when done)."""
    out: list[subprocess.Popen[bytes]] = []
    try:
        for i, (ns, own, other, port) in enumerate(links):
            src = own.rsplit(".", 1)[0] + f".{int(own.rsplit('.', 1)[1]) + 100}"
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{src}/24", "dev",
               f"{prefix}p{i}")
            nft(ns, "add", "table", "ip", "chaosnat")
            nft(ns, "add", "chain", "ip", "chaosnat", "out",
                "{ type nat hook output priority -100; }")
            relay_port = 40000 + i
            nft(ns, "add", "rule", "ip", "chaosnat", "out", "ip", "saddr", "!=", src,
                "ip", "daddr", other, "tcp", "dport", str(port), "redirect", "to",
                f":{relay_port}")
            proc = subprocess.Popen(
                [_tool("ip"), "netns", "exec", ns, sys.executable,
                 str(ROOT / "scripts" / "chaos_delay.py"), "--listen",
                 f"0.0.0.0:{relay_port}", "--to", f"{other}:{port}", "--source", src,
                 "--delay-ms", str(delay_ms), "--jitter-ms", str(jitter_ms),
                 "--seed", str(i)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            out.append(proc)
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"the delaying relay in {ns} did not start")
    except BaseException:
        for p in out:
            p.kill()
            p.wait()
        raise
    return out


def nft(ns: str, *rule: str) -> None:
    sh("ip", "netns", "exec", ns, "nft", *rule)


def lossy(ns: str, other_ip: str, percent: int) -> None:
    """Drop ``percent``% of packets from ``ns`` to ``other_ip`` (nftables), and make an
    empty ``cut`` chain that :func:`cut` fills to partition."""
    nft(ns, "add", "table", "inet", "chaos")
    nft(ns, "add", "chain", "inet", "chaos", "out",
        "{ type filter hook output priority 0; }")
    nft(ns, "add", "chain", "inet", "chaos", "cut")
    nft(ns, "add", "rule", "inet", "chaos", "out", "jump", "cut")
    nft(ns, "add", "rule", "inet", "chaos", "out", "ip", "daddr", other_ip, "numgen",
        "random", "mod", "100", "<", str(percent), "drop")


def cut(ns: str, other_ip: str, on: bool) -> None:
    """Drop everything from ``ns`` to ``other_ip`` (a partition), or heal it."""
    if on:
        nft(ns, "add", "rule", "inet", "chaos", "cut", "ip", "daddr", other_ip, "drop")
    else:
        nft(ns, "flush", "chain", "inet", "chaos", "cut")


async def publish_once_ready(node: LocalNode, items: list[dict[str, Any]],
                             timeout: float = 30.0) -> dict[str, Any]:
    """Publish ``items`` on ``node``, retrying while it answers 409 ``publish_refused``
    because its first exchange with a partner has not ended yet; any other refusal,
    or still refused after ``timeout`` s, raises."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            out: dict[str, Any] = await node.publish(FEED, TYPE, items)
            return out
        except PeerRejected as exc:
            if exc.reason != "publish_refused" or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.2)


async def partition(base: Path, rounds: int, rng: random.Random) -> dict[str, Any]:
    """A and B in namespaces, 20 ms +- 5 ms each way (tc netem; where the kernel has
    no netem, a userspace relay delaying the data of each connection: :func:`delay_links`)
    and 2% loss (nftables) each way; the A-B path is cut while A publishes, then healed:
    time for B to hold everything, duplicates."""
    prefix = f"cn{os.getpid() % 10000}"
    with namespaces(2, prefix) as (nsa, nsb):
        ips = ["10.231.0.1", "10.231.0.2"]
        async with cluster_of(base, ["A", "B"], hosts=ips) as c:
            a, b = c.nodes["A"], c.nodes["B"]
            a.wrap, b.wrap = ("ip", "netns", "exec", nsa), ("ip", "netns", "exec", nsb)
            latency = None
            for ns, i, other in ((nsa, 0, ips[1]), (nsb, 1, ips[0])):
                latency = netem(ns, f"{prefix}p{i}", ["delay", "20ms", "5ms"]) or latency
                lossy(ns, other, 2)
            relays: list[subprocess.Popen[bytes]] = []
            if latency is not None:  # no netem here: delaying relays instead
                relays = delay_links(prefix, [(nsa, ips[0], ips[1], b.port),
                                              (nsb, ips[1], ips[0], a.port)], 20.0, 5.0)
            await c.start()
            await c.link(a, b)
            heals: list[float] = []
            # The first record goes while the link is whole: until A's first exchange
            # with a new partner has ended, A refuses to sign (own-feed safety at start),
            # and a cut at once could hold that exchange past the publish wait.
            await publish_once_ready(a, [{"n": 0}])
            published = 1
            for _ in range(rounds):
                cut(nsa, ips[1], True)
                cut(nsb, ips[0], True)
                for _ in range(rng.randint(5, 20)):
                    await a.publish(FEED, TYPE, [{"n": published}])
                    published += 1
                await asyncio.sleep(rng.uniform(0.5, 2.0))
                cut(nsa, ips[1], False)
                cut(nsb, ips[0], False)
                heals.append(await converge(b, a, published, 30))
            seq, count = await held(b, a)
            await c.close()
            c.stop()
            relayed = 0
            for r in relays:
                r.kill()
                out, _ = r.communicate()
                relayed += out.count(b"connection")
            forks = forks_at(a) + forks_at(b)
    return {"rounds": rounds, "published": published, "held_by_partner": seq,
            "latency": "20ms+-5ms" if latency is None else
            "20ms+0-5ms on the data of each way, by a userspace relay (scripts/"
            f"chaos_delay.py: {latency}; {relayed} connections relayed)" if relays else
            f"none ({latency})", "loss": "2%",
            "duplicates": count - seq, "forks": forks,
            "within_two_intervals": max(heals) <= 2 * SYNC_S,
            "heal_s_max": round(max(heals), 2),
            "heal_s_median": round(sorted(heals)[len(heals) // 2], 2)}


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    sh("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        sh("umount", "-l", str(path), check=False)


def fill(fs: Path, leave: int) -> Path:
    """Fill ``fs`` but ``leave`` bytes; returns the filler file."""
    st = os.statvfs(fs)
    filler = fs / "filler"
    filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


async def disk_full(base: Path) -> dict[str, Any]:
    """The publisher's disk fills, then the receiving partner's (a small tmpfs under
    each): refusals are clear (507), nothing acknowledged is lost, nothing is stored
    twice, and everything flows again when space returns."""
    with tmpfs(base / "a", "24m") as fs_a, tmpfs(base / "b", "24m") as fs_b:
        c = Cluster(base)
        c.create(["A", "B"], settings=FAST)
        a, b = c.nodes["A"], c.nodes["B"]
        body = [{"n": i, "note": "x" * 300} for i in range(100)]
        acked: list[str] = []
        refused: dict[str, int] = {}

        async def publish(items: list[dict[str, Any]]) -> bool:
            try:
                acked.extend((await a.publish(FEED, TYPE, items))["ids"])
                return True
            except PeerRejected as exc:
                k = f"{exc.status} {exc.reason}"
                refused[k] = refused.get(k, 0) + 1
                return False

        try:
            await c.start()
            await c.link(a, b)
            filler = fill(fs_a, 2 << 20)  # 1: the publisher's disk
            for _ in range(400):
                if not await publish(body) and sum(refused.values()) >= 3:
                    break
            filler.unlink()
            for _ in range(50):  # resumes by itself
                if await publish(body[:10]):
                    break
                await asyncio.sleep(0.2)
            t_a = await converge(b, a, (await held(a, a))[0], 60)
            filler = fill(fs_b, 1 << 20)  # 2: the receiving partner's disk
            for _ in range(40):
                await publish(body)
            behind = (await held(a, a))[0] - (await held(b, a))[0]
            filler.unlink()
            t_b = await converge(b, a, (await held(a, a))[0], 60)
            lost = len(set(acked) - await ids_held(a, a))
            missing = len(set(acked) - await ids_held(b, a))
            seq, count = await held(b, a)
        finally:
            await c.close()
            c.stop()
        checks = check_ok(a) + check_ok(b)
        del fs_a, fs_b
    return {"acknowledged": len(acked), "lost": lost, "refusals": refused,
            "partner_behind_while_full": behind,
            "partner_converge_s": [round(t_a, 2), round(t_b, 2)],
            "partner_missing": missing, "duplicates": count - seq,
            "check_failures": 2 - checks}


def _skew_view(p: dict[str, Any]) -> dict[str, Any]:
    """What a partner list shows of a skewed partner: its clock offset, the last error
    (reason code first) and refusals by reason."""
    err = p.get("last_error") or ""
    return {"clock_offset_s": p.get("clock_offset_s"), "failures": p.get("failures"),
            "last_error": err[:60], "invalid": p.get("invalid")}


async def clock_skew(base: Path) -> dict[str, Any]:
    """A's clock 20 min ahead (beyond the 15 min tolerance), then 20 min behind (beyond
    the request signature's 5 min), then 2 min ahead (within): refusals are counted
    with a clear reason and do not storm; within tolerance records flow."""
    if not Path(FAKETIME_LIB).exists():
        raise RuntimeError(f"{FAKETIME_LIB} missing: apt-get install faketime")
    out: dict[str, Any] = {}
    for label, offset, flows in (("ahead_20m", "+20m", False), ("behind_20m", "-20m", False),
                                 ("ahead_2m", "+2m", True)):
        async with cluster_of(base / label, ["A", "B"]) as c:
            a, b = c.nodes["A"], c.nodes["B"]
            await c.start()
            await c.link(a, b)  # partners first; then A's clock goes wrong
            a.env = {"LD_PRELOAD": FAKETIME_LIB, "FAKETIME": offset,
                     "FAKETIME_DONT_FAKE_MONOTONIC": "1", "FAKETIME_NO_CACHE": "1"}
            await restart(a, kill=False)
            for i in range(20):
                await a.publish(FEED, TYPE, [{"n": i}])
            t = await converge(b, a, 20, 4 * SYNC_S if not flows else 10)
            await asyncio.sleep(5)
            (seen_by_b,) = (await b.api("GET", "/v1/admin/partners"))["partners"]
            (seen_by_a,) = (await a.api("GET", "/v1/admin/partners"))["partners"]
            out[label] = {"flows": t != float("inf"), "expected_to_flow": flows,
                          "converge_s": round(t, 2) if t != float("inf") else None,
                          "b_sees": _skew_view(seen_by_b), "a_sees": _skew_view(seen_by_a)}
    out["ok"] = all(v["flows"] == v["expected_to_flow"] for v in out.values()
                    if isinstance(v, dict))
    return out


async def restore(base: Path) -> dict[str, Any]:
    """A's data dir is copied back from a stale copy, with B up, then with B down."""
    out: dict[str, Any] = {}
    async with cluster_of(base, ["A", "B"]) as c:
        a, b = c.nodes["A"], c.nodes["B"]
        await c.start()
        await c.link(a, b)
        for i in range(20):
            await a.publish(FEED, TYPE, [{"n": i}])
        await converge(b, a, 20, 30)
        await a.close()
        a.stop()
        stale = base / "stale"
        shutil.copytree(a.dir, stale)
        a.start()
        await a.wait_ready()
        for i in range(10):
            await a.publish(FEED, TYPE, [{"n": 100 + i}])
        await converge(b, a, 30, 30)
        for case, partner_up in (("partner_up", True), ("partner_down", False)):
            await a.close()
            a.stop()
            if not partner_up:
                await b.close()
                b.stop()
            shutil.rmtree(a.dir)
            shutil.copytree(stale, a.dir)  # copied back by hand: seq 20, B holds 30+
            a.start()
            await a.wait_ready()
            refused_first = False
            try:
                got = await a.publish(FEED, TYPE, [{"n": 999}])
            except PeerRejected:
                refused_first, got = True, None
            if not partner_up:
                b.start()
                await b.wait_ready()
            for _ in range(100):  # publishing resumes once the heads are confirmed
                if got is not None:
                    break
                await asyncio.sleep(0.2)
                with contextlib.suppress(PeerRejected):
                    got = await a.publish(FEED, TYPE, [{"n": 999}])
            out[case] = {"refused_until_confirmed": refused_first,
                         "next_seq": got["first_seq"] if got else None}
        await asyncio.sleep(2 * SYNC_S)
        await c.close()
        c.stop()
        forks = forks_at(a) + forks_at(b)
    out["forks"] = forks
    out["ok"] = forks == 0 and all(isinstance(v, dict) and (v["next_seq"] or 0) > 30
                                   for k, v in out.items() if k.startswith("partner"))
    return out


async def relay(base: Path) -> dict[str, Any]:
    """Line A-B-C; A goes down, B restarts: C gets A's records from B."""
    async with cluster_of(base, ["A", "B", "C"]) as c:
        a, b, cc = c.nodes["A"], c.nodes["B"], c.nodes["C"]
        await c.start([a, b])
        await c.link(a, b)
        for i in range(10):
            await a.publish(FEED, TYPE, [{"n": i}])
        await converge(b, a, 10, 30)
        await a.close()
        a.stop()
        await restart(b, kill=False)
        await c.start([cc])
        await c.link(b, cc)
        t = await converge(cc, a, 10, 30)
        return {"converge_s": round(t, 2), "within_two_intervals": t <= 2 * SYNC_S}


# -- hostile: a hostile partner process attacks A while A and B exchange records --------

HOSTILE_RATE = 20.0  # records/s A publishes, one a request, while B's stream times them
HOSTILE_QUOTA = 5000  # A's per-origin quota (records a day): H's flood must stop there
#: The quota of the short run (--small): reached within its 12 s on a loaded machine,
#: where a partner's pushes are admitted one or two at a time and its share of A's
#: event loop (5%) lets about a hundred of its records a second be checked and stored.
HOSTILE_QUOTA_SMALL = 400
#: An absolute allowance on top of the 2x p99, printed as a figure of its own
#: (``p99_within_2x_plus_allowance``): on a small shared machine the attacker's own CPU
#: (signing thousands of records a second) competes with the honest nodes for the same
#: cores, which no node-side defence can give back. The target in ``targets`` (and so
#: ``ok``) is the issue's, 2x with no allowance.
HOSTILE_P99_SLACK_S = 0.1
#: H attacks from another address than the honest nodes and clients (all on 127.0.0.1),
#: as a remote attacker does: the per-address connection cap is then its alone.
HOSTILE_SOURCE = "127.0.0.2"
#: H runs at the lowest CPU priority (``nice`` 19; HOSTILE_NICE=0 in the environment:
#: at the scenario's own). A remote attacker signs its flood on its own machine; here
#: it shares two cores with A and B, and at their priority its signing (about half a
#: core) slowed both honest nodes whatever A did to refuse it. The attack still runs
#: at full pressure: H's flood exceeds A's quota many times over and its requests are
#: refused for their load (``hostile.counts`` and ``refused_by_reason`` show it).
HOSTILE_NICE = int(os.environ.get("HOSTILE_NICE", "19"))


def rss_kb(pid: int) -> int:
    """Resident set size of process ``pid`` (kB), 0 once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used (0 once it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(0.99 * len(s)))] if s else float("inf")


async def _stream_times(b: LocalNode, origin: LocalNode, sent: dict[int, float],
                        got: dict[int, float], ready: asyncio.Event) -> None:
    """Follow B's live stream of A's ``lat`` feed; note when each ``n`` arrives."""
    import aiohttp

    s = await b.session()
    url = f"{b.url}/v1/stream?origin={origin.node_id}&feed=lat"
    async with s.get(url, headers={"Authorization": f"Bearer {b.token}"},
                     timeout=aiohttp.ClientTimeout(total=None)) as resp:
        ready.set()
        async for line in resp.content:
            if line.startswith(b"data:"):
                n = json.loads(line[5:])["data"]["n"]
                got.setdefault(n, time.monotonic())
                if n not in sent:  # (cannot be: published before it was noted)
                    raise AssertionError(f"record {n} received but never sent")


def _lower_priority() -> None:
    """In the hostile partner's process, before it runs: :data:`HOSTILE_NICE`."""
    if HOSTILE_NICE:
        os.nice(HOSTILE_NICE)


async def _hostile_run(base: Path, seconds: float, attack: bool,
                       quota: int = HOSTILE_QUOTA) -> dict[str, Any]:
    names = ["A", "B", "H"] if attack else ["A", "B"]
    async with cluster_of(base, names) as c:
        a, b = c.nodes["A"], c.nodes["B"]
        from citynode.cluster import set_config

        set_config(a.dir / "node.toml", "federation", "origin_quota_records_per_day",
                   quota)
        await c.start([a, b])
        await c.link(a, b)
        assert a.proc is not None
        hproc: asyncio.subprocess.Process | None = None
        if attack:
            h = c.nodes["H"]
            hproc = await asyncio.create_subprocess_exec(
                sys.executable, str(ROOT / "scripts" / "hostile_partner.py"),
                "--dir", str(h.dir), "--target", a.url, "--target-id", a.node_id,
                "--target-fingerprint", a.fingerprint.hex(), "--seconds", str(seconds),
                # HOSTILE_ARGS: more flags, e.g. "--no-flood" to find which attack hurts
                "--conns", "200", "--source", HOSTILE_SOURCE,
                *os.environ.get("HOSTILE_ARGS", "").split(),
                stdout=asyncio.subprocess.PIPE,
                stderr=open(h.dir / "hostile.log", "wb"),  # noqa: SIM115
                preexec_fn=_lower_priority)
            await h.wait_ready()
            await a.add_partner(h)
            await h.add_partner(a)
        sent: dict[int, float] = {}
        got: dict[int, float] = {}
        ready = asyncio.Event()
        follow = asyncio.create_task(_stream_times(b, a, sent, got, ready))
        await asyncio.wait_for(ready.wait(), 30)
        rss: list[int] = []
        failed = 0

        acked: dict[int, float] = {}

        async def one(n: int) -> None:
            nonlocal failed
            sent[n] = time.monotonic()
            try:
                await a.publish("lat", TYPE, [{"n": n}])
                acked[n] = time.monotonic()
            except (PeerError, OSError, TimeoutError):
                failed += 1

        start = time.monotonic()
        cpu0 = {"a": cpu_s(a.proc.pid), "b": cpu_s(b.proc.pid)}  # type: ignore[union-attr]
        if hproc is not None:
            cpu0["h"] = cpu_s(hproc.pid)
        pubs = []
        for n in range(int(seconds * HOSTILE_RATE)):
            await asyncio.sleep(max(0.0, start + n / HOSTILE_RATE - time.monotonic()))
            pubs.append(asyncio.create_task(one(n)))
            if n % 5 == 0:
                rss.append(rss_kb(a.proc.pid))
        await asyncio.gather(*pubs)
        for _ in range(100):  # the stragglers
            if len(got) >= len(sent) - failed:
                break
            rss.append(rss_kb(a.proc.pid))
            await asyncio.sleep(0.1)
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await follow
        pids = {"a": a.proc.pid, "b": b.proc.pid, "h": hproc.pid if hproc else 0}  # type: ignore[union-attr]
        cpu = {k: round(cpu_s(pids[k]) - v, 1) for k, v in cpu0.items()}
        lat = [got[n] - sent[n] for n in got]
        out: dict[str, Any] = {
            "published": len(sent), "failed_publishes": failed,
            "partner_missing": len(sent) - failed - len(got),
            "p50_ms": round(1000 * sorted(lat)[len(lat) // 2], 1) if lat else None,
            "p99_ms": round(1000 * p99(lat), 1), "rss_peak_mb": round(max(rss) / 1024, 1),
            # where the time goes: A acknowledging the publish, then reaching B
            "ack_p99_ms": round(1000 * p99([acked[n] - sent[n] for n in acked]), 1),
            "ack_to_b_p99_ms": round(1000 * p99([got[n] - acked[n] for n in got
                                                 if n in acked]), 1),
            # the worst latency of each 5 s of the run (is it the start, or throughout?)
            "max_ms_by_5s": [round(1000 * max((got[n] - sent[n] for n in got
                                               if int(n / HOSTILE_RATE // 5) == w),
                                              default=0.0))
                             for w in range(int(seconds // 5))],
            "a_alive": a.proc.poll() is None, "cpu_s": cpu}
        if hproc is not None:
            stdout, _ = await asyncio.wait_for(hproc.communicate(), 60)
            lines = stdout.decode().strip().splitlines()
            out["hostile"] = json.loads(lines[-1]) if lines else {"error": "no output"}
            out["hostile_rc"] = hproc.returncode
            out.update(await _what_a_holds_of(a, b, c.nodes["H"], quota,
                                              set(out["hostile"].get("proven_forks", []))))
        out["own_forked"] = len((await a.api("GET", "/v1/admin/status"))["own_forked"])
        # the honest pair refused nothing of each other (not even for load: the attacker
        # alone pays for the attack)
        out["honest_refusals"] = {
            f"{x.name} of {y.name}": p["invalid"]
            for x, y in ((a, b), (b, a))
            for p in (await x.api("GET", "/v1/admin/partners"))["partners"]
            if p["node_id"] == y.node_id and p["invalid"]}
        await c.close()
        c.stop()
        out["check_failures"] = (not check_ok(a)) + (not check_ok(b))
        return out


async def _what_a_holds_of(a: LocalNode, b: LocalNode, h: LocalNode, quota: int,
                           proven: set[str]) -> dict[str, Any]:
    """H's feeds as A and B hold them, A's refusals of H by reason, and what is wrong.
    ``proven``: H's fork feeds A answered with a fork proof (A saw both sides; when
    one side was refused for H's load, 429, the other is a chain like any)."""
    held_at: dict[str, dict[str, list[int]]] = {}
    for n in (a, b):
        held_at[n.name] = {f["feed"]: [int(f["seq"]), int(f["count"])]
                           for f in await n.feeds() if f["origin"] == h.node_id}
    invalid: dict[str, int] = {}
    for p in (await a.api("GET", "/v1/admin/partners"))["partners"]:
        if p["node_id"] == h.node_id:
            invalid = dict(p["invalid"])
    wrong = []
    for name, feeds in held_at.items():
        for feed, (seq, count) in feeds.items():
            if count > seq:
                wrong.append(f"{name}: {feed} holds {count} records for head seq {seq}")
            if feed in proven and seq > 1:
                wrong.append(f"{name}: {feed} grew past its fork (seq {seq})")
            if feed in ("gap", "ghost"):
                wrong.append(f"{name}: holds {count} of H's never-valid feed {feed}")
        flood = feeds.get("flood", [0, 0])[1]
        if name == "A" and flood > quota:
            wrong.append(f"A holds {flood} flood records, over its quota {quota}")
    return {"held_of_hostile": held_at, "refused_by_reason": invalid,
            "invalid_stored": wrong, "hostile_fork_proofs": forks_at(a)}


def uncounted(counts: dict[str, Any], invalid: dict[str, int]) -> dict[str, list[int]]:
    """Refusals H was given (HTTP 400s by reason, replays refused, records rejected in
    push answers) that A did not count on H: reason -> [given, counted]."""
    given: dict[str, int] = {}
    for c in counts.values():
        for answer, n in c["answers"].items():
            if answer.startswith(("400 ", "429 ")):
                reasons = [(answer[4:], 1)]
            elif answer.startswith("replayed 403"):
                reasons = [("replayed", 1)]
            elif answer.split(" ")[1:2] == ["429"]:  # a raw replay request, for its load
                reasons = [(answer.split(" ")[2], 1)]
            elif answer.startswith("accepted="):  # a push answer, then rejected by reason
                reasons = [(r, int(k)) for r, k in (p.split("=") for p in
                                                     answer.split(",")[3:])]
            else:
                reasons = []
            for r, k in reasons:
                given[r] = given.get(r, 0) + k * n
    return {r: [n, invalid.get(r, 0)] for r, n in given.items() if invalid.get(r, 0) < n}


async def hostile(base: Path, seconds: float, rounds: int = 1,
                  quota: int = HOSTILE_QUOTA) -> dict[str, Any]:
    """A and B publish-to-receive latency (A publishes 20 records/s, one a request; B's
    live stream times them) without, then with, a hostile partner process
    (scripts/hostile_partner.py) partnered with A and running every attack; ``rounds``
    such pairs, one after the other (calm, attacked, calm, attacked ...), so that the
    load of whatever else runs on the machine falls on both sides of each ratio. Targets
    (on the median of the rounds' ratios): p99 with H within 2x of without (and, as a
    figure only, within 2x plus HOSTILE_P99_SLACK_S); A's peak RSS within +50% of the
    run without H; and in every round nothing invalid stored at A or B, ``citynode
    check`` clean, every refusal counted per partner at A."""
    pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
    loads: list[float] = []
    for k in range(rounds):
        calm = await _hostile_run(base / f"calm{k}", seconds, attack=False, quota=quota)
        war = await _hostile_run(base / f"attacked{k}", seconds, attack=True, quota=quota)
        pairs.append((calm, war))
        loads.append(round(os.getloadavg()[0], 2))
    ratios = [w["p99_ms"] / max(c["p99_ms"], 1.0) for c, w in pairs]
    rss_ratios = [w["rss_peak_mb"] / c["rss_peak_mb"] for c, w in pairs]
    within = [w["p99_ms"] <= 2 * c["p99_ms"] + 1000 * HOSTILE_P99_SLACK_S for c, w in pairs]
    ratios_ok = statistics.median(ratios) <= 2.0
    missed = [uncounted(w.get("hostile", {}).get("counts", {}), w["refused_by_reason"])
              for _c, w in pairs]
    checks = {
        "p99_within_2x": ratios_ok,
        "rss_within_1.5x": statistics.median(rss_ratios) <= 1.5,
        "nothing_invalid_stored": not any(w["invalid_stored"] for _c, w in pairs),
        "refusals_counted": all(sum(w["refused_by_reason"].values()) > 0 and not m
                                and w["hostile_rc"] == 0
                                for (_c, w), m in zip(pairs, missed, strict=True)),
        "every_attack_ran": all(set(w.get("hostile", {}).get("counts", {})) >= {
            "flood", "forks", "gaps", "frontiers", "replay", "slowloris", "ghosts"}
            for _c, w in pairs),
        "a_alive": all(w["a_alive"] and c["a_alive"] for c, w in pairs),
        "honest_not_refused": not any(c["honest_refusals"] or w["honest_refusals"]
                                      for c, w in pairs),
    }
    out: dict[str, Any] = {"seconds_each": seconds, "rounds": rounds}
    if rounds == 1:
        out.update({"without": pairs[0][0], "with": pairs[0][1]})
    else:
        out["runs"] = [{"without": c, "with": w} for c, w in pairs]
    return {**out,
            "p99_ratio": round(statistics.median(ratios), 2),
            "p99_ratios": [round(r, 2) for r in ratios],
            # every round at a glance: [p99 without, p99 with] (ms), and the load average
            # of the machine when the round ended (other work on it moves both sides)
            "p99_ms_by_round": [[c["p99_ms"], w["p99_ms"]] for c, w in pairs],
            "ack_p99_ms_by_round": [[c["ack_p99_ms"], w["ack_p99_ms"]] for c, w in pairs],
            "load_by_round": loads,
            # the target as it reads (median ratio at most 2, no allowance), as
            # in ``targets``; and, for a loaded machine, with HOSTILE_P99_SLACK_S more
            "p99_ratio_within_2x": ratios_ok,
            "p99_within_2x_plus_allowance": sum(within) * 2 > rounds,
            "hostile_nice": HOSTILE_NICE,
            "rss_ratio": round(statistics.median(rss_ratios), 2),
            "rss_ratios": [round(r, 2) for r in rss_ratios],
            "refused_by_reason": [w["refused_by_reason"] for _c, w in pairs],
            "refusals_not_counted": {r: v for m in missed for r, v in m.items()},
            "partner_missing": sum(c["partner_missing"] + w["partner_missing"]
                                   for c, w in pairs),
            "check_failures": sum(c["check_failures"] + w["check_failures"] for c, w in pairs),
            "forks": sum(c["own_forked"] + w["own_forked"] for c, w in pairs),
            "targets": checks, "ok": all(checks.values())}


SCENARIOS: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
    "kill9": kill9, "partition": partition, "disk_full": disk_full,
    "clock_skew": clock_skew, "restore": restore, "relay": relay,
    "hostile": hostile,
}


async def main_async(a: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(a.seed)
    base = Path(tempfile.mkdtemp(prefix="citynode-chaos-"))
    results: dict[str, Any] = {}
    try:
        for name in a.scenario or list(SCENARIOS):
            start = time.monotonic()
            d = base / name
            d.mkdir()
            if name == "kill9":
                r = await kill9(d, a.cycles, rng)
            elif name == "partition":
                r = await partition(d, a.rounds, rng)
            elif name == "hostile":
                r = await hostile(d, a.hostile_seconds, a.hostile_rounds,
                                  HOSTILE_QUOTA_SMALL if a.small else HOSTILE_QUOTA)
            else:
                r = await SCENARIOS[name](d)
            r["seconds"] = round(time.monotonic() - start, 1)
            results[name] = r
            print(f"{name:<11} " + "  ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)
    return results


def verdict(results: dict[str, Any]) -> bool:
    ok = True
    for r in results.values():
        ok &= r.get("lost", 0) == 0 and r.get("forks", 0) == 0
        ok &= r.get("duplicates", 0) == 0 and r.get("check_failures", 0) == 0
        ok &= r.get("ok", True) is True and r.get("partner_missing", 0) == 0
        ok &= r.get("within_two_intervals", True) is True
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    ap.add_argument("--cycles", type=int, default=100, help="kill -9 cycles of the publisher")
    ap.add_argument("--rounds", type=int, default=10, help="partition and heal rounds")
    ap.add_argument("--hostile-seconds", type=float, default=60.0,
                    help="length of each hostile run (without, then with the attacker)")
    ap.add_argument("--hostile-rounds", type=int, default=3,
                    help="hostile runs without and with the attacker, alternating")
    ap.add_argument("--small", action="store_true", help="the short run the suite uses")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the data dirs and logs")
    a = ap.parse_args()
    if a.small:
        a.cycles, a.rounds = min(a.cycles, 4), min(a.rounds, 2)
        a.hostile_seconds = min(a.hostile_seconds, 12.0)
        a.hostile_rounds = 1
    if os.geteuid() != 0:
        print("scripts/chaos needs root (network namespaces, tc, tmpfs)", file=sys.stderr)
        return 2
    results = asyncio.run(main_async(a))
    ok = verdict(results)
    print(json.dumps({"bench": "chaos", "ok": ok, **results}, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
