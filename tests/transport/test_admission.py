"""Admission control over real HTTPS (issue 16, a hostile partner): what one caller may
cost a node before any work is done for it -- connections per address, signed requests
per partner, and records past their origin's quota refused before their signatures are
checked."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable

import msgpack
import pytest

from citynode.core import httpsig
from citynode.core.keys import SigningKey, node_id
from citynode.core.records import sign_record
from citynode.errors import PeerRejected
from citynode.transport.client import PeerClient
from tests.conftest import InProc, eventually

Make = Callable[..., Awaitable[InProc]]


def _tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the node's self-signed certificate, on loopback
    return ctx


async def test_connections_are_capped_per_address_others_still_served(inproc: Make) -> None:
    """[limits] max_connections_per_address: with 2 connections open from 127.0.0.2, a
    third from it is closed on arrival (before its TLS handshake) and counted; clients
    on 127.0.0.1 are served meanwhile, and 127.0.0.2 may connect again once one of its
    connections closed."""
    n = await inproc("Jakarta", settings={("limits", "max_connections_per_address"): 2})

    async def connect(src: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", n.port, ssl=_tls(),
                                             local_addr=(src, 0))

    held = [await connect("127.0.0.2") for _ in range(2)]
    # closed by the node as it arrives, before the TLS handshake
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(connect("127.0.0.2"), 5)
    assert n.node.metrics.connections_refused_address._value.get() == 1
    assert n.node.metrics.connections_refused._value.get() == 0  # not the global cap
    # another address is not affected (the test's own session connects from 127.0.0.1)
    async with n.session.get(f"{n.url}/healthz") as r:
        assert r.status == 200
    held[0][1].close()
    await held[0][1].wait_closed()
    await asyncio.sleep(0.2)
    reader, writer = await connect("127.0.0.2")
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200")
    writer.close()
    for _r, w in held[1:]:
        w.close()
    assert n.node.metrics.connections_refused_address._value.get() == 1


async def test_a_partner_over_its_request_rate_gets_429_and_is_counted(inproc: Make) -> None:
    """[limits] partner_requests_per_second / partner_request_burst: a partner's signed
    requests beyond its bucket are answered 429 ``rate_limited`` with Retry-After and
    counted on it; requests claiming its key that do not verify spend none of its
    tokens; another partner is not affected."""
    a = await inproc("Jakarta", settings={("limits", "partner_requests_per_second"): 0.2,
                                          ("limits", "partner_request_burst"): 3})
    b = await inproc("Surabaya")
    c = await inproc("Bandung")
    for p in (b, c):
        await a.node.add_partner(p.url, p.node.node_id)
    client = PeerClient(b.node.key, a.url, node_id=a.node.node_id,
                        fingerprint=a.node.identity.cert_fingerprint)
    other = PeerClient(c.node.key, a.url, node_id=a.node.node_id,
                       fingerprint=a.node.identity.cert_fingerprint)
    try:
        # Forged: b's keyid, signed by a stranger. Refused (403), and b pays nothing.
        stranger = SigningKey.generate()
        for _ in range(5):
            h = httpsig.sign_request(stranger, "GET", "/v1/cards", b"", a.node.now_ms(),
                                     target=a.node.node_id)
            h["Signature-Input"] = h["Signature-Input"].replace(
                node_id(stranger.public_key), b.node.node_id)
            async with a.session.get(f"{a.url}/v1/cards", headers=h) as r:
                assert r.status == 403, await r.text()
        for _ in range(3):  # the burst
            await client.cards()
        try:
            await client.cards()
        except PeerRejected as exc:
            assert exc.status == 429 and exc.reason == "rate_limited", exc
        else:
            raise AssertionError("a fourth request within the burst's time was served")
        # a push is refused before its body is read, and nothing of it is verified
        rec = sign_record(b.node.key, feed="air", seq=1, prev=None, time_ms=b.node.now_ms(),
                          type="org.example.Test", data={"n": 1})
        body = msgpack.packb([rec.envelope])
        h = httpsig.sign_request(b.node.key, "POST", "/v1/push", body, a.node.now_ms(),
                                 target=a.node.node_id)
        async with a.session.post(f"{a.url}/v1/push", data=body, headers=h) as r:
            assert r.status == 429
            assert int(r.headers["Retry-After"]) >= 1
            assert json.loads(await r.read())["error"] == "rate_limited"
        assert a.node.metrics.verified._value.get() == 0
        link = a.node.links[b.node.public_key]
        assert link.invalid.get("rate_limited") == 2, link.invalid
        assert await other.cards() is not None  # c's bucket is its own
        assert a.node.links[c.node.public_key].invalid == {}
    finally:
        await client.close()
        await other.close()


async def test_records_past_the_quota_are_refused_before_their_signatures_are_checked(
        inproc: Make) -> None:
    """A partner's new records of an origin over its daily quota are refused (``quota``,
    counted on the partner) without one signature check; records within the quota are
    stored; a fork at a seq already held is still checked and proven."""
    a = await inproc("Jakarta", settings={
        ("federation", "origin_quota_records_per_day"): 3,
        ("limits", "partner_request_burst"): 1000})
    b = await inproc("Surabaya")
    await a.node.add_partner(b.url, b.node.node_id)
    await b.node.add_partner(a.url, a.node.node_id)
    k, now = b.node.key, b.node.now_ms()
    recs, prev = [], None
    for seq in range(1, 11):
        r = sign_record(k, feed="air", seq=seq, prev=prev, time_ms=now,
                        type="org.example.Test", data={"n": seq})
        prev = r.id
        recs.append(r)
    client = PeerClient(k, a.url, node_id=a.node.node_id,
                        fingerprint=a.node.identity.cert_fingerprint)
    verified = a.node.metrics.verified
    try:
        out = await client.push([r.envelope for r in recs[:5]])
        assert out["accepted"] == 3, out
        assert sorted(out["rejected"]) == [[3, "quota"], [4, "quota"]], out
        assert verified._value.get() == 3  # the two over the quota were never checked
        out = await client.push([r.envelope for r in recs[3:]])
        assert out["accepted"] == 0 and len(out["rejected"]) == 7, out
        assert {reason for _i, reason in out["rejected"]} == {"quota"}
        assert verified._value.get() == 3
        # an equivocation at seq 2 (held): checked, and its proof kept over the quota
        fork = sign_record(k, feed="air", seq=2, prev=recs[0].id, time_ms=now,
                           type="org.example.Test", data={"n": "other"})
        out = await client.push([fork.envelope])
        assert out["forks"] == 1, out
        assert verified._value.get() == 4
    finally:
        await client.close()
    link = a.node.links[b.node.public_key]
    assert link.invalid.get("quota") == 9, link.invalid
    rows = [r for r in a.node.storage.rejected(100) if r.reason == "quota"]
    assert rows and any("items" in r.detail for r in rows), rows  # one row per batch
    assert len(rows) <= 3


async def test_connections_keep_a_small_tls_read_buffer_and_large_bodies_still_arrive(
        inproc: Make) -> None:
    """asyncio gives each TLS connection a 256 KiB read buffer for its whole life; the
    server shrinks it after the handshake (server.TLS_READ_BUFFER), and a body many
    times that size is still read whole."""
    from citynode.transport.server import TLS_READ_BUFFER

    n = await inproc("Jakarta")
    air = {"dateObserved": "2026-11-28T07:00:00Z", "pm25": 18.5,
           "location": {"type": "Point", "coordinates": [126.9794, 37.5720]}}
    body = json.dumps([dict(air, pm25=float(i)) for i in range(3000)]).encode()
    assert len(body) > 8 * TLS_READ_BUFFER
    async with n.session.post(f"{n.url}/v1/publish?feed=air&type=AirQualityObserved",
                              data=body, headers=n.auth()) as r:
        assert r.status == 200, await r.text()
        assert len((await r.json())["ids"]) == 3000
    handlers = n.runner.server.connections
    assert handlers
    for h in handlers:
        proto = h.transport._ssl_protocol  # (asyncio's; what the server shrank)
        assert len(proto._ssl_buffer) <= TLS_READ_BUFFER


async def test_a_connection_that_never_starts_its_tls_handshake_is_dropped(
        inproc: Make) -> None:
    """A TCP connection that sends nothing holds no TLS buffers past
    read_timeout_seconds (asyncio's own handshake deadline is 60 s)."""
    n = await inproc("Jakarta", settings={("limits", "read_timeout_seconds"): 1.0})
    reader, writer = await asyncio.open_connection("127.0.0.1", n.port)  # no TLS
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    assert loop.time() - start < 5.0
    writer.close()
    async with n.session.get(f"{n.url}/healthz") as r:
        assert r.status == 200


async def test_a_partner_over_its_share_of_the_loop_or_its_pushes_in_flight_waits(
        inproc: Make) -> None:
    """partner_loop_share: the event-loop time a partner's requests take is charged to
    it, and one in debt is answered 429 ``over_loop_share`` (before its body is read)
    until it is paid back. Pushes of one partner beyond 2 at once (a node pushes one
    batch at a time) are answered 429 ``too_many_in_flight``; each one done frees its
    place."""
    import time

    from citynode.transport.limits import WORK_BURST_S
    from citynode.transport.web import RATES_KEY

    a = await inproc("Jakarta", settings={("limits", "partner_loop_share"): 0.5})
    b = await inproc("Surabaya")
    await a.node.add_partner(b.url, b.node.node_id)
    k, now = b.node.key, b.node.now_ms()
    batches = []
    for f in range(12):
        prev, batch = None, []
        for seq in range(1, 101):
            r = sign_record(k, feed=f"f{f}", seq=seq, prev=prev, time_ms=now,
                            type="org.example.Test", data={"n": seq})
            prev = r.id
            batch.append(r.envelope)
        batches.append(batch)
    clients = [PeerClient(k, a.url, node_id=a.node.node_id,
                          fingerprint=a.node.identity.cert_fingerprint) for _ in batches]
    rates = a.runner.app[RATES_KEY]
    try:
        outs = await asyncio.gather(*(c.push(bt) for c, bt in zip(clients, batches,
                                                                  strict=True)),
                                    return_exceptions=True)
        refused = [o for o in outs if isinstance(o, PeerRejected)]
        assert refused and all(o.status == 429 and o.reason == "too_many_in_flight"
                               for o in refused), outs
        taken = [o for o in outs if isinstance(o, dict)]
        assert taken and all(o["accepted"] == 100 for o in taken), outs
        link = a.node.links[b.node.public_key]
        assert link.invalid.get("too_many_in_flight") == len(refused)
        # each request done freed its place: one at a time, all are taken
        for bt, o in zip(batches, outs, strict=True):
            if isinstance(o, PeerRejected):
                assert (await clients[0].push(bt))["accepted"] == 100
        # the decoding and placing of those batches was charged to b
        assert rates.busy_wait(b.node.public_key, time.monotonic()) == 0.0
        assert rates._work[b.node.public_key]._balance < WORK_BURST_S
        # in debt: refused for its share until paid back, counted
        rates.charge(b.node.public_key, 3.0, time.monotonic())
        try:
            await clients[0].cards()
        except PeerRejected as exc:
            assert exc.status == 429 and exc.reason == "over_loop_share", exc
        else:
            raise AssertionError("a partner in debt of loop time was served")
        assert link.invalid.get("over_loop_share") == 1
    finally:
        for c in clients:
            await c.close()


async def test_an_honest_node_answered_429_waits_its_retry_after_and_keeps_the_partner_up(
        inproc: Make) -> None:
    """An honest node's gossip takes a partner's 429 as "busy, retry after Retry-After":
    the partner is not marked down, no failure is counted nor back-off grown, and what
    was refused goes again once the wait is over, so every record arrives."""
    from citynode.transport.http import retry_after

    a = await inproc("Jakarta", settings={("limits", "partner_requests_per_second"): 2.0,
                                          ("limits", "partner_request_burst"): 2})
    b = await inproc("Surabaya")
    for x, y in ((a, b), (b, a)):
        await x.node.add_partner(y.url, y.node.node_id)
    link = b.node.links[a.node.public_key]
    for i in range(12):
        await b.node.publish("air", "org.example.Test", [{"n": i}])
        await asyncio.sleep(0.05)
        # sampled while b is being refused: a busy partner is never down
        assert link.up and link.failures == 0, link.last_error
        assert b.node.replica.partners[a.node.public_key].failures == 0
    refused_at = dict(a.node.links[b.node.public_key].invalid)
    assert refused_at.get("rate_limited", 0) >= 1, refused_at  # b was told to wait

    async def arrived() -> bool:
        return a.node.seq((b.node.public_key, "air")) >= 12

    await eventually(arrived, timeout=30)
    assert link.up and link.failures == 0
    # the header as sent, bounded: a partner cannot silence us for a day
    assert retry_after("1") == 1.0 and retry_after("86400") == 300.0
    assert retry_after(None) is None and retry_after("Wed, 21 Oct 2026 07:28:00 GMT") is None


async def test_a_frontier_announcing_too_many_entries_is_refused_before_its_body_is_read(
        inproc: Make) -> None:
    """A legacy frontier (or an announce) whose msgpack header announces more than
    MAX_FRONTIER_FEEDS entries is refused (400 ``too_many_items``) from its first bytes,
    while the rest of its 7.7 MB is not even sent; counted on the partner its fresh
    signature headers name (as a 429 before the body is)."""
    from citynode.core import sync

    a = await inproc("Jakarta")
    b = await inproc("Surabaya")
    await a.node.add_partner(b.url, b.node.node_id)
    n = sync.MAX_FRONTIER_FEEDS + 1
    head = b"\xdd" + n.to_bytes(4, "big")
    body = head + b"\x00" * (77 * n)  # what a full frontier of that count would weigh
    before = a.node.metrics.rejected.labels("too_many_items")._value.get()
    for path in ("/v1/sync", "/v1/announce"):
        h = httpsig.sign_request(b.node.key, "POST", path, body, a.node.now_ms(),
                                 target=a.node.node_id)
        reader, writer = await asyncio.open_connection("127.0.0.1", a.port, ssl=_tls())
        lines = [f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}",
                 "Content-Type: application/msgpack", "Connection: close",
                 *(f"{k}: {v}" for k, v in h.items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + head)
        await writer.drain()
        # only the header was sent: the answer comes without the rest of the body
        status = await asyncio.wait_for(reader.readline(), 10)
        assert status.startswith(b"HTTP/1.1 400"), status
        rest = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(next(ln for ln in rest.split(b"\r\n")
                          if ln.lower().startswith(b"content-length:")).split(b":")[1])
        answer = json.loads(await asyncio.wait_for(reader.readexactly(length), 10))
        assert answer["error"] == "too_many_items", answer
        writer.close()
    assert a.node.metrics.rejected.labels("too_many_items")._value.get() == before + 2
    assert a.node.links[b.node.public_key].invalid == {"too_many_items": 2}


async def test_a_partner_over_its_reconciliation_ranges_gets_429_and_is_counted(
        inproc: Make) -> None:
    """partner_reconcile_ranges_per_second: a message is answered in one piece of the
    event loop, so the ranges a partner's messages announce are bounded (four of the
    largest saved up). Past them a message is answered 429 ``reconcile_rate`` before
    it is decoded, counted on the partner, with a Retry-After; once the bucket has
    refilled, the partner is answered again."""
    import os
    import time

    from citynode.core import reconcile
    from citynode.transport.limits import RECONCILE_RANGE_BURST

    a = await inproc("Jakarta", settings={
        ("limits", "partner_reconcile_ranges_per_second"): 4096.0,
        ("limits", "partner_loop_share"): 1.0})
    b = await inproc("Surabaya")
    await a.node.add_partner(b.url, b.node.node_id)
    bounds = sorted({os.urandom(8) for _ in range(reconcile.MAX_RANGES)})
    while len(bounds) < reconcile.MAX_RANGES:  # (8 random bytes: never in practice)
        bounds = sorted(set(bounds) | {os.urandom(8)})
    many = reconcile.encode_message(
        [reconcile.Range(x, reconcile.FINGERPRINT, fp=os.urandom(16)) for x in bounds[:-1]]
        + [reconcile.Range(None, reconcile.FINGERPRINT, fp=os.urandom(16))])
    small = reconcile.encode_message([reconcile.Range(None, reconcile.FINGERPRINT,
                                                      fp=b"\x00" * 16)])
    client = PeerClient(b.node.key, a.url, node_id=a.node.node_id,
                        fingerprint=a.node.identity.cert_fingerprint)
    link = a.node.links[b.node.public_key]
    try:
        answered = 0
        t0 = time.monotonic()
        with pytest.raises(PeerRejected) as info:
            for _ in range(RECONCILE_RANGE_BURST // reconcile.MAX_RANGES + 3):
                await client.reconcile(many)
                answered += 1
        # the burst, and what refilled at 4,096 a second while they were answered
        assert answered >= RECONCILE_RANGE_BURST // reconcile.MAX_RANGES, answered
        assert answered <= (RECONCILE_RANGE_BURST // reconcile.MAX_RANGES
                            + int(time.monotonic() - t0) + 1), answered
        assert info.value.status == 429 and info.value.reason == "reconcile_rate"
        assert info.value.retry_after_s is not None and info.value.retry_after_s >= 1
        assert link.invalid.get("reconcile_rate") == 1
        # a one-range message needs one token: it is answered once a little refilled
        await asyncio.sleep(0.05)
        assert isinstance(await client.reconcile(small), bytes)
    finally:
        await client.close()
