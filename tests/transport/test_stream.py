"""Live subscriptions (SSE) and the verifying client, against a real in-process node."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from citynode.client import Client
from tests.conftest import InProc

Make = Callable[..., Awaitable[InProc]]


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
