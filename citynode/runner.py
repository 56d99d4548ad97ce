"""Running a node as a process (``citynode run``) and talking to a running one.

A running node holds an exclusive lock on ``DIR/run.lock`` (so two processes never share
one data dir). Commands that change state (publish, partner add/remove) go through the
running node's operator API when it runs -- it owns the database writer and the chain
heads -- and open the data dir directly when it does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import json
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

from citynode.config import load_config
from citynode.errors import CitynodeError, PeerError, PeerRejected, StorageError
from citynode.identity import load_identity
from citynode.logs import fields

__all__ = ["is_running", "operator_request", "run_lock", "run_node"]

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


async def operator_request(
    data_dir: Path, method: str, path: str, *, body: bytes = b"", json_body: Any = None,
    timeout: float = 600.0,
) -> Any:
    """Call the running node's operator API (over loopback, TLS pinned to our own cert)."""
    cfg = load_config(data_dir / "node.toml")
    ident = load_identity(data_dir)
    host, port = cfg.node.listen_host, cfg.node.listen_port
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if cfg.tls.enabled else "http"
    url = f"{scheme}://{host}:{port}{path}"
    ssl_arg: Any = aiohttp.Fingerprint(ident.cert_fingerprint) if cfg.tls.enabled else None
    headers = {"Authorization": f"Bearer {ident.token}", "Accept": "application/json"}
    if json_body is not None:
        body = json.dumps(json_body).encode()
        headers["Content-Type"] = "application/json"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s,
            s.request(method, url, data=body, headers=headers, ssl=ssl_arg) as resp,
        ):
            data = await resp.read()
            try:
                out = json.loads(data)
            except ValueError:
                out = {"message": data.decode(errors="replace")}
            if resp.status >= 400:
                raise PeerRejected(str(out.get("message", out)), resp.status)
            return out
    except CitynodeError:
        raise
    except (aiohttp.ClientConnectorError, ConnectionRefusedError) as exc:
        if isinstance(exc, aiohttp.ClientConnectorError) and not isinstance(
                exc.os_error, ConnectionRefusedError):
            raise PeerError(f"cannot reach the running node at {url}: "
                            f"{exc.__class__.__name__}: {exc}") from exc
        # The lock says a node runs here, but it does not listen (yet): most often it is
        # still starting (its first exchange with partners), or it is stopping.
        raise PeerError(f"the node running on this data dir is not answering at {url} yet "
                        "(still starting, or stopping): retry in a moment, or see its "
                        "log") from exc
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise PeerError(f"cannot reach the running node at {url}: "
                        f"{exc.__class__.__name__}: {exc}") from exc


async def _serve(data_dir: Path) -> None:
    from citynode.node import Node
    from citynode.transport.server import serve

    node = Node.load(data_dir)
    host, port = node.config.node.listen_host, node.config.node.listen_port
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = None
    try:
        await node.start()
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


def run_node(data_dir: Path) -> None:
    """Serve the node until SIGTERM/SIGINT; shut down gracefully. Raises CitynodeError."""
    from citynode.logs import setup_logging

    cfg = load_config(data_dir / "node.toml")
    setup_logging(cfg.log.level, cfg.log.format)
    with run_lock(data_dir):
        asyncio.run(_serve(data_dir))
