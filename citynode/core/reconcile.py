"""Range-based set reconciliation of chain heads (negentropy-style), pure.

Two nodes in sync should pay a few bytes to learn so, not a frontier of one entry per
chain (about 40 bytes each: 200 KB for 5,000 chains). Each node's set of chains is the
sorted list of **items** ``(key, seq, head)`` where ``key`` is the bytes
``origin (32) || feed (UTF-8)``; byte order of keys equals the (origin, feed) order of
frontiers. A message is a list of **ranges** covering the key space in order, each with
an exclusive upper **bound** (``None``: the end of the key space); a range starts where
the previous one ended (the first at the empty key). Each range carries one of:

* ``SKIP``: nothing to say (the sender knows this range matches);
* ``FINGERPRINT``: 16 bytes summarising the sender's items in the range
  (:func:`fingerprint`): the receiver answers ``SKIP`` if its own matches, its items
  (``ENTRIES``) if it holds at most :data:`LEAF` of them, otherwise :data:`SPLIT`
  sub-ranges of equal item counts, each with its fingerprint;
* ``ENTRIES``: every item the sender holds in the range; the receiver learns what
  differs, and answers ``FINAL`` with its own items in the range that the sender lacks
  or holds at another ``(seq, head)``;
* ``FINAL``: items that differ, sent in answer to ``ENTRIES``; no answer.

A session starts with :func:`initial` (one fingerprint of everything) and alternates
:func:`respond` until a side has nothing to send. In sync: one round trip of 23 bytes
whatever the number of chains. One chain differing among 5,000: six messages, about
1.4 KB. Both sides learn, in :class:`Diff`, the items of the other that differ from
theirs; the replica turns them into pulls, fork checks and own-feed safety.

Strict bounds on what is decoded (:func:`decode_message`): message bytes, ranges,
entries, nesting, bound length, order; and on what is built (:func:`respond` never
exceeds ``max_ranges`` / ``max_entries``: ranges past the budget are answered with their
fingerprint unsplit, to be split in a later round).
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from citynode.core import encoding
from citynode.core.records import MAX_SEQ, check_feed_name
from citynode.core.sync import announced_length
from citynode.errors import EncodingError

__all__ = [
    "EMPTY_FP",
    "ENTRIES",
    "FINAL",
    "FINGERPRINT",
    "LEAF",
    "MAX_BOUND",
    "MAX_MESSAGE_BYTES",
    "MAX_RANGES",
    "MAX_RECONCILE_ENTRIES",
    "SKIP",
    "SPLIT",
    "ChainSet",
    "Diff",
    "Range",
    "decode_message",
    "encode_message",
    "fingerprint",
    "initial",
    "item_hash",
    "key_bytes",
    "respond",
    "split_key",
]

SKIP, FINGERPRINT, ENTRIES, FINAL = 0, 1, 2, 3
LEAF = 16  # a range of at most this many items is sent as entries, not split
SPLIT = 16  # sub-ranges a mismatched range is split into
MAX_RANGES = 4096
MAX_RECONCILE_ENTRIES = 8192
MAX_BOUND = 32 + 64  # origin + the longest feed name
FP_BYTES = 16
MAX_MESSAGE_BYTES = 1 << 20
_MOD = 1 << 128
_ITEM_DOMAIN = b"citynode-sync-item-v1\0"
_FP_DOMAIN = b"citynode-sync-fp-v1\0"

Item = tuple[bytes, int, bytes]
"""(key bytes, seq, head id)."""


def key_bytes(origin: bytes, feed: str) -> bytes:
    """The reconciliation key of a chain: ``origin || feed`` (feed names are ASCII)."""
    return origin + feed.encode()


def split_key(key: bytes) -> tuple[bytes, str]:
    """Inverse of :func:`key_bytes`."""
    return key[:32], key[32:].decode()


def item_hash(key: bytes, seq: int, head: bytes) -> int:
    """The 128-bit hash of one item, as an integer: the first 16 bytes (big-endian) of
    ``SHA-256("citynode-sync-item-v1\\0" || u8 len(key) || key || u64be seq || head)``."""
    h = hashlib.sha256(_ITEM_DOMAIN + bytes([len(key)]) + key + seq.to_bytes(8, "big") + head)
    return int.from_bytes(h.digest()[:FP_BYTES], "big")


def fingerprint(count: int, total: int) -> bytes:
    """Fingerprint of a set of ``count`` items whose hashes sum to ``total`` (mod 2^128):
    the first 16 bytes of ``SHA-256("citynode-sync-fp-v1\\0" || u64be count || u128be
    sum)``. A sum, so a range's fingerprint costs one addition per item, not a tree."""
    data = _FP_DOMAIN + count.to_bytes(8, "big") + (total % _MOD).to_bytes(16, "big")
    return hashlib.sha256(data).digest()[:FP_BYTES]


#: The fingerprint of no items (a range where a side holds nothing).
EMPTY_FP = fingerprint(0, 0)


class ChainSet:
    """One node's items, sorted by key, with item hashes kept for fingerprints.

    Updating a chain's head is O(1) (a new chain is an insertion into a sorted list).
    """

    __slots__ = ("_hashes", "_index", "_keys", "_total", "_vals")

    def __init__(self, items: Mapping[tuple[bytes, str], tuple[int, bytes]] | None = None
                 ) -> None:
        self._keys: list[bytes] = []
        self._hashes: list[int] = []
        self._vals: dict[bytes, tuple[int, bytes]] = {}
        self._index: dict[bytes, int] | None = {}
        self._total = 0
        if items:
            rows = sorted((key_bytes(o, f), v) for (o, f), v in items.items())
            self._keys = [k for k, _ in rows]
            self._hashes = [item_hash(k, s, h) for k, (s, h) in rows]
            self._vals = dict(rows)
            self._total = sum(self._hashes)
            self._index = None

    def _pos(self, key: bytes) -> int:
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self._keys)}
        return self._index[key]

    def set(self, origin: bytes, feed: str, seq: int, head: bytes) -> None:
        """Set a chain's item (a new head, or a new chain)."""
        key = key_bytes(origin, feed)
        h = item_hash(key, seq, head)
        if key in self._vals:
            i = self._pos(key)
            self._total += h - self._hashes[i]
            self._hashes[i] = h
        else:
            i = bisect.bisect_left(self._keys, key)
            self._keys.insert(i, key)
            self._hashes.insert(i, h)
            self._total += h
            self._index = None  # positions after i moved
        self._vals[key] = (seq, head)

    def remove(self, origin: bytes, feed: str) -> None:
        """Forget a chain (no-op if absent)."""
        key = key_bytes(origin, feed)
        if key not in self._vals:
            return
        i = self._pos(key)
        self._total -= self._hashes[i]
        del self._keys[i], self._hashes[i], self._vals[key]
        self._index = None

    def get(self, key: bytes) -> tuple[int, bytes] | None:
        return self._vals.get(key)

    def index(self, bound: bytes | None) -> int:
        """Position of the first item with key >= ``bound`` (the end for None)."""
        return len(self._keys) if bound is None else bisect.bisect_left(self._keys, bound)

    def fp(self, i: int, j: int) -> bytes:
        """Fingerprint of the items at positions ``i..j-1``."""
        if i == 0 and j == len(self._keys):
            return fingerprint(j, self._total)
        return fingerprint(j - i, sum(self._hashes[i:j]))

    def items(self, i: int, j: int) -> list[Item]:
        return [(k, *self._vals[k]) for k in self._keys[i:j]]

    def key_at(self, i: int) -> bytes:
        return self._keys[i]

    def copy_without(self, hidden: Iterable[bytes]) -> ChainSet:
        """A copy less the chains whose keys are in ``hidden`` (a partner may not be told
        of them)."""
        out = ChainSet()
        drop = set(hidden)
        for k, h in zip(self._keys, self._hashes, strict=True):
            if k not in drop:
                out._keys.append(k)
                out._hashes.append(h)
                out._vals[k] = self._vals[k]
                out._total += h
        out._index = None
        return out

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._vals


@dataclass(frozen=True, slots=True)
class Range:
    """One range of a message: items with keys below ``bound`` (None: all the rest)."""

    bound: bytes | None
    mode: int
    fp: bytes | None = None
    entries: tuple[Item, ...] = ()


# Range's slot setters (its frozen __setattr__ bypassed: see _range).
_new_range = object.__new__
_set_bound: Callable[[Range, bytes | None], None] = Range.__dict__["bound"].__set__
_set_mode: Callable[[Range, int], None] = Range.__dict__["mode"].__set__
_set_fp: Callable[[Range, bytes | None], None] = Range.__dict__["fp"].__set__
_set_entries: Callable[[Range, tuple[Item, ...]], None] = Range.__dict__["entries"].__set__


@dataclass
class Diff:
    """What one side learnt of the other in a session: ``theirs`` maps a chain key to the
    other side's ``(seq, head)`` where it differs from ours (seq 0: it holds none of a
    chain we hold). Grows as messages are processed; bounded by the entries received."""

    theirs: dict[tuple[bytes, str], tuple[int, bytes]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# Wire encoding


def encode_message(ranges: Iterable[Range]) -> bytes:
    """Canonical msgpack: an array of ``[bound, mode, payload]``; ``bound`` bin or nil;
    ``payload`` nil (SKIP), bin16 (FINGERPRINT) or an array of ``[origin, feed, seq,
    head]`` (ENTRIES, FINAL) sorted by key."""
    out: list[Any] = []
    for r in ranges:
        if r.mode == SKIP:
            payload: Any = None
        elif r.mode == FINGERPRINT:
            payload = r.fp
        else:
            payload = [[k[:32], k[32:].decode(), s, h] for k, s, h in r.entries]
        out.append([r.bound, r.mode, payload])
    return encoding.encode(out)


def _bad(msg: str) -> EncodingError:
    return EncodingError(msg, "bad_reconcile")


def decode_message(data: bytes, *, max_ranges: int = MAX_RANGES,
                   max_entries: int = MAX_RECONCILE_ENTRIES) -> list[Range]:
    """Strictly decode a reconciliation message from a partner.

    Raises :class:`EncodingError`: ``too_large``/``too_many_items`` over the bounds (bytes,
    ``max_ranges`` ranges, ``max_entries`` entries in all), bad msgpack, or
    ``bad_reconcile`` for a wrong shape: a bound that is not 1..96 bytes, bounds not
    strictly increasing, nil before the last range, an unknown mode, a fingerprint that
    is not 16 bytes, entries not sorted, repeated or outside their range, an origin or
    head that is not 32 bytes, a seq outside 1..2^63-1. Raises
    :class:`citynode.errors.InvalidRecord` for an invalid feed name.
    """
    if len(data) > MAX_MESSAGE_BYTES:
        raise EncodingError(f"reconcile message of {len(data)} bytes is over the limit",
                            "too_large")
    declared = announced_length(data)
    if declared is not None and declared > max_ranges:
        # Refused from its first bytes: decoding 4,097 ranges to count them cost a
        # partner's message several milliseconds of the event loop for nothing.
        raise EncodingError(f"reconcile message has {declared} ranges, over {max_ranges}",
                            "too_many_items")
    # No count of items here (max_items: the byte bound): every item of an accepted
    # message is checked below, and its shape bounds them (4 a range, 5 an entry, with
    # at most max_ranges ranges and max_entries entries); the byte bound caps what is
    # decoded before that. Counting them first walked every item twice (issue 16: a
    # hostile partner's 4,096-range messages were the costliest work on the loop).
    limits = encoding.Limits(max_bytes=MAX_MESSAGE_BYTES, max_depth=4,
                             max_items=MAX_MESSAGE_BYTES)
    value = encoding.decode(data, limits)
    if type(value) is not list:
        raise _bad("reconcile message must be an array of ranges")
    if len(value) > max_ranges:
        raise EncodingError(f"reconcile message has {len(value)} ranges, over {max_ranges}",
                            "too_many_items")
    out: list[Range] = []
    append = out.append
    lower = b""
    n_entries = 0
    last = len(value) - 1
    for i, r in enumerate(value):
        if type(r) is not list or len(r) != 3:
            raise _bad(f"range {i} is not [bound, mode, payload]")
        bound, mode, payload = r
        if bound is not None:
            if type(bound) is not bytes or not 1 <= len(bound) <= MAX_BOUND:
                raise _bad(f"range {i}: bound must be 1 to {MAX_BOUND} bytes or nil")
            if bound <= lower:
                raise _bad(f"range {i}: bounds must strictly increase")
        elif i != last:
            raise _bad(f"range {i}: only the last range may end at nil")
        if type(mode) is not int:  # not true, 1.0 ...: the mode is an integer
            raise _bad(f"range {i}: mode must be an integer")
        if mode == FINGERPRINT:  # (the most frequent: tested first)
            if type(payload) is not bytes or len(payload) != FP_BYTES:
                raise _bad(f"range {i}: a fingerprint is {FP_BYTES} bytes")
            append(_range(bound, FINGERPRINT, payload, ()))
        elif mode == SKIP:
            if payload is not None:
                raise _bad(f"range {i}: a skip carries nil")
            append(_range(bound, SKIP, None, ()))
        elif mode in (ENTRIES, FINAL):
            if type(payload) is not list:
                raise _bad(f"range {i}: entries must be an array")
            n_entries += len(payload)
            if n_entries > max_entries:
                raise EncodingError(f"reconcile message has over {max_entries} entries",
                                    "too_many_items")
            append(_range(bound, mode, None, _entries(payload, i, lower, bound)))
        else:
            raise _bad(f"range {i}: unknown mode {str(mode)[:20]}")
        if bound is not None:
            lower = bound
    return out


def _range(bound: bytes | None, mode: int, fp: bytes | None,
           entries: tuple[Item, ...]) -> Range:
    """A :class:`Range` without its frozen ``__init__`` (four ``object.__setattr__``
    calls: a third of a 4,096-range message's decoding)."""
    r = _new_range(Range)
    _set_bound(r, bound)
    _set_mode(r, mode)
    _set_fp(r, fp)
    _set_entries(r, entries)
    return r


def _entries(payload: list[Any], i: int, lower: bytes, bound: bytes | None
             ) -> tuple[Item, ...]:
    items: list[Item] = []
    last: bytes | None = None
    for j, e in enumerate(payload):
        if type(e) is not list or len(e) != 4:
            raise _bad(f"range {i} entry {j} is not [origin, feed, seq, head]")
        origin, feed, seq, head = e
        if type(origin) is not bytes or len(origin) != 32:
            raise _bad(f"range {i} entry {j}: origin must be 32 bytes")
        if type(feed) is not str:
            raise _bad(f"range {i} entry {j}: feed must be a string")
        check_feed_name(feed)
        if type(seq) is not int or not 1 <= seq <= MAX_SEQ:
            raise _bad(f"range {i} entry {j}: seq must be 1 to 2^63-1")
        if type(head) is not bytes or len(head) != 32:
            raise _bad(f"range {i} entry {j}: head must be a 32-byte id")
        key = key_bytes(origin, feed)
        if key < lower or (bound is not None and key >= bound):
            raise _bad(f"range {i} entry {j} is outside its range")
        if last is not None and key <= last:
            raise _bad(f"range {i} entry {j}: entries must be sorted with no repeats")
        last = key
        items.append((key, seq, head))
    return tuple(items)


# ---------------------------------------------------------------------------------------
# Sessions


def initial(mine: ChainSet) -> list[Range]:
    """The first message of a session: all our items if few, else one fingerprint."""
    n = len(mine)
    if n <= LEAF:
        return [Range(None, ENTRIES, entries=tuple(mine.items(0, n)))]
    return [Range(None, FINGERPRINT, fp=mine.fp(0, n))]


def _separator(prev: bytes, key: bytes) -> bytes:
    """The shortest prefix of ``key`` that is greater than ``prev`` (``prev < key``)."""
    for n in range(1, len(key) + 1):
        if key[:n] > prev:
            return key[:n]
    return key


def _learn(diff: Diff, mine: ChainSet, entries: Iterable[Item]) -> set[bytes]:
    """Note their items that differ from ours; return the keys they sent."""
    sent: set[bytes] = set()
    for key, seq, head in entries:
        sent.add(key)
        if mine.get(key) != (seq, head):
            diff.theirs[split_key(key)] = (seq, head)
    return sent


def respond(mine: ChainSet, msg: list[Range], diff: Diff, *,
            max_ranges: int = MAX_RANGES,
            max_entries: int = MAX_RECONCILE_ENTRIES) -> list[Range]:
    """Process a decoded message against our items, note in ``diff`` what we learnt, and
    return our answer (empty: the session is over, nothing to send). The answer holds at
    most ``max_ranges`` ranges and ``max_entries`` entries."""
    out: list[Range] = []
    lower_i = 0
    lower_key = b""
    budget_r, budget_e = max_ranges, max_entries
    # The last range of the answer when it is a SKIP or an empty ENTRIES ("I hold
    # nothing here"), as (bound, mode, whether we hold nothing in it), not in ``out``
    # yet: the next such range may only move its bound. Consecutive skips are merged;
    # so are consecutive ranges where we hold nothing (an empty ENTRIES if any of them
    # is one: over a skip where we hold nothing, the sender holds nothing either). A
    # message of thousands of ranges over key space where we hold nothing is answered
    # in a few ranges per chain we hold, not as many ranges (building and encoding that
    # answer held the event loop for tens of milliseconds: scripts/chaos --scenario
    # hostile).
    tail: tuple[bytes | None, int, bool] | None = None

    def flush() -> None:
        nonlocal tail
        if tail is not None:
            out.append(Range(tail[0], tail[1]))
            tail = None

    def emit_empty(bound: bytes | None, mode: int, none_here: bool) -> None:
        nonlocal tail, budget_r
        if tail is not None and (mode == tail[1] == SKIP or (none_here and tail[2])):
            tail = (bound, max(mode, tail[1]), none_here and tail[2])  # (ENTRIES > SKIP)
            return
        flush()
        budget_r -= 1
        tail = (bound, mode, none_here)

    def emit(r: Range) -> None:
        nonlocal budget_r, budget_e
        flush()
        out.append(r)
        budget_r -= 1
        budget_e -= len(r.entries)

    for r in msg:
        hi = mine.index(r.bound)
        lo = lower_i
        if r.mode == SKIP:
            emit_empty(r.bound, SKIP, hi == lo)
        elif r.mode == FINGERPRINT:
            n = hi - lo
            if n == 0:  # we hold nothing in it (no hashing: a constant)
                emit_empty(r.bound, SKIP if r.fp == EMPTY_FP else ENTRIES, True)
            elif mine.fp(lo, hi) == r.fp:
                emit_empty(r.bound, SKIP, False)
            elif n <= LEAF and budget_e >= n and budget_r >= 1:
                emit(Range(r.bound, ENTRIES, entries=tuple(mine.items(lo, hi))))
            elif budget_r >= SPLIT + 1 and n > LEAF:
                step = n / SPLIT
                cuts = sorted({lo + round(step * k) for k in range(1, SPLIT)})
                start = lo
                for c in cuts:
                    if c <= start or c >= hi:
                        continue
                    sep = _separator(mine.key_at(c - 1), mine.key_at(c))
                    if sep <= lower_key:
                        continue
                    emit(Range(sep, FINGERPRINT, fp=mine.fp(start, c)))
                    start = c
                emit(Range(r.bound, FINGERPRINT, fp=mine.fp(start, hi)))
            else:
                # Over budget: our fingerprint of the whole range, split next round.
                emit(Range(r.bound, FINGERPRINT, fp=mine.fp(lo, hi)))
        elif r.mode == ENTRIES:
            sent = _learn(diff, mine, r.entries)
            theirs = {k: (s, h) for k, s, h in r.entries}
            back = tuple(it for it in mine.items(lo, hi) if theirs.get(it[0]) != it[1:])
            for key, _s, _h in mine.items(lo, hi):
                if key not in sent:
                    diff.theirs[split_key(key)] = (0, b"")
            if back and budget_e >= len(back):
                emit(Range(r.bound, FINAL, entries=back))
            elif back:
                emit(Range(r.bound, FINGERPRINT, fp=mine.fp(lo, hi)))
            else:
                emit_empty(r.bound, SKIP, hi == lo)
        else:  # FINAL
            _learn(diff, mine, r.entries)
            emit_empty(r.bound, SKIP, hi == lo)
        lower_i = hi
        if r.bound is not None:
            lower_key = r.bound
    if tail is not None and tail[1] != SKIP:
        flush()
    while out and out[-1].mode == SKIP:
        out.pop()  # the rest of the key space is implied: nothing to say
    return out
