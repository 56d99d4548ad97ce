"""Erasure and retention across real nodes over HTTPS (in process, real TLS on 127.0.0.1).

A line A - B - C: C is no partner of A and gets A's records through B. A publishes, B
and C hold the records; A erases one (``Node.erase``, what ``citynode erase`` calls):
the erasure request travels by gossip like any record, and B and C drop that payload
and keep its tombstone. Queries and streams show the tombstone with its reason; a
bundle exported at C audits clean with the erased record reported; a tombstone pushed
with no request behind it is refused. Retention declared in A's card prunes at B and C
too.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from citynode.audit import audit_bundle
from citynode.bundle import export_from_storage
from citynode.client import Client, record_to_json
from citynode.core.records import encode_record, sign_record
from citynode.core.sync import Want
from citynode.core.types import ERASURE_FEED
from citynode.errors import PublishRefused
from citynode.node import Node
from citynode.transport.server import serve
from tests.conftest import InProc, eventually, make_node_dir

DAY = 86_400_000
REASON = "a resident's name was published by mistake"


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[InProc]]]:
    """Factory: a node serving HTTPS in process, with extra node.toml text."""
    made: list[InProc] = []

    async def make(name: str, toml: str = "",
                   settings: dict[tuple[str, str], Any] | None = None) -> InProc:
        d = make_node_dir(tmp_path, name, settings=settings)
        with open(d / "node.toml", "a") as f:
            f.write(toml)
        n = Node.load(d)
        await n.start()
        runner = await serve(n, host="127.0.0.1", port=n.config.node.listen_port)
        made.append(InProc(n, runner))
        return made[-1]

    yield make
    for n in reversed(made):
        await n.close()


async def _json(n: InProc, path: str) -> Any:
    async with n.session.get(f"{n.url}{path}", headers={"Accept": "application/json",
                                                         **n.auth()}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def _stream(n: InProc, query: str, want: int) -> list[dict[str, Any]]:
    """The JSON records of ``/v1/stream?query`` until ``want`` have come."""
    out: list[dict[str, Any]] = []
    async with n.session.get(f"{n.url}/v1/stream?{query}",
                             headers={"Accept": "text/event-stream", **n.auth()},
                             timeout=aiohttp.ClientTimeout(total=30)) as r:
        assert r.status == 200
        buf = b""
        while len(out) < want:
            buf += await r.content.readany()
            *events, buf = buf.split(b"\r\n\r\n")
            for ev in events:
                fields = dict(line.split(b": ", 1) for line in ev.split(b"\r\n")
                              if b": " in line)
                if b"data" in fields:
                    out.append(json.loads(fields[b"data"]))
    return out


async def test_an_erasure_reaches_every_holder_and_retention_prunes_at_partners(
        node: Callable[..., Awaitable[InProc]], tmp_path: Path) -> None:
    a = await node("Aachen", '\n[feeds.reports]\naccess = "public"\n'
                             '\n[feeds.daily]\naccess = "public"\nretention_days = 1\n')
    b = await node("Bonn")
    c = await node("Celle")
    for x, y in ((a, b), (b, a), (b, c), (c, b)):
        await x.node.add_partner(y.url, y.node.node_id)
    assert [f.retention_days for f in a.node.card().feeds] == [1, None]  # daily, reports
    origin = a.node.public_key
    reports = await a.node.publish("reports", "org.example.Report",
                                   [{"n": i, "reported_by": f"person {i}"} for i in (1, 2, 3)])
    daily = await a.node.publish("daily", "org.example.Daily", [{"n": 1}, {"n": 2}])

    async def holds(n: InProc, feed: str, seq: int) -> bool:
        return n.node.seq((origin, feed)) >= seq

    for n in (b, c):
        await eventually(lambda n=n: holds(n, "reports", 3), timeout=30)
        await eventually(lambda n=n: holds(n, "daily", 2), timeout=30)
    victim = reports[1]
    assert c.node.storage.get_envelope(victim.id) == victim.envelope

    # Only the origin can erase its record.
    with pytest.raises(PublishRefused, match="only its origin"):
        await b.node.erase([victim.id], REASON)
    request = await a.node.erase([victim.id], REASON)
    assert request.feed == ERASURE_FEED and request.origin == origin

    async def erased(n: InProc) -> bool:
        return n.node.storage.erasure_of(victim.id) == (request.id, REASON)

    for n in (a, b, c):
        await eventually(lambda n=n: erased(n), timeout=30)
        env = n.node.storage.get_envelope(victim.id)
        assert env is not None and env == encode_record(victim.body, victim.sig, None)
        assert n.node.storage.get_envelope(reports[0].id) == reports[0].envelope

    # Queries and streams at C show the tombstone, with its reason, among the others.
    page = await _json(c, f"/v1/records?origin={a.node.node_id}&feed=reports")
    by_seq = {r["seq"]: r for r in page["records"]}
    assert sorted(by_seq) == [1, 2, 3]
    assert by_seq[2]["erased"] == {"by": request.id.hex(), "reason": REASON}
    assert "data" not in by_seq[2] and by_seq[2]["id"] == victim.id.hex()
    assert by_seq[1]["data"]["n"] == 1 and "erased" not in by_seq[1]
    one = await _json(c, f"/v1/records/{victim.id.hex()}")
    assert one["erased"]["reason"] == REASON
    events = await _stream(c, f"origin={a.node.node_id}&feed=reports&after=0", 3)
    assert [e["seq"] for e in events] == [1, 2, 3]
    assert events[1]["erased"]["by"] == request.id.hex() and "data" not in events[1]

    # citynode.client verifies what C serves itself, and hands the tombstone out as one.
    async with Client(c.url, node_id=c.node.node_id) as client:
        got = await client.get(victim.id)
        assert got.is_tombstone and got.id == victim.id and got.data == {}
        page_recs = [r async for r in client.query(origin=a.node.node_id, feed="reports")]
        assert [r.is_tombstone for r in page_recs] == [False, True, False]

    # An auditor's bundle exported at C verifies across the tombstone and reports it.
    out = tmp_path / "a.bundle"
    export_from_storage(c.node.storage, origin, None, out,
                        card=a.node.card().envelope, now_ms=c.node.now_ms())
    rep = audit_bundle(out, a.node.node_id, now_ms=c.node.now_ms())
    assert rep.ok, rep.render_text()
    assert rep.feeds["reports"].erased == 1 and rep.feeds["reports"].records == 3
    [tomb] = rep.tombstones
    assert (tomb.feed, tomb.seq, tomb.id, tomb.by, tomb.reason) == (
        "reports", 2, victim.id, request.id, REASON)
    assert "1 erased" in rep.render_text()

    # A fetch answer carries the erasure request behind each erased tombstone, so a node
    # that never saw the request takes the tombstone in the same batch (D: no partner
    # of anyone, accepting any origin, fed C's answer to B's wants directly).
    answer = await c.node.reads.serve_fetch([Want(origin, "reports", 1, 3)],
                                            b.node.public_key)
    assert answer[:3] == [reports[0].envelope, encode_record(victim.body, victim.sig, None),
                          reports[2].envelope] and answer[3:] == [request.envelope]
    d = await node("Dessau", settings={("federation", "accept"): "any"})
    # The origin's key log ahead of its records (as a partner would send it).
    assert a.node.key.log is not None
    d.node.policy.offer_log(origin, a.node.key.log, None)
    res = await d.node.ingest(answer)
    assert res.rejected == [] and res.accepted + res.pending == 4, res
    assert d.node.storage.get_envelope(victim.id) == encode_record(victim.body, victim.sig,
                                                                   None)
    alone = await d.node.ingest([encode_record(reports[0].body, reports[0].sig, None)])
    assert alone.duplicates == 1  # held whole: a tombstone of it changes nothing
    assert d.node.storage.get_envelope(reports[0].id) == reports[0].envelope

    # A tombstone with no request behind it is refused, and nothing of it is stored.
    fresh = sign_record(a.node.key, feed="reports", seq=4, prev=reports[2].id,
                        time_ms=a.node.now_ms(), type="org.example.Report", data={"n": 4})
    link = c.node.links[b.node.public_key]
    res = await c.node.ingest([encode_record(fresh.body, fresh.sig, None)], source=link)
    assert res.rejected == [(0, "payload_missing")] and res.accepted == 0
    assert c.node.storage.get_envelope(fresh.id) is None
    assert link.invalid.get("payload_missing") == 1  # counted against the partner

    # Retention: A's card declares 1 day for "daily"; two days on, every holder prunes it
    # (A by its node.toml, B and C by A's card), and "reports" (no retention) stays.
    later = a.node.now_ms() + 2 * DAY
    for n in (a, b, c):
        assert await n.node.prune(now_ms=later) == 2
        assert await n.node.prune(now_ms=later) == 0
        for r in daily:
            assert n.node.storage.get_envelope(r.id) == encode_record(r.body, r.sig, None)
        assert n.node.storage.get_envelope(reports[2].id) == reports[2].envelope
    page = await _json(c, f"/v1/records?origin={a.node.node_id}&feed=daily")
    assert [r.get("pruned") for r in page["records"]] == [True, True]
    # A pruned skeleton from a partner is taken once past retention (not before).
    assert c.node.storage.tombstones() == (1, 2)


async def test_records_pruned_under_an_older_card_stay_pruned_when_retention_is_raised(
        node: Callable[..., Awaitable[InProc]], tmp_path: Path) -> None:
    """A feed kept 1 day is pruned; the origin then raises its retention to 30 days (a
    new card). The tombstones keep the retention they were signed under: the origin's
    export audits clean (pruned, not payload_missing), and a node that learns the
    origin's card history takes them from a partner."""
    a = await node("Aachen", '\n[feeds.old]\naccess = "public"\nretention_days = 1\n')
    old = await a.node.publish("old", "org.example.Daily", [{"n": i} for i in range(5)])
    later = a.node.now_ms() + 2 * DAY
    assert await a.node.prune(now_ms=later) == 5
    toml = a.node.data_dir / "node.toml"
    toml.write_text(toml.read_text().replace("retention_days = 1", "retention_days = 30"))
    assert await a.node.reload() is not None
    assert [f.retention_days for f in a.node.card().feeds] == [30]
    origin = a.node.public_key

    async def both_cards_kept() -> bool:  # the card history is written by the writer
        return len(a.node.storage.card_history(origin)) == 2

    await eventually(both_cards_kept, timeout=10)
    assert await a.node.prune(now_ms=later) == 0  # nothing left to prune, none restored

    out = tmp_path / "a.bundle"
    export_from_storage(a.node.storage, origin, None, out, card=a.node.card().envelope,
                        now_ms=later)
    rep = audit_bundle(out, a.node.node_id, now_ms=later)
    assert rep.ok, rep.render_text()
    assert rep.feeds["old"].pruned == 5

    # A new partner two days on knows only A's newest card (30 days): the tombstones
    # are refused at first, which makes it ask A for its card history; with the card
    # in force when they were signed, it takes them.
    d_dir = make_node_dir(tmp_path, "Dessau")
    d = Node.load(d_dir, clock=lambda: time.time() + 2 * DAY / 1000)
    await d.start()
    dp = InProc(d, await serve(d, host="127.0.0.1", port=d.config.node.listen_port))
    try:
        # One way: A would refuse D's card, dated two days ahead of A's clock.
        await d.add_partner(a.url, a.node.node_id)
        link = d.links[origin]
        tombs = [encode_record(r.body, r.sig, None) for r in old]
        first = await d.ingest(tombs, source=link)
        if first.accepted == 0:  # (unless gossip brought the history first)
            assert {r for _i, r in first.rejected} == {"payload_missing"}, first

        async def history_learnt() -> bool:
            return len(await d.policy.card_history(origin)) == 2

        await eventually(history_learnt, timeout=20)
        res = await d.ingest(tombs, source=link)
        assert res.rejected == [] and res.accepted + res.duplicates == 5, res
    finally:
        await dp.close()


async def test_an_erasure_request_passes_an_origin_quota_already_spent(
        node: Callable[..., Awaitable[InProc]]) -> None:
    """Issue 13 review: B, with A's daily quota spent (1 record), refused A's erasure
    request (quota) and kept the personal data until the next day. Through B's ingest
    from its partner A (admission before signatures, then the replica), the request is
    stored and the payload dropped; A's other new records stay refused."""
    a = await node("Aachen", '\n[feeds.reports]\naccess = "public"\n')
    b = await node("Bonn", settings={("federation", "origin_quota_records_per_day"): 1})
    for x, y in ((a, b), (b, a)):
        await x.node.add_partner(y.url, y.node.node_id)
    [victim] = await a.node.publish("reports", "org.example.Report",
                                    [{"n": 1, "reported_by": "a person"}])
    await eventually(lambda: _holds(b, victim.id), timeout=30)
    link = b.node.links[a.node.public_key]
    [more] = await a.node.publish("reports", "org.example.Report", [{"n": 2}])
    res = await b.node.ingest([more.envelope], source=link)
    assert res.rejected == [(0, "quota")] and res.accepted == 0
    request = await a.node.erase([victim.id], REASON)
    res = await b.node.ingest([request.envelope], source=link)
    # (Gossip may have brought it first, by the same admission: then a duplicate.)
    assert res.rejected == [] and res.accepted + res.duplicates == 1, res
    await eventually(lambda: _erased_at(b, victim.id), timeout=10)
    assert b.node.storage.get_envelope(victim.id) == encode_record(victim.body, victim.sig,
                                                                   None)
    assert b.node.storage.erasure_of(victim.id) is not None


async def test_an_erasure_request_naming_another_origins_record_is_refused_and_counted(
        node: Callable[..., Awaitable[InProc]]) -> None:
    """B signs an erasure request naming A's record (only A may erase it): A, holding
    the record, refuses that entry with ``erasure_not_origin``, counted against B, and
    keeps the payload; a node that receives B's request before A's record refuses the
    entry when the record arrives, and keeps that payload too."""
    a = await node("Aachen", '\n[feeds.reports]\naccess = "public"\n')
    b = await node("Bonn")
    for x, y in ((a, b), (b, a)):
        await x.node.add_partner(y.url, y.node.node_id)
    [victim] = await a.node.publish("reports", "org.example.Report", [{"n": 1}])
    foreign = sign_record(b.node.key, feed=ERASURE_FEED, seq=1, prev=None,
                          time_ms=b.node.now_ms(), type="citynode.Erasure",
                          data={"erase": [{"feed": "reports", "seq": 1, "id": victim.id}],
                                "reason": "not mine to erase"})
    link = a.node.links[b.node.public_key]
    res = await a.node.ingest([foreign.envelope], source=link)
    assert res.rejected == [] and res.accepted == 1  # the request itself is B's record

    async def refused(n: InProc, by: Any) -> bool:
        return by.invalid.get("erasure_not_origin") == 1
    await eventually(lambda: refused(a, link), timeout=10)
    assert a.node.storage.get_envelope(victim.id) == victim.envelope
    assert a.node.storage.erasure_of(victim.id) is None

    async def logged() -> bool:  # the log row is written after the count, a moment later
        return any(r.reason == "erasure_not_origin" and "another origin" in r.detail
                   for r in a.node.storage.rejected(10))
    await eventually(logged, timeout=10)

    # The request first, the record after: refused when the record arrives.
    c = await node("Celle", settings={("federation", "accept"): "any"})
    # The origins' key logs ahead of their records (as partners would send them).
    for origin in (a, b):
        assert origin.node.key.log is not None
        c.node.policy.offer_log(origin.node.public_key, origin.node.key.log, None)
    first = await c.node.ingest([foreign.envelope])
    assert first.accepted == 1
    assert c.node.metrics.rejected.labels("erasure_not_origin")._value.get() == 0
    then = await c.node.ingest([victim.envelope])
    assert then.accepted == 1
    await eventually(lambda: _counted(c, "erasure_not_origin"), timeout=10)
    assert c.node.storage.get_envelope(victim.id) == victim.envelope


async def _counted(n: InProc, reason: str) -> bool:
    return bool(n.node.metrics.rejected.labels(reason)._value.get() == 1)


async def _events(n: InProc, query: str, until: Callable[[list[tuple[str, Any]]], bool],
                  out: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """``(event type, JSON data)`` of ``/v1/stream?query`` (events with data only; a
    record's ``cursor`` taken from its ``id``), appended to ``out`` as they come, until
    ``until`` holds of them."""
    async with n.session.get(f"{n.url}/v1/stream?{query}",
                             headers={"Accept": "text/event-stream", **n.auth()},
                             timeout=aiohttp.ClientTimeout(total=30)) as r:
        assert r.status == 200
        buf = b""
        while not until(out):
            buf += await r.content.readany()
            *events, buf = buf.split(b"\r\n\r\n")
            for ev in events:
                fields = dict(line.split(b": ", 1) for line in ev.split(b"\r\n")
                              if b": " in line)
                if b"data" in fields:
                    data = json.loads(fields[b"data"])
                    if fields[b"event"] in (b"erased", b"terms"):
                        assert b"id" not in fields  # no new cursor
                    else:
                        data["cursor"] = int(fields[b"id"])
                    out.append((fields[b"event"].decode(), data))
    return out


async def test_a_live_stream_announces_the_terms_each_record_was_signed_under(
        node: Callable[..., Awaitable[InProc]]) -> None:
    """Issue 13 review: with ``terms=1`` a stream announced the current terms once.
    Live, a record signed under a new card (its licence changed, SIGHUP) is preceded
    by an ``event: terms`` with the terms it was signed under, and the next record
    under the same terms is not."""
    a = await node("Aachen", '\n[feeds.air]\naccess = "public"\nlicense = "CC0-1.0"\n')
    out: list[tuple[str, Any]] = []
    task = asyncio.create_task(_events(a, "feed=air&terms=1", lambda o: len(o) >= 5, out))
    await eventually(lambda: _streams_open(a, 1), timeout=10)
    await a.node.publish("air", "org.example.Air", [{"n": 1}])
    toml = a.node.data_dir / "node.toml"
    toml.write_text(toml.read_text().replace('"CC0-1.0"', '"CC-BY-4.0"'))
    assert await a.node.reload() is not None
    await a.node.publish("air", "org.example.Air", [{"n": 2}])
    await a.node.publish("air", "org.example.Air", [{"n": 3}])
    await asyncio.wait_for(task, 30)
    assert [e for e, _ in out] == ["terms", "record", "terms", "record", "record"]
    assert [d["feeds"][0]["terms"]["license"] for e, d in out if e == "terms"] == [
        "CC0-1.0", "CC-BY-4.0"]
    assert out[0][1]["feeds"][0]["card_time"] <= out[1][1]["time"]
    assert out[1][1]["time"] < out[2][1]["feeds"][0]["card_time"] <= out[3][1]["time"]


async def test_live_streams_are_told_when_a_record_they_sent_is_erased(
        node: Callable[..., Awaitable[InProc]]) -> None:
    """Subscribers following B live (raw SSE, one with a box around the record's
    location; and citynode.client) get A's record with its payload; when A erases it,
    each gets an ``erased`` event with the verified tombstone, naming the request and
    its reason, and no new cursor. A stream that never sent the record is not told."""
    import asyncio

    a = await node("Aachen", '\n[feeds.reports]\naccess = "public"\n')
    b = await node("Bonn")
    for x, y in ((a, b), (b, a)):
        await x.node.add_partner(y.url, y.node.node_id)
    origin = a.node.node_id
    item = {"n": 1, "reported_by": "J. Doe",
            "location": {"type": "Point", "coordinates": [6.08, 50.77]}}

    def erased_seen(evs: list[tuple[str, Any]]) -> bool:
        return any(kind == "erased" for kind, _ in evs)

    seen: list[list[Any]] = [[], [], [], []]
    plain = asyncio.ensure_future(_events(b, f"origin={origin}&feed=reports", erased_seen,
                                          seen[0]))
    boxed = asyncio.ensure_future(_events(b, f"origin={origin}&bbox=6,50,7,51", erased_seen,
                                          seen[1]))
    other = asyncio.ensure_future(_events(b, "feed=elsewhere", erased_seen, seen[2]))

    async def follow() -> list[tuple[int, Any]]:
        got = seen[3]
        async with Client(b.url, node_id=b.node.node_id) as client:
            async for cur, rec in client.subscribe(origin=origin, feed="reports"):
                got.append((cur, rec))
                if rec.is_tombstone:
                    return got
        return got

    followed = asyncio.ensure_future(follow())
    await eventually(lambda: _streams_open(b, 4), timeout=10)
    [rec] = await a.node.publish("reports", "org.example.Report", [item])
    # The erasure comes once every stream sent the record with its payload.
    for i in (0, 1, 3):
        await eventually(lambda i=i: _nonempty(seen[i]), timeout=30)
    request = await a.node.erase([rec.id], REASON)

    for task in (plain, boxed):
        evs = await asyncio.wait_for(task, 30)
        (kind1, sent), (kind2, tomb) = evs
        assert kind1 == "record" and sent["data"]["reported_by"] == "J. Doe"
        assert kind2 == "erased" and tomb["id"] == rec.id.hex()
        assert tomb["erased"] == {"by": request.id.hex(), "reason": REASON}
        assert "data" not in tomb and tomb["cursor"] == sent["cursor"]
    (cur1, first), (cur2, tombstone) = await asyncio.wait_for(followed, 30)
    assert first.id == rec.id and first.data["reported_by"] == "J. Doe"
    assert tombstone.id == rec.id and tombstone.is_tombstone and cur2 == cur1
    # As `citynode subscribe` prints it: a tombstone, no data, no guess at why.
    shown = record_to_json(tombstone, cur2)
    assert shown["tombstone"] is True and shown["id"] == rec.id.hex()
    assert "data" not in shown and "pruned" not in shown and shown["cursor"] == cur1
    assert not other.done()  # nothing it may see was erased
    other.cancel()


async def _erased_at(n: InProc, rid: bytes) -> bool:
    return n.node.storage.erasure_of(rid) is not None


async def _streams_open(n: InProc, count: int) -> bool:
    return len(n.node.streams.subscribers) >= count


async def _holds(n: InProc, rid: bytes) -> bool:
    return n.node.storage.get_envelope(rid) is not None


async def _nonempty(xs: list[Any]) -> bool:
    return bool(xs)
