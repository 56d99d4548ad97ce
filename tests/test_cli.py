"""The ``citynode`` command line, in process (click's CliRunner) on real data dirs.

Real subprocess runs of init/run/publish are in tests/integration/test_process.py; this
file covers every command's help and its behaviour with real files, real SQLite and,
where a running peer is needed, a node serving HTTPS in the test's own event loop.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from citynode.cli import main
from citynode.core import checkpoints as cps
from citynode.core.keys import Verifier
from citynode.core.records import decode_record, open_record
from citynode.node import Node
from citynode.transport.server import serve
from tests.conftest import InProc, eventually, key_states, make_node_dir

Make = Callable[..., Awaitable[InProc]]

ROOT = Path(__file__).resolve().parent.parent
AIR_TYPE = "AirQualityObserved"
NOISE_TYPE = "org.example.Noise"
FAST = {("federation", "pull_interval_seconds"): 1.0, ("federation", "backoff_max_seconds"): 2.0}


def air(pm25: float) -> dict[str, Any]:
    return {
        "dateObserved": "2026-11-28T07:00:00+07:00",
        "location": {"type": "Point", "coordinates": [106.8230, -6.1950]},
        "name": "DKI1 Bundaran HI",
        "pm25": pm25,
    }


# ----------------------------------------------------------------------------- helpers


def cli(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
    """Run ``citynode ARGS`` in process; fail the test on any uncaught exception."""
    r = CliRunner().invoke(main, list(args), input=input, env=env)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(*r.exc_info)) if r.exc_info else ""
        pytest.fail(f"citynode {' '.join(args)} raised instead of a one-line error:\n{tb}")
    return r


def ok(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
    r = cli(*args, input=input, env=env)
    assert r.exit_code == 0, f"citynode {' '.join(args)} exited {r.exit_code}: {r.output}"
    return r


def ok_json(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Any:
    return json.loads(ok(*args, input=input, env=env).stdout)


def one_line_error(r: Result, *, codes: tuple[int, ...] = (1,)) -> str:
    """Assert ``r`` failed with exactly one ``Error: ...`` line on stderr; return it."""
    assert r.exit_code in codes, f"exit {r.exit_code}, expected {codes}: {r.output}"
    assert "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


def walk(cmd: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...],
                                                                           click.Command]]:
    """Every command under ``cmd`` (groups included), with its name path."""
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from walk(sub, (*path, name))


def docs_text() -> str:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
    return "\n".join(f.read_text(encoding="utf-8") for f in files)


@pytest.fixture
def node_dir(tmp_path: Path) -> Path:
    """A fresh, not running node (fast KDF) in a real temporary data dir."""
    return make_node_dir(tmp_path, "Jakarta")


def publish(d: Path, feed: str, type_name: str, items: list[dict[str, Any]]) -> list[str]:
    body = "\n".join(json.dumps(i) for i in items) + "\n"
    out = ok_json("publish", "-d", str(d), "--feed", feed, "--type", type_name, "--json", "-",
                  input=body)
    return list(out["ids"])


def record_ids(d: Path, *extra: str) -> list[str]:
    return [r["id"] for r in ok_json("records", "-d", str(d), "--json", "--limit", "1000",
                                     *extra)["records"]]


# ------------------------------------------------------------------- help and docs


def test_every_command_has_help_and_help_exits_0() -> None:
    cmds = list(walk(main))
    names = {p for p, _ in cmds}
    # The walk really covers the tree (a broken walk must not pass vacuously).
    assert {("init",), ("publish",), ("partner",), ("partner", "add"), ("subscribe",)} <= names
    problems = []
    for path, cmd in cmds:
        if not (cmd.help or "").strip():
            problems.append(f"`citynode {' '.join(path)}` has no help text (docstring)")
        r = CliRunner().invoke(main, [*path, "--help"])
        if r.exit_code != 0 or "Usage:" not in r.stdout:
            problems.append(f"`citynode {' '.join(path)} --help` exited {r.exit_code}: "
                            f"{r.output[-300:]}")
        elif (cmd.help or "").strip().split("\n")[0][:30] not in r.stdout:
            problems.append(f"`citynode {' '.join(path)} --help` does not show its help text")
    assert not problems, "\n".join(problems)


def test_every_command_is_documented() -> None:
    text = docs_text()
    missing = [" ".join(p) for p, _ in walk(main) if p and f"citynode {' '.join(p)}" not in text]
    assert not missing, (
        "commands never mentioned as `citynode CMD` in README.md or docs/: "
        + ", ".join(missing)
    )


# ---------------------------------------------------------------------------- init


def test_init_creates_files_with_private_modes(tmp_path: Path) -> None:
    d = tmp_path / "sby"
    r = ok("init", "-d", str(d), "--name", "Surabaya", "--listen", "127.0.0.1:18601",
           "--host", "citynode.surabaya.example", "--print-recovery")
    node_id = ok("id", "-d", str(d)).stdout.strip()
    # A cn2 id: the digest of the node's inception, not a key (issue 12).
    assert node_id.startswith("cn2") and f"node id: {node_id}" in r.stdout
    assert f"citynode partner add https://127.0.0.1:18601 --id {node_id}" in r.stdout
    # The recovery material is announced loudly, with its passphrase and the phrase.
    assert "MOVE IT OFFLINE" in r.stdout and str(d / "recovery.key") in r.stdout
    assert "crq1-" in r.stdout
    modes = {"node.key": 0o600, "node.next.key": 0o600, "recovery.key": 0o600,
             "keylog": 0o644, "operator.token": 0o600, "tls/key.pem": 0o600,
             "node.toml": 0o640}
    for name, mode in modes.items():
        assert (d / name).stat().st_mode & 0o777 == mode, name
    assert d.stat().st_mode & 0o077 == 0  # the data dir itself is private
    assert (d / "tls/cert.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
    toml = (d / "node.toml").read_text()
    assert "Surabaya" in toml and "127.0.0.1:18601" in toml


def test_init_refuses_an_existing_node_and_changes_nothing(node_dir: Path) -> None:
    key = (node_dir / "node.key").read_bytes()
    toml = (node_dir / "node.toml").read_bytes()
    line = one_line_error(cli("init", "-d", str(node_dir), "--name", "Other",
                              "--print-recovery"))
    assert "already holds a node" in line and str(node_dir) in line
    assert (node_dir / "node.key").read_bytes() == key
    assert (node_dir / "node.toml").read_bytes() == toml


@pytest.mark.parametrize(("listen", "says"), [
    ("bogus", "HOST:PORT"),
    ("127.0.0.1:99999", "99999"),
    ("0.0.0.0:8443", "--public-url"),  # a wildcard address has no URL partners can use
])
def test_init_bad_listen_is_one_line_and_leaves_nothing(
    tmp_path: Path, listen: str, says: str
) -> None:
    d = tmp_path / "bad"
    line = one_line_error(cli("init", "-d", str(d), "--name", "X", "--listen", listen,
                              "--print-recovery"), codes=(1, 2))
    assert says in line
    assert not (d / "node.key").exists() and not (d / "node.toml").exists()


# ---------------------------------------------------------------------- id, dirs, keys


def test_id_and_citynode_dir_env(node_dir: Path) -> None:
    nid = ok("id", "-d", str(node_dir)).stdout.strip()
    assert nid == Node.load(node_dir).node_id
    env = {"CITYNODE_DIR": str(node_dir)}
    assert ok("id", env=env).stdout.strip() == nid
    # Works for writes and reads alike.
    ok("publish", "--feed", "air", "--type", AIR_TYPE, "-", input=json.dumps(air(1.0)), env=env)
    assert [r["origin"] for r in ok_json("records", "--json", env=env)["records"]] == [nid]
    # No -d and no CITYNODE_DIR: a usage error naming the option.
    r = cli("id", env={"CITYNODE_DIR": ""})
    assert r.exit_code == 2 and "--dir" in r.stderr and "Traceback" not in r.output


@pytest.mark.parametrize(("args", "text"), [
    (("records", "-d", "x", "--limit", "many"), "'--limit'"),
    (("bogus",), "No such command 'bogus'"),
    (("partner", "add"), "Missing argument 'URL'"),
])
def test_usage_errors_are_one_line_too(args: tuple[str, ...], text: str) -> None:
    line = one_line_error(cli(*args, env={"CITYNODE_DIR": ""}), codes=(2,))
    assert text in line and "--help" in line


@pytest.mark.parametrize("args", [
    ("id",), ("records",), ("feeds",), ("check",), ("forks",), ("partner", "list"),
    ("publish", "--feed", "air", "--type", AIR_TYPE, "-"),
])
def test_missing_data_dir_is_one_clear_line(tmp_path: Path, args: tuple[str, ...]) -> None:
    missing = tmp_path / "nowhere"
    line = one_line_error(cli(*args, "-d", str(missing), input=json.dumps(air(1.0))))
    assert str(missing) in line and "citynode init" in line
    assert not missing.exists()  # a read or a failed write must not create the dir


@pytest.mark.parametrize(("spoil", "args", "says"), [
    ("toml", ("publish", "--feed", "air", "--type", AIR_TYPE, "-"), "not valid TOML"),
    ("db", ("records",), "corrupt or not a SQLite database"),
    ("db", ("check",), "corrupt or not a SQLite database"),
    ("db", ("publish", "--feed", "air", "--type", AIR_TYPE, "-"),
     "corrupt or not a SQLite database"),
    ("key", ("id",), "not a citynode secret key"),
])
def test_garbage_in_data_dir_is_one_clear_line(
    node_dir: Path, spoil: str, args: tuple[str, ...], says: str
) -> None:
    ok("records", "-d", str(node_dir))  # creates citynode.db
    target = {"toml": "node.toml", "db": "citynode.db", "key": "node.key"}[spoil]
    for stale in ("citynode.db-wal", "citynode.db-shm"):
        (node_dir / stale).unlink(missing_ok=True)
    (node_dir / target).write_bytes(b"this is not what you think it is [[\n" * 50)
    line = one_line_error(cli(*args, "-d", str(node_dir), input=json.dumps(air(1.0))))
    assert says in line and target in line


@pytest.mark.parametrize("args", [
    ("id",), ("records",),
    ("publish", "--feed", "air", "--type", AIR_TYPE, "-"),
])
def test_key_file_readable_by_others_is_refused(node_dir: Path, args: tuple[str, ...]) -> None:
    os.chmod(node_dir / "node.key", 0o644)
    line = one_line_error(cli(*args, "-d", str(node_dir), input=json.dumps(air(1.0))))
    assert "chmod 600" in line and "node.key" in line
    os.chmod(node_dir / "node.key", 0o600)
    assert record_ids(node_dir) == []  # the refused publish signed nothing


# ---------------------------------------------------------------------------- publish


def test_publish_object_array_and_json_lines(node_dir: Path, tmp_path: Path) -> None:
    d = str(node_dir)
    obj = tmp_path / "one.json"
    obj.write_text(json.dumps(air(1.0)))
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([air(2.0), air(3.0)]))
    jl = tmp_path / "more.jsonl"
    jl.write_text("".join(json.dumps(air(p)) + "\n\n" for p in (4.0, 5.0)))

    base = ("publish", "-d", d, "--feed", "air", "--type", AIR_TYPE, "--json")
    r1 = ok_json(*base, str(obj))
    r2 = ok_json(*base, str(arr))
    r3 = ok_json(*base, str(jl))
    r4 = ok_json(*base, "-", input=json.dumps(air(6.0)) + "\n" + json.dumps(air(7.0)) + "\n")
    r5 = ok_json(*base, input=json.dumps(air(8.0)))  # SOURCE defaults to stdin
    assert [(r["feed"], r["first_seq"], len(r["ids"])) for r in (r1, r2, r3, r4, r5)] == [
        ("air", 1, 1), ("air", 2, 2), ("air", 4, 2), ("air", 6, 2), ("air", 8, 1)]
    ids = [i for r in (r1, r2, r3, r4, r5) for i in r["ids"]]
    recs = ok_json("records", "-d", d, "--json")["records"]
    assert [r["id"] for r in recs] == ids
    assert [r["data"]["pm25"] for r in recs] == [float(i) for i in range(1, 9)]

    # Without --json: a summary line and the ids.
    out = ok("publish", "-d", d, "--feed", "air", "--type", AIR_TYPE, "--subject", "DKI1",
             "-", input=json.dumps(air(9.0))).stdout
    assert out.startswith("published 1 record(s) on air, seq 9..9\n")
    (last,) = ok_json("records", "-d", d, "--json", "--after", str(recs[-1]["cursor"]))["records"]
    assert last["id"] in out and last["subject"] == "DKI1"


def test_publish_pretty_printed_json_object(node_dir: Path, tmp_path: Path) -> None:
    # "one JSON object" includes the multi-line form `jq .` and most editors write.
    obj = tmp_path / "one.json"
    obj.write_text(json.dumps(air(1.0), indent=2) + "\n")
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([air(2.0), air(3.0)], indent=2) + "\n")
    base = ("publish", "-d", str(node_dir), "--feed", "air", "--type", AIR_TYPE, "--json")
    r = cli(*base, str(obj))
    assert r.exit_code == 0, (
        "a pretty-printed JSON object is read as JSON Lines and refused (citynode/cli.py "
        f"_read_items: parse the whole text as JSON first): {r.output}")
    assert json.loads(r.stdout)["first_seq"] == 1
    assert ok_json(*base, str(arr))["first_seq"] == 2
    assert [x["data"]["pm25"] for x in ok_json("records", "-d", str(node_dir), "--json")
            ["records"]] == [1.0, 2.0, 3.0]


def test_publish_invalid_item_publishes_nothing_and_names_the_field(node_dir: Path) -> None:
    d = str(node_dir)
    publish(node_dir, "air", AIR_TYPE, [air(1.0)])
    no_location = {k: v for k, v in air(2.0).items() if k != "location"}
    bad_pm = dict(air(3.0), pm25="high")
    for bad, field in [(no_location, "location"), (bad_pm, "pm25")]:
        body = "\n".join(json.dumps(x) for x in (air(4.0), bad, air(5.0))) + "\n"
        line = one_line_error(cli("publish", "-d", d, "--feed", "air", "--type", AIR_TYPE,
                                  "-", input=body))
        assert field in line, line
        assert "item 2 of 3" in line, line  # which one, in a file of hundreds
    for body, says in [("", "no input"), ("{not json", "invalid JSON"),
                       ('{"a": 1}\n{oops\n', "line 2"), ("[1, 2]", "JSON object"),
                       ('{"db": 1, "db": 2}', "key 'db' appears twice"),
                       ('{"db": 1}\n{"x": {"u": 1, "u": 2}}\n', "line 2: key 'u'"),
                       ('{"u": 1, "u": 2}\n{"db": 1}\n', "line 1: key 'u'"),
                       ('{\n  "u": 1,\n  "u": 2\n}\n', "key 'u' appears twice")]:
        line = one_line_error(cli("publish", "-d", d, "--feed", "n", "--type", NOISE_TYPE,
                                  "-", input=body))
        assert says in line, line
    line = one_line_error(cli("publish", "-d", d, "--feed", "air", "--type", "NoSuchType",
                              "-", input=json.dumps(air(6.0))))
    assert "NoSuchType" in line
    recs = ok_json("records", "-d", d, "--json")["records"]
    assert [(r["feed"], r["seq"]) for r in recs] == [("air", 1)]
    # The chain continues at seq 2: the refused batches took no seq numbers.
    assert ok_json("publish", "-d", d, "--feed", "air", "--type", AIR_TYPE, "--json",
                   input=json.dumps(air(7.0)))["first_seq"] == 2


# ------------------------------------------------------------ records, feeds, forks


def test_records_filters_and_cursor_paging(node_dir: Path, tmp_path: Path) -> None:
    d = str(node_dir)
    air_ids = publish(node_dir, "air", AIR_TYPE, [air(float(i)) for i in range(5)])
    noise_ids = publish(node_dir, "noise", NOISE_TYPE, [{"db": 60 + i} for i in range(2)])
    nid = ok("id", "-d", d).stdout.strip()
    other = ok("id", "-d", str(make_node_dir(tmp_path, "Seoul"))).stdout.strip()

    assert record_ids(node_dir) == air_ids + noise_ids
    assert record_ids(node_dir, "--feed", "air") == air_ids
    assert record_ids(node_dir, "--type", NOISE_TYPE) == noise_ids
    assert record_ids(node_dir, "--feed", "air", "--type", NOISE_TYPE) == []
    assert record_ids(node_dir, "--origin", nid) == air_ids + noise_ids
    assert record_ids(node_dir, "--origin", other) == []
    line = one_line_error(cli("records", "-d", d, "--origin", "cn1nonsense"))
    assert "cn1nonsense" in line or "node id" in line

    # Paging with the cursor: every record once, in order; "next" null at the end.
    seen, after, pages = [], 0, 0
    while True:
        page = ok_json("records", "-d", d, "--feed", "air", "--limit", "2",
                       "--after", str(after), "--json")
        pages += 1
        assert len(page["records"]) <= 2
        seen += [r["id"] for r in page["records"]]
        if page["next"] is None:
            break
        assert page["next"] == page["records"][-1]["cursor"]
        after = page["next"]
        assert pages < 10, "paging does not end"
    assert seen == air_ids and pages == 3

    # Each record carries its signed envelope: verify it independently of the node.
    for r in ok_json("records", "-d", d, "--json")["records"]:
        rec = open_record(*decode_record(base64.b64decode(r["envelope"])),
                          now_ms=2**60, verifier=Verifier(), key_states=key_states(Path(d)))
        assert rec.id.hex() == r["id"] and rec.seq == r["seq"]

    assert "7 record(s)" in ok("records", "-d", d).stdout  # the table
    assert cli("records", "-d", d, "--limit", "0").exit_code == 2


def test_feeds_and_forks_json(node_dir: Path) -> None:
    d = str(node_dir)
    assert ok_json("feeds", "-d", d, "--json") == {"feeds": []}
    air_ids = publish(node_dir, "air", AIR_TYPE, [air(float(i)) for i in range(3)])
    noise_ids = publish(node_dir, "noise", NOISE_TYPE, [{"db": 60}])
    nid = ok("id", "-d", d).stdout.strip()
    feeds = {f["feed"]: f for f in ok_json("feeds", "-d", d, "--json")["feeds"]}
    assert set(feeds) == {"air", "noise"}
    assert (feeds["air"]["origin"], feeds["air"]["seq"], feeds["air"]["count"],
            feeds["air"]["head"]) == (nid, 3, 3, air_ids[-1])
    assert (feeds["noise"]["seq"], feeds["noise"]["head"]) == (1, noise_ids[0])
    assert "noise" in ok("feeds", "-d", d).stdout
    # Terms (from the node's signed card) and completeness; a node that is not running
    # has heard no liveness statement since it stopped.
    assert feeds["air"]["terms"] == {"license": None, "terms_url": None,
                                     "terms_digest": None, "attribution": None,
                                     "policy": None}
    assert feeds["air"]["completeness"]["state"] == "unknown"
    with (node_dir / "node.toml").open("a") as f:
        f.write('[feeds.air]\nlicense = "ODbL-1.0"\nattribution = "Jakarta"\n'
                "cadence_seconds = 60\nretention_days = 90\n")
    feeds = {f["feed"]: f for f in ok_json("feeds", "-d", d, "--json")["feeds"]}
    assert (feeds["air"]["terms"]["license"], feeds["air"]["terms"]["attribution"],
            feeds["air"]["completeness"]["cadence_s"]) == ("ODbL-1.0", "Jakarta", 60)
    assert (feeds["air"]["retention_days"], feeds["noise"]["retention_days"]) == (90, None)
    assert "ODbL-1.0" in ok("feeds", "-d", d).stdout

    assert ok_json("forks", "-d", d, "--json") == {"forks": []}
    assert ok("forks", "-d", d).stdout.strip() == "no forks known"


# ---------------------------------------------------------------------------- check


def test_check_clean_then_tampered_envelope(node_dir: Path) -> None:
    d = str(node_dir)
    ids = publish(node_dir, "air", AIR_TYPE, [air(float(i)) for i in range(3)])
    r = ok("check", "-d", d)
    assert "checked 3 record(s) in 1 feed(s): 0 problem(s)" in r.stdout
    from citynode import __version__
    from citynode.storage import SCHEMA_VERSION

    assert f"citynode {__version__}, database schema version {SCHEMA_VERSION}" in r.stdout
    report = ok_json("check", "-d", d, "--json")
    assert report["problems"] == [] and report["schema_version"] == SCHEMA_VERSION
    assert report["version"] == __version__

    # Flip one byte of seq 2's stored envelope, straight in the SQLite file.
    con = sqlite3.connect(node_dir / "citynode.db")
    try:
        (env,) = con.execute("SELECT envelope FROM records WHERE id = ?",
                             (bytes.fromhex(ids[1]),)).fetchone()
        spoiled = bytearray(env)
        spoiled[-5] ^= 0x01  # inside the signature
        with con:
            con.execute("UPDATE records SET envelope = ? WHERE id = ?",
                        (bytes(spoiled), bytes.fromhex(ids[1])))
    finally:
        con.close()

    r = cli("check", "-d", d)
    assert r.exit_code == 1, r.output
    assert "1 problem(s)" in r.stdout and "Traceback" not in r.output
    assert "/air seq 2:" in r.stdout and "bad_signature" in r.stdout
    r = cli("check", "-d", d, "--json")
    assert r.exit_code == 1
    report = json.loads(r.stdout)
    assert report["records"] == 3 and not report["ok"]
    (problem,) = report["problems"]
    assert "seq 2" in problem and "signature" in problem


# ---------------------------------------------------------------------------- proof


def test_proof_inclusion_and_consistency(node_dir: Path) -> None:
    d = str(node_dir)
    ids = publish(node_dir, "air", AIR_TYPE, [air(float(i)) for i in range(5)])
    nid = ok("id", "-d", d).stdout.strip()

    line = one_line_error(cli("proof", "-d", d, "--id", ids[2]))
    assert "no checkpoint covers this record" in line

    async def checkpoint() -> cps.Checkpoint:
        node = Node.load(node_dir)
        await node.start(partners=False)
        try:
            (cp,) = await node.checkpoints.checkpoint_now()
            return cp
        finally:
            await node.stop()

    cp = asyncio.run(checkpoint())
    assert cp.size == 5
    later = publish(node_dir, "air", AIR_TYPE, [air(9.0)])  # not covered by the checkpoint

    p = ok_json("proof", "-d", d, "--id", ids[2])
    assert (p["kind"], p["index"], p["size"], p["verified"]) == ("inclusion", 2, 5, True)
    assert p["root"] == cp.root.hex() == cps.root_of([bytes.fromhex(i) for i in ids]).hex()
    cps.verify_inclusion(bytes.fromhex(ids[2]), 2, 5, [bytes.fromhex(x) for x in p["path"]],
                         cp.root)
    line = one_line_error(cli("proof", "-d", d, "--id", later[0]))
    assert "no checkpoint covers this record" in line
    line = one_line_error(cli("proof", "-d", d, "--id", "00" * 32))
    assert "no such record" in line

    all_ids = [bytes.fromhex(i) for i in ids + later]
    c = ok_json("proof", "-d", d, "--origin", nid, "--feed", "air", "--old", "2", "--new", "6")
    assert (c["kind"], c["old_size"], c["new_size"], c["verified"]) == ("consistency", 2, 6,
                                                                         True)
    assert c["old_root"] == cps.root_of(all_ids[:2]).hex()
    assert c["new_root"] == cps.root_of(all_ids).hex()
    cps.verify_consistency(2, 6, cps.root_of(all_ids[:2]), cps.root_of(all_ids),
                           [bytes.fromhex(x) for x in c["path"]])
    # No checkpoint of size 2 or 6 was signed: the roots are only this node's records.
    assert c["signed_by_origin"] == {"old": False, "new": False}
    c = ok_json("proof", "-d", d, "--origin", nid, "--feed", "air", "--old", "5", "--new", "6")
    assert c["signed_by_origin"] == {"old": True, "new": False}
    assert c["old_root"] == cp.root.hex()
    line = one_line_error(cli("proof", "-d", d, "--origin", nid, "--feed", "air", "--old",
                              "2", "--new", "7"))
    assert "holds only 6 records" in line

    line = one_line_error(cli("proof", "-d", d, "--origin", nid, "--feed", "air", "--old", "2",
                              "--new", "7"))
    assert "holds only 6 records" in line
    r = cli("proof", "-d", d, "--origin", nid, "--feed", "air", "--old", "4", "--new", "2")
    assert r.exit_code == 2 and "old <= new" in r.stderr
    assert cli("proof", "-d", d).exit_code == 2


# --------------------------------------------------------- partners (a live peer)


async def test_partner_add_list_remove_against_a_live_node(
    inproc: Make, tmp_path: Path
) -> None:
    seoul = await inproc("Seoul", settings=FAST)
    seoul_ids = [r.id.hex() for r in await seoul.node.publish(
        "noise", NOISE_TYPE, [{"db": 50 + i} for i in range(3)])]
    local = make_node_dir(tmp_path / "cli", "Jakarta", settings=FAST)
    d = str(local)
    sid = seoul.node.node_id

    def run(*args: str) -> Awaitable[Result]:
        # The CLI runs its own event loop; ours keeps serving Seoul meanwhile.
        return asyncio.to_thread(cli, *args)

    assert json.loads((await run("partner", "list", "-d", d, "--json")).stdout) == {
        "partners": []}
    # A card not signed by the given id is refused, and nothing is stored.
    wrong = ok("id", "-d", str(make_node_dir(tmp_path / "cli", "Busan"))).stdout.strip()
    one_line_error(await run("partner", "add", seoul.url, "--id", wrong, "-d", d))
    one_line_error(await run("partner", "add", seoul.url, "--id", "cn1garbage", "-d", d))

    r = await run("partner", "add", seoul.url, "--id", sid, "-d", d)
    assert r.exit_code == 0, r.output
    assert f"added partner Seoul ({sid})" in r.stdout
    (p,) = json.loads((await run("partner", "list", "-d", d, "--json")).stdout)["partners"]
    assert p == {"node_id": sid, "name": "Seoul", "url": seoul.url,
                 "tls_fingerprint": seoul.node.identity.cert_fingerprint.hex()}
    table = (await run("partner", "list", "-d", d)).stdout
    # The id whole on one line, to copy and paste (was folded at 80 columns).
    assert "Seoul" in table and any(sid in line for line in table.splitlines())

    # Serve the CLI's node for a moment so Seoul replicates to it: then `records
    # --origin` filters real foreign records.
    node = Node.load(local)
    await node.start()
    runner = await serve(node, host="127.0.0.1", port=node.config.node.listen_port)
    try:
        await seoul.node.add_partner(f"https://127.0.0.1:{node.config.node.listen_port}",
                                     node.node_id)

        async def replicated() -> bool:
            return node.storage.head(seoul.node.public_key, "noise") is not None and \
                node.storage.head(seoul.node.public_key, "noise")[0] == 3

        await eventually(replicated, timeout=20)
    finally:
        await runner.cleanup()
        await node.stop()
    out = json.loads((await run("records", "-d", d, "--origin", sid, "--json")).stdout)
    assert [r["id"] for r in out["records"]] == seoul_ids
    assert json.loads((await run("records", "-d", d, "--origin", node.node_id, "--json")
                       ).stdout)["records"] == []

    r = await run("partner", "remove", sid, "-d", d)
    assert r.exit_code == 0 and f"removed partner {sid}" in r.stdout, r.output
    assert json.loads((await run("partner", "list", "-d", d, "--json")).stdout) == {
        "partners": []}
    line = one_line_error(await run("partner", "remove", sid, "-d", d))
    assert f"no partner {sid}" in line


# -------------------------------------------------------------------------- subscribe


async def _subscribe_run(n: InProc, *args: str) -> tuple[int, str, str]:
    """Run ``citynode subscribe URL --id ID ARGS`` as a real process: its exit status,
    stdout and stderr. A process, so that if subscribe ever waited forever the test can
    kill it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "citynode", "subscribe", n.url, "--id", n.node.node_id, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"citynode subscribe {' '.join(args)} did not stop")
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _subscribe_process(n: InProc, *args: str) -> str:
    """Run ``citynode subscribe URL --id ID ARGS``; its stdout (it must succeed)."""
    rc, out, err = await _subscribe_run(n, *args)
    assert rc == 0, err
    return out


async def test_subscribe_prints_n_verified_json_lines(inproc: Make) -> None:
    n = await inproc("Singapore")
    published = await n.node.publish("air", AIR_TYPE, [air(float(i)) for i in range(5)])
    lines = (await _subscribe_process(n, "--after", "0", "--count", "3")).splitlines()
    assert len(lines) == 3, lines
    cursors = []
    for line, rec in zip(lines, published[:3], strict=True):
        j = json.loads(line)
        assert {"id", "cursor", "origin"} <= j.keys()
        assert (j["id"], j["origin"], j["seq"]) == (rec.id.hex(), n.node.node_id, rec.seq)
        opened = open_record(*decode_record(base64.b64decode(j["envelope"])),
                             now_ms=2**60, verifier=Verifier(),
                             key_states=n.node.policy.keys.state)
        assert opened.id == rec.id
        cursors.append(j["cursor"])
    assert cursors == sorted(cursors) and len(set(cursors)) == 3

    # Resuming after the last cursor gives the next records, none twice.
    out = await _subscribe_process(n, "--after", str(cursors[-1]), "--count", "2")
    assert [json.loads(x)["id"] for x in out.splitlines()] == [
        r.id.hex() for r in published[3:]]


async def test_subscribe_to_an_invalid_feed_name_fails_at_once(inproc: Make) -> None:
    """`--feed 'Bad Feed'` can match no feed: the node refuses it (400) and subscribe
    says why in one line, rather than waiting silently forever."""
    n = await inproc("Hanoi")
    rc, out, err = await _subscribe_run(n, "--feed", "Bad Feed")
    assert rc == 1 and out == ""
    assert "400" in err and "query parameter feed is not a valid feed name: use 1-64" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "b'" not in err  # the node's message, not a Python bytes repr


def test_subscribe_to_an_address_without_scheme_says_so() -> None:
    line = one_line_error(cli("subscribe", "127.0.0.1:9", "--count", "1"))
    assert "not a node address" in line and "https://" in line
    assert "NonHttpUrlClientError" not in line


def test_readme_example_payload_publishes(node_dir: Path) -> None:
    """The payload README.md shows for `citynode publish` is valid as it stands."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    example = text.split("```json\n", 1)[1].split("\n```", 1)[0]
    publish(node_dir, "air-quality", "AirQualityObserved", [json.loads(example)])
    recs = ok_json("records", "-d", str(node_dir), "--json")["records"]
    assert [r["data"]["name"] for r in recs] == ["DKI1 Bundaran HI"]


# ------------------------------------------------------------------ own feed forked


def test_a_forked_own_feed_is_never_signed_on_again(node_dir: Path) -> None:
    """Once this node holds proof that it signed two histories of one of its feeds (a
    restore from an old backup with no partner reachable, say), it stops signing on
    that feed, across restarts, and `check` reports it."""
    from citynode.core.chain import ForkProof
    from citynode.core.records import sign_record
    from citynode.errors import PublishRefused

    d = str(node_dir)
    publish(node_dir, "air", AIR_TYPE, [air(float(i)) for i in range(3)])

    async def fork() -> None:
        node = Node.load(node_dir)
        await node.start(partners=False)
        try:
            held = node.storage.envelope_at(node.public_key, "air", 2)
            assert held is not None
            prev = node.storage.envelope_at(node.public_key, "air", 1)
            assert prev is not None
            other = sign_record(node.key, feed="air", seq=2,
                                prev=open_record(*decode_record(prev), now_ms=2**62,
                                                 verifier=Verifier(),
                                                 key_states=node.policy.keys.state).id,
                                time_ms=node.now_ms(), type=AIR_TYPE, data=air(99.0))
            assert await node.checkpoints.ingest_proof(
                ForkProof(held, other.envelope).encode(), "test")
            with pytest.raises(PublishRefused, match="has forked"):
                await node.publish("air", AIR_TYPE, [air(1.0)])
            await node.publish("water", AIR_TYPE, [air(1.0)])  # other feeds go on
        finally:
            await node.stop()

    asyncio.run(fork())
    # After a restart too (the proof is in the database), and through the CLI.
    line = one_line_error(cli("publish", "-d", d, "--feed", "air", "--type", AIR_TYPE, "-",
                              input=json.dumps(air(2.0))))
    assert "feed 'air' of this node has forked" in line and "new feed name" in line
    r = cli("check", "-d", d)
    assert r.exit_code == 1 and "own feed air, seq 2: this node signed two histories" in r.stdout
    assert publish(node_dir, "water", AIR_TYPE, [air(3.0)])


def test_publish_says_when_a_feed_is_public_by_default(node_dir: Path) -> None:
    d = str(node_dir)
    with open(node_dir / "node.toml", "a") as f:
        f.write('\n[feeds.permits]\naccess = "partners"\n')
    r = ok("publish", "-d", d, "--feed", "permits", "--type", NOISE_TYPE, "-",
           input=json.dumps({"db": 50}))
    assert "note:" not in r.stderr
    r = ok("publish", "-d", d, "--feed", "permitz", "--type", NOISE_TYPE, "-",
           input=json.dumps({"db": 50}))  # a typo: public
    assert "note: feed 'permitz' is public: anyone may read it" in r.stderr
    assert "kill -HUP" in r.stderr  # a reload suffices (issue 13 review), not a restart
    line = one_line_error(cli("publish", "-d", d, "--feed", "permits", "--type", NOISE_TYPE,
                              "--subject", "", "-", input=json.dumps({"db": 50})), codes=(2,))
    assert "--subject" in line and "empty" in line


def test_a_node_that_runs_but_does_not_answer_yet_is_said_plainly(node_dir: Path) -> None:
    """The run lock is held (as by a `citynode run` still starting) but nothing listens:
    the operator is told to retry, not shown an aiohttp repr."""
    from citynode.runner import run_lock

    with run_lock(node_dir):
        line = one_line_error(cli("publish", "-d", str(node_dir), "--feed", "n", "--type",
                                  NOISE_TYPE, "-", input=json.dumps({"db": 50})))
    assert "not answering" in line and "retry in a moment" in line
    assert "object at 0x" not in line


def test_one_fork_is_one_proof_whichever_order_it_comes_in(node_dir: Path) -> None:
    """Two nodes each find the same equivocation (each holding a different copy first)
    and exchange proofs: each stores one row for it, not two."""
    from citynode.core.chain import ForkProof
    from citynode.core.records import sign_record

    async def go() -> list[Any]:
        node = Node.load(node_dir)
        await node.start(partners=False)
        try:
            # The node's own key: an origin it trusts (a stranger's proof is refused).
            x, y = (sign_record(node.key, feed="f", seq=1, prev=None, time_ms=1,
                                type=NOISE_TYPE, data={"db": v}).envelope for v in (50, 60))
            assert await node.checkpoints.ingest_proof(ForkProof(x, y).encode(), "a")
            assert not await node.checkpoints.ingest_proof(ForkProof(y, x).encode(), "b")
            return node.storage.fork_proofs()
        finally:
            await node.stop()

    rows = asyncio.run(go())
    assert len(rows) == 1 and rows[0].seq == 1


def test_a_prev_mismatch_or_split_view_is_one_proof_too(node_dir: Path) -> None:
    from citynode.core.chain import ForkProof
    from citynode.core.records import sign_record

    async def go() -> list[Any]:
        node = Node.load(node_dir)
        await node.start(partners=False)
        try:
            one = sign_record(node.key, feed="g", seq=1, prev=None, time_ms=1,
                              type=NOISE_TYPE, data={"db": 1})
            two = sign_record(node.key, feed="g", seq=2, prev=b"\x05" * 32, time_ms=2,
                              type=NOISE_TYPE, data={"db": 2})  # its prev is not one's id
            assert await node.checkpoints.ingest_proof(
                ForkProof(one.envelope, two.envelope).encode(), "a")
            assert not await node.checkpoints.ingest_proof(
                ForkProof(two.envelope, one.envelope).encode(), "b")
            x, y = (cps.sign_checkpoint(node.key, "g", 2, root, 3).envelope
                    for root in (b"\x01" * 32, b"\x02" * 32))
            assert await node.checkpoints.ingest_proof(cps.SplitViewProof(x, y).encode(), "a")
            assert not await node.checkpoints.ingest_proof(cps.SplitViewProof(y, x).encode(), "b")
            return node.storage.fork_proofs()
        finally:
            await node.stop()

    rows = asyncio.run(go())
    # The prev mismatch is listed at seq 2 (the record whose prev breaks the chain).
    assert [(r.kind, r.seq) for r in rows] == [("fork", 2), ("split-view", 2)]


def test_check_reports_a_node_toml_that_run_would_refuse(node_dir: Path) -> None:
    """`run` and a SIGHUP reload refuse an invalid node.toml: check says so too."""
    toml = node_dir / "node.toml"
    toml.write_text(toml.read_text().replace("pull_interval_seconds = 10.0",
                                             "pull_interval_seconds = -1.0"))
    r = cli("check", "-d", str(node_dir))
    assert r.exit_code == 1, r.output
    assert "node.toml:" in r.output and "pull_interval_seconds" in r.output


def test_check_finds_a_damaged_database_file(node_dir: Path) -> None:
    """SQLite's own structure check comes first: damage where no record lives is still a
    problem (exit 1); damage under the records is one clear line, not a traceback."""
    from tests.conftest import damage_table

    d = str(node_dir)
    publish(node_dir, "air", AIR_TYPE, [air(float(i)) for i in range(3)])
    damage_table(node_dir / "citynode.db", "rejected")
    r = cli("check", "-d", d)
    assert r.exit_code == 1, r.output
    assert "checked 3 record(s)" in r.stdout and "database file damaged: " in r.stdout, r.stdout
    report = json.loads(cli("check", "-d", d, "--json").stdout)
    assert not report["ok"] and report["problems"][0].startswith("database file damaged: ")

    damage_table(node_dir / "citynode.db", "records")
    line = one_line_error(cli("check", "-d", d))
    assert "database file damaged" in line and "records cannot be checked" in line, line


def test_check_works_without_the_passphrase(tmp_path: Path) -> None:
    """Checking a node (or a backup copy) must not need its secret key: only the
    own-fork part is skipped, and the output says so."""
    from citynode.datadir import init_data_dir
    from tests.conftest import FAST_KDF

    d = tmp_path / "sealed"
    init_data_dir(d, name="Sealed", listen="127.0.0.1:9", passphrase="correct horse",
                  **FAST_KDF)
    r = cli("check", "-d", str(d), env={"CITYNODE_PASSPHRASE": ""})
    assert r.exit_code == 0, r.output
    assert "0 problem(s)" in r.stdout and "own feeds not checked for forks" in r.stdout


# ---------------------------------------------------------------------------- egress


EGRESS = ('\n[feeds.air]\naccess = "public"\n[feeds.air.egress]\n'
          'deny = ["operatorPhone"]\nlocation_decimals = 2\ntime_resolution_seconds = 3600\n')


def test_egress_policy_applies_before_signing_and_policy_check_shows_it(
        node_dir: Path) -> None:
    """A payload with a personal-data field is refused (naming it) and nothing of its
    batch is signed; one without is published coarsened; `policy check` shows the same
    outcome beforehand without signing anything."""
    with open(node_dir / "node.toml", "a") as f:
        f.write(EGRESS)
    d = str(node_dir)
    leaky = dict(air(12.0), operatorPhone="+62 21 555 0100")
    body = "\n".join(json.dumps(i) for i in (air(11.0), leaky)) + "\n"
    checked = cli("policy", "check", "-d", d, "--feed", "air", "--type", AIR_TYPE, "-",
                  input=body)
    assert checked.exit_code == 1
    report = json.loads(checked.stdout)
    first, second = report["payloads"]
    assert first["data"]["location"]["coordinates"] == [106.82, -6.2]
    assert first["data"]["dateObserved"] == "2026-11-28T07:00:00+07:00"
    assert first["changes"] == ["location coarsened to 2 decimals"]
    assert second["reason"] == "egress_denied" and "operatorPhone" in second["refused"]
    assert report["policy"] == {"deny": ["operatorPhone"], "location_decimals": 2,
                                "time_resolution_seconds": 3600}
    assert record_ids(node_dir) == []  # policy check signs nothing

    line = one_line_error(cli("publish", "-d", d, "--feed", "air", "--type", AIR_TYPE, "-",
                              input=body))
    assert "item 2 of 2" in line and "operatorPhone" in line
    assert record_ids(node_dir) == []  # nothing of the batch was signed
    (rid,) = publish(node_dir, "air", AIR_TYPE, [air(11.0)])
    (rec,) = ok_json("records", "-d", d, "--json")["records"]
    assert rec["id"] == rid
    assert rec["data"]["location"]["coordinates"] == [106.82, -6.2]  # as it left
    # A feed with no egress table publishes payloads unchanged.
    publish(node_dir, "other", AIR_TYPE, [air(1.0)])
    (other,) = ok_json("records", "-d", d, "--feed", "other", "--json")["records"]
    assert other["data"]["location"]["coordinates"] == [106.8230, -6.1950]


def test_egress_rules_reach_the_records_subject(node_dir: Path) -> None:
    """The subject leaves the city in the payload map: a feed denying it refuses a
    record with one (naming it, nothing signed); a feed removing free text publishes
    the record without it; `policy check --subject` shows both beforehand."""
    with open(node_dir / "node.toml", "a") as f:
        f.write('\n[feeds.closed]\naccess = "public"\n[feeds.closed.egress]\n'
                'deny = ["subject"]\n'
                '\n[feeds.plain]\naccess = "public"\n[feeds.plain.egress]\n'
                'text_max_chars = 0\n')
    d = str(node_dir)
    body = json.dumps(air(1.0)) + "\n"
    who = "house of Ibu Sari"
    checked = cli("policy", "check", "-d", d, "--feed", "closed", "--type", AIR_TYPE,
                  "--subject", who, "-", input=body)
    assert checked.exit_code == 1
    (refused,) = json.loads(checked.stdout)["payloads"]
    assert refused["reason"] == "egress_denied" and "subject" in refused["refused"]
    line = one_line_error(cli("publish", "-d", d, "--feed", "closed", "--type", AIR_TYPE,
                              "--subject", who, "-", input=body))
    assert "attribute subject (the record's subject) may not leave" in line
    assert record_ids(node_dir) == []
    (shown,) = ok_json("policy", "check", "-d", d, "--feed", "plain", "--type", AIR_TYPE,
                       "--subject", who, "-", input=body)["payloads"]
    assert shown["subject"] is None
    assert "removed subject (the record's subject) (free text)" in shown["changes"]
    ok("publish", "-d", d, "--feed", "plain", "--type", AIR_TYPE, "--subject", who, "-",
       input=body)
    (rec,) = ok_json("records", "-d", d, "--feed", "plain", "--json")["records"]
    assert rec.get("subject") is None and "name" not in rec["data"]
    assert who not in json.dumps(rec)


def test_audit_checks_terms_documents_against_the_signed_digest(
        node_dir: Path, tmp_path: Path) -> None:
    """`citynode audit --terms FEED=FILE` checks a terms document against the digest the
    origin's card signed: the document itself passes (terms_ok), one changed by a byte
    is refused with terms_mismatch (exit 1), and a feed whose card states no terms
    document is no_terms."""
    import hashlib

    doc = b"Terms of use of the air feed of Jakarta, version 3.\n"
    with open(node_dir / "node.toml", "a") as f:
        f.write('\n[feeds.air]\naccess = "public"\nterms_url = "https://e.org/terms"\n'
                f'terms_digest = "{hashlib.sha256(doc).hexdigest()}"\n'
                '\n[feeds.other]\naccess = "public"\nlicense = "CC0-1.0"\n')
    d = str(node_dir)
    nid = ok("id", "-d", d).stdout.strip()
    publish(node_dir, "air", AIR_TYPE, [air(1.0)])
    publish(node_dir, "other", AIR_TYPE, [air(2.0)])
    asyncio.run(_sign_card(node_dir))  # what a running node does: the bundle carries it
    out = tmp_path / "all.bundle"
    ok("export", "-d", d, "--origin", nid, "--out", str(out))
    good, bad = tmp_path / "terms.txt", tmp_path / "changed.txt"
    good.write_bytes(doc)
    bad.write_bytes(doc.replace(b"version 3", b"version 4"))

    rep = ok_json("audit", str(out), "--origin", nid, "--terms", f"air={good}", "--json")
    assert rep["ok"] is True
    assert [(f["kind"], f["feed"]) for f in rep["findings"] if f["kind"].startswith("terms")
            ] == [("terms_ok", "air")]
    for spec, kind in ((f"air={bad}", "terms_mismatch"), (f"other={good}", "no_terms"),
                       (f"nosuch={good}", "no_terms")):
        r = cli("audit", str(out), "--origin", nid, "--terms", spec, "--json")
        assert r.exit_code == 1, r.output
        rep = json.loads(r.stdout)
        assert rep["ok"] is False
        assert [(f["severity"], f["kind"]) for f in rep["findings"]
                if f["severity"] == "error"] == [("error", kind)]
    r = cli("audit", str(out), "--origin", nid, "--terms", f"air={good}")
    assert r.exit_code == 0 and "terms_ok" in r.stdout, r.output
    assert cli("audit", str(out), "--origin", nid, "--terms", "air").exit_code == 2


async def _sign_card(d: Path) -> None:
    from citynode.node import Node

    node = Node.load(d)
    await node.start(partners=False)
    try:
        node.policy.card()
        node.storage.set_meta("test:barrier", b"").result(10)  # the card's write is done
    finally:
        await node.stop()


def test_a_single_feed_export_carries_the_erasure_requests_and_audits_clean(
        node_dir: Path, tmp_path: Path) -> None:
    """``citynode export --feed F`` of a feed with an erased record adds the origin's
    citynode.erasures feed (the audit checks each tombstone against its request), and
    not for a feed with none; the audit of the bundle is clean and reports the erasure."""
    d = str(node_dir)
    nid = ok("id", "-d", d).stdout.strip()
    ids = publish(node_dir, "air", AIR_TYPE, [air(1.0), air(2.0), air(3.0)])
    publish(node_dir, "other", AIR_TYPE, [air(4.0)])
    req = ok_json("erase", "-d", d, "--id", ids[1], "--reason", "wrong station", "--json")
    out = tmp_path / "air.bundle"
    r = ok("export", "-d", d, "--origin", nid, "--feed", "air", "--out", str(out), "--json")
    summary = json.loads(r.stdout)
    assert summary["feeds"] == {"air": 3, "citynode.erasures": 1}
    assert summary["erasures_added"] is True
    assert "citynode.erasures" not in {f["feed"] for f in summary["not_public"]}
    rep = ok_json("audit", str(out), "--origin", nid, "--json")
    assert rep["ok"] is True and rep["errors"] == 0 and rep["erased"] == 1
    assert rep["tombstones"] == [{"feed": "air", "seq": 2, "id": ids[1], "why": "erased",
                                  "by": req["id"], "reason": "wrong station"}]
    # The human summary says why a feed not asked for went in.
    r = ok("export", "-d", d, "--origin", nid, "--feed", "air", "--out", str(out), "--force")
    assert "added feed citynode.erasures (1 record(s))" in r.stderr
    # A feed with nothing erased goes alone.
    r = ok("export", "-d", d, "--origin", nid, "--feed", "other", "--out",
           str(tmp_path / "o.bundle"), "--json")
    assert json.loads(r.stdout)["feeds"] == {"other": 1}
    assert json.loads(r.stdout)["erasures_added"] is False
    assert ok_json("audit", str(tmp_path / "o.bundle"), "--origin", nid, "--json")["ok"]
    # Every feed: the erasure feed goes in once, and is not said to be left out.
    r = ok("export", "-d", d, "--origin", nid, "--out", str(tmp_path / "all.bundle"),
           "--json")
    summary = json.loads(r.stdout)
    assert summary["feeds"] == {"air": 3, "citynode.erasures": 1, "other": 1}
    assert summary["erasures_added"] is False and summary["left_out_not_public"] == []
    rep = ok_json("audit", str(tmp_path / "all.bundle"), "--origin", nid, "--json")
    assert rep["ok"] is True and rep["erased"] == 1


def test_erase_drops_the_payload_keeps_the_record_and_refuses_what_it_cannot_erase(
        node_dir: Path) -> None:
    """``citynode erase`` on a stopped node (the operator API in process): the record is
    then a tombstone saying why; the erasure request is a record of feed
    citynode.erasures; an id not held, or of the request itself, is refused in one line."""
    d = str(node_dir)
    ids = publish(node_dir, "air", AIR_TYPE, [air(1.0), air(2.0)])
    r = ok("erase", "-d", d, "--id", ids[0], "--reason", "wrong station", "--json")
    out = json.loads(r.stdout)
    assert out["erased"] == [ids[0]] and out["seq"] == 1
    # Issue 13 review: the reason is public, even for a restricted record: said, in the
    # help too.
    assert "reason are public" in r.stderr
    assert "PUBLIC" in ok("erase", "--help").stdout
    recs = {r["id"]: r for r in ok_json("records", "-d", d, "--json")["records"]}
    assert recs[ids[0]]["erased"] == {"by": out["id"], "reason": "wrong station"}
    assert "data" not in recs[ids[0]] and recs[ids[1]]["data"]["pm25"] == 2.0
    assert recs[out["id"]]["feed"] == "citynode.erasures"
    assert recs[out["id"]]["data"]["reason"] == "wrong station"
    table = ok("records", "-d", d).stdout
    assert "erased" in table and "held" in table
    line = one_line_error(cli("erase", "-d", d, "--id", "ab" * 32, "--reason", "x"))
    assert "not held here" in line
    line = one_line_error(cli("erase", "-d", d, "--id", out["id"], "--reason", "x"))
    assert "never erased" in line
    # Erasing it again would publish a request that erases nothing: refused, and nothing
    # is published (the erasure feed still holds one request).
    line = one_line_error(cli("erase", "-d", d, "--id", ids[1], "--id", ids[0],
                              "--reason", "again"))
    assert f"record {ids[0]} is already erased (by request {out['id']}: wrong station)" in line
    assert record_ids(node_dir, "--feed", "citynode.erasures") == [out["id"]]
    recs = {r["id"]: r for r in ok_json("records", "-d", d, "--json")["records"]}
    assert recs[ids[1]]["data"]["pm25"] == 2.0  # the other record named is untouched
    r = cli("erase", "-d", d, "--id", "xyz", "--reason", "x")
    assert r.exit_code == 2 and "not a record id" in r.output
