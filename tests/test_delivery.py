"""Which refusals of a checkpoint or proof a node takes as final (not sent again)."""

from __future__ import annotations

import pytest

from citynode.errors import PeerRejected
from citynode.node.partners import verdict_on_payload as _verdict_on_payload


@pytest.mark.parametrize(("status", "reason", "message", "final"), [
    (400, "bad_signature", "signature does not verify", True),
    (400, "invalid", "split-view proof is not canonical msgpack", True),
    (413, "request_entity_too_large", "body over max_request_bytes", True),
    (422, "bad_value", "payload does not match its type", True),
    # About the moment, not the payload: sent again after the next good round.
    (400, "untrusted_origin", "checkpoint of an origin this node does not trust", False),
    (400, "untrusted_origin", "proof about an origin this node does not trust", False),
    (403, "access_denied", "busy: too many recent signed requests; retry shortly", False),
    (403, "access_denied", "request created 40 s in the future", False),
    (408, "request_timeout", "the request body did not arrive in time", False),
    (429, "too_many_requests", "slow down", False),
    (503, "storage", "database not writable", False),
    # The reason code decides, never the words: a final refusal whose text happens to
    # say "not trust" stays final.
    (400, "invalid", "a proof that does not trust its own signature", True),
])
def test_only_a_verdict_on_the_payload_is_final(status: int, reason: str, message: str,
                                                final: bool) -> None:
    exc = PeerRejected(f"Quito /v1/proofs: {status} {message}", status, reason, message)
    assert _verdict_on_payload(exc) is final
