"""How the gossip role sends one push batch (node/gossip.py ``_split_bulk``): a batch
dominated by one origin goes as two requests at once, so that the other origins'
records are not held up while the next node checks the bulk."""

from __future__ import annotations

from citynode.core.keys import SigningKey
from citynode.core.records import Record, sign_record
from citynode.node.gossip import BULK_SPLIT_MIN, _split_bulk

T = 1_700_000_000_000


def chain(key: SigningKey, n: int, feed: str = "f") -> list[Record]:
    out: list[Record] = []
    prev = None
    for seq in range(1, n + 1):
        r = sign_record(key, feed=feed, seq=seq, prev=prev, time_ms=T,
                        type="org.example.Test", data={"n": seq})
        prev = r.id
        out.append(r)
    return out


def test_a_flood_and_a_few_others_go_as_two_requests_each_origin_whole_in_order() -> None:
    flood, quiet, other = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    fl = chain(flood, BULK_SPLIT_MIN + 10)
    q, o = chain(quiet, 2, "a"), chain(other, 3, "b")
    # as the push queue takes them: round-robin by origin
    batch = [q[0], fl[0], o[0], q[1], fl[1], o[1], fl[2], o[2], *fl[3:]]
    parts = _split_bulk(batch)
    assert len(parts) == 2
    small, bulk = ([batch[i] for i in p] for p in parts)
    assert small == [q[0], o[0], q[1], o[1], o[2]]  # the others first, in their order
    assert bulk == fl  # the flood's chain whole, in order
    assert sorted(parts[0] + parts[1]) == list(range(len(batch)))  # every record once


def test_small_or_single_origin_batches_go_as_one_request() -> None:
    a, b = SigningKey.generate(), SigningKey.generate()
    one_origin = chain(a, BULK_SPLIT_MIN + 5)
    assert _split_bulk(one_origin) == [list(range(len(one_origin)))]
    mixed = chain(a, BULK_SPLIT_MIN - 1) + chain(b, 3)
    assert _split_bulk(mixed) == [list(range(len(mixed)))]
    assert _split_bulk([]) == [[]]
