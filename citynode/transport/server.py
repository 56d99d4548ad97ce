"""The HTTPS API of a node (aiohttp). Thin: parse, authenticate, call the node, render.

Three kinds of caller, three kinds of authentication:

* anyone: the node card, health, and public feeds' records;
* partners: ``/v1/push``, ``/v1/sync``, ``/v1/fetch``, ``/v1/cards``, ``/v1/proofs`` need a
  request signed by a listed partner's node key (core/httpsig.py), at most
  ``request_max_age_seconds`` old and never replayed;
* the operator: ``/v1/publish``, ``/v1/admin/*`` and ``/metrics`` need
  ``Authorization: Bearer <operator token>`` (compared in constant time).

Every error is a JSON body ``{"error": reason, "message": text}`` with a 4xx/5xx status;
nothing unverified is stored and one bad client cannot stop the server serving others.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgpack
from aiohttp import web

from citynode import __version__
from citynode.core import httpsig, sync
from citynode.core.checkpoints import encode_consistency, encode_inclusion
from citynode.core.filters import FILTER_PARAMS, RecordFilter, parse_filter
from citynode.core.keys import parse_node_id
from citynode.core.records import (
    decode_envelope,
    parse_body,
)
from citynode.errors import (
    AccessDenied,
    CitynodeError,
    InvalidFilter,
    InvalidNodeId,
    InvalidProof,
    InvalidRecord,
    PayloadError,
    PeerError,
    PublishRefused,
    QueryTooSlow,
    StorageError,
)
from citynode.identity import check_token
from citynode.logs import fields
from citynode.node import Node, Subscriber
from citynode.node.policy import Policy
from citynode.render import b64, parse_json_items, stored_record_json

__all__ = ["build_app", "serve", "ssl_context"]

log = logging.getLogger("citynode.http")
MSGPACK = "application/msgpack"
JSON = "application/json"
NODE_KEY: web.AppKey[Node] = web.AppKey("node", Node)
REPLAY_KEY: web.AppKey[httpsig.ReplayCache] = web.AppKey("replay", httpsig.ReplayCache)
# Signed reads accept any node's key: their nonces live in a cache of their own, so no
# stranger can fill the one partner requests depend on.
READ_REPLAY_KEY: web.AppKey[httpsig.ReplayCache] = web.AppKey("read_replay",
                                                              httpsig.ReplayCache)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")


def _error(status: int, reason: str, message: str) -> web.Response:
    return web.json_response({"error": reason, "message": message}, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Translate our errors into HTTP answers; never leak a traceback."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != JSON:
            return _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason)
        raise
    except PayloadError as exc:
        return _error(422, exc.reason, str(exc))
    except InvalidRecord as exc:
        return _error(400, exc.reason, str(exc))
    except InvalidProof as exc:
        return _error(400, exc.reason, str(exc))
    except InvalidNodeId as exc:
        return _error(400, "invalid", str(exc))
    except AccessDenied as exc:
        return _error(403, "access_denied", str(exc))
    except PublishRefused as exc:
        return _error(409, "publish_refused", str(exc))
    except QueryTooSlow as exc:
        return _error(503, "query_too_slow", str(exc))
    except StorageError as exc:
        log.error("storage error", extra=fields(error=str(exc)))
        return _error(503, "storage", str(exc))
    except PeerError as exc:
        return _error(502, "peer", str(exc))
    except CitynodeError as exc:
        return _error(400, "error", str(exc))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("internal error", extra=fields(path=request.path))
        return _error(500, "internal", "internal error (see the node's log)")


def _wants_json(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return JSON in accept and MSGPACK not in accept


async def _read_body(request: web.Request) -> bytes:
    """Read the whole body within the configured deadline and size (413 when larger)."""
    node = request.app[NODE_KEY]
    try:
        return await asyncio.wait_for(
            request.read(), node.config.limits.read_timeout_seconds
        )
    except TimeoutError:
        raise web.HTTPRequestTimeout(text="request body not received in time") from None
    except web.HTTPRequestEntityTooLarge:
        # Not blamed on a partner: the signature cannot be checked without the body.
        node.ingest_role.count_invalid(None, "too_large",
                                       f"request body over the limit on {request.path}")
        raise


def _require_operator(request: web.Request) -> None:
    node = request.app[NODE_KEY]
    auth = request.headers.get("Authorization", "")
    given = auth[7:] if auth.startswith("Bearer ") else None
    if not check_token(node.identity.token, given):
        raise AccessDenied("operator token missing or wrong (Authorization: Bearer <token>)")


async def _require_partner(request: web.Request, body: bytes) -> bytes:
    """Verify the request signature (made for this node, by a listed partner, fresh, not
    replayed); return the partner's public key. Raises AccessDenied."""
    node = request.app[NODE_KEY]
    return httpsig.verify_request(
        request.method,
        request.rel_url.raw_path_qs,
        request.headers,
        body,
        now_ms=node.now_ms(),
        max_age_ms=int(node.config.limits.request_max_age_seconds * 1000),
        replay=request.app[REPLAY_KEY],
        verifier=node.verifier,
        expected_target=node.node_id,
        authorize=lambda key: node.partners.get(key) is not None,
    )


def _precheck_partner(request: web.Request) -> None:
    """Refuse before reading the body what cannot be a partner's fresh request: no
    strangers' megabytes are buffered. (The full check follows on the body.)"""
    node = request.app[NODE_KEY]
    key = httpsig.claimed_signer(
        request.headers, now_ms=node.now_ms(),
        max_age_ms=int(node.config.limits.request_max_age_seconds * 1000),
    )
    if key is None or node.partners.get(key) is None:
        raise AccessDenied("request not signed by a partner of this node")


async def _partner_body(request: web.Request) -> tuple[bytes, bytes]:
    """The body of a partner request and the partner's key, fully verified."""
    _precheck_partner(request)
    body = await _read_body(request)
    return body, await _require_partner(request, body)


def _is_operator(request: web.Request) -> bool:
    node = request.app[NODE_KEY]
    auth = request.headers.get("Authorization", "")
    return auth.startswith("Bearer ") and check_token(node.identity.token, auth[7:])


def _reader(
    request: web.Request, caller: bytes | None
) -> Callable[[bytes, str, bytes | None], bool]:
    """``may_read(origin, feed, envelope)`` for this request. The operator owns the node
    and reads everything it holds; anyone else is held to each feed's access level."""
    node = request.app[NODE_KEY]
    if _is_operator(request):
        return _reads_all
    return functools.partial(_may_read, node.policy, caller)


def _reads_all(origin: bytes, feed: str, env: bytes | None = None) -> bool:
    return True


def _may_read(policy: Policy, caller: bytes | None, origin: bytes, feed: str,
              env: bytes | None = None) -> bool:
    return policy.may_read(origin, feed, caller, env)


async def _may_read_feed(request: web.Request, caller: bytes | None, origin: bytes,
                         feed: str) -> bool:
    """May the caller read what is about a whole feed (its checkpoints, consistency
    proofs)? The operator reads everything; anyone else as :meth:`Node.may_read_feed`."""
    if _is_operator(request):
        return True
    return await request.app[NODE_KEY].policy.may_read_feed(origin, feed, caller)


async def _caller(request: web.Request) -> bytes | None:
    """The node key that signed a read request, or None for an anonymous reader.

    Any node may sign a read (not only partners): readers of a restricted feed, or
    partners of the feed's origin, are often not partners of the node they read from.
    """
    if "Signature" not in request.headers and "Signature-Input" not in request.headers:
        return None
    node = request.app[NODE_KEY]
    return httpsig.verify_request(
        request.method,
        request.rel_url.raw_path_qs,
        request.headers,
        b"",
        now_ms=node.now_ms(),
        max_age_ms=int(node.config.limits.request_max_age_seconds * 1000),
        replay=request.app[READ_REPLAY_KEY],
        verifier=node.verifier,
        expected_target=node.node_id,
    )


def _decrypt_key(request: web.Request) -> Any:
    """The node's key when the operator asks (its own applications read restricted
    feeds it is a reader of in plaintext); None otherwise: others decrypt themselves."""
    return request.app[NODE_KEY].key if _is_operator(request) else None


def _pack(v: Any) -> web.Response:
    return web.Response(body=msgpack.packb(v, use_bin_type=True), content_type=MSGPACK)


# ------------------------------------------------------------------ public


async def card(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    c = node.policy.card()
    if _wants_json(request):
        from citynode.core.cards import card_to_json

        return web.json_response(card_to_json(c))
    return web.Response(body=c.envelope, content_type=MSGPACK)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def readyz(request: web.Request) -> web.Response:
    ok, detail = await request.app[NODE_KEY].readiness()
    return web.json_response({"ready": ok, **detail}, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    _require_operator(request)
    node = request.app[NODE_KEY]
    node.metrics.db_size.set(await node.reads.db_size())
    return web.Response(body=node.metrics.render(), content_type="text/plain")


def takes(*names: str) -> Callable[[Handler], Handler]:
    """Wrap a handler so that a query parameter it does not take, or one given twice, is
    a 400: a misspelt filter (``feeds=``) must not answer as if there were no filter,
    and of two values only one would count."""
    known = frozenset(names)
    listed = ", ".join(names) or "none"

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def checked(request: web.Request) -> web.StreamResponse:
            q = request.query
            given = set(q.keys())
            if not given <= known or len(given) != len(q):
                for name in q:
                    shown = name if _PARAM_NAME.fullmatch(name) else "(a name)"
                    if name not in known:
                        raise web.HTTPBadRequest(
                            text=f"unknown query parameter {shown}: this endpoint takes "
                                 f"{listed}")
                    if len(q.getall(name)) > 1:
                        raise web.HTTPBadRequest(text=f"query parameter {shown} given "
                                                      "more than once")
            return await handler(request)

        return checked

    return wrap


# The record filters of a stream (core/filters.py reads them); a page of records also
# takes a seq range of one feed.
FILTERS = tuple(n for n in FILTER_PARAMS if n not in ("from_seq", "to_seq"))
# Names echoed in an error: short and plain only (clients quote the message verbatim).
_PARAM_NAME = re.compile(r"[a-z_]{1,32}")


def _int_arg(request: web.Request, name: str, default: int | None = None,
             lo: int = 0, hi: int = 2**62) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"query parameter {name} must be an integer") from None
    if not lo <= v <= hi:
        raise web.HTTPBadRequest(text=f"query parameter {name} must be in {lo}..{hi}")
    return v


def _origin_arg(request: web.Request) -> bytes | None:
    raw = request.query.get("origin")
    return parse_node_id(raw) if raw else None


def _record_filter(request: web.Request, *, paging: tuple[str, ...]) -> RecordFilter:
    """The record filter of a query or stream, parsed once (core/filters.py); the
    parameters in ``paging`` are the handler's own.

    Raises 400 for a filter given but not valid (an empty one included): a filter that
    matched nothing without saying why would leave a stream silent forever. A malformed
    origin is the ``invalid`` of a malformed node id, as everywhere.
    """
    try:
        return parse_filter(request.query.items(), ignore=paging)
    except InvalidFilter as exc:
        if exc.reason == "bad_origin":
            raise InvalidNodeId(str(exc)) from exc
        raise web.HTTPBadRequest(text=str(exc)) from None


async def get_record(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    try:
        rid = bytes.fromhex(request.match_info["rid"])
    except ValueError:
        raise web.HTTPBadRequest(text="record id is 64 hex digits") from None
    if len(rid) != 32:
        raise web.HTTPBadRequest(text="record id is 64 hex digits")
    caller = await _caller(request)
    env = await node.reads.envelope(rid)
    if env is None:
        raise web.HTTPNotFound(text="no such record here")
    body, _sig = decode_envelope(env)
    f = parse_body(body)
    if not _reader(request, caller)(f["origin"], f["feed"], env):
        # Same answer as a missing record: do not confirm that it exists.
        raise web.HTTPNotFound(text="no such record here")
    if _wants_json(request):
        return web.json_response(stored_record_json(env, key=_decrypt_key(request)))
    return web.Response(body=env, content_type=MSGPACK)


async def _readable_feeds(request: web.Request, caller: bytes | None
                          ) -> list[tuple[bytes, str]] | None:
    """The (origin, feed) pairs this caller may list (None: the operator, all of them).
    Restricted feeds are included for authenticated callers; their records are then
    filtered one by one (only their readers get them)."""
    if _is_operator(request):
        return None
    return await request.app[NODE_KEY].reads.readable_feeds(caller)


def sse_event(row: Any, key: Any = None) -> str:
    """One Server-Sent Event for a stored row: ``id`` (its cursor), ``event: record`` and
    the JSON record as ``data`` (JSON has no raw newlines, so one data line)."""
    data = json.dumps(stored_record_json(row.envelope, key=key))
    # CRLF, as aiohttp-sse frames its keep-alive pings on the same stream.
    return f"id: {row.rowid}\r\nevent: record\r\ndata: {data}\r\n\r\n"


def sse_envelope_event(row: Any) -> str:
    """The compact event for a stored row (``?format=envelope``): ``id`` and ``event``
    as :func:`sse_event`, ``data`` = the signed envelope in base64 and nothing else --
    what a subscriber that verifies records itself needs, in about half the bytes."""
    return (f"id: {row.rowid}\r\nevent: record\r\n"
            f"data: {b64(row.envelope)}\r\n\r\n")


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Rendering a page can take a while (large payloads): not on the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _render_events(rows: list[Any], render: Callable[[Any], str]) -> list[str]:
    return [render(row) for row in rows]


def _render_page(rows: list[Any], key: Any) -> list[dict[str, Any]]:
    return [stored_record_json(r.envelope, rowid=r.rowid, key=key) for r in rows]


@takes(*FILTER_PARAMS, "after", "limit")
async def list_records(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    caller = await _caller(request)
    limit = _int_arg(request, "limit", 100, 1, 1000) or 100
    where = _record_filter(request, paging=("after", "limit"))
    after = _int_arg(request, "after", 0, 0, 2**63 - 1) or 0
    # Access is applied inside the query, so rows a caller may not see can neither be
    # returned nor move the cursor (which would reveal that they exist).
    only = await _readable_feeds(request, caller)
    rows = await node.reads.query(where=where, after_rowid=after, limit=limit,
                                  only_feeds=only)
    nxt = rows[-1].rowid if len(rows) == limit else None
    may = _reader(request, caller)
    rows = [r for r in rows if may(r.origin, r.feed, r.envelope)]
    if _wants_json(request):
        # Rendering a page can take a while (large payloads): not on the event loop.
        page = await _in_thread(_render_page, rows, _decrypt_key(request))
        return web.json_response({"records": page, "next": nxt})
    return _pack({"records": [r.envelope for r in rows], "next": nxt})


async def list_feeds(request: web.Request) -> web.Response:
    from citynode.core.keys import node_id

    node = request.app[NODE_KEY]
    caller = await _caller(request)
    rows = await node.reads.feeds()
    # Restricted feeds' heads (not their content) are shown to any authenticated node.
    may = _reader(request, caller)
    rows = [r for r in rows if may(r.origin, r.feed, None)
            or (caller is not None and node.policy.is_restricted(r.origin, r.feed))]
    out = [
        {
            "origin": node_id(r.origin),
            "feed": r.feed,
            "seq": r.seq,
            "head": r.head.hex(),
            "count": r.count,
            "last_time": r.last_time,
        }
        for r in rows
    ]
    return web.json_response({"feeds": out})


@takes(*FILTERS, "after", "format")
async def stream(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events of stored records matching a filter, oldest first.

    Each event: ``id`` = the record's cursor, ``event: record``, ``data`` = the JSON
    record (with its signed envelope). Resume with ``Last-Event-ID`` (or ``?after=``):
    the stream replays everything after that cursor from the database, then follows new
    records live, so a reconnecting subscriber misses nothing and gets nothing twice.
    Without either it starts with records stored from now on. The first event is that
    starting cursor alone (``id`` and nothing else). ``format=envelope``: each
    event's ``data`` is the base64 envelope alone (the subscriber verifies and, if a
    reader, opens it; the node decrypts nothing). An invalid filter is a 400
    before the stream opens. When the node shuts down the stream ends (the response
    completes normally) and the subscriber resumes by cursor.
    """
    from aiohttp_sse import sse_response

    node = request.app[NODE_KEY]
    caller = await _caller(request)
    where = _record_filter(request, paging=("after", "format"))
    last = request.headers.get("Last-Event-ID") or request.query.get("after")
    if last is not None:
        try:
            cursor = int(last)
        except ValueError:
            cursor = -1
        if not 0 <= cursor < 2**63:
            raise web.HTTPBadRequest(text="Last-Event-ID must be a cursor (an integer)")
    else:
        cursor = node.streams.tail_rowid()
    may = _reader(request, caller)
    matches = where.matches

    def match(row: Any) -> bool:
        return matches(row) and may(row.origin, row.feed, row.envelope)

    refusal = node.streams.refusal()
    if refusal is not None:
        raise web.HTTPServiceUnavailable(text=refusal)
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "envelope"):
        raise web.HTTPBadRequest(text="format must be json (the default) or envelope")
    envelope_only = fmt == "envelope"
    # The compact format carries the sealed envelope: a reader decrypts it itself.
    key = None if envelope_only else _decrypt_key(request)
    render: Callable[[Any], str]
    if envelope_only:
        render = sse_envelope_event
    elif key is not None:
        render = functools.partial(sse_event, key=key)
    else:
        render = sse_event
    # Streams that see the same rows share the tail's matching and rendering (the
    # operator's, decrypting with its key, is a group of its own).
    group = None if key is not None else (where, caller, _is_operator(request), fmt)
    sub = Subscriber(match, render, group=group, on_lag=node.metrics.stream_lagged.inc)
    node.streams.open(sub)  # before catching up, so nothing falls in between
    resp: web.StreamResponse | None = None
    try:
        async with sse_response(request, ping_interval=15) as resp:
            # First, the cursor the stream starts after, as an event with an id alone
            # (an EventSource takes it as its last event id; nothing is dispatched):
            # a subscriber cut off before the first record resumes from here, not
            # from "now" again, which would lose what came in between.
            await resp.write(f"id: {cursor}\r\n\r\n".encode())
            # Until the node shuts down (sub.close()): then the response ends properly
            # and the subscriber resumes by cursor (after the restart, or elsewhere).
            while not sub.closed:
                # Catch up from the database until the page is short. The tail skips a
                # lagging stream, so the flag is cleared BEFORE reading: rows the tail
                # skipped are then in the pages read, and rows after them are queued
                # (the cursor drops what both bring).
                sub.lagging = False
                while True:
                    try:
                        rows = await node.reads.query(where=where, after_rowid=cursor,
                                                      limit=500)
                    except QueryTooSlow as exc:
                        # The answer has begun: say why it ends, as an event.
                        err = json.dumps({"error": "query_too_slow", "message": str(exc)})
                        await resp.write(f"event: error\r\ndata: {err}\r\n\r\n".encode())
                        return resp
                    visible = [row for row in rows if match(row)]
                    out = (await _in_thread(_render_events, visible, render)
                           if visible else [])
                    if out:
                        await resp.write("".join(out).encode())
                    if rows:
                        cursor = rows[-1].rowid
                    if len(rows) < 500 or sub.closed:
                        break
                # Live: events from the shared tail, skipping what the catch-up sent;
                # whatever has queued up meanwhile goes out in one write.
                while not sub.lagging and not sub.closed:
                    batches = [await sub.queue.get()]
                    while not sub.queue.empty() and len(batches) < 100:
                        batches.append(sub.queue.get_nowait())
                    chunks = []
                    for b in batches:
                        if b is not None and b.rowids[-1] > cursor:
                            chunks.append(b.after(cursor))
                            cursor = b.rowids[-1]
                    if chunks:
                        await resp.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))
                while not sub.queue.empty():  # stale: the database has these rows
                    sub.queue.get_nowait()
    except ConnectionResetError:
        # The subscriber hung up mid-write: nothing is wrong, and there is no one to
        # answer (aiohttp's reset error is a ConnectionResetError too).
        return resp if resp is not None else web.Response()
    finally:
        node.streams.drop(sub)
    return resp


# ------------------------------------------------------------------ operator


@takes("feed", "type", "subject")
async def publish(request: web.Request) -> web.Response:
    _require_operator(request)
    node = request.app[NODE_KEY]
    feed = request.query.get("feed")
    type_name = request.query.get("type")
    if not feed or not type_name:
        raise web.HTTPBadRequest(text="publish needs ?feed=...&type=...")
    body = await _read_body(request)
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


async def admin_partners(request: web.Request) -> web.Response:
    _require_operator(request)
    node = request.app[NODE_KEY]
    if request.method == "POST":
        body = await _read_body(request)
        try:
            req = json.loads(body)
            url, pid = str(req["url"]), str(req["id"])
        except (ValueError, KeyError, TypeError):
            raise web.HTTPBadRequest(text='send {"url": "...", "id": "cn1..."}') from None
        row = await node.add_partner(url, pid)
        return web.json_response({"added": row.node_id, "name": row.name})
    return web.json_response({"partners": node.partners.status()})


async def admin_partner_delete(request: web.Request) -> web.Response:
    _require_operator(request)
    gone = await request.app[NODE_KEY].remove_partner(request.match_info["pid"])
    if not gone:
        raise web.HTTPNotFound(text="no such partner")
    return web.json_response({"removed": request.match_info["pid"]})


async def admin_sync(request: web.Request) -> web.Response:
    _require_operator(request)
    return web.json_response({"partners": request.app[NODE_KEY].partners.sync_all()})


async def admin_status(request: web.Request) -> web.Response:
    _require_operator(request)
    return web.json_response(request.app[NODE_KEY].status())


# ------------------------------------------------------------------ partners


async def push(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    body, key = await _partner_body(request)
    try:
        envs = msgpack.unpackb(body, raw=False, max_array_len=node.config.limits.max_batch_records)
    except Exception:  # msgpack raises many types on garbage
        envs = None
    if not isinstance(envs, list) or not all(type(e) is bytes for e in envs):
        msg = (f"push body must be a msgpack array of at most "
               f"{node.config.limits.max_batch_records} bin envelopes")
        node.ingest_role.count_invalid(node.partners.get(key), "malformed_batch", msg)
        raise web.HTTPBadRequest(text=msg)
    res = await node.ingest(envs, source=node.partners.get(key))
    return _pack(res.to_wire())


async def sync_handler(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    body, key = await _partner_body(request)
    theirs = sync.decode_frontier(body)
    link = node.partners.get(key)
    if link is None:  # removed while its request ran
        raise web.HTTPForbidden(text="not a partner of this node")
    # Only the feeds this partner may be sent: a partners feed's head stays with its
    # origin's partners (and it would ask, every round, for what it cannot get).
    return web.Response(body=sync.encode_frontier(node.gossip.on_sync_request(link, theirs)),
                        content_type=MSGPACK)


async def fetch(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    body, key = await _partner_body(request)
    wants = sync.decode_wants(body)
    envs = await node.gossip.serve_fetch(wants, key)
    return _pack(envs)


async def announce(request: web.Request) -> web.Response:
    """A partner's lazy push: heads (a frontier) of records it holds, without them."""
    node = request.app[NODE_KEY]
    body, key = await _partner_body(request)
    link = node.partners.get(key)
    if link is not None:
        node.gossip.on_announce(link, sync.decode_frontier(body))
    return web.json_response({"ok": True})


async def graft(request: web.Request) -> web.Response:
    """A partner wants an origin's records pushed eagerly again (body: the origin key)."""
    node = request.app[NODE_KEY]
    body, key = await _partner_body(request)
    link = node.partners.get(key)
    if link is not None and len(body) == 32:
        node.gossip.on_graft(link, body)
    return web.json_response({"ok": True})


async def cards_handler(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    await _require_partner(request, b"")
    return _pack(node.policy.known_cards())


async def _partner_gossip(request: web.Request) -> tuple[Node, bytes, str]:
    """``(node, body, sender's node id)`` of a signed partner request."""
    node = request.app[NODE_KEY]
    body, key = await _partner_body(request)
    link = node.partners.get(key)
    return node, body, link.row.node_id if link else "?"


async def post_checkpoint(request: web.Request) -> web.Response:
    node, body, src = await _partner_gossip(request)
    return web.json_response({"result": await node.checkpoints.ingest_checkpoint(body, src)})


@takes("origin", "feed")
async def get_checkpoints(request: web.Request) -> web.Response:
    """Signed checkpoints held of a feed (any origin), by size."""
    node = request.app[NODE_KEY]
    caller = await _caller(request)
    origin = _origin_arg(request)
    feed = request.query.get("feed")
    if origin is None or not feed:
        raise web.HTTPBadRequest(text="checkpoints need ?origin=cn1...&feed=...")
    # A feed of which nothing is held answers as one the caller may not read: the two
    # look alike. (Checkpoints may come before records, or for a feed whose records are
    # not relayed here: those are served.)
    if not await _may_read_feed(request, caller, origin, feed):
        raise web.HTTPNotFound(text="no such feed here")
    held = await node.checkpoints.held(origin, feed)
    if not held and node.chains.seq((origin, feed)) == 0:
        raise web.HTTPNotFound(text="no such feed here")
    if _wants_json(request):
        return web.json_response({"checkpoints": [
            {"size": s, "root": r.hex(), "envelope": b64(e)} for s, r, e in held]})
    return _pack([e for _s, _r, e in held])


@takes("id", "size")
async def inclusion_proof(request: web.Request) -> web.Response:
    """Inclusion proof of a record in its feed's tree at ``size`` (default: the latest
    checkpoint of that feed that covers the record)."""
    node = request.app[NODE_KEY]
    caller = await _caller(request)
    try:
        rid = bytes.fromhex(request.query.get("id", ""))
    except ValueError:
        rid = b""
    if len(rid) != 32:
        raise web.HTTPBadRequest(text="?id= must be a record id (64 hex digits)")
    env = await node.reads.envelope(rid)
    if env is None:
        raise web.HTTPNotFound(text="no such record here")
    f = parse_body(decode_envelope(env)[0])
    if not _reader(request, caller)(f["origin"], f["feed"], env):
        raise web.HTTPNotFound(text="no such record here")
    size = _int_arg(request, "size", None, 1)
    held = await node.checkpoints.held(f["origin"], f["feed"])
    cp_env = next((e for s, _r, e in held if s == size), None)
    if size is None:
        covering = [(s, e) for s, _r, e in held if s >= f["seq"]]
        if not covering:
            raise web.HTTPNotFound(
                text="no checkpoint covers this record yet: its origin signs one every "
                     "[checkpoints] interval_seconds (60 s by default); try again then")
        size, cp_env = covering[-1]
    if size < f["seq"]:
        raise web.HTTPBadRequest(text=f"a tree of size {size} does not hold seq {f['seq']}")
    log_ = await node.checkpoints.merkle_log(f["origin"], f["feed"], size)
    path = log_.inclusion_proof(f["seq"] - 1, size)
    _check_anchor(cp_env, log_.root(size), size)
    if _wants_json(request):
        return web.json_response({"index": f["seq"] - 1, "size": size,
                                  "root": log_.root(size).hex(),
                                  "path": [p.hex() for p in path],
                                  "checkpoint": b64(cp_env) if cp_env else None})
    return web.Response(body=encode_inclusion(f["seq"] - 1, size, path),
                        content_type=MSGPACK)


def _check_anchor(cp_env: bytes | None, root: bytes, size: int) -> None:
    """A proof is served beside the origin's checkpoint of its size only if that
    checkpoint's root is the one computed from the records held: else 409 (the origin
    showed a different tree of this size somewhere: a split view)."""
    if cp_env is None:
        return
    from citynode.core.checkpoints import open_checkpoint
    from citynode.core.keys import Verifier

    if open_checkpoint(cp_env, verifier=Verifier()).root != root:
        raise web.HTTPConflict(
            text=f"the origin's signed checkpoint of size {size} disagrees with the records "
                 "held here: a split view (`citynode forks` lists such proofs)")


@takes("origin", "feed", "old", "new")
async def consistency_proof(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    caller = await _caller(request)
    origin = _origin_arg(request)
    feed = request.query.get("feed")
    old = _int_arg(request, "old", None, 0)
    new = _int_arg(request, "new", None, 0)
    if origin is None or not feed or old is None or new is None or old > new:
        raise web.HTTPBadRequest(text="need ?origin=&feed=&old=&new= with old <= new")
    if node.chains.seq((origin, feed)) == 0 or not await _may_read_feed(request, caller, origin,
                                                                     feed):
        raise web.HTTPNotFound(text="no such feed here")
    log_ = await node.checkpoints.merkle_log(origin, feed, new)
    path = log_.consistency_proof(old, new)
    # The origin's own checkpoints of these sizes, when held: what anchors the roots.
    held = {s: e for s, _r, e in await node.checkpoints.held(origin, feed)}
    _check_anchor(held.get(old), log_.root(old), old)
    _check_anchor(held.get(new), log_.root(new), new)
    if _wants_json(request):
        return web.json_response({"old_size": old, "new_size": new,
                                  "old_root": log_.root(old).hex(),
                                  "new_root": log_.root(new).hex(),
                                  "path": [p.hex() for p in path],
                                  "old_checkpoint": b64(held[old]) if old in held else None,
                                  "new_checkpoint": b64(held[new]) if new in held else None})
    return web.Response(body=encode_consistency(old, new, path), content_type=MSGPACK)


async def proofs(request: web.Request) -> web.Response:
    node, body, src = await _partner_gossip(request)
    return web.json_response({"new": await node.checkpoints.ingest_proof(body, src)})


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
    r.add_get("/.well-known/citynode", card)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics)
    r.add_get("/v1/records", list_records)
    r.add_get("/v1/records/{rid}", get_record)
    r.add_get("/v1/feeds", list_feeds)
    r.add_get("/v1/stream", stream)
    r.add_post("/v1/publish", publish)
    r.add_get("/v1/admin/status", admin_status)
    r.add_post("/v1/admin/sync", admin_sync)
    r.add_route("GET", "/v1/admin/partners", admin_partners)
    r.add_route("POST", "/v1/admin/partners", admin_partners)
    r.add_delete("/v1/admin/partners/{pid}", admin_partner_delete)
    r.add_post("/v1/push", push)
    r.add_post("/v1/sync", sync_handler)
    r.add_post("/v1/fetch", fetch)
    r.add_get("/v1/cards", cards_handler)
    r.add_post("/v1/announce", announce)
    r.add_post("/v1/graft", graft)
    r.add_post("/v1/proofs", proofs)
    r.add_post("/v1/checkpoints", post_checkpoint)
    r.add_get("/v1/checkpoints", get_checkpoints)
    r.add_get("/v1/proofs/inclusion", inclusion_proof)
    r.add_get("/v1/proofs/consistency", consistency_proof)
    return app


def ssl_context(node: Node) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(node.identity.cert_path, node.identity.key_path)
    return ctx


def _cap_connections(server: Any, cap: int, refused: Callable[[], None]) -> None:
    """Close each connection that arrives while ``cap`` are open.

    aiohttp has no connection limit; every new connection's handler reports to its
    server's ``connection_made`` (after the TLS handshake), so the check goes there.
    """
    if server is None:
        return
    made = server.connection_made

    def connection_made(handler: Any, transport: asyncio.Transport) -> None:
        made(handler, transport)
        if len(server.connections) > cap:
            refused()
            transport.close()

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
    _cap_connections(runner.server, lim.max_connections, node.metrics.connections_refused.inc)
    ctx = ssl_context(node) if node.config.tls.enabled else None
    site = web.TCPSite(runner, host, port, ssl_context=ctx)
    await site.start()
    return runner
