"""The partner protocol (signed by a listed partner's node key): push, reconcile, sync
(the legacy frontier exchange), fetch, announce, graft, cards, checkpoints and proofs.
What they mean for replication is the replica's (through the gossip role)."""

from __future__ import annotations

import time

import msgpack
from aiohttp import web

from citynode.core import sync
from citynode.core.reconcile import MAX_MESSAGE_BYTES
from citynode.errors import InvalidRecord
from citynode.node import Node, PartnerLink
from citynode.transport.limits import RECONCILE_RANGE_BURST
from citynode.transport.web import (
    MSGPACK,
    NODE_KEY,
    RATES_KEY,
    charge,
    charged,
    pack,
    partner_body,
    refuse,
    require_partner,
)

__all__ = [
    "announce",
    "cards_handler",
    "fetch",
    "graft",
    "post_checkpoint",
    "proofs",
    "push",
    "reconcile",
    "sync_handler",
]

async def push(request: web.Request) -> web.Response:
    """A batch of records from a partner. At most [limits] partner_max_pushes_in_flight
    of one partner at once: a node pushes one batch at a time to each partner (one more
    may still be finishing here after its client gave up on it), and concurrent batches
    of one partner queued thousands of its records ahead of this node's own writes
    (scripts/chaos --scenario hostile)."""
    node = request.app[NODE_KEY]
    body, key = await partner_body(request)
    rates = request.app[RATES_KEY]
    cap = node.config.limits.partner_max_pushes_in_flight
    if not rates.enter(key, "push", cap):
        refuse(request, key, "too_many_in_flight",
               f"more than {cap} pushes of this partner under way at once", 1.0)
    try:
        return await _push(request, node, body, key)
    finally:
        rates.leave(key, "push")


async def _push(request: web.Request, node: Node, body: bytes, key: bytes) -> web.Response:
    with charged(request):
        try:
            envs = msgpack.unpackb(body, raw=False,
                                   max_array_len=node.config.limits.max_batch_records)
        except Exception:  # msgpack raises many types on garbage
            envs = None
    if not isinstance(envs, list) or not all(type(e) is bytes for e in envs):
        msg = (f"push body must be a msgpack array of at most "
               f"{node.config.limits.max_batch_records} bin envelopes")
        node.ingest_role.count_invalid(node.partners.get(key), "malformed_batch", msg)
        raise web.HTTPBadRequest(text=msg)
    res = await node.ingest(envs, source=node.partners.get(key))
    charge(request, res.loop_s)
    return pack(res.to_wire())


async def reconcile(request: web.Request) -> web.Response:
    """One message of a partner's reconciliation session; the answer is ours."""
    node = request.app[NODE_KEY]
    body, key = await partner_body(request)
    if len(body) > MAX_MESSAGE_BYTES:
        raise web.HTTPRequestEntityTooLarge(
            max_size=MAX_MESSAGE_BYTES, actual_size=len(body),
            text=f"a reconciliation message is at most {MAX_MESSAGE_BYTES} bytes")
    link = node.partners.get(key)
    if link is None:  # removed while its request ran
        raise web.HTTPForbidden(text="not a partner of this node")
    _limit_ranges(request, key, body)
    try:
        with charged(request):
            answer = node.gossip.on_reconcile(key, body)
    except InvalidRecord as exc:  # a malformed message: counted on the partner, a 400
        node.ingest_role.count_invalid(link, exc.reason, str(exc))
        raise
    return web.Response(body=answer, content_type=MSGPACK)


def _limit_ranges(request: web.Request, key: bytes, body: bytes) -> None:
    """Raise 429 ``reconcile_rate`` if the ranges this message announces (its array
    header: read before anything is decoded) are over what the partner ``key`` may still
    send ([limits] partner_reconcile_ranges_per_second, four full messages saved up at
    most); the refusal is counted on the partner. A message is answered in one piece
    of the event loop, so its ranges, not its count, are what it costs: answered back to
    back, the largest held every other request back for milliseconds each."""
    node = request.app[NODE_KEY]
    rates = request.app[RATES_KEY]
    rates.configure_ranges(node.config.limits.partner_reconcile_ranges_per_second,
                           RECONCILE_RANGE_BURST)
    n = sync.announced_length(body) or 1  # not an array: one (its decode refuses it)
    wait = rates.take_ranges(key, n, time.monotonic())
    if wait > 0.0:
        refuse(request, key, "reconcile_rate",
               f"more than {rates.ranges_rate:g} reconciliation ranges a second from this "
               f"partner ({RECONCILE_RANGE_BURST} at once)", wait)


def _frontier(node: Node, link: PartnerLink, body: bytes) -> sync.Frontier:
    """A partner's frontier, decoded; a malformed one is counted on the partner (by its
    reason, like every refusal: ``/v1/admin/partners``), then refused with a 400."""
    try:
        return sync.decode_frontier(body)
    except InvalidRecord as exc:
        node.ingest_role.count_invalid(link, exc.reason, str(exc))
        raise


async def sync_handler(request: web.Request) -> web.Response:
    """The legacy frontier exchange (a partner on the previous version still syncs)."""
    node = request.app[NODE_KEY]
    body, key = await partner_body(request, sync.MAX_FRONTIER_FEEDS, "frontier")
    link = node.partners.get(key)
    if link is None:  # removed while its request ran
        raise web.HTTPForbidden(text="not a partner of this node")
    with charged(request):
        theirs = _frontier(node, link, body)
        # Only the feeds this partner may be sent: a partners feed's head stays with its
        # origin's partners (and it would ask, every round, for what it cannot get).
        answer = sync.encode_frontier(node.gossip.on_frontier(key, theirs))
    return web.Response(body=answer, content_type=MSGPACK)


async def fetch(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    body, key = await partner_body(request)
    with charged(request):
        wants = sync.decode_wants(body)
    if node.partners.get(key) is None:  # removed while its request ran
        return pack([])
    envs = await node.reads.serve_fetch(wants, key)
    with charged(request):
        return pack(envs)


async def announce(request: web.Request) -> web.Response:
    """A partner's lazy push: heads (a frontier) of records it holds, without them."""
    node = request.app[NODE_KEY]
    body, key = await partner_body(request, sync.MAX_FRONTIER_FEEDS, "frontier")
    link = node.partners.get(key)
    if link is not None:
        with charged(request):
            node.gossip.on_announce(key, _frontier(node, link, body))
    return web.json_response({"ok": True})


async def graft(request: web.Request) -> web.Response:
    """A partner wants an origin's records pushed eagerly again (body: the origin key)."""
    node = request.app[NODE_KEY]
    body, key = await partner_body(request)
    if node.partners.get(key) is not None and len(body) == 32:
        node.gossip.on_graft(key, body)
    return web.json_response({"ok": True})


async def cards_handler(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    await require_partner(request, b"")
    with charged(request):
        return pack(node.policy.known_cards())


async def _partner_gossip(request: web.Request) -> tuple[Node, bytes, bytes]:
    """``(node, body, sender's key)`` of a signed partner request."""
    node = request.app[NODE_KEY]
    body, key = await partner_body(request)
    return node, body, key


async def post_checkpoint(request: web.Request) -> web.Response:
    node, body, src = await _partner_gossip(request)
    return web.json_response({"result": await node.checkpoints.ingest_checkpoint(body, src)})


async def proofs(request: web.Request) -> web.Response:
    node, body, src = await _partner_gossip(request)
    return web.json_response({"new": await node.checkpoints.ingest_proof(body, src)})
