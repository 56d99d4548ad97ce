"""Several real ``citynode`` processes on 127.0.0.1: used by the demo, the multi-node
tests and the benchmarks, so all three exercise exactly what an operator runs.

Each node is a separate ``python -m citynode run`` process with its own data dir, key
and certificate; everything here talks to them over real HTTPS (pinned to each node's
certificate) with the operator token, like the CLI does.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from citynode.datadir import init_data_dir
from citynode.errors import PeerError
from citynode.transport.http import JSON, MSGPACK, BearerToken, HttpClient, NoAuth

__all__ = ["Cluster", "LocalNode", "free_ports", "set_config"]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def set_config(path: Path, section: str, key: str, value: Any) -> None:
    """Set ``key`` in ``[section]`` of a node.toml written by init (every key is there)."""
    text = path.read_text()
    lit = json.dumps(value) if not isinstance(value, bool) else str(value).lower()
    start = text.index(f"[{section}]")
    m = re.compile(rf"^{re.escape(key)} = .*$", re.M).search(text, start)
    if m is None:
        raise KeyError(f"{section}.{key}")
    path.write_text(text[: m.start()] + f"{key} = {lit}" + text[m.end():])


@dataclass
class LocalNode:
    """One node process on loopback."""

    name: str
    dir: Path
    port: int
    node_id: str
    token: str
    fingerprint: bytes
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    #: Where the node listens (a network namespace's address in scripts/chaos).
    host: str = "127.0.0.1"
    #: A command the node runs under (``ip netns exec NS``), and extra environment
    #: (libfaketime's): for fault scenarios only.
    wrap: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    #: The passphrase of the recovery file ``citynode init`` wrote (tests recover with it).
    recovery_passphrase: str = field(default="", repr=False)
    #: The passphrase node.next.key is sealed with (``key rotate``, a recovery's new
    #: next key). The same as the recovery one here, for tests only: ``citynode init``
    #: refuses that (the next-key one is typed on the node, the recovery one never).
    next_passphrase: str = field(default="", repr=False)
    _http: HttpClient | None = field(default=None, repr=False)
    _raw: aiohttp.ClientSession | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def start(self, *args: str) -> None:
        """Start ``citynode run`` for this node (logs to DIR/node.log); ``args`` are
        more options of ``citynode run`` (``--accept-fork-risk``)."""
        self.log_path = self.dir / "node.log"
        logf = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self.proc = subprocess.Popen(
            [*self.wrap, sys.executable, "-m", "citynode", "run", "-d", str(self.dir), *args],
            stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )
        logf.close()

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``); returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def _client(self) -> HttpClient:
        if self._http is None:
            self._http = HttpClient(self.url, fingerprint=self.fingerprint, timeout=120.0,
                                    auth=BearerToken(self.token), where=self.name)
        return self._http

    async def session(self) -> aiohttp.ClientSession:
        """A bare aiohttp session pinned to this node: only for tests and benches that
        craft requests below the client stack (hostile or malformed ones, raw timings).
        Everything else goes through :meth:`api`."""
        if self._raw is None or self._raw.closed:
            self._raw = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=120),
                connector=aiohttp.TCPConnector(ssl=aiohttp.Fingerprint(self.fingerprint)),
            )
        return self._raw

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._raw is not None:
            await self._raw.close()
            self._raw = None

    async def api(
        self, method: str, path: str, *, body: bytes | None = None, json_body: Any = None,
        operator: bool = True, raw: bool = False,
    ) -> Any:
        """Call the node's HTTPS API; JSON in and out unless ``raw``. Raises
        :class:`PeerRejected` (with the node's status and reason) or :class:`PeerError`."""
        if json_body is not None:
            body = json.dumps(json_body).encode()
        resp = await self._client().request(
            method, path, body or b"", accept=MSGPACK if raw else JSON,
            content_type=JSON if json_body is not None else None,
            auth=None if operator else NoAuth())
        return resp.body if raw else resp.json()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: "
                                   f"{self.tail_log()}")
            try:
                out = await self.api("GET", "/readyz", operator=False)
                if out.get("ready"):
                    return
            except PeerError as exc:  # PeerRejected included (503: not ready)
                last = exc
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready after {timeout} s: {last}; {self.tail_log()}")

    def tail_log(self, n: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    async def publish(self, feed: str, type_name: str, items: list[dict[str, Any]],
                      subject: str | None = None) -> dict[str, Any]:
        q = f"/v1/publish?feed={feed}&type={type_name}" + (f"&subject={subject}" if subject
                                                               else "")
        body = "\n".join(json.dumps(i) for i in items).encode() + b"\n"
        out: dict[str, Any] = await self.api("POST", q, body=body)
        return out

    async def feeds(self) -> list[dict[str, Any]]:
        """Every feed this node holds (the operator's view, whatever the access level)."""
        out = await self.api("GET", "/v1/feeds")
        return list(out["feeds"])

    async def add_partner(self, other: LocalNode) -> None:
        await self.api("POST", "/v1/admin/partners",
                       json_body={"url": other.url, "id": other.node_id})


class Cluster:
    """A set of local nodes under one base directory."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.nodes: dict[str, LocalNode] = {}

    def create(self, names: list[str], *, settings: dict[tuple[str, str], Any] | None = None,
               hosts: list[str] | None = None) -> list[LocalNode]:
        """``citynode init`` one node per name, on free loopback ports (or on ``hosts``,
        one address per name, each on port 8443)."""
        from nacl.pwhash import argon2id

        ports = free_ports(len(names)) if hosts is None else [8443] * len(names)
        addrs = hosts or ["127.0.0.1"] * len(names)
        out = []
        for name, port, host in zip(names, ports, addrs, strict=True):
            d = self.base / name.lower().replace(" ", "-")
            pw = secrets.token_hex(8)
            ident, _cfg = init_data_dir(
                d, name=name, listen=f"{host}:{port}", hosts=[host],
                recovery_passphrase=pw, next_passphrase=pw,
                kdf_opslimit=argon2id.OPSLIMIT_MIN, kdf_memlimit=argon2id.MEMLIMIT_MIN,
            )
            for (section, key), value in (settings or {}).items():
                set_config(d / "node.toml", section, key, value)
            n = LocalNode(name, d, port, ident.node_id, ident.token, ident.cert_fingerprint,
                          host=host, recovery_passphrase=pw, next_passphrase=pw)
            self.nodes[name] = n
            out.append(n)
        return out

    async def start(self, nodes: list[LocalNode] | None = None) -> None:
        nodes = nodes if nodes is not None else list(self.nodes.values())
        for n in nodes:
            n.start()
        await asyncio.gather(*(n.wait_ready() for n in nodes))

    async def link(self, a: LocalNode, b: LocalNode) -> None:
        """Make a and b partners of each other (both must be running)."""
        await a.add_partner(b)
        await b.add_partner(a)

    async def close(self) -> None:
        for n in self.nodes.values():
            await n.close()

    def stop(self) -> None:
        for n in self.nodes.values():
            n.stop()
