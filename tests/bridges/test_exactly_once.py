"""The bridge's exactly-once rules on a real node (real SQLite, real publishing path),
driven message by message without a broker: what a copy of a message becomes after a
crash at each point between claiming it and marking its record."""

from __future__ import annotations

from pathlib import Path

import aiomqtt
import pytest

from citynode.bridges.mapping import map_message, message_key
from citynode.bridges.mosquitto import bridge_toml, reading
from citynode.bridges.mqtt import MqttBridge
from citynode.core.keys import SigningKey
from citynode.node import Node
from citynode.storage import BRIDGE_CLAIMED, BRIDGE_DEAD, BRIDGE_PUBLISHED
from tests.conftest import make_node_dir

TOPIC = "city/air/st1/reading"


def message(payload: bytes, mid: int = 1) -> aiomqtt.Message:
    return aiomqtt.Message(TOPIC, payload, qos=1, retain=False, mid=mid, properties=None)


async def started(tmp_path: Path, feed_toml: str = "") -> tuple[Node, MqttBridge]:
    d = make_node_dir(tmp_path, "Jakarta")
    with open(d / "node.toml", "a") as f:
        f.write(feed_toml + bridge_toml(1883))
    node = Node.load(d)
    await node.start(partners=False)  # no bridge task: the test hands it messages
    return node, node.bridges.mqtt[0]


async def feed_records(node: Node) -> list[str]:
    rows = await node.reads.query(limit=1000)
    return [r.id.hex() for r in rows]


async def test_a_message_claimed_and_published_before_a_crash_is_not_published_again(
        tmp_path: Path) -> None:
    node, bridge = await started(tmp_path)
    try:
        st = node.storage
        # Before the crash: claimed, its record committed, not yet marked published.
        payload = reading(1)
        key = message_key("air", TOPIC, payload)
        m = map_message(bridge.cfg.routes, TOPIC, payload, 65536)
        st.bridge_claim("air", [(key, "air-quality", 0)], node.now_ms(), 3_600_000).result(5)
        # Another publisher's record on the same feed after the claim: not this message's.
        await node.publish("air-quality", "AirQualityObserved",
                           [dict(m.data, name="someone-else")], subjects=[m.subject])
        (rec,) = await node.publish("air-quality", "AirQualityObserved", [m.data],
                                    subjects=[m.subject])
        assert st.bridge_lookup([key])[key].state == BRIDGE_CLAIMED

        # After the restart the broker delivers it again: a duplicate, now marked.
        await bridge.handle([message(payload)])
        assert len(await feed_records(node)) == 2
        row = st.bridge_lookup([key])[key]
        assert row.state == BRIDGE_PUBLISHED and row.record_id == rec.id
        assert bridge.counts["duplicates"] == 1 and bridge.counts["published"] == 0

        # Claimed before the crash, record never committed: published now, once.
        payload2 = reading(2)
        key2 = message_key("air", TOPIC, payload2)
        st.bridge_claim("air", [(key2, "air-quality", 2)], node.now_ms(), 3_600_000).result(5)
        await bridge.handle([message(payload2), message(payload2, mid=2)])
        st.barrier().result(5)  # the mark is not waited for by the bridge
        assert len(await feed_records(node)) == 3
        assert st.bridge_lookup([key2])[key2].state == BRIDGE_PUBLISHED
        assert bridge.counts["published"] == 1 and bridge.counts["duplicates"] == 2

        # A copy of a published message, or of a dead letter, is a duplicate.
        await bridge.handle([message(payload2), message(b"[]"), message(b"[]")])
        assert len(await feed_records(node)) == 3
        assert st.bridge_lookup([message_key("air", TOPIC, b"[]")]).popitem()[1].state \
            == BRIDGE_DEAD
        assert bridge.counts["dead_lettered"] == 1 and bridge.counts["duplicates"] == 4
    finally:
        await node.stop()


@pytest.mark.parametrize("feed_toml", [
    # What leaves the city is coarsened: the record holds less than the message says.
    '[feeds.air-quality]\naccess = "public"\n[feeds.air-quality.egress]\n'
    'location_decimals = 1\ntime_resolution_seconds = 3600\n',
    # Sealed for its readers: the node cannot compare what it holds with the message.
    '[feeds.air-quality]\naccess = "restricted"\n'
    f'readers = ["{SigningKey(bytes([2]) * 32).node_id}"]\n',
], ids=["egress", "restricted"])
async def test_the_record_of_a_claimed_message_is_found_whatever_the_feed_rules(
        tmp_path: Path, feed_toml: str) -> None:
    node, bridge = await started(tmp_path, feed_toml)
    try:
        st = node.storage
        payloads = [reading(i) for i in range(3)]
        keys = [message_key("air", TOPIC, p) for p in payloads]
        st.bridge_claim("air", [(k, "air-quality", 0) for k in keys], node.now_ms(),
                        3_600_000).result(5)
        mapped = [map_message(bridge.cfg.routes, TOPIC, p, 65536) for p in payloads]
        # The node died after the first two were committed, before they were marked.
        recs = await node.publish("air-quality", "AirQualityObserved",
                                  [m.data for m in mapped[:2]],
                                  subjects=[m.subject for m in mapped[:2]])
        await bridge.handle([message(p, mid=n + 1) for n, p in enumerate(payloads)])
        st.barrier().result(5)
        assert len(await feed_records(node)) == 3
        rows = st.bridge_lookup(keys)
        assert [rows[k].record_id for k in keys[:2]] == [r.id for r in recs]
        assert rows[keys[2]].state == BRIDGE_PUBLISHED
        assert bridge.counts["duplicates"] == 2 and bridge.counts["published"] == 1
    finally:
        await node.stop()


async def test_one_bad_payload_in_a_batch_is_a_dead_letter_and_the_rest_records(
        tmp_path: Path) -> None:
    node, bridge = await started(tmp_path)
    try:
        batch = [message(reading(i), mid=i + 1) for i in range(5)]
        batch.insert(2, message(reading(99, values={"pm25": 1.0, "no2": "x"}), mid=9))
        await bridge.handle(batch)
        assert len(await feed_records(node)) == 5
        (dead,) = node.storage.bridge_dead_letters()
        assert dead.reason == "bad_value" and dead.topic == TOPIC
        assert bridge.counts == {"received": 6, "published": 5, "duplicates": 0,
                                 "dead_lettered": 1}
    finally:
        await node.stop()


async def test_dead_letters_are_bounded_and_the_dropped_counted(tmp_path: Path) -> None:
    node, bridge = await started(tmp_path)
    try:
        limit = bridge.cfg.dead_letter_rows
        st = node.storage
        for i in range(limit + 3):  # straight to storage: 10,000 messages take long
            st.bridge_dead_letter("air", i.to_bytes(32, "big"), "", TOPIC, "not_json",
                                  "x", b"x", 1, i, limit)
        st.barrier().result(30)
        assert st.bridge_dead_counts() == {"air": (limit, 3)}
        newest = st.bridge_dead_letters("air", 1)[0]
        assert newest.at == limit + 2
        out = await node.bridges.status(5)
        (b,) = out["bridges"]
        assert b["dead_letters_held"] == limit and b["dead_letters_dropped"] == 3
        assert len(out["dead_letters"]) == 5
    finally:
        await node.stop()


def test_a_refused_subscription_is_an_error_the_status_shows() -> None:
    # Mosquitto grants every subscription and filters on delivery; other brokers answer
    # a subscription their access rules refuse with 0x80, which must not pass silently.
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from citynode.bridges.mqtt import _check_granted, _Retry

    _check_granted("a/#", [1])
    _check_granted("a/#", [ReasonCode(PacketTypes.SUBACK, identifier=1)])
    for refused in (0x80, ReasonCode(PacketTypes.SUBACK, identifier=0x87)):
        try:
            _check_granted("a/#", [refused])
        except _Retry as exc:
            assert "refused the subscription to 'a/#'" in str(exc)
        else:
            raise AssertionError("a refused subscription passed")


async def test_a_dead_letter_sent_again_after_node_toml_is_fixed_becomes_a_record(
        tmp_path: Path) -> None:
    """A message dead-lettered for a mistake in the mapping is not lost for good: its
    copy, once node.toml is fixed, is published (once). Still refused, a copy is a
    duplicate: no second dead letter."""
    node, bridge = await started(tmp_path)
    unlabelled = reading(1, label=None)  # the route's fields ask for "label"
    negative = reading(2, values={"pm25": -3.0, "no2": 20.0})  # the type refuses it
    try:
        await bridge.handle([message(unlabelled), message(negative)])
        await bridge.handle([message(unlabelled), message(negative)])
        assert bridge.counts["dead_lettered"] == 2 and bridge.counts["duplicates"] == 2
        assert await feed_records(node) == []
        assert len(node.storage.bridge_dead_letters("air", 10)) == 2
    finally:
        await node.stop()
    toml = node.data_dir / "node.toml"
    toml.write_text(toml.read_text().replace('name = "label"\n', ""))
    node = Node.load(node.data_dir)
    await node.start(partners=False)
    bridge = node.bridges.mqtt[0]
    try:
        key = message_key("air", TOPIC, unlabelled)
        assert node.storage.bridge_lookup([key])[key].state == BRIDGE_DEAD
        await bridge.handle([message(unlabelled), message(negative)])
        node.storage.barrier().result(5)
        (rid,) = await feed_records(node)
        row = node.storage.bridge_lookup([key])[key]
        assert row.state == BRIDGE_PUBLISHED and row.record_id.hex() == rid
        neg = message_key("air", TOPIC, negative)
        assert node.storage.bridge_lookup([neg])[neg].state == BRIDGE_DEAD  # not claimed
        await bridge.handle([message(unlabelled), message(negative)])
        assert len(await feed_records(node)) == 1
        assert bridge.counts["published"] == 1 and bridge.counts["duplicates"] == 3
        assert bridge.counts["dead_lettered"] == 0
        assert len(node.storage.bridge_dead_letters("air", 10)) == 2
    finally:
        await node.stop()
