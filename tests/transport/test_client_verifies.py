"""The partner-side client verifies every record itself: a hostile node cannot slip it one.

The hostile node here is a real HTTPS server on 127.0.0.1 with its own self-signed
certificate and a card signed by its own node key that names that certificate, so a
client pinning it by node id (or by fingerprint) connects -- and every answer is
otherwise valid: the right content type, a well-formed envelope, a good record first.
Only one record is bad: a signature byte flipped, a body byte flipped, a payload that is
not the one whose digest was signed, a whole valid signature by a key other than the
origin the body names, a validly signed body that is not canonical msgpack, a sealed
record whose ciphertext does not open for its reader, or (for ``get``) another valid
record than the one asked for.

``Client.get``, ``Client.query``, ``Client.subscribe`` and ``citynode subscribe`` must
refuse it with :class:`InvalidRecord` (one error line and exit status 1 for the CLI) and
never hand the bad record out. The good record before it is handed out: the control
that shows each test reached the verification step through the pinned connection.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
from aiohttp import web

from citynode import __version__
from citynode.client import Client
from citynode.core.cards import make_card
from citynode.core.keys import DOMAIN_RECORD, SigningKey, node_id
from citynode.core.records import (
    Record,
    encode_record,
    make_body,
    record_id,
    sign_record,
)
from citynode.errors import InvalidRecord, PeerError
from citynode.identity import cert_fingerprint, load_identity, make_tls_certificate
from tests.conftest import make_node_dir

TYPE = "org.example.Test"
FEED = "a"
ORIGIN = SigningKey(bytes([7]) * 32)  # the city whose records the hostile node relays
OTHER = SigningKey(bytes([8]) * 32)  # a city that did not sign them
NOW = int(time.time() * 1000)


@dataclass
class Bad:
    """One bad record: its envelope, the id a client asks ``get`` for, the reason code
    the client must raise and a fragment of its message (the CLI's error line)."""

    envelope: bytes
    rid: bytes
    reason: str
    message: str
    needs_reader: bool = False


@dataclass
class Hostile:
    """The hostile node: what it serves, and how a client pins it."""

    url: str
    node_id: str
    fingerprint: bytes
    card: bytes = b""
    get_answer: bytes = b""  # served for GET /v1/records/{any id}
    page: list[bytes] = field(default_factory=list)  # served by query and stream
    cursors: list[int] = field(default_factory=list)  # the stream's ids (default 1, 2, ..)
    asked: list[str] = field(default_factory=list)  # request paths, in order


def _good(seq: int, prev: bytes | None, n: int) -> Record:
    return sign_record(ORIGIN, feed=FEED, seq=seq, prev=prev, time_ms=NOW, type=TYPE,
                       data={"n": n})


GOOD1 = _good(1, None, 1)
GOOD2 = _good(2, GOOD1.id, 2)


def _flip(data: bytes, i: int) -> bytes:
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]


def _bad_records(reader: SigningKey) -> dict[str, Bad]:
    """Every bad record, built from GOOD2 (seq 2 of the same feed)."""
    # One body byte changed (feed a -> b), still canonical and a valid body: only the
    # signature no longer matches.
    body3 = GOOD2.body.replace(b"\xa4feed\xa1a", b"\xa4feed\xa1b")
    assert len(body3) == len(GOOD2.body)
    assert sum(a != b for a, b in zip(body3, GOOD2.body, strict=True)) == 1
    # One payload byte changed (n: 2 -> 3), still canonical and a valid payload: the
    # digest the body carries no longer matches.
    payload3 = GOOD2.payload.replace(b"\xa1n\x02", b"\xa1n\x03")
    assert payload3 != GOOD2.payload
    # The same fields in another key order, signed by the origin: a second encoding.
    fields = GOOD2.fields()
    unsorted = msgpack.packb({k: fields[k] for k in sorted(fields, reverse=True)},
                             use_bin_type=True)
    assert unsorted != GOOD2.body and len(unsorted) == len(GOOD2.body)
    # Sealed to the reader, signed by the origin, ciphertext altered before signing:
    # the signature holds, the seal does not open.
    sealed = sign_record(ORIGIN, feed=FEED, seq=2, prev=GOOD1.id, time_ms=NOW, type=TYPE,
                         data={"n": 2}, readers=[reader.public_key])
    assert sealed.sealed is not None
    broken = dict(sealed.sealed, ct=_flip(sealed.sealed["ct"], 0))
    sealed_body, sealed_payload = make_body(origin=ORIGIN.public_key, feed=FEED, seq=2,
                                            prev=GOOD1.id, time_ms=NOW, sealed=broken)
    bad_sig = "signature does not verify against the origin key"
    payload = GOOD2.payload
    return {
        "signature_byte": Bad(encode_record(GOOD2.body, _flip(GOOD2.sig, 10), payload),
                              GOOD2.id, "bad_signature", bad_sig),
        "body_byte": Bad(encode_record(body3, GOOD2.sig, payload), record_id(body3),
                         "bad_signature", bad_sig),
        "payload_byte": Bad(encode_record(GOOD2.body, GOOD2.sig, payload3), GOOD2.id,
                            "payload_mismatch", "does not match the digest"),
        "other_signer": Bad(encode_record(GOOD2.body, OTHER.sign(DOMAIN_RECORD, GOOD2.body),
                                          payload), GOOD2.id, "bad_signature", bad_sig),
        "non_canonical": Bad(encode_record(unsorted, ORIGIN.sign(DOMAIN_RECORD, unsorted),
                                           payload),
                             record_id(unsorted), "non_canonical",
                             "map keys are not sorted"),
        "seal": Bad(encode_record(sealed_body, ORIGIN.sign(DOMAIN_RECORD, sealed_body),
                                  sealed_payload),
                    record_id(sealed_body), "bad_sealed", "does not decrypt",
                    needs_reader=True),
    }


KINDS = ["signature_byte", "body_byte", "payload_byte", "other_signer", "non_canonical",
         "seal"]


@pytest.fixture
def reader_dir(tmp_path: Path) -> Path:
    """A node data dir whose key is the reader the sealed record is sealed to (the CLI's
    ``-d``)."""
    return make_node_dir(tmp_path, "Reader")


@pytest.fixture
def reader(reader_dir: Path) -> SigningKey:
    return load_identity(reader_dir).key


@pytest.fixture
async def hostile(tmp_path: Path) -> AsyncIterator[Hostile]:
    """A hostile node serving HTTPS on 127.0.0.1 with a real self-signed certificate."""
    cert_pem, key_pem = make_tls_certificate("Hostile", ["127.0.0.1"])
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    node_key = SigningKey.generate()
    state = Hostile("", node_key.node_id, cert_fingerprint(cert_pem))

    async def card(request: web.Request) -> web.Response:
        state.asked.append(request.path_qs)
        return web.Response(body=state.card, content_type="application/msgpack")

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def get_record(request: web.Request) -> web.Response:
        state.asked.append(request.path_qs)
        return web.Response(body=state.get_answer, content_type="application/msgpack")

    async def records(request: web.Request) -> web.Response:
        state.asked.append(request.path_qs)
        page = msgpack.packb({"records": state.page, "next": None}, use_bin_type=True)
        return web.Response(body=page, content_type="application/msgpack")

    async def stream(request: web.Request) -> web.StreamResponse:
        state.asked.append(request.path_qs)
        after = int(request.query.get("after", "0"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for cursor, env in zip(state.cursors or range(1, len(state.page) + 1), state.page,
                               strict=True):
            if cursor > after:
                data = base64.b64encode(env).decode()
                await resp.write(f"id: {cursor}\r\nevent: record\r\ndata: {data}\r\n\r\n"
                                 .encode())
        await asyncio.sleep(60)  # held open, as a live stream is (cancelled on hang-up)
        return resp

    app = web.Application()
    app.router.add_get("/.well-known/citynode", card)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/records/{rid}", get_record)
    app.router.add_get("/v1/records", records)
    app.router.add_get("/v1/stream", stream)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = runner.addresses[0][1]
    state.url = f"https://127.0.0.1:{port}"
    state.card = make_card(node_key, name="Hostile", url=state.url,
                           tls_fingerprint=state.fingerprint, feeds=[(FEED, "public")],
                           partners=[], software=f"citynode/{__version__}",
                           now_ms=int(time.time() * 1000)).envelope
    try:
        yield state
    finally:
        await runner.cleanup()


def _client(h: Hostile, bad: Bad, reader: SigningKey, pin: str) -> Client:
    """A client pinned to the hostile node by its node id (its card names the
    certificate) or directly by the certificate's fingerprint; signing as the reader
    where the bad record is sealed to it."""
    key = reader if bad.needs_reader else None
    if pin == "node_id":
        return Client(h.url, node_id=h.node_id, key=key)
    return Client(h.url, fingerprint=h.fingerprint, key=key)


def _assert_refused(exc: InvalidRecord, bad: Bad) -> None:
    assert exc.reason == bad.reason, (exc.reason, str(exc))
    assert bad.message in str(exc), str(exc)


# ------------------------------------------------------------------ the client


async def test_a_wrong_pin_never_reaches_the_records(hostile: Hostile) -> None:
    """The pin is enforced (so the tests below reach verification only because the
    hostile node satisfies it): another fingerprint, or another node id, is a PeerError
    or a refused card before any record is asked for."""
    hostile.get_answer = GOOD1.envelope
    async with Client(hostile.url, fingerprint=bytes(32)) as c:
        with pytest.raises(PeerError, match="pinned fingerprint"):
            await c.get(GOOD1.id)
    with pytest.raises(InvalidRecord, match="not by the id you gave"):
        async with Client(hostile.url, node_id=OTHER.node_id) as c:
            await c.get(GOOD1.id)
    assert not any(p.startswith("/v1/records") for p in hostile.asked), hostile.asked
    # Pinned right: the good record comes through, verified.
    async with Client(hostile.url, node_id=hostile.node_id) as c:
        assert (await c.get(GOOD1.id)).data == {"n": 1}


@pytest.mark.parametrize("pin", ["node_id", "fingerprint"])
@pytest.mark.parametrize("kind", KINDS)
async def test_get_refuses_a_bad_record(hostile: Hostile, reader: SigningKey, kind: str,
                                        pin: str) -> None:
    """``Client.get`` of the bad record's own id raises InvalidRecord with the reason."""
    bad = _bad_records(reader)[kind]
    async with _client(hostile, bad, reader, pin) as c:
        hostile.get_answer = GOOD1.envelope
        assert (await c.get(GOOD1.id)).id == GOOD1.id  # the control
        hostile.get_answer = bad.envelope
        with pytest.raises(InvalidRecord) as e:
            await c.get(bad.rid)
    _assert_refused(e.value, bad)
    assert f"/v1/records/{bad.rid.hex()}" in hostile.asked


async def test_get_refuses_another_record_than_the_one_asked(hostile: Hostile) -> None:
    """A valid, signed record is still refused by ``get`` when it is not the one asked
    for (``wrong_record``): the node cannot answer an id with another record."""
    hostile.get_answer = GOOD1.envelope
    async with Client(hostile.url, node_id=hostile.node_id) as c:
        with pytest.raises(InvalidRecord) as e:
            await c.get(GOOD2.id)
        assert e.value.reason == "wrong_record"
        assert (await c.get(GOOD1.id)).id == GOOD1.id


@pytest.mark.parametrize("kind", KINDS)
async def test_query_refuses_a_bad_record(hostile: Hostile, reader: SigningKey,
                                          kind: str) -> None:
    """``Client.query`` yields the good record, then raises at the bad one; the bad
    record is never yielded."""
    bad = _bad_records(reader)[kind]
    hostile.page = [GOOD1.envelope, bad.envelope]
    got: list[Record] = []
    async with _client(hostile, bad, reader, "node_id") as c:
        with pytest.raises(InvalidRecord) as e:
            async for rec in c.query(feed=FEED):
                got.append(rec)
    _assert_refused(e.value, bad)
    assert [r.id for r in got] == [GOOD1.id]
    assert any(p.startswith("/v1/records?") for p in hostile.asked)


@pytest.mark.parametrize("kind", KINDS)
async def test_subscribe_refuses_a_bad_record(hostile: Hostile, reader: SigningKey,
                                              kind: str) -> None:
    """``Client.subscribe`` yields the good event, then raises at the bad one (it does
    not reconnect past it, and never yields it)."""
    bad = _bad_records(reader)[kind]
    hostile.page = [GOOD1.envelope, bad.envelope]
    got: list[tuple[int, Record]] = []
    async with _client(hostile, bad, reader, "node_id") as c:
        with pytest.raises(InvalidRecord) as e:
            async with asyncio.timeout(20):
                async for cursor, rec in c.subscribe(feed=FEED, last_event_id=0):
                    got.append((cursor, rec))
                    if len(got) == len(hostile.page):
                        break  # the bad record came through: fail now, not at the timeout
    _assert_refused(e.value, bad)
    assert [(cur, r.id) for cur, r in got] == [(1, GOOD1.id)]
    streams = [p for p in hostile.asked if p.startswith("/v1/stream")]
    assert len(streams) == 1 and "format=envelope" in streams[0], streams


@pytest.mark.parametrize("wrong", ["origin", "feed", "type", "time"])
async def test_records_outside_the_filter_asked_for_are_refused(hostile: Hostile,
                                                                wrong: str) -> None:
    """A signature proves who wrote a record, not that it is the one asked for: a node
    answering "feed a of origin O" (of a type, in a time window) with another validly
    signed record is refused by query and subscribe (``not_asked_for``)."""
    other = {
        "origin": sign_record(OTHER, feed=FEED, seq=1, prev=None, time_ms=NOW, type=TYPE,
                              data={"n": 9}),
        "feed": sign_record(ORIGIN, feed="b", seq=1, prev=None, time_ms=NOW, type=TYPE,
                            data={"n": 9}),
        "type": sign_record(ORIGIN, feed=FEED, seq=3, prev=GOOD2.id, time_ms=NOW,
                            type="org.example.Noise", data={"x": 9}),
        "time": sign_record(ORIGIN, feed=FEED, seq=3, prev=GOOD2.id, time_ms=NOW + 10_000,
                            type=TYPE, data={"n": 9}),
    }[wrong]
    hostile.page = [GOOD1.envelope, other.envelope]
    ask: dict[str, Any] = {"origin": node_id(ORIGIN.public_key), "feed": FEED, "type": TYPE}
    async with Client(hostile.url, node_id=hostile.node_id) as c:
        got = []
        with pytest.raises(InvalidRecord, match=f"its {wrong} does not match") as e:
            async for rec in c.query(**ask, since_ms=NOW - 1, until_ms=NOW + 1):
                got.append(rec.id)
        assert e.value.reason == "not_asked_for" and got == [GOOD1.id]
        if wrong == "time":
            return  # a subscription has no time window
        got = []
        with pytest.raises(InvalidRecord, match=f"its {wrong} does not match"):
            async with asyncio.timeout(20):
                async for _cur, rec in c.subscribe(**ask, last_event_id=0):
                    got.append(rec.id)
        assert got == [GOOD1.id]


async def test_records_outside_the_box_asked_for_are_refused(hostile: Hostile) -> None:
    """The area is checked by the client too, as the node's filter matches it: a box
    across the antimeridian holds the record at 179.5, not the one at 0 (nor one
    without a location)."""
    def at(seq: int, prev: bytes | None, lon: float | None) -> Record:
        data: dict[str, Any] = {"n": seq}
        if lon is not None:
            data["location"] = {"type": "Point", "coordinates": [lon, 0.0]}
        return sign_record(ORIGIN, feed="geo", seq=seq, prev=prev, time_ms=NOW, type=TYPE,
                           data=data)

    inside = at(1, None, 179.5)
    for outside in (at(2, inside.id, 0.0), at(2, inside.id, None)):
        hostile.page = [inside.envelope, outside.envelope]
        async with Client(hostile.url, node_id=hostile.node_id) as c:
            got = []
            with pytest.raises(InvalidRecord, match="its location does not match") as e:
                async for rec in c.query(bbox=(170, -10, -170, 10)):
                    got.append(rec.id)
            assert e.value.reason == "not_asked_for" and got == [inside.id]
            got = []
            with pytest.raises(InvalidRecord, match="its location does not match"):
                async with asyncio.timeout(20):
                    async for _cur, rec in c.subscribe(bbox=(170, -10, -170, 10),
                                                       last_event_id=0):
                        got.append(rec.id)
            assert got == [inside.id]
    # What was asked: the box, written by the filter (it reads back as the same box).
    assert "/v1/records?bbox=170.0,-10.0,-170.0,10.0&after=0&limit=500" in hostile.asked
    assert "/v1/stream?bbox=170.0,-10.0,-170.0,10.0&format=envelope&after=0" in hostile.asked


async def test_subscribe_refuses_a_cursor_that_goes_back(hostile: Hostile) -> None:
    """A node's cursors only grow; one that goes back (a replay after the next
    reconnect) is refused after the good records before it."""
    hostile.page = [GOOD1.envelope, GOOD2.envelope]
    hostile.cursors = [5, 3]
    got = []
    async with Client(hostile.url, node_id=hostile.node_id) as c:
        with pytest.raises(InvalidRecord, match="cursor 3 after 5: its cursors go back"):
            async with asyncio.timeout(20):
                async for cur, rec in c.subscribe(feed=FEED, last_event_id=0):
                    got.append((cur, rec.id))
    assert got == [(5, GOOD1.id)]


# ------------------------------------------------------------------ citynode subscribe


@pytest.mark.parametrize("kind", KINDS)
async def test_cli_subscribe_refuses_a_bad_record(hostile: Hostile, reader: SigningKey,
                                                  reader_dir: Path, kind: str) -> None:
    """``citynode subscribe URL --id ID --feed F --after 0 --count 2`` (a real process)
    prints the good record as one JSON line, then exits 1 with exactly one error line,
    and prints nothing for the bad record."""
    bad = _bad_records(reader)[kind]
    hostile.page = [GOOD1.envelope, bad.envelope]
    # --count 2: a CLI that let the bad record through would print it and exit 0.
    args = ["subscribe", hostile.url, "--id", hostile.node_id, "--feed", FEED, "--after", "0",
            "--count", "2"]
    if bad.needs_reader:
        args += ["-d", str(reader_dir)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "citynode", *args, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines, errors = out.decode().splitlines(), err.decode().splitlines()
    assert proc.returncode == 1, (proc.returncode, lines, errors)
    assert len(errors) == 1 and errors[0].startswith("Error: "), errors
    assert bad.message in errors[0], errors
    assert len(lines) == 1, lines
    printed = json.loads(lines[0])
    assert (printed["id"], printed["cursor"], printed["data"]) == (GOOD1.id.hex(), 1, {"n": 1})
    assert any(p.startswith("/v1/stream") for p in hostile.asked)
