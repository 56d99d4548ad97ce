"""Liveness states and the statements that move them (core/liveness.py): no event loop."""

from __future__ import annotations

from typing import Any

import pytest

from citynode.core.liveness import DEAD_AFTER_CADENCES, FeedLiveness, Statement, feed_state
from citynode.errors import InvalidRecord

T = 1_735_689_600_000
BOUND = 30_000
ROOT = b"r" * 32


def st(size: int, time: int, root: bytes = ROOT) -> Statement:
    return Statement(size, time, root, b"env%d-%d" % (size, time))


def state(**kw: Any) -> str:
    args: dict[str, Any] = {"cadence_s": 60, "newest_size": 10, "newest_time": T,
                            "grew_at": T, "head": 10, "behind_since": None, "now_ms": T,
                            "sync_bound_ms": BOUND}
    args.update(kw)
    return feed_state(**args)


def test_state_function_cases() -> None:
    assert state(newest_size=None) == "unknown"
    assert state(newest_size=None, cadence_s=None) == "unknown"
    # Holding all it signed: live while it grew within a cadence, then silent.
    assert state(now_ms=T + 60_000) == "live"
    assert state(now_ms=T + 60_001) == "silent"
    assert state(head=11, now_ms=T + 120_000) == "live"  # records beyond its statement
    # Behind its signed size: lagging within the sync bound, withheld after.
    assert state(head=7, behind_since=T, now_ms=T + BOUND) == "lagging"
    assert state(head=7, behind_since=T, now_ms=T + BOUND + 1) == "withheld"
    assert state(head=7, behind_since=None, now_ms=T + 5 * BOUND) == "lagging"
    # Dead after three cadences with no statement, whatever else holds.
    limit = T + DEAD_AFTER_CADENCES * 60_000
    assert state(now_ms=limit) == "silent"
    assert state(now_ms=limit + 1) == "dead"
    assert state(head=7, behind_since=T, now_ms=limit + 1) == "dead"
    # No cadence: never dead; silent after the sync bound.
    assert state(cadence_s=None, now_ms=T + 10**9) == "silent"
    assert state(cadence_s=None, now_ms=T + BOUND) == "live"


def test_statements_move_the_state() -> None:
    f = FeedLiveness()
    kw: dict[str, Any] = {"cadence_s": 1, "sync_bound_ms": 3000}
    assert f.state(head=0, now_ms=T, **kw) == "unknown"
    assert f.observe(st(5, T), now_ms=T + 10) is True
    assert f.state(head=5, now_ms=T + 500, **kw) == "live"
    assert f.state(head=3, now_ms=T + 500, **kw) == "lagging"
    # Heartbeats: same size, newer time; the feed falls silent but stays alive.
    for i in range(1, 6):
        assert f.observe(st(5, T + i * 1000), now_ms=T + i * 1000 + 10) is True
    assert f.state(head=5, now_ms=T + 5500, **kw) == "silent"
    # Behind since the first statement of a size above our head (T + 10), not since
    # the latest heartbeat: withheld.
    assert f.behind_since(3) == T + 10
    assert f.state(head=3, now_ms=T + 5500, **kw) == "withheld"
    assert f.behind_since(5) is None
    # The origin stops: three cadences later, dead.
    assert f.state(head=5, now_ms=T + 5000 + 3001, **kw) == "dead"


def test_the_same_statement_twice_is_known() -> None:
    f = FeedLiveness()
    assert f.observe(st(5, T), T) is True
    assert f.observe(st(5, T), T + 1) is False
    # Same size, another root, later: a split view, not a newer statement.
    assert f.observe(st(5, T + 5, b"x" * 32), T + 6) is False
    assert f.newest == st(5, T)


@pytest.mark.parametrize(("size", "time", "reason"), [
    (4, T + 1000, "checkpoint_smaller"),
    (4, T, "checkpoint_smaller"),
    (6, T - 1, "checkpoint_older"),
])
def test_going_backwards_is_refused_and_changes_nothing(size: int, time: int,
                                                        reason: str) -> None:
    f = FeedLiveness()
    f.observe(st(5, T), T)
    with pytest.raises(InvalidRecord) as info:
        f.observe(st(size, time), T + 2)
    assert info.value.reason == reason
    assert f.newest == st(5, T)
    assert f.grew_at == T and f.behind_since(4) == T


@pytest.mark.parametrize(("size", "time"), [(5, T - 1), (4, T - 1), (0, T - 60_000)])
def test_an_honest_statement_arriving_late_is_stale_not_invalid(size: int,
                                                               time: int) -> None:
    """Issue 13 review: heartbeats a partner queued while down (or that took a slower
    path) arrive after a newer one; signed earlier, of no more records, they are what
    an honest origin signs: stale, changing nothing, not refused."""
    f = FeedLiveness()
    f.observe(st(5, T), T)
    assert f.verdict(st(size, time)) == "stale"
    assert f.observe(st(size, time), T + 2) is False
    assert f.newest == st(5, T)
    assert f.grew_at == T and f.behind_since(4) == T


def test_remembered_sizes_are_bounded() -> None:
    f = FeedLiveness()
    for i in range(1, 200):
        f.observe(st(i, T + i), T + i)
    assert len(f._seen) == 64
    assert f.behind_since(0) == T + 136  # the oldest remembered: an underestimate
    assert f.behind_since(150) == T + 151


def test_a_restored_feed_keeps_its_statement_and_restarts_the_sync_bound() -> None:
    """What a node kept across a restart: the newest statement and when the feed grew;
    a size above the head counts as learnt at the restart (lagging, then withheld)."""
    st = Statement(10, 5_000, b"r" * 32, b"env")
    fl = FeedLiveness.restored(st, grew_at=4_000, now_ms=100_000)
    assert fl.newest == st and fl.grew_at == 4_000
    assert fl.behind_since(2) == 100_000 and fl.behind_since(10) is None
    assert fl.state(cadence_s=None, head=2, now_ms=100_500, sync_bound_ms=1_000) == "lagging"
    assert fl.state(cadence_s=None, head=2, now_ms=102_000, sync_bound_ms=1_000) == "withheld"
    assert fl.state(cadence_s=1, head=10, now_ms=100_000, sync_bound_ms=1_000) == "dead"
    # Going backwards is refused as before.
    with pytest.raises(InvalidRecord) as info:
        fl.observe(Statement(11, 4_999, b"s" * 32, b"e2"), 100_001)
    assert info.value.reason == "checkpoint_older"
