"""Witness cosignatures (docs/PROTOCOL.md, "Cosignatures"; the node's witness role):
``POST /v1/cosignatures``, a cosigned checkpoint from a partner (signed request), and
``GET /v1/cosignatures``, the cosignatures held of a feed's checkpoints (read policy)."""

from __future__ import annotations

from aiohttp import web

from citynode.core import cosign as cs
from citynode.render import b64
from citynode.transport.web import (
    NODE_KEY,
    int_arg,
    may_read_feed,
    origin_arg,
    pack,
    partner_body,
    signed_caller,
    takes,
    wants_json,
)

__all__ = ["get_cosignatures", "post_cosignatures"]


async def post_cosignatures(request: web.Request) -> web.Response:
    """A partner's cosigned checkpoint: the checkpoint taken as ``POST /v1/checkpoints``
    takes it, each cosignature verified and kept or refused with a reason."""
    node = request.app[NODE_KEY]
    body, src = await partner_body(request)
    return web.json_response(await node.witness.ingest(body, src))


@takes("origin", "feed", "size")
async def get_cosignatures(request: web.Request) -> web.Response:
    """The checkpoints held of a feed (``?size=``: of that size) with their
    cosignatures, and whether each is trusted by this node's ``[witness]`` quorum."""
    node = request.app[NODE_KEY]
    caller = await signed_caller(request)
    origin = origin_arg(request)
    feed = request.query.get("feed")
    size = int_arg(request, "size", None, 0)
    if origin is None or not feed:
        raise web.HTTPBadRequest(text="cosignatures need ?origin=cn...&feed=...[&size=N]")
    if not await may_read_feed(request, caller, origin, feed):
        raise web.HTTPNotFound(text="no such feed here")
    rows = await node.witness.cosigned(origin, feed, size)
    if not rows and node.seq((origin, feed)) == 0:
        # As GET /v1/checkpoints: a feed of which nothing is held looks like one the
        # caller may not read.
        raise web.HTTPNotFound(text="no such feed here")
    if wants_json(request):
        keys = node.policy.keys
        return web.json_response({"checkpoints": [{
            "size": r["size"], "root": r["root"].hex(), "checkpoint": b64(r["checkpoint"]),
            "trusted": r["trusted"],
            "cosignatures": [{"witness": keys.name(w), "envelope": b64(e)}
                             for w, e in r["cosignatures"]]} for r in rows]})
    return pack([cs.CosignedCheckpoint(r["checkpoint"],
                                       tuple(e for _w, e in r["cosignatures"])).encode()
                 for r in rows])
