"""Live subscriptions (SSE) and the verifying client, against a real in-process node."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from citynode.client import Client
from citynode.core.filters import RecordFilter
from citynode.core.keys import Verifier
from citynode.core.records import decode_record, open_record
from tests.conftest import InProc

Make = Callable[..., Awaitable[InProc]]


#: On SQLite only: a time limit of 1e-9 s is SQLite's progress handler's to honour;
#: PostgreSQL's statement_timeout counts whole milliseconds, and this query may take
#: less. (The limit on PostgreSQL: tests/storage/test_storage.py, on a larger scan.)
SQLITE_ONLY = {"test_a_reader_query_past_the_time_limit_is_stopped_with_a_clear_answer"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "engine" in metafunc.fixturenames:
        metafunc.parametrize("engine", ["sqlite"] if metafunc.function.__name__
                             in SQLITE_ONLY else ["sqlite", "postgresql"])


@pytest.fixture
def inproc(inproc: Make, engine: str, request: pytest.FixtureRequest) -> Make:
    """Every stream test on both engines: the PostgreSQL leg gives each node its own
    database on the session's server (tests/pg.py), through ``[storage] url``."""
    if engine == "sqlite":
        return inproc
    server = request.getfixturevalue("pg_server")

    async def make(name: str, settings: dict[tuple[str, str], Any] | None = None,
                   **kw: Any) -> InProc:
        url = server.create_database()
        return await inproc(name, settings={**(settings or {}), ("storage", "url"): url},
                            **kw)

    return make


async def _publish(n: InProc, feed: str, items: list[dict]) -> None:
    await n.node.publish(feed, "org.example.Test", items)


async def test_subscriber_resumes_without_gaps_or_duplicates(inproc: Make) -> None:
    n = await inproc("Jakarta")
    await _publish(n, "a", [{"n": i} for i in range(5)])
    got: list[int] = []
    cursors: list[int] = []
    async with Client(n.url, fingerprint=n.node.identity.cert_fingerprint) as c:
        # first connection: from the beginning, stop mid-stream after 7 records
        async def first() -> None:
            async for cur, rec in c.subscribe(feed="a", last_event_id=0):
                got.append(rec.data["n"])
                cursors.append(cur)
                if len(got) == 3:
                    await _publish(n, "a", [{"n": i} for i in range(5, 10)])
                if len(got) == 7:
                    return

        await asyncio.wait_for(first(), 20)
        # records published while disconnected
        await _publish(n, "a", [{"n": i} for i in range(10, 15)])

        async def second() -> None:
            async for cur, rec in c.subscribe(feed="a", last_event_id=cursors[-1]):
                got.append(rec.data["n"])
                cursors.append(cur)
                if len(got) == 15:
                    return

        await asyncio.wait_for(second(), 20)
    assert got == list(range(15))
    assert cursors == sorted(set(cursors))


async def test_stream_filters_and_other_feeds_do_not_leak(inproc: Make) -> None:
    n = await inproc("Seoul")
    await _publish(n, "wanted", [{"n": 0}])  # before the subscription's cursor
    start = n.node.storage.max_rowid()
    out: list[int] = []
    async with Client(n.url, fingerprint=n.node.identity.cert_fingerprint) as c:
        async def sub() -> None:
            async for _cur, rec in c.subscribe(feed="wanted", last_event_id=start):
                out.append(rec.data["n"])
                if rec.data["n"] == 2:
                    return

        task = asyncio.create_task(sub())
        await _publish(n, "other", [{"n": 9}])
        await _publish(n, "wanted", [{"n": 1}, {"n": 2}])
        await asyncio.wait_for(task, 10)
    assert out == [1, 2]


async def test_client_query_and_get_verify(inproc: Make) -> None:
    n = await inproc("Surabaya")
    await _publish(n, "q", [{"n": i} for i in range(30)])
    async with Client(n.url, fingerprint=n.node.identity.cert_fingerprint) as c:
        recs = [r async for r in c.query(feed="q", page_size=7)]
        assert [r.seq for r in recs] == list(range(1, 31))
        one = await c.get(recs[4].id)
        assert one.data == {"n": 4}


async def _sse(n: InProc, query: str, want: int, out: list[tuple[int, str, int]],
               headers: dict[str, str] | None = None) -> None:
    """Read raw events of ``/v1/stream?query`` into ``out`` as (cursor, feed, n) until
    ``want`` have come."""
    import json

    async with n.session.get(f"{n.url}/v1/stream?{query}", headers={
            "Accept": "text/event-stream", **(headers or {})},
            timeout=aiohttp.ClientTimeout(total=None)) as r:
        assert r.status == 200
        buf = b""
        while len(out) < want:
            buf += await r.content.readany()
            *events, buf = buf.split(b"\r\n\r\n")
            for ev in events:
                if ev.startswith(b":"):
                    continue
                fields = dict(line.split(b": ", 1) for line in ev.split(b"\r\n"))
                if fields.keys() == {b"id"}:  # the cursor the stream starts after
                    continue
                if fields[b"data"].startswith(b"{"):
                    rec = json.loads(fields[b"data"])
                    out.append((int(fields[b"id"]), rec["feed"], rec["data"]["n"]))
                else:  # ?format=envelope: the signed envelope alone, verified here
                    opened = open_record(*decode_record(base64.b64decode(fields[b"data"])),
                                         now_ms=2**62, verifier=Verifier(),
                                         key_states=n.node.policy.keys.state)
                    out.append((int(fields[b"id"]), opened.feed, opened.data["n"]))


async def _follow_feed_f(n: InProc, want: int
                         ) -> tuple[asyncio.Task[None], list[tuple[int, str, int]]]:
    """A stream of feed ``f`` from now on, registered at the node when this returns;
    the task ends once ``want`` events came (into the list returned)."""
    start = n.node.storage.max_rowid()
    out: list[tuple[int, str, int]] = []
    task = asyncio.create_task(_sse(n, f"feed=f&after={start}", want, out))
    while not n.node.subscribers:
        await asyncio.sleep(0.01)
    return task, out


async def test_streams_share_the_tail_but_each_sees_only_its_own(inproc: Make) -> None:
    """Streams with one filter and reader share the tail's batches; streams with other
    filters or readers get exactly their own rows, in order, once each."""
    n = await inproc("Jakarta", feeds={"priv": "partners"})
    start = n.node.storage.max_rowid()
    plan = [("a", 0), ("b", 1), ("priv", 2), ("a", 3), ("priv", 4), ("b", 5), ("a", 6)]
    streams: dict[str, tuple[str, dict[str, str] | None, int]] = {
        "a1": (f"feed=a&after={start}", None, 3),
        "a2": (f"feed=a&after={start}", None, 3),
        "a3": (f"feed=a&after={start}", None, 3),
        "anyone": (f"after={start}", None, 5),
        "operator": (f"after={start}", n.auth(), 7),
        "priv-anon": (f"feed=priv&after={start}", None, 1),  # must stay empty
    }
    got: dict[str, list[tuple[int, str, int]]] = {k: [] for k in streams}
    tasks = {k: asyncio.create_task(_sse(n, q, want, got[k], h))
             for k, (q, h, want) in streams.items()}
    while len(n.node.subscribers) < len(streams):
        await asyncio.sleep(0.01)
    for feed, i in plan:  # one commit each: many tail batches
        await _publish(n, feed, [{"n": i}])
    waited = [t for k, t in tasks.items() if k != "priv-anon"]
    await asyncio.wait_for(asyncio.gather(*waited), 20)
    await asyncio.sleep(0.3)  # a leak would have been written by now
    assert not tasks["priv-anon"].done() and got["priv-anon"] == []
    tasks["priv-anon"].cancel()
    for k in ("a1", "a2", "a3"):
        assert [(f, i) for _c, f, i in got[k]] == [("a", 0), ("a", 3), ("a", 6)]
    assert [(f, i) for _c, f, i in got["anyone"]] == [p for p in plan if p[0] != "priv"]
    assert [(f, i) for _c, f, i in got["operator"]] == plan
    for events in got.values():
        assert [c for c, _f, _i in events] == sorted({c for c, _f, _i in events})


async def test_a_stream_that_falls_behind_rereads_the_database(
        inproc: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow subscriber (every write takes 50 ms, as over a slow link) with room for one
    waiting batch overflows; it must catch up from the database and still get every
    record once, in order."""
    from aiohttp_sse import EventSourceResponse

    import citynode.node.streams

    monkeypatch.setattr(citynode.node.streams, "STREAM_QUEUE_BATCHES", 1)
    write = EventSourceResponse.write

    async def slow_write(self: EventSourceResponse, data: bytes) -> None:
        await asyncio.sleep(0.05)
        await write(self, data)

    monkeypatch.setattr(EventSourceResponse, "write", slow_write)
    n = await inproc("Seoul")
    task, out = await _follow_feed_f(n, 60)
    for i in range(0, 60, 3):  # 20 commits, published without waiting for the stream
        await _publish(n, "f", [{"n": i}, {"n": i + 1}, {"n": i + 2}])
    await asyncio.wait_for(task, 20)
    assert [i for _c, _f, i in out] == list(range(60))
    lagged = n.node.metrics.stream_lagged._value.get()
    assert lagged >= 1, "the stream never fell behind: the test did not test the fallback"


def test_stream_batch_after_a_cursor() -> None:
    from citynode.node import StreamBatch

    b = StreamBatch([5, 7, 9], ["e5", "e7", "e9"], b"e5e7e9", [])
    assert b.after(4) is b.chunk
    assert b.after(5) == b"e7e9"
    assert b.after(8) == b"e9"
    assert b.after(9) == b""


async def test_a_failed_hand_out_is_retried_not_lost(inproc: Make) -> None:
    """If handing rows to the streams fails once (a bug, say), the tail must not move
    past them: they are handed out again, and each stream gets each row once."""
    n = await inproc("Surabaya")
    task, out = await _follow_feed_f(n, 6)
    real = n.node.streams.fan_out
    calls: list[int] = []

    def flaky(rows: list, texts: dict) -> None:
        calls.append(len(rows))
        if len(calls) == 1:
            raise RuntimeError("injected failure")
        real(rows, texts)

    n.node.streams.fan_out = flaky  # type: ignore[method-assign]
    await _publish(n, "f", [{"n": i} for i in range(3)])
    await _publish(n, "f", [{"n": i} for i in range(3, 6)])
    await asyncio.wait_for(task, 20)
    assert [i for _c, _f, i in out] == list(range(6))
    assert len(calls) >= 2 and calls[0] >= 3  # the failed rows came round again


async def test_a_reader_query_past_the_time_limit_is_stopped_with_a_clear_answer(
        inproc: Make) -> None:
    """[limits] query_time_limit_seconds bounds readers' queries: /v1/records answers 503
    query_too_slow, and a stream catching up ends with an error event that the client
    raises as QueryTooSlow (not retried forever)."""
    from citynode.errors import QueryTooSlow

    n = await inproc("Jakarta", settings={("limits", "query_time_limit_seconds"): 1e-9})
    await _publish(n, "f", [{"n": i} for i in range(1500)])
    # The operator reads everything: no per-feed restriction narrows the scan.
    async with n.session.get(f"{n.url}/v1/records?feed=nothing",
                             headers={"Accept": "application/json", **n.auth()}) as r:
        assert r.status == 503
        assert (await r.json())["error"] == "query_too_slow"
    async with Client(n.url, fingerprint=n.node.identity.cert_fingerprint) as c:
        async def follow() -> None:
            async for _ in c.subscribe(feed="nothing", last_event_id=0,
                                       retry_seconds=0.1):
                pass

        with pytest.raises(QueryTooSlow, match="narrow it"):
            await asyncio.wait_for(follow(), 10)


async def test_a_stream_that_cannot_open_fails_at_once_with_a_clear_error(
        inproc: Make) -> None:
    """Reconnecting is for streams that broke. One that never opened (the node's
    self-signed certificate not pinned, nothing listening) is reported, not retried."""
    from citynode.errors import PeerError

    n = await inproc("Seoul")

    async def first(c: Client) -> None:
        async for _ in c.subscribe(feed="f", retry_seconds=0.1):
            return

    async with Client(n.url) as c:  # no node id or fingerprint: the system's CAs
        with pytest.raises(PeerError, match="certificate is not trusted"):
            await asyncio.wait_for(first(c), 10)
    async with Client("https://127.0.0.1:9", fingerprint=b"\0" * 32) as c:
        with pytest.raises(PeerError, match=r"127\.0\.0\.1:9"):
            await asyncio.wait_for(first(c), 10)


async def test_plain_http_to_a_tls_node_says_to_use_https(inproc: Make) -> None:
    from citynode.errors import PeerError

    n = await inproc("Surabaya")
    async with Client(f"http://127.0.0.1:{n.port}") as c:
        with pytest.raises(PeerError, match="try https://"):
            await asyncio.wait_for(c.get("00" * 32), 10)


async def test_an_invalid_filter_is_refused_not_a_silent_stream(inproc: Make) -> None:
    """A stream of a feed that cannot exist (not a valid feed name), or with an empty
    filter, is a 400 at once; the client raises it rather than waiting forever."""
    from citynode.errors import PeerRejected

    n = await inproc("Jakarta")
    for q, message in [("feed=BAD%20FEED", "feed is not a valid feed name"),
                       ("type=", "query parameter type is empty"),
                       ("bbox=", "query parameter bbox is empty")]:
        async with n.session.get(f"{n.url}/v1/stream?{q}",
                                 headers={"Accept": "text/event-stream"}) as r:
            assert r.status == 400, q
            body = await r.json()
        assert body["error"] == "bad_request" and message in body["message"], (q, body)
    assert not n.node.subscribers

    async with Client(n.url, fingerprint=n.node.identity.cert_fingerprint) as c:
        async def follow() -> None:
            async for _ in c.subscribe(feed="Bad Feed", retry_seconds=0.1):
                pass

        with pytest.raises(PeerRejected, match="not a valid feed name") as e:
            await asyncio.wait_for(follow(), 10)
        assert e.value.status == 400


async def test_shutdown_ends_live_streams_cleanly(inproc: Make) -> None:
    """The server's shutdown (aiohttp on_shutdown, run by runner.cleanup()) ends live
    streams at once: each response completes properly and the stream unregisters. A
    stream asked for after that is refused (503) rather than held open."""
    n = await inproc("Seoul")
    await _publish(n, "f", [{"n": 0}])
    async with n.session.get(f"{n.url}/v1/stream?after=0",
                             headers={"Accept": "text/event-stream"},
                             timeout=aiohttp.ClientTimeout(total=None)) as r:
        assert r.status == 200 and len(n.node.subscribers) == 1
        start = await asyncio.wait_for(r.content.readuntil(b"\r\n\r\n"), 5)
        assert start == b"id: 0\r\n\r\n"  # the cursor the stream starts after
        first = await asyncio.wait_for(r.content.readuntil(b"\r\n\r\n"), 5)
        await n.runner.shutdown()
        # EOF within moments; a response cut off mid-way would raise here.
        rest = await asyncio.wait_for(r.content.read(), 5)
    assert b"event: record" in first and b"event:" not in rest
    assert not n.node.subscribers  # the handler's cleanup ran
    async with n.session.get(f"{n.url}/v1/stream",
                             headers={"Accept": "text/event-stream"}) as r:
        assert r.status == 503
        assert "shutting down" in (await r.json())["message"]


async def test_the_compact_format_carries_the_envelope_alone(inproc: Make) -> None:
    """?format=envelope: the same events (catch-up and live, same cursors, same access)
    with only the signed envelope as data; a JSON stream beside it keeps its format."""
    n = await inproc("Jakarta", feeds={"priv": "partners"})
    start = n.node.storage.max_rowid()
    await _publish(n, "a", [{"n": 0}, {"n": 1}])
    await _publish(n, "priv", [{"n": 9}])
    want = {"compact": 4, "json": 4, "priv-compact": 1}
    queries = {"compact": f"feed=a&after={start}&format=envelope",
               "json": f"feed=a&after={start}",
               "priv-compact": f"feed=priv&after={start}&format=envelope"}
    got: dict[str, list[tuple[int, str, int]]] = {k: [] for k in want}
    tasks = {k: asyncio.create_task(_sse(n, queries[k], want[k], got[k])) for k in want}
    while len(n.node.subscribers) < len(want):
        await asyncio.sleep(0.01)
    await _publish(n, "a", [{"n": 2}, {"n": 3}])  # live, from the shared tail
    await asyncio.wait_for(asyncio.gather(tasks["compact"], tasks["json"]), 20)
    await asyncio.sleep(0.3)
    assert got["compact"] == got["json"] and [i for _c, _f, i in got["json"]] == [0, 1, 2, 3]
    assert not tasks["priv-compact"].done() and got["priv-compact"] == []
    tasks["priv-compact"].cancel()
    # The compact event is about half the bytes of the JSON one.
    row = n.node.storage.query(after_rowid=start, limit=1)[0]
    from citynode.transport.api_stream import sse_envelope_event, sse_event

    assert len(sse_envelope_event(row)) < 0.65 * len(sse_event(row))
    async with n.session.get(f"{n.url}/v1/stream?format=xml") as r:
        assert r.status == 400 and "format must be json" in await r.text()


class _Cable:
    """A TCP forwarder on 127.0.0.1 in front of a node (TLS passes through it), whose
    connections can be cut, as a network outage would."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def plug(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.transport.abort()
        self.writers = []
        await self.server.wait_closed()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.writers += [w, uw]

        async def pipe(a: asyncio.StreamReader, b: asyncio.StreamWriter) -> None:
            try:
                while data := await a.read(65536):
                    b.write(data)
                    await b.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                b.close()

        await asyncio.gather(pipe(r, uw), pipe(ur, w))


@pytest.mark.parametrize("first_cut", ["before any record", "after records"])
async def test_a_cut_connection_resumes_with_nothing_lost(inproc: Make, first_cut: str
                                                          ) -> None:
    """The network drops under a live subscription (started from "now", no cursor of
    its own) and comes back: the client reconnects by itself and ends with exactly the
    records published, in order -- also those published while it was cut off, and also
    when it was cut off before its first record (it resumes from the cursor the node
    sent first, not from "now" again)."""
    n = await inproc("Jakarta")
    cable = _Cable(n.node.config.node.listen_port)
    await cable.plug()
    got: list[int] = []

    async def follow() -> None:
        async with Client(f"https://127.0.0.1:{cable.port}",
                          fingerprint=n.node.identity.cert_fingerprint) as c:
            async for _cursor, rec in c.subscribe(feed="a", retry_seconds=0.1):
                got.append(rec.data["n"])

    async def until(cond: Callable[[], bool]) -> None:
        for _ in range(200):
            if cond():
                return
            await asyncio.sleep(0.05)
        pytest.fail(f"not reached; got {got}")

    task = asyncio.create_task(follow())
    try:
        await until(lambda: len(n.node.subscribers) == 1)
        sent = 0
        if first_cut == "after records":
            await _publish(n, "a", [{"n": i} for i in range(3)])
            sent = 3
            await until(lambda: len(got) == 3)
        before = set(n.node.subscribers)
        await cable.cut()
        await _publish(n, "a", [{"n": i} for i in range(sent, sent + 3)])  # while cut off
        await asyncio.sleep(0.3)
        await cable.plug()
        await until(lambda: any(s not in before for s in n.node.subscribers))
        await _publish(n, "a", [{"n": i} for i in range(sent + 3, sent + 5)])
        await until(lambda: len(got) >= sent + 5)
        await asyncio.sleep(0.3)  # nothing more (no duplicate) may come
        assert got == list(range(sent + 5))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await cable.cut()


async def test_last_event_id_header_resumes_after_that_cursor(inproc: Make) -> None:
    """The standard way to resume (what an EventSource sends): the Last-Event-ID header,
    not ?after=; the stream starts with that cursor, then the records after it."""
    n = await inproc("Jakarta")
    await _publish(n, "a", [{"n": i} for i in range(4)])
    rows = n.node.storage.query(RecordFilter(feed="a"), limit=10)
    async with n.session.get(f"{n.url}/v1/stream?feed=a", headers={
            "Accept": "text/event-stream", "Last-Event-ID": str(rows[1].rowid)},
            timeout=aiohttp.ClientTimeout(total=None)) as r:
        assert r.status == 200
        start = await asyncio.wait_for(r.content.readuntil(b"\r\n\r\n"), 5)
        assert start == f"id: {rows[1].rowid}\r\n\r\n".encode()
        events = [await asyncio.wait_for(r.content.readuntil(b"\r\n\r\n"), 5)
                  for _ in range(2)]
    assert [e.split(b"\r\n")[0] for e in events] == [f"id: {x.rowid}".encode()
                                                      for x in rows[2:4]]
    assert all(b'"data": {"n": ' in e for e in events)


async def test_commits_cost_no_tail_read_while_nobody_streams(
        inproc: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tail reads new rows to hand them to live streams: with none open, a commit
    reads nothing; a stream opened later starts after the newest record and gets what
    comes next, once."""
    n = await inproc("Quito")
    reads: list[int] = []
    real = n.node.streams._tail_read

    def counted(after: int, renders: set) -> tuple:
        reads.append(after)
        return real(after, renders)

    monkeypatch.setattr(n.node.streams, "_tail_read", counted)
    for i in range(3):
        await _publish(n, "f", [{"n": i}])
    await asyncio.sleep(0.2)
    assert reads == []
    task, out = await _follow_feed_f(n, 2)
    await _publish(n, "f", [{"n": 10}, {"n": 11}])
    await asyncio.wait_for(task, 20)
    assert [i for _c, _f, i in out] == [10, 11]
    assert reads  # now someone listens: the tail reads
