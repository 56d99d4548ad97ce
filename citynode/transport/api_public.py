"""Public reads: the node card, health, records, feeds, checkpoints and proofs, each
held to the read policy (a feed's access level; the operator reads everything)."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import weakref
from typing import Any

from aiohttp import web

from citynode import __version__
from citynode.core import keylog
from citynode.core.checkpoints import encode_consistency, encode_inclusion
from citynode.core.filters import FILTER_PARAMS
from citynode.core.keylog import MAX_LOG_BYTES
from citynode.core.keys import Verifier
from citynode.core.records import (
    decode_record,
    is_tombstone,
    parse_body,
)
from citynode.errors import InvalidNodeId, InvalidRecord
from citynode.render import b64, row_json, stored_record_json
from citynode.transport.web import (
    MSGPACK,
    NODE_KEY,
    decrypt_key,
    error_response,
    in_thread,
    int_arg,
    is_operator,
    may_read_feed,
    origin_arg,
    pack,
    read_body,
    read_check,
    record_filter,
    request_signer,
    signed_caller,
    takes,
    wants_json,
)

__all__ = [
    "card",
    "consistency_proof",
    "get_checkpoints",
    "get_key_log",
    "get_record",
    "healthz",
    "inclusion_proof",
    "list_feeds",
    "list_records",
    "post_key_log",
    "readyz",
]

async def card(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    c = node.policy.card()
    if wants_json(request):
        from citynode.core.cards import card_to_json

        return web.json_response(card_to_json(c))
    return web.Response(body=c.envelope, content_type=MSGPACK)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def readyz(request: web.Request) -> web.Response:
    ok, detail = await request.app[NODE_KEY].readiness()
    return web.json_response({"ready": ok, **detail}, status=200 if ok else 503)


async def get_record(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    try:
        rid = bytes.fromhex(request.match_info["rid"])
    except ValueError:
        raise web.HTTPBadRequest(text="record id is 64 hex digits") from None
    if len(rid) != 32:
        raise web.HTTPBadRequest(text="record id is 64 hex digits")
    caller = await signed_caller(request)
    env = await node.reads.envelope(rid)
    if env is None:
        raise web.HTTPNotFound(text="no such record here")
    body, _sig, _payload = decode_record(env)
    f = parse_body(body)
    if not read_check(request, caller)(f["origin"], f["feed"], env):
        # Same answer as a missing record: do not confirm that it exists.
        raise web.HTTPNotFound(text="no such record here")
    if wants_json(request):
        erased = await node.reads.erasure_of(rid) if is_tombstone(env) else None
        return web.json_response(stored_record_json(env, key=decrypt_key(request),
                                                    erased=erased, names=node.policy.keys))
    return web.Response(body=env, content_type=MSGPACK)


async def _readable_feeds(request: web.Request, caller: bytes | None
                          ) -> list[tuple[bytes, str]] | None:
    """The (origin, feed) pairs this caller may list (None: the operator, all of them).
    Restricted feeds are included for authenticated callers; their records are then
    filtered one by one (only their readers get them)."""
    if is_operator(request):
        return None
    return [(r.origin, r.feed) for r in await request.app[NODE_KEY].reads.listable_feeds(
        caller)]


def _render_page(rows: list[Any], key: Any, names: Any) -> list[dict[str, Any]]:
    return [row_json(r, key=key, names=names) for r in rows]


@takes(*FILTER_PARAMS, "after", "limit", "format")
async def list_records(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    caller = await signed_caller(request)
    limit = int_arg(request, "limit", 100, 1, 1000) or 100
    where = record_filter(request, paging=("after", "limit", "format"))
    fmt = request.query.get("format")
    if fmt not in (None, "ngsi-ld"):
        raise web.HTTPBadRequest(text='format is "ngsi-ld" (or left out)')
    after = int_arg(request, "after", 0, 0, 2**63 - 1) or 0
    # Access is applied inside the query, so rows a caller may not see can neither be
    # returned nor move the cursor (which would reveal that they exist).
    only = await _readable_feeds(request, caller)
    rows = await node.reads.query(where=where, after_rowid=after, limit=limit,
                                  only_feeds=only)
    nxt = rows[-1].rowid if len(rows) == limit else None
    may = read_check(request, caller)
    rows = [r for r in rows if may(r.origin, r.feed, r.envelope)]
    if fmt == "ngsi-ld":  # NGSI-LD entities (citynode/sinks/ngsild.py)
        from citynode.transport.api_bridges import ngsi_ld_page

        return await ngsi_ld_page(request, rows, nxt)
    if wants_json(request):
        # Rendering a page can take a while (large payloads): not on the event loop.
        page = await in_thread(_render_page, rows, decrypt_key(request), node.policy.keys)
        # Issue 13: each record with the terms in force when it was signed.
        terms = await node.policy.terms_json([(r.origin, r.feed, r.time) for r in rows])
        for item, t in zip(page, terms, strict=True):
            item["terms"] = t
        return web.json_response({"records": page, "next": nxt})
    return pack({"records": [r.envelope for r in rows], "next": nxt})


async def list_feeds(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    caller = await signed_caller(request)
    rows = await node.reads.listable_feeds(caller, operator=is_operator(request))
    out = [
        {
            "origin": node.policy.name(r.origin),
            "feed": r.feed,
            "seq": r.seq,
            "head": r.head.hex(),
            "count": r.count,
            "last_time": r.last_time,
        }
        for r in rows
    ]
    return web.json_response({"feeds": out})


@takes("origin", "feed")
async def get_checkpoints(request: web.Request) -> web.Response:
    """Signed checkpoints held of a feed (any origin), by size."""
    node = request.app[NODE_KEY]
    caller = await signed_caller(request)
    origin = origin_arg(request)
    feed = request.query.get("feed")
    if origin is None or not feed:
        raise web.HTTPBadRequest(text="checkpoints need ?origin=cn1...&feed=...")
    # A feed of which nothing is held answers as one the caller may not read: the two
    # look alike. (Checkpoints may come before records, or for a feed whose records are
    # not relayed here: those are served.)
    if not await may_read_feed(request, caller, origin, feed):
        raise web.HTTPNotFound(text="no such feed here")
    held = await node.checkpoints.held(origin, feed)
    if not held and node.seq((origin, feed)) == 0:
        raise web.HTTPNotFound(text="no such feed here")
    if wants_json(request):
        return web.json_response({"checkpoints": [
            {"size": s, "root": r.hex(), "envelope": b64(e)} for s, r, e in held]})
    return pack([e for _s, _r, e in held])


@takes("id", "size")
async def inclusion_proof(request: web.Request) -> web.Response:
    """Inclusion proof of a record in its feed's tree at ``size`` (default: the latest
    checkpoint of that feed that covers the record)."""
    node = request.app[NODE_KEY]
    caller = await signed_caller(request)
    try:
        rid = bytes.fromhex(request.query.get("id", ""))
    except ValueError:
        rid = b""
    if len(rid) != 32:
        raise web.HTTPBadRequest(text="?id= must be a record id (64 hex digits)")
    env = await node.reads.envelope(rid)
    if env is None:
        raise web.HTTPNotFound(text="no such record here")
    f = parse_body(decode_record(env)[0])
    if not read_check(request, caller)(f["origin"], f["feed"], env):
        raise web.HTTPNotFound(text="no such record here")
    size = int_arg(request, "size", None, 1)
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
    path, root = await node.checkpoints.inclusion(f["origin"], f["feed"], f["seq"], size)
    _check_anchor(cp_env, root, size)
    if wants_json(request):
        return web.json_response({"index": f["seq"] - 1, "size": size,
                                  "root": root.hex(),
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
    from citynode.core.checkpoints import parse_checkpoint_body
    from citynode.core.records import decode_envelope

    # Stored only after it verified (with its origin's key log, for a cn2 origin).
    if parse_checkpoint_body(decode_envelope(cp_env)[0])["root"] != root:
        raise web.HTTPConflict(
            text=f"the origin's signed checkpoint of size {size} disagrees with the records "
                 "held here: a split view (`citynode forks` lists such proofs)")


@takes("origin", "feed", "old", "new")
async def consistency_proof(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    caller = await signed_caller(request)
    origin = origin_arg(request)
    feed = request.query.get("feed")
    old = int_arg(request, "old", None, 0)
    new = int_arg(request, "new", None, 0)
    if origin is None or not feed or old is None or new is None or old > new:
        raise web.HTTPBadRequest(text="need ?origin=&feed=&old=&new= with old <= new")
    if node.seq((origin, feed)) == 0 or not await may_read_feed(request, caller, origin,
                                                                     feed):
        raise web.HTTPNotFound(text="no such feed here")
    path, old_root, new_root = await node.checkpoints.consistency(origin, feed, old, new)
    # The origin's own checkpoints of these sizes, when held: what anchors the roots.
    held = {s: e for s, _r, e in await node.checkpoints.held(origin, feed)}
    _check_anchor(held.get(old), old_root, old)
    _check_anchor(held.get(new), new_root, new)
    if wants_json(request):
        return web.json_response({"old_size": old, "new_size": new,
                                  "old_root": old_root.hex(),
                                  "new_root": new_root.hex(),
                                  "path": [p.hex() for p in path],
                                  "old_checkpoint": b64(held[old]) if old in held else None,
                                  "new_checkpoint": b64(held[new]) if new in held else None})
    return web.Response(body=encode_consistency(old, new, path), content_type=MSGPACK)


async def get_key_log(request: web.Request) -> web.Response:
    """The key log held of a cn2 identity (``?origin=cn2...``), as its wire bytes
    (docs/PROTOCOL.md, "Key events"): public, as the id it verifies from. 404 if none
    is held (a cn1 id never has one)."""
    node = request.app[NODE_KEY]
    origin = origin_arg(request)
    if origin is None:
        raise web.HTTPBadRequest(text="a key log needs ?origin=cn2...")
    held = node.policy.keys.held(origin)
    if held is None:
        raise web.HTTPNotFound(text="no key log of that identity here")
    return web.Response(body=held.wire, content_type=MSGPACK)


async def post_key_log(request: web.Request) -> web.Response:
    """A key log offered for a cn2 identity (``?origin=cn2...``), verified from the id
    alone (off the event loop, at most :data:`LOG_VERIFICATIONS` at once, cheapest
    checks first) and held as ``compare_logs`` decides. The log of a partner, of an
    identity whose log is held already, or offered by the operator is kept (stored);
    any other (a reader's own log, offered after a 401 ``unknown_key``) is held in
    memory among strangers' logs (at most ``web.MAX_READER_LOGS``, least recently used
    dropped first, never a partner's). A refused log changes
    nothing; it is counted against its *sender* (the partner that signed the request,
    else nobody's tally, the remote address in the rejected log), never against the
    origin it names, and answered ``{"error": reason, "message": ...}`` (400: it does
    not verify; 409: it does not replace the log held). The sender is told by the key
    in force in the log held of it, never by the key of the posted log: only a log
    that is taken may vouch for the key that signed its own request. Answers
    ``{"outcome": ...}``."""
    node = request.app[NODE_KEY]
    origin = origin_arg(request)
    if origin is None:
        raise web.HTTPBadRequest(text="a key log needs ?origin=cn2...")
    if (request.content_length or 0) > MAX_LOG_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_LOG_BYTES,
                                            actual_size=request.content_length or 0)
    body = await read_body(request)
    if len(body) > MAX_LOG_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_LOG_BYTES, actual_size=len(body))
    held = node.policy.keys
    vouched = Vouched()
    refused: InvalidRecord | None = None
    try:
        async with _log_slots():
            await in_thread(functools.partial(
                keylog.verify_log, origin, body, verifier=vouched, now_ms=node.now_ms()))
    except (InvalidRecord, InvalidNodeId) as exc:
        refused = exc if isinstance(exc, InvalidRecord) else InvalidRecord(str(exc))
    # Who sent it, by the key in force in the log HELD of each signer, never by the
    # posted log's: a partner that replays its own older log signs with its current key
    # and is counted for it; the holder of a key that log retired (a thief, with the log
    # of before the recovery) is nobody's partner here, so nothing is counted on the
    # partner it names. (The origin's own new log, after a rotation not seen here, comes
    # signed by the key it puts in force: taken, it needs no sender; refused, it could
    # be anyone's.)
    signer = request_signer(request, body, held.current_key)
    sender = signer if signer is not None and node.partners.get(signer) else None
    if refused is not None:
        node.ingest_role.count_invalid(
            node.partners.get(sender) if sender else None, refused.reason,
            f"key log of {keylog.identity_id(origin)} from {request.remote}: {refused}")
        return error_response(400, refused.reason, str(refused))
    if held.pinned(origin) or node.partners.get(origin) is not None or is_operator(request):
        d = node.policy.offer_log(origin, body, sender, verifier=vouched)
        if d is not None and d.error is not None:
            return error_response(409, d.error.reason, str(d.error))
        return pack({"outcome": "same" if d is None else d.outcome})
    # Held in memory (not stored), among strangers' logs (bounded, least recently used
    # first out, never a partner's): the access rules match a sealed record's recipient
    # keys to this reader by its log, and its signed reads verify by it.
    d = held.offer(origin, body, verifier=vouched, now_ms=node.now_ms(), transient=True)
    if d.error is not None:
        return error_response(409, d.error.reason, str(d.error))
    return pack({"outcome": d.outcome})


#: Key logs verified at once, per event loop, in threads (a 2 MiB log is up to 1024
#: signatures, some 70 ms of CPU): more wait their turn, the loop keeps serving.
LOG_VERIFICATIONS = 2
_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = \
    weakref.WeakKeyDictionary()


def _log_slots() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    slots = _SLOTS.get(loop)
    if slots is None:
        slots = _SLOTS[loop] = asyncio.Semaphore(LOG_VERIFICATIONS)
    return slots


class Vouched(Verifier):
    """A verifier that remembers the signatures it verified, so that a log verified in a
    thread is not verified again when the event loop offers it (same object)."""

    __slots__ = ("_ok",)

    def __init__(self) -> None:
        super().__init__()
        self._ok: set[bytes] = set()

    def verify(self, public_key: bytes, domain: bytes, message: bytes,
               signature: bytes) -> None:
        k = hashlib.sha256(public_key + signature + domain + message).digest()
        if k in self._ok:
            return
        super().verify(public_key, domain, message, signature)
        self._ok.add(k)
