"""The ``citynode`` command line: thin click commands over the library.

Every command takes the data dir as ``-d DIR`` (or ``CITYNODE_DIR``). Errors are one line
on stderr and exit status 1 (2 for usage errors); never a traceback. Tables on a
terminal, JSON with ``--json``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from citynode import __version__
from citynode.errors import CitynodeError

T = TypeVar("T")
if TYPE_CHECKING:
    from citynode.operator import Operator
    from citynode.storage import Storage

__all__ = ["main"]


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _operate(data_dir: Path, op: Callable[[Operator], Awaitable[T]]) -> T:
    """``op`` on the operator interface of the node of ``data_dir``, running or not
    (citynode/operator.py): every command that changes a node is written once."""
    from citynode.operator import Operator

    async def go() -> T:
        async with Operator.open(data_dir) as node:
            return await op(node)

    return asyncio.run(go())


class _Group(click.Group):
    """Turns every CitynodeError into one line and exit status 1, and a usage error
    into one line and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            # One line, as every other error (click would print the usage lines first).
            if exc.ctx is None:
                raise
            raise click.UsageError(
                f"{exc.format_message()} (see '{exc.ctx.command_path} --help')"
            ) from None
        except CitynodeError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            raise click.ClickException(f"{exc.strerror or exc}{where}") from None


DIR_OPTION = click.option(
    "-d",
    "--dir",
    "data_dir",
    envvar="CITYNODE_DIR",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The node's data directory (or set CITYNODE_DIR).",
)
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


def _print_json(v: Any) -> None:
    click.echo(json.dumps(v, indent=2, ensure_ascii=False))


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    cells = [[str(x) if x is not None else "" for x in r] for r in rows]
    t = Table(title=title)
    for i, c in enumerate(columns):
        ids = [r[i] for r in cells if r[i].startswith("cn1")]
        if ids and len(ids) == sum(1 for r in cells if r[i]):
            # Node ids are copied and pasted: whole, on one line.
            t.add_column(c, no_wrap=True, min_width=max(map(len, ids)))
        else:
            t.add_column(c, overflow="fold")  # wrap other long values, never cut them
    for r in cells:
        t.add_row(*r)
    console = Console()
    if not console.is_terminal:  # a pipe or a file: no width to fit, so nothing wraps
        console = Console(width=10_000)
    console.print(t)


def _require_dir(data_dir: Path) -> None:
    from citynode.operator import require_data_dir

    require_data_dir(data_dir)


def _open_storage(data_dir: Path) -> Storage:
    """The data dir's storage, SQLite or PostgreSQL as its ``[storage] url`` says."""
    from citynode.config import load_config
    from citynode.storage import open_storage

    cfg = load_config(data_dir / "node.toml")
    return open_storage(data_dir, cfg.storage.url,
                        rejected_log_rows=cfg.limits.rejected_log_rows)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="citynode")
@click.pass_context
def main(ctx: click.Context) -> None:
    """citynode: share signed city data feeds directly with partner cities.

    Start with `citynode init`, then `citynode run`; add partners with
    `citynode partner add`. See README.md and docs/ for more.
    """
    if ctx.invoked_subcommand != "run":  # run sets up the node's own logging
        from citynode.logs import setup_cli_logging

        setup_cli_logging()


@main.command()
@DIR_OPTION
@click.option("--name", required=True, help="The city or node name, e.g. Jakarta.")
@click.option("--listen", default="127.0.0.1:8443", show_default=True,
              help="HOST:PORT the node serves HTTPS on.")
@click.option("--public-url", default=None,
              help="URL partners use to reach this node (default https://LISTEN).")
@click.option("--host", "hosts", multiple=True,
              help="Extra host name or IP for the TLS certificate (repeatable).")
@click.option("--passphrase", is_flag=True,
              help="Protect the node keys with a passphrase (asked for now; give it in "
                   "CITYNODE_PASSPHRASE when the node starts).")
@click.option("--recovery-passphrase", is_flag=True,
              help="Choose the passphrase of the recovery file (asked for now; or give it "
                   "in CITYNODE_RECOVERY_PASSPHRASE); by default a random one is made and "
                   "printed once, on a terminal only.")
@click.option("--next-key-passphrase", is_flag=True,
              help="Choose the passphrase node.next.key is sealed with, which `key rotate` "
                   "asks for (asked for now; or give it in CITYNODE_NEXT_KEY_PASSPHRASE); "
                   "by default a random one is made and printed once, on a terminal only. "
                   "It is not the recovery passphrase, which never comes near the node.")
@click.option("--next-key-on-disk", is_flag=True,
              help="Keep the next signing key sealed like node.key, so `key rotate` runs "
                   "unattended. A break-in then takes both keys and can rotate this "
                   "identity to its own key: only the recovery key takes it back.")
@click.option("--print-recovery", is_flag=True,
              help="Print the recovery phrase (and generated passphrases) even when the "
                   "output is not a terminal, where it may end up in a log.")
def init(data_dir: Path, name: str, listen: str, public_url: str | None,
         hosts: tuple[str, ...], passphrase: bool, recovery_passphrase: bool,
         next_key_passphrase: bool, next_key_on_disk: bool, print_recovery: bool) -> None:
    """Create a new node: its keys and identity (with recovery material to move
    offline), TLS certificate, operator token and node.toml.

    Secret recovery material (the phrase, generated passphrases) is printed only to a
    terminal, or with --print-recovery. Otherwise choose the recovery passphrase
    (--recovery-passphrase or CITYNODE_RECOVERY_PASSPHRASE) and the next-key passphrase
    (--next-key-passphrase or CITYNODE_NEXT_KEY_PASSPHRASE): only the sealed files are
    written, and recovery.key is to be moved off this machine.
    """
    import os

    from citynode.cli_keys import NEXT_KEY_ENV, RECOVERY_ENV, ask_secret, recovery_notice
    from citynode.datadir import init_data_dir

    if next_key_on_disk and next_key_passphrase:
        raise click.UsageError("--next-key-on-disk seals the next key like node.key: it "
                               "takes no --next-key-passphrase")
    show = print_recovery or sys.stdout.isatty()
    pw = (ask_secret("Passphrase", "node key passphrase", None, confirm=True)
          if passphrase else None)
    rpw = (ask_secret("Recovery passphrase", "recovery passphrase", None, confirm=True)
           if recovery_passphrase else os.environ.get(RECOVERY_ENV) or None)
    npw = None
    if not next_key_on_disk:
        npw = (ask_secret("Next-key passphrase", "next-key passphrase", None, confirm=True)
               if next_key_passphrase else os.environ.get(NEXT_KEY_ENV) or None)
    missing = [f"the {what} (--{flag}, or {env})" for what, flag, env, value in [
        ("recovery passphrase", "recovery-passphrase", RECOVERY_ENV, rpw),
        ("next-key passphrase", "next-key-passphrase", NEXT_KEY_ENV,
         npw or next_key_on_disk)] if not value]
    if missing and not show:
        raise click.ClickException(
            "the output is not a terminal, so a generated passphrase printed here could "
            f"end up in a log: choose {' and '.join(missing)}, or pass --print-recovery")
    if rpw is not None and rpw == npw:
        raise click.ClickException(
            "choose a next-key passphrase other than the recovery passphrase: the next-key "
            "one is typed on the node at each rotation, the recovery one must never be")
    ident, cfg = init_data_dir(data_dir, name=name, listen=listen, public_url=public_url,
                               hosts=hosts, passphrase=pw, recovery_passphrase=rpw,
                               next_passphrase=npw, next_key_on_disk=next_key_on_disk)
    url = cfg.node.public_url
    click.echo(f"created node {name} in {data_dir}")
    click.echo(f"node id: {ident.node_id}")
    recovery_notice(ident.recovery_path, ident.recovery_phrase if show else None,
                    ident.recovery_passphrase if show else None)
    if next_key_on_disk:
        click.echo("warning: node.next.key is sealed like node.key (--next-key-on-disk): a "
                   "break-in that takes the data dir can rotate this identity to its own "
                   "key; only the recovery key takes it back")
    else:
        click.echo("node.next.key is sealed with the next-key passphrase: `citynode key "
                   f"rotate` asks for it, or reads {NEXT_KEY_ENV} (a stolen node.key cannot "
                   "rotate)")
        if ident.next_passphrase and show:
            click.echo(f"  The next-key passphrase (write it down, it is not stored): "
                       f"{ident.next_passphrase}")
    click.echo("A partner city adds this node with:")
    click.echo(f"  citynode partner add {url} --id {ident.node_id} -d THEIR_DIR")
    click.echo(f"Start it with: citynode run -d {data_dir}")


@main.command()
@DIR_OPTION
@click.option("--accept-fork-risk", is_flag=True,
              help="The database was restored (from a backup or a copy) and no partner "
                   "can confirm its heads: sign on own feeds anyway. If a partner holds "
                   "later records of this node, its feeds fork for good.")
@click.option("--restored", is_flag=True,
              help="This data dir was rolled back or copied back outside `citynode "
                   "restore` (a machine snapshot, cp -a): mark its database restored, so "
                   "it takes back from partners the records of its own feeds they hold "
                   "beyond its heads and signs nothing on them until every partner "
                   "confirmed.")
def run(data_dir: Path, accept_fork_risk: bool, restored: bool) -> None:
    """Serve the node (HTTPS) until stopped with SIGTERM or Ctrl-C.

    A node whose database was restored (by `citynode restore`, or its file copied back
    by hand) signs nothing on its own feeds until every partner confirms its heads, so it
    never signs a seq a partner already holds.
    """
    from citynode.runner import run_node

    if restored and accept_fork_risk:
        raise click.UsageError("--restored and --accept-fork-risk say opposite things: "
                               "give one")
    run_node(data_dir, accept_fork_risk=accept_fork_risk, restored=restored)


@main.command("id")
@DIR_OPTION
def show_id(data_dir: Path) -> None:
    """Print this node's id (give it to partner cities out of band)."""
    from citynode.identity import load_identity

    click.echo(load_identity(data_dir).node_id)


def _read_items(source: Any) -> list[dict[str, Any]]:
    from citynode.render import parse_json_items

    try:
        return parse_json_items(source.read())
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@DIR_OPTION
@click.option("--feed", required=True, help="Feed name, e.g. air-quality.")
@click.option("--type", "type_name", required=True,
              help="Payload type, e.g. AirQualityObserved (see docs/PROTOCOL.md).")
@click.option("--subject", default=None, help="Optional subject (e.g. a station id).")
@JSON_OPTION
@click.argument("source", type=click.File("r"), default="-")
def publish(data_dir: Path, feed: str, type_name: str, subject: str | None, as_json: bool,
            source: Any) -> None:
    """Sign and publish records from SOURCE (a JSON file or - for stdin).

    SOURCE holds one JSON object, a JSON array of objects, or JSON Lines (one object per
    line). Every payload is checked against TYPE first: if any is invalid nothing is
    published.
    """
    if subject == "":
        raise click.BadParameter("empty: give a subject or leave the option out",
                                 param_hint="--subject")
    items = _read_items(source)
    out = _operate(data_dir, lambda node: node.publish(feed, type_name, items, subject))
    ids, first, access = out["ids"], out["first_seq"], out.get("access")
    if access == "public":
        # What the node applied (a running node's config is the one it started with).
        # Public is the default for a feed not in node.toml, so say it each time: a typo
        # in --feed would publish to everyone what was meant for partners.
        click.echo(f"note: feed {feed!r} is public: anyone may read it (to limit it, give "
                   f"[feeds.{feed}] access = \"partners\" or \"restricted\" in node.toml "
                   "and reload it: kill -HUP the node, or restart it)", err=True)
    if as_json:
        _print_json({"feed": feed, "first_seq": first, "ids": ids})
    else:
        click.echo(f"published {len(ids)} record(s) on {feed}, seq {first}..{first + len(ids) - 1}")
        if len(ids) <= 10:
            for i in ids:
                click.echo(i)


@main.command()
@DIR_OPTION
@click.option("--id", "ids", required=True, multiple=True,
              help="Id of a record of this node to erase (64 hex digits); repeat for more.")
@click.option("--reason", required=True,
              help="Why, in 1 to 1000 characters. PUBLIC: the request is a public record "
                   "(feed citynode.erasures) even when the erased record was restricted; "
                   "never put personal data in it.")
@JSON_OPTION
def erase(data_dir: Path, ids: tuple[str, ...], reason: str, as_json: bool) -> None:
    """Publish a signed erasure request for records of this node.

    Every node that holds them (this one included) drops their payloads and keeps their
    signed skeletons, so chains, checkpoints and audits still verify; the request is
    gossiped like any record. Only a record's origin can erase it.

    The request, its reason included, is public: feed citynode.erasures is never sealed
    (every node holding the records must read it), even for a restricted feed's records.
    Write a reason that names no person ("personal data published by mistake").
    """
    for i in ids:
        try:
            ok = len(bytes.fromhex(i)) == 32
        except ValueError:
            ok = False
        if not ok:
            raise click.BadParameter(f"{i!r} is not a record id (64 hex digits)",
                                     param_hint="--id")
    out = _operate(data_dir, lambda node: node.erase(list(ids), reason))
    if as_json:
        _print_json(out)
    else:
        click.echo(f"erasure request {out['id']} (seq {out['seq']}) published for "
                   f"{len(out['erased'])} record(s)")
    # Said in both forms (on stderr): the reason went out to every node.
    click.echo("note: the erasure request and its reason are public (feed "
               "citynode.erasures is never sealed), even for records of a restricted feed",
               err=True)


@main.command()
@DIR_OPTION
@click.option("--origin", default=None, help="Only records of this node id.")
@click.option("--feed", default=None, help="Only this feed.")
@click.option("--type", "type_name", default=None, help="Only this payload type.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100_000),
              help="At most this many records.")
@click.option("--after", default=0, type=click.IntRange(0, 2**63 - 1),
              help="Cursor: show records after it.")
@JSON_OPTION
def records(data_dir: Path, origin: str | None, feed: str | None, type_name: str | None,
            limit: int, after: int, as_json: bool) -> None:
    """List records held by this node (its own and its partners')."""
    from citynode.core.filters import RecordFilter
    from citynode.core.keys import parse_node_id
    from citynode.identity import load_identity
    from citynode.render import row_json

    _require_dir(data_dir)
    st = _open_storage(data_dir)
    try:
        from citynode.audit import stored_key_logs

        names = stored_key_logs(st)  # so readers print as cn2 (the holders of their keys)
        rows = st.query(
            RecordFilter(origin=parse_node_id(origin) if origin else None,
                         feed=feed, type=type_name),
            after_rowid=after, limit=limit,
        )
        key = load_identity(data_dir).key
        recs = [row_json(r, key=key, names=names) for r in rows]
    finally:
        st.close()
    if as_json:
        _print_json({"records": recs, "next": recs[-1]["cursor"] if len(recs) == limit else None})
        return
    _table(
        f"{len(recs)} record(s)",
        ["cursor", "origin", "feed", "seq", "time", "type", "subject", "id", "payload"],
        [[r["cursor"], r["origin"][:14] + "…", r["feed"], r["seq"], r["time_iso"], r["type"],
          r.get("subject"), r["id"][:16] + "…",
          "erased" if "erased" in r else "pruned" if r.get("pruned") else "held"]
         for r in recs],
    )


@main.command()
@DIR_OPTION
@JSON_OPTION
def feeds(data_dir: Path, as_json: bool) -> None:
    """List the feeds this node holds or hears of: heads, terms and completeness state.

    The state (live, silent, lagging, withheld, dead, unknown) is the running node's;
    of a node that is not running, from the newest liveness statements it kept (it
    heard nothing since it stopped)."""
    from citynode.audit import stored_key_logs
    from citynode.render import iso_time

    _require_dir(data_dir)
    live = {(f["origin"], f["feed"]): f for f in _operate(data_dir, lambda n: n.liveness())}
    st = _open_storage(data_dir)
    try:
        rows = st.feeds()
        names = stored_key_logs(st)  # cn2 origins print as cn2, as the node names them
    finally:
        st.close()
    out: list[dict[str, Any]] = [
        {"origin": names.name(r.origin), "feed": r.feed, "seq": r.seq, "count": r.count,
         "head": r.head.hex(), "last_time": r.last_time} for r in rows]
    held = {(o["origin"], o["feed"]) for o in out}
    # Feeds heard of (a signed statement, a card) of which no record is held.
    out += [{"origin": o, "feed": f, "seq": 0, "count": 0, "head": None, "last_time": None}
            for (o, f) in sorted(live) if (o, f) not in held]
    for o in out:
        lv = live.get((o["origin"], o["feed"]), {})
        o["terms"] = lv.get("terms")
        o["retention_days"] = lv.get("retention_days")  # the newest card's (None: none)
        o["completeness"] = {k: lv.get(k) for k in ("state", "signed_size", "signed_time",
                                                     "cadence_s", "behind_since")}
        o["completeness"]["state"] = lv.get("state", "unknown")
    if as_json:
        _print_json({"feeds": out})
        return
    _table("feeds", ["origin", "feed", "head seq", "records", "last record", "state",
                     "signed", "license"],
           [[o["origin"], o["feed"], o["seq"], o["count"],
             iso_time(o["last_time"]) if o["last_time"] else "",
             o["completeness"]["state"],
             "" if o["completeness"]["signed_size"] is None
             else o["completeness"]["signed_size"],
             _terms_text(o["terms"])] for o in out])


def _terms_text(terms: dict[str, Any] | None) -> str:
    if not terms:
        return ""
    parts = [terms["license"] or "", terms["terms_url"] or ""]
    return " + ".join(p for p in parts if p) or "(not stated)"


@main.command()
@DIR_OPTION
@click.option("--dead-letters", "limit", default=20, show_default=True,
              type=click.IntRange(0, 1000), help="How many of the newest dead letters.")
@JSON_OPTION
def bridges(data_dir: Path, limit: int, as_json: bool) -> None:
    """Show the bridges of node.toml ([[bridges.mqtt]], [[bridges.ngsi]]) and their
    dead letters.

    While the node runs: whether each is connected, and messages received, published,
    duplicates and dead-lettered since it started. Dead letters (messages that could
    not become a record, with the reason) are shown whether the node runs or not.
    """
    from citynode.render import iso_time

    out = _operate(data_dir, lambda node: node.bridges(limit))
    if as_json:
        _print_json(out)
        return
    if not out["bridges"] and not out["dead_letters"]:
        click.echo("no bridges in node.toml: see docs/BRIDGES.md ([[bridges.mqtt]])")
        return

    def state(b: dict[str, Any]) -> str:
        if not b["running"]:
            return "node not running"
        if b["kind"] == "ngsi":
            return "listening" if not b["last_error"] else f"last refused: {b['last_error']}"
        return "connected" if b["connected"] else f"down: {b['last_error'] or 'connecting'}"

    _table("bridges", ["name", "broker", "state", "received", "published", "duplicates",
                       "dead letters (dropped)"],
           [[b["name"], b.get("broker") or b.get("endpoint"), state(b),
             b.get("received", ""), b.get("published", ""), b.get("duplicates", ""),
             f"{b['dead_letters_held']} ({b['dead_letters_dropped']})"]
            for b in out["bridges"]])
    _table("dead letters", ["at", "bridge", "topic", "reason", "bytes", "detail"],
           [[iso_time(d["at_ms"]), d["bridge"], d["topic"], d["reason"], d["size"],
             d["detail"]] for d in out["dead_letters"]])


@main.group()
def tls() -> None:
    """Renew this node's TLS certificate with no window where partners refuse it."""


@tls.command("renew")
@DIR_OPTION
@click.option("--switch", is_flag=True,
              help="Serve the certificate staged by a previous `tls renew` from now on.")
def tls_renew(data_dir: Path, switch: bool) -> None:
    """Renew the TLS certificate in two steps.

    First `citynode tls renew`: a new certificate for the same name and hosts is
    staged, and the node's card names it next to the one in force (partners accept
    either from then on). Once partners hold that card (they refresh it every pull
    interval), `citynode tls renew --switch`: the node serves the new certificate from
    its next connection on, with no restart, and its card names it alone.
    """
    _require_dir(data_dir)
    out = _operate(data_dir, lambda node: node.renew_tls(switch))
    if switch:
        click.echo(f"switched: the node serves TLS certificate {out['tls']}")
    else:
        click.echo(f"staged: TLS certificate {out['tls_next']}, named in the card next to "
                   f"{out['tls']}")
        click.echo(f"Partners pick up the card within a pull interval; then run "
                   f"`citynode tls renew --switch -d {data_dir}`.")


@main.group()
def partner() -> None:
    """Add, list and remove partner nodes."""


@partner.command("add")
@DIR_OPTION
@click.argument("url")
@click.option("--id", "pid", required=True, help="The partner's node id (cn1...), got out of band.")
def partner_add(data_dir: Path, url: str, pid: str) -> None:
    """Add the partner at URL after checking its card is signed by --id."""
    from citynode.core.keys import parse_node_id

    parse_node_id(pid)
    name = _operate(data_dir, lambda node: node.add_partner(url, pid))
    click.echo(f"added partner {name} ({pid}) at {url}; its TLS certificate is pinned")


@partner.command("list")
@DIR_OPTION
@JSON_OPTION
def partner_list(data_dir: Path, as_json: bool) -> None:
    """List partners, with live state when the node is running."""

    # Stored partners from the database, their live state from the node (none when it
    # is not running: a node started for this command has no partner tasks).
    live = {p["node_id"]: p for p in _operate(data_dir, lambda node: node.partners())}
    st = _open_storage(data_dir)
    try:
        rows = st.partners()
    finally:
        st.close()
    out_rows = []
    for r in rows:
        item: dict[str, Any] = {"node_id": r.node_id, "name": r.name, "url": r.url,
                                "tls_fingerprint": r.tls_fingerprint.hex() if r.tls_fingerprint
                                else None}
        if r.node_id in live:
            lv = live[r.node_id]
            item.update({k: lv.get(k) for k in ("up", "failures", "queue", "invalid",
                                                "last_error", "clock_offset_s")})
        out_rows.append(item)
    if as_json:
        _print_json({"partners": out_rows})
        return
    _table("partners", ["name", "node id", "url", "up", "queue", "invalid", "clock"],
           [[p["name"], p["node_id"], p["url"],
             "(node not running)" if "up" not in p else "yes" if p["up"] else "no",
             p.get("queue", ""),
             ", ".join(f"{k}={v}" for k, v in (p.get("invalid") or {}).items()),
             _clock_text(p.get("clock_offset_s"))]
            for p in out_rows])


def _clock_text(offset: int | None) -> str:
    """A partner's clock against ours, as `partner list` shows it."""
    if offset is None:
        return ""
    if offset == 0:
        return "same"
    return f"{abs(offset)} s {'ahead' if offset > 0 else 'behind'}"


@partner.command("remove")
@DIR_OPTION
@click.argument("pid")
def partner_remove(data_dir: Path, pid: str) -> None:
    """Remove the partner with node id PID."""
    from citynode.core.keys import parse_node_id

    parse_node_id(pid)
    if not _operate(data_dir, lambda node: node.remove_partner(pid)):
        raise click.ClickException(f"no partner {pid} (see `citynode partner list`)")
    click.echo(f"removed partner {pid}")


@main.command()
@DIR_OPTION
@JSON_OPTION
def check(data_dir: Path, as_json: bool) -> None:
    """Check node.toml, the database file's structure (SQLite quick_check), re-verify
    every stored record (signature, canonical encoding, chain links), and look for
    proofs that this node's own feeds forked.

    Exits with status 1 if any problem is found.
    """
    from citynode.audit import check_storage
    from citynode.config import load_config
    from citynode.errors import ConfigError, KeyFileError, StorageError
    from citynode.identity import load_identity
    from citynode.storage import SCHEMA_VERSION

    _require_dir(data_dir)
    try:
        own: bytes | None = load_identity(data_dir).identity
        skipped = ""
    except KeyFileError as exc:  # a sealed key with no passphrase given, a backup copy
        own, skipped = None, str(exc)
    st = _open_storage(data_dir)
    try:
        # The file's own structure first: a damaged page can hide records from the
        # record checks, which read through the indexes.
        damage = st.quick_check()
        try:
            report = check_storage(st, progress=sys.stderr.isatty())
            forks = st.fork_proofs()
        except StorageError as exc:
            if not damage:
                raise
            # The records cannot be read past the damage: say what quick_check found.
            raise click.ClickException(
                f"database file damaged ({damage[0]}; {len(damage)} finding(s)); the "
                f"records cannot be checked: {exc}") from exc
    finally:
        st.close()
    report.problems[:0] = [f"database file damaged: {d}" for d in damage]
    # The config too: `run` and a SIGHUP reload refuse an invalid node.toml, so a check
    # that passed it would send the operator the wrong way.
    try:
        load_config(data_dir / "node.toml")
    except ConfigError as exc:
        report.problems.insert(0, f"node.toml: {exc}")
    # A proof that this node itself signed two histories is a problem of this node; proofs
    # about other origins are evidence it keeps and passes on.
    for f in forks:
        if f.origin == own:
            at = f"seq {f.seq}" if f.kind == "fork" else f"a checkpoint of size {f.seq}"
            report.problems.append(
                f"own feed {f.feed}, {at}: this node signed two histories ({f.kind} proof "
                "held, see `citynode forks`): publishing on it is stopped")
    others = sum(f.origin != own for f in forks)
    if as_json:
        # Opening the file brought its schema up to this version (see storage.MIGRATIONS).
        _print_json({**report.to_json(), "fork_proofs_about_others": others,
                     "schema_version": SCHEMA_VERSION, "version": __version__})
    else:
        click.echo(f"citynode {__version__}, database schema version {SCHEMA_VERSION}")
        click.echo(f"checked {report.records} record(s) in {report.feeds} feed(s): "
                   f"{len(report.problems)} problem(s)")
        for p in report.problems[:200]:
            click.echo(f"  {p}")
        if others:
            click.echo(f"note: {others} fork proof(s) held against "
                       + ("other cities' feeds" if own else "feeds") + " (`citynode forks`)")
        if own is None:
            click.echo(f"note: own feeds not checked for forks ({skipped})")
        from citynode.identity import next_key_on_disk

        if next_key_on_disk(data_dir):
            click.echo("warning: node.next.key is not sealed (init --next-key-on-disk): a "
                       "break-in that reads the data dir can rotate this identity to its "
                       "own key")
        if (data_dir / "recovery.key").exists():
            click.echo(f"warning: {data_dir / 'recovery.key'} is still on this machine: "
                       "move it offline (a break-in that finds it and its passphrase "
                       "takes the identity for good)")
        if (data_dir / "recovery.pending").exists():
            click.echo("warning: a recovery is prepared (key recover-prepare): nothing is "
                       "signed until `citynode key recover --event` applies it or "
                       "`citynode key recover-prepare --cancel` drops it")
    if report.problems:
        sys.exit(1)


@main.command()
@DIR_OPTION
@JSON_OPTION
def forks(data_dir: Path, as_json: bool) -> None:
    """List equivocation proofs: origins that signed two different records for one seq."""
    from citynode.audit import stored_key_logs
    from citynode.render import b64, iso_time

    _require_dir(data_dir)
    st = _open_storage(data_dir)
    try:
        rows = st.fork_proofs()
        names = stored_key_logs(st)
    finally:
        st.close()
    out: list[dict[str, Any]] = [
        {"origin": names.name(r.origin), "feed": r.feed, "seq": r.seq, "kind": r.kind,
         "found_at": r.found_at, "reported_by": r.reported_by, "proof": b64(r.proof)}
        for r in rows]
    if as_json:
        _print_json({"forks": out})
        return
    if not out:
        click.echo("no forks known")
        return
    _table("fork proofs", ["origin", "feed", "seq", "found", "reported by"],
           [[o["origin"], o["feed"], o["seq"], iso_time(o["found_at"]) if o["found_at"] else "",
             o["reported_by"]] for o in out])



@main.command()
@click.option("--duration", default=30.0, show_default=True, type=click.FloatRange(5, 3600),
              help="Seconds of publishing before the demo winds down.")
@click.option("--dir", "base", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Where to create the four data dirs (default: a new temporary dir).")
def demo(duration: float, base: Path | None) -> None:
    """Run four partner cities on this machine and watch records replicate.

    Jakarta, Seoul, Surabaya and Singapore run as separate processes over HTTPS on
    127.0.0.1, partnered Surabaya - Jakarta - Singapore - Seoul, each publishing air
    quality, traffic and weather records. Stops by itself after --duration seconds.
    """
    from citynode.demo import run_demo

    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
        if any(base.iterdir()):
            raise click.ClickException(f"{base} is not empty")
    if not run_demo(duration, base):
        raise click.ClickException("the nodes did not converge: see the node.log files")


@main.command()
@click.argument("url")
@click.option("--id", "nid", default=None,
              help="The node's id: its card is checked and its TLS certificate pinned.")
@click.option("--origin", default=None, help="Only records of this origin node id.")
@click.option("--feed", default=None, help="Only this feed.")
@click.option("--type", "type_name", default=None,
              help="Only this payload type (a restricted feed's records are type "
                   "'sealed': select them by --feed).")
@click.option("--after", default=None, type=click.IntRange(0),
              help="Resume after this cursor (0: from the beginning). Default: from now.")
@click.option("--count", default=None, type=click.IntRange(1),
              help="Stop after this many records.")
@click.option("-d", "--dir", "data_dir", envvar="CITYNODE_DIR", default=None,
              type=click.Path(file_okay=False, path_type=Path),
              help="Sign requests with this node's key (to read non-public feeds).")
def subscribe(url: str, nid: str | None, origin: str | None, feed: str | None,
              type_name: str | None, after: int | None, count: int | None,
              data_dir: Path | None) -> None:
    """Follow a node's records live; verify each one; print JSON Lines.

    Reconnects by itself and resumes where it stopped, so nothing is missed or
    printed twice. Each line carries a "cursor" to resume from with --after, and
    "terms": the licence, terms and attribution of the record's feed in force when it
    was signed (from its origin's cards, verified here; null: unknown). A record
    its origin erases after it was printed is printed again as its tombstone
    ("tombstone": true, no "data", the same "id"): drop what you kept of it.
    """
    from citynode.client import Client, record_to_json

    key = None
    if data_dir is not None:
        from citynode.identity import load_identity

        key = load_identity(data_dir).key

    async def go() -> None:
        n = 0
        async with Client(url, node_id=nid, key=key) as c:
            async for cursor, rec in c.subscribe(origin=origin, feed=feed, type=type_name,
                                                 last_event_id=after):
                line = record_to_json(rec, cursor, key)
                try:
                    terms = await c.terms(rec)
                except CitynodeError:  # the node serves no card history of it
                    terms = None
                line["terms"] = terms.terms() if terms is not None else None
                click.echo(json.dumps(line, ensure_ascii=False))
                n += 1
                if count is not None and n >= count:
                    return

    _run(go())


@main.command()
@DIR_OPTION
@click.option("--id", "rid", default=None, help="Inclusion proof of this record id.")
@click.option("--origin", default=None, help="Consistency proof: the feed's origin node id.")
@click.option("--feed", default=None, help="Consistency proof: the feed.")
@click.option("--old", type=click.IntRange(0), default=None, help="Consistency: older size.")
@click.option("--new", type=click.IntRange(0), default=None, help="Consistency: newer size.")
def proof(data_dir: Path, rid: str | None, origin: str | None, feed: str | None,
          old: int | None, new: int | None) -> None:
    """Print a Merkle proof (JSON), checked before it is printed.

    With --id: that record's inclusion in the newest signed checkpoint of its feed that
    covers it. With --origin/--feed/--old/--new: consistency between two tree sizes,
    with signed_by_origin saying for each size whether the origin signed a
    checkpoint of it that agrees (else the root is only what this node's records give).
    """
    from citynode.audit import stored_key_logs
    from citynode.core import checkpoints as cps
    from citynode.core.keys import Verifier, parse_node_id
    from citynode.core.records import decode_record, parse_body

    _require_dir(data_dir)
    st = _open_storage(data_dir)
    try:
        def tree(o: bytes, f: str, n: int) -> cps.StoredTree:
            """The feed's tree of size ``n``, read from disk (O(log n) reads a proof)."""
            head = st.head(o, f)
            held = head[0] if head is not None else 0
            if held < n:
                raise click.ClickException(f"this node holds only {held} records of that feed")
            return st.tree(o, f, n)

        if rid is not None:
            try:
                rid_bytes = bytes.fromhex(rid)
            except ValueError:
                rid_bytes = b""
            if len(rid_bytes) != 32:
                raise click.BadParameter("a record id is 64 hex digits", param_hint="--id")
            env = st.get_envelope(rid_bytes)
            if env is None:
                raise click.ClickException("no such record here")
            fl = parse_body(decode_record(env)[0])
            held = [(s, e) for s, _r, e in st.checkpoints(fl["origin"], fl["feed"])
                    if s >= fl["seq"]]
            if not held:
                raise click.ClickException(
                    "no checkpoint covers this record yet: its origin signs one every "
                    "[checkpoints] interval_seconds (60 s by default); try again then")
            size, cp_env = held[-1]
            cp = cps.open_checkpoint(cp_env, verifier=Verifier(),
                                     key_states=stored_key_logs(st).state)
            mlog = tree(fl["origin"], fl["feed"], size)
            path = mlog.inclusion_proof(fl["seq"] - 1, size)
            cps.verify_inclusion(bytes.fromhex(rid), fl["seq"] - 1, size, path, cp.root)
            _print_json({"kind": "inclusion", "id": rid, "index": fl["seq"] - 1,
                         "size": size, "root": cp.root.hex(),
                         "path": [p.hex() for p in path], "verified": True})
            return
        if origin is None or feed is None or old is None or new is None or old > new:
            raise click.UsageError("give --id, or --origin, --feed, --old and --new (old <= new)")
        o = parse_node_id(origin)
        mlog = tree(o, feed, new)
        path = mlog.consistency_proof(old, new)
        cps.verify_consistency(old, new, mlog.root(old), mlog.root(new), path)
        # The roots are computed from the records held here: say which sizes the origin
        # itself signed a checkpoint of (and that it agrees), so the proof is worth that.
        signed = {s: e for s, _r, e in st.checkpoints(o, feed) if s in (old, new)}
        anchored = {}
        for label, n in (("old", old), ("new", new)):
            if n in signed:
                cp = cps.open_checkpoint(signed[n], verifier=Verifier(),
                                         key_states=stored_key_logs(st).state)
                if (cp.origin, cp.feed, cp.root) != (o, feed, mlog.root(n)):
                    raise click.ClickException(
                        f"the origin's signed checkpoint of size {n} does not match the "
                        "records held here: run `citynode check` and look for a split view")
            anchored[label] = n in signed
        _print_json({"kind": "consistency", "old_size": old, "new_size": new,
                     "old_root": mlog.root(old).hex(), "new_root": mlog.root(new).hex(),
                     "path": [p.hex() for p in path], "verified": True,
                     "signed_by_origin": anchored})
    finally:
        st.close()


@main.group()
def policy() -> None:
    """What of a payload may leave the city ([feeds.NAME.egress] in node.toml)."""


@policy.command("check")
@DIR_OPTION
@click.option("--feed", required=True, help="The feed whose egress policy applies.")
@click.option("--type", "type_name", required=True, help="The payload type.")
@click.option("--subject", default=None,
              help="The records' subject, as given to publish (the policy applies to it).")
@click.argument("source", type=click.File("r", encoding="utf-8"))
def policy_check(data_dir: Path, feed: str, type_name: str, subject: str | None,
                 source: Any) -> None:
    """Show what each payload of SOURCE (and its SUBJECT) would become if published on
    FEED (JSON): the payload as it would leave, what the policy changed, or why it
    would be refused. Nothing is signed or stored. Exits with status 1 if any payload
    would be refused.
    """
    from citynode.config import load_config
    from citynode.core import egress
    from citynode.core.types import validate_payload
    from citynode.errors import PayloadError

    _require_dir(data_dir)
    fc = load_config(data_dir / "node.toml").feeds.get(feed)
    rules = fc.egress if fc is not None else egress.OPEN
    results: list[dict[str, Any]] = []
    for n, item in enumerate(_read_items(source), 1):
        try:
            out = egress.apply(rules, type_name, item, subject)
            validate_payload(type_name, out.data)  # what publishing would check next
        except PayloadError as exc:
            results.append({"item": n, "refused": str(exc), "reason": exc.reason})
        else:
            results.append({"item": n, "data": out.data, "subject": out.subject,
                            "changes": list(out.changes)})
    _print_json({"feed": feed, "policy": rules.settings(),
                 "policy_digest": rules.digest().hex(), "payloads": results})
    if any("refused" in r for r in results):
        sys.exit(1)


@main.group()
def storage() -> None:
    """Where the records live: SQLite in the data dir (the default) or PostgreSQL
    ([storage] url in node.toml; README "When one box is not enough")."""


@storage.command("migrate")
@DIR_OPTION
@click.option("--to", "url", required=True,
              help="The PostgreSQL database: postgresql://USER@HOST:PORT/DBNAME (an "
                   "empty one, or one an interrupted migrate left).")
def storage_migrate(data_dir: Path, url: str) -> None:
    """Copy this node's SQLite database (DIR/citynode.db) into PostgreSQL, keeping every
    record, cursor and id. Stop the node first. Interrupted, it goes on where it
    stopped when run again; the database is refused by nodes until the copy is
    complete. Then set [storage] url in node.toml, and run `citynode check`."""
    from citynode.runner import is_running
    from citynode.storage import DB_FILE, Storage
    from citynode.storage_pg import copy_from_sqlite, is_pg_url, redact

    _require_dir(data_dir)
    if not is_pg_url(url):
        raise click.BadParameter('must start with "postgresql://"', param_hint="--to")
    if is_running(data_dir):
        raise click.ClickException(f"{data_dir} is in use by a running node: stop it "
                                   "first (the copy must see a database at rest)")
    if not (data_dir / DB_FILE).is_file():
        raise click.ClickException(f"no SQLite database in {data_dir}: nothing to copy")
    src = Storage.open(data_dir / DB_FILE)
    try:
        def progress(done: int, total: int) -> None:
            if sys.stderr.isatty():
                click.echo(f"\r{done}/{total} records", nl=False, err=True)

        n = copy_from_sqlite(src, url, progress)
        total = src.count()
    finally:
        src.close()
    click.echo(f"copied {n} record(s) ({total} held) into {redact(url)}.\n"
               f'Now set in {data_dir / "node.toml"}:\n  [storage]\n  url = "{redact(url)}"\n'
               f"then run `citynode check -d {data_dir}`.")


@storage.command("rebuild-time-bounds")
@DIR_OPTION
def storage_rebuild_time_bounds(data_dir: Path) -> None:
    """Set every record's running maxima of time again from the records held (what
    `citynode check` reports as "a wrong running maximum of time"). Stop every process
    of the node first. On a large database it takes as long as the upgrade to schema
    12 did (PostgreSQL: about 76 s per million records on a small machine)."""
    from citynode.runner import is_running

    _require_dir(data_dir)
    if is_running(data_dir):
        raise click.ClickException(f"{data_dir} is in use by a running node: stop it "
                                   "first (and every other process on its database)")
    st = _open_storage(data_dir)
    try:
        n = st.rebuild_time_bounds().result()
        left = st.quick_check()
    finally:
        st.close()
    click.echo(f"set the running maxima of time of {n} record(s) again")
    if left:
        raise click.ClickException("the database has other problems: " + "; ".join(left))


@main.group()
def service() -> None:
    """Run the node as a system service."""


@service.command("systemd")
@DIR_OPTION
@click.option("--user", default="citynode", show_default=True,
              help="The dedicated system user the node runs as.")
@click.option("--exec", "executable", type=click.Path(path_type=Path), default=None,
              help="Path of the citynode command (default: this installation's).")
def service_systemd(data_dir: Path, user: str, executable: Path | None) -> None:
    """Print a hardened systemd unit for this node (install steps in its comments).

    The node runs as USER, may write only its data dir (ProtectSystem=strict),
    gains no privileges, opens only IP and Unix sockets, restarts on failure and
    stops gracefully on SIGTERM; its JSON logs go to the journal. Install citynode
    under /opt or /usr/local and keep the data dir under /var/lib: homes are then
    hidden from it (a venv, Python or data dir in a home makes them read-only
    instead; one under /tmp is refused).
    """
    from citynode.service import systemd_unit

    _require_dir(data_dir)
    click.echo(systemd_unit(data_dir, user=user, executable=executable).text, nl=False)


@main.command("sync")
@DIR_OPTION
def sync_cmd(data_dir: Path) -> None:
    """Catch up with every partner now (a progress bar on a terminal).

    Run it with the node stopped, e.g. after a long time offline or a restore from a
    backup, to fetch everything missing before `citynode run`. A running node catches
    up by itself; with one running, this asks it to sync with its partners now.
    """
    def answer(out: dict[str, Any]) -> None:
        if "fetched" in out:
            click.echo(f"fetched {out['fetched']} record(s) from partners")
        else:
            click.echo(f"asked the running node to sync with {out['partners']} partner(s) now")

    if not sys.stderr.isatty():
        answer(_operate(data_dir, lambda node: node.sync()))
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(TextColumn("catching up"), BarColumn(), MofNCompleteColumn(),
                  transient=True) as bar:
        task = bar.add_task("sync", total=None)

        def report(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)

        out = _operate(data_dir, lambda node: node.sync(report))
    answer(out)


@main.command()
@DIR_OPTION
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--with-secrets", is_flag=True,
              help="Also the node key, TLS key and operator token, sealed with a "
                   "passphrase (asked twice, or CITYNODE_BACKUP_PASSPHRASE).")
def backup(data_dir: Path, file: Path, with_secrets: bool) -> None:
    """Back up the node into FILE (one file, with a manifest and checksums), while it
    runs: the database (a consistent snapshot), node.toml and the TLS certificate.

    Without --with-secrets, keep the data dir's node.key, operator.token and
    tls/key.pem safe elsewhere: a restore of FILE needs them in place.
    """
    import os

    from citynode.backup import PASSPHRASE_ENV, make_backup

    pw = None
    if with_secrets:
        pw = os.environ.get(PASSPHRASE_ENV) or click.prompt(
            "Backup passphrase", hide_input=True, confirmation_prompt=True, err=True)
    db = data_dir / "citynode.db"
    big = db.exists() and db.stat().st_size >= _BAR_BYTES
    with _Bars(show=big and sys.stderr.isatty()) as bars:
        out = make_backup(data_dir, file, passphrase=pw, progress=bars.update)
    m = out.manifest
    click.echo(f"backed up {m.node_name} ({m.node_id}) to {file}: {m.records} records, "
               f"{out.size / 1e6:.1f} MB in {out.seconds:.1f} s, "
               + ("secrets sealed in it" if m.secrets else
                  "no secrets (keep node.key, operator.token and tls/key.pem safe)"))


@main.command()
@DIR_OPTION
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--replace", is_flag=True,
              help="DIR holds files: move them aside to DIR.replaced-<time> first "
                   "(nothing is deleted).")
def restore(data_dir: Path, file: Path, replace: bool) -> None:
    """Restore the backup FILE into DIR (the node must be stopped), after checking all
    of it. The restored node then signs nothing on its own feeds until a partner
    confirms its heads (or it is started with `citynode run --accept-fork-risk`).

    A backup made without --with-secrets needs DIR to hold the node's key already
    (the database was lost, the key was not): pass --replace.
    """
    import os

    from citynode.backup import PASSPHRASE_ENV, restore_backup
    from citynode.errors import BackupError

    def passphrase() -> str:
        pw = os.environ.get(PASSPHRASE_ENV)
        if pw:
            return pw
        if not sys.stdin.isatty():
            raise BackupError(f"{file} holds sealed secrets: set {PASSPHRASE_ENV}",
                              "no_passphrase")
        return str(click.prompt("Backup passphrase", hide_input=True, err=True))

    big = file.stat().st_size >= _BAR_BYTES
    with _Bars(show=big and sys.stderr.isatty()) as bars:
        out = restore_backup(file, data_dir, replace=replace, passphrase=passphrase,
                             progress=bars.update)
    m = out.manifest
    click.echo(f"restored {m.node_name} ({m.node_id}) into {data_dir}: {m.records} "
               f"records, backup made at {m.created}")
    if out.moved_aside is not None:
        click.echo(f"the old files are in {out.moved_aside}")
    if out.secrets_from_dir:
        click.echo("kept the node key, operator token and TLS key of the data dir")
    click.echo(_ownership_note(data_dir, out.owner, out.chowned))
    click.echo("The node will sign nothing on its own feeds until every partner confirms its "
               "heads (after `citynode run`, once each partner has had a good exchange with it). "
               "If no partner ever held its records, start it with "
               "`citynode run --accept-fork-risk`.")


def _ownership_note(data_dir: Path, owner: tuple[int, int],
                    chowned: tuple[int, int] | None) -> str:
    """Who owns the restored files, and the exact ``chown -R`` line when the node's
    service user (``citynode service systemd``) may not be able to run them."""
    import shlex

    who = f"{_user_name(owner[0])}:{_group_name(owner[1])}"
    if chowned is not None:
        return f"the restored files are owned by {who}, as {data_dir} was"
    if owner[0] == 0:
        return (f"the restored files are owned by root: if the node runs as a service "
                f"user, give them to it before starting it: "
                f"chown -R citynode:citynode {shlex.quote(str(data_dir))}")
    return f"the restored files are owned by {who}"


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


_BAR_BYTES = 64 * 1024 * 1024  # a progress bar for databases this large or larger


class _Bars:
    """One click progress bar per phase of a backup or restore, on stderr."""

    def __init__(self, show: bool) -> None:
        self.show = show
        self.phase = ""
        self.bar: Any = None

    def __enter__(self) -> _Bars:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)

    def update(self, phase: str, done: int, total: int) -> None:
        if not self.show:
            return
        if phase != self.phase:
            self.__exit__()
            self.phase = phase
            self.bar = click.progressbar(length=max(1, total), label=phase, file=sys.stderr)
            self.bar.__enter__()
        self.bar.update(done - self.bar.pos)


def _register_audit_commands() -> None:
    from citynode.cli_audit import audit_cmd, export_cmd

    main.add_command(export_cmd, "export")
    main.add_command(audit_cmd, "audit")
    from citynode.cli_bridges import import_group, sinks_group  # bridges in, sinks out

    main.add_command(import_group, "import")
    main.add_command(sinks_group, "sinks")
    from citynode.cli_keys import key_group  # key rotate, key recover-*

    main.add_command(key_group, "key")


_register_audit_commands()
