"""Shared fixtures: real nodes in temporary data dirs, real HTTPS on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nacl.pwhash import argon2id

from citynode.cluster import Cluster, free_ports, set_config
from citynode.datadir import init_data_dir
from citynode.node import Node
from citynode.transport.server import serve


def key_states(*dirs: Path) -> Callable[[bytes], Any]:
    """The key states of the cn2 nodes of these data dirs (their ``keylog`` files, as
    they are now): what a verifier needs beside a record of a cn2 origin."""
    from citynode.core.keybook import KeyBook
    from citynode.core.keys import Verifier
    from citynode.identity import keylog_identity

    book = KeyBook()
    for d in dirs:
        log = (d / "keylog").read_bytes()
        book.restore(keylog_identity(log), log, verifier=Verifier())
    return book.state


FAST_KDF = {"kdf_opslimit": argon2id.OPSLIMIT_MIN, "kdf_memlimit": argon2id.MEMLIMIT_MIN}


def make_node_dir(base: Path, name: str, port: int | None = None,
                  settings: dict[tuple[str, str], Any] | None = None,
                  next_key_on_disk: bool = False) -> Path:
    """``citynode init`` a data dir (fast KDF) and apply config settings.
    ``next_key_on_disk``: as ``init --next-key-on-disk`` (the node rotates unattended)."""
    port = port or free_ports(1)[0]
    d = base / name.lower()
    init_data_dir(d, name=name, listen=f"127.0.0.1:{port}", next_key_on_disk=next_key_on_disk,
                  **FAST_KDF)
    for (section, key), value in (settings or {}).items():
        set_config(d / "node.toml", section, key, value)
    return d


class InProc:
    """A node running in the test's own event loop, serving real HTTPS."""

    def __init__(self, node: Node, runner: Any) -> None:
        self.node = node
        self.runner = runner
        self.port = node.config.node.listen_port
        scheme = "https" if node.config.tls.enabled else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                ssl=aiohttp.Fingerprint(node.identity.cert_fingerprint)
            ),
            timeout=aiohttp.ClientTimeout(total=30),
        )

    @property
    def token(self) -> str:
        return self.node.identity.token

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def close(self) -> None:
        await self.session.close()
        await self.runner.cleanup()
        await self.node.stop()


@pytest.fixture
async def inproc(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[InProc]]]:
    """Factory: ``await inproc("Jakarta", settings={...})`` -> a running in-process node."""
    made: list[InProc] = []

    async def make(name: str, settings: dict[tuple[str, str], Any] | None = None,
                   feeds: dict[str, str] | None = None,
                   next_key_on_disk: bool = False) -> InProc:
        """``feeds``: feed name -> access level, written to node.toml (so the node's card
        lists them, as it lists every feed it publishes through its own API).
        ``next_key_on_disk``: the node can rotate unattended (``keychanges.rotate()``)."""
        d = make_node_dir(tmp_path, name, settings=settings,
                          next_key_on_disk=next_key_on_disk)
        with open(d / "node.toml", "a") as f:
            for feed, level in (feeds or {}).items():
                f.write(f'\n[feeds.{feed}]\naccess = "{level}"\n')
        node = Node.load(d)
        await node.start()
        runner = await serve(node, host="127.0.0.1", port=node.config.node.listen_port)
        n = InProc(node, runner)
        made.append(n)
        return n

    yield make
    for n in reversed(made):
        await n.close()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs mounted for this test (root only: CI runs as root)."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("mounting a small tmpfs needs root, and CI runs as root")
        pytest.skip("mounting a small tmpfs needs root (CI runs this test)")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """Real ``citynode run`` processes; all stopped at the end of the test."""
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        await c.close()
        c.stop()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20.0,
                     interval: float = 0.1) -> None:
    """Wait until ``check()`` is true; fail the test with a clear message if it never is."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if await check():
            return
        if loop.time() > deadline:
            pytest.fail(f"condition not reached within {timeout} s")
        await asyncio.sleep(interval)


def damage_table(db: Path, table: str = "records", *, where: str = "root") -> None:
    """Overwrite one b-tree page of ``table`` in the SQLite file ``db`` with garbage, as a
    failing disk would (after folding the write-ahead log in, so the damage is what every
    reader sees): its root page, or with ``where="middle"`` the middle child of its root
    (a leaf, for a table of a few hundred records: lookups of the first and last rows
    still work, a full scan meets it). The file header and other pages are left alone."""
    import sqlite3
    import struct

    c = sqlite3.connect(db)
    try:
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = c.execute("PRAGMA page_size").fetchone()[0]
        (page,) = c.execute("SELECT rootpage FROM sqlite_master WHERE type = 'table' "
                            "AND name = ?", (table,)).fetchone()
    finally:
        c.close()
    with open(db, "r+b") as f:
        if where == "middle":
            f.seek((page - 1) * page_size)
            root = f.read(page_size)
            assert root[0] == 0x05, "the root is not an interior table page: add rows"
            (cells,) = struct.unpack(">H", root[3:5])
            (cell,) = struct.unpack(">H", root[12 + 2 * (cells // 2): 14 + 2 * (cells // 2)])
            (page,) = struct.unpack(">I", root[cell: cell + 4])
        f.seek((page - 1) * page_size)
        f.write(b"\xa5" * page_size)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """A real PostgreSQL server for this test session (tests/pg.py), stopped at its end.
    Fails (never skips) when PostgreSQL is not installed."""
    from tests.pg import PgServer

    try:
        server = PgServer().start()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server: Any) -> str:
    """The URL of a new empty database on the session's PostgreSQL server."""
    return str(pg_server.create_database())
