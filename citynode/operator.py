"""The operator interface of one data dir's node, the same whether the node runs or not.

Every CLI command that changes a node (publish, partner add/remove, sync) or asks it for
its live state is written once, against :class:`Operator`, which speaks the node's HTTP
operator API (``/v1/publish``, ``/v1/admin/*``) with the operator token through the one
client stack (transport/http.py). Only where that API is served differs:

* the node runs (``citynode run`` holds the run lock): its HTTPS listener on loopback,
  TLS pinned to its own certificate;
* it does not: :meth:`Operator.open` takes the run lock, starts the node in this process
  without partner tasks, and serves the very same aiohttp application on a Unix socket
  in a private temporary directory (mode 0700: no other user can reach it; no port to
  find free, no certificate to present) for as long as the command lasts.

A stopped node is a one-shot node, and two requests mean what they must for one: before
a publish it first catches up with its partners (they may hold newer records of its own
feeds, as after a restore from an old backup: signing again on those seqs would fork
them), and a sync fetches everything missing now, streaming its progress, where a
running node is only asked to start its next rounds at once.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from citynode.errors import ConfigError, PeerError, PeerRejected
from citynode.transport.http import JSON, BearerToken, HttpClient, refused_connection

__all__ = ["Operator", "Progress"]

Progress = Callable[[int, int], None]
_MAX_ANSWER = 256 * 1024 * 1024  # a publish of 100,000 items answers with their ids


class Operator:
    """The operator API of one node (see the module docstring). Open with
    :meth:`open`; every method raises :class:`CitynodeError` (the node's refusals as
    :class:`PeerRejected` whose message is the node's own words)."""

    def __init__(self, http: HttpClient, *, running: bool) -> None:
        self._http = http
        self.running = running  # for wording only: every call is the same either way

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, data_dir: Path) -> AsyncIterator[Operator]:
        """The operator interface of the node of ``data_dir``: the running node's, or one
        started here for the duration (see the module docstring). Raises
        :class:`ConfigError` if ``data_dir`` is not a data dir."""
        from citynode.runner import is_running

        require_data_dir(data_dir)
        if is_running(data_dir):
            async with _loopback(data_dir) as http:
                yield cls(http, running=True)
        else:
            async with _in_process(data_dir) as http:
                yield cls(http, running=False)

    async def _call(self, method: str, path: str, body: bytes = b"",
                    content_type: str | None = None) -> Any:
        try:
            resp = await self._http.request(method, path, body, accept=JSON,
                                            content_type=content_type,
                                            max_bytes=_MAX_ANSWER)
        except PeerRejected:
            raise
        except PeerError as exc:
            raise self._unreachable(exc) from exc
        return resp.json()

    def _unreachable(self, exc: PeerError) -> PeerError:
        url = self._http.base_url
        if refused_connection(exc):
            # The lock says a node runs here, but it does not listen (yet): most often it
            # is still starting (its first exchange with partners), or it is stopping.
            return PeerError(f"the node running on this data dir is not answering at {url} "
                             "yet (still starting, or stopping): retry in a moment, or see "
                             "its log")
        return PeerError(f"cannot reach the running node at {url}: {exc}")

    async def status(self) -> dict[str, Any]:
        """The node's id, name, counts and partners' live state."""
        out: dict[str, Any] = await self._call("GET", "/v1/admin/status")
        return out

    async def bridges(self, dead_letters: int = 20) -> dict[str, Any]:
        """Each bridge's state (live only while the node runs) and the newest
        ``dead_letters`` messages the bridges could not make records of."""
        out: dict[str, Any] = await self._call(
            "GET", f"/v1/admin/bridges?dead_letters={int(dead_letters)}")
        return out

    async def sinks(self, refused: int = 10) -> dict[str, Any]:
        """Each sink's state and the newest ``refused`` deliveries it gave up."""
        out: dict[str, Any] = await self._call("GET", f"/v1/admin/sinks?refused={int(refused)}")
        return out

    async def partners(self) -> list[dict[str, Any]]:
        """Live state of the partners the node exchanges with now (none for a node that
        is not running: it has no partner tasks)."""
        return list((await self._call("GET", "/v1/admin/partners"))["partners"])

    async def liveness(self) -> list[dict[str, Any]]:
        """Every feed held or heard of, with its liveness state and terms
        (``GET /v1/liveness``). A node that is not running has heard no statement of
        another node's feed since it stopped: those are "unknown"."""
        return list((await self._call("GET", "/v1/liveness"))["feeds"])

    async def rotate_key(self, next_seed: bytes | None = None,
                         next_passphrase: str | None = None) -> dict[str, Any]:
        """Rotate the node's signing key (``POST /v1/admin/key/rotate``): to the next
        key in node.next.key, or to ``next_seed`` (unsealed here), the fresh next key
        then sealed with ``next_passphrase``."""
        if next_seed is None:
            out: dict[str, Any] = await self._call("POST", "/v1/admin/key/rotate")
            return out
        body = json.dumps({"next_seed": next_seed.hex(),
                           "next_passphrase": next_passphrase}).encode()
        out = await self._call("POST", "/v1/admin/key/rotate", body, content_type=JSON)
        return out

    async def prepare_recovery(self, last_good: dict[str, int],
                               drop_feeds: tuple[str, ...] = (),
                               next_passphrase: str | None = None) -> bytes:
        """Step 1 of a recovery (``POST /v1/admin/key/recover/prepare``): the node makes
        its new keys, the next one sealed with ``next_passphrase``, and stops signing;
        returns the request file's bytes for the recovery key to sign away from the
        node (citynode/recovery.py). No recovery secret goes to the node."""
        body = json.dumps({"last_good": last_good, "drop_feeds": list(drop_feeds),
                           "next_passphrase": next_passphrase}).encode()
        out = await self._call("POST", "/v1/admin/key/recover/prepare", body,
                               content_type=JSON)
        return (json.dumps(out, indent=1) + "\n").encode()

    async def cancel_recovery(self) -> bool:
        """Forget a prepared recovery; the node signs again. Whether there was one."""
        out = await self._call("DELETE", "/v1/admin/key/recover/prepare")
        return bool(out["cancelled"])

    async def apply_recovery(self, envelope: bytes) -> dict[str, Any]:
        """Step 3 of a recovery (``POST /v1/admin/key/recover``): the signed recovery
        event, and only it, goes to the node; answers ``{node_id, seq, key}``."""
        body = json.dumps({"event": base64.b64encode(envelope).decode("ascii")}).encode()
        out: dict[str, Any] = await self._call("POST", "/v1/admin/key/recover", body,
                                               content_type=JSON)
        return out

    async def renew_tls(self, switch: bool) -> dict[str, Any]:
        """Stage a new TLS certificate, or switch to the staged one
        (``POST /v1/admin/tls/renew``)."""
        body = json.dumps({"switch": switch}).encode()
        out: dict[str, Any] = await self._call("POST", "/v1/admin/tls/renew", body,
                                               content_type=JSON)
        return out

    async def add_partner(self, url: str, partner_id: str) -> str:
        """Add the partner at ``url`` whose card must be signed by ``partner_id``;
        return its name."""
        body = json.dumps({"url": url, "id": partner_id}).encode()
        out = await self._call("POST", "/v1/admin/partners", body, content_type=JSON)
        return str(out["name"])

    async def remove_partner(self, partner_id: str) -> bool:
        """Remove a partner; False if there was none with that id."""
        try:
            await self._call("DELETE", f"/v1/admin/partners/{quote(partner_id, safe='')}")
        except PeerRejected as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def publish(self, feed: str, type_name: str, items: list[dict[str, Any]],
                      subject: str | None = None) -> dict[str, Any]:
        """Sign and publish ``items``; the node's answer: ``ids``, ``first_seq``,
        ``last_seq`` and the feed's ``access``."""
        q = {"feed": feed, "type": type_name} | ({"subject": subject} if subject else {})
        body = "\n".join(json.dumps(i) for i in items).encode() + b"\n"
        out: dict[str, Any] = await self._call("POST", f"/v1/publish?{urlencode(q)}", body,
                                               content_type="application/x-ndjson")
        return out

    async def publish_batch(self, feed: str, type_name: str, items: list[dict[str, Any]],
                            subjects: list[str | None]) -> dict[str, Any]:
        """Publish ``items`` (each with its own subject) as one batch: all or none (the
        node's answer as :meth:`publish`'s)."""
        q = {"feed": feed, "type": type_name}
        body = "\n".join(json.dumps({"subject": s, "data": i})
                         for i, s in zip(items, subjects, strict=True)).encode() + b"\n"
        out: dict[str, Any] = await self._call("POST", f"/v1/bridges/publish?{urlencode(q)}",
                                               body, content_type="application/x-ndjson")
        return out

    async def erase(self, ids: list[str], reason: str) -> dict[str, Any]:
        """Publish an erasure request for records of this node (ids in hex); the node's
        answer: the request's ``id`` and ``seq``, and the ``erased`` ids."""
        body = json.dumps({"ids": ids, "reason": reason}).encode()
        out: dict[str, Any] = await self._call("POST", "/v1/admin/erase", body,
                                               content_type=JSON)
        return out

    async def sync(self, progress: Progress | None = None) -> dict[str, Any]:
        """Sync with every partner now. A running node answers ``{"partners": n}`` (its
        rounds start at once); a one-shot node fetches everything missing first,
        reporting ``progress(done, total)``, and answers ``{"fetched": n}``."""
        result: dict[str, Any] = {}
        try:
            async for event in self._http.events("/v1/admin/sync", method="POST",
                                                 accept=f"text/event-stream, {JSON}"):
                data = json.loads(event.get("data", "null"))
                if event.get("event") == "progress" and progress is not None:
                    progress(int(data["done"]), int(data["total"]))
                elif event.get("event") in ("result", None) and isinstance(data, dict):
                    result = data
        except PeerRejected:
            raise
        except PeerError as exc:
            raise self._unreachable(exc) from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise PeerError("the node's answer to sync is not understood") from exc
        return result


def require_data_dir(data_dir: Path) -> None:
    """Raise :class:`ConfigError` unless ``data_dir`` holds a node.toml."""
    if not (data_dir / "node.toml").exists():
        raise ConfigError(f"{data_dir} is not a citynode data dir (no node.toml): "
                          f"run `citynode init -d {data_dir}`")


@contextlib.asynccontextmanager
async def _loopback(data_dir: Path) -> AsyncIterator[HttpClient]:
    """A client of the running node's listener, pinned to its own certificate."""
    from citynode.config import load_config
    from citynode.identity import load_identity

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
    async with HttpClient(
        f"{scheme}://{host}:{port}", auth=BearerToken(ident.token), where=None,
        fingerprint=ident.cert_fingerprint if cfg.tls.enabled else None, timeout=600.0,
    ) as http:
        yield http


@contextlib.asynccontextmanager
async def _in_process(data_dir: Path) -> AsyncIterator[HttpClient]:
    """The node of ``data_dir`` started here without partner tasks, its application
    served on a private Unix socket, and a client of it."""
    from aiohttp import web

    from citynode.node import Node
    from citynode.runner import run_lock
    from citynode.transport.server import build_app

    with run_lock(data_dir):
        node = Node.load(data_dir)
        await node.start(partners=False)
        try:
            app = build_app(node)
            app.middlewares.append(_one_shot(node))
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            try:
                with tempfile.TemporaryDirectory(prefix="citynode-") as tmp:  # mode 0700
                    sock = os.path.join(tmp, "api.sock")
                    await web.UnixSite(runner, sock).start()
                    async with HttpClient("http://citynode.local", unix_socket=sock,
                                          auth=BearerToken(node.identity.token),
                                          where=None, timeout=None) as http:
                        yield http
            finally:
                await runner.cleanup()
        finally:
            await node.stop()


Handler = Callable[[Any], Awaitable[Any]]


def _one_shot(node: Any) -> Any:
    """The middleware that makes the in-process node's publish and sync those of a
    node that is not running (see the module docstring). Only the operator's requests
    are concerned: any other goes to the handler, which refuses it."""
    from aiohttp import web

    from citynode.identity import check_token

    @web.middleware
    async def one_shot(request: web.Request, handler: Handler) -> Any:
        auth = request.headers.get("Authorization", "")
        operator = auth.startswith("Bearer ") and check_token(node.identity.token, auth[7:])
        if not operator or request.method != "POST":
            return await handler(request)
        if request.path == "/v1/publish":
            await node.catch_up()
            return await handler(request)
        if request.path != "/v1/admin/sync":
            return await handler(request)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        pending: list[bytes] = []

        def report(done: int, total: int) -> None:
            pending.append(_event("progress", {"done": done, "total": total}))

        async def flush() -> None:
            while pending:
                await resp.write(pending.pop(0))

        fetched = await _with_flushes(node.catch_up(report), flush)
        await flush()
        await resp.write(_event("result", {"fetched": int(fetched)}))
        await resp.write_eof()
        return resp

    return one_shot


async def _with_flushes(work: Awaitable[Any], flush: Callable[[], Awaitable[None]]) -> Any:
    """Run ``work``, writing the progress it reports meanwhile (every 0.2 s)."""
    import asyncio

    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.wait({task}, timeout=0.2)
        await flush()
    return task.result()


def _event(name: str, data: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
