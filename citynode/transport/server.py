"""The HTTPS API of a node (aiohttp): the application and the server. Thin: parse,
authenticate, call the node's roles, render. The routes live by caller:

* ``api_public``: card, health, records, feeds, checkpoints and proofs (read policy);
* ``api_stream``: live Server-Sent Event streams;
* ``api_operator``: publish, partners, sync, status, metrics (operator token);
* ``api_partner``: the partner protocol (signed requests);
* ``api_witness``: witness cosignatures (posted by partners, read by anyone allowed);
* ``api_console``: the web console at ``/`` (docs/CONSOLE.md);
* ``web``: what they share (errors, bodies, parameters, authentication).

Three kinds of caller, three kinds of authentication:

* anyone: the node card, health, and public feeds' records;
* partners: ``/v1/push``, ``/v1/reconcile``, ``/v1/sync``, ``/v1/fetch``, ``/v1/cards``,
  ``/v1/proofs`` need a request signed by a listed partner's node key (core/httpsig.py), at most
  ``request_max_age_seconds`` old and never replayed;
* the operator: ``/v1/publish``, ``/v1/admin/*`` and ``/metrics`` need
  ``Authorization: Bearer <operator token>`` (compared in constant time).

Every error is a JSON body ``{"error": reason, "message": text}`` with a 4xx/5xx status;
nothing unverified is stored and one bad client cannot stop the server serving others.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Callable
from typing import Any

from aiohttp import web

from citynode.core import httpsig
from citynode.node import Node
from citynode.transport import (
    api_bridges,
    api_console,
    api_operator,
    api_partner,
    api_public,
    api_stream,
    api_witness,
)
from citynode.transport.limits import AddressCounts, PartnerRates
from citynode.transport.web import (
    NODE_KEY,
    RATES_KEY,
    READ_REPLAY_KEY,
    REPLAY_KEY,
    errors_middleware,
    partners_middleware,
)

__all__ = [
    "build_app",
    "serve",
    "ssl_context",
]

async def _end_streams(app: web.Application) -> None:
    """Graceful shutdown (aiohttp's on_shutdown: no new connections, requests under way
    still run): end live streams now, or the server would wait its whole shutdown
    timeout for them to finish, then cancel them mid-response."""
    app[NODE_KEY].streams.close()


def build_app(node: Node) -> web.Application:
    """The aiohttp application for ``node``."""
    app = web.Application(
        middlewares=[errors_middleware, partners_middleware],
        client_max_size=node.config.limits.max_request_bytes
    )
    app[NODE_KEY] = node
    app.on_shutdown.append(_end_streams)
    max_age = int(node.config.limits.request_max_age_seconds * 1000)
    app[REPLAY_KEY] = httpsig.ReplayCache(max_age_ms=max_age)
    lim = node.config.limits
    app[RATES_KEY] = PartnerRates(lim.partner_requests_per_second, lim.partner_request_burst,
                                  lim.partner_loop_share, lim.partner_max_in_flight)
    # Signed reads: strangers (any key) get a cache of their own, so that a flood of
    # them cannot refuse the partners and readers this node knows.
    app[READ_REPLAY_KEY] = httpsig.SplitReplayCache(node.policy.knows_key,
                                                       max_age_ms=max_age)
    r = app.router
    r.add_get("/.well-known/citynode", api_public.card)
    r.add_get("/healthz", api_public.healthz)
    r.add_get("/readyz", api_public.readyz)
    r.add_get("/metrics", api_operator.metrics)
    r.add_get("/v1/records", api_public.list_records)
    r.add_get("/v1/records/{rid}", api_public.get_record)
    r.add_get("/v1/feeds", api_public.list_feeds)
    r.add_get("/v1/liveness", api_operator.liveness)
    r.add_get("/v1/card-history", api_operator.card_history)
    r.add_get("/v1/keylog", api_public.get_key_log)
    r.add_post("/v1/keylog", api_public.post_key_log)
    r.add_get("/v1/stream", api_stream.stream)
    r.add_post("/v1/publish", api_operator.publish)
    r.add_post("/v1/admin/erase", api_operator.admin_erase)
    r.add_post("/v1/admin/key/rotate", api_operator.admin_key_rotate)
    r.add_post("/v1/admin/key/recover", api_operator.admin_key_recover)
    r.add_post("/v1/admin/key/recover/prepare", api_operator.admin_key_recover_prepare)
    r.add_delete("/v1/admin/key/recover/prepare", api_operator.admin_key_recover_prepare)
    r.add_post("/v1/admin/tls/renew", api_operator.admin_tls_renew)
    r.add_get("/v1/admin/status", api_operator.admin_status)
    r.add_get("/v1/admin/bridges", api_operator.admin_bridges)
    r.add_post("/v1/admin/sync", api_operator.admin_sync)
    r.add_route("GET", "/v1/admin/partners", api_operator.admin_partners)
    r.add_route("POST", "/v1/admin/partners", api_operator.admin_partners)
    r.add_delete("/v1/admin/partners/{pid}", api_operator.admin_partner_delete)
    r.add_post("/v1/push", api_partner.push)
    r.add_post("/v1/sync", api_partner.sync_handler)
    r.add_post("/v1/reconcile", api_partner.reconcile)
    r.add_post("/v1/fetch", api_partner.fetch)
    r.add_get("/v1/cards", api_partner.cards_handler)
    r.add_post("/v1/announce", api_partner.announce)
    r.add_post("/v1/graft", api_partner.graft)
    r.add_post("/v1/proofs", api_partner.proofs)
    r.add_post("/v1/checkpoints", api_partner.post_checkpoint)
    r.add_get("/v1/checkpoints", api_public.get_checkpoints)
    r.add_post("/v1/cosignatures", api_witness.post_cosignatures)
    r.add_get("/v1/cosignatures", api_witness.get_cosignatures)
    r.add_get("/v1/proofs/inclusion", api_public.inclusion_proof)
    r.add_get("/v1/proofs/consistency", api_public.consistency_proof)
    api_console.add_routes(app)  # the web console at / (docs/CONSOLE.md)
    api_bridges.add_routes(app)  # bridges in: /v1/bridges/* (docs/BRIDGES.md)
    return app


def ssl_context(node: Node) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(node.identity.cert_path, node.identity.key_path)
    node.keychanges.serve_tls(ctx)  # `citynode tls renew --switch` loads the new one
    return ctx


#: The TLS read buffer of each connection the server accepts, in bytes. asyncio gives
#: every TLS connection a 256 KiB buffer, zero-filled (so resident) for the connection's
#: whole life: 64 slow or idle connections held 16 MiB (scripts/chaos --scenario
#: hostile). Two TLS records' worth reads a large body in more, smaller reads.
TLS_READ_BUFFER = 32 * 1024


def _shrink_tls_buffer(transport: asyncio.BaseTransport) -> None:
    """Give an accepted TLS connection a :data:`TLS_READ_BUFFER` read buffer, once its
    handshake is done (the handshake's bytes were copied out of the old one). It sets
    two attributes of asyncio's SSLProtocol; without them (another event loop) it does
    nothing (tests/transport tests it)."""
    proto = getattr(transport, "_ssl_protocol", None)
    buf = getattr(proto, "_ssl_buffer", None)
    if not isinstance(buf, bytearray) or not hasattr(proto, "_ssl_buffer_view") or \
            len(buf) <= TLS_READ_BUFFER:
        return
    proto.max_size = TLS_READ_BUFFER  # type: ignore[union-attr]
    proto._ssl_buffer = bytearray(TLS_READ_BUFFER)  # type: ignore[union-attr]
    proto._ssl_buffer_view = memoryview(proto._ssl_buffer)  # type: ignore[union-attr]


def _cap_connections(server: Any, cap: int, refused: Callable[[], None],
                     deadline_s: float, stalled: Callable[[], None],
                     per_address: AddressCounts | None = None,
                     refused_address: Callable[[], None] = lambda: None) -> None:
    """Close each connection that arrives while ``cap`` are open, or while
    ``per_address.cap`` are open from its IP address, and each connection that completes
    no request head in ``deadline_s`` while none is being served.

    aiohttp has no connection limit and no deadline for a request's head: a client
    sending its headers one byte every few seconds (slowloris) held a connection and
    ~280 KB for as long as it liked (scripts/chaos --scenario hostile). The deadline
    alone still let one host hold ``cap`` connections (and their memory) for a deadline
    at a time, and lock everyone else out meanwhile: hence the cap per address. Every
    new connection's handler reports to its server's ``connection_made`` (after the TLS
    handshake), and every closed one to ``connection_lost``, so the checks go there. The
    deadline also ends idle keep-alive connections after one to two deadlines; a request
    being served (an SSE stream, a long upload) is never cut by it. It reads two private
    counters of aiohttp's handler; if they ever disappear the check does nothing
    (tests/transport tests it).
    """
    if server is None:
        return
    made = server.connection_made
    lost = server.connection_lost
    # handler -> the address it was counted under in per_address (admitted ones only)
    counted: dict[Any, str | None] = {}

    def connection_made(handler: Any, transport: asyncio.Transport) -> None:
        made(handler, transport)
        if len(server.connections) > cap:
            refused()
            transport.close()
            return
        if per_address is not None:
            peer = transport.get_extra_info("peername")
            addr = str(peer[0]) if isinstance(peer, tuple) and peer else None
            if not per_address.admit(addr):
                refused_address()
                transport.close()
                return
            counted[handler] = addr
        _shrink_tls_buffer(transport)
        loop = asyncio.get_running_loop()

        def watch(last: int) -> None:
            if transport.is_closing():
                return
            count = getattr(handler, "_request_count", None)
            if count is None:
                return
            if count == last and not getattr(handler, "_request_in_progress", True):
                stalled()
                transport.close()
                return
            loop.call_later(deadline_s, watch, count)

        loop.call_later(deadline_s, watch, getattr(handler, "_request_count", 0))

    def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
        if handler in counted and per_address is not None:
            per_address.release(counted.pop(handler))
        lost(handler, exc)

    server.connection_made = connection_made
    server.connection_lost = connection_lost


async def serve(node: Node, *, host: str, port: int) -> web.AppRunner:
    """Start serving ``node`` on host:port (TLS unless disabled); return the runner."""
    lim = node.config.limits
    runner = web.AppRunner(
        build_app(node),
        access_log=None,
        max_headers=lim.max_headers,
        max_field_size=lim.max_header_bytes,
        max_line_size=lim.max_header_bytes,
        handler_cancellation=True,
        shutdown_timeout=10.0,
        keepalive_timeout=75.0,  # aiohttp's default keeps idle connections for an hour
    )
    await runner.setup()
    proxy = node.config.tls.trusted_proxy
    # (the peer address is compared as Python writes it: normalise the configured one)
    proxy = str(ipaddress.ip_address(proxy)) if proxy else ""
    # (not capped at max_connections: above it, that cap is reached first)
    per_address = AddressCounts(lim.max_connections_per_address,
                                frozenset({proxy}) if proxy else frozenset())
    _cap_connections(runner.server, lim.max_connections, node.metrics.connections_refused.inc,
                     lim.read_timeout_seconds, node.metrics.connections_stalled.inc,
                     per_address, node.metrics.connections_refused_address.inc)
    ctx = ssl_context(node) if node.config.tls.enabled else None
    for sock in _listen(host, port, per_address, node.metrics.connections_refused_address.inc):
        await _Site(runner, sock, ssl_context=ctx,
                    handshake_timeout=lim.read_timeout_seconds).start()
    return runner


class _Listener(socket.socket):
    """A listening socket whose ``accept`` closes each connection from an address that
    has its cap of connections open already, before anything is read from it: no TLS
    handshake is spent on it (a refused client that connects again at once otherwise
    cost a handshake each time: scripts/chaos --scenario hostile). Connections still in
    their handshake are not counted yet: the cap in ``connection_made`` catches those
    once it is done, and the handshake itself has a deadline (:class:`_Site`)."""

    counts: AddressCounts | None = None
    refused: Callable[[], None] = staticmethod(lambda: None)

    def accept(self) -> tuple[socket.socket, Any]:
        # (asyncio calls this until it raises BlockingIOError: a refused connection
        # is followed by the next one waiting, or by that.)
        while True:
            conn, addr = super().accept()
            counts = self.counts
            if counts is not None and isinstance(addr, tuple) and addr and \
                    addr[0] not in counts.exempt and \
                    counts.open_from(str(addr[0])) >= counts.cap:
                conn.close()
                self.refused()
                continue
            return conn, addr


def _listen(host: str, port: int, counts: AddressCounts,
            refused: Callable[[], None]) -> list[_Listener]:
    """Listening sockets on every address ``host`` names (as asyncio's create_server
    makes them: SO_REUSEADDR, IPv6 sockets IPv6-only), each refusing at ``accept``
    what ``counts`` has no room for. Raises OSError if one cannot be bound."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    out: list[_Listener] = []
    try:
        for family, kind, proto, _name, addr in dict.fromkeys(
                (i[0], i[1], i[2], i[3], i[4]) for i in infos):
            sock = _Listener(family, kind, proto)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.setblocking(False)
            sock.counts = counts
            sock.refused = refused
    except OSError:
        for sock in out:
            sock.close()
        raise
    return out


class _Site(web.SockSite):
    """aiohttp's SockSite, with a deadline for the TLS handshake (asyncio's default is
    60 s, during which a connection that sends nothing holds its buffers)."""

    def __init__(self, runner: web.AppRunner, sock: socket.socket, *,
                 ssl_context: ssl.SSLContext | None, handshake_timeout: float) -> None:
        super().__init__(runner, sock, ssl_context=ssl_context)
        self._handshake_timeout = handshake_timeout

    async def start(self) -> None:
        await web.BaseSite.start(self)  # (registers the site with its runner)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            server, sock=self._sock, ssl=self._ssl_context, backlog=self._backlog,
            ssl_handshake_timeout=self._handshake_timeout if self._ssl_context is not None
            else None)
