"""The web console, served by the node at ``/``: a static page (citynode/console/) that
reads the node's own API, a public helper endpoint, and an operator view behind a
cookie session.

Routes (docs/CONSOLE.md):

* ``GET /`` and ``GET /console/{file}``: the page and its assets, from a fixed list
  read from the package at start (nothing else on disk is reachable);
* ``GET /console/api/public``: who this node is and the names of the partners whose
  feeds it replicates (what its public card and its partners' cards already say);
* ``GET /console/api/session``: ``{"signed_in": bool}`` for the caller's cookie;
* ``GET /console/api/csrf``: a fresh anti-CSRF token, in the body and in an HttpOnly
  cookie (double submit: a cross-site page can read neither);
* ``POST /console/session``: the operator token (JSON ``{"token": ...}``) exchanged for
  a session: an opaque random id in an HttpOnly, Secure, SameSite=Strict cookie; the
  session is kept in memory here and expires (``SESSION_SECONDS``);
* ``POST /console/session/end``: sign out (both cookies cleared);
* ``GET /console/api/operator``: the operator's overview (partners, feeds, forks,
  checkpoints, metrics), read-only, for a signed-in session only.

The session cookie is honoured by ``/console/api/operator`` ALONE: the operator API
(``/v1/publish``, ``/v1/admin/*``, ``/metrics``) keeps requiring the bearer token, so a
browser session can never publish, add or remove partners. Both POSTs (the only
state-changing actions) need the CSRF token in ``X-CSRF-Token`` equal to the cookie's,
and an ``Origin`` that is this node's own; the token is compared in constant time
(identity.check_token, as the bearer token is). Wrong tokens are counted
(``citynode_console_sign_ins{outcome}``), logged, and throttled per client address
(:class:`SignInThrottle`: a few free tries, then a wait that doubles with each further
failure; while it lasts, sign-in answers 429 without looking at the token).

Every answer under these paths carries a strict Content-Security-Policy (no inline
script or style anywhere in the page) and the other security headers, HSTS included
(the node serves only HTTPS; docs/CONSOLE.md says why it is left out for ``localhost``).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import secrets
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from citynode import __version__
from citynode.identity import check_token
from citynode.logs import fields
from citynode.transport.web import NODE_KEY, error_response, in_thread

__all__ = [
    "CSP",
    "HSTS",
    "SECURITY_HEADERS",
    "SESSION_COOKIE",
    "Sessions",
    "SignInThrottle",
    "add_routes",
]

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'none'; frame-ancestors 'none'; base-uri 'none'; "
       "form-action 'self'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
# A year, this host name only: no includeSubDomains (a node does not own its sibling
# names) and no preload (that is a promise for the whole registrable domain).
HSTS = "max-age=31536000"
# __Host-: the browser keeps such a cookie only if Secure, Path=/ and without Domain,
# so no other site (a sibling host included) can plant or overwrite it.
SESSION_COOKIE = "__Host-cn_session"
CSRF_COOKIE = "__Host-cn_csrf"
SESSION_SECONDS = 3600
MAX_SESSIONS = 64
MAX_SIGN_IN_BYTES = 4096
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css",
          ".json": "application/json", ".svg": "image/svg+xml", ".md": "text/plain"}
_PREFIX = "/console"
# Sign-in throttle: wrong tokens one client address may send before it must wait; the
# first wait, doubled for each further wrong token, up to the cap; an address's count is
# forgotten this long after its last wrong token; at most this many addresses tracked.
FREE_FAILURES = 3
BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 900.0
FORGET_SECONDS = 3600.0
MAX_TRACKED = 4096

log = logging.getLogger("citynode.console")


@dataclass(slots=True)
class _Session:
    expires: float
    csrf: str


class Sessions:
    """Operator sessions held in memory (a restart signs everyone out): opaque random
    ids, each with an expiry and its own CSRF token; at most ``MAX_SESSIONS``, the
    oldest dropped first. ``clock``: seconds, monotonic."""

    def __init__(self, clock: Any = time.monotonic, ttl: float = SESSION_SECONDS) -> None:
        self.clock = clock
        self.ttl = ttl
        self._by_id: dict[str, _Session] = {}

    def create(self) -> tuple[str, str]:
        """A new session: ``(session id, its CSRF token)``."""
        self._expire()
        while len(self._by_id) >= MAX_SESSIONS:
            del self._by_id[next(iter(self._by_id))]
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        self._by_id[sid] = _Session(self.clock() + self.ttl, csrf)
        return sid, csrf

    def get(self, sid: str | None) -> _Session | None:
        """The live session with this id, or None (unknown, or expired)."""
        if not sid:
            return None
        s = self._by_id.get(sid)
        if s is None:
            return None
        if s.expires <= self.clock():
            del self._by_id[sid]
            return None
        return s

    def end(self, sid: str | None) -> None:
        if sid:
            self._by_id.pop(sid, None)

    def __len__(self) -> int:
        return len(self._by_id)

    def _expire(self) -> None:
        now = self.clock()
        for sid in [k for k, s in self._by_id.items() if s.expires <= now]:
            del self._by_id[sid]


@dataclass(slots=True)
class _Failures:
    count: int
    not_before: float
    last: float


class SignInThrottle:
    """Wrong operator tokens, counted per client address: after ``FREE_FAILURES`` of
    them, the address must wait ``BACKOFF_FIRST_SECONDS``, doubled for each further
    wrong token, at most ``BACKOFF_MAX_SECONDS``. A right token clears its count; a
    count is forgotten ``FORGET_SECONDS`` after its last wrong token. Bounded: at most
    ``MAX_TRACKED`` addresses (the least recently failed dropped first). ``clock``:
    seconds, monotonic.

    The wait is per address, not global, so a stranger's guesses cannot lock the
    operator out of the console (the CLI's bearer token is never throttled)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self.clock = clock
        self._by_addr: dict[str, _Failures] = {}

    def wait(self, addr: str) -> float:
        """Seconds ``addr`` must still wait before its next try (0: it may try now)."""
        f = self._by_addr.get(addr)
        if f is None:
            return 0.0
        now = float(self.clock())
        if now - f.last >= FORGET_SECONDS:
            del self._by_addr[addr]
            return 0.0
        return max(0.0, f.not_before - now)

    def failed(self, addr: str) -> tuple[int, float]:
        """Count a wrong token from ``addr``: ``(its wrong tokens so far, the wait it
        now has before its next try)``."""
        now = float(self.clock())
        f = self._by_addr.pop(addr, None)
        if f is None or now - f.last >= FORGET_SECONDS:
            f = _Failures(0, now, now)
        while len(self._by_addr) >= MAX_TRACKED:
            del self._by_addr[next(iter(self._by_addr))]
        f.count += 1
        f.last = now
        over = f.count - FREE_FAILURES
        wait = (0.0 if over <= 0 else
                min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2.0 ** min(over - 1, 30)))
        f.not_before = now + wait
        self._by_addr[addr] = f  # re-inserted: the most recently failed is kept longest
        return f.count, wait

    def succeeded(self, addr: str) -> None:
        self._by_addr.pop(addr, None)

    def __len__(self) -> int:
        return len(self._by_addr)


SESSIONS_KEY: web.AppKey[Sessions] = web.AppKey("console_sessions", Sessions)
THROTTLE_KEY: web.AppKey[SignInThrottle] = web.AppKey("console_throttle", SignInThrottle)
ASSETS_KEY: web.AppKey[dict[str, tuple[bytes, str]]] = web.AppKey("console_assets", dict)


def _load_assets() -> dict[str, tuple[bytes, str]]:
    """Every servable file of the console package: name -> (bytes, content type)."""
    out: dict[str, tuple[bytes, str]] = {}
    for entry in resources.files("citynode.console").iterdir():
        name = entry.name
        suffix = name[name.rfind("."):] if "." in name else ""
        if entry.is_file() and suffix in _TYPES:
            ctype = _TYPES[suffix]
            out[name] = (entry.read_bytes(), ctype)
        elif entry.is_file() and name.startswith("LICENSE"):
            out[name] = (entry.read_bytes(), "text/plain")
    return out


def add_routes(app: web.Application) -> None:
    """Serve the console from ``app`` (the node's application)."""
    app[SESSIONS_KEY] = Sessions()
    app[THROTTLE_KEY] = SignInThrottle()
    app[ASSETS_KEY] = _load_assets()
    app.on_response_prepare.append(_add_headers)
    r = app.router
    r.add_get("/", index)
    r.add_get(_PREFIX + "/api/public", public_info)
    r.add_get(_PREFIX + "/api/csrf", csrf_token)
    r.add_get(_PREFIX + "/api/session", session_state)
    r.add_get(_PREFIX + "/api/operator", operator_view)
    r.add_post(_PREFIX + "/session", sign_in)
    r.add_post(_PREFIX + "/session/end", sign_out)
    r.add_get(_PREFIX + "/{name}", asset)


def _is_console(path: str) -> bool:
    return path == "/" or path == _PREFIX or path.startswith(_PREFIX + "/")


async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    """The security headers on every console answer, errors included (they are made
    by the error middleware, after the handler)."""
    if not _is_console(request.path):
        return
    for k, v in SECURITY_HEADERS.items():
        response.headers[k] = v
    if not _is_localhost(request.host):
        response.headers["Strict-Transport-Security"] = HSTS
    if "Cache-Control" not in response.headers:
        response.headers["Cache-Control"] = "no-cache"


def _is_localhost(host: str) -> bool:
    """Is ``host`` (a Host header, port and all) the name ``localhost`` or a name under
    it? HSTS binds a host NAME, every port of it: sent for localhost, it would make the
    browser refuse plain HTTP to every other local service (a developer's, a device's
    set-up page) for a year. An IP address is safe to send it to (browsers ignore HSTS
    from IP literals, RFC 6797 section 8.1), as is every real host name."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip().rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")


# ------------------------------------------------------------------ the page


async def index(request: web.Request) -> web.Response:
    return _file(request, "index.html")


async def asset(request: web.Request) -> web.Response:
    return _file(request, request.match_info["name"])


def _file(request: web.Request, name: str) -> web.Response:
    found = request.app[ASSETS_KEY].get(name)
    if found is None:
        raise web.HTTPNotFound(text="no such file in the console")
    body, ctype = found
    return web.Response(body=body, content_type=ctype,
                        charset="utf-8" if ctype.startswith("text/") else None)


async def public_info(request: web.Request) -> web.Response:
    """This node's id and name, and its partners' names by node id: what the console
    shows beside each origin (the public card lists the partners' ids; their names
    are in their own public cards)."""
    node = request.app[NODE_KEY]
    names = {s["node_id"]: s["name"] for s in node.partners.status()}
    names[node.node_id] = node.config.node.name
    return web.json_response({"node": node.node_id, "name": node.config.node.name,
                              "version": __version__, "now_ms": node.now_ms(),
                              "names": names},
                             headers={"Cache-Control": "no-store"})


# ------------------------------------------------------------------ sessions


def _cookie(response: web.Response, name: str, value: str, max_age: int,
            http_only: bool = True) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/", secure=True,
                        httponly=http_only, samesite="Strict")


async def csrf_token(request: web.Request) -> web.Response:
    """A fresh CSRF token for the sign-in form, in the body and in an HttpOnly cookie:
    a POST must send the body's value in ``X-CSRF-Token`` and the cookie with it."""
    token = secrets.token_urlsafe(32)
    resp = web.json_response({"csrf": token}, headers={"Cache-Control": "no-store"})
    _cookie(resp, CSRF_COOKIE, token, SESSION_SECONDS)
    return resp


def _same_origin(request: web.Request) -> bool:
    """Does the request come from a page of this node? ``Origin`` must be present and
    name the host the request was sent to (a cross-site form or script sends its own),
    and the fetch metadata, where the browser sends it, must say same-origin."""
    origin = request.headers.get("Origin")
    if not origin or origin == "null":
        return False
    parts = urlsplit(origin)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        return False
    if parts.netloc.lower() != request.host.lower():
        return False
    site = request.headers.get("Sec-Fetch-Site")
    return site is None or site == "same-origin"


def _check_post(request: web.Request, expected: str | None) -> web.Response | None:
    """None if this POST passes the Origin and CSRF checks, else the 403 to answer."""
    if not _same_origin(request):
        return error_response(403, "bad_origin",
                              "this action must come from this node's own console page")
    given = request.headers.get("X-CSRF-Token", "")
    if not expected or not hmac.compare_digest(expected.encode(), given.encode()):
        return error_response(403, "bad_csrf",
                              "missing or stale CSRF token: reload the console page")
    return None


async def session_state(request: web.Request) -> web.Response:
    """Whether the caller's session cookie names a live session (so that the page
    asks for the operator view only when it will get it)."""
    live = request.app[SESSIONS_KEY].get(request.cookies.get(SESSION_COOKIE)) is not None
    return web.json_response({"signed_in": live}, headers={"Cache-Control": "no-store"})


async def sign_in(request: web.Request) -> web.Response:
    """Exchange the operator token for a session cookie (the token is not kept)."""
    refused = _check_post(request, request.cookies.get(CSRF_COOKIE))
    if refused is not None:
        return refused
    node = request.app[NODE_KEY]
    throttle = request.app[THROTTLE_KEY]
    addr = _client_address(request)
    # Refused before the body is read: a throttled client learns nothing of its token,
    # right or wrong ...
    if (refused := _throttled(request, throttle, addr)) is not None:
        return refused
    body = await _small_body(request)
    if body is None:
        return error_response(413, "too_large", "sign-in body too large")
    try:
        token = json.loads(body)["token"]
    except (ValueError, KeyError, TypeError):
        return error_response(400, "bad_request", 'send {"token": "..."}')
    # ... and asked again after the read, with no await from here to the failure being
    # counted: requests sent side by side all passed the first check before any of
    # them failed, and must not all be compared.
    if (refused := _throttled(request, throttle, addr)) is not None:
        return refused
    if not isinstance(token, str) or not check_token(node.identity.token, token):
        count, wait = throttle.failed(addr)
        node.metrics.console_sign_ins.labels("wrong_token").inc()
        log.warning("console sign-in refused: wrong operator token",
                    extra=fields(client=addr, failures=count, wait_s=wait))
        return error_response(403, "access_denied", "wrong operator token")
    throttle.succeeded(addr)
    node.metrics.console_sign_ins.labels("ok").inc()
    log.info("console sign-in", extra=fields(client=addr))
    sid, csrf = request.app[SESSIONS_KEY].create()
    resp = web.json_response({"signed_in": True, "csrf": csrf,
                              "expires_in": SESSION_SECONDS},
                             headers={"Cache-Control": "no-store"})
    _cookie(resp, SESSION_COOKIE, sid, SESSION_SECONDS)
    _cookie(resp, CSRF_COOKIE, csrf, SESSION_SECONDS)
    return resp


def _throttled(request: web.Request, throttle: SignInThrottle,
               addr: str) -> web.Response | None:
    """The 429 to answer while ``addr`` must wait (counted), else None."""
    wait = throttle.wait(addr)
    if wait <= 0:
        return None
    request.app[NODE_KEY].metrics.console_sign_ins.labels("throttled").inc()
    resp = error_response(429, "too_many_attempts",
                          f"too many wrong tokens from {addr}: try again in "
                          f"{math.ceil(wait)} s")
    resp.headers["Retry-After"] = str(math.ceil(wait))
    return resp


async def _small_body(request: web.Request) -> bytes | None:
    """The body, read within the node's read timeout (408 past it); None when it is
    over ``MAX_SIGN_IN_BYTES`` (nothing more than that is buffered)."""
    if (request.content_length or 0) > MAX_SIGN_IN_BYTES:
        return None
    node = request.app[NODE_KEY]
    out = bytearray()

    async def read() -> None:
        while len(out) <= MAX_SIGN_IN_BYTES:
            chunk = await request.content.read(MAX_SIGN_IN_BYTES + 1 - len(out))
            if not chunk:
                return
            out.extend(chunk)

    try:
        await asyncio.wait_for(read(), node.config.limits.read_timeout_seconds)
    except TimeoutError:
        raise web.HTTPRequestTimeout(text="request body not received in time") from None
    return None if len(out) > MAX_SIGN_IN_BYTES else bytes(out)


async def sign_out(request: web.Request) -> web.Response:
    """End the caller's session and clear every console cookie (session and CSRF).
    A live session needs its CSRF token (a cross-site page must not sign the operator
    out); a dead one (expired, or the node restarted) has nothing to protect, so its
    stale cookies are cleared on a same-origin request alone."""
    sessions = request.app[SESSIONS_KEY]
    sid = request.cookies.get(SESSION_COOKIE)
    session = sessions.get(sid)
    if session is not None:
        refused = _check_post(request, session.csrf)
    elif not _same_origin(request):
        refused = error_response(403, "bad_origin",
                                 "this action must come from this node's own console page")
    else:
        refused = None
    if refused is not None:
        return refused
    sessions.end(sid)
    resp = web.json_response({"signed_in": False}, headers={"Cache-Control": "no-store"})
    for name in (SESSION_COOKIE, CSRF_COOKIE):
        # The same attributes as when set: a __Host- cookie is only replaced by one
        # that is Secure, Path=/ and without Domain.
        resp.del_cookie(name, path="/", secure=True, httponly=True, samesite="Strict")
    return resp


def _client_address(request: web.Request) -> str:
    """The address sign-in failures are counted against: the peer's, or, from the
    ``[tls] trusted_proxy``, the address that proxy appended to ``X-Forwarded-For``
    (else every client behind it would share one count). IPv6 by /64: one host is
    usually given a whole /64."""
    peer = request.remote or ""
    proxy = request.app[NODE_KEY].config.tls.trusted_proxy
    if proxy and _ip(peer) is not None and _ip(peer) == _ip(proxy):
        forwarded = request.headers.get("X-Forwarded-For", "")[-1024:].split(",")[-1].strip()
        if _ip(forwarded) is not None:
            peer = forwarded
    ip = _ip(peer)
    if ip is None:
        return peer[:64] or "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


# ------------------------------------------------------------------ operator view


async def operator_view(request: web.Request) -> web.Response:
    """Everything the operator's page shows, in one read-only answer. 403 without a
    live session cookie (the bearer token is not taken here: /v1/admin/* is for it)."""
    session = request.app[SESSIONS_KEY].get(request.cookies.get(SESSION_COOKIE))
    if session is None:
        return error_response(403, "access_denied",
                              "sign in to the console with the operator token first")
    node = request.app[NODE_KEY]
    now = node.now_ms()
    ready, detail = await node.readiness()
    status = node.status()
    rows = await node.reads.feeds()
    me = node.public_key
    feeds = []
    checkpoints = []
    # Issue 13: each feed's completeness state, and a partner's feed's cadence from
    # its origin's signed card.
    states = {(f["origin"], f["feed"]): f["state"] for f in node.checkpoints.states()}
    for r in rows:
        own = r.origin == me
        cfg = node.config.feeds.get(r.feed) if own else None
        cadence = _cadence_seconds(cfg) if own else node.policy.cadence_of(r.origin, r.feed)
        age_s = max(0.0, (now - r.last_time) / 1000)
        feeds.append({
            "origin": node.policy.name(r.origin), "feed": r.feed, "own": own, "seq": r.seq,
            "head": r.head.hex(), "count": r.count, "last_time": r.last_time,
            "age_s": age_s, "access": node.feed_access(r.feed) if own else None,
            "cadence_s": cadence,
            "late_s": max(0.0, age_s - cadence) if cadence is not None else None,
            "state": states.get((r.origin, r.feed), "unknown"),
        })
        if own:
            held = await node.checkpoints.held(r.origin, r.feed)
            size = held[-1][0] if held else 0
            checkpoints.append({"feed": r.feed, "size": size, "head": r.seq,
                                "behind": max(0, r.seq - size),
                                "root": held[-1][1].hex() if held else None})
    forks = [{"origin": node.policy.name(f.origin), "feed": f.feed, "seq": f.seq, "kind": f.kind,
              "found_at": f.found_at, "reported_by": f.reported_by}
             for f in await in_thread(node.storage.fork_proofs)]
    node.metrics.db_size.set(await node.reads.db_size())
    return web.json_response({
        "node": node.node_id, "name": node.config.node.name, "now_ms": now,
        "ready": ready, "readiness": detail,
        "pending": status["pending"], "own_blocked": status["own_blocked"],
        "own_forked": status["own_forked"], "partners": status["partners"],
        "feeds": feeds, "checkpoints": checkpoints,
        "checkpoint_interval_s": node.config.checkpoints.interval_seconds,
        "forks": forks, "metrics": _metrics(node.metrics.registry),
        # The session's synchronizer token, for signing out after a reload: only a
        # page of this origin can read this answer (no CORS), so only it learns it.
        "csrf": session.csrf,
        "session_expires_in": max(0, int(session.expires
                                         - request.app[SESSIONS_KEY].clock())),
    }, headers={"Cache-Control": "no-store"})


def _cadence_seconds(cfg: Any) -> float | None:
    """The expected cadence of an own feed, where its config declares one (the
    ``[feeds.NAME]`` setting may not exist in this version: then None)."""
    for attr in ("cadence_seconds", "cadence"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return float(value)
    return None


# The metrics an operator looks at first (docs/API.md): name -> samples.
_WANTED = ("citynode_records_stored", "citynode_records_rejected",
           "citynode_records_received", "citynode_records_duplicate",
           "citynode_forks_detected", "citynode_partner_up", "citynode_partner_invalid",
           "citynode_pending_records", "citynode_live_streams", "citynode_stream_lagged",
           "citynode_connections_refused", "citynode_db_size_bytes", "citynode_feeds",
           "citynode_console_sign_ins")


def _metrics(registry: Any) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for family in registry.collect():
        if family.name not in _WANTED:
            continue
        samples = [{"labels": dict(s.labels), "value": s.value} for s in family.samples
                   if not s.name.endswith("_created")]
        out[family.name] = samples
    return out
