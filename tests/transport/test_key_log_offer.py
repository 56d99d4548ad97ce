"""Key logs between nodes over real HTTPS: a signed read by a cn2 node whose log no
longer fits in a header (B3), and offers of logs (POST /v1/keylog) judged cheaply and
counted against their sender, never against the origin they name (S1)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Awaitable, Callable

from citynode.core import httpsig, keylog
from citynode.core.keys import NodeKey, SigningKey, Verifier
from citynode.transport.http import INLINE_KEY_LOG, HttpClient, NodeSignature
from tests.conftest import InProc

Make = Callable[..., Awaitable[InProc]]
T0 = 1_735_689_600_000


def long_lived(rotations: int, feeds: int = 25, name: bytes = b"a") -> NodeKey:
    """A cn2 node key whose log went through ``rotations`` rotations, each naming the
    head of ``feeds`` feeds (as a node with that many feeds does); ``name`` picks the
    identity."""
    keys = [SigningKey(hashlib.sha256(b"%s key %d" % (name, i)).digest())
            for i in range(rotations + 2)]
    q = SigningKey(b"\x40" * 32)
    ev = keylog.incept(keys[0], keys[1].public_key, q.public_key, T0)
    events = [ev]
    state = keylog.verify_log(keylog.identity_of(ev.body), [ev.envelope],
                              verifier=Verifier())
    for i in range(1, rotations + 1):
        heads = {f"feed-number-{f:02d}": (i, hashlib.sha256(b"%d %d" % (f, i)).digest())
                 for f in range(feeds)}
        ev = keylog.rotate(state, keys[i], keys[i + 1].public_key, T0 + i, heads)
        events.append(ev)
        state = keylog.apply_event(state, ev)
    log = keylog.encode_log(events)
    return NodeKey(keys[rotations].seed, state.identity, state.node_id, log)


async def test_a_signed_read_with_a_log_too_long_for_a_header_offers_it_and_retries(
        inproc: Make) -> None:
    """A key log of more than 8 KiB (25 feeds, 6 rotations) never rides in a header
    (servers refuse header fields over 8190 bytes); the node that does not know the
    signer answers 401 unknown_key, the client offers its log and reads."""
    a = await inproc("Jakarta")
    key = long_lived(6)
    assert key.log is not None and len(base64.b64encode(key.log)) > 8190
    auth = NodeSignature(key, target=a.node.node_id)
    assert httpsig.KEYLOG_HEADER not in auth.headers("GET", "/v1/cards", b"")
    async with HttpClient(a.url, fingerprint=a.node.identity.cert_fingerprint,
                          auth=auth) as http:
        got = await http.request("GET", "/v1/feeds", accept="application/json")
        assert got.json() == {"feeds": []}
        assert key.identity in a.node.policy.keys  # learnt from the offer
        # Without the offer, the refusal says exactly what is missing.
        other = long_lived(7, name=b"b")
        bare = NodeSignature(other, target=a.node.node_id)
        headers = bare.headers("GET", "/v1/feeds", b"")
        async with a.session.get(f"{a.url}/v1/feeds", headers=headers) as r:
            assert r.status == 401
            assert (await r.json())["error"] == "unknown_key"
    # A short log still rides along: no second request.
    small = long_lived(1, feeds=2, name=b"d")
    assert small.log is not None and len(small.log) <= INLINE_KEY_LOG
    assert httpsig.KEYLOG_HEADER in NodeSignature(small, target=a.node.node_id).headers(
        "GET", "/v1/feeds", b"")


async def test_a_refused_log_is_answered_with_its_reason_and_not_counted_on_the_origin(
        inproc: Make) -> None:
    """Anyone may post a log naming any origin: a bad one is refused with its reason
    code in the error body, and no partner's tally counts it (the sender is not the
    origin it names)."""
    a = await inproc("Jakarta")
    honest = long_lived(2, feeds=3)
    assert honest.log is not None
    envs = keylog.decode_log(honest.log)
    truncated_sig = keylog.encode_log([envs[0], envs[1][:-1] + bytes([envs[1][-1] ^ 1])])
    url = f"{a.url}/v1/keylog?origin={honest.node_id}"
    async with a.session.post(url, data=truncated_sig) as r:
        assert r.status == 400
        body = await r.json()
        assert body["error"] == "bad_signature" and body["message"]
    other = long_lived(1, feeds=1, name=b"c")  # a valid log of another identity
    assert other.log is not None
    async with a.session.post(url, data=other.log) as r:
        assert r.status == 400
        assert (await r.json())["error"] == "wrong_identity"
    # A good log is held (in memory: not a partner) and answered with the outcome.
    async with a.session.post(url, data=honest.log) as r:
        assert r.status == 200, await r.text()
    assert honest.identity in a.node.policy.keys
    # Offered again, shorter: stale, refused with that reason; nothing changes.
    async with a.session.post(url, data=keylog.encode_log(envs[:2])) as r:
        assert r.status == 409
        assert (await r.json())["error"] == "stale_key_log"
    st = a.node.policy.keys.state(honest.identity)
    assert st is not None and st.seq == 2


def test_inline_bound_fits_a_default_header() -> None:
    """base64 of the longest inline log, with the header name, stays under the 8190
    bytes of a header field servers take by default."""
    assert len(httpsig.KEYLOG_HEADER) + 2 + (INLINE_KEY_LOG * 4 + 2) // 3 < 8190


async def test_a_strangers_bad_log_of_a_partner_is_not_counted_against_that_partner(
        inproc: Make) -> None:
    """Before: a refused POST /v1/keylog was counted on the partner it names, so anyone
    could make an honest partner look hostile. Now the sender is counted: here an
    unsigned stranger, so no partner's tally moves."""
    a = await inproc("Jakarta")
    b = await inproc("Lagos")
    await a.node.add_partner(b.url, b.node.node_id)
    await b.node.add_partner(a.url, a.node.node_id)
    wire = b.node.key.log
    assert wire is not None
    envs = keylog.decode_log(wire)
    forged = keylog.encode_log([envs[0][:-1] + bytes([envs[0][-1] ^ 1]), *envs[1:]])
    for _ in range(3):
        async with a.session.post(f"{a.url}/v1/keylog?origin={b.node.node_id}",
                                  data=forged) as r:
            assert r.status == 400
            assert (await r.json())["error"] == "bad_signature"
    link = a.node.partners.get(b.node.key.identity)
    assert link is not None and link.invalid == {}
