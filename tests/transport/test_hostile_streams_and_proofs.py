"""Hostile input to the read API: /v1/records and /v1/stream query strings, the proof
endpoints, access on compact (``format=envelope``) streams, and streams opened and
dropped in quick succession -- against a real in-process node over real HTTPS.

Every answer asserted is a specific 4xx with a useful message (never a 500, never a
hang, never a record the caller may not read).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from citynode.core import httpsig
from citynode.core.keys import SigningKey
from citynode.core.records import Record, decode_record, parse_body
from citynode.node import Node
from citynode.transport.server import serve
from tests.conftest import InProc, eventually, make_node_dir

TYPE = "org.example.Test"
NO_WAIT = aiohttp.ClientTimeout(total=None)
SHORT = aiohttp.ClientTimeout(total=10)
JSON_ACCEPT = {"Accept": "application/json"}


@dataclass
class World:
    """A node with a public feed ``a`` (5 records), a ``partners`` feed ``priv`` (3) and a
    ``restricted`` feed ``sec`` (3, sealed to ``reader``), checkpointed."""

    n: InProc
    reader: SigningKey
    stranger: SigningKey
    pub: list[Record]
    priv: list[Record]
    sec: list[Record]

    @property
    def origin(self) -> str:
        return self.n.node.node_id


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    reader, stranger = SigningKey.generate(), SigningKey.generate()
    d = make_node_dir(tmp_path, "Hostile")
    with open(d / "node.toml", "a") as f:
        f.write('\n[feeds.priv]\naccess = "partners"\n')
        f.write(f'\n[feeds.sec]\naccess = "restricted"\nreaders = ["{reader.node_id}"]\n')
    node = Node.load(d)
    await node.start()
    runner = await serve(node, host="127.0.0.1", port=node.config.node.listen_port)
    n = InProc(node, runner)
    try:
        pub = await node.publish("a", TYPE, [{"n": i} for i in range(5)])
        priv = await node.publish("priv", TYPE, [{"n": i} for i in range(3)])
        sec = await node.publish("sec", TYPE, [{"n": i} for i in range(3)])
        await node.checkpoints.checkpoint_now()
        yield World(n, reader, stranger, pub, priv, sec)
    finally:
        await n.close()


# ------------------------------------------------------------------ helpers


async def _get(n: InProc, path_qs: str, headers: dict[str, str] | None = None
               ) -> tuple[int, str, Any]:
    """``(status, content type, JSON body or text)`` of a GET sent exactly as written
    (``encoded=True``: no re-quoting by the client). Never waits more than 10 s."""
    async with n.session.get(URL(n.url + path_qs, encoded=True),
                             headers={**JSON_ACCEPT, **(headers or {})}, timeout=SHORT) as r:
        if r.content_type == "application/json":
            return r.status, r.content_type, await r.json()
        # A stream that opened: do not read it (it would not end); say so.
        if r.content_type == "text/event-stream":
            return r.status, r.content_type, None
        return r.status, r.content_type, await r.text()


def _assert_400(status: int, ctype: str, body: Any, fragment: str,
                reason: str = "bad_request") -> None:
    assert status == 400, (status, body)
    assert ctype == "application/json", (ctype, body)
    assert body["error"] == reason, body
    assert fragment in body["message"], body


def _signed(key: SigningKey, n: InProc, path_qs: str) -> dict[str, str]:
    return httpsig.sign_request(key, "GET", path_qs, b"", n.node.now_ms(),
                                target=n.node.node_id)


def _feed_of(data: bytes) -> str:
    """The feed of an SSE event's data: a JSON record or a base64 envelope."""
    if data.startswith(b"{"):
        return str(json.loads(data)["feed"])
    return str(parse_body(decode_record(base64.b64decode(data))[0])["feed"])


async def _collect(n: InProc, path_qs: str, out: list[tuple[int, bytes]],
                   headers: dict[str, str] | None = None) -> None:
    """Append ``(cursor, data)`` of each record event of a stream to ``out`` until the
    stream ends."""
    async with n.session.get(URL(n.url + path_qs, encoded=True), headers={
            "Accept": "text/event-stream", **(headers or {})}, timeout=NO_WAIT) as r:
        assert r.status == 200, (path_qs, r.status, await r.text())
        buf = b""
        while True:
            chunk = await r.content.readany()
            if not chunk:
                return
            buf += chunk
            *events, buf = buf.split(b"\r\n\r\n")
            for ev in events:
                if ev.startswith(b":"):
                    continue  # keep-alive ping
                fields = dict(line.split(b": ", 1) for line in ev.split(b"\r\n"))
                if fields.keys() == {b"id"}:  # the cursor the stream starts after
                    continue
                assert fields[b"event"] == b"record", ev
                out.append((int(fields[b"id"]), fields[b"data"]))


def _client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # a throwaway loopback client: the test's own node
    return ctx


# ------------------------------------------------------------------ filters (both paths)

# (query, reason code, fragment of the message): every one a 400 before anything runs.
BAD_FILTERS = [
    ("feed=Bad%20Feed", "bad_request", "feed is not a valid feed name"),
    ("feed=%FF", "bad_request", "feed is not a valid feed name"),
    ("feed=a%00", "bad_request", "feed is not a valid feed name"),
    ("feed=" + "a" * 65, "bad_request", "feed is not a valid feed name"),
    ("feed=", "bad_request", "query parameter feed is empty"),
    ("type=", "bad_request", "query parameter type is empty"),
    ("origin=", "bad_request", "query parameter origin is empty"),
    ("origin=%FF%FE", "invalid", "does not start with 'cn1'"),
    ("origin=cn1" + "a" * 56, "invalid", "checksum does not match"),
    ("origin=cn1abc", "invalid", "expected 59"),
    ("since=1.5", "bad_request", "query parameter since must be an integer"),
    ("since=1e3", "bad_request", "query parameter since must be an integer"),
    ("since=-1", "bad_request", "query parameter since must be in 0.."),
    ("until=abc", "bad_request", "query parameter until must be an integer"),
    (f"until={2**62 + 1}", "bad_request", "query parameter until must be in 0.."),
    ("since=" + "9" * 5000, "bad_request", "query parameter since must be an integer"),
    ("bbox=nan,0,1,1", "bad_request", "bbox is min_lon,min_lat,max_lon,max_lat"),
    ("bbox=0,0,nan,1", "bad_request", "bbox is min_lon,min_lat,max_lon,max_lat"),
    ("bbox=0,nan,1,nan", "bad_request", "bbox is min_lon,min_lat,max_lon,max_lat"),
    ("bbox=inf,0,nan,1", "bad_request", "bbox is min_lon,min_lat,max_lon,max_lat"),
    ("bbox=1,2,3,4,5", "bad_request", "bbox is min_lon,min_lat,max_lon,max_lat"),
    ("bbox=1,2,3", "bad_request", "bbox is min_lon,min_lat,max_lon,max_lat"),
    ("bbox=" + ",".join(["1"] * 1000), "bad_request", "bbox is min_lon"),
    ("bbox=a,b,c,d", "bad_request", "bbox is min_lon,min_lat,max_lon,max_lat"),
    # (lon min > max is a box across the antimeridian: valid, see test_antimeridian.py)
    ("bbox=0,3,1,1", "bad_request", "bbox is min_lon,min_lat,max_lon,max_lat"),  # lat min>max
    ("bbox=3,1,1,-inf", "bad_request", "bbox is min_lon,min_lat,max_lon,max_lat"),
    ("bbox=1,2,3,4,", "bad_request", "bbox is min_lon,min_lat,max_lon,max_lat"),
    ("bbox=", "bad_request", "query parameter bbox is empty"),
]


@pytest.mark.parametrize("path", ["/v1/records", "/v1/stream"])
async def test_a_hostile_filter_is_a_400_that_says_which(world: World, path: str) -> None:
    n = world.n
    for q, reason, fragment in BAD_FILTERS:
        status, ctype, body = await _get(n, f"{path}?{q}")
        _assert_400(status, ctype, body, fragment, reason)
        if reason == "bad_request" and q.startswith("feed="):
            assert "%" not in body["message"] and "Bad" not in body["message"]  # no echo
    assert not n.node.subscribers  # no stream was opened by any of them


async def test_records_hostile_cursors_and_limits(world: World) -> None:
    n = world.n
    for q, fragment in [
        ("after=-1", "query parameter after must be in 0..9223372036854775807"),
        (f"after={2**63}", "query parameter after must be in 0..9223372036854775807"),
        ("after=99999999999999999999999", "query parameter after must be in 0.."),
        ("after=" + "9" * 5000, "query parameter after must be an integer"),  # > int digits
        ("after=1.5", "query parameter after must be an integer"),
        ("after=1e3", "query parameter after must be an integer"),
        ("after=abc", "query parameter after must be an integer"),
        ("after=0x10", "query parameter after must be an integer"),
        ("limit=0", "query parameter limit must be in 1..1000"),
        ("limit=1001", "query parameter limit must be in 1..1000"),
        ("limit=-5", "query parameter limit must be in 1..1000"),
        ("limit=x", "query parameter limit must be an integer"),
        ("from_seq=1", "from_seq/to_seq need origin and feed"),
        ("feed=a&to_seq=3", "from_seq/to_seq need origin and feed"),
        (f"origin={world.origin}&feed=a&from_seq=0", "query parameter from_seq must be in 1.."),
    ]:
        _assert_400(*await _get(n, f"/v1/records?{q}"), fragment)
    # The largest cursor is fine (nothing after it), not a storage error.
    status, _ct, body = await _get(n, f"/v1/records?after={2**63 - 1}")
    assert status == 200 and body == {"records": [], "next": None}


@pytest.mark.parametrize("how", ["query", "header"])
async def test_stream_hostile_cursors_are_a_400_and_open_nothing(world: World, how: str
                                                                 ) -> None:
    n = world.n
    for bad in ["-1", "-0.5", "1.5", "1e3", "abc", "0x10", str(2**63), "9" * 5000,
                "99999999999999999999999"]:
        if how == "query":
            got = await _get(n, f"/v1/stream?after={bad}")
        else:
            got = await _get(n, "/v1/stream", {"Last-Event-ID": bad})
        _assert_400(*got, "Last-Event-ID must be a cursor (an integer)")
    # The header wins over ?after=: a bad header with a good ?after= is still refused.
    _assert_400(*await _get(n, "/v1/stream?after=0", {"Last-Event-ID": "x"}),
                "Last-Event-ID must be a cursor")
    assert not n.node.subscribers


async def test_stream_format_is_exact(world: World) -> None:
    """Only ``json`` and ``envelope``, in that case: anything else is a 400 before the
    stream opens (a client asking for a format it would not get must hear so)."""
    n = world.n
    for fmt in ["ENVELOPE", "Envelope", "JSON", "envelope%20", "%20json", "", "xml",
                "envelope%00", "e" * 4000]:
        _assert_400(*await _get(n, f"/v1/stream?format={fmt}"),
                    "format must be json (the default) or envelope")
    assert not n.node.subscribers


async def test_repeated_parameters_are_refused(world: World) -> None:
    """``feed=a&feed=b``: of two values only one could count, and the caller cannot know
    which; a 400 for records and streams alike (the stream never opens)."""
    n = world.n
    for qs in ["feed=a&feed=priv", "feed=priv&feed=a", "feed=a&limit=2&limit=x",
               "after=0&after=x", "feed=a&feed=a"]:
        _assert_400(*await _get(n, f"/v1/records?{qs}"), "given more than once")
    for qs in ["feed=a&feed=priv&format=envelope", "feed=a&format=json&format=envelope",
               "feed=a&after=0&after=1"]:
        _assert_400(*await _get(n, f"/v1/stream?{qs}"), "given more than once")
    assert not n.node.subscribers
    # One value each: answered.
    _s, _c, body = await _get(n, "/v1/records?feed=a&limit=2")
    assert [r["seq"] for r in body["records"]] == [1, 2]


async def test_unknown_parameters_are_refused(world: World) -> None:
    """A parameter an endpoint does not take is a 400 naming it (when the name is plain:
    no value and no odd name is echoed), so a misspelt filter never answers as if no
    filter had been given."""
    n = world.n
    for extra, shown in [("bogus=1", "bogus"), ("feeds=priv", "feeds"),
                         ("FEED=priv", "(a name)"), ("x%5B%5D=y", "(a name)"),
                         ("callback=alert(1)", "callback"), ("=x", "(a name)"),
                         ("a=%FF", "a")]:
        status, ctype, body = await _get(n, f"/v1/records?feed=a&{extra}")
        _assert_400(status, ctype, body, f"unknown query parameter {shown}:")
        assert "alert" not in body["message"] and "priv" not in body["message"], body
        _assert_400(*await _get(n, f"/v1/stream?feed=a&{extra}"),
                    f"unknown query parameter {shown}:")
    assert not n.node.subscribers
    # Empty pairs are no parameter at all.
    status, _ct, body = await _get(n, "/v1/records?feed=a&&&")
    assert status == 200 and {r["feed"] for r in body["records"]} == {"a"}
    # Each endpoint that takes parameters checks them.
    for path in ["/v1/checkpoints?origin=x&feed=a&size=3", "/v1/proofs/inclusion?id=00&x=1",
                 "/v1/proofs/consistency?origin=x&feed=a&old=1&new=2&size=2"]:
        _assert_400(*await _get(n, path), "unknown query parameter")


async def test_non_utf8_percent_encodings_match_nothing_and_break_nothing(world: World
                                                                          ) -> None:
    """Percent-escapes that are not UTF-8 (or decode to a lone surrogate, or NUL) in a
    free-text filter are a filter that matches no record: 200, empty, not a 500."""
    n = world.n
    for t in ["%FF", "%FF%FE", "%C3%28", "%ED%A0%80", "%00", "%E2%82", "%F4%90%80%80"]:
        status, _ct, body = await _get(n, f"/v1/records?type={t}")
        assert status == 200 and body == {"records": [], "next": None}, (t, status, body)
    status, _ct, body = await _get(n, f"/v1/records?type={TYPE}&feed=a")
    assert status == 200 and len(body["records"]) == 5  # the control does match


async def test_a_very_long_query_is_refused_and_the_node_serves_on(world: World) -> None:
    """A 100 KB ``type=`` is over ``max_header_bytes`` (the request line's limit): 400 at
    the HTTP parser, the handler never runs; a long one within the limit is served."""
    n = world.n
    for path in ["/v1/records", "/v1/stream"]:
        async with n.session.get(f"{n.url}{path}?type={'x' * 100_000}", timeout=SHORT) as r:
            assert r.status == 400
    status, _ct, body = await _get(n, f"/v1/records?type={'x' * 8000}")
    assert status == 200 and body["records"] == []
    assert not n.node.subscribers
    status, _ct, _body = await _get(n, "/healthz")
    assert status == 200


async def test_parser_level_refusals_are_plain_400s(world: World) -> None:
    """docs/API.md: a request the HTTP parser itself refuses (a request line over
    max_header_bytes, raw non-ASCII bytes in the query) is a plain-text 400 from aiohttp,
    before any handler runs -- never a 5xx, and the node goes on serving."""
    n = world.n
    async with n.session.get(f"{n.url}/v1/records?type={'x' * 100_000}", timeout=SHORT) as r:
        assert r.status == 400
    rd, wr = await asyncio.open_connection("127.0.0.1", n.port, ssl=_client_tls())
    try:
        wr.write(b"GET /v1/records?type=\xff\xfe HTTP/1.1\r\nHost: x\r\n"
                 b"Connection: close\r\n\r\n")
        raw = await asyncio.wait_for(rd.read(), 10)
    finally:
        wr.close()
    head = raw.split(b"\r\n\r\n", 1)[0].lower()
    assert raw.startswith(b"HTTP/1.") and b" 400 " in raw.split(b"\r\n", 1)[0]
    assert b"content-type: text/plain" in head, raw
    status, _ct, _body = await _get(n, "/healthz")
    assert status == 200


async def test_since_not_before_until_is_a_400_on_records(world: World) -> None:
    """``since <= time < until`` (docs/API.md): since > until, or since == until, can
    match nothing, so it is refused (as on streams, where it would be silent forever)."""
    n = world.n
    t = world.pub[0].time
    for q in [f"since={t + 10}&until={t}", f"since={t}&until={t}"]:
        _assert_400(*await _get(n, f"/v1/records?feed=a&{q}"), "since")
    _s, _c, body = await _get(n, f"/v1/records?feed=a&since={t}&until={t + 10**9}")
    assert len(body["records"]) == 5


async def test_a_stream_with_since_after_until_is_a_400(world: World) -> None:
    n = world.n
    got = await _get(n, "/v1/stream?since=10&until=5&after=0")
    _assert_400(*got, "since")


async def test_bbox_with_infinities_is_served(world: World) -> None:
    """``inf`` parses as a float and orders correctly: a box of the whole plane is a
    valid (if odd) filter, answered 200 with the located records (none here)."""
    n = world.n
    for q in ["-inf,-inf,inf,inf", "0,0,1e999,1", "-1e308,-90,1e308,90"]:
        status, _ct, body = await _get(n, f"/v1/records?bbox={q}")
        assert status == 200 and body == {"records": [], "next": None}, (q, body)


# ------------------------------------------------------------------ inclusion proofs


async def test_inclusion_proof_malformed_ids(world: World) -> None:
    n = world.n
    good = world.pub[2].id.hex()
    for rid in [good[:-1], good[:-2], good + "0", good + "00", "zz" * 32, "0x" + good[2:],
                "", good.replace(good[0], "g", 1), "%FF" * 32, "00" * 1000]:
        _assert_400(*await _get(n, f"/v1/proofs/inclusion?id={rid}"),
                    "?id= must be a record id (64 hex digits)")
    _assert_400(*await _get(n, "/v1/proofs/inclusion"), "64 hex digits")
    status, _ct, body = await _get(n, f"/v1/proofs/inclusion?id={'00' * 32}")
    assert (status, body) == (404, {"error": "not_found", "message": "no such record here"})


async def test_inclusion_proof_hostile_sizes(world: World) -> None:
    n = world.n
    rid = world.pub[2].id.hex()  # seq 3 of 5, checkpoint of size 5 held
    q = f"/v1/proofs/inclusion?id={rid}&size="
    for size in ["0", "-1", str(2**63), str(2**62 + 1), str(2**64)]:
        _assert_400(*await _get(n, q + size), "query parameter size must be in 1..")
    for size in ["abc", "1.5", "3e0", "9" * 5000]:
        _assert_400(*await _get(n, q + size), "query parameter size must be an integer")
    _assert_400(*await _get(n, q + "2"), "a tree of size 2 does not hold seq 3")
    _assert_400(*await _get(n, q + "1"), "a tree of size 1 does not hold seq 3")
    # Larger than the feed held: a 400 saying how many are held, not a 500 or a hang.
    for size in ["6", str(2**62)]:
        _assert_400(*await _get(n, q + size), "this node holds 5 records of that feed",
                    reason="bad_chain")
    status, _ct, body = await _get(n, q + "3")
    assert status == 200 and body["size"] == 3 and body["index"] == 2
    status, _ct, body = await _get(n, q + "5")
    assert status == 200 and body["checkpoint"] is not None


async def test_inclusion_proof_of_a_hidden_record_looks_missing(world: World) -> None:
    """Whatever the size asked (valid or not), a record of a feed the caller may not
    read is answered exactly as a record that does not exist."""
    n = world.n
    missing = "ab" * 32
    for size in ["", "&size=1", "&size=2", "&size=999", "&size=-1", "&size=abc"]:
        expect = await _get(n, f"/v1/proofs/inclusion?id={missing}{size}")
        assert expect[0] == 404, expect
        for rec in (world.priv[1], world.sec[1]):
            got = await _get(n, f"/v1/proofs/inclusion?id={rec.id.hex()}{size}")
            assert got == expect, (rec.feed, size, got)
            # A non-reader's signature changes nothing.
            path = f"/v1/proofs/inclusion?id={rec.id.hex()}{size}"
            got = await _get(n, path, _signed(world.stranger, n, path))
            assert got == expect, (rec.feed, size, got)
    # The restricted feed's reader gets its proof (the control: the record is there).
    path = f"/v1/proofs/inclusion?id={world.sec[1].id.hex()}"
    status, _ct, body = await _get(n, path, _signed(world.reader, n, path))
    assert status == 200 and body["index"] == 1


# ------------------------------------------------------------------ consistency proofs


async def test_consistency_proof_hostile_sizes(world: World) -> None:
    n = world.n
    base = f"/v1/proofs/consistency?origin={world.origin}&feed=a"
    need = "need ?origin=&feed=&old=&new= with old <= new"
    for q in ["&old=3&new=2", "&old=5", "&new=5", "", "&old=&new=3", "&old=1&new="]:
        _assert_400(*await _get(n, base + q), need)
    for q in ["?feed=a&old=1&new=2", f"?origin={world.origin}&old=1&new=2",
              f"?origin={world.origin}&feed=&old=1&new=2"]:
        status, ctype, body = await _get(n, "/v1/proofs/consistency" + q)
        assert status == 400 and ctype == "application/json", (q, body)
    for q in ["&old=-1&new=2", f"&old=1&new={2**63}", f"&old={2**62 + 1}&new={2**63}"]:
        _assert_400(*await _get(n, base + q), "must be in 0..")
    for q in ["&old=1.0&new=2", "&old=1&new=two", "&old=1&new=" + "9" * 5000]:
        _assert_400(*await _get(n, base + q), "must be an integer")
    for q in ["&old=1&new=6", f"&old=1&new={2**62}", f"&old={2**62}&new={2**62}"]:
        _assert_400(*await _get(n, base + q), "this node holds 5 records of that feed",
                    reason="bad_chain")
    _assert_400(*await _get(n, "/v1/proofs/consistency?origin=cn1xyz&feed=a&old=1&new=2"),
                "expected 59", reason="invalid")
    # Edge sizes within the feed are proofs, not errors.
    for old, new in [(0, 0), (0, 5), (5, 5), (1, 5)]:
        status, _ct, body = await _get(n, f"{base}&old={old}&new={new}")
        assert status == 200 and (body["old_size"], body["new_size"]) == (old, new), body


async def test_consistency_of_a_hidden_feed_looks_like_an_unknown_one(world: World) -> None:
    """A ``partners`` or ``restricted`` feed asked anonymously (or by a stranger) is
    answered exactly as a feed of an origin this node knows nothing of, whatever the
    sizes: same status, same body."""
    n = world.n
    unknown = SigningKey.generate().node_id
    for sizes in ["&old=1&new=2", "&old=0&new=0", "&old=1&new=999", f"&old=0&new={2**62}",
                  "&old=3&new=2", "&old=-1&new=1"]:
        expect = await _get(n, f"/v1/proofs/consistency?origin={unknown}&feed=nosuch{sizes}")
        for feed in ("priv", "sec"):
            path = f"/v1/proofs/consistency?origin={world.origin}&feed={feed}{sizes}"
            assert await _get(n, path) == expect, (feed, sizes)
            assert await _get(n, path, _signed(world.stranger, n, path)) == expect
    assert expect[0] == 400  # the last: refused before access is looked at, for all alike
    # ... and the valid ones are the 404 of a feed not held.
    path = f"/v1/proofs/consistency?origin={world.origin}&feed=priv&old=1&new=2"
    assert await _get(n, path) == (404, "application/json",
                                   {"error": "not_found", "message": "no such feed here"})
    # The reader of the restricted feed does get its proof (the control).
    path = f"/v1/proofs/consistency?origin={world.origin}&feed=sec&old=1&new=3"
    status, _ct, body = await _get(n, path, _signed(world.reader, n, path))
    assert status == 200 and body["new_size"] == 3


@pytest.mark.parametrize("endpoint", ["consistency", "checkpoints"])
async def test_a_hidden_own_feed_looks_like_a_missing_own_feed(world: World, endpoint: str
                                                              ) -> None:
    n = world.n

    def path(feed: str) -> str:
        if endpoint == "consistency":
            return f"/v1/proofs/consistency?origin={world.origin}&feed={feed}&old=1&new=2"
        return f"/v1/checkpoints?origin={world.origin}&feed={feed}"

    assert await _get(n, path("priv")) == await _get(n, path("nosuch"))


# ------------------------------------------------------------------ stream access


async def test_compact_streams_of_hidden_feeds_carry_nothing(world: World) -> None:
    """``format=envelope`` applies the same access as JSON: an anonymous (or stranger-
    signed) subscriber of a ``partners`` or ``restricted`` feed gets no event of it,
    catch-up or live, while the public feed's stream and the restricted feed's reader
    get theirs -- so the silence is access, not a stream that never worked."""
    n = world.n
    w = world
    streams: dict[str, tuple[str, SigningKey | None]] = {}
    for feed in ("priv", "sec"):
        for fmt in ("json", "envelope"):
            streams[f"anon-{feed}-{fmt}"] = (f"feed={feed}&after=0&format={fmt}", None)
            streams[f"stranger-{feed}-{fmt}"] = (f"feed={feed}&after=0&format={fmt}",
                                                 w.stranger)
    for fmt in ("json", "envelope"):
        streams[f"anon-all-{fmt}"] = (f"after=0&format={fmt}", None)
    streams["anon-a-envelope"] = ("feed=a&after=0&format=envelope", None)
    streams["reader-sec-envelope"] = ("feed=sec&after=0&format=envelope", w.reader)
    streams["reader-sec-json"] = ("feed=sec&after=0", w.reader)

    got: dict[str, list[tuple[int, bytes]]] = {k: [] for k in streams}
    tasks = []
    for k, (q, key) in streams.items():
        path = f"/v1/stream?{q}"
        headers = _signed(key, n, path) if key is not None else None
        tasks.append(asyncio.create_task(_collect(n, path, got[k], headers)))
    try:
        async def all_open() -> bool:
            return len(n.node.subscribers) == len(streams)

        await eventually(all_open, timeout=10)
        for feed in ("a", "priv", "sec"):  # live rows too, through the shared tail
            await n.node.publish(feed, TYPE, [{"n": 10}, {"n": 11}])

        async def controls_done() -> bool:
            return (len(got["anon-a-envelope"]) == 7 and len(got["anon-all-json"]) == 7
                    and len(got["anon-all-envelope"]) == 7
                    and len(got["reader-sec-envelope"]) == 5
                    and len(got["reader-sec-json"]) == 5)

        await eventually(controls_done, timeout=15)
        await asyncio.sleep(0.5)  # a leak would have been written by now
        for k, events in got.items():
            if k.startswith(("anon-priv", "anon-sec", "stranger-")):
                assert events == [], (k, events[:1])
        for k in ("anon-all-json", "anon-all-envelope", "anon-a-envelope"):
            assert {_feed_of(d) for _c, d in got[k]} == {"a"}, k
        # The reader's compact events carry the record sealed: it opens them itself.
        for _c, d in got["reader-sec-envelope"]:
            body_bytes, _sig, payload = decode_record(base64.b64decode(d))
            body = parse_body(body_bytes)
            assert body["feed"] == "sec" and "sealed_digest" in body and payload is not None
        assert [c for c, _d in got["reader-sec-envelope"]] == \
            [c for c, _d in got["reader-sec-json"]]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ------------------------------------------------------------------ churn and shutdown


async def test_streams_opened_and_dropped_at_once_leave_nothing_behind(world: World) -> None:
    """50 streams (catch-up and live, both formats, filters) each dropped by the client
    as soon as it opens, then 20 raw TLS connections that send the request and close
    without reading: afterwards no subscriber is left and the node serves on."""
    n = world.n
    await n.node.publish("a", TYPE, [{"n": i, "pad": "x" * 500} for i in range(600)])
    variants = ["after=0", "after=0&format=envelope", "feed=a", "format=envelope",
                "feed=priv&after=0&format=envelope", "feed=a&after=3&format=json"]
    for i in range(50):
        r = await n.session.get(f"{n.url}/v1/stream?{variants[i % len(variants)]}",
                                timeout=NO_WAIT)
        assert r.status == 200
        r.close()  # drops the connection
    ctx = _client_tls()
    for i in range(20):
        _rd, wr = await asyncio.open_connection("127.0.0.1", n.port, ssl=ctx)
        wr.write(f"GET /v1/stream?{variants[i % len(variants)]} HTTP/1.1\r\n"
                 "Host: x\r\nAccept: text/event-stream\r\n\r\n".encode())
        await wr.drain()
        if i % 2:
            wr.transport.abort()  # a reset, not even a TLS close
        else:
            wr.close()

    async def none_left() -> bool:
        return not n.node.subscribers

    await eventually(none_left, timeout=15)
    assert n.node.metrics.streams._value.get() == 0
    # Still serving: a request, and a new stream that gets a live record.
    status, _ct, _body = await _get(n, "/healthz")
    assert status == 200
    start = n.node.storage.max_rowid()
    out: list[tuple[int, bytes]] = []
    task = asyncio.create_task(_collect(n, f"/v1/stream?feed=a&after={start}", out))
    try:
        async def opened() -> bool:
            return len(n.node.subscribers) == 1

        await eventually(opened, timeout=10)
        await n.node.publish("a", TYPE, [{"n": 999}])

        async def arrived() -> bool:
            return len(out) == 1

        await eventually(arrived, timeout=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_subscriber_hanging_up_is_not_an_internal_error(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    n = world.n
    await n.node.publish("a", TYPE, [{"n": i, "pad": "x" * 500} for i in range(1500)])
    caplog.set_level(logging.ERROR, logger="citynode.http")
    for i in range(200):  # stops at the first occurrence (a race: usually within a few)
        r = await n.session.get(f"{n.url}/v1/stream?after=0"
                                + ("&format=envelope" if i % 2 else ""), timeout=NO_WAIT)
        assert r.status == 200
        r.close()
        await asyncio.sleep(0.02)
        if any(rec.name == "citynode.http" for rec in caplog.records):
            break
    internal = [rec.getMessage() for rec in caplog.records if rec.name == "citynode.http"]
    assert internal == []


async def test_close_streams_ends_compact_and_filtered_streams_cleanly(world: World
                                                                      ) -> None:
    """node.streams.close() (graceful shutdown) ends every kind of live stream at once:
    each response completes (EOF, not an error), every subscriber unregisters, and a
    stream asked for afterwards is a 503 JSON answer rather than a held connection."""
    n = world.n
    queries = ["after=0&format=envelope", "feed=a&after=0", "feed=priv&format=envelope",
               "format=envelope", f"bbox=-inf,-inf,inf,inf&since=0&until={2**62}",
               "type=%FF&after=0"]
    got: dict[str, list[tuple[int, bytes]]] = {q: [] for q in queries}
    tasks = [asyncio.create_task(_collect(n, f"/v1/stream?{q}", got[q])) for q in queries]

    async def all_open() -> bool:
        return len(n.node.subscribers) == len(queries) and len(got[queries[0]]) == 5

    await eventually(all_open, timeout=10)
    n.node.streams.close()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)  # each ended, none raised
    assert not n.node.subscribers
    status, ctype, body = await _get(n, "/v1/stream?format=envelope")
    assert (status, ctype, body["error"]) == (503, "application/json", "service_unavailable")
    assert "shutting down" in body["message"]
    assert not n.node.subscribers
