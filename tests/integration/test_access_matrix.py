"""The authorization matrix: every read path x feed access level x caller, at the origin
and at a relay that holds the origin's records; then the paths between nodes (push and
pull) and ``citynode export``.

Real ``citynode run`` processes on 127.0.0.1 (real HTTPS, real SQLite)::

    Partner ── Origin ── Relay ── Reader

Origin publishes ``pub`` (public), ``priv`` (partners) and ``sec`` (restricted, sealed to
Reader). Partner and Relay are Origin's partners; Reader is no partner of Origin (it is
Relay's partner in the relay test, so Origin's records reach it only through Relay).
Relay knows the feeds' access levels and Origin's partners only from Origin's signed
card. Callers sign their GETs with their node keys (any node key may sign a read):

=========  ===========================================================================
anonymous  no signature
origin     Origin's key: reads everything of its own
relay      Relay's key: a partner of the origin, not a reader of ``sec``
partner    Partner's key: a partner of the origin (not the relay), not a reader
reader     Reader's key: a reader of ``sec``, not a partner of the origin
stranger   a key no node knows
=========  ===========================================================================

Who may read (core/access.py): ``pub`` anyone; ``priv`` origin, relay, partner; ``sec``
origin, reader -- the checkpoint reads of a feed follow its latest record held, so at
Relay too (docs/PROTOCOL.md, "Access levels"). An
allowed cell must get the record (``sec`` sealed, and the caller must open it with its
own key); any other cell gets exactly what a missing record or an unknown feed gets
(404 / empty page / no event) and never a payload. ``/v1/feeds`` also lists ``sec``'s
head (never its content) to every authenticated caller. Each test evaluates every cell,
then fails naming each failed one (path x level x caller @ node).
"""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
from yarl import URL

from citynode.bundle import iter_bundle
from citynode.client import plaintext
from citynode.cluster import Cluster, LocalNode
from citynode.core import httpsig, sync
from citynode.core.checkpoints import (
    open_checkpoint,
    root_of,
    verify_consistency,
    verify_inclusion,
)
from citynode.core.keybook import KeyBook
from citynode.core.keys import NodeKey, SigningKey, Verifier, parse_node_id
from citynode.core.records import Record, decode_record, open_record, with_payload
from citynode.core.sealed import is_recipient
from citynode.errors import PeerRejected
from citynode.identity import keylog_identity, load_identity
from citynode.transport.client import PeerClient
from tests.conftest import eventually

pytestmark = pytest.mark.integration

FAST = {("federation", "pull_interval_seconds"): 1.0,
        ("federation", "backoff_max_seconds"): 2.0,
        ("checkpoints", "interval_seconds"): 1.0}
TYPE = "org.example.Test"
FEEDS = {"pub": "public", "priv": "partners", "sec": "restricted"}
# A payload marker per feed: finding one in an answer means the payload was served.
MARK = {"pub": "pub-clear-7f3a", "priv": "priv-secret-91c2", "sec": "sec-secret-4be8"}
CALLERS = ["anonymous", "origin", "relay", "partner", "reader", "stranger"]
JSON_T = "application/json"
MSGPACK_T = "application/msgpack"
MISSING_ID = "ab" * 32
FEED_ENTRY_KEYS = {"origin", "feed", "seq", "head", "count", "last_time"}


def may_read(level: str, caller: str) -> bool:
    """The expected answer of every read-path cell (core/access.py, as documented)."""
    if level == "public" or caller == "origin":
        return True
    if level == "partners":
        return caller in ("relay", "partner")
    return caller == "reader"


def may_read_feed(level: str, caller: str, at: str) -> bool:
    """The checkpoint reads (``/v1/checkpoints``, consistency proofs) follow the feed's
    latest record held: at a relay, a restricted feed's readers are its recipients
    (docs/PROTOCOL.md, "Access levels"), so the reader reads them there too."""
    del at  # the same everywhere
    return may_read(level, caller)


def may_list(level: str, caller: str) -> bool:
    """``/v1/feeds``: readable feeds, and restricted heads to any authenticated caller."""
    return may_read(level, caller) or (level == "restricted" and caller != "anonymous")


# ------------------------------------------------------------------ the world


@dataclass
class World:
    nodes: dict[str, LocalNode]  # "origin", "relay", "partner", "reader"
    keys: dict[str, SigningKey | None]  # caller -> the key it signs with
    ids: dict[str, list[bytes]] = field(default_factory=dict)  # feed -> ids, seq order
    envs: dict[bytes, bytes] = field(default_factory=dict)  # id -> envelope

    @property
    def origin_id(self) -> str:
        return self.nodes["origin"].node_id


def _add_feeds(n: LocalNode, reader: LocalNode) -> None:
    with open(n.dir / "node.toml", "a") as f:
        f.write('\n[feeds.pub]\naccess = "public"\n')
        f.write('\n[feeds.priv]\naccess = "partners"\n')
        f.write(f'\n[feeds.sec]\naccess = "restricted"\nreaders = ["{reader.node_id}"]\n')


async def _world(cluster: Cluster, running: list[str]) -> World:
    """Create Origin, Relay, Partner, Reader; start the ``running`` ones; link Origin with
    Partner and Relay (and Relay with Reader when Reader runs)."""
    o, p, q, r = cluster.create(["Origin", "Relay", "Partner", "Reader"], settings=FAST)
    nodes = {"origin": o, "relay": p, "partner": q, "reader": r}
    _add_feeds(o, r)
    await cluster.start([nodes[name] for name in running])
    if "partner" in running:  # first: Relay then learns a card listing both partners
        await cluster.link(o, q)
    await cluster.link(o, p)
    if "reader" in running:
        await cluster.link(p, r)
    else:
        # A reader that is nobody's partner: Origin's operator imports its key log (its
        # records are sealed to the key the log names).
        s = await o.session()
        async with s.post(f"{o.url}/v1/keylog?origin={r.node_id}",
                          data=(r.dir / "keylog").read_bytes(),
                          headers={"Authorization": f"Bearer {o.token}"}) as resp:
            assert resp.status == 200, await resp.text()
    keys: dict[str, SigningKey | None] = {
        name: load_identity(nodes[name].dir).key for name in ("origin", "relay", "partner",
                                                              "reader")}
    for n in nodes.values():
        log = (n.dir / "keylog").read_bytes()
        _KEYS.restore(keylog_identity(log), log, verifier=Verifier())
    keys["anonymous"] = None
    keys["stranger"] = SigningKey.generate()
    return World(nodes, keys)


async def _publish(w: World, feed: str, seqs: range) -> None:
    """Origin publishes one record per seq (retrying while its first sync rounds with
    partners are not over: publishing waits for them); keeps the ids and envelopes."""
    o = w.nodes["origin"]
    items = [{"note": MARK[feed], "n": i} for i in seqs]
    for _ in range(100):
        try:
            out = await o.publish(feed, TYPE, items)
            break
        except PeerRejected as exc:
            if exc.status != 409:
                raise
            await asyncio.sleep(0.2)
    else:
        pytest.fail(f"Origin refused to publish on {feed} for 20 s")
    assert (out["first_seq"], out["last_seq"]) == (seqs[0], seqs[-1]), out
    for rid in out["ids"]:
        env = await o.api("GET", f"/v1/records/{rid}", raw=True)
        w.ids.setdefault(feed, []).append(bytes.fromhex(rid))
        w.envs[bytes.fromhex(rid)] = env


async def _holds(n: LocalNode, origin: str, want: dict[str, int]) -> bool:
    """Does ``n`` hold at least seq ``want[feed]`` of each feed of ``origin``?"""
    got = {f["feed"]: f["seq"] for f in await n.feeds() if f["origin"] == origin}
    return all(got.get(feed, 0) >= seq for feed, seq in want.items())


async def _checkpointed(n: LocalNode, origin: str, feed: str, size: int) -> bool:
    try:
        out = await n.api("GET", f"/v1/checkpoints?origin={origin}&feed={feed}")
    except PeerRejected:
        return False
    return any(c["size"] == size for c in out["checkpoints"])


# ------------------------------------------------------------------ requests and checks


def _now_ms() -> int:
    return int(time.time() * 1000)


async def _get(n: LocalNode, key: SigningKey | None, path_qs: str, accept: str = JSON_T
               ) -> tuple[int, bytes]:
    """A GET sent exactly as written, signed by ``key`` for ``n`` (or anonymous)."""
    headers = {"Accept": accept}
    if key is not None:
        headers.update(httpsig.sign_request(key, "GET", path_qs, b"", _now_ms(),
                                            target=n.node_id))
        if isinstance(key, NodeKey) and key.log is not None:  # as the Client sends it
            headers[httpsig.KEYLOG_HEADER] = base64.b64encode(key.log).decode("ascii")
    s = await n.session()
    async with s.get(URL(n.url + path_qs, encoded=True), headers=headers) as r:
        return r.status, await r.read()


_KEYS = KeyBook()  # the key logs of the world's nodes (all cn2)


def _open(env: bytes) -> Record:
    body, sig, payload = decode_record(env)
    return open_record(body, sig, payload, now_ms=2**62, verifier=Verifier(),
                       key_states=_KEYS.state)


def _payload_problem(rec: Record, feed: str, key: SigningKey | None) -> str | None:
    """None if ``rec`` (verified) is the feed's record as the caller must see it: ``sec``
    sealed and opened by the caller's own key, the others in clear."""
    if feed != "sec":
        ok = rec.sealed is None and rec.data.get("note") == MARK[feed]
        return None if ok else f"payload not the published one: {rec.data!r}"
    if rec.sealed is None or rec.type != "sealed":
        return "a restricted record served unsealed"
    if key is None or not is_recipient(rec.sealed, key.public_key):
        return "a restricted record served to a caller that is none of its readers"
    inner = plaintext(rec, key)
    if inner.data.get("note") != MARK["sec"]:
        return f"the seal opened to {inner.data!r}"
    return None


def _json_record_problem(j: dict[str, Any], feed: str, rid: bytes, env: bytes,
                         key: SigningKey | None) -> str | None:
    if j.get("id") != rid.hex() or base64.b64decode(j.get("envelope", "")) != env:
        return f"another record: {j.get('id')}"
    if feed == "sec" and (j.get("type") != "sealed" or "data" in j):
        return f"restricted record rendered unsealed: {j}"
    if feed != "sec" and j.get("data", {}).get("note") != MARK[feed]:
        return f"payload not the published one: {j.get('data')!r}"
    return _payload_problem(_open(env), feed, key)


class Matrix:
    """Cells evaluated, and the failures, each naming its cell."""

    def __init__(self) -> None:
        self.cells: set[str] = set()
        self.failures: list[str] = []

    async def cell(self, name: str, check: Callable[[], Awaitable[str | None]]) -> None:
        """Run one cell's check; a problem (or an exception) is a failure of that cell."""
        self.cells.add(name)
        try:
            problem = await check()
        except Exception as exc:  # report the cell, not a traceback of the first one
            problem = f"raised {exc.__class__.__name__}: {exc}"
        if problem is not None:
            self.failures.append(f"{name}: {problem}")

    def verdict(self, expected_cells: int) -> None:
        assert len(self.cells) == expected_cells, (len(self.cells), expected_cells)
        assert not self.failures, (f"{len(self.failures)} of {len(self.cells)} cells "
                                   "failed:\n" + "\n".join(sorted(self.failures)))


# ------------------------------------------------------------------ read paths


@dataclass
class Baseline:
    """What a caller gets for a record or feed that does not exist: a hidden one must
    look exactly the same (the API does not confirm that it exists)."""

    missing_get: tuple[int, bytes]
    missing_get_msgpack: tuple[int, bytes]
    unknown_checkpoints: tuple[int, bytes]
    missing_inclusion: tuple[int, bytes]
    unknown_consistency: tuple[int, bytes]


async def _baseline(n: LocalNode, origin: str) -> Baseline:
    b = Baseline(
        await _get(n, None, f"/v1/records/{MISSING_ID}"),
        await _get(n, None, f"/v1/records/{MISSING_ID}", MSGPACK_T),
        await _get(n, None, f"/v1/checkpoints?origin={origin}&feed=nosuch"),
        await _get(n, None, f"/v1/proofs/inclusion?id={MISSING_ID}"),
        await _get(n, None, f"/v1/proofs/consistency?origin={origin}&feed=nosuch&old=1&new=2"),
    )
    for status, _body in (b.missing_get, b.unknown_checkpoints, b.missing_inclusion,
                          b.unknown_consistency):
        assert status == 404, b
    return b


def _hidden(got: tuple[int, bytes], like: tuple[int, bytes]) -> str | None:
    return None if got == like else f"expected the answer to a missing one {like}, got {got}"


async def _read_cells(w: World, m: Matrix, at: str, caller: str, base: Baseline) -> None:
    """Every non-stream read path x level for one caller at one node."""
    n, key, origin = w.nodes[at], w.keys[caller], w.origin_id

    def name(path: str, level: str) -> str:
        return f"{path} x {level} x {caller} @{at}"

    async def get(path_qs: str, accept: str = JSON_T) -> tuple[int, bytes]:
        status, body = await _get(n, key, path_qs, accept)
        # Whatever the cell: the read API never serves the restricted payload in clear.
        assert MARK["sec"].encode() not in body, (path_qs, body[:300])
        return status, body

    for feed, level in FEEDS.items():
        allowed = may_read(level, caller)
        feed_allowed = may_read_feed(level, caller, at)
        rid, env = w.ids[feed][0], w.envs[w.ids[feed][0]]
        envs = [w.envs[i] for i in w.ids[feed]]

        async def get_msgpack(rid: bytes = rid, env: bytes = env, feed: str = feed,
                              allowed: bool = allowed) -> str | None:
            got = await get(f"/v1/records/{rid.hex()}", MSGPACK_T)
            if not allowed:
                return _hidden(got, base.missing_get_msgpack)
            if got != (200, env):
                return f"expected the envelope, got {got[0]} {got[1][:200]!r}"
            return _payload_problem(_open(got[1]), feed, key)

        async def get_json(rid: bytes = rid, env: bytes = env, feed: str = feed,
                           allowed: bool = allowed) -> str | None:
            got = await get(f"/v1/records/{rid.hex()}")
            if not allowed:
                return _hidden(got, base.missing_get)
            if got[0] != 200:
                return f"expected 200, got {got}"
            return _json_record_problem(json.loads(got[1]), feed, rid, env, key)

        async def query_json(feed: str = feed, allowed: bool = allowed) -> str | None:
            status, body = await get(f"/v1/records?origin={origin}&feed={feed}")
            page = json.loads(body)
            if status != 200:
                return f"expected 200, got {status} {page}"
            if not allowed:
                return None if page == {"records": [], "next": None} else f"got {page}"
            if [r["id"] for r in page["records"]] != [i.hex() for i in w.ids[feed]]:
                return f"expected the feed's records, got {page}"
            for r, i in zip(page["records"], w.ids[feed], strict=True):
                problem = _json_record_problem(r, feed, i, w.envs[i], key)
                if problem:
                    return problem
            return None

        async def query_msgpack(feed: str = feed, allowed: bool = allowed,
                                envs: list[bytes] = envs) -> str | None:
            status, body = await get(f"/v1/records?origin={origin}&feed={feed}", MSGPACK_T)
            if status != 200:
                return f"expected 200, got {status} {body[:200]!r}"
            page = msgpack.unpackb(body, raw=False)
            if not allowed:
                return None if page == {"records": [], "next": None} else f"got {page}"
            if page != {"records": envs, "next": None}:
                return f"expected the feed's envelopes, got {len(page['records'])}"
            for e in page["records"]:
                problem = _payload_problem(_open(e), feed, key)
                if problem:
                    return problem
            return None

        async def checkpoints(feed: str = feed, allowed: bool = feed_allowed) -> str | None:
            got = await get(f"/v1/checkpoints?origin={origin}&feed={feed}")
            if not allowed:
                return _hidden(got, base.unknown_checkpoints)
            if got[0] != 200:
                return f"expected 200, got {got}"
            held = json.loads(got[1])["checkpoints"]
            cps = [open_checkpoint(base64.b64decode(c["envelope"]), verifier=Verifier(),
                                   key_states=_KEYS.state)
                   for c in held]
            if not cps or any((c.origin, c.feed) != (parse_node_id(origin), feed) for c in cps):
                return f"expected the origin's checkpoints of {feed}, got {held}"
            size2 = [c for c in cps if c.size == 2]
            if not size2 or size2[0].root != root_of(w.ids[feed][:2]):
                return "no checkpoint of size 2 with the root of the records published"
            return None

        async def inclusion(rid: bytes = rid, feed: str = feed,
                            allowed: bool = allowed) -> str | None:
            got = await get(f"/v1/proofs/inclusion?id={rid.hex()}")
            if not allowed:
                return _hidden(got, base.missing_inclusion)
            if got[0] != 200:
                return f"expected 200, got {got}"
            p = json.loads(got[1])
            cp = open_checkpoint(base64.b64decode(p["checkpoint"]), verifier=Verifier(),
                                 key_states=_KEYS.state)
            if (cp.origin, cp.feed, cp.size) != (parse_node_id(origin), feed, p["size"]):
                return f"proof anchored on another checkpoint: {p}"
            verify_inclusion(rid, p["index"], p["size"], [bytes.fromhex(h) for h in p["path"]],
                             cp.root)
            return None

        async def consistency(feed: str = feed, allowed: bool = feed_allowed
                              ) -> str | None:
            got = await get(f"/v1/proofs/consistency?origin={origin}&feed={feed}&old=1&new=2")
            if not allowed:
                return _hidden(got, base.unknown_consistency)
            if got[0] != 200:
                return f"expected 200, got {got}"
            p = json.loads(got[1])
            new_root = bytes.fromhex(p["new_root"])
            if new_root != root_of(w.ids[feed][:2]):
                return f"the new root is not the root of the records published: {p}"
            verify_consistency(1, 2, bytes.fromhex(p["old_root"]), new_root,
                               [bytes.fromhex(h) for h in p["path"]])
            return None

        async def feeds(feed: str = feed, level: str = level) -> str | None:
            status, body = await get("/v1/feeds")
            listed = {f["feed"]: f for f in json.loads(body)["feeds"] if f["origin"] == origin}
            if status != 200:
                return f"expected 200, got {status}"
            if (feed in listed) != may_list(level, caller):
                return f"listed: {sorted(listed)}"
            entry = listed.get(feed)
            if entry is not None and (set(entry) != FEED_ENTRY_KEYS or entry["seq"] != 2):
                return f"the entry is more than a head: {entry}"
            return None

        for path, check in [("get(msgpack)", get_msgpack), ("get(json)", get_json),
                            ("query(json)", query_json), ("query(msgpack)", query_msgpack),
                            ("checkpoints", checkpoints), ("proofs/inclusion", inclusion),
                            ("proofs/consistency", consistency), ("feeds", feeds)]:
            await m.cell(name(path, level), check)


# ------------------------------------------------------------------ streams


@dataclass
class Stream:
    at: str
    caller: str
    fmt: str
    events: list[tuple[int, bytes]] = field(default_factory=list)  # (cursor, data)
    error: str | None = None


SENTINEL = ("pub", 4)  # the last record Origin publishes: every caller may read it


async def _follow(w: World, s: Stream) -> None:
    """Read a stream (``origin=``, ``after=0``) until the sentinel record arrives."""
    n, key = w.nodes[s.at], w.keys[s.caller]
    path = f"/v1/stream?origin={w.origin_id}&after=0&format={s.fmt}"
    headers = {"Accept": "text/event-stream"}
    if key is not None:
        headers.update(httpsig.sign_request(key, "GET", path, b"", _now_ms(),
                                            target=n.node_id))
        if isinstance(key, NodeKey) and key.log is not None:  # as the Client sends it
            headers[httpsig.KEYLOG_HEADER] = base64.b64encode(key.log).decode("ascii")
    sess = await n.session()
    async with sess.get(URL(n.url + path, encoded=True), headers=headers) as r:
        if r.status != 200:
            s.error = f"stream refused: {r.status} {await r.read()!r}"
            return
        event: dict[str, str] = {}
        async for raw in r.content:
            line = raw.decode().rstrip("\r\n")
            if line:
                if not line.startswith(":"):  # a comment is a keep-alive ping
                    k, _, v = line.partition(": ")
                    event[k] = v
                continue
            if event.get("event") == "record":
                data = event["data"].encode()
                s.events.append((int(event["id"]), data))
                rec = _open(_event_envelope(data))
                if (rec.feed, rec.seq) == SENTINEL:
                    return
            event = {}


def _event_envelope(data: bytes) -> bytes:
    if data.startswith(b"{"):
        return base64.b64decode(json.loads(data)["envelope"])
    return base64.b64decode(data, validate=True)


async def _live_streams(n: LocalNode) -> int:
    text = (await n.api("GET", "/metrics", raw=True)).decode()
    for line in text.splitlines():
        if line.startswith("citynode_live_streams "):
            return int(float(line.split()[1]))
    raise AssertionError("no citynode_live_streams in /metrics")


def _stream_cell(w: World, s: Stream, feed: str) -> str | None:
    if s.error is not None:
        return s.error
    key = w.keys[s.caller]
    got: list[bytes] = []
    for _cursor, data in s.events:
        assert MARK["sec"].encode() not in data, data[:300]
        env = _event_envelope(data)
        rec = _open(env)
        if rec.feed != feed:
            continue
        if s.fmt == "json":
            problem = _json_record_problem(json.loads(data), feed, rec.id, env, key)
        else:
            problem = _payload_problem(rec, feed, key)
        if problem:
            return problem
        got.append(rec.id)
    if not may_read(FEEDS[feed], s.caller):
        return None if not got else f"expected no event, got {len(got)} of the feed"
    if got != w.ids[feed]:
        return f"expected seqs 1..{len(w.ids[feed])} once each, got {len(got)} event(s)"
    return None


# ------------------------------------------------------------------ tests


async def test_every_read_path_at_the_origin_and_at_a_relay(cluster: Cluster) -> None:
    """get (msgpack, JSON), query (JSON, msgpack), checkpoints, inclusion and consistency
    proofs, /v1/feeds, and streams (JSON and envelope, replayed with after=0 and live) x
    public / partners / restricted x six callers, at Origin and at Relay (which applies
    Origin's card): exactly the allowed cells get the records, sealed where restricted
    and opened by the caller's own key; every other cell gets what a missing record gets."""
    w = await _world(cluster, ["origin", "relay", "partner"])
    o, relay = w.nodes["origin"], w.nodes["relay"]
    for feed in FEEDS:
        await _publish(w, feed, range(1, 3))

    async def settled() -> bool:
        if not await _holds(relay, w.origin_id, dict.fromkeys(FEEDS, 2)):
            return False
        for n in (o, relay):
            for feed in FEEDS:
                if not await _checkpointed(n, w.origin_id, feed, 2):
                    return False
        return True

    await eventually(settled, timeout=30)
    m = Matrix()
    for at in ("origin", "relay"):
        base = await _baseline(w.nodes[at], w.origin_id)
        for caller in CALLERS:
            await _read_cells(w, m, at, caller, base)

    # Streams: opened before the last records exist, so they replay seq 1..2 from the
    # database and get seq 3 (and the sentinel) live from the tail.
    streams = [Stream(at, caller, fmt) for at in ("origin", "relay") for caller in CALLERS
               for fmt in ("json", "envelope")]

    async def all_open() -> bool:
        return [await _live_streams(n) for n in (o, relay)] == [len(streams) // 2] * 2

    tasks = [asyncio.create_task(_follow(w, s)) for s in streams]
    try:
        await eventually(all_open, timeout=20)
        for feed in FEEDS:
            await _publish(w, feed, range(3, 4))
        await eventually(lambda: _holds(relay, w.origin_id, dict.fromkeys(FEEDS, 3)),
                         timeout=30)
        await _publish(w, "pub", range(4, 5))  # the sentinel
        await asyncio.wait(tasks, timeout=30)
        for s, t in zip(streams, tasks, strict=True):
            if not t.done():
                s.error = f"no sentinel within 30 s ({len(s.events)} event(s) before)"
            elif t.exception() is not None:
                s.error = f"the stream broke: {t.exception()!r}"
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for s in streams:
        for feed, level in FEEDS.items():
            await m.cell(f"stream({s.fmt}) x {level} x {s.caller} @{s.at}",
                         _async(_stream_cell, w, s, feed))
    m.verdict(expected_cells=2 * len(CALLERS) * len(FEEDS) * 10)


def _async(fn: Callable[..., str | None], *args: Any) -> Callable[[], Awaitable[str | None]]:
    async def run() -> str | None:
        return fn(*args)

    return run


# ------------------------------------------------------------------ push, pull, export


async def _sync_completed_ms(n: LocalNode, partner: LocalNode) -> int:
    """When ``n`` last ended an exchange with ``partner`` well (ms). Reader never pushes
    to Relay (it has nothing Relay lacks), so for Reader that is its last sync round."""
    out = await n.api("GET", "/v1/admin/partners")
    (row,) = [p for p in out["partners"] if p["node_id"] == partner.node_id]
    return int(row["last_ok_ms"] or 0)


def _db_bytes(n: LocalNode) -> bytes:
    """Every byte of the node's SQLite files (database and write-ahead log)."""
    return b"".join(p.read_bytes() for p in sorted(n.dir.glob("citynode.db*")))


def _held_rows(n: LocalNode, origin: str) -> dict[str, list[tuple[int, str, bytes]]]:
    """(seq, stored type, envelope) per feed of ``origin`` in the node's SQLite file."""
    db = sqlite3.connect(f"file:{n.dir / 'citynode.db'}?mode=ro", uri=True)
    try:
        # the skeleton and, in its own table, the payload (storage.py, schema v4)
        rows = db.execute("SELECT c.feed, r.seq, t.type, r.envelope, p.payload FROM records"
                          " AS r JOIN chains AS c ON c.id = r.chain JOIN types AS t"
                          " ON t.id = r.type_id LEFT JOIN payloads AS p ON p.rowid = r.rowid"
                          " WHERE c.origin = ? ORDER BY c.feed, r.seq",
                          (parse_node_id(origin),)).fetchall()
    finally:
        db.close()
    out: dict[str, list[tuple[int, str, bytes]]] = {}
    for feed, seq, type_, env, payload in rows:
        out.setdefault(feed, []).append((seq, type_, with_payload(bytes(env), payload)))
    return out


async def _export(n: LocalNode, origin: str, out: Path, *extra: str) -> tuple[int, str, str]:
    """``citynode export -d DIR --origin ID --out FILE [extra]`` as a real process."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "citynode", "export", "-d", str(n.dir), "--origin", origin,
        "--out", str(out), *extra, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


def _bundle_records(path: Path) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for item in iter_bundle(path):
        if item.kind == "record":
            out.setdefault(_open(item.data).feed, []).append(item.data)
    return out


async def test_push_pull_and_export_keep_partners_records_with_the_origins_partners(
        cluster: Cluster, tmp_path: Path) -> None:
    """Reader is a partner of Relay but not of Origin: after push and sync rounds it holds
    ``pub`` and ``sec`` (sealed, opened by its operator) and no byte of ``priv``, while
    Relay, Origin's partner, holds all three (``sec`` sealed). Relay's answers to Reader's
    signed /v1/fetch carry no ``priv`` record (to Origin they do); its /v1/sync answer
    carries heads, never records. ``citynode export`` (an operator tool) leaves ``priv``
    out unless given --include-partners (then in clear, with a note naming it), writes
    ``sec`` sealed, and at Reader there is no ``priv`` at all."""
    w = await _world(cluster, ["origin", "relay", "reader"])
    relay, reader = w.nodes["relay"], w.nodes["reader"]
    origin = w.origin_id
    for feed in FEEDS:  # pushed by Origin, then by Relay, as they are stored
        await _publish(w, feed, range(1, 3))
    await eventually(lambda: _holds(relay, origin, dict.fromkeys(FEEDS, 2)), timeout=30)
    # The controls: what Reader may get, it gets (so the relay path works at all).
    await eventually(lambda: _holds(reader, origin, {"pub": 2, "sec": 2}), timeout=30)
    # Two of Reader's sync rounds with Relay end after Relay holds everything: the second
    # began after it, so it saw Relay's whole frontier and asked for what it lacks.
    t = _now_ms()
    for _ in range(2):
        async def round_ended(after: int = t) -> bool:
            return await _sync_completed_ms(reader, relay) > after

        await eventually(round_ended, timeout=30)
        t = await _sync_completed_ms(reader, relay)
    m = Matrix()

    # ---- push and pull, as seen by Reader: its SQLite file and its operator API.
    rows = _held_rows(reader, origin)
    db = _db_bytes(reader)
    listed = {f["feed"] for f in await reader.feeds() if f["origin"] == origin}
    for feed, level in FEEDS.items():
        async def held(feed: str = feed, level: str = level) -> str | None:
            page = await reader.api("GET", f"/v1/records?origin={origin}&feed={feed}")
            if level == "partners":
                if feed in rows or feed in listed or page["records"]:
                    return f"Reader holds partners-only records: {rows.get(feed)}"
                if MARK[feed].encode() in db:
                    return "the payload is in Reader's database files"
                return None
            envs = [env for _s, _t, env in rows.get(feed, [])]
            if envs != [w.envs[i] for i in w.ids[feed]] or feed not in listed:
                return f"Reader lacks records it may hold: {len(envs)}"
            if level == "restricted":
                if {t for _s, t, _e in rows[feed]} != {"sealed"} or MARK[feed].encode() in db:
                    return "a restricted record is stored unsealed at Reader"
                # Reader is a reader: its operator gets them decrypted.
                if [r["data"]["note"] for r in page["records"] if r.get("decrypted")] != \
                        [MARK[feed]] * len(envs):
                    return f"Reader's operator cannot open them: {page['records']}"
            return None

        await m.cell(f"push+pull x {level} x reader(partner of relay only) @reader", held)

    # ... and by Relay, a partner of the origin: every feed, the restricted one sealed.
    relay_rows, relay_db = _held_rows(relay, origin), _db_bytes(relay)
    for feed, level in FEEDS.items():
        async def relayed(feed: str = feed) -> str | None:
            envs = [env for _s, _t, env in relay_rows.get(feed, [])]
            if envs != [w.envs[i] for i in w.ids[feed]]:
                return f"Relay lacks records it may hold: {len(envs)}"
            if feed == "sec" and ({t for _s, t, _e in relay_rows[feed]} != {"sealed"}
                                  or MARK[feed].encode() in relay_db):
                return "a restricted record is stored unsealed at Relay"
            return None

        await m.cell(f"push+pull x {level} x relay(partner of origin) @relay", relayed)

    # ---- pull, asked directly of Relay: /v1/fetch and /v1/sync signed by its partners.
    for who in ("reader", "origin"):
        key = w.keys[who]
        assert key is not None
        peer = PeerClient(key, relay.url, node_id=relay.node_id, fingerprint=relay.fingerprint)
        try:
            for feed, level in FEEDS.items():
                async def fetch(feed: str = feed, level: str = level, who: str = who,
                                peer: PeerClient = peer) -> str | None:
                    envs = await peer.fetch(sync.encode_wants(
                        [sync.Want(parse_node_id(origin), feed, 1, 2)]))
                    allowed = level != "partners" or who == "origin"
                    expected = [w.envs[i] for i in w.ids[feed]] if allowed else []
                    if envs != expected:
                        return f"expected {len(expected)} envelope(s), got {len(envs)}"
                    for e in envs:
                        problem = _payload_problem(_open(e), feed, w.keys[who])
                        if problem:
                            return problem
                    return None

                await m.cell(f"pull(/v1/fetch) x {level} x {who} @relay", fetch)

            async def frontier(peer: PeerClient = peer) -> str | None:
                raw = await peer.sync(sync.encode_frontier({}))
                heads = sync.decode_frontier(raw)  # heads: (seq, 32-byte id), no records
                if any(MARK[f].encode() in raw for f in FEEDS):
                    return "a payload in the sync answer"
                if any(e in raw for e in w.envs.values()):
                    return "a record in the sync answer"
                return None if heads else "an empty frontier"

            await m.cell(f"pull(/v1/sync) x all levels x {who} @relay", frontier)
        finally:
            await peer.close()

    # ---- citynode export at Origin and Relay and Reader (which holds no priv): by
    # default the partners feed (in clear) is left out; --include-partners puts it in.
    code, text_out, text_err = await _export(relay, origin, tmp_path / "text.bundle")
    assert code == 0, (text_out, text_err)
    for at in ("origin", "relay", "reader"):
        for include in (False, True):
            path = tmp_path / f"{at}-{include}.bundle"
            code, out, err = await _export(w.nodes[at], origin, path, "--json",
                                           *(["--include-partners"] if include else []))
            assert code == 0, (out, err)
            summary = json.loads(out)
            bundle = _bundle_records(path)
            raw = path.read_bytes()
            for feed, level in FEEDS.items():
                async def exported(feed: str = feed, level: str = level, at: str = at,
                                   include: bool = include,
                                   summary: dict[str, Any] = summary,
                                   bundle: dict[str, list[bytes]] = bundle,
                                   raw: bytes = raw) -> str | None:
                    held_here = at != "reader" or level != "partners"
                    wanted = held_here and (include or level != "partners")
                    expected = [w.envs[i] for i in w.ids[feed]] if wanted else []
                    if bundle.get(feed, []) != expected:
                        return f"bundle holds {len(bundle.get(feed, []))} record(s)"
                    if summary["feeds"].get(feed, 0) != len(expected):
                        return f"summary says {summary['feeds']}"
                    noted = {"feed": feed, "access": level} in summary["not_public"]
                    if noted != (level != "public" and wanted):
                        return f"not_public is {summary['not_public']}"
                    left = {"feed": feed, "access": level} in summary["left_out_not_public"]
                    if left != (level == "partners" and held_here and not include):
                        return f"left_out_not_public is {summary['left_out_not_public']}"
                    # Partners records are in clear (when asked for), restricted sealed.
                    in_clear = MARK[feed].encode() in raw
                    if in_clear != (level != "restricted" and wanted):
                        return f"payload in clear in the bundle: {in_clear}"
                    if level == "partners" and at == "relay" and \
                            f"{feed} (partners)" not in text_err:
                        return f"no note naming the partners feed: {text_err!r}"
                    return None

                flag = " --include-partners" if include else ""
                await m.cell(f"export{flag} x {level} x operator @{at}", exported)
    m.verdict(expected_cells=2 * 3 + 2 * 3 + 2 + 3 * 3 * 2)


async def test_a_partners_feed_is_not_even_named_beyond_the_origins_partners(
        cluster: Cluster) -> None:
    """Beyond the records: the relay's sync answer (its frontier) to Reader, and the
    checkpoints it forwards, leave out the partners feed; the public and restricted
    ones are there. (Named, Reader would also ask for it in vain every round.)"""
    w = await _world(cluster, ["origin", "relay", "reader"])
    relay, reader = w.nodes["relay"], w.nodes["reader"]
    for feed in FEEDS:
        await _publish(w, feed, range(1, 3))
    await eventually(lambda: _holds(reader, w.origin_id, {"pub": 2, "sec": 2}), timeout=30)
    await eventually(lambda: _checkpointed(reader, w.origin_id, "pub", 2), timeout=30)
    await eventually(lambda: _checkpointed(reader, w.origin_id, "sec", 2), timeout=30)
    assert await _checkpointed(relay, w.origin_id, "priv", 2)
    origin = parse_node_id(w.origin_id)
    for signer, answer_has_priv in (("reader", False), ("origin", True)):
        key = w.keys[signer]
        assert key is not None
        peer = PeerClient(key, relay.url, node_id=relay.node_id, fingerprint=relay.fingerprint)
        try:
            got = sync.decode_frontier(await peer.sync(sync.encode_frontier({})))
        finally:
            await peer.close()
        feeds = {f for (o, f) in got if o == origin}
        assert feeds == ({"pub", "priv", "sec"} if answer_has_priv else {"pub", "sec"}), (
            signer, feeds)
    with pytest.raises(PeerRejected) as e:  # none held: as for a feed never heard of
        await reader.api("GET", f"/v1/checkpoints?origin={w.origin_id}&feed=priv")
    assert e.value.status == 404
