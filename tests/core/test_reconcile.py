"""Range-based reconciliation of chain heads: sessions find exactly what differs, an
in-sync round is tiny whatever the number of chains, hostile bytes are refused."""

from __future__ import annotations

import random

import pytest

from citynode.core import encoding
from citynode.core import reconcile as rc
from citynode.errors import EncodingError, InvalidRecord

FeedKey = tuple[bytes, str]


def chains(rng: random.Random, origins: int, feeds: int = 5) -> dict[FeedKey, tuple[int, bytes]]:
    return {(rng.randbytes(32), f"f{f}"): (rng.randrange(1, 1000), rng.randbytes(32))
            for _ in range(origins) for f in range(feeds)}


def session(a: dict[FeedKey, tuple[int, bytes]], b: dict[FeedKey, tuple[int, bytes]]
            ) -> tuple[rc.Diff, rc.Diff, int, int]:
    """Run a whole session over the wire encoding; return both diffs, bytes, messages."""
    sa, sb = rc.ChainSet(a), rc.ChainSet(b)
    da, db = rc.Diff(), rc.Diff()
    msg = rc.initial(sa)
    total = n = 0
    side = 1
    while msg:
        data = rc.encode_message(msg)
        total += len(data)
        n += 1
        assert n < 40
        dec = rc.decode_message(data)
        msg = rc.respond(sb, dec, db) if side else rc.respond(sa, dec, da)
        side ^= 1
    return da, db, total, n


def test_in_sync_round_is_tiny_with_5000_chains() -> None:
    a = chains(random.Random(1), 1000)
    _da, _db, nbytes, n = session(a, dict(a))
    assert n == 1 and nbytes < 100  # one fingerprint; the answer is the empty message


@pytest.mark.parametrize("seed", range(6))
def test_session_finds_exactly_the_differences(seed: int) -> None:
    rng = random.Random(seed)
    a = chains(rng, rng.choice([0, 3, 50, 400]))
    b = dict(a)
    for k in rng.sample(sorted(b), min(len(b), rng.randrange(0, 30))):
        if rng.random() < 0.3:
            del b[k]
        else:
            b[k] = (b[k][0] + 1, rng.randbytes(32))
    b.update(chains(rng, rng.randrange(0, 5)))
    da, db, _nbytes, _n = session(a, b)
    # a learns b's differing items; b learns a's (seq 0: a holds none of it).
    assert {k for k, v in db.theirs.items() if v[0]} >= {
        k for k, v in a.items() if b.get(k) != v}
    assert {k for k, v in da.theirs.items() if v[0]} == {
        k for k, v in b.items() if a.get(k) != v}


def test_one_differing_chain_costs_a_few_kilobytes() -> None:
    a = chains(random.Random(3), 1000)
    b = dict(a)
    k = sorted(b)[1234]
    b[k] = (b[k][0] + 1, b"\x07" * 32)
    da, db, nbytes, _n = session(a, b)
    assert da.theirs == {k: b[k]} and db.theirs == {k: a[k]}
    assert nbytes < 5000


def test_chainset_updates_keep_fingerprints_right() -> None:
    rng = random.Random(4)
    items = chains(rng, 30)
    s = rc.ChainSet()
    for (o, f), (seq, h) in items.items():
        s.set(o, f, seq, h)
    k = sorted(items)[5]
    s.set(k[0], k[1], 9, b"\x01" * 32)
    items[k] = (9, b"\x01" * 32)
    assert s.fp(0, len(s)) == rc.ChainSet(items).fp(0, len(s))
    s.remove(*k)
    del items[k]
    assert s.fp(0, len(s)) == rc.ChainSet(items).fp(0, len(s))
    assert s.copy_without([rc.key_bytes(*sorted(items)[0])]).fp(0, len(s) - 1) == \
        rc.ChainSet({x: v for x, v in items.items() if x != sorted(items)[0]}).fp(
            0, len(s) - 1)


def test_answers_stay_within_budget() -> None:
    a = chains(random.Random(5), 400)
    b = chains(random.Random(6), 400)
    msg = rc.respond(rc.ChainSet(b), rc.initial(rc.ChainSet(a)), rc.Diff(),
                     max_ranges=5, max_entries=3)
    assert len(msg) <= 5 and sum(len(r.entries) for r in msg) <= 3


def test_many_ranges_where_we_hold_nothing_get_a_short_answer() -> None:
    """A message of 4,096 fingerprint ranges (the most one may hold) against 100 chains:
    consecutive ranges where we hold nothing are answered as one ("none here": empty
    ENTRIES; SKIP where their fingerprint says they hold none either), so the answer has
    a few ranges per chain held, not 4,096; and it says the same as one range each."""
    rng = random.Random(11)
    ours = chains(rng, 20)
    mine = rc.ChainSet(ours)
    bounds = sorted({rng.randbytes(8) for _ in range(rc.MAX_RANGES)})[:rc.MAX_RANGES - 1]
    fps = [rc.EMPTY_FP if rng.random() < 0.2 else rng.randbytes(16) for _ in bounds]
    msg = [rc.Range(b, rc.FINGERPRINT, fp=fp) for b, fp in zip(bounds, fps, strict=True)]
    msg.append(rc.Range(None, rc.FINGERPRINT, fp=rng.randbytes(16)))
    msg = rc.decode_message(rc.encode_message(msg))
    answer = rc.respond(mine, msg, rc.Diff())
    assert len(answer) <= 2 * len(ours) + 1, len(answer)
    # What the answer says of each key: its bound's range, and the items in it.
    lower = b""
    told: set[bytes] = set()
    for r in answer:
        inside = [k for k in (rc.key_bytes(*c) for c in ours)
                  if k >= lower and (r.bound is None or k < r.bound)]
        if r.mode == rc.ENTRIES:
            assert sorted(inside) == [e[0] for e in r.entries], "an ENTRIES range omits items"
            told.update(inside)
        else:
            assert r.mode == rc.SKIP and not inside, r  # a skip covers none of ours here
        lower = r.bound if r.bound is not None else lower
    # every chain we hold lies in a range they sent a different fingerprint for: told
    assert told == {rc.key_bytes(*c) for c in ours}


def test_session_with_a_side_holding_few_finds_the_differences() -> None:
    rng = random.Random(12)
    a = chains(rng, 400)
    b = {k: a[k] for k in rng.sample(sorted(a), 7)}
    _da, db, _nbytes, _n = session(a, b)
    assert {k for k, v in db.theirs.items() if v[0]} == set(a) - set(b)
    da2, _db2, _nbytes, _n = session(b, a)
    assert {k for k, v in da2.theirs.items() if v[0]} == set(a) - set(b)


# ----------------------------------------------------------------------------- hostile


K = b"\x01" * 32
H = b"\x02" * 32


@pytest.mark.parametrize(("value", "reason"), [
    ({}, "bad_reconcile"),
    ([[None, 1]], "bad_reconcile"),
    ([[b"", 0, None]], "bad_reconcile"),
    ([[b"x" * 97, 0, None]], "bad_reconcile"),
    ([[b"b", 0, None], [b"a", 0, None]], "bad_reconcile"),
    ([[b"a", 0, None], [b"a", 0, None]], "bad_reconcile"),
    ([[None, 0, None], [b"a", 0, None]], "bad_reconcile"),
    ([[None, 9, None]], "bad_reconcile"),
    ([[None, 0, b"x"]], "bad_reconcile"),
    ([[None, 1, b"short"]], "bad_reconcile"),
    ([[None, 2, b"notalist"]], "bad_reconcile"),
    ([[None, 2, [[K, "f", 1]]]], "bad_reconcile"),
    ([[None, 2, [[b"k", "f", 1, H]]]], "bad_reconcile"),
    ([[None, 2, [[K, "f", 0, H]]]], "bad_reconcile"),
    ([[None, 2, [[K, "f", 1, b"h"]]]], "bad_reconcile"),
    ([[None, 2, [[K, "f", 1, H], [K, "f", 2, H]]]], "bad_reconcile"),
    ([[None, 2, [[K, "g", 1, H], [K, "f", 1, H]]]], "bad_reconcile"),
    ([[b"\x01", 2, [[K, "f", 1, H]]]], "bad_reconcile"),  # entry above its bound
    ([[b"\x01", 0, None], [None, 2, [[b"\x00" * 32, "f", 1, H]]]], "bad_reconcile"),
])
def test_hostile_messages_are_refused(value: object, reason: str) -> None:
    with pytest.raises(EncodingError) as exc:
        rc.decode_message(encoding.encode(value))
    assert exc.value.reason == reason


def test_hostile_counts_and_sizes_are_bounded() -> None:
    many = [[bytes([i // 256, i % 256]), 0, None] for i in range(1, 40)]
    with pytest.raises(EncodingError) as exc:
        rc.decode_message(encoding.encode(many), max_ranges=10)
    assert exc.value.reason in ("too_many_items", "too_large")
    entries = [[bytes([i]) + K[1:], "f", 1, H] for i in range(20)]
    with pytest.raises(EncodingError) as exc:
        rc.decode_message(encoding.encode([[None, 2, entries]]), max_entries=10)
    assert exc.value.reason in ("too_many_items", "too_large")
    with pytest.raises(EncodingError) as exc:
        rc.decode_message(b"\x00" * (rc.MAX_MESSAGE_BYTES + 1))
    assert exc.value.reason == "too_large"
    with pytest.raises(EncodingError):
        rc.decode_message(encoding.encode([[None, 2, [[[[[1]]]]]]]))
    with pytest.raises(EncodingError):
        rc.decode_message(b"\xc1")
    with pytest.raises(InvalidRecord):
        rc.decode_message(encoding.encode([[None, 2, [[K, "BAD FEED", 1, H]]]]))


def test_too_many_ranges_are_refused_from_the_array_header() -> None:
    """Issue 16: a message declaring more ranges than allowed is refused from its first
    bytes (nothing after the header is needed: here there is nothing after it), and
    each form of array header counts; a message within the bound decodes as before,
    its ranges equal to those built by hand."""
    for header in (bytes([0x90 | 11]), b"\xdc" + (11).to_bytes(2, "big"),
                   b"\xdd" + (5000).to_bytes(4, "big")):
        with pytest.raises(EncodingError) as exc:
            rc.decode_message(header, max_ranges=10)
        assert exc.value.reason == "too_many_items"
    msg = [rc.Range(b"\x00", rc.SKIP), rc.Range(b"\x00\x01", rc.FINGERPRINT, fp=b"f" * 16),
           rc.Range(None, rc.ENTRIES, entries=((K + b"f", 1, H),))]
    assert rc.decode_message(rc.encode_message(msg), max_ranges=3) == msg
    with pytest.raises(EncodingError) as exc:  # the header is only a hint: still checked
        rc.decode_message(bytes([0x92]) + encoding.encode([None, 0, None]))
    assert exc.value.reason == "malformed"


def test_random_bytes_never_crash() -> None:
    rng = random.Random(7)
    good = rc.encode_message(rc.initial(rc.ChainSet(chains(rng, 3))))
    for _ in range(500):
        data = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            msg = rc.decode_message(bytes(data))
        except (EncodingError, InvalidRecord):
            continue
        rc.respond(rc.ChainSet(chains(rng, 2)), msg, rc.Diff())


def test_a_mode_is_an_integer_not_a_look_alike() -> None:
    """true == 1 and 1.0 == 1 in Python: the decoder must not take them for FINGERPRINT
    (another implementation following the spec refuses them); an unknown mode's echo in
    the error is short."""
    from citynode.core import encoding, reconcile
    from citynode.errors import EncodingError

    for mode in (True, 1.0, False):
        with pytest.raises(EncodingError) as e:
            reconcile.decode_message(encoding.encode([[None, mode, b"\x00" * 16]]))
        assert e.value.reason == "bad_reconcile"
    with pytest.raises(EncodingError) as e:
        reconcile.decode_message(encoding.encode([[None, 10**18, None]]))
    assert len(str(e.value)) < 200
