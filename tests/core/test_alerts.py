"""The pure alert decisions (core/alerts.py): conditions, dedup, rate, signatures."""

from __future__ import annotations

import base64
import json

import pytest

from citynode.core import alerts as ca
from citynode.core.keys import SigningKey, node_id
from citynode.errors import SignatureError

T = ca.Thresholds(partner_down_ms=60_000, disk_free_percent=10.0, invalid_per_minute=5)
NOW = 1_700_000_000_000


def codes(s: ca.Snapshot) -> list[str]:
    return sorted(c.id for c in ca.conditions(s, T))


def test_nothing_wrong_gives_no_condition() -> None:
    s = ca.Snapshot(now_ms=NOW, started_ms=NOW - 10**6,
                    partners=[ca.PartnerSeen("cn1p", "p", True, NOW)],
                    own_feeds=[ca.OwnFeed("air", 60, "live", NOW)], free_percent=50.0)
    assert codes(s) == []


def test_partner_down_only_past_the_threshold() -> None:
    def at(last_ok: int | None, up: bool = False, started: int = NOW - 10**6) -> list[str]:
        return codes(ca.Snapshot(now_ms=NOW, started_ms=started,
                                 partners=[ca.PartnerSeen("cn1p", "p", up, last_ok)]))

    assert at(NOW - 60_001) == ["partner_down:cn1p"]
    assert at(NOW - 60_000) == []
    assert at(NOW - 10**6, up=True) == []
    # Never reached: down since the node started.
    assert at(None) == ["partner_down:cn1p"]
    assert at(None, started=NOW - 1000) == []


def test_feed_late_disk_low_invalid_spike_fork_and_split_view() -> None:
    s = ca.Snapshot(
        now_ms=NOW, started_ms=NOW,
        own_feeds=[ca.OwnFeed("a", 60, "silent", NOW - 10**6),
                   ca.OwnFeed("b", 60, "dead", None),
                   ca.OwnFeed("c", None, "silent", None),  # no cadence: never late
                   ca.OwnFeed("d", 60, "live", NOW)],
        forks=[("cn1o", "f", 3, "fork"), ("cn1o", "g", 9, "split-view")],
        free_percent=9.9, invalid_last_minute=6)
    assert codes(s) == ["disk_low:data_dir", "feed_late:a", "feed_late:b", "fork:cn1o/f",
                        "invalid_spike:input", "split_view:cn1o/g"]
    assert codes(ca.Snapshot(now_ms=NOW, started_ms=NOW, free_percent=10.0,
                             invalid_last_minute=5)) == []
    assert codes(ca.Snapshot(now_ms=NOW, started_ms=NOW, free_percent=80.0,
                             disk_full=True)) == ["disk_low:data_dir"]


def test_key_stolen_says_what_to_do_and_resolves_when_the_evidence_goes() -> None:
    s = ca.Snapshot(now_ms=NOW, started_ms=NOW, own_forgeries=[("air", 9, "Beta")])
    (c,) = ca.conditions(s, T)
    assert (c.id, ca.SEVERITY[c.code]) == ("key_stolen:air", "critical")
    assert c.subject == {"feed": "air", "seq": 9, "from": "Beta"}
    assert "records signed with this node's key that it never signed" in c.message
    assert "citynode key recover" in c.message
    tr = ca.Tracker()
    assert [e.status for e in tr.update([c], NOW, s)] == ["firing"]
    clear = ca.Snapshot(now_ms=NOW + 1, started_ms=NOW)
    (ev,) = tr.update(ca.conditions(clear, T), NOW + 1, clear)
    assert ev.status == "resolved" and "'air'" in ev.message


def test_tracker_fires_once_and_resolves_once() -> None:
    tr = ca.Tracker()
    down = ca.Condition("partner_down", "cn1p", {"partner": "cn1p"}, "down")
    disk = ca.Condition("disk_low", "data_dir", {}, "full")
    first = tr.update([down], NOW)
    assert [(e.condition.id, e.status) for e in first] == [("partner_down:cn1p", "firing")]
    # Still down (another message): nothing new; a second condition fires alone.
    again = ca.Condition("partner_down", "cn1p", {"partner": "cn1p"}, "down longer")
    assert tr.update([again], NOW + 1) == []
    assert [(e.condition.id, e.status) for e in tr.update([again, disk], NOW + 2)] == [
        ("disk_low:data_dir", "firing")]
    out = tr.update([disk], NOW + 3)
    assert [(e.condition.id, e.status, e.since) for e in out] == [
        ("partner_down:cn1p", "resolved", NOW)]
    assert tr.update([disk], NOW + 4) == []
    # It may fire again after it resolved.
    assert [e.status for e in tr.update([down, disk], NOW + 5)] == ["firing"]


def test_tracker_resolves_only_after_the_condition_stayed_clear() -> None:
    """Hysteresis: a partner seen up once between two failed exchanges does not resolve
    and fire again; it resolves once it has been clear for clear_ms."""
    tr = ca.Tracker(clear_ms=10_000)
    down = ca.Condition("partner_down", "cn1p", {"partner": "cn1p"}, "down")
    assert [e.status for e in tr.update([down], NOW)] == ["firing"]
    assert tr.update([], NOW + 1_000) == []          # up once ...
    assert tr.update([down], NOW + 2_000) == []      # ... and down again: still firing
    assert tr.update([], NOW + 3_000) == []          # clear from here
    assert tr.update([], NOW + 12_999) == []
    (ev,) = tr.update([], NOW + 13_000)
    assert (ev.status, ev.since) == ("resolved", NOW)
    assert [e.status for e in tr.update([down], NOW + 14_000)] == ["firing"]


def test_resolved_events_say_what_is_well_again() -> None:
    tr = ca.Tracker()
    s = ca.Snapshot(now_ms=NOW, started_ms=NOW - 10**6,
                    partners=[ca.PartnerSeen("cn1p", "Beta", False, NOW - 70_000)],
                    own_feeds=[ca.OwnFeed("air", 10, "silent", NOW - 30_000)],
                    free_percent=5.0, invalid_last_minute=9)
    fired = tr.update(ca.conditions(s, T), NOW, s)
    assert {e.message for e in fired} == {c.message for c in ca.conditions(s, T)}
    later = NOW + 13_000
    well = ca.Snapshot(now_ms=later, started_ms=NOW - 10**6,
                       partners=[ca.PartnerSeen("cn1p", "Beta", True, later - 500)],
                       own_feeds=[ca.OwnFeed("air", 10, "live", later)],
                       free_percent=42.25, invalid_last_minute=1)
    out = {e.condition.code: e for e in tr.update(ca.conditions(well, T), later, well)}
    assert {e.status for e in out.values()} == {"resolved"}
    # Down from its last good exchange (NOW - 70 s) until the check that saw it up.
    assert out["partner_down"].message == "partner Beta reachable again after 83 s"
    assert out["disk_low"].message == "disk space back to 42.2% free in the data dir"
    assert out["feed_late"].message == "own feed 'air' signed on again (live), within its cadence"
    assert out["invalid_spike"].message == (
        "1 inputs refused in the last minute, back under the threshold of 5")
    body = json.loads(ca.alert_body("cn1me", out["partner_down"]))
    assert body["status"] == "resolved" and body["message"] == out["partner_down"].message
    # A partner removed while down resolves too, saying so.
    tr.update(ca.conditions(s, T), later + 1, s)
    gone = ca.Snapshot(now_ms=later + 2, started_ms=NOW - 10**6, free_percent=50.0)
    out = {e.condition.code: e for e in tr.update([], later + 2, gone)}
    assert "no longer a partner" in out["partner_down"].message


def test_tracker_is_bounded() -> None:
    tr = ca.Tracker(max_active=2)
    conds = [ca.Condition("fork", str(i), {}, "") for i in range(5)]
    assert len(tr.update(conds, NOW)) == 2
    assert len(tr.active) == 2


def test_rate_window_counts_the_last_minute_only() -> None:
    w = ca.RateWindow()
    assert w.add(NOW, 100) == 0
    assert w.add(NOW + 30_000, 104) == 4
    assert w.add(NOW + 59_000, 110) == 10
    # The base is the newest sample at least a minute old: never less than a minute.
    assert w.add(NOW + 61_000, 110) == 10
    assert w.add(NOW + 91_000, 110) == 6  # the sample at NOW left the window
    assert w.add(NOW + 200_000, 110) == 0


def test_signed_body_verifies_and_tampering_fails() -> None:
    key = SigningKey.generate()
    me = node_id(key.public_key)
    ev = ca.Event(ca.Condition("disk_low", "data_dir", {"free_percent": 3.0,
                                                        "disk_full": False}, "low"),
                  "firing", NOW, NOW)
    body = ca.alert_body(me, ev)
    doc = json.loads(body)
    assert doc == {"kind": "citynode.alert", "version": 1, "node": me, "alert": "disk_low",
                   "severity": "critical", "status": "firing",
                   "subject": {"free_percent": 3.0, "disk_full": False}, "message": "low",
                   "time": NOW, "since": NOW, "id": "disk_low:data_dir"}
    header = ca.signature_header(key, body)
    assert ca.verify_alert(body, header, expected_node=me) == doc
    with pytest.raises(SignatureError):
        ca.verify_alert(body.replace(b"low", b"lot"), header, expected_node=me)
    other = SigningKey.generate()
    with pytest.raises(SignatureError):  # signed by another node than expected
        ca.verify_alert(body, header, expected_node=node_id(other.public_key))
    with pytest.raises(SignatureError):  # a valid signature by a node the body does not name
        ca.verify_alert(body, ca.signature_header(other, body),
                        expected_node=node_id(other.public_key))
    with pytest.raises(SignatureError):  # not one of our signature prefixes
        sig = key.sign(b"citynode/request/v1\x00", body)
        ca.verify_alert(body, f"keyid={me}, sig={base64.b64encode(sig).decode()}",
                        expected_node=me)
    for bad in ["", "keyid=x, sig=y", header + "x", "k" * 5000]:
        with pytest.raises(SignatureError):
            ca.verify_alert(body, bad, expected_node=me)


def test_domain_prefix_is_distinct() -> None:
    assert ca.DOMAIN_ALERT == b"citynode/alert/v1\x00"
    assert ca.DOMAIN_ALERT.count(b"\x00") == 1
