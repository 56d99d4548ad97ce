"""``citynode key ...`` and the passphrases ``init`` sets for it, in process (click's
CliRunner) on real data dirs: rotation with the next-key passphrase, and recovery with
the recovery key signing away from the node (``recover-prepare`` on the node,
``recover-sign`` where the recovery file is, ``recover --event`` on the node), or in
one step on a trusted machine (review of issue 12: M4, S6, N2)."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from citynode.core import keylog
from citynode.core.keys import SigningKey, Verifier, unseal_secret_key
from citynode.datadir import init_data_dir
from citynode.errors import KeyFileError
from tests.conftest import FAST_KDF
from tests.test_cli import AIR_TYPE, air, cli, ok, one_line_error, publish, record_ids

RPW, NPW = "r3c0v3ry-pw-17", "n3xt-k3y-pw-42"
REC = {"CITYNODE_RECOVERY_PASSPHRASE": RPW}


def make(tmp_path: Path, name: str = "B", *, on_disk: bool = False) -> Path:
    d = tmp_path / name.lower()
    init_data_dir(d, name=name, listen="127.0.0.1:1", recovery_passphrase=RPW,
                  next_passphrase=NPW, next_key_on_disk=on_disk, **FAST_KDF)
    return d


def state_of(d: Path) -> keylog.KeyState:
    log = (d / "keylog").read_bytes()
    return keylog.verify_log(keylog.identity_of(keylog.open_event(
        keylog.decode_log(log)[0], verifier=Verifier()).body), log, verifier=Verifier())


def next_key(d: Path, passphrase: str | None) -> SigningKey:
    return SigningKey(unseal_secret_key((d / "node.next.key").read_bytes(), passphrase))


def offline(d: Path, tmp_path: Path) -> Path:
    """The recovery file moved off the node, as `init` tells the operator to."""
    where = tmp_path / "offline"
    where.mkdir(exist_ok=True)
    os.replace(d / "recovery.key", where / "recovery.key")
    return where / "recovery.key"


def publish_refused(d: Path) -> str:
    body = json.dumps(air(9.0)) + "\n"
    return one_line_error(cli("publish", "-d", str(d), "--feed", "air", "--type", AIR_TYPE,
                              "-", input=body))


# ------------------------------------------------------------------------------- init


def test_init_prints_secret_material_to_a_terminal_only(tmp_path: Path) -> None:
    """Not a terminal (a log, a CI job): no generated passphrase, no phrase. Without
    chosen passphrases init refuses and makes nothing; with both it writes the sealed
    files and says where; `check` warns while the recovery file stays in the data dir.
    The two passphrases must differ (S6): the next-key one is typed on the node."""
    d = tmp_path / "x"
    args = ("init", "-d", str(d), "--name", "X", "--listen", "127.0.0.1:18602")
    line = one_line_error(cli(*args))
    assert "not a terminal" in line and "--print-recovery" in line
    assert "CITYNODE_RECOVERY_PASSPHRASE" in line and "CITYNODE_NEXT_KEY_PASSPHRASE" in line
    line = one_line_error(cli(*args, env=REC))
    assert "next-key passphrase" in line and "CITYNODE_RECOVERY_PASSPHRASE" not in line
    line = one_line_error(cli(*args, env={**REC, "CITYNODE_NEXT_KEY_PASSPHRASE": RPW}))
    assert "other than the recovery passphrase" in line
    assert not (d / "node.key").exists()
    r = ok(*args, env={**REC, "CITYNODE_NEXT_KEY_PASSPHRASE": NPW})
    assert "crq1-" not in r.stdout and RPW not in r.stdout and NPW not in r.stdout
    assert str(d / "recovery.key") in r.stdout and "MOVE IT OFFLINE" in r.stdout
    assert "CITYNODE_NEXT_KEY_PASSPHRASE" in r.stdout
    ident, _seed = keylog.unseal_recovery((d / "recovery.key").read_bytes(), RPW)
    assert keylog.identity_id(ident) == ok("id", "-d", str(d)).stdout.strip()
    assert keylog.commit_key(next_key(d, NPW).public_key) == state_of(d).next
    with pytest.raises(KeyFileError):
        next_key(d, RPW)  # the recovery passphrase does not open the next key
    assert "recovery.key is still on this machine" in ok("check", "-d", str(d)).stdout
    (d / "recovery.key").rename(tmp_path / "offline.key")
    assert "still on this machine" not in ok("check", "-d", str(d)).stdout


def test_init_prints_a_generated_next_key_passphrase_that_opens_the_next_key(
        tmp_path: Path) -> None:
    d = tmp_path / "x"
    r = ok("init", "-d", str(d), "--name", "X", "--listen", "127.0.0.1:18603",
           "--print-recovery", env=REC)
    (line,) = [x for x in r.stdout.splitlines() if "next-key passphrase (write it down" in x]
    generated = line.rsplit(": ", 1)[1]
    assert generated != RPW
    assert keylog.commit_key(next_key(d, generated).public_key) == state_of(d).next


# ----------------------------------------------------------------------------- rotate


@pytest.mark.parametrize("on_disk", [False, True], ids=["next-key-offline", "on-disk"])
def test_key_rotate_on_a_stopped_node_keeps_the_id_and_every_record(
        tmp_path: Path, on_disk: bool) -> None:
    """By default the next key is sealed with the next-key passphrase, never stored on
    the node: rotating needs it, and the recovery passphrase does not open it (S6).
    With `init --next-key-on-disk` it rotates unattended, and `check` warns about what
    that gives a break-in."""
    node_dir = make(tmp_path, on_disk=on_disk)
    d = str(node_dir)
    env = {} if on_disk else {"CITYNODE_NEXT_KEY_PASSPHRASE": NPW}
    node_id = ok("id", "-d", d).stdout.strip()
    before = publish(node_dir, "air", AIR_TYPE, [air(float(i)) for i in range(3)])
    k1 = next_key(node_dir, None if on_disk else NPW)
    if not on_disk:
        # Whoever has the data dir but not the passphrase cannot rotate; the line says
        # which passphrase is meant, also to one who typed the recovery one.
        for guess in ("a guess", RPW):
            line = one_line_error(cli("key", "rotate", "-d", d,
                                      env={"CITYNODE_NEXT_KEY_PASSPHRASE": guess}))
            assert "wrong passphrase" in line and "next-key passphrase" in line
            assert "not the recovery passphrase" in line
        assert "not sealed" not in ok("check", "-d", d).stdout
    else:
        assert "node.next.key is not sealed" in ok("check", "-d", d).stdout
    r = ok("key", "rotate", "-d", d, env=env)
    assert f"rotated: {node_id}" in r.stdout
    assert ok("id", "-d", d).stdout.strip() == node_id  # nobody re-pins
    # K1 (the key committed to) signs now; node.next.key holds a fresh K2, sealed as
    # the one before.
    assert unseal_secret_key((node_dir / "node.key").read_bytes(), None) == k1.seed
    k2 = next_key(node_dir, None if on_disk else NPW)
    assert k2.seed != k1.seed
    state = state_of(node_dir)
    assert state.seq == 1 and state.established["air"].seq == 3
    assert keylog.commit_key(k2.public_key) == state.next
    after = publish(node_dir, "air", AIR_TYPE, [air(9.0)])
    assert record_ids(node_dir) == before + after
    ok("check", "-d", d)  # every record verifies under the key valid for it
    # A second rotation uses the next key the first one committed to.
    ok("key", "rotate", "-d", d, env=env)
    assert state_of(node_dir).seq == 2


def test_key_rotate_without_a_terminal_is_one_line_naming_the_variable(
        tmp_path: Path) -> None:
    """No terminal and no CITYNODE_NEXT_KEY_PASSPHRASE: one line saying where to give
    the passphrase, not getpass's warnings and click's "Aborted!" (N2)."""
    d = make(tmp_path)
    r = cli("key", "rotate", "-d", str(d))
    line = one_line_error(r)
    assert "no terminal" in line and "CITYNODE_NEXT_KEY_PASSPHRASE" in line
    for noise in ("Warning", "echoed", "Aborted"):
        assert noise not in r.output
    assert state_of(d).seq == 0


# ------------------------------------------------------------------ offline recovery


def test_recovery_signed_offline_never_gives_the_node_the_recovery_key(
        tmp_path: Path) -> None:
    """M4: the node prepares (new keys, a public request) and signs nothing meanwhile;
    the recovery file is used only by `recover-sign`, which needs no data dir; the node
    applies the signed event. The files that travel hold no secret. The new next key is
    sealed with the new next-key passphrase chosen at prepare, so the next rotation
    asks for that one (S6)."""
    node = make(tmp_path)
    d = str(node)
    node_id = ok("id", "-d", d).stdout.strip()
    kept = publish(node, "air", AIR_TYPE, [air(1.0), air(2.0)])
    publish(node, "air", AIR_TYPE, [air(3.0)])  # "the thief's"
    publish(node, "water", AIR_TYPE, [air(4.0)])
    rfile = offline(node, tmp_path)
    _ident, q0 = keylog.unseal_recovery(rfile.read_bytes(), RPW)
    req = tmp_path / "request.json"
    npw2 = {"CITYNODE_NEXT_KEY_PASSPHRASE": "new next-key pass"}
    r = ok("key", "recover-prepare", "-d", d, "--last-good", "air=2", "--drop-feed", "water",
           "--out", str(req), env=npw2)
    assert "recover-sign" in r.stdout and "--event" in r.stdout
    request = json.loads(req.read_text())
    assert request["node_id"] == node_id
    assert request["heads"] == {"air": {"seq": 2, "id": kept[1]}}
    assert request["drop_feeds"] == ["water"]
    assert base64.b64decode(request["keylog"]) == (node / "keylog").read_bytes()
    assert "signs nothing" in r.stdout
    assert "recovery is prepared" in publish_refused(node)
    assert "a recovery is prepared" in ok("check", "-d", d).stdout
    assert not (node / "recovery.key").exists()  # nothing of the recovery key came back

    event = tmp_path / "event.json"
    # Somewhere else: no data dir, no network. Without a terminal it signs only when
    # told to, after printing what it signs; nothing is written before.
    args = ("key", "recover-sign", "--request", str(req), "--recovery", str(rfile),
            "--out", str(event))
    line = one_line_error(cli(*args, env=REC))
    assert "--yes" in line and not event.exists()
    assert not rfile.with_name("recovery.key.next").exists()
    r = ok(*args, "--yes", env=REC)
    assert f"node            {node_id}" in r.stdout
    assert f"keep            air up to seq 2 (record {kept[1]})" in r.stdout
    assert "drop            water" in r.stdout
    assert f"new key         {request['key']}" in r.stdout
    for f in (req, event):
        text = f.read_text()
        assert q0.hex() not in text and base64.b64encode(q0).decode() not in text
    new_rfile = rfile.with_name("recovery.key.next")
    ident, q1 = keylog.unseal_recovery(new_rfile.read_bytes(), RPW)
    assert keylog.identity_id(ident) == node_id

    pending = (node / "recovery.pending").read_bytes()
    r = ok("key", "recover", "-d", d, "--event", str(event))
    assert f"recovered: {node_id} now signs with key {request['key']}" in r.stdout
    state = state_of(node)
    assert state.seq == 1 and state.keys[-2].retired_by == "recovery"
    assert state.key.hex() == request["key"]
    assert state.recovery == keylog.commit_key(SigningKey(q1).public_key)
    assert state.next.hex() == request["next"]
    assert keylog.commit_key(next_key(node, npw2["CITYNODE_NEXT_KEY_PASSPHRASE"])
                             .public_key) == state.next
    for old in (RPW, NPW):
        with pytest.raises(KeyFileError):
            next_key(node, old)
    assert record_ids(node, "--feed", "air") == kept
    assert record_ids(node, "--feed", "water") == []
    assert not (node / "recovery.pending").exists()
    # Cut short after the keys were written and before the prepared ones were dropped:
    # the node signs nothing, and giving the event again finishes it, changing nothing
    # else. Then it signs, and rotates with the next-key passphrase given at prepare.
    (node / "recovery.pending").write_bytes(pending)
    os.chmod(node / "recovery.pending", 0o600)
    assert "recovery is prepared" in publish_refused(node)
    assert "already applied" in ok("key", "recover", "-d", d, "--event", str(event)).stdout
    assert state_of(node).seq == 1 and not (node / "recovery.pending").exists()
    publish(node, "air", AIR_TYPE, [air(5.0)])
    ok("key", "rotate", "-d", d, env=npw2)
    assert state_of(node).seq == 2
    ok("check", "-d", d)
    # The used recovery file cannot sign again (a second use would kill the identity).
    ok("key", "recover-prepare", "-d", d, "--last-good", "air=3", "--out", str(req), env=npw2)
    line = one_line_error(cli("key", "recover-sign", "--request", str(req), "--recovery",
                              str(rfile), "--new-recovery", str(tmp_path / "unused.key"),
                              "--out", str(tmp_path / "again.json"), "--yes", env=REC))
    assert "used already" in line
    ok("key", "recover-prepare", "-d", d, "--cancel")
    publish(node, "air", AIR_TYPE, [air(6.0)])


def test_recover_sign_refuses_what_does_not_fit_in_one_line(tmp_path: Path) -> None:
    node, other = make(tmp_path, "B"), make(tmp_path, "C")
    b_id, c_id = (ok("id", "-d", str(x)).stdout.strip() for x in (node, other))
    publish(node, "air", AIR_TYPE, [air(1.0)])
    req, event = tmp_path / "request.json", tmp_path / "event.json"
    ok("key", "recover-prepare", "-d", str(node), "--last-good", "air=1", "--out", str(req),
       env={"CITYNODE_NEXT_KEY_PASSPHRASE": "n2"})

    def sign(*args: str, env: dict[str, str] = REC) -> str:
        return one_line_error(cli("key", "recover-sign", "--request", *args, "--out",
                                  str(event), "--yes", env=env))

    line = sign(str(req), "--recovery", str(other / "recovery.key"))
    assert b_id in line and c_id in line
    assert "passphrase" in sign(str(req), "--recovery", str(node / "recovery.key"),
                                env={"CITYNODE_RECOVERY_PASSPHRASE": "wrong"})
    # A request whose key log was altered (here: C's log under B's id).
    bad = tmp_path / "altered.json"
    altered = json.loads(req.read_text())
    altered["keylog"] = base64.b64encode((other / "keylog").read_bytes()).decode()
    bad.write_text(json.dumps(altered))
    assert "does not verify" in sign(str(bad), "--recovery", str(node / "recovery.key"))
    bad.write_text(json.dumps({**altered, "heads": {"air": {"seq": 0, "id": "00"}}}))
    assert "head of 'air'" in sign(str(bad), "--recovery", str(node / "recovery.key"))
    bad.write_text("{}")
    assert "not a citynode-recovery-request" in sign(str(bad), "--recovery",
                                                       str(node / "recovery.key"))
    assert not event.exists()
    r = cli("key", "recover-sign", "--request", str(req), "--phrase", "--out", str(event))
    assert r.exit_code == 2 and "--new-recovery" in r.output


def test_recover_event_must_fit_what_this_node_prepared(tmp_path: Path) -> None:
    """The node applies only an event that extends its log, is signed by the recovery
    key it commits to, and names the keys and heads it prepared: one line otherwise,
    and nothing changes."""
    node = make(tmp_path)
    d = str(node)
    publish(node, "air", AIR_TYPE, [air(1.0), air(2.0)])
    npw2 = {"CITYNODE_NEXT_KEY_PASSPHRASE": "n2"}
    req, event = tmp_path / "request.json", tmp_path / "event.json"
    line = one_line_error(cli("key", "recover", "-d", d, "--event", str(req)))
    assert "cannot read" in line
    ok("key", "recover-prepare", "-d", d, "--last-good", "air=2", "--out", str(req), env=npw2)
    line = one_line_error(cli("key", "recover", "-d", d, "--event", str(req)))
    assert "recovery request: sign it first" in line
    ok("key", "recover-sign", "--request", str(req), "--recovery", str(node / "recovery.key"),
       "--out", str(event), "--yes", env=REC)
    # Prepared again while one is prepared: refused (an event may be signed for the
    # first request already: a second one would kill the identity).
    line = one_line_error(cli("key", "recover-prepare", "-d", d, "--last-good", "air=1",
                              "--out", str(tmp_path / "again.json"), env=npw2))
    assert "prepared already" in line and "--cancel" in line and "destroyed" in line
    assert not (tmp_path / "again.json").exists()
    # Cancelled, then prepared again (new keys): the event signed for the first request
    # is refused, and nothing says to sign again; the recovery file signs no other.
    r = ok("key", "recover-prepare", "-d", d, "--cancel")
    assert "destroy every copy" in r.stdout and "Never sign another" in r.stdout
    ok("key", "recover-prepare", "-d", d, "--last-good", "air=1", "--out", str(req), env=npw2)
    line = one_line_error(cli("key", "recover", "-d", d, "--event", str(event)))
    assert "other keys than the ones prepared here" in line
    assert "Do not sign another" in line and "newest" not in line
    line = one_line_error(cli("key", "recover-sign", "--request", str(req), "--recovery",
                              str(node / "recovery.key"), "--new-recovery",
                              str(tmp_path / "n2.key"), "--out", str(tmp_path / "e2.json"),
                              "--yes", env=REC))
    assert "signed a recovery event already" in line and "recovery.key.signed" in line
    assert not (tmp_path / "e2.json").exists() and not (tmp_path / "n2.key").exists()
    ok("key", "recover-prepare", "-d", d, "--cancel")
    line = one_line_error(cli("key", "recover", "-d", d, "--event", str(event)))
    assert "no recovery is prepared" in line
    assert state_of(node).seq == 0 and len(record_ids(node)) == 2
    r = cli("key", "recover", "-d", d, "--event", str(event), "--last-good", "air=1")
    assert r.exit_code == 2 and "--event takes no other option" in r.output
    # A node of another identity is told whose event it is.
    other = make(tmp_path, "C")
    line = one_line_error(cli("key", "recover", "-d", str(other), "--event", str(event)))
    assert ok("id", "-d", str(other)).stdout.strip() in line
    # The node asks for the new next key's passphrase where it cannot prompt: one line.
    line = one_line_error(cli("key", "recover-prepare", "-d", d, "--last-good", "air=2",
                              "--out", str(req)))
    assert "no terminal" in line and "CITYNODE_NEXT_KEY_PASSPHRASE" in line


def test_a_recovery_file_signs_one_event(tmp_path: Path) -> None:
    """Review 12b: two recovery events of one recovery key kill the identity, and an
    event signed but not applied is in no key log. `recover-sign` keeps the event beside
    the recovery file (FILE.signed) before giving it out; the same request signed again
    gives the very same event (and no new recovery key), another request is refused."""
    node = make(tmp_path)
    d = str(node)
    publish(node, "air", AIR_TYPE, [air(1.0), air(2.0)])
    rfile = offline(node, tmp_path)
    marker = rfile.with_name("recovery.key.signed")
    npw2 = {"CITYNODE_NEXT_KEY_PASSPHRASE": "n2"}
    req, event, again = (tmp_path / n for n in ("request.json", "event.json", "again.json"))
    ok("key", "recover-prepare", "-d", d, "--last-good", "air=2", "--out", str(req), env=npw2)
    sign = ("key", "recover-sign", "--request", str(req), "--recovery", str(rfile), "--yes")
    r = ok(*sign, "--out", str(event), env=REC)
    assert marker.read_bytes() == event.read_bytes()
    assert "Never sign twice" in r.stdout
    assert os.stat(marker).st_mode & 0o077 == 0
    nxt = rfile.with_name("recovery.key.next")
    first_next = nxt.read_bytes()
    # The same request again (the event file lost on the way): the same event, no new
    # recovery key, no passphrase needed.
    r = ok(*sign, "--out", str(again))
    assert "already signed for this request" in r.stdout
    assert again.read_bytes() == event.read_bytes() and nxt.read_bytes() == first_next
    r = ok(*sign, "--out", str(event))
    assert "already signed for this request" in r.stdout and str(event) in r.stdout
    # Another request of the same node (here: altered heads) would be a second event.
    other = json.loads(req.read_text())
    other["heads"] = {"air": {"seq": 1, "id": record_ids(node)[0]}}
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps(other))
    line = one_line_error(cli("key", "recover-sign", "--request", str(bad), "--recovery",
                              str(rfile), "--new-recovery", str(tmp_path / "n.key"),
                              "--out", str(tmp_path / "e2.json"), "--yes", env=REC))
    assert "signed a recovery event already" in line and "kills the identity" in line
    assert not (tmp_path / "e2.json").exists() and not (tmp_path / "n.key").exists()
    # Nor in one step, here.
    line = one_line_error(cli("key", "recover", "-d", d, "--recovery", str(rfile),
                              "--last-good", "air=1", env={**REC, **npw2}))
    assert "signed a recovery event already" in line and "--event" in line
    assert state_of(node).seq == 0
    ok("key", "recover", "-d", d, "--event", str(again))
    assert state_of(node).seq == 1
    # Applied: the file is used up (the key log shows it).
    line = one_line_error(cli("key", "recover-sign", "--request", str(bad), "--recovery",
                              str(rfile), "--new-recovery", str(tmp_path / "n.key"),
                              "--out", str(tmp_path / "e2.json"), "--yes", env=REC))
    assert "signed a recovery event already" in line


def test_recover_prepare_names_every_own_feed(tmp_path: Path) -> None:
    """A recovery cannot be undone: every own feed the old key signed on is named,
    --last-good FEED=SEQ or --drop-feed FEED, else nothing happens and one line says
    which feeds are missing; a head that is not held is refused too."""
    node = make(tmp_path)
    d = str(node)
    publish(node, "air", AIR_TYPE, [air(1.0), air(2.0)])
    publish(node, "water", AIR_TYPE, [air(3.0)])
    env = {"CITYNODE_NEXT_KEY_PASSPHRASE": "n2"}
    req = str(tmp_path / "request.json")
    before = record_ids(node)
    line = one_line_error(cli("key", "recover-prepare", "-d", d, "--last-good", "air=2",
                              "--out", req, env=env))
    assert "1 own feed(s) not named: water;" in line and "--drop-feed" in line
    line = one_line_error(cli("key", "recover-prepare", "-d", d, "--out", req, env=env))
    assert "2 own feed(s) not named: air, water" in line
    line = one_line_error(cli("key", "recover-prepare", "-d", d, "--last-good", "air=2",
                              "--drop-feed", "air", "--drop-feed", "water", "--out", req,
                              env=env))
    assert "both" in line
    line = one_line_error(cli("key", "recover-prepare", "-d", d, "--last-good", "air=5",
                              "--drop-feed", "water", "--out", req, env=env))
    assert "air=5" in line and "no record" in line
    r = cli("key", "recover-prepare", "-d", d, "--last-good", "air", "--out", req)
    assert r.exit_code == 2 and "FEED=SEQ" in r.output
    assert record_ids(node) == before and not Path(req).exists()
    assert not (node / "recovery.pending").exists()
    publish(node, "air", AIR_TYPE, [air(4.0)])  # nothing prepared: the node signs


# ------------------------------------------------------------------- one-step recovery


def test_recover_in_one_step_signs_here_and_sends_only_the_event(tmp_path: Path) -> None:
    """On a machine holding both the node and the recovery file: the same three steps
    in one command. The new recovery file replaces DIR/recovery.key only once the
    recovery is applied; the new next key is sealed with the new next-key passphrase,
    which may not be the recovery one (S6). A recovery file of another node is refused
    naming both ids."""
    node, other = make(tmp_path, "B"), make(tmp_path, "C")
    d = str(node)
    b_id, c_id = (ok("id", "-d", str(x)).stdout.strip() for x in (node, other))
    kept = publish(node, "air", AIR_TYPE, [air(1.0), air(2.0)])
    publish(node, "air", AIR_TYPE, [air(3.0)])
    publish(node, "water", AIR_TYPE, [air(4.0)])
    env = {**REC, "CITYNODE_NEXT_KEY_PASSPHRASE": "n2"}
    used = (node / "recovery.key").read_bytes()
    line = one_line_error(cli("key", "recover", "-d", d, "--recovery",
                              str(other / "recovery.key"), "--last-good", "air=2",
                              "--drop-feed", "water", env=env))
    assert c_id in line and b_id in line
    line = one_line_error(cli("key", "recover", "-d", d, "--recovery",
                              str(node / "recovery.key"), "--last-good", "air=2", env=env))
    assert "1 own feed(s) not named: water;" in line
    line = one_line_error(cli("key", "recover", "-d", d, "--recovery",
                              str(node / "recovery.key"), "--last-good", "air=2",
                              "--drop-feed", "water",
                              env={**REC, "CITYNODE_NEXT_KEY_PASSPHRASE": RPW}))
    assert "next-key passphrase is the recovery passphrase" in line
    line = one_line_error(cli("key", "recover", "-d", d, "--recovery",
                              str(node / "recovery.key"), "--last-good", "air=1",
                              env={"CITYNODE_RECOVERY_PASSPHRASE": "wrong"}))
    assert "passphrase" in line
    r = cli("key", "recover", "-d", d, "--last-good", "air=1")
    assert r.exit_code == 2 and "--recovery FILE or --phrase" in r.output
    # Nothing happened, and the node signs (a refused recovery is not left prepared).
    assert state_of(node).seq == 0 and (node / "recovery.key").read_bytes() == used
    assert not (node / "recovery.pending").exists()

    r = ok("key", "recover", "-d", d, "--recovery", str(node / "recovery.key"),
           "--last-good", "air=2", "--drop-feed", "water", env=env)
    assert f"recovered: {b_id}" in r.stdout and "MOVE IT OFFLINE" in r.stdout
    assert "keep            air up to seq 2" in r.stdout
    assert record_ids(node, "--feed", "air") == kept
    assert record_ids(node, "--feed", "water") == []
    state = state_of(node)
    _ident, q1 = keylog.unseal_recovery((node / "recovery.key").read_bytes(), RPW)
    assert state.recovery == keylog.commit_key(SigningKey(q1).public_key)
    assert not (node / "recovery.key.next").exists()
    assert keylog.commit_key(next_key(node, "n2").public_key) == state.next
    with pytest.raises(KeyFileError):
        next_key(node, RPW)


def test_recover_with_a_next_recovery_key_made_offline(tmp_path: Path) -> None:
    """The next recovery key made on another machine (`key recovery-new`): the
    recovery commits to its public key, no recovery secret is written on the node, and
    the file made offline signs the next recovery."""
    node = make(tmp_path)
    d = str(node)
    node_id = ok("id", "-d", d).stdout.strip()
    publish(node, "air", AIR_TYPE, [air(1.0)])
    rfile = offline(node, tmp_path)
    nxt = rfile.with_name("next-recovery.key")
    r = ok("key", "recovery-new", "--id", node_id, "--out", str(nxt), env=REC)
    pub = nxt.with_name("next-recovery.key.pub")
    assert pub.read_text().strip() in r.stdout
    npw2 = {"CITYNODE_NEXT_KEY_PASSPHRASE": "n2"}
    req, event = tmp_path / "request.json", tmp_path / "event.json"
    ok("key", "recover-prepare", "-d", d, "--last-good", "air=1", "--out", str(req), env=npw2)
    r = ok("key", "recover-sign", "--request", str(req), "--recovery", str(rfile),
           "--next-recovery", str(pub), "--out", str(event), "--yes", env=REC)
    assert "recovery-new" in r.stdout and not rfile.with_name("recovery.key.next").exists()
    ok("key", "recover", "-d", d, "--event", str(event))
    assert state_of(node).recovery == keylog.commit_key(bytes.fromhex(pub.read_text()))
    assert sorted(p.name for p in node.iterdir() if "recovery" in p.name) == []
    # In one step too, with the hex form: the file made offline signs.
    publish(node, "air", AIR_TYPE, [air(2.0)])
    third = rfile.with_name("third.key")
    ok("key", "recovery-new", "--id", node_id, "--out", str(third), env=REC)
    third_pub = third.with_name("third.key.pub").read_text().strip()
    r = ok("key", "recover", "-d", d, "--recovery", str(nxt), "--last-good", "air=2",
           "--next-recovery", third_pub, env={**REC, **npw2})
    assert "made offline" in r.stdout and "crq1-" not in r.stdout
    state = state_of(node)
    assert state.seq == 2 and state.recovery == keylog.commit_key(bytes.fromhex(third_pub))
    r = cli("key", "recover", "-d", d, "--recovery", str(third), "--last-good", "air=2",
            "--next-recovery", "nothing-like-a-key", env={**REC, **npw2})
    assert r.exit_code == 2 and "--next-recovery" in r.output


def test_the_recovery_phrase_on_paper_signs_as_the_file_does(tmp_path: Path) -> None:
    """With only the phrase (the file lost): `recover-sign --phrase` writes the new
    recovery file where told; the one-step form takes a phrase too, and with
    --next-recovery needs no recovery passphrase at all."""
    node = make(tmp_path)
    d = str(node)
    node_id = ok("id", "-d", d).stdout.strip()
    publish(node, "air", AIR_TYPE, [air(1.0)])
    _ident, q0 = keylog.unseal_recovery((node / "recovery.key").read_bytes(), RPW)
    (node / "recovery.key").unlink()
    npw2 = {"CITYNODE_NEXT_KEY_PASSPHRASE": "n2"}
    req, event, new = (tmp_path / n for n in ("request.json", "event.json", "new.key"))
    ok("key", "recover-prepare", "-d", d, "--last-good", "air=1", "--out", str(req), env=npw2)
    r = ok("key", "recover-sign", "--request", str(req), "--phrase", "--new-recovery",
           str(new), "--out", str(event), "--yes", input=keylog.recovery_phrase(q0) + "\n",
           env=REC)
    # Paper keeps no record of its use: the operator is told to sign once.
    assert "keeps no record of its use: sign ONE" in r.stdout
    ok("key", "recover", "-d", d, "--event", str(event))
    _ident, q1 = keylog.unseal_recovery(new.read_bytes(), RPW)
    assert state_of(node).recovery == keylog.commit_key(SigningKey(q1).public_key)
    third = tmp_path / "third.key"
    ok("key", "recovery-new", "--id", node_id, "--out", str(third), env=REC)
    pub = third.with_name("third.key.pub").read_text().strip()
    ok("key", "recover", "-d", d, "--phrase", "--last-good", "air=1", "--next-recovery", pub,
       input=keylog.recovery_phrase(q1) + "\n", env=npw2)
    state = state_of(node)
    assert state.seq == 2 and state.recovery == keylog.commit_key(bytes.fromhex(pub))
