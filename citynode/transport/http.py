"""The one HTTP client stack of citynode: peer client, client library, CLI and cluster.

Everything that makes an HTTP request goes through :class:`HttpClient`, which owns:

* the connection: one aiohttp session, TLS pinned to a certificate fingerprint (or
  validated against the system CAs, or, for the one unpinned card fetch, not checked),
  or a Unix socket (the CLI's in-process node);
* authentication, as one hook (:class:`Auth`) called with each request's exact bytes:
  :class:`NoAuth` (public reads), :class:`NodeSignature` (RFC 9421-style request
  signature by a node key, core/httpsig.py) or :class:`BearerToken` (the operator);
* errors, mapped once: a non-2xx answer's ``{"error": reason, "message": text}`` body
  becomes a :class:`PeerRejected` carrying ``status`` and ``reason``; aiohttp, ssl,
  socket and timeout errors become a :class:`PeerError` (``raise ... from exc``), so no
  library exception passes this module;
* bounds: every body is read up to a size given per call, and a stream of server-sent
  events up to a size per event.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, NamedTuple, Protocol

import aiohttp
from yarl import URL

from citynode.core import httpsig
from citynode.core.keys import SigningKey
from citynode.errors import CitynodeError, PeerError, PeerRejected

__all__ = [
]

MSGPACK = "application/msgpack"
JSON = "application/json"
MAX_RESPONSE = 64 * 1024 * 1024  # default bound of one answer's body
MAX_EVENT = 1024 * 1024  # default bound of one server-sent event
_MAX_ERROR_BODY = 16 * 1024  # an error body is a short JSON object
_REASON = re.compile(r"[a-z0-9_]{1,64}")


# ------------------------------------------------------------------------------ pins


class Pins(aiohttp.Fingerprint):
    """TLS pinned to any of a set of SHA-256 certificate fingerprints, which the owner
    may change while the client runs (:meth:`set`): a partner's card names its
    certificate and, during a renewal (``citynode tls renew``), the next one; a newer
    card moves the pins without closing the client. Raises ``ValueError`` for an empty
    set or a fingerprint that is not 32 bytes."""

    def __init__(self, fingerprints: Iterable[bytes]) -> None:
        fps = frozenset(fingerprints)
        super().__init__(min(fps) if fps else b"")
        self.fingerprints = fps
        self.set(fps)

    def set(self, fingerprints: Iterable[bytes]) -> None:
        """Accept exactly ``fingerprints`` from the next TLS handshake on (connections
        already open stay open: they proved a pinned certificate when they opened)."""
        fps = frozenset(fingerprints)
        if not fps or any(len(fp) != 32 for fp in fps):
            raise ValueError("pin one or more 32-byte SHA-256 certificate fingerprints")
        self.fingerprints = fps

    def check(self, transport: asyncio.Transport) -> None:
        if not transport.get_extra_info("sslcontext"):
            return
        der = transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
        got = hashlib.sha256(der).digest()
        if got not in self.fingerprints:
            host, port, *_ = transport.get_extra_info("peername")
            raise aiohttp.ServerFingerprintMismatch(min(self.fingerprints), got, host, port)


# ------------------------------------------------------------------------------ auth


class Auth(Protocol):
    """The authentication hook: the headers that authenticate one request, given the
    exact method, target (path and query, as sent) and body bytes."""

    def headers(self, method: str, path_qs: str, body: bytes) -> dict[str, str]: ...


class NoAuth:
    """Anonymous: public reads (node card, health, public feeds)."""

    def headers(self, method: str, path_qs: str, body: bytes) -> dict[str, str]:
        return {}


class BearerToken:
    """The operator: ``Authorization: Bearer <token>``."""

    def __init__(self, token: str) -> None:
        self._value = f"Bearer {token}"

    def headers(self, method: str, path_qs: str, body: bytes) -> dict[str, str]:
        return {"Authorization": self._value}


class NodeSignature:
    """A request signed with a node key for the node ``target`` (core/httpsig.py).

    ``target`` may be learnt after construction (a reader learns the node's id from its
    card): signing before it is known raises :class:`PeerError`.
    """

    def __init__(self, key: SigningKey, target: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.key = key
        self.target = target
        self._clock = clock

    def headers(self, method: str, path_qs: str, body: bytes) -> dict[str, str]:
        if self.target is None:
            raise PeerError("cannot sign a request before the node's id is known")
        out = httpsig.sign_request(self.key, method, path_qs, body,
                                   int(self._clock() * 1000), target=self.target)
        log = self.key_log
        if log is not None and method == "GET" and len(log) <= INLINE_KEY_LOG:
            # A signed read may reach a node that holds no log of us (we are nobody's
            # partner there): it verifies this one from our id alone. Only a small log
            # rides along (servers refuse header fields over 8 KiB): a node that holds
            # no log of us and gets none answers 401 unknown_key, and HttpClient offers
            # the log (POST /v1/keylog) and sends the request again.
            out[httpsig.KEYLOG_HEADER] = base64.b64encode(log).decode("ascii")
        return out

    @property
    def key_log(self) -> bytes | None:
        """The signer's key log (wire bytes; a ``cn2`` node), or None (a ``cn1`` key)."""
        log = getattr(self.key, "log", None)
        return log if isinstance(log, bytes) else None

    @property
    def node_id(self) -> str:
        """The signer's printable id."""
        return str(self.key.node_id)


#: A key log at most this long (bytes; base64 adds a third) rides in the header of a
#: signed read; a longer one is offered on a 401 ``unknown_key`` (POST /v1/keylog).
INLINE_KEY_LOG = 4096


# ---------------------------------------------------------------------------- errors


def parse_error_body(data: bytes) -> tuple[str, str] | None:
    """``(reason, message)`` of a ``{"error": reason, "message": text}`` body, or None
    if it is not one. Bounded: only the first 16 KiB are read, the reason must be a
    short code and the message is cut to one line of at most 300 characters."""
    try:
        info = json.loads(data[:_MAX_ERROR_BODY])
        reason, message = info["error"], info["message"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(reason, str) or not _REASON.fullmatch(reason):
        return None
    return reason, _one_line(str(message))


def _one_line(text: str) -> str:
    # The other side's words end up in one terminal line or one log field.
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())[:300]


#: A Retry-After longer than this is taken as this (a hostile or broken partner must not
#: silence us for a day).
MAX_RETRY_AFTER_S = 300.0


def retry_after(value: str | None) -> float | None:
    """Seconds of a ``Retry-After`` header in its delay-seconds form, at most
    MAX_RETRY_AFTER_S; None when absent or not a small whole number (the HTTP-date
    form is not sent by nodes)."""
    if value is None or not value.strip().isdigit() or len(value.strip()) > 9:
        return None
    return min(float(value.strip()), MAX_RETRY_AFTER_S)


def rejection(status: int, data: bytes, where: str | None,
              retry_after_s: float | None = None) -> PeerRejected:
    """The :class:`PeerRejected` for an error answer: ``reason`` and ``detail`` from its
    JSON error body, or ``"unknown"`` and the start of its text for anything else (a
    proxy's error page). ``where`` (an URL) prefixes the message; None: the detail alone
    (the operator talking to its own node). ``retry_after_s``: see :func:`retry_after`."""
    parsed = parse_error_body(data)
    if parsed is not None:
        reason, detail = parsed
    else:
        reason, detail = "unknown", _one_line(data[:300].decode("utf-8", "replace"))
    detail = detail or f"HTTP {status}"
    msg = detail if where is None else f"{where}: HTTP {status} {reason}: {detail}"
    return PeerRejected(msg, status, reason, detail, retry_after_s)


# NonHttpUrlClientError is aiohttp 3.10+; with 3.9 an address without a scheme is
# InvalidURL alone.
_NOT_AN_ADDRESS: tuple[type[BaseException], ...] = tuple(
    c for c in (aiohttp.InvalidURL, getattr(aiohttp, "NonHttpUrlClientError", None))
    if c is not None
)


def translate_error(exc: BaseException, url: str) -> PeerError:
    """Our one-line :class:`PeerError` for an aiohttp / TLS / socket / timeout error."""
    if isinstance(exc, aiohttp.ServerFingerprintMismatch):
        return PeerError(
            f"{url}: TLS certificate does not match the pinned fingerprint (the partner "
            "changed its certificate, or someone is in between): re-add the partner after "
            "checking with its operators"
        )
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return PeerError(
            f"{url}: the node's TLS certificate is not trusted "
            f"({exc.certificate_error}): give the node's id (cn1...) to pin it"
        )
    if isinstance(exc, aiohttp.ServerDisconnectedError) and url.startswith("http://"):
        return PeerError(f"{url}: the node closed the connection: nodes serve HTTPS unless "
                         "configured otherwise, so try https://")
    if isinstance(exc, _NOT_AN_ADDRESS):
        return PeerError(f"{url}: not a node address: give its URL, "
                         "e.g. https://citynode.example:8443")
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return PeerError(f"{url}: timed out")
    if isinstance(exc, aiohttp.ClientConnectorError | ConnectionError):
        return PeerError(f"{url}: cannot connect ({exc.__class__.__name__})")
    if isinstance(exc, ssl.SSLError | aiohttp.ClientSSLError):
        return PeerError(f"{url}: TLS failed: {exc}")
    return PeerError(f"{url}: {exc.__class__.__name__}: {exc}")


# What enters from aiohttp and the layers under it, translated by translate_error.
_LIBRARY_ERRORS = (TimeoutError, aiohttp.ClientError, OSError, ssl.SSLError, ValueError)


def _refused_connection(exc: BaseException) -> bool:
    """Did nothing listen at the address (as opposed to any other failure)?"""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return isinstance(exc.os_error, ConnectionRefusedError | FileNotFoundError)
    return isinstance(exc, ConnectionRefusedError)


# ---------------------------------------------------------------------------- client


class Response(NamedTuple):
    """A 2xx answer, read whole (within its bound)."""

    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        """The body as JSON; :class:`PeerError` if it is not."""
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise PeerError("the answer is not JSON") from exc


class HttpClient:
    """Requests to one node (``base_url``), through one session.

    ``fingerprint``: pin the TLS certificate to this SHA-256 digest (or to any of a
    :class:`Pins`, which its owner may change); else, with
    ``verify``, validate it against the system CAs; ``verify=False`` checks nothing
    (only for a first, unpinned card fetch whose content is verified by signature).
    ``unix_socket``: connect to this socket path instead of the URL's host.
    ``auth``: the default authentication of every request (overridable per call).
    ``where``: how errors name the other side (default ``base_url``; None: not named).
    ``local_addr``: the IP address to connect from (default: the system's choice).
    """

    def __init__(
        self,
        base_url: str,
        *,
        fingerprint: bytes | Pins | None = None,
        verify: bool = True,
        auth: Auth | None = None,
        timeout: float | None = 30.0,
        connect_timeout: float = 10.0,
        limit: int = 100,
        unix_socket: str | None = None,
        where: str | None = "",
        clock: Callable[[], float] = time.time,
        local_addr: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._local_addr = (local_addr, 0) if local_addr is not None else None
        self._clock = clock
        #: The other node's clock minus ours, in whole seconds, from the Date header of
        #: its latest answer (1 s resolution; None until it answered with one).
        self.clock_offset_s: int | None = None
        self.auth: Auth = auth if auth is not None else NoAuth()
        self.timeout = timeout
        self.where = self.base_url if where == "" else where
        self._connect_timeout = connect_timeout if timeout is None else min(connect_timeout,
                                                                            timeout)
        self._ssl: Any = (fingerprint if isinstance(fingerprint, Pins)
                          else aiohttp.Fingerprint(fingerprint) if fingerprint is not None
                          else bool(verify))
        self._limit = limit
        self._unix = unix_socket
        self._session: aiohttp.ClientSession | None = None
        # Per-request timeouts by their total (immutable: made once each).
        self._timeouts: dict[float | None, aiohttp.ClientTimeout] = {}
        # The latest Date header read, and the clock offset it gave (a node answers
        # many requests a second with the same Date: parsed once).
        self._date: tuple[str, float] | None = None

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector: aiohttp.BaseConnector = (
                aiohttp.UnixConnector(path=self._unix) if self._unix is not None
                else aiohttp.TCPConnector(limit=self._limit, ssl=self._ssl,
                                          local_addr=self._local_addr))
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout),
                # Bodies are read raw and bounded: nothing inflates behind the bound.
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        """Close the session (idempotent; the client can be used again after)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _prepare(self, method: str, path_qs: str, body: bytes, accept: str,
                 content_type: str | None, auth: Auth | None) -> tuple[URL, dict[str, str]]:
        # Send exactly the target that was signed: no re-encoding by aiohttp/yarl.
        url = URL(self.base_url + path_qs, encoded=True)
        headers = {"Accept": accept, "Accept-Encoding": "identity"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        headers.update((auth or self.auth).headers(method, path_qs, body))
        return url, headers

    def _edge(self, exc: BaseException) -> PeerError:
        where = self.where or self.base_url
        return translate_error(exc, where)

    async def request(
        self,
        method: str,
        path_qs: str,
        body: bytes = b"",
        *,
        accept: str = MSGPACK,
        content_type: str | None = None,
        auth: Auth | None = None,
        max_bytes: int = MAX_RESPONSE,
        timeout: float | None = -1.0,
    ) -> Response:
        """Send one request; return its 2xx answer, read whole up to ``max_bytes``.

        Raises :class:`PeerRejected` for any other status (``status``, ``reason``), and
        :class:`PeerError` for an answer over ``max_bytes``, a timeout (``timeout``
        seconds for the whole exchange; default the client's) or any failure to talk.

        A request signed by a ``cn2`` node that the other node answers 401
        ``unknown_key`` (it holds no key log of the signer, and the log was too long to
        ride along) is sent once more after offering the log (:meth:`offer_own_log`).
        """
        try:
            return await self._request(method, path_qs, body, accept, content_type, auth,
                                       max_bytes, timeout)
        except PeerRejected as exc:
            if not await self._offered_log_for(exc, auth):
                raise
        return await self._request(method, path_qs, body, accept, content_type, auth,
                                   max_bytes, timeout)

    async def _offered_log_for(self, exc: PeerRejected, auth: Auth | None) -> bool:
        """Whether ``exc`` asks for our key log and it was offered (so: retry once)."""
        signer = auth or self.auth
        if (exc.status != 401 or exc.reason != "unknown_key"
                or not isinstance(signer, NodeSignature) or signer.key_log is None):
            return False
        await self.offer_own_log(signer)
        return True

    async def offer_own_log(self, signer: NodeSignature) -> None:
        """POST the signer's key log to the other node (``/v1/keylog?origin=<its id>``,
        signed), which verifies it from the id alone and then knows the signer's key.
        Raises :class:`PeerRejected` if it refuses the log (with the reason code)."""
        log = signer.key_log
        if log is None:
            raise ValueError("a cn1 key has no key log to offer")
        await self._request("POST", f"/v1/keylog?origin={signer.node_id}", log, MSGPACK,
                            MSGPACK, signer, 64 * 1024, -1.0)

    async def _request(self, method: str, path_qs: str, body: bytes, accept: str,
                       content_type: str | None, auth: Auth | None, max_bytes: int,
                       timeout: float | None) -> Response:
        url, headers = self._prepare(method, path_qs, body, accept,
                                     content_type if content_type is not None
                                     else (MSGPACK if body else None), auth)
        total = self.timeout if timeout == -1.0 else timeout
        limits = self._timeouts.get(total)
        if limits is None:
            if len(self._timeouts) >= 16:
                self._timeouts.clear()  # (a bound: callers pass a few values)
            limits = self._timeouts[total] = aiohttp.ClientTimeout(
                total=total, sock_connect=self._connect_timeout)
        try:
            async with self._sess().request(
                method, url, data=body or None, headers=headers, allow_redirects=False,
                timeout=limits,
            ) as resp:
                await self._answered(resp)
                data = await _read_bounded(resp, max_bytes)
                if data is None:
                    raise PeerError(f"{self.where or self.base_url}: answer larger than "
                                    f"{max_bytes} bytes")
                return Response(resp.status, resp.content_type, data)
        except CitynodeError:
            raise
        except _LIBRARY_ERRORS as exc:
            raise self._edge(exc) from exc

    async def _answered(self, resp: aiohttp.ClientResponse) -> None:
        """Note the other side's clock from its answer; raise PeerRejected (its status
        and reason code) unless the answer is 2xx."""
        self._note_date(resp.headers.get("Date"))
        if not 200 <= resp.status < 300:
            raise rejection(resp.status, await _read_bounded(resp, _MAX_ERROR_BODY,
                                                             truncate=True), self.where,
                            retry_after(resp.headers.get("Retry-After")))

    def _note_date(self, date: str | None) -> None:
        """Keep the other side's clock offset from its answer's Date header."""
        if date is None:
            return
        if self._date is not None and self._date[0] == date:
            theirs = self._date[1]
        else:
            from email.utils import parsedate_to_datetime

            try:
                theirs = parsedate_to_datetime(date).timestamp()
            except (TypeError, ValueError, IndexError, OverflowError):
                return  # not a date: nothing learned
            self._date = (date, theirs)
        self.clock_offset_s = round(theirs - self._clock())

    async def events(
        self, path_qs: str, *, method: str = "GET", accept: str = "text/event-stream",
        auth: Auth | None = None, max_event_bytes: int = MAX_EVENT,
        opened: Callable[[], None] | None = None,
    ) -> AsyncIterator[dict[str, str]]:
        """The server-sent events of one stream, each as ``{field: value}`` (``data``
        lines joined by newlines), until the server ends the stream. A 2xx answer that
        is not a stream (``accept`` allowed another type) is one event: ``{"data": its
        body}``.

        ``opened`` is called once the server answered 2xx. Raises :class:`PeerRejected`
        for an error status, and :class:`PeerError` for an event over
        ``max_event_bytes`` or a broken connection.
        """
        try:
            async for event in self._events(method, path_qs, accept, auth,
                                            max_event_bytes, opened):
                yield event
            return
        except PeerRejected as exc:
            # Only an answer's status raises it, before any event: as request(), a
            # signer whose log the node lacks offers it and asks once more.
            if not await self._offered_log_for(exc, auth):
                raise
        async for event in self._events(method, path_qs, accept, auth, max_event_bytes,
                                        opened):
            yield event

    async def _events(self, method: str, path_qs: str, accept: str, auth: Auth | None,
                      max_event_bytes: int, opened: Callable[[], None] | None
                      ) -> AsyncIterator[dict[str, str]]:
        url, headers = self._prepare(method, path_qs, b"", accept, None, auth)
        try:
            async with self._sess().request(
                method, url, headers=headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout),
            ) as resp:
                await self._answered(resp)
                if opened is not None:
                    opened()
                if resp.content_type != "text/event-stream":
                    data = await _read_bounded(resp, max_event_bytes)
                    if data is None:
                        raise PeerError(f"{self.where or self.base_url}: answer larger "
                                        f"than {max_event_bytes} bytes")
                    yield {"data": data.decode("utf-8", "replace")}
                    return
                async for event in _sse_events(resp, max_event_bytes, self.where or
                                               self.base_url):
                    yield event
        except CitynodeError:
            raise
        except _LIBRARY_ERRORS as exc:
            raise self._edge(exc) from exc


def refused_connection(exc: BaseException) -> bool:
    """Was ``exc`` (a :class:`PeerError`) caused by nothing listening at the address?"""
    return exc.__cause__ is not None and _refused_connection(exc.__cause__)


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int,
                        truncate: bool = False) -> Any:
    """The whole body, or None if it is larger than ``limit`` (with ``truncate``: its
    first ``limit`` bytes). (StreamReader.read(n) returns whatever is buffered, not
    everything up to n: a loop is needed.)"""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await resp.content.readany()
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            if truncate:
                chunks.append(chunk)
                return b"".join(chunks)[:limit]
            return None
        chunks.append(chunk)


async def _sse_events(resp: aiohttp.ClientResponse, limit: int, where: str
                      ) -> AsyncIterator[dict[str, str]]:
    """Parse ``text/event-stream``: one dict per blank-line-terminated event. Lines are
    split here (not with ``readline``, whose bound is the reader's buffer) so that an
    event, its lines included, never holds more than ``limit`` bytes."""
    buf = b""
    event: dict[str, str] = {}
    size = 0
    while True:
        chunk = await resp.content.readany()
        if not chunk:
            return
        # One copy per chunk, however many lines it holds (slicing the buffer line by
        # line would copy it once per line: quadratic in a stream of short lines).
        buf = buf + chunk if buf else chunk
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            raw = buf[start:nl]
            size += nl + 1 - start
            start = nl + 1
            if size > limit:
                raise PeerError(f"{where}: stream event larger than {limit} bytes")
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if not line:
                if event:
                    yield event
                event, size = {}, 0
                continue
            if line.startswith(":"):
                continue  # a comment (keep-alive)
            k, _, v = line.partition(":")
            v = v[1:] if v.startswith(" ") else v
            event[k] = event[k] + "\n" + v if k == "data" and k in event else v
        buf = buf[start:]
        if size + len(buf) > limit:
            raise PeerError(f"{where}: stream event larger than {limit} bytes")
