"""``citynode import csv``: rows become records in batches; a batch with a bad row
publishes nothing and its bad rows are reported by line number."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from citynode.bridges.csvmap import RowError, map_row, parse_csv_mapping
from citynode.errors import ConfigError
from citynode.storage import Storage
from tests.conftest import make_node_dir
from tests.test_cli import cli, ok, one_line_error

MAPPING = """
subject = "station-{station}"

[columns]
stationName = "name"
pm25 = { column = "PM2.5", as = "number" }
no2 = { column = "NO2", as = "number" }
dateObserved = { column = "time", as = "datetime", offset = "+07:00" }

[location]
lon = "lon"
lat = "lat"
"""
HEADER = "station,name,PM2.5,NO2,time,lon,lat\n"


def row(i: int, pm25: str | None = None) -> str:
    return (f'DKI{i},"Bundaran HI, {i}",{pm25 if pm25 is not None else 10 + i},20,'
            f"2026-12-07 07:{i % 60:02d},106.82,-6.19\n")


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    d = make_node_dir(tmp_path, "Jakarta")
    m = tmp_path / "mapping.toml"
    m.write_text(MAPPING)
    return d, m


def held(d: Path, feed: str = "air-quality") -> list[dict[str, Any]]:
    from citynode.core.records import stored_record

    with Storage.open(d / "citynode.db") as st:
        return [{"subject": r.subject, **r.data}
                for r in (stored_record(e) for _rid, e in st.iter_envelopes(feed=feed))]


def run(d: Path, m: Path, csv: Path, *extra: str) -> Any:
    return cli("import", "csv", "-d", str(d), "--feed", "air-quality", "--type",
               "AirQualityObserved", "--map", str(m), *extra, str(csv))


def test_rows_become_records_in_batches(setup: tuple[Path, Path], tmp_path: Path) -> None:
    d, m = setup
    f = tmp_path / "air.csv"
    f.write_text(HEADER + "".join(row(i) for i in range(25)))
    r = run(d, m, f, "--batch-size", "10", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert (report["published"], report["batches"], report["bad_rows"]) == (25, 3, 0)
    recs = held(d)
    assert len(recs) == 25
    assert recs[3] == {"subject": "station-DKI3", "stationName": "Bundaran HI, 3",
                       "pm25": 13, "no2": 20, "dateObserved": "2026-12-07T07:03:00+07:00",
                       "location": {"type": "Point", "coordinates": [106.82, -6.19]}}


def test_a_bad_row_fails_its_batch_only_and_is_reported_by_line(
        setup: tuple[Path, Path], tmp_path: Path) -> None:
    d, m = setup
    rows = [row(i) for i in range(12)]
    rows[4] = row(4, "n/a")  # line 6 (the header is line 1)
    rows[5] = '"DKI5","a quoted\ncell over two lines",15,20,2026-12-07 07:05,106.82,-6.19\n'
    rows[7] = row(7, "-3")  # line 10 (row 5 takes two lines): a negative concentration
    rows[10] = "DKI10,too,few\n"  # line 13
    f = tmp_path / "air.csv"
    f.write_text(HEADER + "".join(rows))
    r = run(d, m, f, "--batch-size", "5")
    assert r.exit_code == 1
    assert "line 6: column 'PM2.5': 'n/a' is not a number (bad_number)" in r.stderr
    assert "line 10: AirQualityObserved payload: pm25" in r.stderr
    assert "line 13: 3 cells, the header has 7 (bad_row)" in r.stderr
    assert "published 0 row(s)" in r.stdout
    # batches: lines 2-6 (bad), 7-12 (bad: line 10), 13-14 (bad): nothing published
    assert held(d) == []
    rows[4], rows[7], rows[10] = row(4), row(7), row(10)
    rows.append(row(12, "x"))  # line 15, in a batch of its own with --batch-size 5
    f.write_text(HEADER + "".join(rows))
    r = run(d, m, f, "--batch-size", "5", "--json")
    report = json.loads(r.stdout)
    assert r.exit_code == 1
    assert [(e["line"], e["reason"]) for e in report["errors"]] == [(15, "bad_number")]
    assert (report["published"], report["failed_batches"], report["refused_rows"]) == (
        10, 1, 2)
    assert [x["subject"] for x in held(d)] == [f"station-DKI{i}" for i in range(10)]
    # resume from line 13, with the last rows fixed
    rows[12] = row(12)
    f.write_text(HEADER + "".join(rows))
    r = run(d, m, f, "--start-line", "13", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["published"] == 3
    assert len(held(d)) == 13


def test_a_failed_batch_in_the_middle_is_published_again_alone(
        setup: tuple[Path, Path], tmp_path: Path) -> None:
    """The report says which lines to run again; --start-line with --end-line publishes
    those, and not the batches after them a second time."""
    d, m = setup
    rows = [row(i) for i in range(9)]
    rows[4] = row(4, "n/a")  # line 6: the second batch of three (lines 5-7) fails
    f = tmp_path / "air.csv"
    f.write_text(HEADER + "".join(rows))
    r = run(d, m, f, "--batch-size", "3", "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["failed_lines"] == [[5, 7]]
    assert len(held(d)) == 6
    r = run(d, m, f, "--batch-size", "3", "--start-line", "5", "--end-line", "7")
    assert r.exit_code == 1 and "line 6:" in r.stderr and "line 9" not in r.stderr
    assert "--start-line 5 --end-line 7" in r.stderr and len(held(d)) == 6
    rows[4] = row(4)
    f.write_text(HEADER + "".join(rows))
    r = run(d, m, f, "--batch-size", "3", "--json", "--start-line", "5", "--end-line", "7")
    assert r.exit_code == 0 and json.loads(r.stdout)["published"] == 3
    assert sorted(x["subject"] for x in held(d)) == [f"station-DKI{i}" for i in range(9)]


def test_the_node_refusing_a_batch_publishes_none_of_it(setup: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    d, m = setup
    with open(d / "node.toml", "a") as f:  # this feed may not carry station names
        f.write('\n[feeds.air-quality]\naccess = "public"\n'
                '[feeds.air-quality.egress]\ndeny = ["stationName"]\n')
    f = tmp_path / "air.csv"
    f.write_text(HEADER + "".join(row(i) for i in range(3)))
    r = run(d, m, f)
    assert r.exit_code == 1, r.output
    assert "line 2:" in r.stderr and "refused by the node" in r.stderr
    assert held(d) == []


def test_a_missing_column_or_a_bad_mapping_is_one_error(setup: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    d, m = setup
    f = tmp_path / "air.csv"
    f.write_text("station,name\nDKI1,x\n")
    assert "the header has no column 'NO2', 'PM2.5'" in one_line_error(run(d, m, f))
    m.write_text('[columns]\npm25 = { column = "x", as = "float" }\n')
    assert "columns pm25 as" in one_line_error(run(d, m, f))


def test_mapping_rules() -> None:
    m = parse_csv_mapping({"columns": {"ok": {"column": "b", "as": "boolean"},
                                       "n": {"column": "n", "as": "integer",
                                             "required": True},
                                       "j": {"column": "j", "as": "json"}}}, "m.toml")
    assert map_row(m, {"b": "yes", "n": "7", "j": "[1, 2]"}) == (
        None, {"ok": True, "n": 7, "j": [1, 2]})
    assert map_row(m, {"b": "", "n": "7", "j": ""}) == (None, {"n": 7})  # empty: left out
    for cells, reason in (({"b": "maybe", "n": "1", "j": "1"}, "bad_boolean"),
                          ({"b": "1", "n": "1.5", "j": "1"}, "bad_integer"),
                          ({"b": "1", "n": "", "j": "1"}, "empty_cell"),
                          ({"b": "1", "n": "1", "j": "{"}, "bad_json"),
                          ({"b": "1", "j": "1"}, "missing_column")):
        with pytest.raises(RowError) as err:
            map_row(m, cells)
        assert err.value.reason == reason
    for bad in ({"columns": {}}, {"columns": {"a": "b"}, "extra": 1},
                {"columns": {"a": {"column": "b", "offset": "+07:00"}}},
                {"columns": {"a": "b"}, "subject": "x-{y"}):
        with pytest.raises(ConfigError):
            parse_csv_mapping(bad, "m.toml")
    inf = parse_csv_mapping({"columns": {"pm25": {"column": "p", "as": "number"}}}, "m")
    with pytest.raises(RowError):
        map_row(inf, {"p": "inf"})


def test_help_is_documented() -> None:
    assert "bad rows are reported by line number" in ok("import", "csv", "--help").stdout


def test_a_file_not_in_utf8_is_one_error_naming_the_line(setup: tuple[Path, Path],
                                                        tmp_path: Path) -> None:
    """A spreadsheet's Windows-1252 export: said before anything is published."""
    d, m = setup
    f = tmp_path / "air.csv"
    f.write_bytes((HEADER + row(0) + row(1)).encode() +
                  'DKI2,"Caf\u00e9",12,20,2026-12-07 07:02,106.82,-6.19\n'.encode("cp1252"))
    err = one_line_error(run(d, m, f))
    assert "line 4 is not UTF-8 (byte 0xe9)" in err and "iconv" in err
    assert held(d) == []
