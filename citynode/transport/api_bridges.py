"""Routes of the bridges in (citynode/bridges/): the endpoints other systems POST to.

``GET /v1/admin/sinks``: the sinks out (citynode/sinks/), their outboxes and refusals.

``POST /v1/bridges/publish?feed=F&type=T`` (operator token): JSON Lines of
``{"subject": text or null, "data": {...}}``, published as one batch: all of them, or
none if any is refused (what ``citynode import csv`` sends, a batch at a time).

``POST /v1/bridges/ngsi/<name>``: the notifications of an NGSI-LD or NGSI-v2 context
broker for a ``[[bridges.ngsi]]`` (operator token: the subscription sends it as a
header). 200 once every entity is a record or a dead letter (the answer says which);
4xx with a reason code for a notification refused whole; 503 when it cannot be handled
now (the broker retries).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from citynode.bridges.ngsi_in import NotificationRefused, Retry
from citynode.core.records import stored_record
from citynode.sinks.config import SDM_CONTEXT
from citynode.sinks.ngsild import context_of, entity_of
from citynode.transport.api_operator import to_leader
from citynode.transport.web import (
    NODE_KEY,
    error_response,
    in_thread,
    read_body,
    require_operator,
    takes,
)

__all__ = ["add_routes", "admin_sinks", "ngsi_ld_page", "ngsi_notify", "publish_batch"]

_MAX_ITEMS = 100_000


def add_routes(app: web.Application) -> None:
    """Register the bridges' routes on ``app``."""
    app.router.add_post("/v1/bridges/ngsi/{name}", ngsi_notify)
    app.router.add_post("/v1/bridges/publish", publish_batch)
    app.router.add_get("/v1/admin/sinks", admin_sinks)


async def ngsi_notify(request: web.Request) -> web.Response:
    require_operator(request)
    node = request.app[NODE_KEY]
    name = request.match_info["name"]
    bridge = node.bridges.ngsi.get(name)
    if bridge is None:
        raise web.HTTPNotFound(text=f"no [[bridges.ngsi]] named {name[:64]!r} in node.toml")
    body = await read_body(request)
    if (answer := await to_leader(request, body)) is not None:
        return answer
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


def _batch_items(body: bytes) -> tuple[list[dict[str, Any]], list[str | None]]:
    """The payloads and subjects of a batch body. Raises HTTPBadRequest."""
    items: list[dict[str, Any]] = []
    subjects: list[str | None] = []
    try:
        lines = body.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise web.HTTPBadRequest(text="body is not UTF-8") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            raise web.HTTPBadRequest(text=f"line {n}: not JSON") from None
        if not isinstance(item, dict) or set(item) - {"subject", "data"} or \
                not isinstance(item.get("data"), dict):
            raise web.HTTPBadRequest(text=f'line {n}: expected {{"subject", "data": {{...}}}}')
        subject = item.get("subject")
        if subject is not None and (not isinstance(subject, str) or not subject):
            raise web.HTTPBadRequest(text=f"line {n}: subject is text (or null)")
        items.append(item["data"])
        subjects.append(subject)
        if len(items) > _MAX_ITEMS:
            raise web.HTTPRequestEntityTooLarge(max_size=_MAX_ITEMS, actual_size=len(items),
                                                text=f"at most {_MAX_ITEMS} items a batch")
    return items, subjects


@takes("feed", "type")
async def publish_batch(request: web.Request) -> web.Response:
    require_operator(request)
    node = request.app[NODE_KEY]
    feed, type_name = request.query.get("feed"), request.query.get("type")
    if not feed or not type_name:
        raise web.HTTPBadRequest(text="publish needs ?feed=...&type=...")
    body = await read_body(request)
    # Several processes sharing one database: the leader signs (api_operator.to_leader).
    if (answer := await to_leader(request, body)) is not None:
        return answer
    items, subjects = _batch_items(body)
    recs = await node.publish(feed, type_name, items, subjects=subjects)
    return web.json_response({"ids": [r.id.hex() for r in recs],
                              "first_seq": recs[0].seq, "last_seq": recs[-1].seq,
                              "access": node.feed_access(feed)})


@takes("refused")
async def admin_sinks(request: web.Request) -> web.Response:
    """The sinks' state and their newest refused deliveries (``?refused=N``, 0-1000)."""
    require_operator(request)
    text = request.query.get("refused", "10")
    if not text.isascii() or not text.isdigit() or int(text) > 1000:
        raise web.HTTPBadRequest(text="refused must be a number from 0 to 1000")
    return web.json_response(await request.app[NODE_KEY].sinks.status(int(text)))


def _entities(rows: list[Any], with_context: bool) -> list[dict[str, Any]]:
    ctx = context_of(SDM_CONTEXT)
    out = []
    for r in rows:
        ent = entity_of(stored_record(r.envelope), r.envelope)
        out.append({**ent, "@context": ctx} if with_context else ent)
    return out


async def ngsi_ld_page(request: web.Request, rows: list[Any], nxt: int | None
                       ) -> web.Response:
    """``GET /v1/records?format=ngsi-ld``: a page of records as NGSI-LD entities
    (normalized; citynode/sinks/ngsild.py), as the NGSI-LD API answers a query:
    ``application/ld+json`` with the ``@context`` in each entity, or, when the client
    accepts only ``application/json``, the context in a ``Link`` header. The next page,
    if any, is the ``Link`` with ``rel="next"``."""
    accept = request.headers.get("Accept", "")
    ld = "application/ld+json" in accept or "application/json" not in accept
    body = await in_thread(_entities, rows, ld)
    links = []
    if not ld:
        links.append(f'<{SDM_CONTEXT}>; rel="http://www.w3.org/ns/json-ld#context"; '
                     'type="application/ld+json"')
    if nxt is not None:
        query = {**request.query, "after": str(nxt)}
        links.append(f'<{request.rel_url.with_query(query)}>; rel="next"')
    resp = web.json_response(body, content_type="application/ld+json" if ld
                             else "application/json")
    if links:
        resp.headers["Link"] = ", ".join(links)
    return resp
