"""A real PostgreSQL server for the tests: Debian's ``postgresql`` package, started in a
temporary directory on a free loopback port, stopped at the end of the session.

No mock and no skip: without the package the PostgreSQL tests fail, saying what to
install (``.ci/run`` installs it). PostgreSQL refuses to run as root, and CI runs as
root: then ``initdb`` and ``pg_ctl`` run as the ``postgres`` user the package creates
(``runuser -u postgres --``), in a directory given to that user.

Each test gets a database of its own (``CREATE DATABASE``): nothing is shared between
tests but the server.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from citynode.cluster import free_ports

__all__ = ["PgServer", "pg_bin"]

INSTALL_HINT = ("PostgreSQL is not installed: `apt-get install postgresql` (Debian's "
                "package; .ci/run installs it) -- the PostgreSQL storage tests need a "
                "real server")


def pg_bin() -> Path:
    """The directory of ``initdb`` and ``pg_ctl``: Debian keeps them off PATH, under
    /usr/lib/postgresql/VERSION/bin (the newest version installed is taken). Raises
    RuntimeError with the install hint if there is none."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    raise RuntimeError(INSTALL_HINT)


def _runuser() -> str:
    """util-linux's ``runuser``: in /usr/sbin, which a non-login root PATH (CI's, a
    fresh clone's check) may lack, so looked for there too. Raises RuntimeError."""
    found = shutil.which("runuser") or shutil.which(
        "runuser", path=os.pathsep.join(("/usr/sbin", "/sbin")))
    if found is None:
        raise RuntimeError("runuser (util-linux) not found: it runs PostgreSQL as the "
                           "postgres user when the tests run as root")
    return found


class PgServer:
    """One PostgreSQL server for a test session (or a test that needs its own)."""

    def __init__(self) -> None:
        self.bin = pg_bin()
        self.root = Path(tempfile.mkdtemp(prefix="citynode-pg-"))
        self.data = self.root / "data"
        self.port = free_ports(1)[0]
        self.as_root = os.geteuid() == 0
        self._n = itertools.count(1)
        self.started = False
        self._opts = ""

    def _run(self, *args: str, timeout: float = 120) -> None:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.as_root:
            cmd = [_runuser(), "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n"
                               f"{done.stdout}\n{done.stderr}")

    def start(self, *, durable: bool = False) -> PgServer:
        """initdb + pg_ctl start; raises RuntimeError saying why it could not.
        ``durable``: fsync as a production server does (benchmarks), not off."""
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        # trust on loopback: a throwaway server only this machine reaches, for tests.
        # locale C: text compares by bytes, as SQLite does (COLLATE "C" in the schema
        # says so again for servers made otherwise).
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--locale=C", "--encoding=UTF8")
        # fsync off: a test server whose data dies with the session; every other
        # setting is the default (synchronous_commit on: commits wait for the WAL).
        opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                f"-c unix_socket_directories={self.root} -c max_connections=300 "
                "-c shared_buffers=32MB")
        if not durable:
            opts += " -c fsync=off -c full_page_writes=off"
        self._opts = opts
        self.resume()
        return self

    def pause(self) -> None:
        """``pg_ctl stop -m fast``, keeping the data: the server goes away under the
        clients (they see their connections end), as in a database failover."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        self.started = False

    def resume(self) -> None:
        """``pg_ctl start`` on the same data, port and settings (after :meth:`pause`)."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"),
                  "-o", self._opts, "-w", "-t", "60", "start")
        self.started = True

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database on this server; returns its URL."""
        import psycopg

        name = f"{prefix}_{os.getpid()}_{next(self._n)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """pg_ctl stop (fast), then remove the directory. Idempotent."""
        if self.started:
            self.started = False
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
