"""Federation sync, pure: frontiers, wants, sync plans, what a partner holds, records
waiting for a gap, the trust policy and per-origin quotas.

Nothing here does I/O or reads a clock; the node wires these functions to HTTPS and
SQLite. One anti-entropy session between a node and a partner (docs/PROTOCOL.md, "Sync"):

1. The node POSTs its **frontier** (:func:`encode_frontier`); the partner answers with its
   own. One round trip, bytes proportional to the number of feeds.
2. :func:`plan_sync` compares the two. The node fetches what it lacks in seq order
   (:class:`Want` batches), pushes what the partner lacks (``offers``), and compares head
   ids where the partner is at or behind it (``forks`` / ``check``).
3. Records that arrive ahead of their chain wait in a :class:`PendingBuffer` until the gap
   is filled; :meth:`PendingBuffer.missing` says what to fetch.

New records are also pushed promptly; a :class:`PeerView` per partner stops a record from
being sent to a partner known to hold it (including the partner it came from). Pull is the
ground truth that always converges; push and :class:`PeerView` only make it fast and cheap.

Which origins a node stores at all is the trust policy (:func:`accept_origin`, with
:class:`VouchGraph` for transitive vouching); how much per origin per day is
:class:`OriginQuota`.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from citynode.core import encoding
from citynode.core.records import MAX_SEQ, Record, check_feed_name
from citynode.errors import ConfigError, EncodingError, InvalidRecord

__all__ = [
    "DAY_MS",
    "DEFAULT_BATCH",
    "DEFAULT_MAX_HOPS",
    "DEFAULT_TRUST_POLICY",
    "MAX_FRONTIER_FEEDS",
    "MAX_WANTS",
    "TRUST_POLICIES",
    "FeedKey",
    "Frontier",
    "OriginQuota",
    "PeerView",
    "PendingBuffer",
    "SyncPlan",
    "VouchGraph",
    "Want",
    "accept_origin",
    "decode_frontier",
    "decode_wants",
    "encode_frontier",
    "encode_wants",
    "plan_sync",
]

FeedKey = tuple[bytes, str]
"""(origin public key, feed name): one chain."""

Frontier = dict[FeedKey, tuple[int, bytes]]
"""Per chain held: (highest contiguous seq, id of the record at that seq)."""

DEFAULT_BATCH = 500  # seqs per Want: one response stays well under a few MB
MAX_FRONTIER_FEEDS = 100_000
MAX_WANTS = 4096
DAY_MS = 86_400_000

# Largest canonical encoding of one entry, used to bound the bytes accepted before decoding:
# fixarray(1) + bin8 origin (2+32) + str8 feed (2+64) + uint64 (9) + bin8 id or uint64.
_FRONTIER_ENTRY_MAX = 1 + 34 + 66 + 9 + 34
_WANT_ENTRY_MAX = 1 + 34 + 66 + 9 + 9
_ARRAY_HEADER_MAX = 5


def _config(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# ---------------------------------------------------------------------------------------
# Wire encodings


def announced_length(data: bytes) -> int | None:
    """The element count a msgpack array header at the start of ``data`` announces
    (None if ``data`` does not start with one)."""
    if not data:
        return None
    b = data[0]
    if 0x90 <= b <= 0x9F:
        return b & 0x0F
    if b == 0xDC and len(data) >= 3:
        return int.from_bytes(data[1:3], "big")
    if b == 0xDD and len(data) >= 5:
        return int.from_bytes(data[1:5], "big")
    return None


def _decode_entries(data: bytes, max_count: int, entry_max: int, what: str) -> list[Any]:
    """Decode a canonical msgpack array of arrays of scalars, at most ``max_count`` long."""
    # Why before decoding: a partner may send an array that is over the count but under
    # the byte bound (100,001 short frontier entries are 7.7 MB, under the request
    # limit); decoding it whole only to refuse it blocked the event loop ~130 ms a time,
    # and a hostile partner sending a few a second multiplied honest partners' latency
    # by ten (scripts/chaos.py, scenario ``hostile``). The header names the count.
    announced = announced_length(data)
    if announced is not None and announced > max_count:
        raise EncodingError(
            f"{what} has {announced} entries, over the limit of {max_count} entries",
            "too_many_items",
        )
    limits = encoding.Limits(
        max_bytes=_ARRAY_HEADER_MAX + entry_max * max_count,
        max_depth=2,
        max_items=5 * max_count,  # each entry counts itself plus its four fields
    )
    try:
        value = encoding.decode(data, limits)
    except EncodingError as exc:
        if exc.reason in ("too_large", "too_many_items"):
            raise EncodingError(
                f"{what} is over the limit of {max_count} entries: {exc}", exc.reason
            ) from exc
        raise EncodingError(f"{what} is not canonical msgpack: {exc}", exc.reason) from exc
    if type(value) is not list:
        raise EncodingError(f"{what} must be a msgpack array", f"bad_{what}")
    if len(value) > max_count:
        raise EncodingError(
            f"{what} has {len(value)} entries, over the limit of {max_count}", "too_many_items"
        )
    return value


def _check_key(origin: Any, feed: Any, what: str, i: int) -> FeedKey:
    if type(origin) is not bytes or len(origin) != 32:
        raise EncodingError(
            f"{what} entry {i}: origin must be a 32-byte public key", f"bad_{what}"
        )
    if type(feed) is not str:
        raise EncodingError(f"{what} entry {i}: feed must be a string", f"bad_{what}")
    check_feed_name(feed)
    return (origin, feed)


def _check_seq(seq: Any, what: str, i: int, name: str = "seq") -> int:
    if type(seq) is not int or not 1 <= seq <= MAX_SEQ:
        raise EncodingError(
            f"{what} entry {i}: {name} must be an integer from 1 to 2^63-1, not {seq!r}",
            f"bad_{what}",
        )
    return seq


def encode_frontier(frontier: Mapping[FeedKey, tuple[int, bytes]]) -> bytes:
    """Canonical frontier bytes: msgpack array of ``[origin, feed, seq, head_id]`` sorted
    by ``(origin, feed)``. Raises :class:`EncodingError` if a value cannot be encoded."""
    return encoding.encode(
        [[o, f, seq, hid] for (o, f), (seq, hid) in sorted(frontier.items())]
    )


def decode_frontier(data: bytes, max_feeds: int = MAX_FRONTIER_FEEDS) -> Frontier:
    """Strictly decode a partner's frontier.

    Raises :class:`EncodingError` (reason ``too_large``/``too_many_items`` over
    ``max_feeds``, ``non_canonical``/``malformed`` for bad msgpack, ``bad_frontier`` for a
    wrong shape, an origin or id that is not 32 bytes, a seq outside 1..2^63-1, entries not
    sorted by (origin, feed) or repeated), or :class:`InvalidRecord` for an invalid feed name.
    """
    entries = _decode_entries(data, max_feeds, _FRONTIER_ENTRY_MAX, "frontier")
    out: Frontier = {}
    last: FeedKey | None = None
    for i, entry in enumerate(entries):
        if type(entry) is not list or len(entry) != 4:
            raise EncodingError(
                f"frontier entry {i} is not [origin, feed, seq, head]", "bad_frontier"
            )
        origin, feed, seq, head = entry
        key = _check_key(origin, feed, "frontier", i)
        _check_seq(seq, "frontier", i)
        if type(head) is not bytes or len(head) != 32:
            raise EncodingError(f"frontier entry {i}: head must be a 32-byte id", "bad_frontier")
        # Feed names are ASCII, so str order equals the UTF-8 byte order of the wire rule.
        if last is not None and key <= last:
            raise EncodingError(
                f"frontier entry {i} is out of order or repeated: entries must be sorted "
                "by (origin, feed) with no duplicates",
                "bad_frontier",
            )
        last = key
        out[key] = (seq, head)
    return out


@dataclass(frozen=True, slots=True)
class Want:
    """A request for the records ``from_seq..to_seq`` (inclusive) of one chain."""

    origin: bytes
    feed: str
    from_seq: int
    to_seq: int

    @property
    def key(self) -> FeedKey:
        return (self.origin, self.feed)

    @property
    def count(self) -> int:
        """Number of seqs asked for."""
        return self.to_seq - self.from_seq + 1


def encode_wants(wants: Iterable[Want]) -> bytes:
    """Canonical bytes of a list of wants: msgpack array of ``[origin, feed, from, to]``,
    in the order given (a responder serves them in that order)."""
    return encoding.encode([[w.origin, w.feed, w.from_seq, w.to_seq] for w in wants])


def decode_wants(data: bytes, max_wants: int = MAX_WANTS) -> list[Want]:
    """Strictly decode a list of wants (at most ``max_wants``).

    Raises :class:`EncodingError` (``too_large``/``too_many_items``, bad msgpack,
    ``bad_wants`` for a wrong shape, a seq outside 1..2^63-1 or ``from > to``) or
    :class:`InvalidRecord` for an invalid feed name. The span of one want is not bounded
    here: a responder answers with at most its own per-response record limit, in seq
    order, and the asker asks again from where the answer stopped.
    """
    entries = _decode_entries(data, max_wants, _WANT_ENTRY_MAX, "wants")
    out: list[Want] = []
    for i, entry in enumerate(entries):
        if type(entry) is not list or len(entry) != 4:
            raise EncodingError(f"wants entry {i} is not [origin, feed, from, to]", "bad_wants")
        origin, feed, lo, hi = entry
        _check_key(origin, feed, "wants", i)
        _check_seq(lo, "wants", i, "from")
        _check_seq(hi, "wants", i, "to")
        if lo > hi:
            raise EncodingError(f"wants entry {i}: from {lo} is after to {hi}", "bad_wants")
        out.append(Want(origin, feed, lo, hi))
    return out


def _chunk(ranges: list[tuple[FeedKey, int, int]], batch: int, max_wants: int
           ) -> tuple[list[Want], bool]:
    """Split ranges into wants of at most ``batch`` seqs, round-robin across chains so
    every chain progresses when ``max_wants`` cuts the list; return (wants, truncated)."""
    wants: list[Want] = []
    active = ranges
    while active:
        nxt: list[tuple[FeedKey, int, int]] = []
        for (origin, feed), lo, hi in active:
            if len(wants) >= max_wants:
                return wants, True
            top = min(hi, lo + batch - 1)
            wants.append(Want(origin, feed, lo, top))
            if top < hi:
                nxt.append(((origin, feed), top + 1, hi))
        active = nxt
    return wants, False


# ---------------------------------------------------------------------------------------
# Planning one session


@dataclass(frozen=True, slots=True)
class SyncPlan:
    """What to do after one frontier exchange (see :func:`plan_sync`).

    * ``wants``: fetch these from the partner, in this order.
    * ``offers``: ``(key, their_seq)`` for chains where we are ahead: push our records
      ``their_seq + 1 ..`` our head (``their_seq`` is 0 if they hold none), skipping what
      the partner's :class:`PeerView` already knows.
    * ``check``: ``(key, their_seq, their_head_id)`` where they are behind us: look up our
      id at ``their_seq``; a different id means the origin equivocated (fetch theirs with
      ``Want(origin, feed, their_seq, their_seq)`` to get the proof).
    * ``forks``: ``(key, seq)`` where both are at the same seq with different head ids:
      equivocation, found without a lookup.
    * ``refused``: chains where they are ahead but ``accept`` refused the origin.
    * ``truncated``: ``wants`` was cut at ``max_wants``; plan again after fetching.
    """

    wants: list[Want]
    offers: list[tuple[FeedKey, int]]
    check: list[tuple[FeedKey, int, bytes]]
    forks: list[tuple[FeedKey, int]]
    refused: list[FeedKey]
    truncated: bool = False

    @property
    def in_sync(self) -> bool:
        """True when this exchange found nothing to fetch, push or check (chains of
        refused origins do not count: we do not want them)."""
        return not (self.wants or self.offers or self.check or self.forks or self.truncated)


def plan_sync(
    mine: Mapping[FeedKey, tuple[int, bytes]],
    theirs: Mapping[FeedKey, tuple[int, bytes]],
    *,
    accept: Callable[[bytes], bool],
    batch: int = DEFAULT_BATCH,
    max_wants: int = MAX_WANTS,
) -> SyncPlan:
    """Compare our frontier with a partner's and decide what to fetch, push and check.

    ``accept(origin)`` is the trust policy (see :func:`accept_origin`); it is called at
    most once per origin. Wants come in chunks of at most ``batch`` seqs; if more than
    ``max_wants`` would be needed, the first ``max_wants`` (round-robin over chains) are
    returned with ``truncated=True`` -- so a partner claiming an absurd seq cannot make
    us build an absurd plan. Raises :class:`ConfigError` if ``batch`` or ``max_wants``
    is below 1.
    """
    _config(batch >= 1, f"sync batch must be at least 1, not {batch}")
    _config(max_wants >= 1, f"max_wants must be at least 1, not {max_wants}")
    verdicts: dict[bytes, bool] = {}
    ranges: list[tuple[FeedKey, int, int]] = []
    offers: list[tuple[FeedKey, int]] = []
    check: list[tuple[FeedKey, int, bytes]] = []
    forks: list[tuple[FeedKey, int]] = []
    refused: list[FeedKey] = []
    for key in sorted(theirs):
        t_seq, t_id = theirs[key]
        m_seq, m_id = mine.get(key, (0, b""))
        if t_seq > m_seq:
            ok = verdicts.get(key[0])
            if ok is None:
                ok = verdicts[key[0]] = bool(accept(key[0]))
            if ok:
                ranges.append((key, m_seq + 1, t_seq))
            else:
                refused.append(key)
        elif t_seq == m_seq:
            if t_id != m_id:
                forks.append((key, t_seq))
        else:
            offers.append((key, t_seq))
            check.append((key, t_seq, t_id))
    offers.extend((key, 0) for key in mine if key not in theirs)
    offers.sort()
    wants, truncated = _chunk(ranges, batch, max_wants)
    return SyncPlan(wants, offers, check, forks, refused, truncated)


# ---------------------------------------------------------------------------------------
# What a partner holds


class PeerView:
    """What one partner is known to hold: per chain, a seq such that the partner holds
    every record up to it (or has said it does not want them).

    Fed from the partner's frontier, from its push acknowledgements (an ack is a frontier
    of the chains in the batch) and from records it sent us (a node only forwards records
    it stores, and it stores chains contiguously). Values only grow: a stale frontier
    never makes us resend, and a partner that lost data (restored from a backup) gets it
    back by pulling, which never consults this view.
    """

    __slots__ = ("_seq",)

    def __init__(self) -> None:
        self._seq: dict[FeedKey, int] = {}

    def update(self, key: FeedKey, seq: int) -> None:
        """The partner holds (or declines) every record of ``key`` up to ``seq``."""
        if seq > self._seq.get(key, 0):
            self._seq[key] = seq

    def update_frontier(self, frontier: Mapping[FeedKey, tuple[int, bytes]]) -> None:
        """Apply a frontier or a push acknowledgement from the partner."""
        for key, (seq, _) in frontier.items():
            self.update(key, seq)

    def knows(self, key: FeedKey, seq: int) -> bool:
        """True if the partner is known to hold (or decline) record ``seq`` of ``key``:
        then the push path must not send it."""
        return self._seq.get(key, 0) >= seq

    def known(self, key: FeedKey) -> int:
        """Highest seq of ``key`` the partner is known to hold (0 if none)."""
        return self._seq.get(key, 0)

    def __len__(self) -> int:
        return len(self._seq)


# ---------------------------------------------------------------------------------------
# Records ahead of their chain


def _size(record: Record) -> int:
    return len(record.body) + len(record.sig)


class PendingBuffer:
    """Verified records that are AHEAD of their chain, waiting for the gap to be filled.

    Bounded by ``max_records`` and ``max_bytes`` (bodies + signatures). A record more
    than ``max_ahead`` seqs past its head is refused outright: pull will bring it in order
    later, and it would otherwise sit here for a long time.

    When full, the record farthest ahead of its head is evicted (or the incoming one is
    refused, if it is the farthest). Why: a record just past its head becomes storable as
    soon as one small gap is filled, while a far one needs many records first -- which
    pull fetches in seq order anyway, so evicting it costs at most one more transfer of
    it and never loses data. It also means a burst of far-ahead records (a catching-up
    node receiving live pushes, or a flood) cannot push out the records about to be used.

    Equivocation candidates: :meth:`take_ready` checks ``prev`` links against the chain.
    A pending record that does not fit (at the head's seq with another id, at the next
    seq with a ``prev`` that is not the head's id, or below the head) is removed and
    queued for :meth:`take_conflicts`; the node passes each through
    ``chain.classify`` against its store, which yields EQUIVOCATION (build a ForkProof
    from our stored envelope and this one) or DUPLICATE. A second, different record at a
    seq already pending is refused by :meth:`add` (first copy wins); the node can build the
    proof from :meth:`get`.
    """

    def __init__(
        self,
        max_records: int = 10_000,
        max_bytes: int = 32 * 1024 * 1024,
        *,
        max_ahead: int = 100_000,
        max_conflicts: int = 1_000,
    ) -> None:
        """Raises :class:`ConfigError` if a limit is below 1."""
        for name, v in (("max_records", max_records), ("max_bytes", max_bytes),
                        ("max_ahead", max_ahead), ("max_conflicts", max_conflicts)):
            _config(v >= 1, f"pending buffer {name} must be at least 1, not {v}")
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.max_ahead = max_ahead
        self.max_conflicts = max_conflicts
        self._recs: dict[FeedKey, dict[int, Record]] = {}
        self._seqs: dict[FeedKey, list[int]] = {}  # sorted seqs per chain
        self._heads: dict[FeedKey, int] = {}  # last head seq we were told, chains held only
        self._count = 0
        self._nbytes = 0
        self._conflicts: list[Record] = []

    def get(self, key: FeedKey, seq: int) -> Record | None:
        """The pending record at ``seq`` of ``key``, if any."""
        recs = self._recs.get(key)
        return recs.get(seq) if recs else None

    def add(self, record: Record, *, head_seq: int | None = None) -> bool:
        """Hold a verified record that is ahead of its chain.

        ``head_seq`` is our contiguous head of the record's chain (0 if none); if None,
        the last head given for this chain is used (0 if none known). Returns True if the
        record is now held (also if this very record already was). Returns False -- and
        holds nothing new -- if it is not ahead (``seq <= head + 1``: classify and store it
        instead), is more than ``max_ahead`` past the head, is larger than the buffer,
        another record is already pending at that seq (first copy wins), or the buffer is
        full of records nearer their heads. May evict records farther ahead to make room.
        """
        key = (record.origin, record.feed)
        head = self._heads.get(key, 0) if head_seq is None else head_seq
        distance = record.seq - head
        if distance <= 1 or distance > self.max_ahead:
            return False
        size = _size(record)
        if size > self.max_bytes:
            return False
        held = self.get(key, record.seq)
        if held is not None:
            return held.id == record.id
        need_records = self._count + 1 - self.max_records
        need_bytes = self._nbytes + size - self.max_bytes
        if need_records > 0 or need_bytes > 0:
            if key in self._seqs:
                self._heads[key] = head  # rank this chain's pending by the current head
            victims = self._victims(need_records, need_bytes, distance)
            if victims is None:
                return False
            for vkey, vseq in victims:
                self._remove(vkey, vseq)
        recs = self._recs.setdefault(key, {})
        seqs = self._seqs.setdefault(key, [])
        recs[record.seq] = record
        bisect.insort(seqs, record.seq)
        self._heads[key] = head
        self._count += 1
        self._nbytes += size
        return True

    def _victims(
        self, need_records: int, need_bytes: int, new_distance: int
    ) -> list[tuple[FeedKey, int]] | None:
        """Records to evict, farthest ahead first, to free the space needed; None if that
        would take a record no farther ahead than the incoming one (then refuse it)."""
        heap = [
            (-(seqs[-1] - self._heads.get(key, 0)), key, len(seqs) - 1)
            for key, seqs in self._seqs.items()
        ]
        heapq.heapify(heap)
        chosen: list[tuple[FeedKey, int]] = []
        freed_records = freed_bytes = 0
        while freed_records < need_records or freed_bytes < need_bytes:
            if not heap:
                return None
            neg, key, i = heapq.heappop(heap)
            if -neg <= new_distance:
                return None
            seqs = self._seqs[key]
            chosen.append((key, seqs[i]))
            freed_records += 1
            freed_bytes += _size(self._recs[key][seqs[i]])
            if i > 0:
                heapq.heappush(heap, (-(seqs[i - 1] - self._heads.get(key, 0)), key, i - 1))
        return chosen

    def _remove(self, key: FeedKey, seq: int) -> Record:
        recs = self._recs[key]
        rec = recs.pop(seq)
        self._seqs[key].remove(seq)
        self._count -= 1
        self._nbytes -= _size(rec)
        if not recs:
            del self._recs[key], self._seqs[key]
            self._heads.pop(key, None)
        return rec

    def _conflict(self, record: Record) -> None:
        if len(self._conflicts) >= self.max_conflicts:
            del self._conflicts[0]  # bounded; the oldest evidence is the likeliest seen again
        self._conflicts.append(record)

    def take_ready(self, key: FeedKey, head_seq: int, head_id: bytes | None) -> list[Record]:
        """Remove and return the pending run that now extends the chain ``key`` whose
        contiguous head is ``(head_seq, head_id)`` (``0, None`` for an empty chain).

        The records come in seq order, each one's ``prev`` the id of the one before (the
        first one's ``prev`` is ``head_id``); the caller must store all of them, in order.
        Call it after every record stored on a chain. Records that do not fit are moved
        to :meth:`take_conflicts` (see the class docstring); pending records after a
        misfit stay, to be checked when the right record arrives.
        """
        seqs = self._seqs.get(key)
        if not seqs:
            return []
        while seqs and seqs[0] <= head_seq:
            rec = self._remove(key, seqs[0])
            if rec.seq < head_seq or rec.id != head_id:
                self._conflict(rec)
        out: list[Record] = []
        cur_seq, cur_id = head_seq, head_id
        while seqs and seqs[0] == cur_seq + 1:
            rec = self._remove(key, seqs[0])
            if rec.prev != cur_id:
                self._conflict(rec)
                break
            out.append(rec)
            cur_seq, cur_id = rec.seq, rec.id
        if key in self._seqs:
            self._heads[key] = cur_seq
        return out

    def take_conflicts(self) -> list[Record]:
        """Remove and return the records :meth:`take_ready` found not to fit their chain
        (oldest first). Each must be re-classified against the store."""
        out, self._conflicts = self._conflicts, []
        return out

    def missing(self, *, batch: int = DEFAULT_BATCH, max_wants: int = MAX_WANTS) -> list[Want]:
        """The gaps between each chain's head and its pending records, as wants of at most
        ``batch`` seqs (at most ``max_wants`` of them). Raises :class:`ConfigError` if
        ``batch`` or ``max_wants`` is below 1."""
        _config(batch >= 1, f"sync batch must be at least 1, not {batch}")
        _config(max_wants >= 1, f"max_wants must be at least 1, not {max_wants}")
        ranges: list[tuple[FeedKey, int, int]] = []
        for key in sorted(self._seqs):
            expect = self._heads.get(key, 0) + 1
            for s in self._seqs[key]:
                if s > expect:
                    ranges.append((key, expect, s - 1))
                expect = max(expect, s + 1)  # records at or below the head ask for nothing
        return _chunk(ranges, batch, max_wants)[0]

    def __len__(self) -> int:
        return self._count

    # Defined last: inside the class body, later annotations would see this property.
    @property
    def bytes(self) -> int:
        """Bytes held (record bodies plus signatures)."""
        return self._nbytes


# ---------------------------------------------------------------------------------------
# Trust policy


TRUST_POLICIES = ("partners", "vouched", "any")
DEFAULT_TRUST_POLICY = "vouched"
DEFAULT_MAX_HOPS = 3


def accept_origin(
    origin: bytes,
    *,
    policy: str,
    self_key: bytes,
    partners: AbstractSet[bytes],
    vouched: AbstractSet[bytes],
) -> bool:
    """Whether this node stores (and so relays) records signed by ``origin``.

    * ``"partners"``: our own records and our direct partners' own records.
    * ``"vouched"`` (default): also origins in ``vouched`` -- pass
      :meth:`VouchGraph.trusted`, i.e. the origins listed on our partners' signed node
      cards, followed transitively up to a number of hops.
    * ``"any"``: every origin whose signature verifies.

    Raises :class:`ConfigError` for an unknown policy.
    """
    if policy == "any":
        return True
    if policy not in ("partners", "vouched"):
        raise ConfigError(
            f"unknown trust policy {policy!r}: use one of {', '.join(TRUST_POLICIES)}"
        )
    if origin == self_key or origin in partners:
        return True
    return policy == "vouched" and origin in vouched


class VouchGraph:
    """Who vouches for whom, from the signed node cards we have seen.

    A node card lists the node's partners; listing a node is vouching for it. Plain
    one-hop vouching (trust what our partners list) carries records two hops at most: on
    a line A-B-C-D, D's partner C lists B and D but not A, so A's records stop at C. So
    trust is transitive up to ``max_hops`` card edges from our direct partners:
    ``max_hops=1`` is plain vouching, 2 reaches A in the line above, and the default 3
    lets records cross a line of five nodes end to end.

    Why a bound: each hop widens who can place data in our store and on our disk; a
    compromised partner can mint keys and cards at will, so a node far away in the
    graph is trusted only as much as the chain of partners that leads to it. A few hops
    covers real federations (regional groups joined by a few hubs) while keeping the set
    small; per-origin quotas (:class:`OriginQuota`) bound what any one origin can cost.

    The caller verifies each card's signature and that it is newer than the one it
    replaces; this class only keeps the latest partner list per node, bounded by
    ``max_cards`` nodes and ``max_partners`` per card (10,000, as a card allows).
    """

    def __init__(self, *, max_cards: int = 10_000, max_partners: int = 10_000) -> None:
        """Raises :class:`ConfigError` if a limit is below 1."""
        _config(max_cards >= 1, f"max_cards must be at least 1, not {max_cards}")
        _config(max_partners >= 1, f"max_partners must be at least 1, not {max_partners}")
        self.max_cards = max_cards
        self.max_partners = max_partners
        self._cards: dict[bytes, frozenset[bytes]] = {}

    def add_card(self, node_key: bytes, partners: Iterable[bytes]) -> bool:
        """Record that ``node_key`` (per its latest verified card) lists ``partners``,
        replacing what an earlier card said. Returns False (and keeps nothing) if the
        graph already holds ``max_cards`` other nodes. Raises :class:`InvalidRecord` if
        the card lists more than ``max_partners`` partners or a key that is not 32 bytes.
        """
        listed: set[bytes] = set()
        for p in partners:
            if type(p) is not bytes or len(p) != 32:
                raise InvalidRecord("a node card lists a partner key that is not 32 bytes",
                                    "bad_card")
            if p in listed or p == node_key:
                continue
            if len(listed) >= self.max_partners:
                raise InvalidRecord(
                    f"a node card lists more than {self.max_partners} partners", "bad_card"
                )
            listed.add(p)
        if node_key not in self._cards and len(self._cards) >= self.max_cards:
            return False
        self._cards[node_key] = frozenset(listed)
        return True

    def remove(self, node_key: bytes) -> None:
        """Forget a node's card (for example, its card expired or was revoked)."""
        self._cards.pop(node_key, None)

    def partners_of(self, node_key: bytes) -> frozenset[bytes]:
        """The partners ``node_key``'s latest card lists (empty if no card seen)."""
        return self._cards.get(node_key, frozenset())

    def trusted(
        self,
        self_key: bytes,
        direct_partners: Iterable[bytes],
        max_hops: int = DEFAULT_MAX_HOPS,
    ) -> set[bytes]:
        """Origins vouched for within ``max_hops`` card edges of our direct partners:
        hop 1 is what our partners' cards list, hop 2 what those nodes' cards list, and
        so on, following only cards of nodes already reached. Excludes ``self_key`` and
        the direct partners themselves (they are trusted anyway). Pass the result as
        ``vouched`` to :func:`accept_origin`. Raises :class:`ConfigError` if ``max_hops``
        is negative.
        """
        _config(max_hops >= 0, f"trust max_hops must be 0 or more, not {max_hops}")
        level = set(direct_partners)
        level.discard(self_key)
        seen = level | {self_key}
        out: set[bytes] = set()
        for _ in range(max_hops):
            nxt: set[bytes] = set()
            for node in level:
                nxt.update(self._cards.get(node, ()))
            nxt -= seen
            if not nxt:
                break
            seen |= nxt
            out |= nxt
            level = nxt
        return out

    def __len__(self) -> int:
        return len(self._cards)


# ---------------------------------------------------------------------------------------
# Per-origin quota


class OriginQuota:
    """How many records and bytes of each origin this node accepts per UTC day.

    A fixed window: counts reset at 00:00 UTC (``now_ms // DAY_MS`` changes), which is
    easy for an operator to reason about; the price is that an origin can spend up to
    twice its quota across midnight. Memory holds only origins seen in the current day
    (everything is forgotten when the day changes) and at most ``max_origins`` of them;
    a new origin beyond that is refused until the next day. A clock stepping back into
    the previous day does not reset the counts.
    """

    def __init__(
        self, records_per_day: int, bytes_per_day: int, *, max_origins: int = 100_000
    ) -> None:
        """Raises :class:`ConfigError` if a limit is below 1."""
        for name, v in (("records_per_day", records_per_day),
                        ("bytes_per_day", bytes_per_day), ("max_origins", max_origins)):
            _config(v >= 1, f"origin quota {name} must be at least 1, not {v}")
        self.records_per_day = records_per_day
        self.bytes_per_day = bytes_per_day
        self.max_origins = max_origins
        self._day = -1
        self._used: dict[bytes, tuple[int, int]] = {}

    def _roll(self, now_ms: int) -> None:
        day = now_ms // DAY_MS
        if day > self._day:
            self._day = day
            self._used.clear()

    def allow(self, origin: bytes, nbytes: int, now_ms: int) -> bool:
        """Count one record of ``nbytes`` from ``origin`` and return True, or return False
        (counting nothing) if it would exceed today's quota of that origin."""
        self._roll(now_ms)
        used = self._used.get(origin)
        records, size = used if used is not None else (0, 0)
        if records + 1 > self.records_per_day or size + nbytes > self.bytes_per_day:
            return False
        if used is None and len(self._used) >= self.max_origins:
            return False
        self._used[origin] = (records + 1, size + nbytes)
        return True

    def exhausted(self, origin: bytes, now_ms: int) -> bool:
        """True if no further record of ``origin`` fits today (so a node should not even
        ask partners for its records until the day changes)."""
        self._roll(now_ms)
        records, size = self._used.get(origin, (0, 0))
        return records >= self.records_per_day or size >= self.bytes_per_day

    def usage(self, origin: bytes, now_ms: int) -> tuple[int, int]:
        """(records, bytes) accepted from ``origin`` today."""
        self._roll(now_ms)
        return self._used.get(origin, (0, 0))

    def __len__(self) -> int:
        return len(self._used)
