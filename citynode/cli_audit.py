"""``citynode export`` and ``citynode audit``: click commands the main group registers.

``export`` reads a data dir's database and writes an auditor's bundle of one origin's
feeds (:mod:`citynode.bundle`). ``audit`` verifies a bundle with nothing but the file
and the origin's node id (:func:`citynode.audit.audit_bundle`): no data dir, no network.
Both turn :class:`CitynodeError` into one line themselves, so they also work outside
the main group.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from citynode.errors import CitynodeError

__all__ = ["audit_cmd", "export_cmd"]

# Bundles smaller than this finish before a progress bar would be worth drawing.
_PROGRESS_MIN_BYTES = 4 * 1024 * 1024


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@contextmanager
def _one_line_errors() -> Iterator[None]:
    try:
        yield
    except CitynodeError as exc:
        raise click.ClickException(str(exc)) from None


def default_workers() -> int:
    """Verifying threads for an audit: one more than the cores. The parsing thread holds
    the GIL most of the time, so each verifier gets only part of a core's worth of
    signature checks done (measured on 2 cores, 10,000 records: 1 worker 6.9k/s,
    2 workers 9.7k/s, 3 workers 11.6k/s, 4 workers 10.3k/s)."""
    return max(2, min(8, (os.cpu_count() or 1) + 1))


def _pick_card(st: Any, origin: bytes) -> bytes | None:
    """The newest valid card of ``origin`` this node holds (partner row or cards seen),
    or None."""
    from citynode.core.cards import open_card
    from citynode.core.keys import Verifier

    candidates: list[bytes] = []
    row = st.partner_by_key(origin)
    if row is not None and row.card:
        candidates.append(row.card)
    seen = st.get_meta("card:" + origin.hex())
    if seen:
        candidates.append(seen)
    best: tuple[int, bytes] | None = None
    verifier = Verifier()
    for env in candidates:
        try:
            card = open_card(env, expected_node_id=None, expected_key=origin,
                             verifier=verifier)
        except CitynodeError:
            continue  # a stored card that no longer verifies is not exported
        if best is None or card.time > best[0]:
            best = (card.time, env)
    return None if best is None else best[1]


@click.command("export")
@click.option("-d", "--dir", "data_dir", envvar="CITYNODE_DIR", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="The node's data directory (or set CITYNODE_DIR).")
@click.option("--origin", required=True, help="Node id (cn1...) whose records to export.")
@click.option("--feed", "feeds", multiple=True,
              help="Only this feed (repeatable); default: every feed of the origin held.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The bundle file to write.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@click.option("--include-partners", is_flag=True,
              help="Also export feeds whose records are in clear but not public "
                   "(access `partners`, or unknown here); by default they are left out.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def export_cmd(data_dir: Path, origin: str, feeds: tuple[str, ...], out: Path, force: bool,
               include_partners: bool, as_json: bool) -> None:
    """Write an auditor's bundle: ORIGIN's records, checkpoints, fork proofs and card.

    An auditor checks it with `citynode audit BUNDLE --origin ID`, needing nothing
    else. Runs alongside `citynode run` (it only reads the database). Without --feed,
    feeds whose records are in clear for the origin's partners only are left out unless
    --include-partners is given (restricted feeds go in, their payloads sealed, unless
    they also hold records signed in clear before they were restricted).
    """
    from citynode.bundle import export_from_storage
    from citynode.config import load_config
    from citynode.core.keys import parse_node_id
    from citynode.core.types import ERASURE_FEED
    from citynode.storage import open_storage

    with _one_line_errors():
        key = parse_node_id(origin)
        db = data_dir / "citynode.db"
        try:
            url = load_config(data_dir / "node.toml").storage.url
        except CitynodeError:  # no (valid) node.toml: the SQLite file decides
            url = ""
        if not url and not db.is_file():
            raise click.ClickException(
                f"{data_dir} holds no citynode database: check -d (run `citynode init` "
                "and `citynode run` first)"
            )
        if out.exists() and not force:
            raise click.ClickException(f"{out} exists: remove it, choose another --out, "
                                       "or add --force")
        own = _own_levels(data_dir, key)
        st = open_storage(data_dir, url)  # [storage] url: SQLite or PostgreSQL
        try:
            card = _pick_card(st, key)
            held = [r.feed for r in st.feeds() if r.origin == key]
            in_clear = {f for f in held if st.has_records_in_clear(key, f)}
            chosen: list[str] | None = list(feeds) or None
            left_out: list[tuple[str, str]] = []
            if chosen is None and not include_partners:
                # A bundle goes to auditors: what only the origin's partners may read
                # in clear goes in when asked for by name (or --include-partners). A
                # restricted feed's sealed payloads may go; one holding records in clear
                # (signed before it was restricted) is like a partners feed.
                left_out = [(f, a if a != "restricted" else "restricted, with records in "
                             "clear") for f, a in _not_public(card, key, held, own)
                            if a != "restricted" or f in in_clear]
                if left_out:
                    chosen = [f for f in held if f not in dict(left_out)]
                    if not chosen:
                        raise click.ClickException(
                            f"every feed of {origin} held here is in clear but not public "
                            f"({_listed(left_out)}): name them with --feed, or add "
                            "--include-partners, if the auditor may read them")
            summary = export_from_storage(st, key, chosen, out, card=card, now_ms=_now_ms())
        finally:
            st.close()
    # The erasure requests may have gone in after all, behind the tombstones exported.
    left_out = [(f, a) for f, a in left_out if f not in summary.feeds]
    # The erasure requests go in only behind tombstones of feeds exported (noted below);
    # never sealed, they are read by every node holding what they name.
    private = _not_public(card, key, [f for f in summary.feeds if f != ERASURE_FEED], own)
    if as_json:
        # "not held" in the summary means "not in the bundle": those left out on purpose
        # are listed as such, not as missing here.
        report = summary.to_json()
        report["card_feeds_not_held"] = [f for f in report["card_feeds_not_held"]
                                         if f not in dict(left_out)]
        click.echo(json.dumps({**report,
                               "not_public": [{"feed": f, "access": a} for f, a in private],
                               "left_out_not_public": [{"feed": f, "access": a}
                                                       for f, a in left_out]}, indent=2))
        return
    c = summary.counts
    click.echo(
        f"wrote {out}: {c.records} record(s) in {len(summary.feeds)} feed(s), "
        f"{c.checkpoints} checkpoint(s), {c.forks + c.split_views} proof(s), "
        f"{summary.bytes} bytes"
    )
    if not summary.has_card:
        click.echo(f"note: no card of {summary.origin} is known here: the bundle has none "
                   "(the audit still checks every record)", err=True)
    if summary.skipped_checkpoints:
        click.echo(f"note: {summary.skipped_checkpoints} checkpoint(s) of a size beyond the "
                   "records held here were left out (this node has not caught up with them "
                   "yet; a bundle cannot prove records it does not hold)", err=True)
    if left_out:
        click.echo(f"note: left out feed(s) in clear that are not public: {_listed(left_out)}."
                   " Name them with --feed, or add --include-partners, if the auditor may "
                   "read them (the audit will say the bundle does not cover them)", err=True)
    not_held = [f for f in summary.card_feeds_not_held if f not in dict(left_out)]
    if not_held and not feeds:
        click.echo(f"note: the origin's card lists feed(s) {', '.join(not_held)} of which no "
                   "record is held here: the bundle does not cover them (the audit will "
                   "say so)", err=True)
    if summary.erasures_added:
        click.echo(f"note: added feed {ERASURE_FEED} ({summary.feeds[ERASURE_FEED]} "
                   "record(s)): the erasure requests behind the erased records of the "
                   "feeds exported, which the audit checks them against", err=True)
    if summary.skipped_proofs:
        click.echo(f"note: {summary.skipped_proofs} stored proof(s) of an unknown kind "
                   "were left out", err=True)
    if private:
        clear = [f for f, _a in private if f in in_clear]
        click.echo("note: the bundle holds feed(s) that are not public: " + _listed(private)
                   + (". Records of " + ", ".join(clear) + " are in clear: give the bundle "
                      "only to those the origin allows to read them" if clear else
                      ": their payloads are sealed to their readers"), err=True)


def _listed(feeds: list[tuple[str, str]]) -> str:
    return ", ".join(f"{f} ({a})" for f, a in feeds)


def _own_levels(data_dir: Path, origin: bytes) -> dict[str, str]:
    """When ``origin`` is the node of ``data_dir``: the access levels its node.toml sets
    now (the card kept may predate a change). Empty otherwise, or when the key or the
    config cannot be read (a sealed key without its passphrase): the card decides."""
    from citynode.config import load_config
    from citynode.errors import CitynodeError
    from citynode.identity import load_identity

    try:
        if load_identity(data_dir).identity != origin:
            return {}
        feeds = load_config(data_dir / "node.toml").feeds
    except CitynodeError:
        return {}
    return {name: fc.access for name, fc in feeds.items()}


def _not_public(card: bytes | None, origin: bytes, feeds: list[str],
                own: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """``(feed, access)`` of the ``feeds`` the origin's card does not list as public
    (access ``unknown`` when the card, or the card's entry, is missing: a node never
    takes unknown access as public). ``own``: this node's own levels from node.toml,
    which win when they are not public (a feed made partners-only since the card)."""
    from citynode.core.cards import open_card
    from citynode.core.keys import Verifier

    access: dict[str, str] = {}
    if card is not None:
        opened = open_card(card, expected_node_id=None, expected_key=origin,
                           verifier=Verifier())
        access = {f.name: f.access for f in opened.feeds}
    access.update({f: a for f, a in (own or {}).items() if a != "public"})
    return [(f, access.get(f, "unknown")) for f in feeds if access.get(f) != "public"]


def _rich_report(report: Any) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    console = Console()
    console.print(f"[bold]bundle[/] {escape(report.path)}")
    console.print(f"[bold]origin[/] {report.origin}")
    if report.card is not None:
        console.print(f"[bold]card[/]   {escape(report.card.name)} "
                      f"({escape(report.card.url)}), signed by the origin")
    if report.key_log_text is not None:
        console.print(escape(report.key_log_text),
                      style=None if report.key_log_given else "bold yellow")
    rate = f", {report.record_items / report.seconds:,.0f} records/s" if report.seconds else ""
    console.print(f"{report.record_items} record(s), {report.signatures} signature(s) "
                  f"verified in {report.seconds:.2f} s{rate}"
                  + ("" if report.complete else " [bold red](bundle incomplete)[/]"))
    t = Table(title="feeds")
    for col in ("feed", "records", "contiguous", "missing", "invalid", "checkpoints"):
        t.add_column(col, justify="left" if col == "feed" else "right", overflow="fold")
    for f in sorted(report.feeds.values(), key=lambda f: f.name):
        t.add_row(f.name, str(f.records), f"1..{f.contiguous}" if f.contiguous else "none",
                  str(f.missing), str(f.invalid),
                  f"{f.checkpoints_matched}/{f.checkpoints} matched")
    if report.feeds:
        console.print(t)
    console.print(Text(f"coverage: {report.coverage_text()}",
                       style="yellow" if report.feeds_not_covered else ""))
    style = {"error": "bold red", "warning": "yellow", "info": "dim"}
    order = {"error": 0, "warning": 1, "info": 2}
    for fd in sorted(report.findings, key=lambda f: order[f.severity]):
        # Text, not markup: messages quote bundle content, which may hold "[...]".
        console.print(Text(fd.line(), style=style[fd.severity]))
    if report.suppressed:
        console.print(f"... and {report.suppressed} more finding(s) not listed (use --json "
                      "for counts by kind)")
    e, w = report.severity_counts["error"], report.severity_counts["warning"]
    verdict = "[bold green]OK[/]" if report.ok else "[bold red]FAILED[/]"
    console.print(f"{verdict}: {e} error(s), {w} warning(s)")


@contextmanager
def _progress_bar(path: Path) -> Iterator[Callable[[int, int], None] | None]:
    try:
        big = path.stat().st_size >= _PROGRESS_MIN_BYTES
    except OSError:
        big = False  # the audit itself reports the unreadable file
    if not (big and sys.stderr.isatty()):
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    bar = Progress("auditing", BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=True)
    task = bar.add_task("audit", total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    with bar:
        yield update


@click.command("audit")
@click.argument("bundle", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--origin", required=True,
              help="The origin's node id (cn2... or cn1...), obtained from that city out "
                   "of band.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--workers", type=click.IntRange(0, 64), default=None,
              help="Threads verifying signatures besides the reading thread "
                   "(default: CPUs - 1; 0: everything on one thread).")
@click.option("--terms", "terms", multiple=True, metavar="FEED=FILE",
              help="Check FILE (the terms document fetched from FEED's terms_url) "
                   "against the terms digest the origin's card signed. Repeatable.")
@click.option("--key-log", "key_logs", multiple=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="A key log of a cn2 origin (GET /v1/keylog?origin=ID from any node; it "
                   "verifies from the id alone), newer than the bundle's card: records "
                   "beyond a later recovery's last good heads are then flagged. Repeatable.")
@click.option("--witness", "witnesses", multiple=True, metavar="ID",
              help="A witness's node id (out of band): the newest checkpoint of each feed "
                   "must carry cosignatures of --quorum of the witnesses named. "
                   "Repeatable.")
@click.option("--quorum", type=click.IntRange(0, 64), default=0,
              help="Cosignatures of distinct --witness ids required (default: all).")
@click.option("--witness-key-log", "witness_key_logs", multiple=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="A cn2 witness's key log (GET /v1/keylog?origin=ID), when the bundle "
                   "does not carry it. Repeatable.")
def audit_cmd(bundle: Path, origin: str, as_json: bool, workers: int | None,
              terms: tuple[str, ...], key_logs: tuple[Path, ...],
              witnesses: tuple[str, ...], quorum: int,
              witness_key_logs: tuple[Path, ...]) -> None:
    """Verify BUNDLE offline against ORIGIN's node id: every signature, chain link,
    checkpoint root and proof. Needs no data dir and no network. With --terms, each
    terms document given is checked against its feed's signed terms digest
    (terms_mismatch if it differs). With --witness (and --quorum), the checkpoints'
    witness cosignatures are checked: a feed whose newest checkpoint lacks the quorum,
    or a split view in the bundle, fails the audit.

    Exits with status 1 if anything fails.
    """
    from citynode.audit import audit_bundle

    documents = _terms_documents(terms)
    if quorum > len(set(witnesses)):
        raise click.BadParameter(f"{quorum} cosignatures required of "
                                 f"{len(set(witnesses))} witness(es) named: name at least "
                                 f"{quorum} with --witness", param_hint="--quorum")
    with _one_line_errors(), _progress_bar(bundle) as progress:
        logs = [p.read_bytes() for p in key_logs]
        wlogs = [p.read_bytes() for p in witness_key_logs]
        report = audit_bundle(bundle, origin, now_ms=_now_ms(), progress=progress,
                              workers=default_workers() if workers is None else workers,
                              terms_documents=documents, key_logs=logs,
                              witnesses=witnesses, quorum=quorum, witness_key_logs=wlogs)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    elif sys.stdout.isatty():
        _rich_report(report)
    else:
        click.echo(report.render_text())
    if not report.ok:
        sys.exit(1)


#: A terms document is a page of text: one larger than this is not one.
MAX_TERMS_BYTES = 16 * 1024 * 1024


def _terms_documents(specs: tuple[str, ...]) -> dict[str, bytes]:
    """``FEED=FILE`` options -> feed -> the file's bytes. Raises click.BadParameter for
    a malformed option, a feed given twice, or a file that cannot be read or is over
    MAX_TERMS_BYTES."""
    out: dict[str, bytes] = {}
    for spec in specs:
        feed, sep, name = spec.partition("=")
        if not sep or not feed or not name:
            raise click.BadParameter(f"{spec!r}: give FEED=FILE", param_hint="--terms")
        if feed in out:
            raise click.BadParameter(f"feed {feed!r} given twice", param_hint="--terms")
        try:
            with open(name, "rb") as f:
                doc = f.read(MAX_TERMS_BYTES + 1)
        except OSError as exc:
            raise click.BadParameter(f"cannot read {name}: {exc.strerror or exc}",
                                     param_hint="--terms") from None
        if len(doc) > MAX_TERMS_BYTES:
            raise click.BadParameter(f"{name} is over {MAX_TERMS_BYTES} bytes: not a terms "
                                     "document", param_hint="--terms")
        out[feed] = doc
    return out
