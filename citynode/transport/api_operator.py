"""The operator's API (bearer token): publish, erase, partners, sync, status, metrics;
and the feeds' terms and liveness (``/v1/liveness``: anyone, for the feeds they may
list)."""

from __future__ import annotations

import base64
import binascii
import json
from typing import cast

from aiohttp import web

from citynode.core.cards import card_to_json
from citynode.core.keylog import MAX_EVENT_BYTES
from citynode.core.liveness import STATES
from citynode.errors import NoLeader
from citynode.node.leader import FORWARDED_HEADER
from citynode.render import parse_json_items
from citynode.transport.web import (
    NODE_KEY,
    error_response,
    is_operator,
    origin_arg,
    pack,
    read_body,
    require_operator,
    signed_caller,
    takes,
    wants_json,
)

__all__ = [
    "admin_bridges",
    "admin_erase",
    "admin_key_recover",
    "admin_key_recover_prepare",
    "admin_key_rotate",
    "admin_partner_delete",
    "admin_partners",
    "admin_status",
    "admin_sync",
    "admin_tls_renew",
    "card_history",
    "liveness",
    "metrics",
    "publish",
    "to_leader",
]

async def metrics(request: web.Request) -> web.Response:
    require_operator(request)
    node = request.app[NODE_KEY]
    node.metrics.db_size.set(await node.reads.db_size())
    counts = dict.fromkeys(STATES, 0)
    states = node.checkpoints.states()
    for f in states:
        counts[str(f["state"])] += 1
    for state, n in counts.items():
        node.metrics.liveness.labels(state).set(n)
    node.metrics.set_feed_states([(node.policy.name(cast(bytes, f["origin"])), str(f["feed"]),
                                   str(f["state"])) for f in states], node.node_id)
    return web.Response(body=node.metrics.render(), content_type="text/plain")


async def to_leader(request: web.Request, body: bytes) -> web.Response | None:
    """On a process that does not lead (several sharing one database), the leader's
    answer to this request, handed on to it (node/leader.py); None on the leader. A
    request handed on already is not handed on again. No leader to hand it on to: 503
    ``no_leader``, with Retry-After (a takeover takes a few seconds)."""
    leader = request.app[NODE_KEY].leader
    if leader.leading:
        return None
    try:
        if leader.taking_over:
            raise NoLeader("this process is taking over the leadership (reading the "
                           "database's chain heads): retry in a moment")
        if request.headers.get(FORWARDED_HEADER):
            raise NoLeader("the process this was handed on to does not lead any more: "
                           "retry in a few seconds")
        out = await leader.forward(request.method, request.path_qs, request.headers, body)
    except NoLeader as exc:
        resp = error_response(503, "no_leader", str(exc))
        resp.headers["Retry-After"] = "2"
        return resp
    return web.Response(status=out.status, body=out.body,
                        headers={"Content-Type": out.content_type})


@takes("feed", "type", "subject")
async def publish(request: web.Request) -> web.Response:
    require_operator(request)
    node = request.app[NODE_KEY]
    feed = request.query.get("feed")
    type_name = request.query.get("type")
    if not feed or not type_name:
        raise web.HTTPBadRequest(text="publish needs ?feed=...&type=...")
    body = await read_body(request)
    if (answer := await to_leader(request, body)) is not None:
        return answer
    try:
        items = parse_json_items(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise web.HTTPBadRequest(text="body is not UTF-8 JSON") from None
    except ValueError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    if len(items) > 100_000:
        raise web.HTTPRequestEntityTooLarge(
            max_size=100_000, actual_size=len(items), text="at most 100000 items per call"
        )
    subject = request.query.get("subject")
    if subject == "":
        raise web.HTTPBadRequest(text="query parameter subject is empty (leave it out for none)")
    recs = await node.publish(
        feed, type_name, items, subjects=[subject] * len(items) if subject else None
    )
    return web.json_response(
        {"ids": [r.id.hex() for r in recs], "first_seq": recs[0].seq, "last_seq": recs[-1].seq,
         "access": node.feed_access(feed)}
    )


async def admin_key_rotate(request: web.Request) -> web.Response:
    """``POST`` (empty, or ``{"next_seed": hex, "next_passphrase": text}``): rotate this
    node's signing key to the pre-committed next one (``citynode key rotate``), read
    from node.next.key, or given unsealed by the operator with the passphrase to seal
    the fresh next key with; answers ``{node_id, seq, key}``."""
    require_operator(request)
    body = await read_body(request)
    if (answer := await to_leader(request, body)) is not None:
        return answer
    seed, npw = None, None
    if body:
        try:
            req = json.loads(body)
            seed = bytes.fromhex(str(req["next_seed"]))
            npw = str(req["next_passphrase"])
            if len(seed) != 32 or not npw:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise web.HTTPBadRequest(
                text='send nothing, or {"next_seed": "<64 hex>", "next_passphrase": "..."}'
            ) from None
    return web.json_response(await request.app[NODE_KEY].keychanges.rotate(seed, npw))


async def admin_key_recover_prepare(request: web.Request) -> web.Response:
    """``POST {"last_good": {feed: seq}, "drop_feeds": [feed], "next_passphrase": text
    or null}``: step 1 of a recovery (``citynode key recover-prepare``): the node makes
    its new signing and next keys and answers the request for the recovery key to sign
    away from it (citynode/recovery.py); it signs nothing until the recovery is applied
    or cancelled. ``DELETE``: cancel a prepared recovery (``{"cancelled": bool}``). No
    recovery secret is ever sent here."""
    require_operator(request)
    body = await read_body(request)
    if (answer := await to_leader(request, body)) is not None:
        return answer
    keychanges = request.app[NODE_KEY].keychanges
    if request.method == "DELETE":
        return web.json_response({"cancelled": await keychanges.cancel_recovery()})
    try:
        req = json.loads(body)
        last_good = {str(f): s for f, s in dict(req["last_good"]).items()}
        drops = req.get("drop_feeds", [])
        # A list of names only: list("abc") would drop feeds a, b and c.
        if not isinstance(drops, list) or not all(isinstance(f, str) for f in drops):
            raise ValueError
        drop = frozenset(drops)
        npw = req.get("next_passphrase")
        if (any(type(s) is not int or s < 1 for s in last_good.values())
                or (npw is not None and (not isinstance(npw, str) or not npw))
                or "recovery_seed" in req):
            raise ValueError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise web.HTTPBadRequest(
            text='send {"last_good": {"feed": seq, ...}, "drop_feeds": ["feed", ...], '
                 '"next_passphrase": "..." or null} (never a recovery key)') from None
    return web.json_response(await keychanges.prepare_recovery(last_good, drop, npw))


async def admin_key_recover(request: web.Request) -> web.Response:
    """``POST {"event": base64}``: step 3 of a recovery (``citynode key recover
    --event``): apply the recovery event signed away from the node (``citynode key
    recover-sign``) for the request this node prepared; answers ``{node_id, seq,
    key}``. The recovery key itself is never sent here: a body naming
    ``recovery_seed`` is refused, 400."""
    require_operator(request)
    body = await read_body(request)
    if (answer := await to_leader(request, body)) is not None:
        return answer
    try:
        req = json.loads(body)
        if "recovery_seed" in req:
            raise web.HTTPBadRequest(
                text="the recovery key never goes to the node: prepare the recovery here "
                     "(citynode key recover-prepare), sign its request where the recovery "
                     "file is (citynode key recover-sign), and send the signed event")
        envelope = base64.b64decode(str(req["event"]), validate=True)
        if not envelope or len(envelope) > MAX_EVENT_BYTES + 128:
            raise ValueError
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise web.HTTPBadRequest(
            text='send {"event": "<base64 of the signed recovery event>"}') from None
    out = await request.app[NODE_KEY].keychanges.apply_recovery(envelope)
    return web.json_response(out)


async def admin_tls_renew(request: web.Request) -> web.Response:
    """``POST {"switch": bool}``: stage a new TLS certificate (named in the card next
    to the one in force), or switch to the staged one (``citynode tls renew``);
    answers ``{tls, tls_next}``, the fingerprints the card now names."""
    require_operator(request)
    body = await read_body(request)
    try:
        switch = json.loads(body or b"{}").get("switch", False)
        if type(switch) is not bool:
            raise ValueError
    except (ValueError, AttributeError):
        raise web.HTTPBadRequest(text='send {"switch": false} or {"switch": true}') from None
    return web.json_response(await request.app[NODE_KEY].keychanges.renew_tls(switch))


async def admin_erase(request: web.Request) -> web.Response:
    """``POST {"ids": [record id hex, ...], "reason": text}``: publish an erasure request
    for records of this node; answers the request's ``id``, ``seq`` and the ``erased``
    ids."""
    require_operator(request)
    body = await read_body(request)
    if (answer := await to_leader(request, body)) is not None:
        return answer
    try:
        req = json.loads(body)
        ids = [bytes.fromhex(str(i)) for i in req["ids"]]
        reason = req["reason"]
    except (ValueError, KeyError, TypeError):
        raise web.HTTPBadRequest(
            text='send {"ids": ["<record id, 64 hex digits>", ...], "reason": "..."}'
        ) from None
    if any(len(i) != 32 for i in ids) or not isinstance(reason, str):
        raise web.HTTPBadRequest(text="a record id is 64 hex digits; reason is text")
    rec = await request.app[NODE_KEY].erase(ids, reason)
    return web.json_response({"id": rec.id.hex(), "seq": rec.seq,
                              "erased": [i.hex() for i in dict.fromkeys(ids)]})


async def admin_partners(request: web.Request) -> web.Response:
    require_operator(request)
    node = request.app[NODE_KEY]
    if request.method == "POST":
        body = await read_body(request)
        try:
            req = json.loads(body)
            url, pid = str(req["url"]), str(req["id"])
        except (ValueError, KeyError, TypeError):
            raise web.HTTPBadRequest(text='send {"url": "...", "id": "cn1..."}') from None
        row = await node.add_partner(url, pid)
        return web.json_response({"added": row.node_id, "name": row.name})
    return web.json_response({"partners": node.partners.status()})


async def admin_partner_delete(request: web.Request) -> web.Response:
    require_operator(request)
    gone = await request.app[NODE_KEY].remove_partner(request.match_info["pid"])
    if not gone:
        raise web.HTTPNotFound(text="no such partner")
    return web.json_response({"removed": request.match_info["pid"]})


async def admin_sync(request: web.Request) -> web.Response:
    require_operator(request)
    return web.json_response({"partners": request.app[NODE_KEY].partners.sync_all()})


async def admin_status(request: web.Request) -> web.Response:
    require_operator(request)
    return web.json_response(request.app[NODE_KEY].status())


@takes("dead_letters")
async def admin_bridges(request: web.Request) -> web.Response:
    """The bridges' state and their newest dead letters (``?dead_letters=N``, 0-1000)."""
    require_operator(request)
    text = request.query.get("dead_letters", "20")
    if not text.isascii() or not text.isdigit() or int(text) > 1000:
        raise web.HTTPBadRequest(text="dead_letters must be a number from 0 to 1000")
    return web.json_response(await request.app[NODE_KEY].bridges.status(int(text)))


async def liveness(request: web.Request) -> web.Response:
    """Every feed held or heard of that the caller may list (the operator: all), with
    its liveness state and the terms and retention of the newest card of its origin:
    ``{"feeds": [{origin, feed, state, head, signed_size, signed_time, cadence_s,
    behind_since, terms, retention_days}]}`` (docs/API.md)."""
    node = request.app[NODE_KEY]
    operator = is_operator(request)
    caller = None if operator else await signed_caller(request)
    out = []
    for f in node.checkpoints.states():
        origin, feed = f["origin"], f["feed"]
        assert isinstance(origin, bytes) and isinstance(feed, str)
        if not operator and not node.policy.may_list(origin, feed, caller):
            continue
        terms = node.policy.current_terms(origin, feed)
        out.append({**f, "origin": node.policy.name(origin),
                    "terms": terms.terms() if terms is not None else None,
                    "retention_days": terms.retention_days if terms is not None else None})
    return web.json_response({"feeds": out})


@takes("origin")
async def card_history(request: web.Request) -> web.Response:
    """The card history held of an origin (``?origin=cn1...``): its last signed cards,
    oldest first, which decide the terms in force for its records (docs/PROTOCOL.md,
    "Feed terms"). A msgpack array of card envelopes, or ``{"cards": [JSON cards]}``.
    Served to whoever may list one of the origin's feeds held here (the operator:
    always); otherwise 404, as for an origin of which nothing is held."""
    node = request.app[NODE_KEY]
    origin = origin_arg(request)
    if origin is None:
        raise web.HTTPBadRequest(text="card history needs ?origin=cn1...")
    if not is_operator(request) and origin != node.policy.public_key:
        caller = await signed_caller(request)
        feeds = {f for (o, f) in list(node.replica.heads) if o == origin}
        if not any(node.policy.may_list(origin, f, caller) for f in feeds):
            raise web.HTTPNotFound(text="no card history of that origin here")
    hist = await node.policy.card_history(origin)
    if wants_json(request):
        return web.json_response({"cards": [card_to_json(c) for c in hist]})
    return pack([c.envelope for c in hist])
