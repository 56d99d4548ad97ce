"""``citynode backup`` / ``citynode restore``: the file format, and every refusal, on real
data dirs, real SQLite files and real tar files (hostile ones made by hand here).

The end-to-end restore of a stale backup with real ``citynode run`` processes and a
partner up or down is tests/integration/test_backup_restore.py.
"""

from __future__ import annotations

import grp
import hashlib
import io
import json
import os
import pwd
import shutil
import sqlite3
import stat
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from nacl.pwhash import argon2id

from citynode import backup as bk
from citynode.cli import main
from citynode.errors import BackupError
from citynode.identity import load_identity
from citynode.runner import run_lock
from citynode.storage import Storage, backup_database
from tests.conftest import damage_table, make_node_dir

FAST = {"kdf_opslimit": argon2id.OPSLIMIT_MIN, "kdf_memlimit": argon2id.MEMLIMIT_MIN}
PW = "correct horse battery staple"
AIR = "AirQualityObserved"


def air(n: int) -> dict[str, Any]:
    return {"dateObserved": "2026-11-28T07:00:00+07:00", "name": f"station {n}",
            "location": {"type": "Point", "coordinates": [106.8, -6.19]}, "pm25": n}


def cli(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> Result:
    r = CliRunner().invoke(main, list(args), env=env, input=input)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r


def one_line_error(r: Result) -> str:
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A node with 5 records, its backups (plain and with secrets), made once."""
    base = tmp_path_factory.mktemp("backup")
    d = make_node_dir(base, "Jakarta")
    body = "".join(json.dumps(air(i)) + "\n" for i in range(5))
    r = cli("publish", "-d", str(d), "--feed", "air", "--type", AIR, "-", input=body)
    assert r.exit_code == 0, r.output
    plain, sealed = base / "plain.cnbackup", base / "sealed.cnbackup"
    bk.make_backup(d, plain)
    bk.make_backup(d, sealed, passphrase=PW, **FAST)
    return {"dir": d, "plain": plain, "sealed": sealed, "base": base}


def members(file: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(file) as t:
        return t.getmembers()


def manifest_of(file: Path) -> dict[str, Any]:
    with tarfile.open(file) as t:
        f = t.extractfile("manifest.json")
        assert f is not None
        out: dict[str, Any] = json.loads(f.read())
        return out


def pw() -> str:
    return PW


def nothing_beside(parent: Path) -> list[str]:
    """Leftovers of a failed restore beside the data dir (temp dirs)."""
    return [p.name for p in parent.iterdir() if ".restoring-" in p.name]


# ----------------------------------------------------------------------------- the format


def test_backup_file_holds_a_manifest_first_and_every_checksum(made: dict[str, Path]) -> None:
    d, plain = made["dir"], made["plain"]
    names = [m.name for m in members(plain)]
    assert names == ["manifest.json", "node.toml", "tls/cert.pem", "citynode.db"]
    assert stat.S_IMODE(plain.stat().st_mode) == 0o600
    assert not plain.with_name(plain.name + ".part").exists()
    m = manifest_of(plain)
    ident = load_identity(d)
    assert m["format"] == "citynode-backup" and m["format_version"] == 1
    assert m["node_id"] == ident.node_id and m["node_name"] == "Jakarta"
    assert m["records"] == 5 and m["secrets"] is False and m["schema_version"] >= 3
    with tarfile.open(plain) as t:
        for name, f in m["files"].items():
            data = t.extractfile(name).read()  # type: ignore[union-attr]
            assert (len(data), hashlib.sha256(data).hexdigest()) == (f["size"], f["sha256"])
    with tarfile.open(plain) as t:
        assert t.extractfile("node.toml").read() == (d / "node.toml").read_bytes()  # type: ignore[union-attr]
    # The secrets appear in the sealed backup only, and never in clear.
    sealed_names = [mm.name for mm in members(made["sealed"])]
    assert sealed_names == ["manifest.json", "node.toml", "tls/cert.pem", "secrets.sealed",
                            "citynode.db"]
    raw = made["sealed"].read_bytes()
    for secret in ("node.key", "operator.token", "tls/key.pem"):
        assert (d / secret).read_bytes().strip() not in raw
    assert bk.verify_backup(made["sealed"], passphrase=pw).secrets is True


def test_online_copy_is_one_snapshot_while_another_connection_writes(tmp_path: Path) -> None:
    """Writes between the copy's steps neither restart it nor mix two states into it."""
    d = make_node_dir(tmp_path, "Lima")
    src = d / "citynode.db"
    st = Storage.open(src)
    try:
        for i in range(300):  # a few hundred pages of meta rows
            st.set_meta(f"pad{i}", os.urandom(4000)).result()
        stop = threading.Event()
        writes = 0

        def writer() -> None:
            nonlocal writes
            while not stop.is_set():
                st.set_meta(f"w{writes}", os.urandom(2000)).result()
                writes += 1

        seen: list[tuple[int, int]] = []

        def progress(done: int, total: int) -> None:
            seen.append((done, total))
            if len(seen) == 2:
                t.start()
            if len(seen) > 2:
                stop.wait(0.01)  # give the writer time between steps
            if len(seen) > 2000:  # restarting again and again: end it, and fail below
                stop.set()

        t = threading.Thread(target=writer)
        try:
            copy = backup_database(src, tmp_path / "copy.db", progress, pages_per_step=8)
        finally:
            stop.set()
            if t.is_alive():
                t.join()
    finally:
        st.close()
    assert writes > 0 and len(seen) > 10
    dones = [s[0] for s in seen]
    assert dones == sorted(dones) and seen[-1][0] == seen[-1][1]  # never restarted
    assert len({s[1] for s in seen}) == 1  # one snapshot: its size never changed
    c = sqlite3.connect(tmp_path / "copy.db")
    try:
        assert c.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        n = c.execute("SELECT count(*) FROM meta WHERE key LIKE 'w%'").fetchone()[0]
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    finally:
        c.close()
    assert n == 0  # the writes began after the snapshot: none is in it
    assert copy.schema_version >= 3 and copy.records == 0
    assert stat.S_IMODE((tmp_path / "copy.db").stat().st_mode) == 0o600


# ----------------------------------------------------------------------------- restores


def test_restore_with_secrets_into_a_new_machines_empty_dir(made: dict[str, Path],
                                                            tmp_path: Path) -> None:
    new = tmp_path / "elsewhere" / "jakarta"
    out = bk.restore_backup(made["sealed"], new, passphrase=pw)
    assert out.moved_aside is None and not out.secrets_from_dir
    assert load_identity(new).node_id == load_identity(made["dir"]).node_id
    assert stat.S_IMODE(new.stat().st_mode) == 0o700
    assert stat.S_IMODE((new / "tls").stat().st_mode) == 0o700
    for secret in ("node.key", "operator.token", "tls/key.pem"):
        assert stat.S_IMODE((new / secret).stat().st_mode) == 0o600
        assert (new / secret).read_bytes() == (made["dir"] / secret).read_bytes()
    st = Storage.open(new / "citynode.db")
    try:
        assert st.count() == 5
        why = st.restored()
    finally:
        st.close()
    assert why is not None and str(made["sealed"]) in why and "made at" in why
    assert nothing_beside(new.parent) == []


def test_restore_without_secrets_keeps_the_dirs_key_and_moves_the_old_files_aside(
        made: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "jakarta"
    shutil.copytree(made["dir"], d)
    (d / "citynode.db").write_bytes(b"damaged beyond repair")
    out = bk.restore_backup(made["plain"], d, replace=True, passphrase=pw,
                            now=lambda: 1_800_000_000.0)
    assert out.secrets_from_dir
    assert out.moved_aside == tmp_path / "jakarta.replaced-20270115T080000Z"
    assert (out.moved_aside / "citynode.db").read_bytes() == b"damaged beyond repair"
    assert load_identity(d).node_id == load_identity(made["dir"]).node_id
    st = Storage.open(d / "citynode.db")
    try:
        assert st.count() == 5 and st.restored() is not None
    finally:
        st.close()
    # Again: the first aside dir is kept, the second gets another name.
    out2 = bk.restore_backup(made["plain"], d, replace=True, now=lambda: 1_800_000_000.0)
    assert out2.moved_aside is not None and out2.moved_aside != out.moved_aside
    assert out.moved_aside.exists() and out2.moved_aside.exists()


def test_a_passphrase_sealed_node_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node key sealed with its own passphrase stays sealed in the backup; naming the
    node needs that passphrase (CITYNODE_PASSPHRASE), as starting the node does."""
    from citynode.datadir import init_data_dir
    from citynode.errors import KeyFileError

    d = tmp_path / "sealed-node"
    ident, _ = init_data_dir(d, name="Seoul", listen="127.0.0.1:18999", passphrase="k",
                             **FAST)
    with pytest.raises(KeyFileError, match="CITYNODE_PASSPHRASE"):
        bk.make_backup(d, tmp_path / "b.cnbackup")
    monkeypatch.setenv("CITYNODE_PASSPHRASE", "k")
    bk.make_backup(d, tmp_path / "b.cnbackup", passphrase=PW, **FAST)
    new = tmp_path / "new"
    bk.restore_backup(tmp_path / "b.cnbackup", new, passphrase=pw)
    assert (new / "node.key").read_bytes() == (d / "node.key").read_bytes()
    assert b"argon2id" in (new / "node.key").read_bytes()  # still sealed with its own
    monkeypatch.delenv("CITYNODE_PASSPHRASE")
    with pytest.raises(KeyFileError, match="CITYNODE_PASSPHRASE") as e:
        bk.restore_backup(tmp_path / "b.cnbackup", tmp_path / "new2", passphrase=pw)
    assert ".restoring-" not in str(e.value)  # names the data dir, not a temporary one
    assert not (tmp_path / "new2").exists() and nothing_beside(tmp_path) == []
    assert load_identity(new, "k").node_id == ident.node_id


# ----------------------------------------------------------------------------- refusals


def refused(reason: str, file: Path, d: Path, **kw: Any) -> BackupError:
    before = sorted(os.listdir(d)) if d.exists() else None
    with pytest.raises(BackupError) as e:
        bk.restore_backup(file, d, **kw)
    assert e.value.reason == reason, str(e.value)
    assert (sorted(os.listdir(d)) if d.exists() else None) == before  # untouched
    assert nothing_beside(d.parent) == []
    return e.value


def test_refuses_a_running_nodes_dir(made: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "jakarta"
    shutil.copytree(made["dir"], d)
    with run_lock(d):
        err = refused("running", made["sealed"], d, replace=True, passphrase=pw)
        assert "running node" in str(err) and "stop it" in str(err)
        r = cli("restore", "-d", str(d), "--replace", str(made["sealed"]),
                env={bk.PASSPHRASE_ENV: PW})
        assert "running node" in one_line_error(r)


def test_refuses_a_non_empty_dir_without_replace(made: dict[str, Path],
                                                 tmp_path: Path) -> None:
    d = tmp_path / "jakarta"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    err = refused("not_empty", made["sealed"], d, passphrase=pw)
    assert "--replace" in str(err)


def test_plain_backup_needs_the_nodes_key_in_the_dir(made: dict[str, Path],
                                                     tmp_path: Path) -> None:
    err = refused("no_key", made["plain"], tmp_path / "fresh")
    assert "--with-secrets" in str(err) and "node.key" in str(err)
    other = make_node_dir(tmp_path, "Other")
    err = refused("wrong_node", made["plain"], other, replace=True)
    assert load_identity(made["dir"]).node_id in str(err)


def test_wrong_passphrase(made: dict[str, Path], tmp_path: Path) -> None:
    err = refused("wrong_passphrase", made["sealed"], tmp_path / "new",
                  passphrase=lambda: "not it")
    assert "wrong passphrase" in str(err)
    r = cli("restore", "-d", str(tmp_path / "new"), str(made["sealed"]),
            env={bk.PASSPHRASE_ENV: "not it"})
    assert "wrong passphrase" in one_line_error(r)
    assert not (tmp_path / "new").exists()


def test_sealed_backup_without_a_passphrase_on_a_pipe(made: dict[str, Path],
                                                      tmp_path: Path) -> None:
    r = cli("restore", "-d", str(tmp_path / "new"), str(made["sealed"]), input="")
    assert bk.PASSPHRASE_ENV in one_line_error(r)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("cut", ["manifest", "db", "end"])
def test_truncated_file(made: dict[str, Path], tmp_path: Path, cut: str) -> None:
    data = made["sealed"].read_bytes()
    db = next(m for m in members(made["sealed"]) if m.name == "citynode.db")
    # "end": the last byte of the database missing (the tar's zero blocks after it
    # carry nothing: a file cut there is whole)
    at = {"manifest": 700, "db": len(data) // 2, "end": db.offset_data + db.size - 1}[cut]
    bad = tmp_path / "cut.cnbackup"
    bad.write_bytes(data[:at])
    err = refused("truncated", bad, tmp_path / "new", passphrase=pw)
    assert "truncated" in str(err)


def test_flipped_byte_in_the_database(made: dict[str, Path], tmp_path: Path) -> None:
    data = bytearray(made["plain"].read_bytes())
    db = next(m for m in members(made["plain"]) if m.name == "citynode.db")
    data[db.offset_data + db.size // 2] ^= 0x01
    bad = tmp_path / "flipped.cnbackup"
    bad.write_bytes(bytes(data))
    d = tmp_path / "jakarta"
    shutil.copytree(made["dir"], d)
    err = refused("checksum", bad, d, replace=True)
    assert "checksum mismatch in citynode.db" in str(err)
    r = cli("restore", "-d", str(d), "--replace", str(bad))
    assert "checksum mismatch" in one_line_error(r)


def test_flipped_byte_in_the_manifest(made: dict[str, Path], tmp_path: Path) -> None:
    data = bytearray(made["plain"].read_bytes())
    m = members(made["plain"])[0]
    text = bytes(data[m.offset_data: m.offset_data + m.size])
    at = m.offset_data + text.index(b'"Jakarta"') + 1
    data[at] ^= 0x20  # "jakarta": still valid JSON, another node name
    bad = tmp_path / "flipped.cnbackup"
    bad.write_bytes(bytes(data))
    err = refused("checksum", bad, tmp_path / "new", passphrase=pw)
    assert "manifest" in str(err)


def test_not_a_backup(tmp_path: Path) -> None:
    bad = tmp_path / "random.bin"
    bad.write_bytes(os.urandom(5000))
    refused("not_a_backup", bad, tmp_path / "new")
    other = tmp_path / "other.tar"
    with tarfile.open(other, "w") as t:
        info = tarfile.TarInfo("hello.txt")
        info.size = 2
        t.addfile(info, io.BytesIO(b"hi"))
    refused("not_a_backup", other, tmp_path / "new")


def test_a_newer_backup_format_says_to_upgrade(made: dict[str, Path]) -> None:
    m = manifest_of(made["plain"])
    m.pop("checksum")
    m["format_version"] = 2
    with pytest.raises(BackupError) as e:
        bk.parse_manifest(json.dumps(m).encode(), "x.cnbackup")
    assert e.value.reason == "newer_format" and "newer citynode" in str(e.value)


def test_a_newer_database_schema_says_to_upgrade(made: dict[str, Path],
                                                  tmp_path: Path) -> None:
    bad = tmp_path / "future.cnbackup"
    with tarfile.open(made["plain"]) as t:
        parts = [(m, t.extractfile(m).read()) for m in t.getmembers()]  # type: ignore[union-attr]
    m = json.loads(parts[0][1])
    m.pop("checksum")
    m["schema_version"] += 1
    body = bk.render_manifest(bk.parse_manifest(json.dumps({**m, "checksum": hashlib.sha256(
        json.dumps(m, sort_keys=True, separators=(",", ":")).encode()).hexdigest()}).encode(),
        "x"))
    with tarfile.open(bad, "w") as t:
        for info, data in [(parts[0][0], body), *parts[1:]]:
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    err = refused("newer_format", bad, tmp_path / "new")
    assert "upgrade citynode" in str(err)


def test_progress_bars_one_per_phase(capsys: pytest.CaptureFixture[str]) -> None:
    from citynode.cli import _Bars

    with _Bars(show=True) as bars:
        bars.update("copying database", 3, 10)
        bars.update("copying database", 10, 10)
        bars.update("writing", 500, 1000)
        assert bars.bar is not None and bars.bar.pos == 500
    err = capsys.readouterr().err
    assert "copying database" in err and "writing" in err
    with _Bars(show=False) as bars:
        bars.update("writing", 1, 2)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------ hostile tar members


def craft(path: Path, made: dict[str, Path], extra: tarfile.TarInfo,
          extra_data: bytes = b"", *, listed: bool = False) -> None:
    """A backup whose manifest is valid (checksummed) and lists the real members, with
    ``extra`` inserted after the manifest (and listed in it, if ``listed``)."""
    with tarfile.open(made["plain"]) as t:
        parts = [(m, t.extractfile(m).read()) for m in t.getmembers()]  # type: ignore[union-attr]
    m = json.loads(parts[0][1])
    m.pop("checksum")
    if listed:
        m["files"][extra.name] = {"size": len(extra_data),
                                  "sha256": hashlib.sha256(extra_data).hexdigest()}
    body = json.dumps({**m, "checksum": hashlib.sha256(json.dumps(
        m, sort_keys=True, separators=(",", ":")).encode()).hexdigest()}).encode()
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as t:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(body)
        t.addfile(info, io.BytesIO(body))
        extra.size = len(extra_data) if extra.isreg() else 0
        t.addfile(extra, io.BytesIO(extra_data) if extra.isreg() else None)
        for info, data in parts[1:]:
            t.addfile(info, io.BytesIO(data))


def _info(name: str, type: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    i = tarfile.TarInfo(name)
    i.type, i.linkname = type, linkname
    return i


@pytest.mark.parametrize(("label", "member", "words"), [
    ("absolute", _info("/tmp/citynode-evil"), "absolute path"),
    ("dotdot", _info("../evil"), "climbs out"),
    ("dotdot deep", _info("tls/../../evil"), "climbs out"),
    ("symlink", _info("node.toml", tarfile.SYMTYPE, "/etc/passwd"), "is a link"),
    ("hardlink", _info("tls/cert.pem", tarfile.LNKTYPE, "/etc/passwd"), "is a link"),
    ("char device", _info("citynode.db", tarfile.CHRTYPE), "device"),
    ("fifo", _info("node.toml", tarfile.FIFOTYPE), "device or a pipe"),
    ("directory", _info("tls", tarfile.DIRTYPE), "not a regular file"),
    ("unlisted", _info("run.sh"), "unexpected member"),
    ("twice", _info("node.toml"), "unexpected member"),
])
def test_hostile_members_are_refused(made: dict[str, Path], tmp_path: Path, label: str,
                                     member: tarfile.TarInfo, words: str) -> None:
    bad = tmp_path / "hostile.cnbackup"
    data = b"#!/bin/sh\n" if member.isreg() else b""
    if label == "twice":
        data = (made["dir"] / "node.toml").read_bytes()
    craft(bad, made, member, data)
    err = refused("unsafe_member", bad, tmp_path / "sub" / "new")
    assert words in str(err), str(err)
    assert not (tmp_path / "evil").exists() and not Path("/tmp/citynode-evil").exists()


def test_a_huge_header_is_refused_before_it_is_read_whole(made: dict[str, Path],
                                                         tmp_path: Path) -> None:
    """tarfile reads a pax header whole: one of 8 MiB before the manifest is refused
    at the bound (1 MiB and some), not read into memory."""
    bad = tmp_path / "pax.cnbackup"
    with tarfile.open(made["plain"]) as t:
        parts = [(m, t.extractfile(m).read()) for m in t.getmembers()]  # type: ignore[union-attr]
    with tarfile.open(bad, "w", format=tarfile.PAX_FORMAT) as t:
        for info, data in parts:
            if info.name == "manifest.json":
                info.pax_headers = {"comment": "x" * (8 * 1024 * 1024)}
            t.addfile(info, io.BytesIO(data))
    err = refused("unsafe_member", bad, tmp_path / "new")
    assert "holds more than" in str(err)


def test_a_member_larger_than_its_manifest_says(made: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "big.cnbackup"
    with tarfile.open(made["plain"]) as t:
        parts = [(m, t.extractfile(m).read()) for m in t.getmembers()]  # type: ignore[union-attr]
    with tarfile.open(bad, "w") as t:
        for info, data in parts:
            if info.name == "node.toml":
                data += b"\n# more\n"
                info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    err = refused("checksum", bad, tmp_path / "new")
    assert "its manifest says" in str(err)


def test_a_damaged_database_with_good_checksums(made: dict[str, Path], tmp_path: Path) -> None:
    """A backup made of an already damaged database: refused by SQLite's quick_check."""
    d = tmp_path / "jakarta"
    shutil.copytree(made["dir"], d)
    damage_table(d / "citynode.db", "chains")
    bad = tmp_path / "damaged.cnbackup"
    try:
        bk.make_backup(d, bad)
    except Exception as exc:  # the copy itself may meet the damage: also a clear refusal
        pytest.fail(f"backup of a damaged file raised {exc!r}")
    err = refused("damaged_db", bad, d, replace=True)
    assert "damaged" in str(err)


def test_secrets_of_another_backup_are_refused(made: dict[str, Path], tmp_path: Path) -> None:
    """The sealed secrets name their backup: moved into another one, they are refused."""
    other = tmp_path / "other.cnbackup"
    bk.make_backup(made["dir"], other, passphrase=PW, **FAST)
    with tarfile.open(made["sealed"]) as t:
        stolen = t.extractfile("secrets.sealed").read()  # type: ignore[union-attr]
    with tarfile.open(other) as t:
        parts = [(m, t.extractfile(m).read()) for m in t.getmembers()]  # type: ignore[union-attr]
    m = json.loads(parts[0][1])
    m.pop("checksum")
    m["files"]["secrets.sealed"] = {"size": len(stolen),
                                    "sha256": hashlib.sha256(stolen).hexdigest()}
    body = json.dumps({**m, "checksum": hashlib.sha256(json.dumps(
        m, sort_keys=True, separators=(",", ":")).encode()).hexdigest()}).encode()
    bad = tmp_path / "mixed.cnbackup"
    with tarfile.open(bad, "w") as t:
        for info, data in [(parts[0][0], body), *parts[1:]]:
            if info.name == "secrets.sealed":
                data = stolen
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    err = refused("wrong_node", bad, tmp_path / "new", passphrase=pw)
    assert "another backup" in str(err)


# ----------------------------------------------------------------------------- the CLI


def test_cli_backup_and_restore(made: dict[str, Path], tmp_path: Path) -> None:
    file = tmp_path / "cli.cnbackup"
    r = cli("backup", "-d", str(made["dir"]), str(file))
    assert r.exit_code == 0, r.output
    assert "5 records" in r.stdout and "MB in" in r.stdout and "no secrets" in r.stdout
    d = tmp_path / "jakarta"
    shutil.copytree(made["dir"], d)
    r = cli("restore", "-d", str(d), str(file))
    assert "--replace" in one_line_error(r)
    r = cli("restore", "-d", str(d), "--replace", str(file))
    assert r.exit_code == 0, r.output
    assert "restored Jakarta" in r.stdout and "5 records" in r.stdout
    assert "--accept-fork-risk" in r.stdout and "partner confirms" in r.stdout
    assert "jakarta.replaced-" in r.stdout


def test_cli_backup_refusals(made: dict[str, Path], tmp_path: Path) -> None:
    r = cli("backup", "-d", str(tmp_path / "nothing"), str(tmp_path / "x.cnbackup"))
    assert "not a citynode data dir" in one_line_error(r)
    r = cli("backup", "-d", str(made["dir"]), str(tmp_path / "no" / "x.cnbackup"))
    assert "is not a directory" in one_line_error(r)
    r = cli("backup", "-d", str(made["dir"]), "--with-secrets", str(tmp_path / "x.cnbackup"),
            input="one\ntwo\n")  # the two passphrases differ: asked again, then no input
    assert r.exit_code != 0 and not (tmp_path / "x.cnbackup").exists()
    assert list(tmp_path.iterdir()) == []  # no .part, no database copy left behind


def test_a_root_restore_keeps_the_owner_of_the_data_dir(made: dict[str, Path],
                                                        tmp_path: Path) -> None:
    """Run as root (sudo) into a service user's data dir, a restore gives the restored
    files that user, so the unit's ``User=`` can still run the node."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("changing owners needs root, and CI runs as root")
        pytest.skip("changing owners needs root (CI runs this test)")
    nobody = pwd.getpwnam("nobody")
    d = tmp_path / "jakarta"
    shutil.copytree(made["dir"], d)
    for p in [d, *d.rglob("*")]:
        os.chown(p, nobody.pw_uid, nobody.pw_gid)
    file = tmp_path / "cli.cnbackup"
    assert cli("backup", "-d", str(made["dir"]), str(file)).exit_code == 0
    r = cli("restore", "-d", str(d), "--replace", str(file))
    assert r.exit_code == 0, r.output
    owners = {(p.lstat().st_uid, p.lstat().st_gid) for p in [d, *d.rglob("*")]}
    assert owners == {(nobody.pw_uid, nobody.pw_gid)}
    assert f"owned by nobody:{grp.getgrgid(nobody.pw_gid).gr_name}" in r.stdout
    # Into a new dir under a root-owned parent: left to root, and the exact line said.
    new = tmp_path / "root-owned" / "jakarta"
    new.parent.mkdir()
    r = cli("restore", "-d", str(new), str(made["sealed"]), env={bk.PASSPHRASE_ENV: PW})
    assert r.exit_code == 0, r.output
    assert new.stat().st_uid == 0
    assert f"chown -R citynode:citynode {new}" in r.stdout
