"""Routes of the bridges in (citynode/bridges/): the endpoints other systems POST to.

``POST /v1/bridges/ngsi/<name>``: the notifications of an NGSI-LD or NGSI-v2 context
broker for a ``[[bridges.ngsi]]`` (operator token: the subscription sends it as a
header). 200 once every entity is a record or a dead letter (the answer says which);
4xx with a reason code for a notification refused whole; 503 when it cannot be handled
now (the broker retries).
"""

from __future__ import annotations

from aiohttp import web

from citynode.bridges.ngsi_in import NotificationRefused, Retry
from citynode.transport.web import NODE_KEY, error_response, read_body, require_operator

__all__ = ["add_routes", "ngsi_notify"]


def add_routes(app: web.Application) -> None:
    """Register the bridges' routes on ``app``."""
    app.router.add_post("/v1/bridges/ngsi/{name}", ngsi_notify)


async def ngsi_notify(request: web.Request) -> web.Response:
    require_operator(request)
    node = request.app[NODE_KEY]
    name = request.match_info["name"]
    bridge = node.bridges.ngsi.get(name)
    if bridge is None:
        raise web.HTTPNotFound(text=f"no [[bridges.ngsi]] named {name[:64]!r} in node.toml")
    body = await read_body(request)
    try:
        out = await bridge.notify(body, request.content_type, request.headers.get("Link"),
                                  request.headers.get("Ngsiv2-AttrsFormat"))
    except NotificationRefused as exc:
        return error_response(exc.status, exc.reason, str(exc))
    except Retry as exc:
        resp = error_response(503, "retry", str(exc))
        resp.headers["Retry-After"] = "5"
        return resp
    return web.json_response(out)
