"""``citynode import csv`` and ``citynode sinks``: click groups the main group registers.

``import csv``: rows of a CSV file published as records, in batches.

Each batch of rows is mapped (:mod:`citynode.bridges.csvmap`) and checked against the
payload type here first; a batch with a bad row is not sent at all, and its bad rows are
reported by line number (the file's physical line: a quoted cell may span lines). A
batch that is sent is published whole or not at all (``POST /v1/bridges/publish``). The
run goes on after a failed batch, and exits 1 if any row was not published; the report
says the lines to fix, and ``--start-line`` resumes after the last batch published.
"""

from __future__ import annotations

import codecs
import csv
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from citynode.bridges.csvmap import CsvMapping, RowError, map_row, parse_csv_mapping
from citynode.core.types import validate_payload
from citynode.errors import ConfigError, PayloadError

__all__ = ["import_group", "sinks_group"]

_MAX_CELL = 1 << 20  # bytes of one cell, at most (csv's own limit is 128 KiB)
_MAX_REPORTED = 1000  # bad rows listed, at most (all are counted)


@click.group("import")
def import_group() -> None:
    """Publish records from files other systems export (CSV)."""


def _load_mapping(path: Path) -> CsvMapping:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_csv_mapping(doc, str(path))


def _rows(f: Any, start_line: int, end_line: int | None = None
          ) -> Iterator[tuple[int, dict[str, str] | RowError]]:
    """``(line, row)`` of each data row from ``start_line`` to ``end_line`` (inclusive;
    None: the end of the file); a row that does not fit the header is a RowError."""
    reader = csv.reader(f)
    try:
        header = next(reader)
    except StopIteration:
        return
    width = len(header)
    line = reader.line_num + 1
    for cells in reader:
        at, line = line, reader.line_num + 1
        if end_line is not None and at > end_line:
            return
        if at < start_line or not any(c.strip() for c in cells):
            continue
        if len(cells) != width:
            yield at, RowError(f"{len(cells)} cells, the header has {width}", "bad_row")
            continue
        yield at, dict(zip(header, cells, strict=True))


def _check_utf8(path: Path) -> None:
    """Raise click.ClickException, naming the line, if ``path`` is not UTF-8 (before
    anything is published: exports from spreadsheets are often Windows-1252)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                # (exc.object: the chunk after the bytes of a character cut in two)
                line += exc.object[:exc.start].count(b"\n")
                raise click.ClickException(
                    f"{path}: line {line} is not UTF-8 (byte {exc.object[exc.start]:#04x}): save "
                    "the file as UTF-8, e.g. iconv -f WINDOWS-1252 -t UTF-8") from exc
            line += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            raise click.ClickException(f"{path}: line {line} is not UTF-8 (it ends in "
                                       "the middle of a character)") from exc


@import_group.command("csv")
@click.option("-d", "--dir", "data_dir", envvar="CITYNODE_DIR", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="The node's data directory (or set CITYNODE_DIR).")
@click.option("--feed", required=True, help="Feed name, e.g. air-quality.")
@click.option("--type", "type_name", required=True, help="Payload type, e.g. "
              "AirQualityObserved.")
@click.option("--map", "mapping_path", required=True,
              type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Mapping file (TOML): columns -> attributes (docs/BRIDGES.md).")
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(1, 10000),
              help="Rows published together (all or none).")
@click.option("--start-line", default=2, show_default=True, type=click.IntRange(2),
              help="Skip the rows before this line (to resume a run).")
@click.option("--end-line", default=None, type=click.IntRange(2),
              help="Stop after this line (with --start-line: publish again only the "
              "lines of a batch that failed).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
def import_csv(data_dir: Path, feed: str, type_name: str, mapping_path: Path,
               batch_size: int, start_line: int, end_line: int | None, as_json: bool,
               file: Path) -> None:
    """Publish each row of FILE (CSV with a header line, UTF-8) as a record of FEED.

    Rows go in batches of --batch-size: a batch with a bad row publishes nothing, and
    its bad rows are reported by line number; the other batches are published. Exit
    status 1 if any row was not published; the report gives the lines of each batch
    that failed, to publish again (once fixed) with --start-line and --end-line.
    """
    from citynode.cli import _operate, _print_json
    from citynode.operator import Operator

    mapping = _load_mapping(mapping_path)
    csv.field_size_limit(_MAX_CELL)
    _check_utf8(file)
    with open(file, encoding="utf-8-sig", newline="") as f:
        header = next(csv.reader(f), [])
        missing = sorted(mapping.needs() - set(header))
        if missing:
            raise ConfigError(f"{file}: the header has no column {', '.join(map(repr, missing))}"
                              f" (the mapping {mapping_path} reads them)")
        total = sum(1 for _ in f)
    report: dict[str, Any] = {"published": 0, "batches": 0, "failed_batches": 0,
                              "bad_rows": 0, "refused_rows": 0, "errors": [],
                              "last_line_published": None, "failed_lines": []}

    def bad(line: int, reason: str, message: str) -> None:
        report["bad_rows"] += 1
        if len(report["errors"]) < _MAX_REPORTED:
            report["errors"].append({"line": line, "reason": reason, "message": message})

    async def run(op: Operator) -> None:
        with open(file, encoding="utf-8-sig", newline="") as f, click.progressbar(
                length=total, label=f"importing {file.name}", file=sys.stderr,
                show_pos=True) as bar:
            batch: list[tuple[int, str | None, dict[str, Any]]] = []
            failed = False
            count = 0  # rows of the batch, good and bad
            first = done = 1  # the batch's first line; the last line read

            async def flush() -> None:
                nonlocal batch, failed, count
                if failed:
                    report["failed_batches"] += 1
                    report["refused_rows"] += len(batch)
                    if len(report["failed_lines"]) < _MAX_REPORTED:
                        report["failed_lines"].append([first, done])
                elif batch:
                    await _send(op, feed, type_name, batch, report, bad)
                batch, failed, count = [], False, 0

            for line, row in _rows(f, start_line, end_line):
                bar.update(line - done)
                done = line
                count += 1
                if count == 1:
                    first = line
                try:
                    if isinstance(row, RowError):
                        raise row
                    subject, data = map_row(mapping, row)
                    validate_payload(type_name, data)
                except (RowError, PayloadError) as exc:
                    bad(line, exc.reason, str(exc))
                    failed = True
                else:
                    batch.append((line, subject, data))
                if count >= batch_size:
                    await flush()
            await flush()
            bar.update(total + 1 - done)

    _operate(data_dir, run)
    if as_json:
        _print_json(report)
    else:
        for e in report["errors"]:
            click.echo(f"line {e['line']}: {e['message']} ({e['reason']})", err=True)
        click.echo(f"published {report['published']} row(s) on {feed} in "
                   f"{report['batches']} batch(es)")
        if report["bad_rows"]:
            click.echo(f"not published: {report['bad_rows']} bad row(s), and "
                       f"{report['refused_rows']} good row(s) of the "
                       f"{report['failed_batches']} batch(es) they were in: fix them, "
                       "then publish those lines again (and only those: the other "
                       "rows are records now) with", err=True)
            for a, b in report["failed_lines"]:
                click.echo(f"  --start-line {a} --end-line {b}", err=True)
    if report["bad_rows"]:
        sys.exit(1)


async def _send(op: Any, feed: str, type_name: str,
                batch: list[tuple[int, str | None, dict[str, Any]]], report: dict[str, Any],
                bad: Any) -> None:
    """Publish one batch (all or none); a refusal by the node (the feed's egress policy,
    say) fails the batch, reported on its first line."""
    from citynode.errors import PeerRejected

    try:
        await op.publish_batch(feed, type_name, [d for _, _, d in batch],
                               [s for _, s, _ in batch])
    except PeerRejected as exc:
        if exc.status >= 500:
            raise
        bad(batch[0][0], exc.reason or "refused", f"batch of lines {batch[0][0]}.."
            f"{batch[-1][0]} refused by the node: {exc.detail or exc}")
        report["failed_batches"] += 1
        report["refused_rows"] += len(batch) - 1
        if len(report["failed_lines"]) < _MAX_REPORTED:
            report["failed_lines"].append([batch[0][0], batch[-1][0]])
        return
    report["published"] += len(batch)
    report["batches"] += 1
    report["last_line_published"] = batch[-1][0]


@click.group("sinks")
def sinks_group() -> None:
    """Deliveries to other systems ([[sinks.cloudevents]], [[sinks.ngsi_ld]])."""


@sinks_group.command("status")
@click.option("-d", "--dir", "data_dir", envvar="CITYNODE_DIR", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="The node's data directory (or set CITYNODE_DIR).")
@click.option("--refused", "limit", default=10, show_default=True,
              type=click.IntRange(0, 1000), help="How many refused deliveries to list.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def sinks_status(data_dir: Path, limit: int, as_json: bool) -> None:
    """Show each sink: records waiting in its outbox, deliveries since the node started,
    the last error, and the deliveries its receiver refused for good."""
    from citynode.cli import _operate, _print_json, _table

    out = _operate(data_dir, lambda node: node.sinks(limit))
    if as_json:
        _print_json(out)
        return
    if not out["sinks"]:
        click.echo("no sinks in node.toml: see docs/BRIDGES.md ([[sinks.cloudevents]])")
        return
    _table("sinks", ["name", "kind", "url", "waiting", "delivered", "retries", "refused",
                     "last error"],
           [[s["name"], s["kind"], s["url"], s["pending"], s["delivered"], s["retries"],
             s["refused_held"], s["last_error"] or ""] for s in out["sinks"]])
    for s in out["sinks"]:
        for r in s["refused_recent"]:
            click.echo(f"{s['name']}: refused {r['record']} after {r['attempts']} "
                       f"attempt(s): {r['error']}")
