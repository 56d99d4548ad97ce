"""Erasure requests, retention, and when a node takes a record without its payload. Pure.

A record's payload travels beside its signed body (core/records.py), so a node may hold
a record as a **tombstone**: body and signature whole (id, chain link and checkpoint
inclusion still verify), payload gone. A payload goes for one of two reasons
(docs/PROTOCOL.md, "Payloads, retention and erasure"):

* **erased**: the origin published an erasure request, a record of type
  ``citynode.Erasure`` in its feed ``citynode.erasures``, naming the record's exact
  position and id. Only the origin's own request counts: an entry names a position of
  the signer's feeds, so nobody can erase another node's record.
* **pruned**: the record is older than the retention its origin declared for the feed
  in the card in force when the record was signed (``retention_days`` of the origin's
  card with the greatest time at most the record's time; :func:`retention_in_force`),
  so every node drops the payload. A later card changes the retention of the records
  signed after it only: raising it does not bring back payloads pruned under the old
  one, and lowering it does not prune records signed under the longer one (erase
  those).

A tombstone arriving from outside is taken only if one of these holds; otherwise it is
refused with ``payload_missing`` and nothing is stored (:func:`tombstone_verdict`).

What one entry of an erasure request does at a node is :func:`entry_effect`: drop the
payload held at its position, wait for that record, or be refused (``erasure_mismatch``:
another record is held there; ``erasure_not_origin``: the id it names is a record of
another origin, which only that origin can erase).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

from citynode.core.cards import NodeCard, terms_in_force
from citynode.core.records import Record
from citynode.core.types import ERASURE_FEED, ERASURE_TYPE, validate_erasure
from citynode.errors import InvalidRecord

__all__ = [
    "DAY_MS",
    "MAX_RETENTION_DAYS",
    "Erasure",
    "entry_effect",
    "erasures_in",
    "past_retention",
    "retention_cutoff",
    "retention_in_force",
    "retention_periods",
    "tombstone_verdict",
]

DAY_MS = 86_400_000
#: The largest retention a feed may declare (100 years): bounds arithmetic on it.
MAX_RETENTION_DAYS = 36_500


class Erasure(NamedTuple):
    """One position an erasure request names: ``origin``'s ``feed`` at ``seq`` holds the
    record ``id``; ``by`` is the id of the erasure request."""

    origin: bytes
    feed: str
    seq: int
    id: bytes
    by: bytes


def is_erasure(rec: Record) -> bool:
    """True if ``rec`` is an erasure request with its payload (what has effect)."""
    return rec.type == ERASURE_TYPE and rec.feed == ERASURE_FEED and rec.payload is not None


def erasures_in(records: Iterable[Record]) -> list[Erasure]:
    """Every position named by the erasure requests among ``records`` (verified records:
    their payload was validated, so this does not raise)."""
    out = []
    for r in records:
        if is_erasure(r):
            out += [Erasure(r.origin, f, s, i, r.id) for f, s, i in validate_erasure(r.data)]
    return out


def retention_cutoff(retention_days: int, now_ms: int) -> int:
    """Records dated before this instant are past a retention of ``retention_days``."""
    return now_ms - retention_days * DAY_MS


def past_retention(time_ms: int, retention_days: int | None, now_ms: int) -> bool:
    """Is a record dated ``time_ms`` past its feed's retention at ``now_ms``? (Never when
    the feed declares none.)"""
    return retention_days is not None and time_ms < retention_cutoff(retention_days, now_ms)


def retention_in_force(history: Iterable[NodeCard], feed: str, time_ms: int) -> int | None:
    """The retention (days) of a record of ``feed`` signed at ``time_ms``: that of the
    origin's card in force then (of ``history``, the origin's cards, the one with the
    greatest time at most ``time_ms``). None: that card declares none, does not list
    the feed, or no card of that time is known (the record is then never past it)."""
    entry = terms_in_force(history, feed, time_ms)
    return entry.retention_days if entry is not None else None


def retention_periods(history: Iterable[NodeCard], feed: str
                      ) -> list[tuple[int, int | None, int]]:
    """What a prune of ``feed`` applies, from the origin's cards ``history``: for each
    card that declares a retention for it, ``(since_ms, until_ms, days)``: the records
    dated in ``[since_ms, until_ms)`` (``until_ms`` None: no end) were signed under
    that card and keep their payloads ``days`` days (:func:`retention_in_force` for
    every record, a range at a time)."""
    cards = sorted(history, key=lambda c: c.time)
    out = []
    for i, c in enumerate(cards):
        days = retention_in_force([c], feed, c.time)
        if days is not None:
            out.append((c.time, cards[i + 1].time if i + 1 < len(cards) else None, days))
    return out


def tombstone_verdict(
    rec: Record,
    *,
    erased: Mapping[bytes, bytes],
    history: Iterable[NodeCard],
    now_ms: int,
) -> str:
    """Why a node may take ``rec``, a verified tombstone: ``"erased"`` or ``"pruned"``.

    ``erased`` maps record ids to the erasure request that names that exact record at
    its position, signed by its origin (as held, or arriving in the same batch);
    ``history`` is the origin's cards held (its card history): the retention is the
    one in force when ``rec`` was signed (:func:`retention_in_force`), not the newest.
    Raises :class:`InvalidRecord` ``payload_missing`` when neither holds: a tombstone
    with no request behind it, which would let a relay withhold a payload and pass the
    skeleton off as an erasure. An erasure request itself is never erased nor pruned.
    """
    if rec.feed != ERASURE_FEED:
        if rec.id in erased:
            return "erased"
        if past_retention(rec.time, retention_in_force(history, rec.feed, rec.time),
                          now_ms):
            return "pruned"
    raise InvalidRecord(
        f"record seq {rec.seq} of feed {rec.feed!r} came without its payload, but no "
        "erasure request of its origin names it and it is within the retention its "
        "origin's card declared when it was signed",
        "payload_missing",
    )


def entry_effect(e: Erasure, *, held_at_position: bytes | None,
                 origin_of_id: bytes | None) -> str:
    """What entry ``e`` of an erasure request does at a node: ``"drop"`` (the record it
    names is held at its position: drop the payload) or ``"wait"`` (nothing is held
    there yet: a record arriving there with that id is stored as a tombstone).

    ``held_at_position``: the id of the record held at ``(e.origin, e.feed, e.seq)``
    (None: none); ``origin_of_id``: the origin of the record held with id ``e.id``
    (None: none held). Raises :class:`InvalidRecord`, and the entry erases nothing:
    ``erasure_not_origin`` if ``e.id`` is a record of another origin than the
    request's signer (only a record's origin can erase it), ``erasure_mismatch`` if
    another record is held at the position."""
    if origin_of_id is not None and origin_of_id != e.origin:
        raise InvalidRecord(
            f"erasure request {e.by.hex()} names record {e.id.hex()}, which another "
            "origin published: only a record's origin can erase it", "erasure_not_origin")
    if held_at_position is None:
        return "wait"
    if held_at_position != e.id:
        raise InvalidRecord(
            f"erasure request {e.by.hex()} names {e.feed} seq {e.seq} under id "
            f"{e.id.hex()}, held here under another id", "erasure_mismatch")
    return "drop"


def named_by(erasures: Iterable[Erasure], records: Iterable[Record]) -> dict[bytes, bytes]:
    """Record id -> erasure request id, for each of ``records`` that one of
    ``erasures`` names exactly (same origin, feed, seq and id)."""
    index = {(e.origin, e.feed, e.seq, e.id): e.by for e in erasures}
    out = {}
    for r in records:
        by = index.get((r.origin, r.feed, r.seq, r.id))
        if by is not None:
            out[r.id] = by
    return out
