"""The record filter: parsed once, rendered to SQL, matched in memory, written back.

One :class:`RecordFilter` says which stored records a reader asks for. It is the only
home of the filter's rules (in the spirit of datasette's ``filters.py``):

* :func:`parse_filter` reads it from query parameters, strictly (the HTTP API's rules,
  docs/API.md): an unknown or repeated parameter, an empty value, or a malformed
  origin, feed, time, seq or bbox is an :class:`~citynode.errors.InvalidFilter` whose
  ``reason`` says which;
* :meth:`RecordFilter.sql` renders it as conditions over a stored record's columns
  (plain SQL text and parameters: storage runs them over the relation it builds with
  those column names);
* :meth:`RecordFilter.mismatch` / :meth:`RecordFilter.matches` apply it to one stored
  row in memory (live tails), and :meth:`RecordFilter.record_mismatch` to a verified
  :class:`~citynode.core.records.Record` (the verifying client);
* :meth:`RecordFilter.to_query` writes it back as a query string, so that
  ``parse_filter(pairs of f.to_query()) == f``;
* :meth:`RecordFilter.describe` says it in words.

A filter is well-formed by construction: building one with a value of the wrong type,
a time or seq out of range, an empty window, a seq range without its feed, or a box
that is not one raises the same :class:`~citynode.errors.InvalidFilter` as parsing
them, so SQL and memory always have one meaning to agree on. The API's naming rules
(no empty value, a feed name that can exist) are rules of input: :func:`parse_filter`
applies them. A filter built with a feed name that cannot exist is well-formed and
matches nothing; written back as a query, a node refuses it, as it refuses the same
text from anyone (the client sends it as asked and reports the node's refusal).

What a record "is" to the filter is what storage indexes of it (:func:`indexed`): its
origin, feed, seq, time; its type as stored (``"sealed"`` for a sealed record, whoever
reads it); its location (:func:`citynode.core.types.point_of`; none for a sealed
record: its location is encrypted).

Reason codes of :class:`~citynode.errors.InvalidFilter`:

=====================  ================================================================
``unknown_parameter``  a query parameter that is not a filter (nor one the caller reads)
``repeated_parameter`` a parameter given twice (only one value could count)
``empty_parameter``    ``origin=``, ``feed=``, ... with no value (leave it out instead)
``bad_origin``         not a node id (``cn1...``)
``bad_feed``           not a feed name
``bad_type``           not a type name (a string that UTF-8 can encode)
``bad_time``           ``since``/``until`` not an integer in 0..2^62
``bad_window``         ``since`` not before ``until``
``bad_seq``            ``from_seq``/``to_seq`` not an integer in 1..2^62
``seq_needs_feed``     a seq range without both ``origin`` and ``feed``
``bad_bbox``           not four numbers ``min_lon,min_lat,max_lon,max_lat`` with
                       ``min_lat <= max_lat`` (NaN refused)
=====================  ================================================================
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

from citynode.core.keys import node_id, parse_node_id
from citynode.core.records import FEED_NAME_RULE, SEALED_TYPE, Record, check_feed_name
from citynode.core.types import point_of
from citynode.errors import InvalidFilter, InvalidNodeId, InvalidRecord

__all__ = [
    "ALL_RECORDS",
    "FILTER_PARAMS",
    "MAX_SEQ",
    "MAX_TIME_MS",
    "BBox",
    "Indexed",
    "RecordFilter",
    "Row",
    "indexed",
    "parse_filter",
]

#: Every query parameter a filter reads, in the order :meth:`RecordFilter.to_query`
#: writes them.
FILTER_PARAMS = ("origin", "feed", "type", "since", "until", "bbox", "from_seq", "to_seq")
MAX_TIME_MS = 2**62
MAX_SEQ = 2**62
_BBOX_RULE = ("bbox is min_lon,min_lat,max_lon,max_lat: four numbers with min_lat <= "
              "max_lat (a min_lon above max_lon crosses the antimeridian)")
# Characters written as they are in a query string; everything else is %XX of UTF-8
# (``,`` stays: a bbox reads better; ``+`` and space do not, as a server may read
# ``+`` as a space).
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~,")


class Row(Protocol):
    """What the filter reads of a stored row (storage's ``StoredRow`` is one)."""

    @property
    def origin(self) -> bytes: ...
    @property
    def feed(self) -> str: ...
    @property
    def seq(self) -> int: ...
    @property
    def type(self) -> str: ...
    @property
    def time(self) -> int: ...
    @property
    def lon(self) -> float | None: ...
    @property
    def lat(self) -> float | None: ...


class Indexed(NamedTuple):
    """A record as storage indexes it: the columns a filter is matched against."""

    origin: bytes
    feed: str
    seq: int
    type: str
    time: int
    lon: float | None
    lat: float | None


def indexed(rec: Record) -> Indexed:
    """The columns storage keeps of ``rec``. A sealed record is type ``"sealed"`` with no
    location, even once opened by one of its readers: that is what a node stores and
    matches, so a reader checks what it receives against the same."""
    if rec.sealed is not None:
        return Indexed(rec.origin, rec.feed, rec.seq, SEALED_TYPE, rec.time, None, None)
    pt = point_of(rec.data)
    lon, lat = (None, None) if pt is None else pt
    return Indexed(rec.origin, rec.feed, rec.seq, rec.type, rec.time, lon, lat)


def _refuse(message: str, reason: str) -> InvalidFilter:
    return InvalidFilter(message, reason)


def _number(v: object) -> bool:
    return (type(v) is float or type(v) is int) and not math.isnan(v)


@dataclass(frozen=True, slots=True)
class BBox:
    """An area: longitudes ``west..east`` and latitudes ``south..north``, inclusive. A
    ``west`` above ``east`` is a box across the antimeridian (``170,-10,-170,10``:
    longitudes 170..180 and -180..-170)."""

    west: float
    south: float
    east: float
    north: float

    def __post_init__(self) -> None:
        for name in ("west", "south", "east", "north"):
            v = getattr(self, name)
            if not _number(v):
                raise _refuse(_BBOX_RULE, "bad_bbox")
            object.__setattr__(self, name, float(v))
        if self.south > self.north:
            raise _refuse(_BBOX_RULE, "bad_bbox")

    @classmethod
    def parse(cls, text: str) -> BBox:
        """``min_lon,min_lat,max_lon,max_lat`` (Python float syntax; ``inf`` accepted,
        NaN not). Raises :class:`InvalidFilter` (``bad_bbox``)."""
        if text.count(",") != 3:
            raise _refuse(_BBOX_RULE, "bad_bbox")
        try:
            w, s, e, n = (float(x) for x in text.split(","))
        except ValueError:
            raise _refuse(_BBOX_RULE, "bad_bbox") from None
        return cls(w, s, e, n)

    @property
    def crosses_antimeridian(self) -> bool:
        return self.west > self.east

    def contains(self, lon: float | None, lat: float | None) -> bool:
        """Is the position inside (edges included)? No position is never inside."""
        if lon is None or lat is None or not self.south <= lat <= self.north:
            return False
        if self.west <= self.east:
            return self.west <= lon <= self.east
        return lon >= self.west or lon <= self.east

    def to_param(self) -> str:
        """The ``bbox`` parameter value (``repr`` of each float: it reads back exactly)."""
        return ",".join(repr(v) for v in (self.west, self.south, self.east, self.north))


def _int_in(v: object, name: str, lo: int, hi: int, reason: str) -> None:
    if type(v) is not int:
        raise _refuse(f"query parameter {name} must be an integer", reason)
    if not lo <= v <= hi:
        raise _refuse(f"query parameter {name} must be in {lo}..{hi}", reason)


@dataclass(frozen=True, slots=True)
class RecordFilter:
    """Which records a reader asks for; every field left None matches any record.

    ``origin`` (a node's 32-byte key), ``feed``, ``type`` (as stored: ``"sealed"`` for a
    restricted feed's records), ``since_ms <= time < until_ms``, ``from_seq <= seq <=
    to_seq`` (only with ``origin`` and ``feed``: seqs are per feed), ``bbox`` over the
    record's location (a record without one never matches). Hashable: streams with
    equal filters share the work of the live tail.

    Raises :class:`InvalidFilter` if a value breaks a rule (see the module docstring).
    """

    origin: bytes | None = None
    feed: str | None = None
    type: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    bbox: BBox | None = None
    from_seq: int | None = None
    to_seq: int | None = None

    def __post_init__(self) -> None:
        if self.origin is not None and (type(self.origin) is not bytes
                                        or len(self.origin) != 32):
            raise _refuse("query parameter origin must be a node id (cn1...)", "bad_origin")
        if self.feed is not None and type(self.feed) is not str:
            raise _refuse("query parameter feed must be a string", "bad_feed")
        if self.type is not None:
            if type(self.type) is not str:
                raise _refuse("query parameter type must be a string", "bad_type")
            try:
                self.type.encode("utf-8")
            except UnicodeEncodeError:
                raise _refuse("query parameter type must be text UTF-8 can encode",
                              "bad_type") from None
        for name, v in (("since", self.since_ms), ("until", self.until_ms)):
            if v is not None:
                _int_in(v, name, 0, MAX_TIME_MS, "bad_time")
        if (self.since_ms is not None and self.until_ms is not None
                and self.since_ms >= self.until_ms):
            raise _refuse("since must be before until (records match since <= time < until)",
                          "bad_window")
        for name, v in (("from_seq", self.from_seq), ("to_seq", self.to_seq)):
            if v is not None:
                _int_in(v, name, 1, MAX_SEQ, "bad_seq")
        if (self.from_seq is not None or self.to_seq is not None) and not self.one_feed:
            # Seq ranges are per feed; without one they would scan the whole table.
            raise _refuse("from_seq/to_seq need origin and feed", "seq_needs_feed")
        if self.bbox is not None and type(self.bbox) is not BBox:
            raise _refuse(_BBOX_RULE, "bad_bbox")

    @classmethod
    def of(cls, *, origin: str | bytes | None = None, feed: str | None = None,
           type: str | None = None, since_ms: int | None = None,
           until_ms: int | None = None,
           bbox: BBox | tuple[float, float, float, float] | None = None,
           from_seq: int | None = None, to_seq: int | None = None) -> RecordFilter:
        """A filter from friendlier values: ``origin`` as a node id (``cn1...``) or key
        bytes, ``bbox`` as ``(min_lon, min_lat, max_lon, max_lat)``. Raises
        :class:`InvalidNodeId` for a malformed node id, :class:`InvalidFilter` for any
        other bad value."""
        if isinstance(origin, str):
            origin = parse_node_id(origin)
        # (``type`` is the parameter here, not the builtin)
        if bbox is not None and not isinstance(bbox, BBox):
            if not isinstance(bbox, tuple | list) or len(bbox) != 4:
                raise _refuse(_BBOX_RULE, "bad_bbox")
            bbox = BBox(*bbox)
        return cls(origin, feed, type, since_ms, until_ms, bbox, from_seq, to_seq)

    # ------------------------------------------------------------------ properties

    @property
    def one_feed(self) -> bool:
        """Does the filter name one feed (origin and feed)? Its records are then in seq
        order, which is also their storage order."""
        return self.origin is not None and self.feed is not None

    @property
    def is_everything(self) -> bool:
        return self == ALL_RECORDS

    # ------------------------------------------------------------------ SQL

    def sql(self) -> tuple[list[str], list[Any]]:
        """``(conditions, parameters)`` over a stored record's columns, named unqualified:
        ``origin``, ``feed``, ``type``, ``time``, ``seq``, ``lon``, ``lat`` (storage joins
        its tables so that each name is one column of one of them). The rows that satisfy
        every condition (``AND``) are those :meth:`matches` accepts. Each condition
        compares one indexed column with ``?`` so SQLite can use the indexes."""
        where: list[str] = []
        params: list[Any] = []
        for value, clause in (
            (self.origin, "origin = ?"),
            (self.feed, "feed = ?"),
            (self.type, "type = ?"),
            (self.since_ms, "time >= ?"),
            (self.until_ms, "time < ?"),
            (self.from_seq, "seq >= ?"),
            (self.to_seq, "seq <= ?"),
        ):
            if value is not None:
                where.append(clause)
                params.append(value)
        b = self.bbox
        if b is not None:
            # NULL (no location) fails both forms, as in contains().
            if b.crosses_antimeridian:
                where.append("(lon >= ? OR lon <= ?)")
            else:
                where.append("lon BETWEEN ? AND ?")
            params += [b.west, b.east]
            where.append("lat BETWEEN ? AND ?")
            params += [b.south, b.north]
        return where, params

    # ------------------------------------------------------------------ in memory

    def mismatch(self, row: Row) -> str | None:
        """None if ``row`` matches, else the first thing that does not: ``"origin"``,
        ``"feed"``, ``"type"``, ``"time"``, ``"seq"`` or ``"location"``."""
        if self.origin is not None and row.origin != self.origin:
            return "origin"
        if self.feed is not None and row.feed != self.feed:
            return "feed"
        if self.type is not None and row.type != self.type:
            return "type"
        if (self.since_ms is not None and row.time < self.since_ms) or (
                self.until_ms is not None and row.time >= self.until_ms):
            return "time"
        if (self.from_seq is not None and row.seq < self.from_seq) or (
                self.to_seq is not None and row.seq > self.to_seq):
            return "seq"
        if self.bbox is not None and not self.bbox.contains(row.lon, row.lat):
            return "location"
        return None

    def matches(self, row: Row) -> bool:
        """Does a stored row match (the same answer as :meth:`sql` gives in SQLite)?"""
        return self.mismatch(row) is None

    def record_mismatch(self, rec: Record) -> str | None:
        """:meth:`mismatch` of a verified record, as storage would index it."""
        return self.mismatch(indexed(rec))

    # ------------------------------------------------------------------ back to text

    def params(self) -> list[tuple[str, str]]:
        """The query parameters that :func:`parse_filter` reads back as this filter."""
        out: list[tuple[str, str]] = []
        for name, v in (
            ("origin", None if self.origin is None else node_id(self.origin)),
            ("feed", self.feed),
            ("type", self.type),
            ("since", self.since_ms),
            ("until", self.until_ms),
            ("bbox", None if self.bbox is None else self.bbox.to_param()),
            ("from_seq", self.from_seq),
            ("to_seq", self.to_seq),
        ):
            if v is not None:
                out.append((name, str(v)))
        return out

    def to_query(self) -> str:
        """The filter as a percent-encoded query string (``""`` for no filter), without
        the ``?``."""
        return "&".join(f"{k}={_quote(v)}" for k, v in self.params())

    def describe(self) -> str:
        """The filter in words, for logs and people (``"every record"`` when empty)."""
        parts: list[str] = []
        if self.origin is not None:
            parts.append(f"of {node_id(self.origin)}")
        if self.feed is not None:
            parts.append(f"on feed {self.feed!r}")
        if self.type is not None:
            parts.append(f"of type {self.type!r}")
        if self.since_ms is not None:
            parts.append(f"at or after {_when(self.since_ms)}")
        if self.until_ms is not None:
            parts.append(f"before {_when(self.until_ms)}")
        if self.from_seq is not None or self.to_seq is not None:
            parts.append(f"seq {self.from_seq or 1} to "
                         f"{'the head' if self.to_seq is None else self.to_seq}")
        b = self.bbox
        if b is not None:
            across = " (across the antimeridian)" if b.crosses_antimeridian else ""
            parts.append(f"located in longitude {b.west:g} to {b.east:g}{across}, "
                         f"latitude {b.south:g} to {b.north:g}")
        return "records " + ", ".join(parts) if parts else "every record"


ALL_RECORDS = RecordFilter()


def _parse_origin(text: str) -> bytes:
    try:
        return parse_node_id(text)
    except InvalidNodeId as exc:
        raise _refuse(f"query parameter origin is not a node id: {exc}", "bad_origin") from exc


def _parse_int(text: str, name: str, lo: int, hi: int, reason: str) -> int:
    try:
        v = int(text)
    except ValueError:
        # Also a number of more than 4300 digits: Python refuses to convert it.
        raise _refuse(f"query parameter {name} must be an integer", reason) from None
    _int_in(v, name, lo, hi, reason)
    return v


def parse_filter(pairs: Iterable[tuple[str, str]], *, ignore: Collection[str] = ()
                 ) -> RecordFilter:
    """The filter of decoded query parameters (``request.query.items()``).

    Names in ``ignore`` are not the filter's (paging, format: the caller reads them) and
    are skipped. Every other name must be one of :data:`FILTER_PARAMS`, given once, with
    a non-empty valid value. Raises :class:`InvalidFilter` naming the first problem.
    """
    given: dict[str, str] = {}
    for name, value in pairs:
        if name in ignore:
            continue
        if name not in FILTER_PARAMS:
            raise _refuse(f"unknown query parameter {_shown(name)}: a filter takes "
                          f"{', '.join(FILTER_PARAMS)}", "unknown_parameter")
        if name in given:
            raise _refuse(f"query parameter {name} given more than once",
                          "repeated_parameter")
        given[name] = value
    for name in FILTER_PARAMS:
        if given.get(name) == "":
            raise _refuse(f"query parameter {name} is empty (leave it out to match any)",
                          "empty_parameter")

    def int_of(name: str, lo: int, hi: int, reason: str) -> int | None:
        text = given.get(name)
        return None if text is None else _parse_int(text, name, lo, hi, reason)

    feed = given.get("feed")
    if feed is not None:
        try:
            check_feed_name(feed)
        except InvalidRecord:
            # No echo of the value: clients quote the message, quotes and all.
            raise _refuse(f"query parameter feed is not a valid feed name: use "
                          f"{FEED_NAME_RULE}", "bad_feed") from None
    origin = given.get("origin")
    bbox = given.get("bbox")
    return RecordFilter(
        origin=None if origin is None else _parse_origin(origin),
        feed=feed,
        type=given.get("type"),
        since_ms=int_of("since", 0, MAX_TIME_MS, "bad_time"),
        until_ms=int_of("until", 0, MAX_TIME_MS, "bad_time"),
        bbox=None if bbox is None else BBox.parse(bbox),
        from_seq=int_of("from_seq", 1, MAX_SEQ, "bad_seq"),
        to_seq=int_of("to_seq", 1, MAX_SEQ, "bad_seq"),
    )


def _shown(name: str) -> str:
    # Echo a parameter's name only when it is short and plain (clients quote messages).
    plain = 0 < len(name) <= 32 and all("a" <= c <= "z" or c == "_" for c in name)
    return name if plain else "(a name)"


def _quote(text: str) -> str:
    return "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode("utf-8"))
                   for c in text)


def _when(ms: int) -> str:
    """``ms`` since the epoch, as UTC ISO 8601 when a date can say it."""
    try:
        iso = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
    except (OverflowError, ValueError, OSError):
        return f"{ms} ms since the epoch"
    return iso.replace("+00:00", "Z")
