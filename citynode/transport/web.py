"""What every route of the HTTPS API shares: the app keys, the error middleware (every
error a JSON body ``{"error": reason, "message": text}``), bounded body reads, query
parameters, and the three kinds of authentication:

* anyone: public reads (a read may be signed by any node's key, to be told apart);
* partners: requests signed by a listed partner's node key (core/httpsig.py), at most
  ``request_max_age_seconds`` old and never replayed;
* the operator: ``Authorization: Bearer <operator token>`` (compared in constant time).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import functools
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, NoReturn, TypeVar

import msgpack
from aiohttp import web

from citynode.core import httpsig, keylog, sync
from citynode.core.filters import FILTER_PARAMS, RecordFilter, parse_filter
from citynode.core.keys import parse_node_id
from citynode.errors import (
    AccessDenied,
    CitynodeError,
    ClockSkew,
    DiskFull,
    EncodingError,
    InvalidFilter,
    InvalidNodeId,
    InvalidProof,
    InvalidRecord,
    NoLeader,
    PayloadError,
    PeerError,
    PublishRefused,
    QueryTooSlow,
    ReplayedRequest,
    StorageError,
    UnknownSigner,
)
from citynode.identity import check_token
from citynode.logs import fields
from citynode.node import Node
from citynode.node.policy import Policy
from citynode.transport.limits import PartnerRates

__all__ = [
    "FILTERS",
    "charge",
    "charged",
    "decrypt_key",
    "error_response",
    "errors_middleware",
    "in_thread",
    "int_arg",
    "is_operator",
    "may_read_feed",
    "origin_arg",
    "pack",
    "partner_body",
    "partners_middleware",
    "read_body",
    "read_check",
    "record_filter",
    "refuse",
    "request_signer",
    "require_operator",
    "require_partner",
    "signed_caller",
    "takes",
    "wants_json",
]

log = logging.getLogger("citynode.http")
MSGPACK = "application/msgpack"
JSON = "application/json"
#: The longest msgpack array header (array 32: a byte and a 4-byte count).
_ARRAY_HEADER_BYTES = 5
NODE_KEY: web.AppKey[Node] = web.AppKey("node", Node)
REPLAY_KEY: web.AppKey[httpsig.ReplayCache] = web.AppKey("replay", httpsig.ReplayCache)
#: Each partner's token bucket of signed requests ([limits] partner_requests_per_second),
#: share of the event loop and requests under way (transport/limits.py).
RATES_KEY: web.AppKey[PartnerRates] = web.AppKey("rates", PartnerRates)
#: The key of the partner whose verified request the current one is (counted as under
#: way), in the request's own task (a context variable: aiohttp 3.9 has no typed
#: request keys, and a string key warns on newer ones).
_ADMITTED: contextvars.ContextVar[bytes | None] = contextvars.ContextVar(
    "citynode_partner", default=None)
# Signed reads accept any node's key: their nonces live in a cache of their own, so no
# stranger can fill the one partner requests depend on.
READ_REPLAY_KEY: web.AppKey[httpsig.ReplayCache] = web.AppKey("read_replay",
                                                              httpsig.ReplayCache)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")


def error_response(status: int, reason: str, message: str) -> web.Response:
    return web.json_response({"error": reason, "message": message}, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Translate our errors into HTTP answers; never leak a traceback."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != JSON:
            return error_response(exc.status, exc.reason.lower().replace(" ", "_"),
                                  exc.text or exc.reason)
        raise
    except PayloadError as exc:
        return error_response(422, exc.reason, str(exc))
    except InvalidRecord as exc:
        return error_response(400, exc.reason, str(exc))
    except InvalidProof as exc:
        return error_response(400, exc.reason, str(exc))
    except InvalidNodeId as exc:
        return error_response(400, "invalid", str(exc))
    except ClockSkew as exc:
        return error_response(403, "clock_skew", str(exc))
    except UnknownSigner as exc:
        return error_response(401, "unknown_key", str(exc))
    except AccessDenied as exc:
        return error_response(403, "access_denied", str(exc))
    except NoLeader as exc:  # (a PublishRefused) a takeover under way: retry
        resp = error_response(503, "no_leader", str(exc))
        resp.headers["Retry-After"] = "2"
        return resp
    except PublishRefused as exc:
        return error_response(409, "publish_refused", str(exc))
    except QueryTooSlow as exc:
        return error_response(503, "query_too_slow", str(exc))
    except DiskFull as exc:
        log.error("disk full", extra=fields(error=str(exc)))
        return error_response(507, "disk_full", str(exc))
    except StorageError as exc:
        log.error("storage error", extra=fields(error=str(exc)))
        return error_response(503, "storage", str(exc))
    except PeerError as exc:
        return error_response(502, "peer", str(exc))
    except CitynodeError as exc:
        return error_response(400, "error", str(exc))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("internal error", extra=fields(path=request.path))
        return error_response(500, "internal", "internal error (see the node's log)")


def wants_json(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return JSON in accept and MSGPACK not in accept


async def read_body(request: web.Request) -> bytes:
    """Read the whole body within the configured deadline and size (413 when larger)."""
    node = request.app[NODE_KEY]
    try:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for runs the read in a task
        # of its own (a trip round the event loop on every request).
        async with asyncio.timeout(node.config.limits.read_timeout_seconds):
            return await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout(text="request body not received in time") from None
    except web.HTTPRequestEntityTooLarge:
        # Not blamed on a partner: the signature cannot be checked without the body.
        node.ingest_role.count_invalid(None, "too_large",
                                       f"request body over the limit on {request.path}")
        raise


def require_operator(request: web.Request) -> None:
    node = request.app[NODE_KEY]
    auth = request.headers.get("Authorization", "")
    given = auth[7:] if auth.startswith("Bearer ") else None
    if not check_token(node.identity.token, given):
        raise AccessDenied("operator token missing or wrong (Authorization: Bearer <token>)")


async def require_partner(request: web.Request, body: bytes,
                          signature: httpsig.SignatureHeaders | None = None) -> bytes:
    """Verify the request signature (made for this node, by a listed partner, fresh, not
    replayed); return the partner's public key. ``signature``: the request's headers as
    :func:`_precheck_partner` read them (else read here). Raises AccessDenied."""
    node = request.app[NODE_KEY]
    if signature is None:  # (else _precheck_partner looked at the partner's bucket)
        try:
            claimed: bytes | None = httpsig.claimed_signer(
                request.headers, now_ms=node.now_ms(),
                max_age_ms=int(node.config.limits.request_max_age_seconds * 1000),
                max_future_ms=_future_ms(node))
        except CitynodeError:
            claimed = None  # the check below says what is wrong with it
        if claimed is not None and node.partners.get(claimed) is not None:
            _limit_rate(request, claimed, take=False)
    try:
        key = _verify(request, body, request.headers if signature is None else signature,
                      request.app[REPLAY_KEY],
                      authorize=lambda key: node.partners.get(key) is not None)
    except ReplayedRequest as exc:
        # Signed by the partner and allowed, but already used: counted on that partner
        # like every other refusal (a hostile partner re-sending its requests shows up
        # in /v1/admin/partners), then refused as before.
        link = node.partners.get(exc.public_key)
        if link is not None:
            node.ingest_role.count_invalid(link, "replayed", str(exc))
        raise
    # Spent only now, by a request the partner signed: claiming its key costs it nothing.
    _limit_rate(request, key, take=True)
    if _ADMITTED.get() is None:  # (a handler may check twice)
        if not request.app[RATES_KEY].enter(key):
            lim = node.config.limits
            refuse(request, key, "too_many_in_flight",
                    f"more than {lim.partner_max_in_flight} requests of this partner under "
                    "way at once", 1.0)
        _ADMITTED.set(key)
    return key


def charge(request: web.Request, seconds: float) -> None:
    """The partner whose verified request this is kept the event loop busy ``seconds``:
    charged to its share ([limits] partner_loop_share). Nothing for other callers."""
    key = _ADMITTED.get()
    if key is not None:
        request.app[RATES_KEY].charge(key, seconds, time.monotonic())


@contextlib.contextmanager
def charged(request: web.Request) -> Iterator[None]:
    """Charge the time the enclosed code (no ``await`` in it: event-loop time) takes to
    the partner of the request (see :func:`charge`)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        charge(request, time.perf_counter() - t0)


@web.middleware
async def partners_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A verified partner request counts as under way until its handler is done."""
    token = _ADMITTED.set(None)
    try:
        return await handler(request)
    finally:
        key = _ADMITTED.get()
        if key is not None:
            request.app[RATES_KEY].leave(key)
        _ADMITTED.reset(token)


def refuse(request: web.Request, key: bytes, reason: str, msg: str, wait: float) -> NoReturn:
    """Count a refusal of the partner ``key`` for its load (``reason``) and raise the
    429 that says so, with Retry-After in whole seconds."""
    node = request.app[NODE_KEY]
    link = node.partners.get(key)
    msg = f"{msg}: retry after {wait:.2f} s"
    if link is not None:
        node.ingest_role.count_invalid(link, reason, f"{request.path}: {msg}")
    rates = request.app[RATES_KEY]
    if len(rates) > len(node.partners.links) + 16:
        rates.forget(set(node.partners.links))  # partners removed since
    raise web.HTTPTooManyRequests(
        text=json.dumps({"error": reason, "message": msg}), content_type=JSON,
        headers={"Retry-After": str(max(1, math.ceil(wait)))})


def _limit_rate(request: web.Request, key: bytes, *, take: bool) -> None:
    """Raise 429 if the partner ``key`` is over its request rate (``rate_limited``:
    [limits] partner_requests_per_second, partner_request_burst) or over its share of
    the event loop (``over_loop_share``: partner_loop_share); the refusal is counted
    on the partner. ``take``: spend one request (a verified one) rather than only look
    (before the body is read)."""
    node = request.app[NODE_KEY]
    lim = node.config.limits
    rates = request.app[RATES_KEY]
    rates.configure(lim.partner_requests_per_second, lim.partner_request_burst,
                    lim.partner_loop_share, lim.partner_max_in_flight)
    now = time.monotonic()
    wait = rates.busy_wait(key, now)
    if wait > 0.0:
        refuse(request, key, "over_loop_share",
                f"this partner's requests took more than {lim.partner_loop_share:g} of "
                "this node's time", wait)
    wait = rates.take(key, now) if take else rates.wait(key, now)
    if wait > 0.0:
        refuse(request, key, "rate_limited",
                f"more than {lim.partner_requests_per_second:g} requests a second from "
                f"this partner (burst {lim.partner_request_burst})", wait)


def _verify(request: web.Request, body: bytes,
            headers: Mapping[str, str] | httpsig.SignatureHeaders,
            replay: httpsig.ReplayCache,
            authorize: Callable[[bytes], bool] | None = None,
            key_of: Callable[[bytes], bytes] | None = None) -> bytes:
    """httpsig.verify_request with this node's clock, id and limits."""
    node = request.app[NODE_KEY]
    return httpsig.verify_request(
        request.method,
        request.rel_url.raw_path_qs,
        headers,
        body,
        now_ms=node.now_ms(),
        max_age_ms=int(node.config.limits.request_max_age_seconds * 1000),
        max_future_ms=_future_ms(node),
        replay=replay,
        verifier=node.verifier,
        expected_target=node.node_id,
        authorize=authorize,
        key_of=key_of if key_of is not None else node.policy.keys.current_key,
    )


def _future_ms(node: Node) -> int:
    """How far ahead of this node's clock a signed request may be dated: the one clock
    tolerance that governs records and cards too ([limits] future_tolerance_seconds).
    (How far behind is the replay window, request_max_age_seconds: see PROTOCOL.md.)"""
    return int(node.config.limits.future_tolerance_seconds * 1000)


def _precheck_partner(request: web.Request) -> tuple[httpsig.SignatureHeaders, bytes]:
    """Refuse before reading the body what cannot be a partner's fresh request: no
    strangers' megabytes are buffered. (The full check follows on the body, with the
    headers as read here: they are parsed once.) Returns them and the partner's key
    they claim (not verified yet: the signature covers the body)."""
    node = request.app[NODE_KEY]
    signature = httpsig.read_signature(request.headers)
    key = httpsig.claimed_signer(
        signature, now_ms=node.now_ms(),
        max_age_ms=int(node.config.limits.request_max_age_seconds * 1000),
        max_future_ms=_future_ms(node),
    )
    if key is None or node.partners.get(key) is None:
        raise AccessDenied("request not signed by a partner of this node")
    # Before the body is read: a partner over its rate costs no more than this.
    _limit_rate(request, key, take=False)
    return signature, key


async def partner_body(request: web.Request, max_array: int | None = None,
                       what: str = "body") -> tuple[bytes, bytes]:
    """The body of a partner request and the partner's key, fully verified.

    ``max_array``: the body is a msgpack array of at most that many items (``what``
    names it): one whose header announces more is refused (EncodingError
    ``too_many_items``, a 400) before the rest of it is read."""
    signature, claimed = _precheck_partner(request)
    head = (b"" if max_array is None
            else await _array_head(request, claimed, max_array, what))
    body = head + await read_body(request)
    return body, await require_partner(request, body, signature)


async def _array_head(request: web.Request, claimed: bytes, max_items: int,
                      what: str) -> bytes:
    """The first bytes of the body (a msgpack array header at most), read; raise
    EncodingError ``too_many_items`` if they announce over ``max_items`` items.

    Why: a legacy frontier of 100,001 short entries is 7.7 MB under the request limit;
    a hostile partner sending them was read in full (memory, and the time to read it)
    only to be refused for its count. The signature covers the whole body, unread, so
    the refusal is counted on the partner the request claims to be (fresh headers
    naming it, as the 429s before the body), the address in its log row."""
    node = request.app[NODE_KEY]
    head = b""
    try:
        async with asyncio.timeout(node.config.limits.read_timeout_seconds):
            while len(head) < _ARRAY_HEADER_BYTES:
                chunk = await request.content.read(_ARRAY_HEADER_BYTES - len(head))
                if not chunk:
                    break
                head += chunk
    except TimeoutError:
        raise web.HTTPRequestTimeout(text="request body not received in time") from None
    announced = sync.announced_length(head)
    if announced is not None and announced > max_items:
        msg = (f"{what} has {announced} entries, over the limit of {max_items} entries "
               "(refused before its body was read)")
        node.ingest_role.count_invalid(
            node.partners.get(claimed), "too_many_items",
            f"{request.path} from {request.remote} (signature not checked): {msg}")
        raise EncodingError(msg, "too_many_items")
    return head


def is_operator(request: web.Request) -> bool:
    node = request.app[NODE_KEY]
    auth = request.headers.get("Authorization", "")
    return auth.startswith("Bearer ") and check_token(node.identity.token, auth[7:])


def read_check(
    request: web.Request, caller: bytes | None
) -> Callable[[bytes, str, bytes | None], bool]:
    """``may_read(origin, feed, envelope)`` for this request. The operator owns the node
    and reads everything it holds; anyone else is held to each feed's access level."""
    node = request.app[NODE_KEY]
    if is_operator(request):
        return _reads_all
    return functools.partial(_may_read, node.policy, caller)


def _reads_all(origin: bytes, feed: str, env: bytes | None = None) -> bool:
    return True


def _may_read(policy: Policy, caller: bytes | None, origin: bytes, feed: str,
              env: bytes | None = None) -> bool:
    return policy.may_read(origin, feed, caller, env)


async def may_read_feed(request: web.Request, caller: bytes | None, origin: bytes,
                         feed: str) -> bool:
    """May the caller read what is about a whole feed (its checkpoints, consistency
    proofs)? The operator reads everything; anyone else as :meth:`Node.may_read_feed`."""
    if is_operator(request):
        return True
    return await request.app[NODE_KEY].policy.may_read_feed(origin, feed, caller)


async def signed_caller(request: web.Request) -> bytes | None:
    """The node key that signed a read request, or None for an anonymous reader.

    Any node may sign a read (not only partners): readers of a restricted feed, or
    partners of the feed's origin, are often not partners of the node they read from.
    """
    if "Signature" not in request.headers and "Signature-Input" not in request.headers:
        return None
    return _verify(request, b"", request.headers, request.app[READ_REPLAY_KEY],
                   key_of=_reader_key_of(request))


def request_signer(request: web.Request, body: bytes,
                   key_of: Callable[[bytes], bytes]) -> bytes | None:
    """The identity that signed this request (its signature checked with ``key_of``),
    or None when it is unsigned or its signature does not verify: for telling who sent
    something that needs no signature (whom to count a refusal against)."""
    if "Signature" not in request.headers:
        return None
    try:
        return _verify(request, body, request.headers, request.app[READ_REPLAY_KEY],
                       key_of=key_of)
    except AccessDenied:
        return None


#: Logs of strangers (signed readers that are no partners) held in memory at most
#: (core/keybook.py: KeyBook.max_transient; the least recently used go first).
MAX_READER_LOGS = 10_000


def _reader_key_of(request: web.Request) -> Callable[[bytes], bytes]:
    """The key a signed read is verified by: the key in force of the log held of its
    signer, else of the log the request carries (:data:`httpsig.KEYLOG_HEADER`), which
    must verify from the signer's id alone (held in memory, bounded: never stored)."""
    node = request.app[NODE_KEY]
    held = node.policy.keys

    def key_of(identity: bytes) -> bytes:
        if identity in held:
            return held.current_key(identity)
        text = request.headers.get(httpsig.KEYLOG_HEADER)
        if text is None or len(text) > httpsig.MAX_KEYLOG_HEADER:
            keyid = httpsig.read_signature(request.headers).params.keyid
            if keyid.startswith(keylog.IDENTITY_PREFIX):
                # A hash, not a key: without its log nothing verifies. Say so, so
                # that the sender offers its log (POST /v1/keylog) and retries.
                raise UnknownSigner(f"this node holds no key log of {keyid}: offer it "
                                    f"(POST /v1/keylog?origin={keyid}), then retry")
            return identity
        try:
            log = base64.b64decode(text, validate=True)
            # Held in memory (not stored), among strangers' logs (bounded, least
            # recently used dropped first, never a partner's): the access rules match a
            # sealed record's recipient keys to this reader by its log.
            held.offer(identity, log, verifier=node.verifier, now_ms=node.now_ms(),
                       transient=True)
            return held.current_key(identity)
        except (ValueError, CitynodeError) as exc:
            raise AccessDenied(f"the request's key log does not verify: {exc}") from exc

    return key_of


def decrypt_key(request: web.Request) -> Any:
    """The node's key when the operator asks (its own applications read restricted
    feeds it is a reader of in plaintext); None otherwise: others decrypt themselves."""
    return request.app[NODE_KEY].key if is_operator(request) else None


def pack(v: Any) -> web.Response:
    return web.Response(body=msgpack.packb(v, use_bin_type=True), content_type=MSGPACK)


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


def int_arg(request: web.Request, name: str, default: int | None = None,
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


def origin_arg(request: web.Request) -> bytes | None:
    raw = request.query.get("origin")
    return parse_node_id(raw) if raw else None


def record_filter(request: web.Request, *, paging: tuple[str, ...]) -> RecordFilter:
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


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Rendering a page can take a while (large payloads): not on the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
