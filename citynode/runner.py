"""Running a node as a process (``citynode run``) and talking to a running one.

SIGTERM and SIGINT stop it gracefully; SIGHUP reloads node.toml (``Node.reload``). The
lock file holds the process id: ``kill -HUP "$(cat DIR/run.lock)"`` reloads a node that
systemd does not run (``systemctl reload UNIT`` one that it does).

A running node holds an exclusive lock on ``DIR/run.lock`` (so two processes never share
one data dir). Commands that change state (publish, partner add/remove, sync) go through
the node's operator API, the running node's or one started for the command
(citynode/operator.py): it owns the database writer and the chain heads.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from citynode.config import load_config
from citynode.errors import StorageError
from citynode.logs import fields

if TYPE_CHECKING:
    from citynode.node import Node

__all__ = ["is_running", "run_lock", "run_node"]

log = logging.getLogger("citynode.run")
LOCK_NAME = "run.lock"


@contextlib.contextmanager
def run_lock(data_dir: Path) -> Iterator[None]:
    """Hold the data dir's run lock; raise StorageError if another process holds it."""
    path = data_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise StorageError(
                f"{data_dir} is in use by another `citynode run` (pid "
                f"{os.pread(fd, 32, 0).decode(errors='replace').strip() or '?'})"
            ) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def is_running(data_dir: Path) -> bool:
    """True if a ``citynode run`` process holds this data dir."""
    path = data_dir / LOCK_NAME
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


async def _serve(data_dir: Path, accept_fork_risk: bool = False,
                 restored: bool = False) -> None:
    from citynode.node import Node
    from citynode.transport.server import serve

    node = Node.load(data_dir)
    host, port = node.config.node.listen_host, node.config.node.listen_port
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP (`systemctl reload`, `kill -HUP PID`): node.toml again, without a restart.
    loop.add_signal_handler(signal.SIGHUP, lambda: node.spawn(_reload(node), "reload"))
    runner = None
    try:
        await node.start(accept_fork_risk=accept_fork_risk, rolled_back=restored)
        runner = await serve(node, host=host, port=port)
        log.info(
            "serving",
            extra=fields(node=node.node_id, name=node.config.node.name,
                         url=node.config.node.public_url, listen=node.config.node.listen),
        )
        print(f"citynode {node.config.node.name} ({node.node_id}) serving on "
              f"{node.config.node.listen}", flush=True)
        # Everything loaded at start lives as long as the process: out of the cyclic
        # collector's sight, so its full collections stay short (latency of live streams).
        gc.collect()
        gc.freeze()
        await stop.wait()
        log.info("shutting down")
    finally:
        # Stop accepting requests first, then let the node commit what it acknowledged.
        if runner is not None:
            await runner.cleanup()
        await node.stop()


async def _reload(node: Node) -> None:
    """Reload node.toml into the running node, then apply its ``[log] level``."""
    diff = await node.reload()
    if diff is not None:
        logging.getLogger().setLevel(node.config.log.level.upper())


def run_node(data_dir: Path, *, accept_fork_risk: bool = False,
             restored: bool = False) -> None:
    """Serve the node until SIGTERM/SIGINT; shut down gracefully. Raises CitynodeError.
    ``accept_fork_risk``: sign on own feeds at once even if the database was restored;
    ``restored``: mark it restored first (see :meth:`Node.start`)."""
    from citynode.logs import setup_logging

    cfg = load_config(data_dir / "node.toml")
    setup_logging(cfg.log.level, cfg.log.format)
    with run_lock(data_dir):
        asyncio.run(_serve(data_dir, accept_fork_risk, restored))
