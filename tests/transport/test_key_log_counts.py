"""Key logs POSTed by a partner and refused are counted on the partner that sent them,
told by the key in force in the log the receiver HOLDS of it, never by the key of the
posted log (review of issue 12, S2; issue 12 "Bad input": out of order, not
pre-committed, bad recovery, replayed or truncated, each with its reason code, per
partner). In-process nodes, real HTTPS."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from citynode.core import encoding, keylog
from citynode.core.keys import NodeKey, SigningKey, Verifier
from citynode.core.records import encode_envelope
from citynode.errors import PeerRejected
from citynode.transport.client import PeerClient
from tests.conftest import InProc
from tests.transport.test_witness import link

Make = Callable[..., Awaitable[InProc]]


def _event(signer: SigningKey, fields: dict[str, Any]) -> bytes:
    body = encoding.encode({"kind": "key-event", "version": 1, **fields})
    return encode_envelope(body, signer.sign(keylog.DOMAIN_KEY_EVENT, body))


async def _post(signer: NodeKey, to: InProc, origin: str, log: bytes) -> PeerRejected:
    """POST ``log`` of ``origin`` to ``to``, the request signed by ``signer``: the
    refusal (a log accepted fails the test)."""
    client = PeerClient(signer, to.url, node_id=to.node.node_id,
                        fingerprint=to.node.identity.cert_fingerprint)
    try:
        with pytest.raises(PeerRejected) as e:
            await client.request("POST", f"/v1/keylog?origin={origin}", log)
    finally:
        await client.close()
    return e.value


async def test_refused_key_logs_are_counted_on_the_partner_that_sent_them(
        inproc: Make) -> None:
    a = await inproc("A")
    b = await inproc("B", next_key_on_disk=True)
    c = await inproc("C")
    await link(a, b)
    await link(a, c)
    log0 = b.node.key.log
    assert log0 is not None
    inc = keylog.decode_log(log0)[0]
    st0 = keylog.verify_log(b.node.key.identity, log0, verifier=Verifier())
    k0 = SigningKey(b.node.key.seed)  # B's key before the rotation
    await b.node.keychanges.rotate()
    ident = b.node.key.identity

    async def a_holds_rotation() -> bool:
        st = a.node.policy.keys.state(ident)
        return st is not None and st.seq == 1

    for _ in range(100):
        if await a_holds_rotation():
            break
        await asyncio.sleep(0.1)
    assert await a_holds_rotation()
    on_b = a.node.partners.get(ident)
    on_c = a.node.partners.get(c.node.public_key)
    assert on_b is not None and on_c is not None
    assert on_b.invalid == {} and on_c.invalid == {}

    x = SigningKey.generate()
    base = {"seq": 1, "time": st0.time + 1, "identity": ident, "prev": st0.head_id,
            "heads": {}}
    cases = {
        # Seq 2 right after the inception.
        "key_event_order": keylog.encode_log([inc, _event(x, {
            **base, "seq": 2, "type": "rotation", "key": x.public_key,
            "next": keylog.commit_key(x.public_key)})]),
        # A rotation to a key the inception did not commit to.
        "not_precommitted": keylog.encode_log([inc, _event(x, {
            **base, "type": "rotation", "key": x.public_key,
            "next": keylog.commit_key(x.public_key)})]),
        # A recovery by a key that is not the recovery key.
        "bad_recovery": keylog.encode_log([inc, _event(x, {
            **base, "type": "recovery", "key": x.public_key,
            "next": keylog.commit_key(x.public_key),
            "recovery": keylog.commit_key(SigningKey.generate().public_key),
            "recovery_key": x.public_key})]),
        # B replays its own log of before the rotation (signing with its key in force).
        "stale_key_log": log0,
    }
    for n, (reason, wire) in enumerate(cases.items(), 1):
        refused = await _post(b.node.key, a, b.node.node_id, wire)
        assert refused.reason == reason, refused
        assert on_b.invalid.get(reason) == 1, (reason, on_b.invalid)
        assert sum(on_b.invalid.values()) == n, on_b.invalid
    assert on_c.invalid == {}

    # C relays B's stale log: counted on C, not on B.
    before_b = dict(on_b.invalid)
    refused = await _post(c.node.key, a, b.node.node_id, log0)
    assert refused.reason == "stale_key_log"
    assert on_c.invalid == {"stale_key_log": 1}
    assert on_b.invalid == before_b

    # Whoever holds B's retired key K0 signs requests as B with the log that puts K0 in
    # force: refused, and counted on nobody's tally -- not on B, which did not send it.
    thief = NodeKey(k0.seed, ident, b.node.node_id, log0)
    for _ in range(3):
        refused = await _post(thief, a, b.node.node_id, log0)
        assert refused.reason == "stale_key_log"
    assert on_b.invalid == before_b
    assert on_c.invalid == {"stale_key_log": 1}
    st = a.node.policy.keys.state(ident)
    assert st is not None and st.seq == 1
