"""``citynode key ...``: rotate the signing key, and recover the identity after a
compromise with the recovery key signing away from the node (citynode/recovery.py).

Thin over the operator interface (citynode/operator.py), as every command that changes
a node. Where secrets are typed: the next-key passphrase on the node (rotate, prepare),
the recovery passphrase only where the recovery file is (``recover-sign``, or the
one-step ``recover`` run there). A passphrase comes from its environment variable, else
from a terminal; with neither, one line says so (never a prompt echoing input).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from citynode.errors import CitynodeError

if TYPE_CHECKING:
    from citynode.operator import Operator

__all__ = ["key_group", "recovery_notice"]

NEXT_KEY_ENV = "CITYNODE_NEXT_KEY_PASSPHRASE"
RECOVERY_ENV = "CITYNODE_RECOVERY_PASSPHRASE"

_DIR = click.option("-d", "--dir", "data_dir", envvar="CITYNODE_DIR", required=True,
                    type=click.Path(file_okay=False, path_type=Path),
                    help="The node's data directory (or set CITYNODE_DIR).")


def ask_secret(prompt: str, what: str, env: str | None, *, confirm: bool = False) -> str:
    """A passphrase: from ``env`` when set, else typed on a terminal. Raises
    click.ClickException (one line) when there is no terminal to ask on."""
    if env is not None and os.environ.get(env):
        return os.environ[env]
    if not sys.stdin.isatty():
        where = f" or give it in {env}" if env is not None else ""
        raise click.ClickException(f"no terminal to ask for the {what}: run this on a "
                                   f"terminal{where}")
    return str(click.prompt(prompt, hide_input=True, confirmation_prompt=confirm))


def recovery_notice(path: Path | None, phrase: str | None, passphrase: str | None) -> None:
    """Tell the operator, loudly, that the recovery material belongs offline."""
    if path is None:
        return
    click.echo("")
    click.echo("!! RECOVERY MATERIAL: MOVE IT OFFLINE NOW !!")
    click.echo(f"  {path} recovers this node's identity if its key is lost or stolen")
    click.echo("  (citynode key recover-sign). The running node does not need it: move it")
    click.echo("  to offline storage and delete it here. Anyone holding it and its")
    click.echo("  passphrase can take over this identity.")
    if passphrase:
        click.echo(f"  Its passphrase (write it down, it is not stored): {passphrase}")
    if phrase:
        click.echo("  Or keep this recovery phrase on paper (it is the recovery key itself):")
        click.echo(f"  {phrase}")
    else:
        click.echo("  (The recovery phrase is printed to a terminal only, or with "
                   "--print-recovery.)")
    click.echo("  `citynode check` reminds you while the file is still in the data dir.")
    click.echo("")


def _operate(data_dir: Path, op: Any) -> Any:
    from citynode.cli import _operate as operate

    return operate(data_dir, op)


def _require_dir(data_dir: Path) -> None:
    from citynode.operator import require_data_dir

    require_data_dir(data_dir)


def _next_key_passphrase(data_dir: Path, *, new: bool) -> str | None:
    """The next-key passphrase, or None on a node whose next key is on disk (``init
    --next-key-on-disk``: sealed like node.key). ``new``: it seals a new next key (a
    recovery), so a terminal asks twice."""
    from citynode.identity import next_key_on_disk

    if next_key_on_disk(data_dir):
        return None
    return ask_secret("Next-key passphrase" + (" (for the new next key)" if new else ""),
                      "next-key passphrase", NEXT_KEY_ENV, confirm=new)


@click.group("key")
def key_group() -> None:
    """Rotate this node's signing key, or recover its identity after a compromise."""


@key_group.command("rotate")
@_DIR
@click.option("--next-key", "next_key", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="The sealed next key file, if moved off DIR "
                                 "(default DIR/node.next.key).")
def key_rotate(data_dir: Path, next_key: Path | None) -> None:
    """Switch to the next signing key (committed to in advance), with no downtime.

    Partners follow by themselves: the node id does not change. The next key is sealed
    with the next-key passphrase (chosen at init; never stored on the node), read from
    CITYNODE_NEXT_KEY_PASSPHRASE or asked for on a terminal, so that a break-in that
    takes node.key cannot rotate; the fresh next key is sealed with the same
    passphrase into DIR/node.next.key. A node made with `init --next-key-on-disk`
    rotates without it.
    """
    from citynode.core.keys import unseal_secret_key
    from citynode.errors import KeyFileError
    from citynode.identity import PASSPHRASE_ENV, next_key_on_disk

    _require_dir(data_dir)
    if next_key is None and next_key_on_disk(data_dir):
        out = _operate(data_dir, lambda node: node.rotate_key())
    else:
        path = next_key or data_dir / "node.next.key"
        try:
            sealed = path.read_bytes()
        except OSError as exc:
            raise click.ClickException(f"cannot read {path}: {exc.strerror}") from None
        npw = os.environ.get(NEXT_KEY_ENV) or None
        if npw is None and b" argon2id " in sealed[:40] and os.environ.get(PASSPHRASE_ENV):
            npw = os.environ[PASSPHRASE_ENV]  # --next-key-on-disk with a node passphrase
        if npw is None:
            npw = ask_secret("Next-key passphrase", "next-key passphrase", NEXT_KEY_ENV)
        try:
            seed = unseal_secret_key(sealed, npw)
        except KeyFileError as exc:
            raise click.ClickException(
                f"{path}: {exc}: give the next-key passphrase (chosen at init or at the "
                f"last recovery; {NEXT_KEY_ENV}), not the recovery passphrase") from None
        out = _operate(data_dir, lambda node: node.rotate_key(seed, npw))
    if out.get("adopted"):
        click.echo(f"took the newer key log of {out['node_id']} (key event {out['seq']}) "
                   f"from a partner: this data dir was restored from an older backup; it "
                   f"now signs with key {out['key']}. Change keys next with `citynode key "
                   "recover` (the next key that log commits to is not in this backup)")
        return
    click.echo(f"rotated: {out['node_id']} now signs with key {out['key']} "
               f"(key event {out['seq']})")


def _last_good(values: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        feed, sep, seq = v.partition("=")
        if not sep or not seq.isascii() or not seq.isdigit() or int(seq) < 1 or feed in out:
            raise click.BadParameter(f"{v!r}: give FEED=SEQ once per feed, SEQ >= 1",
                                     param_hint="--last-good")
        out[feed] = int(seq)
    return out


_LAST_GOOD = click.option(
    "--last-good", "last_good", multiple=True, metavar="FEED=SEQ",
    help="Per feed, the last record you made yourself (repeatable). Records the old key "
         "signed beyond it become invalid everywhere, whatever time they claim.")
_DROP_FEED = click.option(
    "--drop-feed", "drop_feeds", multiple=True, metavar="FEED",
    help="A feed on which nothing the old key signed is kept (repeatable). Every own "
         "feed the old key signed on must be named, with --last-good or --drop-feed.")
_NEXT_RECOVERY = click.option(
    "--next-recovery", "next_recovery", default=None, metavar="PUBFILE|HEX",
    help="The public key of the next recovery key, made with `citynode key recovery-new` "
         "(its .pub file, or the hex). Without it a new recovery file is written.")


def _public_key_arg(text: str) -> bytes:
    """A public key given as 64 hex digits, or as a file holding them (a .pub file of
    `key recovery-new`). Raises click.BadParameter."""
    raw = text.strip()
    if len(raw) != 64 or any(c not in "0123456789abcdefABCDEF" for c in raw):
        try:
            raw = Path(text).read_text(encoding="ascii").split()[0]
        except (OSError, UnicodeDecodeError, IndexError) as exc:
            raise click.BadParameter(f"{text!r} is neither 64 hex digits nor a readable "
                                     "public key file", param_hint="--next-recovery") from exc
    try:
        key = bytes.fromhex(raw)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise click.BadParameter(f"{text!r}: a public key is 64 hex digits",
                                 param_hint="--next-recovery")
    return key


def _read_small(path: Path, what: str) -> bytes:
    from citynode.recovery import MAX_FILE_BYTES

    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise click.ClickException(f"cannot read {what} {path}: {exc.strerror}") from None
    return data


def _write_new(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``path``, which must not exist yet."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except FileExistsError:
        raise click.ClickException(f"{path} exists already: choose another path") from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {path}: {exc.strerror}") from None


def _write_durably(path: Path, data: bytes) -> None:
    """Write ``path`` (which must not exist yet) and make it and its directory entry
    durable (fsync) before returning."""
    _write_new(path, data, 0o600)
    try:
        with path.open("rb") as f:
            os.fsync(f.fileno())
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise click.ClickException(f"cannot make {path} durable: {exc.strerror} (nothing "
                                   "was signed out)") from None


def _emit_again(marker: Path, event: bytes, out: Path) -> None:
    """The recovery file signed this very request already: give out the same event."""
    if out.exists() and _read_small(out, "the event") == event:
        click.echo(f"already signed for this request: the event is {out} (and {marker}); "
                   "nothing new was signed")
        return
    if out.exists():
        raise click.ClickException(f"{out} exists already: choose another --out (this "
                                   f"request's event, signed already, is in {marker})")
    _write_new(out, event)
    click.echo(f"already signed for this request: wrote the same event again to {out} "
               f"(from {marker}); nothing new was signed. On the node: citynode key "
               f"recover -d DIR --event {out.name}")


def _unseal_recovery(recovery_file: Path | None, phrase: bool,
                     passphrase: str | None) -> tuple[bytes | None, bytes]:
    """``(identity the file names, or None for a phrase; recovery seed)``."""
    from citynode.core import keylog

    if recovery_file is not None:
        assert passphrase is not None
        text = _read_small(recovery_file, "the recovery file")
        ident, seed = keylog.unseal_recovery(text, passphrase)
        return ident, seed
    assert phrase
    return None, keylog.parse_recovery_phrase(click.prompt("Recovery phrase"))


def _data_dir_identity(data_dir: Path) -> bytes | None:
    """The identity of the node of ``data_dir`` (None: a cn1 node, no key log)."""
    from citynode.identity import keylog_identity

    try:
        return keylog_identity((data_dir / "keylog").read_bytes())
    except OSError:
        return None


@key_group.command("recover-prepare")
@_DIR
@_LAST_GOOD
@_DROP_FEED
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the request (public) for `citynode key recover-sign`.")
@click.option("--cancel", is_flag=True,
              help="Forget the prepared recovery instead: the node signs again.")
def key_recover_prepare(data_dir: Path, last_good: tuple[str, ...],
                        drop_feeds: tuple[str, ...], out: Path | None, cancel: bool) -> None:
    """Step 1 of a recovery after the signing key was stolen or lost, on the node.

    The node makes its new signing key and next key (the next one sealed with a new
    next-key passphrase: CITYNODE_NEXT_KEY_PASSPHRASE, or asked twice on a terminal)
    and writes a request to OUT: the node id, its key log, the last good record of
    each feed you name, the new public key. Every own feed the old key signed on is
    named: --last-good FEED=SEQ keeps it up to SEQ, --drop-feed FEED keeps nothing the
    old key signed there (a recovery cannot be undone). The node signs nothing until
    the recovery is applied (`key recover --event`) or cancelled (--cancel). Take OUT to
    the machine holding the recovery file: `citynode key recover-sign`. No recovery
    secret is needed here.
    """
    _require_dir(data_dir)
    if cancel:
        if last_good or drop_feeds or out is not None:
            raise click.UsageError("--cancel takes no other option than -d")
        gone = _operate(data_dir, lambda node: node.cancel_recovery())
        if not gone:
            click.echo("no recovery was prepared on this node")
            return
        click.echo("cancelled: the node signs again with the key in force")
        click.echo("If recover-sign already signed an event for that request, it cannot be "
                   "applied any more: destroy every copy of it. Never sign another event "
                   "with that recovery key unless you are certain the first is destroyed: "
                   "two recovery events of one recovery key kill the identity for good.")
        return
    if out is None:
        raise click.UsageError("give --out REQUEST (or --cancel)")
    heads = _last_good(last_good)
    npw = _next_key_passphrase(data_dir, new=True)
    request = _operate(data_dir, lambda node: node.prepare_recovery(heads, drop_feeds, npw))
    try:
        out.write_bytes(request)
    except OSError as exc:
        _operate(data_dir, lambda node: node.cancel_recovery())
        raise click.ClickException(f"cannot write {out}: {exc.strerror} (the prepared "
                                   "recovery was cancelled)") from None
    click.echo(f"prepared: wrote the recovery request {out}; this node signs nothing until "
               "the recovery is applied or cancelled")
    click.echo("On the machine holding the recovery file (offline):")
    click.echo(f"  citynode key recover-sign --request {out.name} --recovery FILE "
               "--out EVENT")
    click.echo(f"Then here: citynode key recover -d {data_dir} --event EVENT")


@key_group.command("recover-sign")
@click.option("--request", "request_file", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="The request `citynode key recover-prepare` wrote on the node.")
@click.option("--recovery", "recovery_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="The recovery file (`citynode init` wrote it; the last "
                                 "recovery's new one since).")
@click.option("--phrase", is_flag=True,
              help="Type the recovery phrase (crq1-...) instead of giving a file.")
@_NEXT_RECOVERY
@click.option("--new-recovery", "new_recovery", default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the new recovery file when no --next-recovery is given "
                   "(default: the --recovery file's path + .next).")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the signed recovery event (for `key recover --event`).")
@click.option("--yes", is_flag=True, help="Sign without asking (the summary is printed).")
def key_recover_sign(request_file: Path, recovery_file: Path | None, phrase: bool,
                     next_recovery: str | None, new_recovery: Path | None, out: Path,
                     yes: bool) -> None:
    """Step 2 of a recovery, on the machine holding the recovery file (not the node):
    no data dir, no network.

    Unseals the recovery file (CITYNODE_RECOVERY_PASSPHRASE, or asked on a terminal),
    checks the request against the key log it carries and the file's identity, shows
    what it is about to sign (heads kept, feeds dropped, the new key), and writes the
    signed recovery event to OUT. The recovery key changes on use: the next one is the
    one of --next-recovery (made with `key recovery-new`), or a new recovery file
    written here (sealed with the same passphrase) that replaces the used one.

    A recovery key signs ONE event: two recovery events of one key kill the identity
    for good. So the event is first kept beside the recovery file (FILE.signed, on disk
    before OUT is written), and this file then signs no other event; given the same
    request again it writes that same event. A phrase keeps no such record: sign once
    with it.
    """
    from citynode.core.keys import SigningKey
    from citynode.identity import write_new_recovery_file
    from citynode.recovery import (
        RecoveryRequest,
        describe,
        encode_event,
        parse_event,
        sign_request,
        signed_for,
    )

    if (recovery_file is None) == (not phrase):
        raise click.UsageError("give --recovery FILE or --phrase")
    if next_recovery is not None and new_recovery is not None:
        raise click.UsageError("give --next-recovery or --new-recovery, not both")
    if next_recovery is None and new_recovery is None and recovery_file is None:
        raise click.UsageError("with --phrase, give --new-recovery PATH (or --next-recovery)")
    req = RecoveryRequest.parse(_read_small(request_file, "the request"), str(request_file))
    marker = Path(str(recovery_file) + ".signed") if recovery_file is not None else None
    if marker is not None and (marker.exists() or marker.is_symlink()):
        done = _read_small(marker, "the used-marker")
        _ident_m, env = parse_event(done, str(marker))
        fits = signed_for(req, env)
        if fits:
            _emit_again(marker, done, out)
            return
        if fits is False:
            raise click.ClickException(
                f"{recovery_file} signed a recovery event already ({marker} holds it), for "
                "another request: apply that event on the node (`citynode key recover "
                f"--event {marker.name}`); a second event of one recovery key kills the "
                f"identity for good. Only if every copy of it is certainly destroyed "
                f"(and it was never applied), delete {marker} to sign another")
    elif phrase:
        click.echo("A recovery phrase keeps no record of its use: sign ONE recovery event "
                   "with it. Two events of one recovery key (from two requests) kill the "
                   "identity for good.")
    rpw = (ask_secret("Recovery passphrase", "recovery passphrase", RECOVERY_ENV)
           if recovery_file is not None else None)
    ident, seed = _unseal_recovery(recovery_file, phrase, rpw)
    q_next: SigningKey | None = None
    if next_recovery is not None:
        q_pub, shown = _public_key_arg(next_recovery), f"the key of {next_recovery}"
    else:
        q_next = SigningKey.generate()
        new_recovery = new_recovery or Path(str(recovery_file) + ".next")
        if new_recovery.exists():
            raise click.ClickException(f"{new_recovery} exists already: choose another "
                                       "--new-recovery")
        q_pub, shown = q_next.public_key, f"a new recovery file, {new_recovery}"
    if out.exists():
        raise click.ClickException(f"{out} exists already: choose another --out")
    ev, state = sign_request(req, ident if ident is not None else req.identity, seed, q_pub,
                             int(time.time() * 1000))
    click.echo("This recovery event says:")
    for line in describe(req, state, shown):
        click.echo("  " + line)
    if not yes:
        if not sys.stdin.isatty():
            raise click.ClickException("no terminal to confirm on: read the summary above "
                                       "and pass --yes to sign it")
        if not click.confirm("Sign it?", default=False):
            raise click.ClickException("nothing signed")
    if q_next is not None:
        assert new_recovery is not None
        if rpw is None:
            rpw = ask_secret("Passphrase for the new recovery file", "recovery passphrase",
                             RECOVERY_ENV, confirm=True)
        # The next recovery key first: an event committing to a key that is nowhere
        # would leave the identity unrecoverable.
        write_new_recovery_file(new_recovery, q_next.seed, req.identity, rpw)
    event = encode_event(ev, req.identity)
    if marker is not None:
        # Durable before any event leaves this command: this key then signs no other.
        try:
            _write_durably(marker, event)
        except click.ClickException:
            if q_next is not None and new_recovery is not None:
                new_recovery.unlink(missing_ok=True)  # committed to by no event given out
            raise
    _write_new(out, event)
    click.echo(f"signed: wrote {out} (key event {ev.seq} of {req.node_id}); on the node: "
               f"citynode key recover -d DIR --event {out.name}")
    if marker is not None:
        click.echo(f"{recovery_file} is used: {marker} keeps this event, and the file "
                   "signs no other. Never sign twice with one recovery key.")
    if q_next is not None:
        from citynode.core import keylog

        click.echo(f"The next recovery key is {new_recovery} (sealed with the same "
                   "passphrase): once the node applied the event, the old recovery file "
                   "and phrase are used up; keep the new file offline in their place.")
        if sys.stdout.isatty():
            click.echo(f"Its recovery phrase, for paper: {keylog.recovery_phrase(q_next.seed)}")
    else:
        click.echo("The next recovery key is the one made with `key recovery-new`: keep it "
                   "offline. Once the node applied the event, the old recovery file and "
                   "phrase are used up.")


@key_group.command("recover")
@_DIR
@click.option("--event", "event_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="The signed recovery event `citynode key recover-sign` "
                                 "wrote.")
@click.option("--recovery", "recovery_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="One step, on this machine: the recovery file.")
@click.option("--phrase", is_flag=True,
              help="One step, on this machine: type the recovery phrase (crq1-...).")
@_LAST_GOOD
@_DROP_FEED
@_NEXT_RECOVERY
def key_recover(data_dir: Path, event_file: Path | None, recovery_file: Path | None,
                phrase: bool, last_good: tuple[str, ...], drop_feeds: tuple[str, ...],
                next_recovery: str | None) -> None:
    """Take the identity back after its signing key was stolen or lost.

    With --event (step 3): apply the recovery event `citynode key recover-sign` signed
    for the request of `citynode key recover-prepare`; the recovery key never came near
    this node. Records the old key signed beyond the heads named become invalid
    everywhere, whatever time they claim, and partners get the new key log at once.

    Without it, in one step (prepare, sign here, apply), with the recovery file or
    phrase on this machine: only for a node you trust, e.g. after its key was lost;
    after a break-in use the three steps. The recovery key signs in this command's
    process and only the signed event goes to the node. The recovery passphrase comes
    from CITYNODE_RECOVERY_PASSPHRASE or a terminal, the new next-key passphrase from
    CITYNODE_NEXT_KEY_PASSPHRASE or a terminal; the new recovery file is written to
    DIR/recovery.key, sealed with the same recovery passphrase, unless --next-recovery.
    """
    _require_dir(data_dir)
    if event_file is not None:
        if recovery_file is not None or phrase or last_good or drop_feeds or next_recovery:
            raise click.UsageError("--event takes no other option than -d: the heads and "
                                   "keys are in the signed event")
        _apply_event(data_dir, event_file)
        return
    if (recovery_file is None) == (not phrase):
        raise click.UsageError("give --event FILE, or --recovery FILE or --phrase")
    _recover_here(data_dir, recovery_file, phrase, _last_good(last_good), drop_feeds,
                  next_recovery)


def _apply_event(data_dir: Path, event_file: Path) -> None:
    from citynode.core import keylog
    from citynode.recovery import parse_event

    ident, envelope = parse_event(_read_small(event_file, "the recovery event"),
                                  str(event_file))
    mine = _data_dir_identity(data_dir)
    if mine is not None and ident != mine:
        raise click.ClickException(f"{event_file} recovers {keylog.identity_id(ident)}, not "
                                   f"this node ({keylog.identity_id(mine)})")
    out = _operate(data_dir, lambda node: node.apply_recovery(envelope))
    if out.get("already"):
        click.echo(f"already applied: {out['node_id']} signs with key {out['key']} (key "
                   f"event {out['seq']})")
        return
    click.echo(f"recovered: {out['node_id']} now signs with key {out['key']} "
               f"(key event {out['seq']})")
    click.echo("The previous recovery file and phrase are used up: destroy them.")


def _recover_here(data_dir: Path, recovery_file: Path | None, phrase: bool,
                  heads: dict[str, int], drop_feeds: tuple[str, ...],
                  next_recovery: str | None) -> None:
    """The one-step recovery of :func:`key_recover`: the same three steps, signed in
    this process."""
    from citynode.core import keylog
    from citynode.core.keys import SigningKey
    from citynode.identity import write_new_recovery_file
    from citynode.recovery import RecoveryRequest, describe, sign_request

    marker = Path(str(recovery_file) + ".signed") if recovery_file is not None else None
    if marker is not None and (marker.exists() or marker.is_symlink()):
        # recover-sign signed an event with this file already: a second one (this
        # request's) would kill the identity if the first is ever applied.
        raise click.ClickException(
            f"{recovery_file} signed a recovery event already ({marker} holds it): apply "
            f"that one (`citynode key recover -d {data_dir} --event {marker}`); a second "
            "event of one recovery key kills the identity for good")
    # The file's passphrase, which also seals the new recovery file made here (none is
    # with --next-recovery: then a phrase needs no passphrase at all).
    rpw = (ask_secret("Recovery passphrase", "recovery passphrase", RECOVERY_ENV)
           if recovery_file is not None or next_recovery is None else None)
    ident, seed = _unseal_recovery(recovery_file, phrase, rpw)
    mine = _data_dir_identity(data_dir)
    if ident is not None and mine is not None and ident != mine:
        raise click.ClickException(
            f"{recovery_file} recovers {keylog.identity_id(ident)}, not this node "
            f"({keylog.identity_id(mine)}): give the recovery file of this node")
    q_pub = _public_key_arg(next_recovery) if next_recovery is not None else None
    npw = _next_key_passphrase(data_dir, new=True)
    if npw is not None and npw == rpw:
        raise click.ClickException(
            "the new next-key passphrase is the recovery passphrase: choose another one "
            "(it is typed on the node at each rotation; the recovery one must not be)")
    q_next = SigningKey.generate() if q_pub is None else None
    next_pub = q_next.public_key if q_next is not None else q_pub
    assert next_pub is not None
    staged = data_dir / "recovery.key.next"
    if q_next is not None:
        assert rpw is not None
        _settle_staged(data_dir, staged, rpw)

    async def recover(node: Operator) -> dict[str, Any]:
        req = RecoveryRequest.parse(await node.prepare_recovery(heads, drop_feeds, npw))
        try:
            ev, state = sign_request(req, ident if ident is not None else req.identity, seed,
                                     next_pub, int(time.time() * 1000))
            for line in describe(req, state, f"a new recovery file, {data_dir}/recovery.key"
                                 if q_next is not None else f"the key of {next_recovery}"):
                click.echo("  " + line)
            if q_next is not None:
                # Written first, under a name of its own: an event committing to a key
                # that is nowhere would leave the identity unrecoverable, and the file
                # in use is kept until the recovery is applied. (Once the event is
                # sent it stays whatever happens: the node may have applied it.)
                assert rpw is not None
                write_new_recovery_file(staged, q_next.seed, req.identity, rpw)
        except CitynodeError:
            await node.cancel_recovery()
            raise
        try:
            out: dict[str, Any] = await node.apply_recovery(ev.envelope)
        except CitynodeError:
            with contextlib.suppress(CitynodeError):
                await node.cancel_recovery()  # refused: the node signs again
            raise
        return out

    out: dict[str, Any] = _operate(data_dir, recover)
    click.echo(f"recovered: {out['node_id']} now signs with key {out['key']} "
               f"(key event {out['seq']})")
    if q_next is None:
        click.echo("The next recovery key is the one made offline (its public key was "
                   "given): keep that file offline. The previous recovery file and phrase "
                   "are used up: destroy them.")
        return
    os.replace(staged, data_dir / "recovery.key")
    recovery_notice(data_dir / "recovery.key",
                    keylog.recovery_phrase(q_next.seed) if sys.stdout.isatty() else None, None)
    click.echo("The previous recovery file and phrase are used up: destroy them.")


def _settle_staged(data_dir: Path, staged: Path, passphrase: str) -> None:
    """A new recovery file a one-step recovery left under its staging name (its event
    was sent but the answer never came, or was a refusal): the recovery key in force if
    the node's key log commits to it (then say so and stop), else removed."""
    from citynode.core import keylog
    from citynode.core.keys import SigningKey, Verifier

    if not staged.exists():
        return
    try:
        _ident, seed = keylog.unseal_recovery(_read_small(staged, "the file"), passphrase)
        mine = _data_dir_identity(data_dir)
        state = keylog.verify_log(mine or b"", (data_dir / "keylog").read_bytes(),
                                  verifier=Verifier())
    except (OSError, CitynodeError) as exc:
        raise click.ClickException(f"{staged} is left from an earlier recovery and cannot "
                                   f"be checked ({exc}): if this node's key log commits to "
                                   "it, it is your recovery key; else remove it") from None
    if keylog.commit_key(SigningKey(seed).public_key) == state.recovery:
        raise click.ClickException(
            f"{staged} holds the recovery key this node's log commits to (an earlier "
            "recovery was applied): it is your recovery file now; move it offline")
    staged.unlink()


@key_group.command("recovery-new")
@click.option("--id", "node_id", required=True, help="The node's cn2 id.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the sealed recovery file (FILE.pub gets its public key).")
def key_recovery_new(node_id: str, out: Path) -> None:
    """Make the next recovery key on another machine (run it offline, not on the node):
    a sealed recovery file and its public key (OUT.pub), for `citynode key recover-sign
    --next-recovery OUT.pub`. The passphrase is read from CITYNODE_RECOVERY_PASSPHRASE,
    else asked for on a terminal."""
    from citynode.core import keylog
    from citynode.core.keys import SigningKey

    identity = keylog.parse_identity_id(node_id)
    pub = out.with_name(out.name + ".pub")
    if out.exists() or pub.exists():
        raise click.ClickException(f"{out} or {pub} exists already: choose another --out")
    pw = ask_secret("Passphrase for the new recovery file", "recovery passphrase",
                    RECOVERY_ENV, confirm=True)
    q = SigningKey.generate()
    _write_new(out, keylog.seal_recovery(q.seed, identity, pw), 0o600)
    _write_new(pub, (q.public_key.hex() + "\n").encode("ascii"))
    click.echo(f"wrote {out} (sealed; keep it offline) and {pub} (its public key: "
               f"{q.public_key.hex()})")
    click.echo(f"Then: citynode key recover-sign ... --next-recovery {pub}")
