"""The record filter (core/filters.py), pure: parsing, rules, SQL text, in-memory match,
query strings and descriptions. Storage-vs-memory agreement is in
tests/storage/test_filter_agreement.py; over HTTPS in tests/transport/test_antimeridian.py."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from citynode.core.filters import (
    ALL_RECORDS,
    FILTER_PARAMS,
    MAX_SEQ,
    MAX_TIME_MS,
    BBox,
    Indexed,
    RecordFilter,
    indexed,
    parse_filter,
)
from citynode.core.keys import SigningKey, node_id
from citynode.core.records import SEALED_TYPE, sign_record
from citynode.core.sealed import open_payload
from citynode.errors import InvalidFilter, InvalidNodeId

KEY = SigningKey(bytes(range(32)))
OTHER = SigningKey(bytes(range(1, 33)))
A = KEY.public_key
NID = node_id(A)
T0 = 1_795_000_000_000


def q(text: str) -> list[tuple[str, str]]:
    """Query text as a server decodes it (blank values kept, as aiohttp does)."""
    return parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text))


def refused(text: str, **kw: Any) -> InvalidFilter:
    with pytest.raises(InvalidFilter) as e:
        parse_filter(q(text), **kw)
    return e.value


def row(**kw: Any) -> Indexed:
    base: dict[str, Any] = {"origin": A, "feed": "air", "seq": 5, "type": "org.example.Air",
                            "time": T0, "lon": 10.0, "lat": 50.0}
    base.update(kw)
    return Indexed(**base)


# --------------------------------------------------------------------------- parsing


def test_every_parameter_parses_to_its_field() -> None:
    f = parse_filter(q(f"origin={NID}&feed=air&type=org.example.Air&since=5&until=9"
                       "&bbox=1,-2.5,3,4&from_seq=2&to_seq=7"))
    assert f == RecordFilter(origin=A, feed="air", type="org.example.Air", since_ms=5,
                             until_ms=9, bbox=BBox(1.0, -2.5, 3.0, 4.0), from_seq=2, to_seq=7)
    assert parse_filter([]) == ALL_RECORDS and ALL_RECORDS.is_everything
    assert not f.is_everything and f.one_feed


def test_accepted_spellings_stay_accepted() -> None:
    """What the server accepted before the filter moved here still parses the same."""
    assert parse_filter(q("since=+5")).since_ms == 5  # Python int() syntax, as before
    assert parse_filter(q(f"until={MAX_TIME_MS}")).until_ms == MAX_TIME_MS
    assert parse_filter(q("since=0")).since_ms == 0
    assert parse_filter(q("bbox=-inf,-90,inf,90")).bbox == BBox(-math.inf, -90, math.inf, 90)
    assert parse_filter(q("bbox=1e1,0,20,0")).bbox == BBox(10, 0, 20, 0)  # a line is a box
    assert parse_filter(q(f"origin=%20{NID}%20")).origin == A  # node ids are stripped
    assert parse_filter(q("type=sealed")).type == SEALED_TYPE


def test_antimeridian_boxes_parse() -> None:
    b = parse_filter(q("bbox=170,-10,-170,10")).bbox
    assert b == BBox(170.0, -10.0, -170.0, 10.0) and b.crosses_antimeridian
    assert not BBox(-170, -10, 170, 10).crosses_antimeridian


def test_unknown_repeated_and_ignored_parameters() -> None:
    e = refused("feeds=a")
    assert e.reason == "unknown_parameter" and "unknown query parameter feeds" in str(e)
    assert "a filter takes origin, feed" in str(e)
    # A name that is not short and plain is not echoed (clients quote messages).
    e = refused("Feed%22%3E=a")
    assert e.reason == "unknown_parameter" and "(a name)" in str(e) and '"' not in str(e)
    e = refused("feed=a&feed=b")
    assert e.reason == "repeated_parameter" and "feed given more than once" in str(e)
    assert refused("after=3").reason == "unknown_parameter"
    # The caller's own parameters are skipped, even repeated or empty: it reads them.
    assert parse_filter(q("after=3&limit=&feed=a&after=4"), ignore=("after", "limit")) == \
        RecordFilter(feed="a")


@pytest.mark.parametrize("name", FILTER_PARAMS)
def test_an_empty_value_is_refused(name: str) -> None:
    e = refused(f"{name}=")
    assert e.reason == "empty_parameter"
    assert str(e) == f"query parameter {name} is empty (leave it out to match any)"


# (query, reason, message fragment)
BAD = [
    ("feed=Bad%20Feed", "bad_feed", "query parameter feed is not a valid feed name: use 1-64"),
    ("feed=%FF", "bad_feed", "feed is not a valid feed name"),
    ("feed=a%00", "bad_feed", "feed is not a valid feed name"),
    ("feed=" + "a" * 65, "bad_feed", "feed is not a valid feed name"),
    ("origin=%FF%FE", "bad_origin", "does not start with 'cn1'"),
    ("origin=cn1" + "a" * 56, "bad_origin", "checksum does not match"),
    ("origin=cn1abc", "bad_origin", "expected 59"),
    ("since=1.5", "bad_time", "query parameter since must be an integer"),
    ("since=1e3", "bad_time", "query parameter since must be an integer"),
    ("since=-1", "bad_time", f"query parameter since must be in 0..{MAX_TIME_MS}"),
    ("until=abc", "bad_time", "query parameter until must be an integer"),
    (f"until={2**62 + 1}", "bad_time", "query parameter until must be in 0.."),
    ("since=" + "9" * 5000, "bad_time", "query parameter since must be an integer"),
    ("since=5&until=5", "bad_window", "since must be before until"),
    ("since=6&until=5", "bad_window", "since must be before until"),
    (f"origin={NID}&feed=a&from_seq=0", "bad_seq", "query parameter from_seq must be in 1.."),
    (f"origin={NID}&feed=a&to_seq={MAX_SEQ + 1}", "bad_seq", "to_seq must be in 1.."),
    (f"origin={NID}&feed=a&to_seq=x", "bad_seq", "to_seq must be an integer"),
    ("from_seq=1", "seq_needs_feed", "from_seq/to_seq need origin and feed"),
    ("feed=a&to_seq=3", "seq_needs_feed", "from_seq/to_seq need origin and feed"),
    (f"origin={NID}&to_seq=3", "seq_needs_feed", "from_seq/to_seq need origin and feed"),
    ("bbox=nan,0,1,1", "bad_bbox", "bbox is min_lon,min_lat,max_lon,max_lat"),
    ("bbox=0,0,nan,1", "bad_bbox", "bbox is min_lon"),
    ("bbox=0,nan,1,nan", "bad_bbox", "bbox is min_lon"),
    ("bbox=inf,0,nan,1", "bad_bbox", "bbox is min_lon"),
    ("bbox=1,2,3,4,5", "bad_bbox", "bbox is min_lon"),
    ("bbox=1,2,3", "bad_bbox", "bbox is min_lon"),
    ("bbox=1,2,3,", "bad_bbox", "bbox is min_lon"),
    ("bbox=" + ",".join(["1"] * 1000), "bad_bbox", "bbox is min_lon"),
    ("bbox=a,b,c,d", "bad_bbox", "bbox is min_lon"),
    ("bbox=0,3,1,1", "bad_bbox", "min_lat <= max_lat"),
]


@pytest.mark.parametrize(("text", "reason", "fragment"), BAD)
def test_a_malformed_value_is_refused_with_its_reason(text: str, reason: str,
                                                      fragment: str) -> None:
    e = refused(text)
    assert e.reason == reason and fragment in str(e), (e.reason, str(e))
    assert isinstance(e, ValueError)
    if reason == "bad_feed":
        assert "Bad" not in str(e) and "\x00" not in str(e)  # the value is not echoed


# --------------------------------------------------------------------------- construction


@pytest.mark.parametrize(("kw", "reason"), [
    ({"origin": b"short"}, "bad_origin"),
    ({"origin": NID}, "bad_origin"),  # a node id string: use RecordFilter.of
    ({"feed": 3}, "bad_feed"),
    ({"type": b"x"}, "bad_type"),
    ({"type": "a\udcff"}, "bad_type"),  # cannot be written back as a query
    ({"since_ms": True}, "bad_time"),  # a bool is not a time
    ({"since_ms": 1.0}, "bad_time"),
    ({"until_ms": -1}, "bad_time"),
    ({"since_ms": MAX_TIME_MS + 1}, "bad_time"),
    ({"since_ms": 7, "until_ms": 7}, "bad_window"),
    ({"origin": A, "feed": "a", "from_seq": 0}, "bad_seq"),
    ({"from_seq": 1}, "seq_needs_feed"),
    ({"bbox": (0, 0, 1, 1)}, "bad_bbox"),  # a tuple: use RecordFilter.of
])
def test_construction_checks_the_same_rules(kw: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidFilter) as e:
        RecordFilter(**kw)
    assert e.value.reason == reason


def test_boxes_are_numbers_with_south_below_north() -> None:
    for args in [(math.nan, 0, 1, 1), (0, 2, 1, 1), ("0", 0, 1, 1), (True, 0, 1, 1)]:
        with pytest.raises(InvalidFilter) as e:
            BBox(*args)  # type: ignore[arg-type]
        assert e.value.reason == "bad_bbox"
    assert BBox(1, 2, 3, 4).west.__class__ is float  # ints are stored as floats


def test_of_takes_friendlier_values() -> None:
    f = RecordFilter.of(origin=NID, bbox=(170, -10, -170, 10), since_ms=1)
    assert f == RecordFilter(origin=A, bbox=BBox(170, -10, -170, 10), since_ms=1)
    assert RecordFilter.of(origin=A) == RecordFilter(origin=A)
    with pytest.raises(InvalidNodeId):  # as parse_node_id, everywhere
        RecordFilter.of(origin="cn1abc")
    with pytest.raises(InvalidFilter, match="bbox is"):
        RecordFilter.of(bbox=(1, 2, 3))  # type: ignore[arg-type]
    # A feed name no feed can have is well-formed (it matches nothing); parsing refuses it.
    f = RecordFilter.of(feed="Bad Feed")
    assert not f.matches(row(feed="Bad Feed".lower()))
    with pytest.raises(InvalidFilter) as e:
        parse_filter(q(f.to_query()))
    assert e.value.reason == "bad_feed"


def test_filters_are_hashable_values() -> None:
    a = RecordFilter.of(feed="a", bbox=(1, 2, 3, 4))
    b = parse_filter(q("bbox=1,2,3,4&feed=a"))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    with pytest.raises(AttributeError):
        a.feed = "b"  # type: ignore[misc]


# --------------------------------------------------------------------------- SQL


def test_sql_conditions_compare_one_column_each() -> None:
    assert ALL_RECORDS.sql() == ([], [])
    f = RecordFilter(origin=A, feed="air", type="t", since_ms=1, until_ms=9, from_seq=2,
                     to_seq=3, bbox=BBox(1, 2, 3, 4))
    assert f.sql() == (
        ["origin = ?", "feed = ?", "type = ?", "time >= ?", "time < ?", "seq >= ?",
         "seq <= ?", "lon BETWEEN ? AND ?", "lat BETWEEN ? AND ?"],
        [A, "air", "t", 1, 9, 2, 3, 1.0, 3.0, 2.0, 4.0])
    assert RecordFilter(bbox=BBox(170, -10, -170, 10)).sql() == (
        ["(lon >= ? OR lon <= ?)", "lat BETWEEN ? AND ?"], [170.0, -170.0, -10.0, 10.0])


# --------------------------------------------------------------------------- in memory


def test_mismatch_names_what_does_not_match() -> None:
    f = RecordFilter(origin=A, feed="air", type="org.example.Air", since_ms=T0,
                     until_ms=T0 + 10, from_seq=5, to_seq=6, bbox=BBox(9, 49, 11, 51))
    assert f.mismatch(row()) is None and f.matches(row())
    assert f.mismatch(row(origin=OTHER.public_key)) == "origin"
    assert f.mismatch(row(feed="water")) == "feed"
    assert f.mismatch(row(type="org.example.Noise")) == "type"
    assert f.mismatch(row(time=T0 - 1)) == "time"
    assert f.mismatch(row(time=T0 + 10)) == "time"  # until is exclusive
    assert f.mismatch(row(time=T0 + 9)) is None
    assert f.mismatch(row(seq=4)) == "seq" and f.mismatch(row(seq=7)) == "seq"
    assert f.mismatch(row(seq=6)) is None
    assert f.mismatch(row(lon=None, lat=None)) == "location"
    assert f.mismatch(row(lon=12.0)) == "location"
    assert f.mismatch(row(lat=48.9)) == "location"
    assert ALL_RECORDS.matches(row(lon=None, lat=None))


def test_box_edges_are_inside() -> None:
    b = BBox(9, 49, 11, 51)
    assert all(b.contains(lon, lat) for lon, lat in [(9, 49), (11, 51), (9, 51), (10, 50)])
    assert not b.contains(8.999, 50) and not b.contains(10, 51.001)
    assert not b.contains(None, None) and not b.contains(10, None)


def test_a_box_across_the_antimeridian() -> None:
    b = BBox(170, -10, -170, 10)
    for lon in [170, 175, 180, -180, -175, -170]:
        assert b.contains(lon, 0), lon
    for lon in [169.9, 0, -169.9, 100, -100]:
        assert not b.contains(lon, 0), lon
    assert not b.contains(175, 10.5) and not b.contains(175, -10.5)
    f = RecordFilter(bbox=b)
    assert f.matches(row(lon=179.5, lat=0.0)) and f.mismatch(row(lon=0.0, lat=0.0)) == "location"


def test_a_record_is_matched_as_storage_indexes_it() -> None:
    plain = sign_record(KEY, feed="air", seq=1, prev=None, time_ms=T0, type="org.example.Air",
                        data={"location": {"type": "LineString",
                                           "coordinates": [[179.5, 1.0], [-179.5, 2.0]]}})
    assert indexed(plain) == Indexed(A, "air", 1, "org.example.Air", T0, 179.5, 1.0)
    across = RecordFilter.of(origin=A, bbox=(170, -10, -170, 10))
    assert across.record_mismatch(plain) is None
    assert RecordFilter(bbox=BBox(-180, -10, -170, 10)).record_mismatch(plain) == "location"
    # A sealed record is "sealed" with no location, even opened by one of its readers.
    sealed = sign_record(KEY, feed="priv", seq=1, prev=None, time_ms=T0,
                         type="org.example.Air", data={"location": {
                             "type": "Point", "coordinates": [179.5, 1.0]}},
                         readers=[OTHER.public_key])
    inner = open_payload(sealed.sealed, origin=A, feed="priv", seq=1, key=OTHER)
    opened = sealed._replace(type=inner.type, data=inner.data)
    for rec in (sealed, opened):
        assert indexed(rec) == Indexed(A, "priv", 1, SEALED_TYPE, T0, None, None)
        assert RecordFilter(type=SEALED_TYPE).record_mismatch(rec) is None
        assert RecordFilter(type="org.example.Air").record_mismatch(rec) == "type"
        assert across.record_mismatch(rec) == "location"


# --------------------------------------------------------------------------- back to text


def test_to_query_and_describe() -> None:
    assert ALL_RECORDS.to_query() == "" and ALL_RECORDS.params() == []
    assert ALL_RECORDS.describe() == "every record"
    f = RecordFilter(origin=A, feed="air", type="a b+c/é", since_ms=T0, until_ms=T0 + 1,
                     bbox=BBox(170, -10.5, -170, 10), from_seq=2)
    assert f.to_query() == (
        f"origin={NID}&feed=air&type=a%20b%2Bc%2F%C3%A9&since={T0}&until={T0 + 1}"
        "&bbox=170.0,-10.5,-170.0,10.0&from_seq=2")
    text = f.describe()
    for part in [NID, "'air'", "'a b+c/é'", "2026-11-18T", "seq 2 to the head",
                 "longitude 170 to -170 (across the antimeridian)", "latitude -10.5 to 10"]:
        assert part in text, (part, text)
    assert "ms since the epoch" in RecordFilter(until_ms=MAX_TIME_MS).describe()


_names = hs.text(alphabet=hs.characters(blacklist_categories=("Cs",)), min_size=1,
                 max_size=20)
_feeds = hs.from_regex(r"[a-z0-9][a-z0-9._-]{0,63}", fullmatch=True)
_times = hs.integers(0, MAX_TIME_MS)
_coords = hs.floats(allow_nan=False, width=64)


@hs.composite
def filters(draw: hs.DrawFn) -> RecordFilter:
    """Any filter parse_filter accepts."""
    origin = draw(hs.none() | hs.binary(min_size=32, max_size=32))
    feed = draw(hs.none() | _feeds)
    since, until = draw(hs.none() | _times), draw(hs.none() | _times)
    if since is not None and until is not None and since >= until:
        since, until = (None, until) if draw(hs.booleans()) else (since, None)
    bbox = None
    if draw(hs.booleans()):
        w, e, s, n = draw(_coords), draw(_coords), draw(_coords), draw(_coords)
        bbox = BBox(w, min(s, n), e, max(s, n))
    seqs: tuple[int | None, int | None] = (None, None)
    if origin is not None and feed is not None:
        seqs = (draw(hs.none() | hs.integers(1, MAX_SEQ)),
                draw(hs.none() | hs.integers(1, MAX_SEQ)))
    return RecordFilter(origin=origin, feed=feed, type=draw(hs.none() | _names),
                        since_ms=since, until_ms=until, bbox=bbox, from_seq=seqs[0],
                        to_seq=seqs[1])


@given(filters())
def test_a_filter_written_back_parses_to_itself(f: RecordFilter) -> None:
    assert parse_filter(q(f.to_query()) if f.to_query() else []) == f
    assert parse_filter(f.params()) == f
    assert f.describe()  # never raises, whatever the values


def test_the_reason_codes_raised_are_the_ones_documented() -> None:
    """Every reason code core/filters.py can raise is in its docstring's table, and the
    table lists nothing else."""
    import ast
    import re

    import citynode.core.filters as mod

    source = Path(mod.__file__).read_text(encoding="utf-8")
    raised: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                "_refuse", "_int_in", "_parse_int", "int_of"):
            last = node.args[-1] if node.args else None
            if isinstance(last, ast.Constant) and isinstance(last.value, str):
                raised.add(last.value)
    documented = set(re.findall(r"^``(\w+)``", mod.__doc__ or "", re.M))
    assert raised == documented, (raised - documented, documented - raised)
    assert len(raised) == 11
