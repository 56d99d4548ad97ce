"""A relay checks each record's signature once: copies of a record already held, on its
way to the database, or being checked for another copy right now are not checked again
(citynode_records_verified counts the checks). A copy whose first check failed is checked
on its own: its signature may be the valid one."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from citynode.core.keys import SigningKey
from citynode.core.records import Record, encode_record, sign_record
from tests.conftest import InProc

Make = Callable[..., Awaitable[InProc]]


def _chain(key: SigningKey, n: int, now: int, feed: str = "weather") -> list[Record]:
    out: list[Record] = []
    for seq in range(1, n + 1):
        out.append(sign_record(key, feed=feed, seq=seq, prev=out[-1].id if out else None,
                               time_ms=now, type="org.example.Test", data={"n": seq}))
    return out


def _verified(n: InProc) -> float:
    return n.node.metrics.verified._value.get()  # type: ignore[attr-defined, no-any-return]


async def _pair(inproc: Make) -> tuple[InProc, InProc, InProc]:
    a = await inproc("Jakarta", settings={("federation", "accept"): "any"})
    b = await inproc("Singapore")
    c = await inproc("Manila")
    for x, y in ((a, b), (a, c)):
        await x.node.add_partner(y.url, y.node.node_id)
        await y.node.add_partner(x.url, x.node.node_id)
    return a, b, c


async def test_copies_arriving_together_are_verified_once(inproc: Make) -> None:
    a, b, c = await _pair(inproc)
    recs = _chain(SigningKey(b"\x21" * 32), 12, a.node.now_ms())
    envs = [r.envelope for r in recs]
    from_b, from_c = a.node.links[b.node.public_key], a.node.links[c.node.public_key]
    # Batches large enough to be checked in a worker thread: the second ingest starts
    # while the first is checking, and finds the same ids being checked.
    outs = await asyncio.gather(
        a.node.ingest(envs[:8], source=from_b), a.node.ingest(envs[:8], source=from_c),
        a.node.ingest(envs[:8], source=from_b))
    assert sum(o.accepted for o in outs) == 8
    assert sum(o.duplicates for o in outs) == 16
    assert _verified(a) == 8
    # A single live record at a time (checked on the event loop), and its copies.
    for env in envs[8:]:
        outs = await asyncio.gather(a.node.ingest([env], source=from_b),
                                    a.node.ingest([env], source=from_c))
        assert sorted(o.accepted for o in outs) == [0, 1]
    assert _verified(a) == 12
    # Copies of records in the database, though no longer among those committed lately
    # (as after a restart): looked up, not verified.
    a.node.replica._recent.clear()
    out = await a.node.ingest(envs[:3], source=from_c)
    assert out.duplicates == 3 and out.accepted == 0
    out = await a.node.ingest([envs[5]], source=from_b)
    assert out.duplicates == 1
    assert _verified(a) == 12
    assert sum(f.count for f in await a.node.reads.feeds()) == 12


async def test_a_bad_copy_does_not_shadow_a_good_one(inproc: Make) -> None:
    a, b, c = await _pair(inproc)
    recs = _chain(SigningKey(b"\x22" * 32), 6, a.node.now_ms())
    good = [r.envelope for r in recs]
    bad = []
    for r in recs:  # a signature byte changed: same body, same id
        bad.append(encode_record(r.body, r.sig[:-1] + bytes([r.sig[-1] ^ 1]), r.payload))
    from_b, from_c = a.node.links[b.node.public_key], a.node.links[c.node.public_key]
    first, second = await asyncio.gather(a.node.ingest(bad, source=from_b),
                                         a.node.ingest(good, source=from_c))
    assert [r for _i, r in first.rejected] == ["bad_signature"] * 6
    assert second.accepted == 6 and not second.rejected
    assert _verified(a) == 12  # each copy that had to be checked, once
    assert sum(f.count for f in await a.node.reads.feeds()) == 6



async def test_live_records_arriving_together_are_verified_together(inproc: Make) -> None:
    """Single live records of many partners' pushes at once: verified in shared trips
    to a worker thread, each with its own verdict."""
    a, b, _c = await _pair(inproc)
    now = a.node.now_ms()
    chains = [_chain(SigningKey(bytes([0x30 + k]) * 32), 3, now) for k in range(8)]
    from_b = a.node.links[b.node.public_key]
    for seq in range(3):
        envs = [ch[seq].envelope for ch in chains]
        r = chains[5][seq]
        # a signature byte changed: its chain stops here, later records of it wait
        envs[5] = encode_record(r.body, r.sig[:-1] + bytes([r.sig[-1] ^ 1]), r.payload)
        outs = await asyncio.gather(*(a.node.ingest([e], source=from_b) for e in envs))
        assert [o.accepted + o.pending for o in outs] == [1, 1, 1, 1, 1, 0, 1, 1]
        assert [r for _i, r in outs[5].rejected] == ["bad_signature"]
    assert _verified(a) == 24
    assert sum(f.count for f in await a.node.reads.feeds()) == 7 * 3


async def test_copies_of_records_held_ahead_of_a_gap_are_not_verified_again(
        inproc: Make) -> None:
    a, b, c = await _pair(inproc)
    recs = _chain(SigningKey(b"\x24" * 32), 12, a.node.now_ms())
    envs = [r.envelope for r in recs]
    from_b, from_c = a.node.links[b.node.public_key], a.node.links[c.node.public_key]
    out = await a.node.ingest(envs[1:3], source=from_b)  # seq 2, 3: a gap before them
    assert out.pending == 2
    out = await a.node.ingest(envs[1:3], source=from_c)  # checked alone, on the loop
    assert out.duplicates == 2 and out.pending == 0
    out = await a.node.ingest(envs[3:10], source=from_b)  # seq 4-10: pending too
    assert out.pending == 7
    out = await a.node.ingest(envs[2:10], source=from_c)  # a batch: in a worker thread
    assert out.duplicates == 8
    assert _verified(a) == 9
    out = await a.node.ingest(envs[:1], source=from_c)  # the gap is filled: all stored
    assert out.accepted == 1
    assert _verified(a) == 10
    assert sum(f.count for f in await a.node.reads.feeds()) == 10
