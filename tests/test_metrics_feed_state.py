"""``citynode_feed_state``: one series per (origin, feed), labelled with its liveness
state, bounded in number (own feeds first)."""

from __future__ import annotations

import re

from citynode.metrics import FEED_STATE_SERIES_MAX, Metrics


def _series(m: Metrics) -> list[dict[str, str]]:
    text = m.render().decode()
    return [dict(re.findall(r'(\w+)="([^"]*)"', labels))
            for labels in re.findall(r'^citynode_feed_state\{(.*)\} 1\.0$', text, re.M)]


def test_one_series_per_feed_its_state_replaced_when_it_changes() -> None:
    m = Metrics()
    m.set_feed_states([("cn1b", "air", "withheld"), ("cn1a", "air", "live")], "cn1a")
    assert sorted((s["origin"], s["feed"], s["state"]) for s in _series(m)) == [
        ("cn1a", "air", "live"), ("cn1b", "air", "withheld")]
    m.set_feed_states([("cn1b", "air", "dead"), ("cn1a", "air", "live")], "cn1a")
    assert sorted((s["origin"], s["state"]) for s in _series(m)) == [
        ("cn1a", "live"), ("cn1b", "dead")]  # the withheld series is gone


def test_the_series_are_bounded_and_own_feeds_come_first() -> None:
    m = Metrics()
    others = [(f"cn1{i:05d}", "air", "silent") for i in range(FEED_STATE_SERIES_MAX + 50)]
    m.set_feed_states([*others, ("cn1zzz", "mine", "live")], "cn1zzz")
    got = _series(m)
    assert len(got) == FEED_STATE_SERIES_MAX
    assert {"origin": "cn1zzz", "feed": "mine", "state": "live"} in got
