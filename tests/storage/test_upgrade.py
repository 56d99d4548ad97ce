"""Upgrades from real databases made by earlier releases (issue 14, point 3).

Each ``tests/fixtures/schema-<N>.db`` was made by the release whose schema was N
(tests/fixtures/make_upgrade_fixture.py) and is never regenerated. Opened with this
code it must migrate, and then hold the same records (each verifying), heads, erased
payloads and checkpoints (each root recomputed from the stored records); a migration
that fails must leave the old file byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from citynode import storage as storage_mod
from citynode.audit import check_storage, stored_key_logs
from citynode.core import checkpoints as cps
from citynode.core.keys import Verifier
from citynode.core.records import decode_record
from citynode.errors import StorageError
from citynode.storage import SCHEMA_VERSION, Storage

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DATABASES = sorted(FIXTURES.glob("schema-*.db"))


def test_there_is_a_fixture_of_this_schema() -> None:
    """A release that changes the schema adds its fixture (make_upgrade_fixture.py), so
    the next release tests the upgrade from it."""
    assert FIXTURES / f"schema-{SCHEMA_VERSION}.db" in DATABASES


@pytest.mark.parametrize("db", DATABASES, ids=lambda p: p.stem)
def test_an_earlier_release_database_opens_migrated_and_intact(db: Path, tmp_path: Path) -> None:
    facts = json.loads(db.with_suffix(".json").read_text())
    path = tmp_path / "citynode.db"
    shutil.copyfile(db, path)
    st = Storage.open(path)
    try:
        with sqlite3.connect(path) as raw:
            assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        report = check_storage(st)
        assert report.problems == [] and report.records == sum(
            h[2] for h in facts["heads"].values())
        # From schema 10 on the fixture's node is cn2: its checkpoints verify under the
        # key log it keeps, and its id prints as cn2 by that log.
        book = stored_key_logs(st)
        heads = {f"{book.name(f.origin)}/{f.feed}": [f.seq, f.head.hex(), f.count]
                 for f in st.feeds()}
        assert heads == facts["heads"]
        verifier = Verifier()
        for f in st.feeds():
            held = st.checkpoints(f.origin, f.feed)
            want = facts["checkpoints"][f"{book.name(f.origin)}/{f.feed}"]
            assert [[size, root.hex()] for size, root, _e in held] == want
            for size, root, env in held:
                assert cps.open_checkpoint(env, verifier=verifier,
                                           key_states=book.state).root == root
                ids = [decode_record(e)[0] for e in st.range(f.origin, f.feed, 1, size, size)]
                assert cps.root_of(hashlib.sha256(b).digest() for b in ids) == root
        kept = {f"{book.name(o)}/{f}": [size, t] for o, f, size, t, _r, _e, _g
                in st.liveness(1000)}
        assert kept == facts.get("liveness", {})  # none before schema 7
        for rid in facts["erased"]:
            env = st.get_envelope(bytes.fromhex(rid))
            assert env is not None and decode_record(env)[2] is None  # still a tombstone
    finally:
        st.close()


@pytest.mark.parametrize("db", DATABASES, ids=lambda p: p.stem)
def test_a_failed_migration_leaves_the_old_file_untouched(
        db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "citynode.db"
    shutil.copyfile(db, path)
    before = path.read_bytes()
    made_at = json.loads(db.with_suffix(".json").read_text())["schema"]

    def broken(db: object) -> None:
        db.conn.execute("CREATE TABLE half_done (x)")  # type: ignore[attr-defined]
        db.conn.execute("DELETE FROM records")  # type: ignore[attr-defined]
        raise RuntimeError("a migration that fails half-way")

    nxt = SCHEMA_VERSION + 1
    monkeypatch.setitem(storage_mod.MIGRATIONS, nxt, broken)
    monkeypatch.setattr(storage_mod, "SCHEMA_VERSION", nxt)
    with pytest.raises((StorageError, RuntimeError)):
        Storage.open(path)
    assert path.read_bytes() == before
    # Nor is anything of it waiting in the write-ahead log to be folded in later.
    with sqlite3.connect(path) as raw:
        # Every migration the file lacked ran in the one transaction that failed.
        assert raw.execute("PRAGMA user_version").fetchone()[0] == made_at
        assert not raw.execute("SELECT 1 FROM sqlite_master WHERE name = 'half_done'"
                               ).fetchall()
        assert raw.execute("SELECT count(*) FROM records").fetchone()[0] > 0
