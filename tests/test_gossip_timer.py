"""The gossip role's timer task (node/gossip.py ``Gossip.run``): it sleeps on one
future and one timer handle, and ticks the replica after a wake-up and at the
replica's next deadline, with no wake-up needed for the latter."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.conftest import eventually


async def test_a_wake_up_ticks_the_replica_and_a_deadline_ticks_it_unwoken(
        inproc: Any) -> None:
    n = await inproc("Jakarta")
    gossip, replica = n.node.gossip, n.node.replica
    ticks: list[float] = []
    real_tick = replica.tick

    def tick(now_ms: int) -> Any:
        ticks.append(time.monotonic())
        return real_tick(now_ms)

    replica.tick = tick
    # No partners: nothing else wakes the timer task.
    await asyncio.sleep(0.2)
    ticks.clear()
    gossip.wake()
    await eventually(lambda: _true(bool(ticks)), timeout=5)
    assert len(ticks) == 1  # one wake-up, one tick

    # A deadline 300 ms away, then a wake-up so that the task reads it: a tick follows at
    # the deadline, with no other wake-up.
    set_at = time.monotonic()
    due = n.node.now_ms() + 300
    replica.next_deadline = lambda: due if n.node.now_ms() < due else None
    gossip.wake()
    await eventually(lambda: _true(len(ticks) >= 3), timeout=5)
    assert ticks[1] - set_at < 0.25  # the wake-up's tick
    assert ticks[2] - set_at >= 0.28  # the deadline's: at it, not at once
    # Past the deadline (none left), the task sleeps: no tick without a wake-up.
    count = len(ticks)
    await asyncio.sleep(0.3)
    assert len(ticks) == count


async def _true(v: bool) -> bool:
    return v
