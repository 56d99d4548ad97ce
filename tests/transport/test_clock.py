"""Clocks: one tolerance for how far ahead a record, a card or a signed request may be
dated ([limits] future_tolerance_seconds); a refusal for time says so (clock_skew) and
the node whose clock is off is told by how much (partner list, logs)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from citynode.core import httpsig
from citynode.core.keys import SigningKey, Verifier, node_id
from citynode.errors import AccessDenied, ClockSkew, PeerRejected
from citynode.node import Node
from citynode.transport.server import serve
from tests.conftest import eventually, make_node_dir

Start = Callable[[str, float], Awaitable[Node]]


@pytest.fixture
async def skewed(tmp_path: Path) -> AsyncIterator[Start]:
    """Factory: a node serving HTTPS in process whose clock is ``skew`` s off."""
    made: list[tuple[Node, object]] = []

    async def start(name: str, skew: float) -> Node:
        d = make_node_dir(tmp_path, name, settings={
            ("federation", "pull_interval_seconds"): 0.5,
            ("federation", "backoff_max_seconds"): 1.0})
        node = Node.load(d, clock=lambda: time.time() + skew)
        await node.start()
        runner = await serve(node, host="127.0.0.1", port=node.config.node.listen_port)
        made.append((node, runner))
        return node

    yield start
    for node, runner in reversed(made):
        await runner.cleanup()  # type: ignore[attr-defined]
        await node.stop()


def _url(n: Node) -> str:
    return f"https://127.0.0.1:{n.config.node.listen_port}"


def test_a_signed_request_may_be_as_far_ahead_as_the_receiver_allows() -> None:
    key, target = SigningKey.generate(), node_id(SigningKey.generate().public_key)
    now = 1_800_000_000_000

    def verify(created_ms: int, **kw: int) -> bytes:
        h = httpsig.sign_request(key, "POST", "/v1/push", b"x", created_ms, target=target)
        return httpsig.verify_request("POST", "/v1/push", h, b"x", now_ms=now,
                                      replay=httpsig.ReplayCache(), verifier=Verifier(),
                                      expected_target=target, **kw)

    assert verify(now + 120_000, max_future_ms=900_000) == key.public_key
    with pytest.raises(ClockSkew) as e:
        verify(now + 120_000)  # the default, 60 s
    assert e.value.skew_s == 120 and isinstance(e.value, AccessDenied)
    with pytest.raises(ClockSkew) as e:
        verify(now - 400_000, max_age_ms=300_000)
    assert e.value.skew_s == -400 and "check the sender's clock" in str(e.value)


async def test_two_minutes_fast_still_pushes_and_partners_see_the_offset(
        skewed: Start) -> None:
    """Records may be 900 s ahead (the default tolerance); a node two minutes fast used
    to be refused on every push (requests allowed 60 s) and fell back to slow pulls."""
    a = await skewed("Jakarta", 0)
    fast = await skewed("Seoul", 120)
    await a.add_partner(_url(fast), fast.node_id)
    await fast.add_partner(_url(a), a.node_id)
    await fast.publish("air", "org.example.Test", [{"n": 1}])

    async def pushed() -> bool:
        # By push (not only by Jakarta's own pulls, which a fast clock never hindered).
        return a.metrics.received.labels("push")._value.get() >= 1 and \
            fast.partners.status()[0]["clock_offset_s"] is not None

    await eventually(pushed, timeout=20)
    assert a.heads.get((fast.public_key, "air")) is not None
    offsets = {p["name"]: p["clock_offset_s"] for p in fast.partners.status()}
    assert offsets["Jakarta"] in (-121, -120, -119)  # Jakarta's clock is behind Seoul's
    assert fast.partners.status()[0]["last_error"] is None


async def test_twenty_minutes_fast_is_refused_as_clock_skew_and_said_plainly(
        skewed: Start, caplog: pytest.LogCaptureFixture) -> None:
    a = await skewed("Lima", 0)
    fast = await skewed("Quito", 1200)
    # Lima cannot even add Quito: its card is dated 20 minutes ahead (the same tolerance
    # as records). Quito adds Lima; Lima refuses its requests for their time first.
    await fast.add_partner(_url(a), a.node_id)
    caplog.set_level(logging.WARNING, logger="citynode.node")
    link = fast.partners.get(a.public_key)
    assert link is not None
    with pytest.raises(PeerRejected) as e:
        await link.client.cards()
    assert (e.value.status, e.value.reason) == (403, "clock_skew")
    assert "in the future" in e.value.detail

    async def warned() -> bool:
        return any("this node's clock is" in r.getMessage() and "ahead of" in
                   r.getMessage() and "Lima" in r.getMessage() for r in caplog.records)

    await eventually(warned, timeout=20)
    (status,) = fast.partners.status()
    assert status["clock_offset_s"] in (-1201, -1200, -1199)
