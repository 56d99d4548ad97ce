"""A hostile partner: a separate process that speaks the partner protocol to attack one
honest node (issue 16, point 6; the ``hostile`` scenario of scripts/chaos.py runs it).

It has its own data dir (``citynode init``; made here if missing), node key and
certificate, and serves its signed card and the partner endpoints over HTTPS with the
ordinary node code, except that it *serves no records*: every ``/v1/fetch`` gets an
empty answer, so whatever it advertises is never sent. The honest node (``--target``)
must already have, or soon add, it as a partner by its id and URL. Then, until
``--seconds`` have passed, each attack (all on by default; ``--no-ATTACK`` turns one
off) runs concurrently:

* ``flood``     -- valid records of its own feed ``flood``, in batches, as fast as the
                   target answers (its per-origin quota and back-pressure cap them);
* ``forks``     -- two records for one seq (each in a feed of its own, ``forkN``);
* ``gaps``      -- records far ahead of anything sent (feed ``gap``, seq 1000, 2000 ...);
* ``frontiers`` -- stale frontiers (``/v1/sync``), over-long frontiers and reconcile
                   messages (too many ranges), and huge claims (seq 2^63-1);
* ``replay``    -- signed requests it sent before, re-sent byte for byte;
* ``slowloris`` -- many connections sending a request one byte at a time (each one
                   closed by the target is opened again a second later);
* ``ghosts``    -- announces and reconcile entries for records it never serves.

It counts what it sent per attack, and how the target answered (HTTP status or error
kind), and prints one JSON line at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import ssl
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import msgpack  # noqa: E402
from aiohttp import web  # noqa: E402
from yarl import URL  # noqa: E402

from citynode.core import httpsig, reconcile, sync  # noqa: E402
from citynode.core.keys import parse_node_id  # noqa: E402
from citynode.core.records import Record, sign_record  # noqa: E402
from citynode.datadir import init_data_dir  # noqa: E402
from citynode.errors import PeerError, PeerRejected  # noqa: E402
from citynode.node import Node  # noqa: E402
from citynode.transport.client import PeerClient  # noqa: E402
from citynode.transport.server import build_app, ssl_context  # noqa: E402

ATTACKS = ("flood", "forks", "gaps", "frontiers", "replay", "slowloris", "ghosts")
TYPE = "org.example.Test"
#: Feeds its card lists as public (the fork feeds are unlisted: partners-only).
FEEDS = ("flood", "gap", "ghost")
MSGPACK = "application/msgpack"


class Tally:
    """Per attack: how many items and requests were sent, and the answers by kind."""

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()
        self.answers: dict[str, Counter[str]] = {}

    def note(self, attack: str, answer: str, items: int = 1) -> None:
        self.sent[attack] += items
        self.answers.setdefault(attack, Counter())[answer] += 1

    def as_json(self) -> dict[str, Any]:
        return {a: {"sent": self.sent[a], "answers": dict(self.answers.get(a, {}))}
                for a in sorted(self.sent)}


def _answer(exc: BaseException) -> str:
    if isinstance(exc, PeerRejected):
        return f"{exc.status} {exc.reason}"
    return type(exc).__name__


class Hostile:
    def __init__(self, node: Node, target: str, target_id: str, fingerprint: bytes,
                 deadline: float, source: str | None = None) -> None:
        self.node = node
        self.key = node.key
        self.target = target.rstrip("/")
        self.target_id = target_id
        self.fingerprint = fingerprint
        self.deadline = deadline
        self.tally = Tally()
        self.proven: list[str] = []  # fork feeds the target answered with a proof
        self.forked_once = asyncio.Event()  # the first fork pair was sent (see flood)
        self.source = source
        self.client = PeerClient(self.key, self.target, node_id=target_id,
                                 fingerprint=fingerprint, timeout=10.0, local_addr=source)
        self.raw = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=10),
            connector=aiohttp.TCPConnector(ssl=aiohttp.Fingerprint(fingerprint),
                                           local_addr=(source, 0) if source else None))

    def live(self) -> bool:
        return time.monotonic() < self.deadline

    def sign(self, feed: str, seq: int, prev: bytes | None, data: dict[str, Any]) -> Record:
        return sign_record(self.key, feed=feed, seq=seq, prev=prev,
                           time_ms=self.node.now_ms(), type=TYPE, data=data)

    async def push(self, attack: str, envelopes: list[bytes]) -> dict[str, Any] | None:
        try:
            out = await self.client.push(envelopes)
        except PeerError as exc:
            self.tally.note(attack, _answer(exc), len(envelopes))
            return None
        rejected = Counter(r[1] for r in out.get("rejected", []))
        summary = ",".join(f"{k}={out.get(k, 0)}" for k in ("accepted", "pending", "forks"))
        self.tally.note(attack, summary + "".join(f",{r}={n}" for r, n in
                                                  sorted(rejected.items())), len(envelopes))
        return out

    async def post(self, attack: str, path: str, body: bytes) -> bytes | None:
        try:
            out = await self.client.request("POST", path, body)
        except PeerError as exc:
            self.tally.note(attack, _answer(exc))
            return None
        self.tally.note(attack, "200")
        return out

    # ---- attacks ----------------------------------------------------------------------

    async def flood(self) -> None:
        """Valid records of feed ``flood``, 200 a batch, back to back; a batch the
        target refused for our load (or did not answer) goes again 0.2 s later, so that
        the chain stays whole and the target stores the flood up to its quota (a batch
        skipped left a gap, and every later one waited ahead of it: the flood stopped
        growing at the first 429)."""
        # The first fork pair goes before the flood: once the flood has spent its
        # origin's quota at the target, a fork's first side (above the head held) is
        # refused for the quota before it is verified, so no fork could be proven (the
        # short run in the suite lost that race on a loaded machine).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.forked_once.wait(), 10)
        prev: bytes | None = None
        seq = 0
        while self.live():
            batch = []
            for _ in range(200):
                seq += 1
                r = self.sign("flood", seq, prev, {"n": seq, "pad": "f" * 64})
                prev = r.id
                batch.append(r.envelope)
            while await self.push("flood", batch) is None and self.live():
                await asyncio.sleep(0.2)

    async def forks(self) -> None:
        """Two records for seq 1 of a fresh feed, each pushed alone, then a third try."""
        i = 0
        while self.live():
            feed = f"fork{i}"
            a = self.sign(feed, 1, None, {"n": 1, "side": "a"})
            b = self.sign(feed, 1, None, {"n": 1, "side": "b"})
            await self.push("forks", [a.envelope])
            answer = await self.push("forks", [b.envelope])
            if answer is not None and answer.get("forks"):
                # The target saw both sides (either push may have been refused for the
                # load, 429, and then there was no fork to see): it must not grow.
                self.proven.append(feed)
            # after the proof: a record built on the second side
            await self.push("forks", [self.sign(feed, 2, b.id, {"n": 2}).envelope])
            self.forked_once.set()
            i += 1
            await asyncio.sleep(0.2)

    async def gaps(self) -> None:
        """Records at seq 1000, 2000, ... of feed ``gap`` with made-up prevs."""
        k = 0
        while self.live():
            batch = []
            for _ in range(50):
                k += 1
                batch.append(self.sign("gap", 1000 * k, os.urandom(32), {"n": k}).envelope)
            await self.push("gaps", batch)
            await asyncio.sleep(0.05)

    async def frontiers(self) -> None:
        """Stale and enormous frontiers and reconcile messages."""
        target = parse_node_id(self.target_id)
        me = self.node.public_key
        stale = sync.encode_frontier({(target, "lat"): (1, b"\x00" * 32),
                                      (me, "flood"): (1, b"\x01" * 32)})
        too_long = msgpack.packb([[me, f"f{i}", 1, b"\x02" * 32]
                                  for i in range(sync.MAX_FRONTIER_FEEDS + 1)],
                                 use_bin_type=True)
        huge_claim = reconcile.encode_message([reconcile.Range(None, reconcile.ENTRIES, entries=(
            (reconcile.key_bytes(me, "flood"), 2**63 - 1, b"\x03" * 32),))])
        # as many ranges as allowed, each a random fingerprint: the most work one
        # message may ask of the target
        bounds = sorted({os.urandom(8) for _ in range(reconcile.MAX_RANGES)})
        many = reconcile.encode_message(
            [reconcile.Range(b, reconcile.FINGERPRINT, fp=os.urandom(16)) for b in bounds[:-1]]
            + [reconcile.Range(None, reconcile.FINGERPRINT, fp=os.urandom(16))])
        too_many = msgpack.packb([[bytes([1, i >> 8, i & 255]), 0, None]
                                  for i in range(reconcile.MAX_RANGES + 1)], use_bin_type=True)
        while self.live():
            await self.post("frontiers", "/v1/sync", stale)
            await self.post("frontiers", "/v1/sync", too_long)
            await self.post("frontiers", "/v1/reconcile", huge_claim)
            await self.post("frontiers", "/v1/reconcile", many)
            await self.post("frontiers", "/v1/reconcile", too_many)
            await asyncio.sleep(0.1)

    async def replay(self) -> None:
        """Send a signed push once, then the same bytes and headers again and again."""
        seq, prev = 0, None
        while self.live():
            seq += 1
            rec = self.sign("replay", seq, prev, {"n": seq})
            prev = rec.id
            body = msgpack.packb([rec.envelope], use_bin_type=True)
            headers = httpsig.sign_request(self.key, "POST", "/v1/push", body,
                                           self.node.now_ms(), target=self.target_id)
            headers["Content-Type"] = MSGPACK
            for i in range(5):
                what = "first" if i == 0 else "replayed"
                try:
                    async with self.raw.post(self.target + "/v1/push", data=body,
                                             headers=headers) as resp:
                        data = await resp.read()
                        reason = ""
                        if resp.status >= 400:  # the error's reason code, if it gave one
                            with contextlib.suppress(ValueError, TypeError, KeyError):
                                reason = " " + str(json.loads(data)["error"])
                        self.tally.note("replay", f"{what} {resp.status}{reason}")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self.tally.note("replay", f"{what} {type(exc).__name__}")
            await asyncio.sleep(0.1)

    async def _slow_conn(self, ctx: ssl.SSLContext, host: str, port: int) -> None:
        """One connection trickling a request a byte every 0.5 s; when the target closes
        it, another one a second later (an attacker keeps up the pressure)."""
        request = (f"POST /v1/reconcile HTTP/1.1\r\nHost: {host}\r\n"
                   "Content-Type: application/msgpack\r\nContent-Length: 100000\r\n\r\n"
                   ).encode() + b"\x90" * 100_000
        while self.live():
            try:
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=ctx,
                    local_addr=(self.source, 0) if self.source else None)
            except OSError as exc:
                self.tally.note("slowloris", f"connect {type(exc).__name__}")
                await asyncio.sleep(1.0)
                continue
            self.tally.note("slowloris", "opened")
            sent = 0
            try:
                for i in range(len(request)):
                    if not self.live():
                        self.tally.note("slowloris", "held to the end", 0)
                        return
                    writer.write(request[i:i + 1])
                    await writer.drain()
                    if reader.at_eof():
                        break
                    sent += 1
                    await asyncio.sleep(0.5)
            except (OSError, ConnectionError):
                pass
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 1)
            self.tally.note("slowloris", "closed by target" if sent > 1 else
                            "refused on arrival", 0)
            await asyncio.sleep(1.0)

    async def slowloris(self, conns: int) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # (the fingerprint is irrelevant to an attacker)
        u = URL(self.target)
        host, port = u.host or "127.0.0.1", u.port or 443
        tasks = []
        for _ in range(conns):
            tasks.append(asyncio.create_task(self._slow_conn(ctx, host, port)))
            await asyncio.sleep(0.02)
        await asyncio.gather(*tasks)

    async def ghosts(self) -> None:
        """Announce heads (and reconcile entries) for seqs it then never serves."""
        me = self.node.public_key
        k = 0
        while self.live():
            k += 1
            head = os.urandom(32)
            await self.post("ghosts", "/v1/announce",
                            sync.encode_frontier({(me, "ghost"): (100 * k, head)}))
            await self.post("ghosts", "/v1/reconcile", reconcile.encode_message([
                reconcile.Range(None, reconcile.ENTRIES, entries=(
                    (reconcile.key_bytes(me, "ghost"), 100 * k + 1, os.urandom(32)),))]))
            await asyncio.sleep(0.2)

    async def close(self) -> None:
        await self.client.close()
        await self.raw.close()


def serves_nothing(tally: Tally) -> Callable[..., Awaitable[web.StreamResponse]]:
    """A middleware: every /v1/fetch gets an empty array (what it advertised never comes)."""

    @web.middleware
    async def mw(request: web.Request,
                 handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                 ) -> web.StreamResponse:
        if request.path == "/v1/fetch":
            await request.read()
            tally.note("ghosts", "fetch answered with nothing", 0)
            return web.Response(body=b"\x90", content_type=MSGPACK)
        return await handler(request)

    return mw


def prepare(d: Path, port: int) -> None:
    """``citynode init`` the data dir if it is not one yet; list the hostile feeds."""
    if not (d / "node.toml").exists():
        from nacl.pwhash import argon2id

        init_data_dir(d, name="Mallory", listen=f"127.0.0.1:{port}", hosts=["127.0.0.1"],
                      kdf_opslimit=argon2id.OPSLIMIT_MIN, kdf_memlimit=argon2id.MEMLIMIT_MIN)
    text = (d / "node.toml").read_text()
    with open(d / "node.toml", "a") as f:
        for feed in FEEDS:
            if f"[feeds.{feed}]" not in text:
                f.write(f'\n[feeds.{feed}]\naccess = "public"\n')


async def wait_accepted(h: Hostile, timeout: float) -> bool:
    """Until the target takes our signed requests (it has added us as a partner)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            await h.client.cards()
            return True
        except PeerError:
            await asyncio.sleep(0.2)
    return False


async def run(a: argparse.Namespace) -> dict[str, Any]:
    d = Path(a.dir)
    prepare(d, a.port or 0)
    node = Node.load(d)
    await node.start()
    tally = Tally()
    app = build_app(node)
    app.middlewares.insert(0, serves_nothing(tally))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", node.config.node.listen_port,
                       ssl_context=ssl_context(node) if node.config.tls.enabled else None)
    await site.start()
    print(json.dumps({"serving": True, "id": node.node_id}), flush=True)
    h = Hostile(node, a.target, a.target_id, bytes.fromhex(a.target_fingerprint),
                time.monotonic() + a.wait + a.seconds, a.source)
    h.tally = tally
    if not a.forks:
        h.forked_once.set()  # no fork attack to wait for
    out: dict[str, Any] = {"bench": "hostile_partner", "id": node.node_id}
    try:
        if not await wait_accepted(h, a.wait):
            out["error"] = "the target never accepted us as a partner"
            return out
        h.deadline = time.monotonic() + a.seconds
        started = time.monotonic()
        jobs: list[Awaitable[None]] = []
        for name in ATTACKS:
            if getattr(a, name):
                jobs.append(h.slowloris(a.conns) if name == "slowloris" else
                            getattr(h, name)())
        errors = [e for e in await asyncio.gather(*jobs, return_exceptions=True)
                  if isinstance(e, BaseException)]
        if errors:  # an attack that broke is a finding about this script, not the target
            out["error"] = "; ".join(f"{type(e).__name__}: {e}" for e in errors)
        out["attacks"] = [n for n in ATTACKS if getattr(a, n)]
        out["seconds"] = round(time.monotonic() - started, 1)
        out["counts"] = tally.as_json()
        out["proven_forks"] = h.proven
        return out
    finally:
        await h.close()
        await runner.cleanup()
        await node.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="its data dir (made if missing)")
    ap.add_argument("--port", type=int, help="listen port for a new data dir")
    ap.add_argument("--target", required=True, help="the honest node's URL")
    ap.add_argument("--target-id", required=True)
    ap.add_argument("--target-fingerprint", required=True, help="its certificate, hex")
    ap.add_argument("--seconds", type=float, default=30.0, help="how long to attack")
    ap.add_argument("--wait", type=float, default=30.0,
                    help="how long to wait for the target to add us as a partner")
    ap.add_argument("--conns", type=int, default=100, help="slowloris connections")
    ap.add_argument("--source", help="the IP address to attack from (e.g. 127.0.0.2: "
                    "another host than the honest nodes on 127.0.0.1, as an attacker is)")
    for name in ATTACKS:
        ap.add_argument(f"--no-{name}", dest=name, action="store_false",
                        help=f"do not run the {name} attack")
    a = ap.parse_args()
    out = asyncio.run(run(a))
    print(json.dumps(out), flush=True)
    return 0 if "error" not in out else 1


if __name__ == "__main__":
    sys.exit(main())
