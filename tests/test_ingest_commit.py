"""How ingest commits records pushed one per request (node/ingest.py
``Ingest.start_commit``): a lone one is written at once (no trip round the event loop),
records of requests that arrive together share commits."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from citynode.core.keys import SigningKey
from citynode.core.records import sign_record
from tests.conftest import InProc

Make = Callable[..., Awaitable[InProc]]


async def test_a_lone_record_commits_at_once_and_records_together_share_commits(
        inproc: Make) -> None:
    a = await inproc("Jakarta", settings={("federation", "accept"): "any"})
    b = await inproc("Singapore")
    await a.node.add_partner(b.url, b.node.node_id)
    link = a.node.links[b.node.public_key]
    now = a.node.now_ms()
    recs = [sign_record(SigningKey(bytes([40 + i]) * 32), feed="weather", seq=1, prev=None,
                        time_ms=now, type="org.example.Test", data={"n": i})
            for i in range(9)]
    storage = a.node.storage
    await asyncio.sleep(0.1)  # the start's own writes are done
    before = storage.stats().batches
    out = await a.node.ingest([recs[0].envelope], source=link)
    assert out.accepted == 1
    assert storage.stats().batches == before + 1  # committed when ingest returned
    assert a.node.seq((recs[0].origin, "weather")) == 1
    # Eight requests at once, one record each: not eight commits.
    before = storage.stats().batches
    outs = await asyncio.gather(*(a.node.ingest([r.envelope], source=link)
                                  for r in recs[1:]))
    assert [o.accepted for o in outs] == [1] * 8
    assert storage.stats().batches - before <= 3
    assert all(a.node.seq((r.origin, "weather")) == 1 for r in recs)
