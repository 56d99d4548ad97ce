"""The HTTPS API of a node (aiohttp): the application and the server. Thin: parse,
authenticate, call the node's roles, render. The routes live by caller:

* ``api_public``: card, health, records, feeds, checkpoints and proofs (read policy);
* ``api_stream``: live Server-Sent Event streams;
* ``api_operator``: publish, partners, sync, status, metrics (operator token);
* ``api_partner``: the partner protocol (signed requests);
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
import ssl
from collections.abc import Callable
from typing import Any

from aiohttp import web

from citynode.core import httpsig
from citynode.node import Node
from citynode.transport import (
    api_console,
    api_operator,
    api_partner,
    api_public,
    api_stream,
)
from citynode.transport.web import (
    NODE_KEY,
    READ_REPLAY_KEY,
    REPLAY_KEY,
    errors_middleware,
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
        middlewares=[errors_middleware], client_max_size=node.config.limits.max_request_bytes
    )
    app[NODE_KEY] = node
    app.on_shutdown.append(_end_streams)
    max_age = int(node.config.limits.request_max_age_seconds * 1000)
    app[REPLAY_KEY] = httpsig.ReplayCache(max_age_ms=max_age)
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
    r.add_get("/v1/stream", api_stream.stream)
    r.add_post("/v1/publish", api_operator.publish)
    r.add_post("/v1/admin/erase", api_operator.admin_erase)
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
    r.add_get("/v1/proofs/inclusion", api_public.inclusion_proof)
    r.add_get("/v1/proofs/consistency", api_public.consistency_proof)
    api_console.add_routes(app)  # the web console at / (docs/CONSOLE.md)
    return app


def ssl_context(node: Node) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(node.identity.cert_path, node.identity.key_path)
    return ctx


def _cap_connections(server: Any, cap: int, refused: Callable[[], None],
                     deadline_s: float, stalled: Callable[[], None]) -> None:
    """Close each connection that arrives while ``cap`` are open, and each connection
    that completes no request head in ``deadline_s`` while none is being served.

    aiohttp has no connection limit and no deadline for a request's head: a client
    sending its headers one byte every few seconds (slowloris) held a connection and
    ~280 KB for as long as it liked (scripts/chaos --scenario hostile). Every new
    connection's handler reports to its server's ``connection_made`` (after the TLS
    handshake), so the checks go there. The deadline also ends idle keep-alive
    connections after one to two deadlines; a request being served (an SSE stream, a
    long upload) is never cut by it. It reads two private counters of aiohttp's
    handler; if they ever disappear the check does nothing (tests/transport tests it).
    """
    if server is None:
        return
    made = server.connection_made

    def connection_made(handler: Any, transport: asyncio.Transport) -> None:
        made(handler, transport)
        if len(server.connections) > cap:
            refused()
            transport.close()
            return
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

    server.connection_made = connection_made


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
    _cap_connections(runner.server, lim.max_connections, node.metrics.connections_refused.inc,
                     lim.read_timeout_seconds, node.metrics.connections_stalled.inc)
    ctx = ssl_context(node) if node.config.tls.enabled else None
    site = web.TCPSite(runner, host, port, ssl_context=ctx)
    await site.start()
    return runner
