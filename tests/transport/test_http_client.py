"""The one HTTP client stack (transport/http.py) and the operator interface over it
(operator.py), against real servers: a node over real HTTPS, and small aiohttp servers
on 127.0.0.1 that answer what no node would (a proxy's page, oversized bodies/events)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from itertools import pairwise
from pathlib import Path

import msgpack
import pytest
from aiohttp import web

from citynode.cluster import free_ports
from citynode.core.keys import SigningKey, node_id
from citynode.errors import PeerError, PeerRejected
from citynode.operator import Operator
from citynode.runner import is_running
from citynode.transport.client import PeerClient
from citynode.transport.http import (
    BearerToken,
    HttpClient,
    NodeSignature,
    parse_error_body,
    refused_connection,
)
from tests.conftest import InProc, make_node_dir

Make = Callable[..., Awaitable[InProc]]


@pytest.fixture
async def plain() -> AsyncIterator[Callable[[web.Application], Awaitable[str]]]:
    """Factory: serve an aiohttp app over plain HTTP on 127.0.0.1; return its URL."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> str:
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_ports(1)[0]
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return f"http://127.0.0.1:{port}"

    yield start
    for r in runners:
        await r.cleanup()


async def test_a_refusal_carries_status_and_reason_code(inproc: Make) -> None:
    """The node's {"error", "message"} body is parsed once: status and reason are data."""
    a = await inproc("Jakarta")
    stranger = PeerClient(SigningKey.generate(), a.url, node_id=a.node.node_id,
                          fingerprint=a.node.identity.cert_fingerprint)
    try:
        with pytest.raises(PeerRejected) as e:
            await stranger.push([])
        assert (e.value.status, e.value.reason) == (403, "access_denied")
        assert "partner" in e.value.detail and a.url in str(e.value)
    finally:
        await stranger.close()
    async with HttpClient(a.url, fingerprint=a.node.identity.cert_fingerprint) as http:
        with pytest.raises(PeerRejected) as e:
            await http.request("GET", "/v1/records?feeds=x")
        assert (e.value.status, e.value.reason) == (400, "bad_request")
        assert "unknown query parameter" in e.value.detail
        with pytest.raises(PeerRejected) as e:
            await http.request("GET", "/v1/admin/status", auth=BearerToken("wrong"))
        assert (e.value.status, e.value.reason) == (403, "access_denied")
        # The right token passes the same hook.
        ok = await http.request("GET", "/v1/admin/status", accept="application/json",
                                auth=BearerToken(a.token))
        assert ok.json()["node_id"] == a.node.node_id


async def test_a_signed_read_needs_the_target_first(inproc: Make) -> None:
    a = await inproc("Jakarta")
    auth = NodeSignature(SigningKey.generate())
    async with HttpClient(a.url, fingerprint=a.node.identity.cert_fingerprint,
                          auth=auth) as http:
        with pytest.raises(PeerError, match="before the node's id is known"):
            await http.request("GET", "/v1/feeds")
        auth.target = a.node.node_id
        assert (await http.request("GET", "/v1/feeds", accept="application/json")
                ).json() == {"feeds": []}


async def test_an_answer_that_is_not_a_node_error_is_reason_unknown(plain: Callable[
        [web.Application], Awaitable[str]]) -> None:
    async def page(request: web.Request) -> web.Response:
        return web.Response(status=502, text="<html>\nBad\tGateway " + "x" * 100_000,
                            content_type="text/html")

    app = web.Application()
    app.router.add_get("/p", page)
    url = await plain(app)
    async with HttpClient(url) as http:
        with pytest.raises(PeerRejected) as e:
            await http.request("GET", "/p")
    assert (e.value.status, e.value.reason) == (502, "unknown")
    assert e.value.detail.startswith("<html> Bad Gateway x") and len(e.value.detail) <= 300


def test_error_bodies_are_parsed_with_bounds() -> None:
    assert parse_error_body(b'{"error": "untrusted_origin", "message": "a\\nb"}') == (
        "untrusted_origin", "a b")
    assert parse_error_body(b'{"error": "Not A Code!", "message": "m"}') is None
    assert parse_error_body(b'{"error": 3, "message": "m"}') is None
    assert parse_error_body(b"[]") is None and parse_error_body(b"\xff") is None
    long = json.dumps({"error": "x", "message": "m" * 10_000}).encode()
    assert parse_error_body(long) == ("x", "m" * 300)


async def test_bodies_and_events_are_read_within_their_bound(
        plain: Callable[[web.Application], Awaitable[str]]) -> None:
    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 200_000)

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"id: 1\n\n: keep-alive\n\nevent: record\ndata: a\ndata: b\nid: 2\n\n")
        await resp.write(b"data: " + b"y" * 5000)  # no end of line: must not buffer forever
        await resp.write(b"y" * 5000 + b"\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/big", big)
    app.router.add_get("/stream", stream)
    url = await plain(app)
    async with HttpClient(url) as http:
        assert len((await http.request("GET", "/big", max_bytes=200_000)).body) == 200_000
        with pytest.raises(PeerError, match="larger than 199999 bytes"):
            await http.request("GET", "/big", max_bytes=199_999)
        got = []
        with pytest.raises(PeerError, match="stream event larger than 4096 bytes"):
            async for ev in http.events("/stream", max_event_bytes=4096):
                got.append(ev)
        assert got == [{"id": "1"}, {"event": "record", "data": "a\nb", "id": "2"}]


async def test_nothing_listening_is_a_peer_error_from_the_library_error() -> None:
    (port,) = free_ports(1)
    async with HttpClient(f"http://127.0.0.1:{port}") as http:
        with pytest.raises(PeerError, match="cannot connect") as e:
            await http.request("GET", "/healthz")
    assert e.value.__cause__ is not None and refused_connection(e.value)


async def test_the_operator_of_a_stopped_node_is_served_in_process(tmp_path: Path) -> None:
    """The same HTTP operator API, on a private Unix socket, while the run lock is held;
    nothing is left behind."""
    d = make_node_dir(tmp_path, "Jakarta")
    before = set(Path(tempfile.gettempdir()).glob("citynode-*"))
    async with Operator.open(d) as op:
        assert not op.running and is_running(d)
        status = await op.status()
        assert status["name"] == "Jakarta" and status["partners"] == []
        out = await op.publish("noise", "org.example.Noise", [{"db": 50}, {"db": 51}])
        assert (out["first_seq"], out["last_seq"], out["access"]) == (1, 2, "public")
        assert await op.partners() == []
        assert await op.remove_partner(node_id(SigningKey.generate().public_key)) is False
        assert await op.sync() == {"fetched": 0}
        with pytest.raises(PeerRejected) as e:
            await op.publish("air", "AirQualityObserved", [{"pm25": "high"}])
        assert e.value.status == 422 and str(e.value) == e.value.detail
    assert not is_running(d)
    assert set(Path(tempfile.gettempdir()).glob("citynode-*")) <= before


async def test_refusals_of_gossip_say_why_as_a_reason_code(inproc: Make) -> None:
    """What a sender needs to decide 'final, or again later': a checkpoint of an origin
    the receiver does not trust (yet) and a proof that proves nothing differ by reason
    code, not only by message text."""
    from citynode.core import checkpoints as cps

    a = await inproc("Surabaya")
    b = await inproc("Singapore")
    await b.node.add_partner(a.url, a.node.node_id)
    stranger = SigningKey.generate()
    cp = cps.sign_checkpoint(stranger, "w", 4, b"\x07" * 32, a.node.now_ms())
    client = PeerClient(a.node.key, b.url, node_id=b.node.node_id,
                        fingerprint=b.node.identity.cert_fingerprint)
    try:
        with pytest.raises(PeerRejected) as e:
            await client.request("POST", "/v1/checkpoints", cp.envelope)
        assert (e.value.status, e.value.reason) == (400, "untrusted_origin")
        with pytest.raises(PeerRejected) as e:
            await client.request("POST", "/v1/proofs", b"\x93\x01\x02\x03")
        assert (e.value.status, e.value.reason) == (400, "invalid")
        # A valid fork proof about that stranger: proves something, of an origin the
        # receiver does not trust (yet) -- a refusal for the moment, as the checkpoint.
        from citynode.core.chain import ForkProof
        from citynode.core.records import sign_record
        from citynode.node.partners import verdict_on_payload

        x, y = (sign_record(stranger, feed="w", seq=1, prev=None, time_ms=1,
                            type="org.example.Noise", data={"db": n}) for n in (1, 2))
        with pytest.raises(PeerRejected) as e:
            await client.request("POST", "/v1/proofs", ForkProof(x.envelope, y.envelope
                                                                 ).encode())
        assert (e.value.status, e.value.reason) == (400, "untrusted_origin")
        assert verdict_on_payload(e.value) is False
    finally:
        await client.close()


async def test_a_stopped_node_syncs_through_the_operator_with_progress(
        inproc: Make, tmp_path: Path) -> None:
    """sync on a stopped node: fetched now, its progress streamed to the caller (the
    CLI's progress bar), its count the answer."""
    from citynode.node import Node
    from citynode.transport.server import serve
    from tests.conftest import eventually

    a = await inproc("Seoul")
    d = make_node_dir(tmp_path / "b", "Jakarta")
    b = Node.load(d)
    await b.start()
    runner = await serve(b, host="127.0.0.1", port=b.config.node.listen_port)
    try:
        await b.add_partner(a.url, a.node.node_id)
        await a.node.add_partner(f"https://127.0.0.1:{b.config.node.listen_port}",
                                 b.node_id)

        async def linked() -> bool:
            return b.links[a.node.public_key].up

        await eventually(linked)
    finally:
        await runner.cleanup()
        await b.stop()
    await a.node.publish("noise", "org.example.Noise", [{"db": i} for i in range(250)])
    seen: list[tuple[int, int]] = []
    async with Operator.open(d) as op:
        out = await op.sync(lambda done, total: seen.append((done, total)))
    assert out == {"fetched": 250}
    assert seen and seen[-1] == (250, 250)
    assert all(x[0] <= y[0] for x, y in pairwise(seen))


async def test_a_partners_answers_are_bounded_in_items_not_only_bytes(plain: Callable[
        [web.Application], Awaitable[str]]) -> None:
    """4 MB of empty byte strings is two million 'envelopes': a hostile partner's fetch
    answer must not make the node decode, refuse and log each one. Answers hold at most
    max_batch envelopes (cards: the cards a node keeps), each at most a record's size."""
    n = 2_000_000
    flood = b"\xdd" + n.to_bytes(4, "big") + b"\xc4\x00" * n
    fair = msgpack.packb([b"\x01" * 10] * 3)
    huge_item = msgpack.packb([b"\x02" * (70 * 1024)])
    answers = {"/v1/fetch": flood, "/v1/cards": flood}

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=answers[request.path], content_type="application/msgpack")

    app = web.Application()
    app.router.add_post("/v1/fetch", answer)
    app.router.add_get("/v1/cards", answer)
    url = await plain(app)
    me = SigningKey.generate()
    client = PeerClient(me, url, node_id=node_id(SigningKey.generate().public_key),
                        fingerprint=None, max_batch=1000)
    try:
        with pytest.raises(PeerError, match="at most 1000 envelopes"):
            await client.fetch(b"")
        with pytest.raises(PeerError, match="at most 10001 envelopes"):
            await client.cards()
        answers["/v1/fetch"] = huge_item  # one item over the largest envelope
        with pytest.raises(PeerError):
            await client.fetch(b"")
        answers["/v1/fetch"] = fair
        assert await client.fetch(b"") == [b"\x01" * 10] * 3
    finally:
        await client.close()
