"""The HTTPS API of one node, in-process (real TLS on 127.0.0.1, real SQLite): bad input
gets a clear 4xx, nothing is stored, and the server keeps serving everyone else."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable

import msgpack

from citynode.core import httpsig
from citynode.core.keys import SigningKey
from citynode.core.records import encode_record, sign_record
from citynode.transport.client import PeerClient
from tests.conftest import InProc

AIR = {
    "dateObserved": "2026-11-28T07:00:00Z",
    "location": {"type": "Point", "coordinates": [126.9794, 37.5720]},
    "pm25": 18.5,
}

Make = Callable[..., Awaitable[InProc]]


async def _publish(n: InProc, body: bytes, *, feed: str = "air-quality",
                   type_: str = "AirQualityObserved", token: str | None = None,
                   ) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token if token is not None else n.token}"}
    async with n.session.post(f"{n.url}/v1/publish?feed={feed}&type={type_}", data=body,
                              headers=headers) as r:
        return r.status, await r.json()


async def _count(n: InProc) -> int:
    """Records held (the operator's view: every feed, whatever its access level)."""
    async with n.session.get(f"{n.url}/v1/feeds", headers=n.auth()) as r:
        return sum(f["count"] for f in (await r.json())["feeds"])


async def _healthy(n: InProc) -> bool:
    async with n.session.get(f"{n.url}/healthz") as r:
        return r.status == 200


async def test_publish_validates_and_authenticates(inproc: Make) -> None:
    n = await inproc("Seoul")
    ok = json.dumps(AIR).encode()
    cases = [
        (ok, {"token": "wrong"}, 403, "access_denied"),
        (ok, {"token": ""}, 403, "access_denied"),
        (b"{not json", {}, 400, "bad_request"),
        (b"\xff\xfe", {}, 400, "bad_request"),
        (json.dumps({"location": AIR["location"], "pm25": 1}).encode(), {}, 422, "missing_field"),
        (ok, {"type_": "NoSuchType"}, 422, "unknown_type"),
        (ok, {"feed": "Bad Feed!"}, 400, "bad_field"),
        (json.dumps([AIR, {"pm25": "high"}]).encode(), {}, 422, None),
        # The query string: an empty subject, a misspelt one, a feed given twice.
        (ok, {"type_": "AirQualityObserved&subject="}, 400, "bad_request"),
        (ok, {"type_": "AirQualityObserved&subjct=s1"}, 400, "bad_request"),
        (ok, {"type_": "AirQualityObserved&feed=other"}, 400, "bad_request"),
    ]
    for body, kw, status, reason in cases:
        st, out = await _publish(n, body, **kw)
        assert st == status, (kw, out)
        if reason:
            assert out["error"] == reason, out
        assert out["message"]
    assert await _count(n) == 0  # nothing of the above was stored
    st, out = await _publish(n, ok)
    assert st == 200 and out["first_seq"] == 1
    assert await _count(n) == 1


async def test_oversized_and_slow_requests(inproc: Make) -> None:
    n = await inproc("Seoul", settings={("limits", "max_request_bytes"): 100_000,
                                        ("limits", "read_timeout_seconds"): 1.0})
    st, out = await _publish(n, b"[" + b" " * 200_000 + b"]")
    assert st == 413, out
    # A client that sends headers then stalls is cut off; others are still served.
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    reader, writer = await asyncio.open_connection("127.0.0.1", n.port, ssl=ctx)
    writer.write(b"POST /v1/publish?feed=a&type=AirQualityObserved HTTP/1.1\r\nHost: x\r\n"
                 b"Authorization: Bearer " + n.token.encode() + b"\r\n"
                 b"Content-Length: 1000\r\n\r\n{")
    await writer.drain()
    assert await _healthy(n)  # served while the slow client hangs
    status_line = await asyncio.wait_for(reader.readline(), 10)
    assert b" 408 " in status_line, status_line
    writer.close()
    # Too many headers.
    headers = {f"X-H{i}": "x" for i in range(100)}
    async with n.session.get(f"{n.url}/healthz", headers=headers) as r:
        assert r.status in (400, 431)
    assert await _healthy(n)


async def test_partner_endpoints_need_a_partner_signature(inproc: Make) -> None:
    a = await inproc("Jakarta")
    b = await inproc("Surabaya")
    await a.node.add_partner(b.url, b.node.node_id)
    await b.node.add_partner(a.url, a.node.node_id)
    rec = sign_record(b.node.key, feed="air-quality", seq=1, prev=None,
                      time_ms=b.node.now_ms(), type="AirQualityObserved", data=AIR)
    batch = msgpack.packb([rec.envelope])

    async def post(headers: dict[str, str], body: bytes = batch) -> tuple[int, dict]:
        async with a.session.post(f"{a.url}/v1/push", data=body, headers=headers) as r:
            raw = await r.read()
            if r.content_type == "application/msgpack":
                return r.status, msgpack.unpackb(raw)
            return r.status, json.loads(raw)

    # unsigned
    assert (await post({}))[0] == 403
    # signed by a stranger
    stranger = SigningKey.generate()
    st, out = await post(httpsig.sign_request(stranger, "POST", "/v1/push", batch, a.node.now_ms(),
                                            target=a.node.node_id))
    assert st == 403 and "not signed by a partner" in out["message"]
    # ... and a stranger's large body is refused before it is read (403, not 413)
    big = b"\x00" * (2 * 1024 * 1024)
    st, out = await post(httpsig.sign_request(stranger, "POST", "/v1/push", big,
                                              a.node.now_ms(), target=a.node.node_id), big)
    assert st == 403, out
    # signed by a partner, but for another node (replayed from elsewhere)
    st, out = await post(httpsig.sign_request(b.node.key, "POST", "/v1/push", batch,
                                              a.node.now_ms(), target=b.node.node_id))
    assert st == 403 and "another node" in out["message"]
    # stale
    old = a.node.now_ms() - 10 * 60 * 1000
    assert (await post(httpsig.sign_request(b.node.key, "POST", "/v1/push", batch, old,
                                        target=a.node.node_id)))[0] == 403
    # body swapped after signing
    h = httpsig.sign_request(b.node.key, "POST", "/v1/push", batch, a.node.now_ms(),
                             target=a.node.node_id)
    assert (await post(h, msgpack.packb([rec.envelope, rec.envelope])))[0] == 403
    # valid, then replayed
    st, out = await post(h)
    assert st == 200 and out["accepted"] == 1, out
    st, out = await post(h)
    assert st == 403 and "replay" in out["message"].lower()
    # garbage from a partner: 400, counted, nothing stored
    g = b"\xc1\xff garbage"
    st, _ = await post(httpsig.sign_request(b.node.key, "POST", "/v1/push", g,
                                            a.node.now_ms(), target=a.node.node_id), g)
    assert st == 400
    link = a.node.links[b.node.public_key]
    assert link.invalid.get("malformed_batch") == 1
    assert await _count(a) == 1 and await _healthy(a)


async def test_push_rejects_bad_records_and_keeps_good_ones(inproc: Make) -> None:
    a = await inproc("Jakarta")
    b = await inproc("Singapore")
    await a.node.add_partner(b.url, b.node.node_id)
    await b.node.add_partner(a.url, a.node.node_id)
    k = b.node.key
    now = b.node.now_ms()
    r1 = sign_record(k, feed="weather", seq=1, prev=None, time_ms=now,
                     type="org.example.Test", data={"n": 1})
    r2 = sign_record(k, feed="weather", seq=2, prev=r1.id, time_ms=now,
                     type="org.example.Test", data={"n": 2})
    tampered = encode_record(r2.body, r2.sig[:-1] + bytes([r2.sig[-1] ^ 1]), r2.payload)
    future = sign_record(k, feed="other", seq=1, prev=None, time_ms=now + 3600_000,
                         type="org.example.Test", data={"n": 3})
    client = PeerClient(k, a.url, node_id=a.node.node_id,
                        fingerprint=a.node.identity.cert_fingerprint)
    try:
        out = await client.push([r1.envelope, bytes(tampered), future.envelope, b"\x00",
                                 r1.envelope])
        reasons = dict(out["rejected"])
        assert out["accepted"] == 1 and out["duplicates"] == 1, out
        assert set(reasons) == {1, 2, 3}
        assert reasons[2] == "future_time" and reasons[3] == "bad_envelope"
        assert reasons[1] == "bad_signature"
        out = await client.push([r2.envelope])
        assert out["accepted"] == 1
    finally:
        await client.close()
    assert await _count(a) == 2
    # rejected input is logged with reasons, bounded
    rows = a.node.storage.rejected(10)
    assert {r.reason for r in rows} >= {"future_time", "bad_envelope"}


async def test_hidden_records_neither_listed_nor_counted_by_the_cursor(inproc: Make) -> None:
    """Anonymous readers page through public records only; the cursor and filters do
    not reveal that partners-only records exist (or where they are)."""
    n = await inproc("Jakarta", feeds={"priv": "partners"})
    await n.node.publish("pub", "AirQualityObserved", [AIR])
    secret = dict(AIR, location={"type": "Point", "coordinates": [106.8229, -6.1944]})
    await n.node.publish("priv", "AirQualityObserved", [secret] * 3)

    async def page(q: str, headers: dict[str, str] | None = None) -> dict:
        async with n.session.get(f"{n.url}/v1/records?{q}", headers={
                "Accept": "application/json", **(headers or {})}) as r:
            assert r.status == 200
            return await r.json()

    first = await page("limit=1")
    assert [r["feed"] for r in first["records"]] == ["pub"]
    rest = await page(f"limit=1&after={first['next']}")
    assert rest == {"records": [], "next": None}
    # A box around the hidden records only: nothing, and no cursor hinting at more.
    box = await page("limit=1&bbox=106.82,-6.20,106.83,-6.19&feed=priv")
    assert box == {"records": [], "next": None}
    # The operator sees everything.
    everything = await page("limit=10", n.auth())
    assert sorted(r["feed"] for r in everything["records"]) == ["priv"] * 3 + ["pub"]


async def test_seq_ranges_need_a_feed(inproc: Make) -> None:
    n = await inproc("Seoul")
    await n.node.publish("air", "AirQualityObserved", [AIR] * 3)
    origin = n.node.node_id
    async with n.session.get(f"{n.url}/v1/records?from_seq=2",
                             headers={"Accept": "application/json"}) as r:
        assert r.status == 400
    async with n.session.get(f"{n.url}/v1/records?origin={origin}&feed=air&from_seq=2",
                             headers={"Accept": "application/json"}) as r:
        assert r.status == 200
        assert [x["seq"] for x in (await r.json())["records"]] == [2, 3]


async def test_invalid_or_empty_filters_are_refused(inproc: Make) -> None:
    """A filter that is given but not valid is a 400 saying which and why, not an empty
    page: the feed must be a valid feed name, and an empty filter is no filter."""
    n = await inproc("Seoul")
    await n.node.publish("air", "AirQualityObserved", [AIR])
    refused = {
        "feed=BAD%20FEED": "feed is not a valid feed name: use 1-64 of a-z",
        "feed=Air": "feed is not a valid feed name",
        "feed=": "query parameter feed is empty",
        "type=": "query parameter type is empty",
        "bbox=": "query parameter bbox is empty",
        "origin=": "query parameter origin is empty",
        "since=": "query parameter since is empty",
        "feed=air&bbox=1,2,3": "bbox is min_lon,min_lat,max_lon,max_lat",
    }
    for q, message in refused.items():
        async with n.session.get(f"{n.url}/v1/records?{q}",
                                 headers={"Accept": "application/json"}) as r:
            assert r.status == 400, q
            body = await r.json()
        assert body["error"] == "bad_request" and message in body["message"], (q, body)
    async with n.session.get(f"{n.url}/v1/records?feed=air&type=AirQualityObserved",
                             headers={"Accept": "application/json"}) as r:
        assert r.status == 200 and len((await r.json())["records"]) == 1


async def test_connections_over_the_cap_are_closed_as_they_arrive(inproc: Make) -> None:
    """[limits] max_connections: with 3 connections open (idle, after TLS), a 4th is
    closed at once and counted; once one closes, requests are served again."""
    n = await inproc("Jakarta", settings={("limits", "max_connections"): 3})
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the node's self-signed certificate, on loopback

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", n.port, ssl=ctx)

    held = [await connect() for _ in range(3)]
    reader, writer = await connect()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the node
    writer.close()
    assert n.node.metrics.connections_refused._value.get() == 1
    for _r, w in held:
        w.close()
        await w.wait_closed()
    await asyncio.sleep(0.2)
    async with n.session.get(f"{n.url}/healthz") as r:
        assert r.status == 200


async def test_a_client_trickling_its_request_head_is_cut_off_but_streams_are_not(
        inproc: Make) -> None:
    """Slowloris: a connection that completes no request head within
    read_timeout_seconds is closed and counted, however slowly it keeps sending; a
    live stream being served stays open past that deadline."""
    n = await inproc("Jakarta", settings={("limits", "read_timeout_seconds"): 1.0})
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the node's self-signed certificate, on loopback
    reader, writer = await asyncio.open_connection("127.0.0.1", n.port, ssl=ctx)
    closed_after = None
    loop = asyncio.get_running_loop()
    start = loop.time()
    for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40:
        try:
            writer.write(bytes([byte]))
            await writer.drain()
            if await asyncio.wait_for(reader.read(1), 0.2) == b"":
                closed_after = loop.time() - start
                break
        except TimeoutError:
            continue  # not closed yet: the next byte
        except ConnectionError:  # closed while writing, or reset by the TLS layer
            closed_after = loop.time() - start
            break
    writer.close()
    assert closed_after is not None and closed_after < 4.0, closed_after
    assert n.node.metrics.connections_stalled._value.get() == 1
    async with n.session.get(f"{n.url}/v1/stream?feed=air",
                             headers={"Accept": "text/event-stream"}) as r:
        assert r.status == 200
        await asyncio.sleep(3.0)  # three deadlines, the stream being served
        await n.node.publish("air", "org.example.Test", [{"n": 1}])
        got = b""
        while b"data:" not in got:
            got += await asyncio.wait_for(r.content.readany(), 5)
    assert n.node.metrics.connections_stalled._value.get() == 1


async def test_a_flood_of_strangers_signed_reads_does_not_lock_partners_out(
        inproc: Make) -> None:
    """Any key may sign a read, and keys cost nothing to make. Strangers' signatures
    share a replay cache of their own: once a flood fills it they are refused ("busy"),
    but the node's partners still read (here with the strangers' bound made small)."""
    from citynode.transport.web import READ_REPLAY_KEY

    a = await inproc("Seoul", feeds={"priv": "partners"})
    b = await inproc("Busan")
    await a.node.add_partner(b.url, b.node.node_id)
    await a.node.publish("priv", "org.example.Test", [{"n": 1}])
    cache = a.runner.app[READ_REPLAY_KEY]
    assert isinstance(cache, httpsig.SplitReplayCache)
    cache.strangers.max_entries = 20

    async def read(key: SigningKey) -> tuple[int, dict]:
        path = "/v1/records?feed=priv"
        headers = httpsig.sign_request(key, "GET", path, b"", a.node.now_ms(),
                                       target=a.node.node_id)
        async with a.session.get(a.url + path, headers={
                **headers, "Accept": "application/json"}) as r:
            return r.status, await r.json()

    answers = [await read(SigningKey(bytes([9, i]) + bytes(30))) for i in range(25)]
    assert [s for s, _ in answers] == [200] * 20 + [403] * 5
    assert all(body["records"] == [] for _s, body in answers[:20])  # strangers see none
    assert "busy" in answers[-1][1]["message"]
    status, body = await read(b.node.key)
    assert status == 200 and [r["data"] for r in body["records"]] == [{"n": 1}]


async def test_publish_applies_max_body_bytes(inproc: Make) -> None:
    """[limits] max_body_bytes holds on publish as on ingest: a body this node's own
    decoder (and every partner's) would refuse is never signed, and nothing of the batch
    is stored; one under the limit is published as usual."""
    n = await inproc("Seoul", settings={("limits", "max_body_bytes"): 1024})
    big = dict(AIR, description="x" * 4000)
    st, out = await _publish(n, json.dumps(big).encode())
    assert st == 422 and out["error"] == "too_large", out
    assert "max_body_bytes = 1024" in out["message"]
    st, out = await _publish(n, json.dumps([AIR, big]).encode())
    assert st == 422 and out["error"] == "too_large" and "item 2 of 2" in out["message"]
    assert await _count(n) == 0
    st, out = await _publish(n, json.dumps(AIR).encode())
    assert st == 200 and out["first_seq"] == 1
