"""Live streams: Server-Sent Events of stored records matching a filter (the node's
Streams role feeds them; rendering events is this layer's)."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from citynode.core.keybook import CN1_NAMES, Names
from citynode.errors import (
    QueryTooSlow,
)
from citynode.node import Erased, Subscriber
from citynode.render import b64, row_json
from citynode.transport.web import (
    FILTERS,
    NODE_KEY,
    decrypt_key,
    in_thread,
    is_operator,
    read_check,
    record_filter,
    signed_caller,
    takes,
)

__all__ = [
    "sse_envelope_event",
    "sse_erased_event",
    "sse_event",
    "stream",
]

def sse_event(row: Any, key: Any = None, names: Names = CN1_NAMES) -> str:
    """One Server-Sent Event for a stored row: ``id`` (its cursor), ``event: record`` and
    the JSON record as ``data`` (JSON has no raw newlines, so one data line);
    ``names``: who the recipients of a sealed record are (the node's key logs)."""
    data = json.dumps(row_json(row, key=key, cursor=False, names=names))
    # CRLF, as aiohttp-sse frames its keep-alive pings on the same stream.
    return f"id: {row.rowid}\r\nevent: record\r\ndata: {data}\r\n\r\n"


class _TermsInForce:
    """With ``?terms=1``: the terms in force for each record streamed (those of its
    origin's card in force when it was signed, as ``GET /v1/records`` gives per record),
    announced by an ``event: terms`` before the first record of each (origin, feed) and
    again before a record whose terms in force differ from the last announced for its
    feed (a record signed under another card)."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.sent: dict[tuple[bytes, str], Any] = {}

    async def interleave(self, keys: list[tuple[bytes, str, int]], texts: list[str]) -> str:
        """``texts`` (the events of rows with ``keys``: origin, feed, time), each
        preceded by an ``event: terms`` (data: ``{"feeds": [{origin, feed, terms,
        card_time}]}``) when its terms in force are not those last announced."""
        terms = await self.node.policy.terms_json(keys)
        out = []
        for (origin, feed, _t), text, t in zip(keys, texts, terms, strict=True):
            k = (origin, feed)
            if k not in self.sent or self.sent[k] != t:
                self.sent[k] = t
                entry = {"origin": self.node.policy.name(origin), "feed": feed,
                         "terms": None if t is None
                         else {x: y for x, y in t.items() if x != "card_time"},
                         "card_time": None if t is None else t["card_time"]}
                out.append(f"event: terms\r\ndata: {json.dumps({'feeds': [entry]})}\r\n\r\n")
            out.append(text)
        return "".join(out)


def sse_envelope_event(row: Any) -> str:
    """The compact event for a stored row (``?format=envelope``): ``id`` and ``event``
    as :func:`sse_event`, ``data`` = the signed envelope in base64 and nothing else --
    what a subscriber that verifies records itself needs, in about half the bytes."""
    return (f"id: {row.rowid}\r\nevent: record\r\n"
            f"data: {b64(row.envelope)}\r\n\r\n")


def sse_erased_event(row: Any) -> str:
    """The event announcing that a row already sent lost its payload to an erasure
    request: ``event: erased``, no ``id`` (it is no new cursor: the subscriber's last
    event id stays), ``data`` = the JSON tombstone (with its ``cursor``, ``id``,
    ``erased: {by, reason}`` and signed ``envelope``), in every ``format``."""
    return f"event: erased\r\ndata: {json.dumps(row_json(row, cursor=True))}\r\n\r\n"


def _render_events(rows: list[Any], render: Callable[[Any], str]) -> list[str]:
    return [render(row) for row in rows]


@takes(*FILTERS, "after", "format", "terms")
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
    completes normally) and the subscriber resumes by cursor. ``terms=1``: an ``event:
    terms`` with the terms in force for the next record (those it was signed under)
    before the first record of each feed and whenever they change from one record to
    the next (docs/API.md; :class:`_TermsInForce`). When an
    erasure request removes the payload of a record this stream already sent, an
    ``event: erased`` (no ``id``; ``data`` the JSON tombstone) says so
    (:func:`sse_erased_event`).
    """
    from aiohttp_sse import sse_response

    node = request.app[NODE_KEY]
    caller = await signed_caller(request)
    where = record_filter(request, paging=("after", "format", "terms"))
    last = request.headers.get("Last-Event-ID") or request.query.get("after")
    if last is not None:
        try:
            cursor = int(last)
        except ValueError:
            cursor = -1
        if not 0 <= cursor < 2**63:
            raise web.HTTPBadRequest(text="Last-Event-ID must be a cursor (an integer)")
    else:
        cursor = await node.streams.cursor()
    may = read_check(request, caller)
    matches = where.matches
    # A tombstone has no location: an erased row concerns the stream if it matches but
    # for the box (the subscriber may have been sent it while it had its payload).
    matches_erased = dataclasses.replace(where, bbox=None).matches

    def match(row: Any) -> bool:
        return matches(row) and may(row.origin, row.feed, row.envelope)

    def match_erased(row: Any) -> bool:
        return matches_erased(row) and may(row.origin, row.feed, row.envelope)

    refusal = node.streams.refusal()
    if refusal is not None:
        raise web.HTTPServiceUnavailable(text=refusal)
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "envelope"):
        raise web.HTTPBadRequest(text="format must be json (the default) or envelope")
    envelope_only = fmt == "envelope"
    if request.query.get("terms", "0") not in ("0", "1"):
        raise web.HTTPBadRequest(text="terms must be 1 (send terms events) or 0")
    terms = _TermsInForce(node) if request.query.get("terms") == "1" else None
    # The compact format carries the sealed envelope: a reader decrypts it itself.
    key = None if envelope_only else decrypt_key(request)
    render: Callable[[Any], str]
    if envelope_only:
        render = sse_envelope_event
    elif key is not None:
        render = functools.partial(sse_event, key=key, names=node.policy.keys)
    else:
        render = functools.partial(sse_event, names=node.policy.keys)
    # Streams that see the same rows share the tail's matching and rendering (the
    # operator's, decrypting with its key, is a group of its own).
    group = None if key is not None else (where, caller, is_operator(request), fmt)
    sub = Subscriber(match, render, group=group, on_lag=node.metrics.stream_lagged.inc,
                     match_erased=match_erased)
    await node.streams.open(sub)  # before catching up, so nothing falls in between
    resp: web.StreamResponse | None = None
    try:
        async with sse_response(request, ping_interval=15) as resp:
            # First, the cursor the stream starts after, as an event with an id alone
            # (an EventSource takes it as its last event id; nothing is dispatched):
            # a subscriber cut off before the first record resumes from here, not
            # from "now" again, which would lose what came in between.
            await resp.write(f"id: {cursor}\r\n\r\n".encode())
            # Issue 13, with ?terms=1: the terms each record was signed under, as an
            # event before it when they change (opt-in: a subscriber that parses only
            # record events is not surprised by another kind).
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
                    out = (await in_thread(_render_events, visible, render)
                           if visible else [])
                    if out and terms is not None:
                        out = [await terms.interleave(
                            [(r.origin, r.feed, r.time) for r in visible], out)]
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
                        if isinstance(b, Erased):
                            # Only rows already sent: a later one goes out as the
                            # tombstone it now is, in its turn.
                            chunks += [sse_erased_event(row).encode() for row in b.rows
                                       if row.rowid <= cursor]
                        elif b is not None and b.rowids[-1] > cursor:
                            if terms is None:
                                chunks.append(b.after(cursor))
                            else:
                                new = [n for n, r in enumerate(b.rowids) if r > cursor]
                                chunks.append((await terms.interleave(
                                    [b.keys[n] for n in new],
                                    [b.texts[n] for n in new])).encode())
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
