"""The web console over real HTTPS (an in-process node): the page and its assets, the
security headers on every answer (HSTS but for localhost), the session cookie's flags,
sign-out clearing every console cookie, wrong tokens counted, logged and throttled per
client address, and the refusals: wrong token, missing or wrong CSRF token, foreign
Origin, no session, and a session cookie that must not open the bearer-token operator
API."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from http.cookies import SimpleCookie
from typing import Any

import aiohttp
import pytest

from citynode.transport.api_console import (
    CSP,
    FREE_FAILURES,
    HSTS,
    SECURITY_HEADERS,
    THROTTLE_KEY,
    Sessions,
    SignInThrottle,
)
from tests.conftest import InProc

Make = Callable[..., Awaitable[InProc]]


def assert_secure_headers(resp: aiohttp.ClientResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert resp.headers.get(name) == value, name
    # Served to 127.0.0.1 here (browsers ignore HSTS from an IP literal, but a name
    # would keep it: see test_hsts_for_every_host_name_but_localhost).
    assert resp.headers.get("Strict-Transport-Security") == HSTS
    csp = resp.headers["Content-Security-Policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'",
                      "connect-src 'self'", "frame-ancestors 'none'", "base-uri 'none'",
                      "form-action 'self'"):
        assert directive in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp


def jar(cookies: dict[str, str]) -> dict[str, str]:
    """A Cookie header (sent as is: aiohttp's cookie jars keep none for an IP host)."""
    return {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())} if cookies else {}


def set_cookies(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    """The Set-Cookie headers of an answer, parsed: name -> Morsel."""
    out: dict[str, Any] = {}
    for raw in resp.headers.getall("Set-Cookie", []):
        c: SimpleCookie = SimpleCookie()
        c.load(raw)
        out.update(c)
    return out


async def csrf(n: InProc, session: aiohttp.ClientSession) -> tuple[str, str]:
    """A CSRF token from the console: (body value, cookie value)."""
    async with session.get(n.url + "/console/api/csrf") as r:
        assert r.status == 200
        assert_secure_headers(r)
        token = (await r.json())["csrf"]
        cookie = set_cookies(r)["__Host-cn_csrf"]
    assert cookie["httponly"] and cookie["secure"] and cookie["samesite"] == "Strict"
    return token, cookie.value


async def sign_in(n: InProc, session: aiohttp.ClientSession, token: str, *,
                  origin: str | None = "self", csrf_header: str | None = "good",
                  csrf_cookie: str | None = "good") -> aiohttp.ClientResponse:
    good, cookie = await csrf(n, session)
    headers = {"Content-Type": "application/json"}
    if origin is not None:
        headers["Origin"] = n.url if origin == "self" else origin
    if csrf_header is not None:
        headers["X-CSRF-Token"] = good if csrf_header == "good" else csrf_header
    cookies = {}
    if csrf_cookie is not None:
        cookies["__Host-cn_csrf"] = cookie if csrf_cookie == "good" else csrf_cookie
    r = await session.post(n.url + "/console/session", json={"token": token},
                           headers={**headers, **jar(cookies)})
    await r.read()
    return r


def pinned(n: InProc) -> aiohttp.TCPConnector:
    return aiohttp.TCPConnector(ssl=aiohttp.Fingerprint(n.node.identity.cert_fingerprint))


@pytest.fixture
async def node(inproc: Make) -> InProc:
    return await inproc("Jakarta")


async def test_page_and_assets_with_security_headers(node: InProc) -> None:
    s = node.session
    async with s.get(node.url + "/") as r:
        assert r.status == 200
        assert r.content_type == "text/html"
        page = await r.text()
        assert_secure_headers(r)
    # No inline script or style: the CSP would block them, so there must be none.
    assert "<style" not in page and " style=" not in page
    assert "<script>" not in page and "<script " in page
    assert "/console/app.js" in page and "/console/uPlot.iife.min.js" in page
    for name, ctype in [("app.js", "text/javascript"), ("app.css", "text/css"),
                        ("uPlot.iife.min.js", "text/javascript"),
                        ("land-110m.json", "application/json"),
                        ("LICENSE.uPlot", "text/plain"), ("LICENSES.md", "text/plain")]:
        async with s.get(node.url + "/console/" + name) as r:
            assert r.status == 200, name
            assert r.content_type == ctype
            assert_secure_headers(r)
            assert len(await r.read()) > 100
    # Nothing outside the package's file list is reachable, and the 404 carries the
    # headers too (made by the error middleware, after the handler).
    for bad in ("/console/nope.js", "/console/..%2Fserver.py", "/console/__init__.py"):
        async with s.get(node.url + bad) as r:
            assert r.status == 404, bad
            assert_secure_headers(r)
    # The node's other answers are not the console's: no console CSP on them.
    async with s.get(node.url + "/healthz") as r:
        assert r.status == 200
        assert "Content-Security-Policy" not in r.headers


async def test_public_info_names_the_node(node: InProc) -> None:
    async with node.session.get(node.url + "/console/api/public") as r:
        assert r.status == 200
        body = await r.json()
    assert body["node"] == node.node.node_id
    assert body["name"] == "Jakarta"
    assert body["names"] == {node.node.node_id: "Jakarta"}


async def test_sign_in_sets_a_strict_session_cookie(node: InProc) -> None:
    async with aiohttp.ClientSession(
            connector=pinned(node),
            cookie_jar=aiohttp.DummyCookieJar()) as s:
        r = await sign_in(node, s, node.token)
        assert r.status == 200
        assert_secure_headers(r)
        assert r.headers["Cache-Control"] == "no-store"
        cookies = set_cookies(r)
        sid = cookies["__Host-cn_session"]
        assert sid["httponly"] and sid["secure"] and sid["samesite"] == "Strict"
        assert sid["path"] == "/" and not sid["domain"]
        assert int(sid["max-age"]) > 0
        # The session id is opaque: not the token, nothing derived from it in sight.
        assert node.token not in sid.value and len(sid.value) >= 40
        body = await r.json()
        assert node.token not in str(body)
        # The session opens the console's operator view ...
        own = jar({"__Host-cn_session": sid.value})
        async with s.get(node.url + "/console/api/operator", headers=own) as v:
            assert v.status == 200
            assert_secure_headers(v)
            view = await v.json()
        assert view["name"] == "Jakarta" and view["partners"] == []
        assert "citynode_records_stored" in view["metrics"]
        assert view["csrf"] == body["csrf"]
        # ... and nothing else: the operator API keeps requiring the bearer token.
        for method, path in [("GET", "/v1/admin/status"), ("GET", "/v1/admin/partners"),
                             ("GET", "/metrics"), ("POST", "/v1/admin/sync"),
                             ("POST", "/v1/publish?feed=f&type=org.example.T")]:
            async with s.request(method, node.url + path, data=b"{}",
                                 headers={**own, "Origin": node.url,
                                          "X-CSRF-Token": body["csrf"]}) as a:
                assert a.status == 403, path
        # Signing out ends the session on the server (the old cookie is worthless) and
        # clears every console cookie in the browser, with the attributes a __Host-
        # cookie is only replaced with.
        async with s.post(node.url + "/console/session/end",
                          headers={**own, "Origin": node.url,
                                   "X-CSRF-Token": body["csrf"]}) as o:
            assert o.status == 200
            assert_cleared(o)
        async with s.get(node.url + "/console/api/operator", headers=own) as v:
            assert v.status == 403


def assert_cleared(resp: aiohttp.ClientResponse) -> None:
    """The answer deletes both console cookies (empty, expired now)."""
    cookies = set_cookies(resp)
    for name in ("__Host-cn_session", "__Host-cn_csrf"):
        assert name in cookies, (name, resp.headers.getall("Set-Cookie", []))
        c = cookies[name]
        assert c.value == "" and c["max-age"] == "0", name
        assert c["secure"] and c["path"] == "/" and not c["domain"], name


async def test_sign_out_of_a_dead_session_still_clears_the_cookies(node: InProc) -> None:
    """After a restart or expiry the browser still holds stale cookies: signing out
    clears them (same origin required; no session left to need a CSRF token)."""
    async with aiohttp.ClientSession(connector=pinned(node),
                                     cookie_jar=aiohttp.DummyCookieJar()) as s:
        stale = jar({"__Host-cn_session": "x" * 43, "__Host-cn_csrf": "y" * 43})
        async with s.post(node.url + "/console/session/end",
                          headers={**stale, "Origin": "https://evil.example"}) as o:
            assert o.status == 403 and (await o.json())["error"] == "bad_origin"
            assert set_cookies(o) == {}
        async with s.post(node.url + "/console/session/end",
                          headers={**stale, "Origin": node.url}) as o:
            assert o.status == 200
            assert_cleared(o)


async def test_hsts_for_every_host_name_but_localhost(node: InProc) -> None:
    """HSTS binds a host name on every port: sent for localhost it would force HTTPS
    on every other local service for a year, so localhost (and *.localhost) is spared;
    any other name or address gets it, errors included."""
    for host, sent in [("city.example.org", True), ("city.example.org:8443", True),
                       ("127.0.0.1:8443", True), ("[::1]:8443", True),
                       ("localhost", False), (f"localhost:{node.port}", False),
                       ("LOCALHOST.:1", False), ("console.localhost", False)]:
        for path in ("/", "/console/nope.js", "/console/api/public"):
            async with node.session.get(node.url + path, headers={"Host": host}) as r:
                assert r.status in (200, 404)
                got = r.headers.get("Strict-Transport-Security")
                assert got == (HSTS if sent else None), (host, path, got)
                # The other headers do not depend on the name.
                assert r.headers["Content-Security-Policy"] == CSP
    assert "includeSubDomains" not in HSTS and "preload" not in HSTS


def sign_ins(n: InProc, outcome: str) -> float:
    v = n.node.metrics.registry.get_sample_value("citynode_console_sign_ins_total",
                                                 {"outcome": outcome})
    return v or 0.0


async def test_wrong_tokens_are_counted_logged_and_throttled_per_address(
        node: InProc, caplog: pytest.LogCaptureFixture) -> None:
    now = [5000.0]
    runner: Any = node.runner
    runner.app[THROTTLE_KEY].clock = lambda: now[0]
    caplog.set_level(logging.INFO, logger="citynode.console")

    async def attempt(s: aiohttp.ClientSession, token: str,
                      extra: dict[str, str] | None = None) -> aiohttp.ClientResponse:
        good, cookie = await csrf(node, s)
        r = await s.post(node.url + "/console/session", json={"token": token},
                         headers={"Origin": node.url, "X-CSRF-Token": good,
                                  **jar({"__Host-cn_csrf": cookie}), **(extra or {})})
        await r.read()
        return r

    wrong = "wrong-" + node.token
    async with aiohttp.ClientSession(connector=pinned(node),
                                     cookie_jar=aiohttp.DummyCookieJar()) as s, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                ssl=aiohttp.Fingerprint(node.node.identity.cert_fingerprint),
                local_addr=("127.0.0.2", 0)), cookie_jar=aiohttp.DummyCookieJar()) as other:
        # The free tries: refused as wrong, no wait.
        for _ in range(FREE_FAILURES):
            r = await attempt(s, wrong)
            assert r.status == 403 and "Retry-After" not in r.headers
        # One more wrong token: refused, and now 127.0.0.1 must wait 1 s ...
        assert (await attempt(s, wrong)).status == 403
        r = await attempt(s, node.token)
        assert r.status == 429, "the right token too: not even looked at while waiting"
        assert (await r.json())["error"] == "too_many_attempts"
        assert r.headers["Retry-After"] == "1"
        assert_secure_headers(r)
        assert "__Host-cn_session" not in set_cookies(r)
        # ... whatever X-Forwarded-For it claims (no trusted proxy: not believed) ...
        r = await attempt(s, node.token, {"X-Forwarded-For": "203.0.113.9"})
        assert r.status == 429
        # ... while another address signs in at once.
        assert (await attempt(other, node.token)).status == 200
        # The wait doubles with each further wrong token.
        now[0] += 1.0
        assert (await attempt(s, wrong)).status == 403
        r = await attempt(s, wrong)
        assert r.status == 429 and r.headers["Retry-After"] == "2"
        now[0] += 2.0
        assert (await attempt(s, wrong)).status == 403
        r = await attempt(s, node.token)
        assert r.status == 429 and r.headers["Retry-After"] == "4"
        # After the wait, the right token signs in and clears the count: the next
        # wrong token is a free one again.
        now[0] += 4.0
        assert (await attempt(s, node.token)).status == 200
        r = await attempt(s, wrong)
        assert r.status == 403 and "Retry-After" not in r.headers
        assert (await attempt(s, wrong)).status == 403  # free, not 429

    assert sign_ins(node, "wrong_token") == FREE_FAILURES + 1 + 2 + 2
    assert sign_ins(node, "throttled") == 4
    assert sign_ins(node, "ok") == 2
    refused = [r for r in caplog.records if "sign-in refused" in r.getMessage()]
    assert len(refused) == FREE_FAILURES + 1 + 2 + 2
    assert {r.fields["client"] for r in refused} == {"127.0.0.1"}  # type: ignore[attr-defined]
    assert [r.fields["wait_s"] for r in refused[:5]] == [0, 0, 0, 1, 2]  # type: ignore[attr-defined]
    assert all(node.token not in r.getMessage() and node.token not in str(r.__dict__)
               for r in caplog.records)
    # The operator's view lists the counts with the metrics that matter.
    async with aiohttp.ClientSession(connector=pinned(node),
                                     cookie_jar=aiohttp.DummyCookieJar()) as s:
        sid = set_cookies(await sign_in(node, s, node.token))["__Host-cn_session"].value
        async with s.get(node.url + "/console/api/operator",
                         headers=jar({"__Host-cn_session": sid})) as v:
            shown = (await v.json())["metrics"]["citynode_console_sign_ins"]
    assert {x["labels"]["outcome"]: x["value"] for x in shown}["throttled"] == 4


async def test_guesses_sent_side_by_side_are_throttled_too(node: InProc) -> None:
    """Twenty wrong tokens sent at once from one address: they all pass the check made
    before their bodies are read, but only the free tries and the one that starts the
    wait are compared; the rest are refused 429 (the check is made again, after the
    read, with no await before the failure is counted)."""
    async with aiohttp.ClientSession(connector=pinned(node),
                                     cookie_jar=aiohttp.DummyCookieJar()) as s:
        tokens = [await csrf(node, s) for _ in range(20)]

        async def guess(good: str, cookie: str) -> int:
            async with s.post(node.url + "/console/session", json={"token": "wrong"},
                              headers={"Origin": node.url, "X-CSRF-Token": good,
                                       **jar({"__Host-cn_csrf": cookie})}) as r:
                return r.status

        statuses = await asyncio.gather(*(guess(g, c) for g, c in tokens))
    assert sorted(statuses) == [403] * (FREE_FAILURES + 1) + [429] * (20 - FREE_FAILURES - 1)
    assert sign_ins(node, "wrong_token") == FREE_FAILURES + 1


async def test_behind_the_trusted_proxy_each_forwarded_client_has_its_own_count(
        inproc: Make) -> None:
    n = await inproc("Lima", settings={("tls", "trusted_proxy"): "127.0.0.1"})
    async with aiohttp.ClientSession(connector=pinned(n),
                                     cookie_jar=aiohttp.DummyCookieJar()) as s:
        async def attempt(token: str, client: str) -> int:
            good, cookie = await csrf(n, s)
            # The proxy appends the address it saw: the last one counts, not what a
            # client wrote before it.
            async with s.post(n.url + "/console/session", json={"token": token},
                              headers={"Origin": n.url, "X-CSRF-Token": good,
                                       "X-Forwarded-For": f"10.0.0.1, {client}",
                                       **jar({"__Host-cn_csrf": cookie})}) as r:
                return r.status

        for _ in range(FREE_FAILURES + 1):
            assert await attempt("wrong", "198.51.100.7") == 403
        assert await attempt(n.token, "198.51.100.7") == 429
        assert await attempt(n.token, "198.51.100.8") == 200
        # IPv6 clients are counted by /64.
        for _ in range(FREE_FAILURES + 1):
            assert await attempt("wrong", "2001:db8:1:2::5") == 403
        assert await attempt(n.token, "2001:db8:1:2:ffff::1") == 429
        assert await attempt(n.token, "2001:db8:1:3::5") == 200


def test_throttle_forgets_and_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import citynode.transport.api_console as console

    now = [0.0]
    t = SignInThrottle(clock=lambda: now[0])
    waits = [t.failed("a")[1] for _ in range(FREE_FAILURES + 12)]
    assert waits[:FREE_FAILURES] == [0.0] * FREE_FAILURES
    assert waits[FREE_FAILURES:FREE_FAILURES + 4] == [1.0, 2.0, 4.0, 8.0]
    assert waits[-1] == console.BACKOFF_MAX_SECONDS  # capped
    assert t.wait("a") == console.BACKOFF_MAX_SECONDS and t.wait("b") == 0.0
    now[0] += console.FORGET_SECONDS
    assert t.wait("a") == 0.0 and len(t) == 0  # forgotten an hour after the last
    assert t.failed("a") == (1, 0.0)
    monkeypatch.setattr(console, "MAX_TRACKED", 8)
    for i in range(100):
        t.failed(f"10.0.0.{i}")
    assert len(t) == 8 and t.wait("10.0.0.99") == 0.0 and "10.0.0.99" in t._by_addr


async def test_refusals(node: InProc) -> None:
    async with aiohttp.ClientSession(
            connector=pinned(node),
            cookie_jar=aiohttp.DummyCookieJar()) as s:
        async def refused(r: aiohttp.ClientResponse, reason: str) -> None:
            assert r.status == 403
            assert (await r.json())["error"] == reason
            assert "__Host-cn_session" not in set_cookies(r)
            assert_secure_headers(r)

        await refused(await sign_in(node, s, "wrong-" + node.token), "access_denied")
        await refused(await sign_in(node, s, ""), "access_denied")
        await refused(await sign_in(node, s, node.token, csrf_header=None), "bad_csrf")
        await refused(await sign_in(node, s, node.token, csrf_header="x" * 43), "bad_csrf")
        await refused(await sign_in(node, s, node.token, csrf_cookie=None), "bad_csrf")
        await refused(await sign_in(node, s, node.token, origin=None), "bad_origin")
        await refused(await sign_in(node, s, node.token, origin="https://evil.example"),
                      "bad_origin")
        await refused(await sign_in(node, s, node.token, origin="null"), "bad_origin")
        # No cookie, a made-up one, or the bearer token: the console's view is refused.
        for headers in [{}, jar({"__Host-cn_session": "x" * 43}), node.auth()]:
            async with s.get(node.url + "/console/api/operator", headers=headers) as v:
                assert v.status == 403
        # Sign-out without the session's CSRF token does not end the session.
        ok = await sign_in(node, s, node.token)
        sid = set_cookies(ok)["__Host-cn_session"].value
        own = jar({"__Host-cn_session": sid})
        async with s.post(node.url + "/console/session/end",
                          headers={**own, "Origin": node.url}) as o:
            await refused(o, "bad_csrf")
        async with s.get(node.url + "/console/api/operator", headers=own) as v:
            assert v.status == 200
        # An oversized body is refused before it is parsed.
        good, cookie = await csrf(node, s)
        async with s.post(node.url + "/console/session", data=b"{" + b" " * 10_000 + b"}",
                          headers={**jar({"__Host-cn_csrf": cookie}),
                                   "Origin": node.url, "X-CSRF-Token": good}) as r:
            assert r.status == 413

        async def chunks() -> Any:
            for _ in range(10):
                yield b" " * 1000

        async with s.post(node.url + "/console/session", data=chunks(),
                          headers={**jar({"__Host-cn_csrf": cookie}),
                                   "Origin": node.url, "X-CSRF-Token": good}) as r:
            assert r.status == 413


def test_every_console_file_ships_in_the_wheel() -> None:
    """A file the package-data patterns miss would be served from a checkout but be
    missing from an installed node."""
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-data"]["citynode.console"]
    files = [p.name for p in (root / "citynode" / "console").iterdir()
             if p.is_file() and p.suffix != ".py"]
    assert "app.js" in files and "LICENSE.uPlot" in files
    assert [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)] == []


def test_sessions_expire_and_are_bounded() -> None:
    now = [1000.0]
    s = Sessions(clock=lambda: now[0], ttl=60)
    sid, token = s.create()
    live = s.get(sid)
    assert live is not None and live.csrf == token
    assert s.get(None) is None and s.get("") is None and s.get("other") is None
    now[0] += 61
    assert s.get(sid) is None and len(s) == 0
    ids = [s.create()[0] for _ in range(200)]
    assert len(s) == 64
    assert s.get(ids[0]) is None and s.get(ids[-1]) is not None
    s.end(ids[-1])
    assert s.get(ids[-1]) is None


def test_csp_has_no_unsafe_source() -> None:
    assert "unsafe" not in CSP and "*" not in CSP and "http:" not in CSP
