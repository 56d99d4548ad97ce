"""A small client for partner applications: get, query and subscribe, verified.

Every record the client returns was verified by the client itself -- canonical
encoding, signature by its origin, payload type -- so an application trusts the origin
city, not the node it happens to read from::

    import asyncio
    from citynode.client import Client

    async def main() -> None:
        async with Client("https://citynode.jakarta.example:8443",
                          node_id="cn1...") as c:          # pins the node's certificate
            async for rec in c.query(feed="air-quality", type="AirQualityObserved"):
                print(rec.seq, rec.data["pm25"])           # what the node holds now
            async for cursor, rec in c.subscribe(feed="air-quality", last_event_id=0):
                print(cursor, rec.subject, rec.data)      # all held, then live

    asyncio.run(main())

``subscribe`` resumes by itself after a reconnect, missing nothing and repeating
nothing. Without ``last_event_id`` it starts with records stored from the moment the
node answers; to follow on from an earlier run, pass the last cursor it yielded (a
query and a later subscribe from "now" would miss what came in between).

Reading a ``partners`` or ``restricted`` feed needs requests signed by a node key the
origin allows: pass ``key=`` (e.g. ``identity.load_identity(DIR).key``).

Records of a restricted feed are sealed to their readers' keys. When ``key`` is one of
them, the records the client returns carry the decrypted ``type``, ``data``,
``subject`` and ``dataschema``; ``rec.sealed`` is still set, ``body``/``sig`` are the
signed bytes and ``fields()`` is the signed, sealed body. A seal that does not open for
its reader is an :class:`InvalidRecord`, like a record that does not verify. To anyone
else the record stays sealed: ``type`` is ``"sealed"`` and ``data`` is empty. A node
matches the ``type`` filter against what it stores, so a restricted feed's records
match ``type="sealed"``, not their inner type: filter them by ``feed``.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import msgpack

from citynode.core.cards import CardFeed, NodeCard, open_card, terms_in_force
from citynode.core.filters import RecordFilter
from citynode.core.keybook import KeyBook
from citynode.core.keylog import identity_id
from citynode.core.keys import SigningKey, Verifier
from citynode.core.records import Record, decode_record, open_record, parse_body
from citynode.errors import (
    CitynodeError,
    InvalidRecord,
    PeerError,
    PeerRejected,
    QueryTooSlow,
)
from citynode.transport.http import (
    MSGPACK,
    Auth,
    HttpClient,
    NoAuth,
    NodeSignature,
    parse_error_body,
)

__all__ = ["Client", "plaintext", "record_to_json"]


class Client:
    """Verified reads from one citynode over HTTPS."""

    def __init__(
        self,
        url: str,
        *,
        node_id: str | None = None,
        fingerprint: bytes | None = None,
        key: SigningKey | None = None,
        timeout: float = 30.0,
    ) -> None:
        """``node_id``: fetch the node's card, check it is signed by this id, and pin the
        TLS certificate it names. ``fingerprint``: pin this SHA-256 certificate digest.
        With neither, the certificate is validated against the system CAs."""
        self.url = url.rstrip("/")
        self.node_id = node_id
        self.fingerprint = fingerprint
        self.key = key
        self.timeout = timeout
        self.verifier = Verifier()
        self._auth: Auth = NodeSignature(key, node_id) if key is not None else NoAuth()
        self._http: HttpClient | None = None
        self._cards: dict[str, tuple[NodeCard, ...]] = {}  # origin id -> card history
        self._cards_at: dict[str, float] = {}  # origin id -> when it was fetched (s)
        self.keys = KeyBook()  # the key logs of the cn2 origins read, verified here

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def connect(self) -> None:
        """Pin the node's certificate (via its card when ``node_id`` was given)."""
        if self.node_id is not None and self.fingerprint is None:
            from citynode.transport.client import fetch_card

            card = await fetch_card(self.url, self.node_id, now_ms=_now_ms())
            self.fingerprint = card.tls
        self._http = HttpClient(
            self.url, auth=self._auth, timeout=self.timeout, connect_timeout=self.timeout,
            fingerprint=self.fingerprint if self.url.startswith("https://") else None,
        )
        if isinstance(self._auth, NodeSignature) and self.node_id is None:
            # Signed requests name the node they are for: learn its id from its card
            # (served over the connection pinned or validated above).
            card = open_card(await self._get("/.well-known/citynode", unsigned=True),
                             expected_node_id=None, verifier=self.verifier)
            self.node_id = self._auth.target = card.node_id

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _client(self) -> HttpClient:
        if self._http is None:
            await self.connect()
        assert self._http is not None  # set by connect()
        return self._http

    async def _verify(self, envelope: bytes) -> Record:
        body, sig, payload = decode_record(envelope)
        # A record is checked against the clock when a node accepts it; a reader checks
        # what the record is, not when it arrived.
        try:
            rec = open_record(body, sig, payload, now_ms=2**62, verifier=self.verifier,
                              key_states=self.keys.state)
        except InvalidRecord as exc:
            if exc.reason != "unknown_key":
                raise
            # A cn2 origin whose log (or latest events) this client lacks: the node's
            # copy verifies from the id alone, and is taken only as compare_logs says.
            origin = parse_body(body)["origin"]
            log = await self._get(f"/v1/keylog?origin={identity_id(origin)}", unsigned=True)
            self.keys.offer(origin, log, verifier=self.verifier)
            rec = open_record(body, sig, payload, now_ms=2**62, verifier=self.verifier,
                              key_states=self.keys.state)
        if rec.sealed is None or self.key is None:
            return rec
        return _opened(rec, self.key)

    async def _get(self, path_qs: str, accept: str = MSGPACK,
                   unsigned: bool = False) -> bytes:
        http = await self._client()
        resp = await http.request("GET", path_qs, accept=accept,
                                  auth=NoAuth() if unsigned else None)
        return resp.body

    async def get(self, record_id: bytes | str) -> Record:
        """One record by id, verified. Raises PeerRejected (404) if the node lacks it,
        InvalidRecord if what it sent does not verify or is not that record."""
        rid = bytes.fromhex(record_id) if isinstance(record_id, str) else record_id
        rec = await self._verify(await self._get(f"/v1/records/{rid.hex()}"))
        if rec.id != rid:
            raise InvalidRecord("the node answered with a different record", "wrong_record")
        return rec

    async def card_history(self, origin: str, *, refresh: bool = False
                           ) -> tuple[NodeCard, ...]:
        """The cards of ``origin`` the node holds (its card history), oldest first, each
        verified here as signed by ``origin``; cached for the client's life (``refresh``:
        fetched again). Raises
        PeerRejected (404) if the node holds nothing of that origin you may list,
        InvalidRecord if a card does not verify or is not ``origin``'s."""
        hist = None if refresh else self._cards.get(origin)
        if hist is None:
            raw = msgpack.unpackb(await self._get(f"/v1/card-history?origin={origin}"),
                                  raw=False)
            if type(raw) is not list or not all(type(e) is bytes for e in raw):
                raise InvalidRecord("the node's card history is not a list of cards",
                                    "bad_card")
            hist = tuple(open_card(e, expected_node_id=origin, verifier=self.verifier)
                         for e in raw)
            self._cards[origin] = hist
            self._cards_at[origin] = time.time()
        return hist

    async def terms(self, rec: Record) -> CardFeed | None:
        """The terms of ``rec``'s feed in force when it was signed: its entry (license,
        terms_url/terms_digest, attribution, policy, cadence_s) in the card of its
        origin with the greatest time at most the record's (docs/PROTOCOL.md, "Feed
        terms"), from cards this client verified; None if unknown. Check a fetched
        terms document with :func:`citynode.core.cards.check_terms_document`. A record
        signed after the cached history was fetched may be under a newer card: the
        history is fetched again then (at most every 30 s per origin, for a live
        stream)."""
        from citynode.core.keylog import origin_id

        origin = origin_id(rec.origin, rec.key)
        at = self._cards_at.get(origin)
        refresh = at is not None and rec.time >= at * 1000 and time.time() - at >= 30
        return terms_in_force(await self.card_history(origin, refresh=refresh), rec.feed,
                              rec.time)

    async def query(self, *, origin: str | None = None, feed: str | None = None,
                    type: str | None = None, since_ms: int | None = None,
                    until_ms: int | None = None,
                    bbox: tuple[float, float, float, float] | None = None,
                    page_size: int = 500) -> AsyncIterator[Record]:
        """All matching records, oldest first, page by page, each verified and checked
        against the filter asked for (core/filters.py). ``bbox`` is ``(min_lon,
        min_lat, max_lon, max_lat)``; a ``min_lon`` above ``max_lon`` crosses the
        antimeridian. A window with ``since_ms >= until_ms`` holds nothing (``since <=
        time < until``): nothing is asked. Raises, before asking anything,
        :class:`InvalidNodeId` for a malformed ``origin`` and :class:`InvalidFilter` for
        a time out of range or a ``bbox`` that is not a box; a feed name or type the node
        refuses (empty, not a feed name) is its 400, :class:`PeerRejected`."""
        if since_ms is not None and until_ms is not None and since_ms >= until_ms:
            return
        asked = RecordFilter.of(origin=origin, feed=feed, type=type, since_ms=since_ms,
                                until_ms=until_ms, bbox=bbox)
        after = 0
        while True:
            qs = _query_string(asked, after=after, limit=page_size)
            page = msgpack.unpackb(await self._get(f"/v1/records{qs}"), raw=False)
            for env in page["records"]:
                yield _check_asked(asked, await self._verify(env))
            if page["next"] is None:
                return
            after = page["next"]

    async def subscribe(self, *, origin: str | None = None, feed: str | None = None,
                        type: str | None = None,
                        bbox: tuple[float, float, float, float] | None = None,
                        last_event_id: int | None = None,
                        retry_seconds: float = 1.0) -> AsyncIterator[tuple[int, Record]]:
        """Follow new records live (``last_event_id``: resume after that cursor; 0: from
        the beginning). Reconnects by itself with ``Last-Event-ID``, so it misses nothing
        and yields nothing twice. Yields ``(cursor, record)``. Each record received is
        checked against the filter; a filter that is not valid is refused as by
        :meth:`query`.

        When the origin erases a record this stream yielded with its payload, the
        record's verified tombstone is yielded once more (``rec.is_tombstone``, the same
        ``id``), with the cursor unchanged: drop what you kept of its payload. (While
        disconnected, erasures are not replayed: to catch them all, follow the origin's
        ``citynode.erasures`` feed too.)"""
        # The envelope alone: the client verifies (and opens) each record itself, so the
        # node's JSON view would be half the bytes for nothing.
        asked = RecordFilter.of(origin=origin, feed=feed, type=type, bbox=bbox)
        cursor = last_event_id
        opened = [False]  # set once the node has answered a stream request with 200
        while True:
            qs = _query_string(asked, format="envelope", after=cursor)
            try:
                async for cur, rec in self._stream_once(f"/v1/stream{qs}", opened):
                    if cur == _ERASED:
                        if rec is not None and cursor is not None:
                            yield cursor, _check_erased(asked, rec)
                        continue
                    if cursor is not None and (cur < cursor or (rec and cur == cursor)):
                        # A node's cursors only grow: going back would replay records.
                        raise InvalidRecord(f"the node sent cursor {cur} after {cursor}: "
                                            "its cursors go back", "bad_envelope")
                    cursor = cur  # the starting cursor too: a reconnect resumes there
                    if rec is not None:
                        yield cur, _check_asked(asked, rec)
            except PeerRejected as exc:
                if 400 <= exc.status < 500:
                    raise  # refused (access, a bad filter): asking again would not help
                if not opened[0]:
                    raise
            except PeerError:
                # A stream that never opened (wrong address, untrusted certificate) is a
                # mistake to report, not an outage to wait out.
                if not opened[0]:
                    raise
            await asyncio.sleep(retry_seconds)

    async def _stream_once(self, path_qs: str, opened: list[bool]
                           ) -> AsyncIterator[tuple[int, Record | None]]:
        """``(cursor, record)`` per record event of one connection, ``(cursor, None)``
        for the starting cursor the node sends first, and ``(_ERASED, tombstone)`` per
        erased event."""
        http = await self._client()

        def on_open() -> None:
            opened[0] = True

        try:
            async for event in http.events(path_qs, opened=on_open):
                if event.get("event") == "record" and "data" in event:
                    yield _event_cursor(event), await self._verify(_event_envelope(event))
                elif event.keys() == {"id"}:  # where the stream starts
                    yield _event_cursor(event), None
                elif event.get("event") == "erased" and "data" in event:
                    yield _ERASED, await self._verify(_event_envelope(event))
                elif event.get("event") == "error":
                    # The node ended the stream on purpose, saying why.
                    raise _stream_error(self.url, event.get("data", ""))
        except PeerRejected:
            raise
        except PeerError as exc:
            if not opened[0]:
                raise  # never opened: the mistake itself (wrong address, certificate)
            raise PeerError(f"stream broke: {exc}") from exc


def _event_envelope(event: dict[str, str]) -> bytes:
    """The envelope a record event carries: its data (``format=envelope``), or the JSON
    record's ``envelope`` from a node older than that format. Raises
    :class:`InvalidRecord` if it is neither (the node sent garbage)."""
    data = event["data"]
    try:
        b64 = json.loads(data)["envelope"] if data.startswith("{") else data
        return base64.b64decode(b64, validate=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidRecord(f"the node sent an event that is not a record: {data[:80]!r}",
                            "bad_envelope") from exc


def _event_cursor(event: dict[str, str]) -> int:
    """The cursor of an event: decimal digits (no sign, space or ``_``), below 2**63."""
    raw = event.get("id", "")
    if not (0 < len(raw) <= 19 and raw.isascii() and raw.isdigit()) or int(raw) >= 2**63:
        raise InvalidRecord("the node sent an event without a valid cursor", "bad_envelope")
    return int(raw)


def _stream_error(url: str, data: str) -> CitynodeError:
    """The error a node's ``event: error`` stands for: :class:`QueryTooSlow` (the
    subscription's filter is too costly to catch up with: narrow it), else a
    :class:`PeerError` (the stream is resumed)."""
    parsed = parse_error_body(data.encode())
    if parsed is None:
        return PeerError(f"{url}: stream ended with an unreadable error: {data[:200]!r}")
    code, message = parsed
    if code == "query_too_slow":
        return QueryTooSlow(f"{url}: {message}")
    return PeerError(f"{url}: stream ended: {code}: {message}")


def plaintext(rec: Record, key: SigningKey) -> Any:
    """Decrypt a sealed (restricted) record with a reader's key: returns its inner
    ``type``, ``data``, ``subject``, ``dataschema``. Raises AccessDenied if ``key`` is
    not a reader, InvalidRecord if the seal does not open."""
    from citynode.core.sealed import open_payload

    if rec.sealed is None:
        raise InvalidRecord("record is not sealed", "bad_sealed")
    return open_payload(rec.sealed, origin=rec.origin, signer=rec.signer, feed=rec.feed,
                        seq=rec.seq, key=key)


def _opened(rec: Record, key: SigningKey) -> Record:
    """``rec`` (verified, sealed) with its plaintext ``type``, ``data``, ``subject`` and
    ``dataschema`` when ``key`` is one of its readers; otherwise ``rec`` as it is (type
    ``sealed``). ``body``, ``sig`` and ``sealed`` stay those of the signed record, so
    it can still be re-verified or passed on (``fields()`` is still the signed, sealed
    body). Raises :class:`InvalidRecord` if the seal does not open for this reader or
    its plaintext is not a valid payload (a faulty origin), as for a plain record."""
    from citynode.core.sealed import reader_key

    if reader_key(rec.sealed, key) is None:  # a retired key of ours may be a reader
        return rec
    inner = plaintext(rec, key)
    return rec._replace(type=inner.type, data=inner.data, subject=inner.subject,
                        dataschema=inner.dataschema)


#: What :meth:`Client._stream_once` gives as the cursor of an erased event (it has none).
_ERASED = -1


def _check_erased(asked: RecordFilter, rec: Record) -> Record:
    """``rec``, the tombstone an erased event carries, or :class:`InvalidRecord`
    (``not_asked_for``) if it is not a tombstone or outside the filter asked for (its
    box aside: a tombstone has no location). A node cannot make a client drop a payload
    the origin did not sign away: the tombstone is only the record's signed body, and
    the client keeps whatever it wants of what it was sent."""
    if not rec.is_tombstone:
        raise InvalidRecord("the node announced an erasure with a record that still has "
                            "its payload", "not_asked_for")
    return _check_asked(dataclasses.replace(asked, bbox=None), rec)


def _check_asked(asked: RecordFilter, rec: Record) -> Record:
    """``rec``, or :class:`InvalidRecord` (``not_asked_for``) if it is outside the filter
    asked for: a signature proves who wrote a record, not that it is the one asked for,
    and a hostile node could answer "feed a of origin A" with some other feed's records.
    The node's own filter decides (core/filters.py), on the record as the node stores
    it (a sealed record is type "sealed", with no location)."""
    wrong = asked.record_mismatch(rec)
    if wrong is not None:
        raise InvalidRecord(f"the node sent a record outside the filter asked for "
                            f"(its {wrong} does not match)", "not_asked_for")
    return rec


def _query_string(asked: RecordFilter, **extra: str | int | None) -> str:
    """``?`` and the filter's query string, then ``extra`` (given ones only), or ``""``."""
    parts = [asked.to_query()] if not asked.is_everything else []
    parts += [f"{k}={v}" for k, v in extra.items() if v is not None]
    return "?" + "&".join(parts) if parts else ""


def _now_ms() -> int:
    return int(time.time() * 1000)


def record_to_json(rec: Record, cursor: int | None = None,
                   key: SigningKey | None = None) -> dict[str, Any]:
    """The JSON view of a verified record (as the node's API gives it); sealed records
    are decrypted when ``key`` is one of their readers. A tombstone has no ``data`` and
    says ``"tombstone": true``: why its payload is gone (erased or pruned) is the node's
    word, not something its signature proves."""
    from citynode.render import record_json

    out = record_json(rec, rowid=cursor, key=key)
    if rec.payload is None:
        del out["pruned"]  # record_json's guess for a tombstone not known erased
        out["tombstone"] = True
    return out

