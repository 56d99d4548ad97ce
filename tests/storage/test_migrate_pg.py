"""Moving a node from SQLite to PostgreSQL: everything copied, cursors and ids kept,
an interrupted copy resumed, the database refused until complete; then `citynode
check` verifies every record on PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from citynode import storage_pg
from citynode.errors import StorageError
from citynode.storage import PartnerRow, Storage
from citynode.storage_pg import PgStorage, copy_from_sqlite
from tests.storage.test_storage import T0, A, B, chain, make


def fill(st: Storage) -> None:
    """A bit of every table: two origins' feeds (a Merkle subtree, locations, pruned
    payloads), partners, a fork proof, a checkpoint, meta, the rejected log, a card
    history, a bridge's claims and dead letters."""
    air = chain(0, "air", 300)
    for i in range(0, 300, 60):
        st.append(air[i: i + 60]).result(5)
    located = [make(1, "geo", 1, None, lonlat=(106.8, -6.2))]
    located.append(make(1, "geo", 2, located[0].id, lonlat=(2.35, 48.85)))
    st.append(located).result(5)
    st.prune(A, "air", T0 + 10).result(5)  # payloads of seqs 1..9 dropped
    st.put_partner(PartnerRow("cn1partner", b"\x07" * 32, "https://p.example", "P", None,
                              None, T0)).result(5)
    st.add_fork_proof(B, "geo", 2, "fork", b"proof" * 1000, "cn1partner", T0).result(5)
    st.put_checkpoint(A, "air", 256, b"r" * 32, b"env").result(5)
    st.set_meta("card:aa", b"card").result(5)
    for i in range(3):
        st.log_rejected("peer", "bad_signature", f"detail {i}", T0 + i).result(5)
    st.add_card_history(A, T0, b"card-envelope").result(5)
    st.put_liveness(A, "air", 300, T0 + 300_000, b"r" * 32, b"statement", T0).result(5)
    st.bridge_claim("mqtt", [(b"k" * 32, "air", 3)], T0, 3600_000).result(5)
    st.bridge_dead_letter("mqtt", b"d" * 32, "air", "topic/x", "bad_payload", "why",
                          b"excerpt", 7, T0, 10).result(5)


def same(a: Storage, b: Storage) -> None:
    assert a.heads() == b.heads()
    assert a.feeds() == b.feeds()
    assert a.query(limit=10_000) == b.query(limit=10_000)  # rowids, envelopes, tombstones
    assert a.count() == b.count() and a.space() == b.space()
    assert a.tombstones() == b.tombstones() == (0, 9)
    assert a.partners() == b.partners()
    assert a.fork_proofs() == b.fork_proofs()
    assert a.checkpoints(A, "air") == b.checkpoints(A, "air")
    assert a.cards(10) == b.cards(10)
    assert a.rejected() == b.rejected()
    assert a.card_history(A) == b.card_history(A)
    assert a.bridge_lookup([b"k" * 32, b"d" * 32]) == b.bridge_lookup([b"k" * 32, b"d" * 32])
    assert a.bridge_dead_letters() == b.bridge_dead_letters()
    assert a.tree(A, "air", 300).root() == b.tree(A, "air", 300).root()
    assert a.liveness(10) == b.liveness(10) != []
    # Schema v12's running maxima of time, as the source's writer computed them.
    bounds = "SELECT rowid, tmax, tmax_all FROM records ORDER BY rowid"
    assert a._all(bounds) == [tuple(r) for r in b._all(bounds)]


def test_every_table_is_copied(tmp_path: Path) -> None:
    """A table added to the schema (storage.MIGRATIONS) must be copied too."""
    from tests.storage.test_storage_pg import columns_sqlite

    with Storage.open(tmp_path / "citynode.db"):
        pass
    copied = {"chains", "types", "records", "payloads", *storage_pg._SMALL_TABLES}
    assert set(columns_sqlite(tmp_path / "citynode.db")) == copied


def test_an_interrupted_copy_resumes_and_the_copy_is_the_same_node(
        tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    src = Storage.open(tmp_path / "citynode.db")
    try:
        fill(src)
        monkeypatch.setattr(storage_pg, "_COPY_CHUNK", 100)
        calls: list[tuple[int, int]] = []

        def cut(done: int, total: int) -> None:
            calls.append((done, total))
            if len(calls) == 2:
                raise KeyboardInterrupt  # the operator's ^C, or a crash

        with pytest.raises(KeyboardInterrupt):
            copy_from_sqlite(src, pg_url, cut)
        assert calls == [(100, 302), (200, 302)]
        with pytest.raises(StorageError, match="unfinished copy"):
            PgStorage.open_url(pg_url)
        seen: list[tuple[int, int]] = []
        assert copy_from_sqlite(src, pg_url, lambda d, t: seen.append((d, t))) == 102
        assert seen == [(300, 302), (302, 302)]
        with PgStorage.open_url(pg_url) as dst:
            same(src, dst)
            # The copy goes on as a node's database: chains, ids and sequences.
            more = chain(0, "air", 302)[300:]
            dst.append(more).result(5)
            assert dst.head(A, "air") == (302, more[-1].id)
            dst.log_rejected("peer", "bad", "after", T0).result(5)
            assert dst.rejected(1)[0].id == src.rejected(1)[0].id + 1
            assert dst.add_fork_proof(A, "air", 1, "fork", b"other", None, T0).result(5)
            dst.append([make(2, "new", 1, None)]).result(5)  # a new chain id
            assert dst.quick_check() == []  # the maxima went on from the copied ones
        # Once complete, a second copy into it is refused (not a copy under way).
        with pytest.raises(StorageError, match="not a copy under way"):
            copy_from_sqlite(src, pg_url)
    finally:
        src.close()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "citynode", *args], capture_output=True,
                          text=True, timeout=120)


def test_storage_migrate_then_check_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    from citynode.cluster import set_config
    from tests.conftest import make_node_dir

    d = make_node_dir(tmp_path, "Jakarta")
    with Storage.open(d / "citynode.db") as st:
        st.append(chain(0, "air", 40)).result(5)
    before = cli("check", "-d", str(d), "--json")
    assert before.returncode == 0, before.stderr
    done = cli("storage", "migrate", "-d", str(d), "--to", pg_url)
    assert done.returncode == 0, done.stderr
    assert "copied 40 record(s)" in done.stdout and "[storage]" in done.stdout
    set_config(d / "node.toml", "storage", "url", pg_url)
    after = cli("check", "-d", str(d), "--json")
    assert after.returncode == 0, after.stderr
    report: dict[str, Any] = json.loads(after.stdout)
    assert report["ok"] and report["records"] == 40
    assert report["records"] == json.loads(before.stdout)["records"]
    again = cli("storage", "migrate", "-d", str(d), "--to", pg_url)
    assert again.returncode != 0 and "not a copy under way" in again.stderr


def test_backup_of_a_node_on_postgresql_points_to_postgresql_tools(
        tmp_path: Path, pg_url: str) -> None:
    from citynode.backup import make_backup
    from citynode.cluster import set_config
    from citynode.errors import BackupError
    from tests.conftest import make_node_dir

    d = make_node_dir(tmp_path, "Jakarta")
    set_config(d / "node.toml", "storage", "url", pg_url)
    with pytest.raises(BackupError, match="pg_dump") as err:
        make_backup(d, tmp_path / "node.backup")
    assert err.value.reason == "not_sqlite"
    assert not (tmp_path / "node.backup").exists()


def test_a_backup_restored_onto_postgresql_stays_marked_restored(
        tmp_path: Path, pg_url: str) -> None:
    """Restoring a node whose records go to PostgreSQL: `citynode restore` (the
    backup's SQLite database, checked, marked restored), then `citynode storage migrate`
    into PostgreSQL. The mark moves with the records (the node waits for its partners
    before signing), and `citynode check` passes on PostgreSQL."""
    from citynode.backup import make_backup, restore_backup
    from citynode.cluster import set_config
    from tests.conftest import make_node_dir

    d = make_node_dir(tmp_path, "Jakarta")
    with Storage.open(d / "citynode.db") as st:
        st.append(chain(0, "air", 30)).result(5)
    from nacl.pwhash import argon2id

    make_backup(d, tmp_path / "node.backup", passphrase="pw",
                kdf_opslimit=argon2id.OPSLIMIT_MIN, kdf_memlimit=argon2id.MEMLIMIT_MIN)
    target = tmp_path / "restored"  # a new machine's empty data dir
    restore_backup(tmp_path / "node.backup", target, passphrase=lambda: "pw")
    done = cli("storage", "migrate", "-d", str(target), "--to", pg_url)
    assert done.returncode == 0, done.stderr
    set_config(target / "node.toml", "storage", "url", pg_url)
    with PgStorage.open_url(pg_url) as st:
        assert st.count() == 30
        why = st.restored()
        assert why is not None and "citynode restore" in why, why
    checked = cli("check", "-d", str(target), "--json")
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["records"] == 30


def test_a_copy_is_not_resumed_from_a_source_that_changed_since_it_began(
        tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The node ran between the interrupted copy and its resumption (it published, or
    pruned): finishing the copy would leave records past their feed's head."""
    src = Storage.open(tmp_path / "citynode.db")
    try:
        fill(src)
        monkeypatch.setattr(storage_pg, "_COPY_CHUNK", 100)

        def cut(done: int, total: int) -> None:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            copy_from_sqlite(src, pg_url, cut)
        air = chain(0, "air", 310)
        src.append(air[300:]).result(5)  # published meanwhile
        with pytest.raises(StorageError, match="other records"):
            copy_from_sqlite(src, pg_url)
        with pytest.raises(StorageError, match="unfinished copy"):
            PgStorage.open_url(pg_url)  # still refused: never a damaged database
    finally:
        src.close()


def test_the_source_fingerprint_sees_a_prune_and_an_append(tmp_path: Path) -> None:
    with Storage.open(tmp_path / "citynode.db") as src:
        fill(src)
        first = storage_pg.source_fingerprint(src)
        assert storage_pg.source_fingerprint(src) == first
        src.prune(A, "air", T0 + 20).result(5)
        pruned = storage_pg.source_fingerprint(src)
        assert pruned != first
        src.append(chain(0, "air", 301)[300:]).result(5)
        assert storage_pg.source_fingerprint(src) not in (first, pruned)
