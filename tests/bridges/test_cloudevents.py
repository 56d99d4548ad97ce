"""CloudEvents out: records delivered to a real HTTP receiver that parses them with the
official CloudEvents SDK; ordered per feed, retried after 500s and while the receiver is
away, kept across a restart of the node, never acknowledged twice."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from citynode.core.keylog import origin_id
from citynode.core.keys import Verifier
from citynode.core.records import decode_record, open_record
from citynode.errors import ConfigError
from citynode.node import Node
from citynode.sinks.cloudevents import EVENT_TYPE
from citynode.sinks.receiver import Receiver
from tests.conftest import eventually, make_node_dir

# How long the receiver is away in the outage tests (the issue says a minute; any time
# longer than a few backoffs shows the same thing, so the suite keeps it short).
DOWN_SECONDS = float(os.environ.get("CITYNODE_TEST_RECEIVER_DOWN_SECONDS", "1.5"))


def sink_toml(url: str, mode: str = "structured", extra: str = "") -> str:
    return f"""
[[sinks.cloudevents]]
name = "bus"
url = "{url}"
filter = "type=AirQualityObserved"
mode = "{mode}"
retry_min_seconds = 0.05
retry_max_seconds = 0.4
batch = 8
{extra}
"""


def reading(i: int, **extra: Any) -> dict[str, Any]:
    return {"dateObserved": f"2026-12-07T07:{i // 60 % 60:02d}:{i % 60:02d}+07:00",
            "pm25": float(i),
            "location": {"type": "Point", "coordinates": [106.8, -6.2]}, **extra}


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


Make = Callable[..., Awaitable[Node]]


@pytest.fixture
async def node_with_sink(tmp_path: Path) -> AsyncIterator[Make]:
    """Factory: a node (not serving HTTP: the sink is the node's own task) whose
    node.toml has ``toml``; made again on the same data dir, it is a restart."""
    made: list[Node] = []
    d = tmp_path / "jakarta"

    async def make(toml: str = "", *, fresh: bool = True) -> Node:
        if fresh:
            make_node_dir(tmp_path, "Jakarta")
            with open(d / "node.toml", "a") as f:
                f.write(toml)
        n = Node.load(d)
        await n.start()
        made.append(n)
        return n

    yield make
    for n in made:
        if n.ready:
            await n.stop()


async def publish(n: Node, feed: str, count: int, start: int = 0) -> list[str]:
    recs = await n.publish(feed, "AirQualityObserved", [reading(start + i)
                                                       for i in range(count)],
                           subjects=[f"station-{i % 3}" for i in range(count)])
    return [r.id.hex() for r in recs]


def by_source(r: Receiver) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for e in r.events:
        out.setdefault(e.get_source(), []).append(int(e.get_extension("citynodeseq")))
    return out


async def all_acked(r: Receiver, ids: list[str], timeout: float = 30) -> None:
    async def done() -> bool:
        return set(ids) <= set(r.acked_ids())
    await eventually(done, timeout=timeout, interval=0.05)


@pytest.mark.parametrize("mode", ["structured", "binary"])
async def test_events_conform_and_carry_a_verifiable_record(
        node_with_sink: Make, receiver: Receiver, mode: str) -> None:
    n = await node_with_sink(sink_toml(receiver.url, mode))
    ids = await publish(n, "air-quality", 5)
    await n.publish("notes", "org.example.Note", [{"text": "not selected by the filter"}])
    await all_acked(receiver, ids)
    assert receiver.errors == []
    assert receiver.acked_ids() == ids
    source = f"urn:citynode:{n.node_id}:air-quality"
    for i, e in enumerate(receiver.events):
        assert e.get_specversion() == "1.0" and e.get_type() == EVENT_TYPE
        assert e.get_source() == source and e.get_subject() == f"station-{i % 3}"
        assert e.get_datacontenttype() == "application/json"
        assert e.get_extension("citynodetype") == "AirQualityObserved"
        # (binary mode: a header, so a string the receiver reads as the Integer it is)
        assert int(e.get_extension("citynodeseq")) == i + 1
        data = e.get_data()
        if isinstance(data, bytes):
            import json
            data = json.loads(data)
        assert data == reading(i)
        # the envelope verifies, and is the record the event says it is
        env = e.get_extension("citynodeenvelope")
        env = env if isinstance(env, bytes) else base64.b64decode(env)
        body, sig, payload = decode_record(env)
        # (a cn2 origin: the receiver checks the key against the origin's key log, which
        # it fetches once from GET /v1/keylog; here the node's own held log)
        rec = open_record(body, sig, payload, now_ms=n.now_ms(), verifier=Verifier(),
                          key_states=n.policy.keys.state)
        assert rec.id.hex() == e.get_id() and origin_id(rec.origin, rec.key) == n.node_id
        assert rec.data == data and rec.subject == e.get_subject()
        assert e.get_time() is not None
    # nothing of the other type was sent
    await asyncio.sleep(0.2)
    assert len(receiver.events) == 5


async def test_ordered_per_feed_and_retried_after_500s(node_with_sink: Make,
                                                      receiver: Receiver) -> None:
    n = await node_with_sink(sink_toml(receiver.url))
    receiver.fail_next = 7
    ids = []
    for k in range(4):  # interleaved publishes on three feeds
        for feed in ("a-air", "b-air", "c-air"):
            ids += await publish(n, feed, 5, start=k * 5)
    await all_acked(receiver, ids)
    assert receiver.fail_next == 0  # every 500 was answered, and retried
    assert sorted(receiver.acked_ids()) == sorted(ids)  # each acknowledged once
    assert len(set(receiver.acked_ids())) == len(ids) == 60
    for source, seqs in by_source(receiver).items():
        assert seqs == list(range(1, 21)), source  # in order, none skipped
    async def all_cleared() -> bool:  # the node hears each 2xx just after the receiver
        return bool((await n.sinks.status())["sinks"][0]["pending"] == 0)
    await eventually(all_cleared, timeout=10, interval=0.05)
    st = (await n.sinks.status())["sinks"][0]
    assert st["delivered"] == 60 and st["retries"] >= 1 and st["pending"] == 0
    text = n.metrics.render().decode()
    assert 'citynode_sink_delivered_total{sink="bus"} 60.0' in text
    assert f'citynode_sink_retries_total{{sink="bus"}} {float(st["retries"])}' in text


async def test_a_receiver_away_for_a_while_gets_everything_when_back(
        node_with_sink: Make, receiver: Receiver) -> None:
    n = await node_with_sink(sink_toml(receiver.url))
    ids = await publish(n, "air-quality", 3)
    await all_acked(receiver, ids)
    await receiver.stop()
    ids += await publish(n, "air-quality", 10, start=3)
    await asyncio.sleep(DOWN_SECONDS)
    st = (await n.sinks.status())["sinks"][0]
    assert st["pending"] == 10 and st["retries"] >= 1
    assert "Connect" in (st["last_error"] or "") or "refused" in (st["last_error"] or "")
    await receiver.start()
    await all_acked(receiver, ids)
    assert receiver.acked_ids() == ids  # in order, each once


@pytest.mark.slow
async def test_a_receiver_down_for_a_minute_gets_everything_in_order_when_back(
        node_with_sink: Make, receiver: Receiver) -> None:
    """The issue's outage, in real time: the receiver is gone for 60 s while records
    keep coming. The test mostly sleeps (under xdist the other worker goes on), so it
    costs the suite about half a minute of wall time, not a minute of CPU."""
    n = await node_with_sink(sink_toml(receiver.url).replace(
        "retry_max_seconds = 0.4", "retry_max_seconds = 5"))
    ids = await publish(n, "air-quality", 3)
    await all_acked(receiver, ids)
    await receiver.stop()
    for half in range(2):  # records committed at the start and in the middle of it
        ids += await publish(n, "air-quality", 5, start=3 + 5 * half)
        await asyncio.sleep(30)
    st = (await n.sinks.status())["sinks"][0]
    assert st["pending"] == 10 and st["delivered"] == 3 and st["refused"] == 0
    # capped backoff: it kept trying (at least every 5 s, after 7 doublings from
    # 0.05 s), and did not spin (at least 2.5 s apart once capped)
    assert 10 <= st["retries"] <= 40, st["retries"]
    await receiver.start()
    await all_acked(receiver, ids)
    assert receiver.acked_ids() == ids  # in order, each once
    # (the receiver counts an event when it answers 2xx; the node clears its outbox row
    # when that answer reaches it, a moment later)

    async def cleared() -> bool:
        return bool((await n.sinks.status())["sinks"][0]["pending"] == 0)
    await eventually(cleared, timeout=10, interval=0.05)


async def test_a_refused_event_is_kept_and_its_feed_goes_on(node_with_sink: Make,
                                                            receiver: Receiver) -> None:
    n = await node_with_sink(sink_toml(receiver.url))
    ids = await publish(n, "air-quality", 2)
    await all_acked(receiver, ids)
    later = await publish(n, "air-quality", 3, start=2)
    receiver.refuse.add(later[0])
    # (refused after the receiver saw it, so the order of the rest still holds)
    await all_acked(receiver, later[1:])
    assert receiver.acked_ids() == ids + later[1:]
    st = (await n.sinks.status())["sinks"][0]
    assert st["refused_held"] == 1
    assert [r["record"] for r in st["refused_recent"]] == [later[0]]
    assert "HTTP 400" in st["refused_recent"][0]["error"]


async def test_nothing_lost_nor_acknowledged_twice_across_a_restart(
        node_with_sink: Make, receiver: Receiver) -> None:
    n = await node_with_sink(sink_toml(receiver.url))
    ids = await publish(n, "air-quality", 4)
    await all_acked(receiver, ids)
    await receiver.stop()
    ids += await publish(n, "air-quality", 6, start=4)  # committed, not delivered
    await n.stop()
    n = await node_with_sink(fresh=False)
    ids += await publish(n, "air-quality", 2, start=10)
    await asyncio.sleep(0.3)
    await receiver.start()
    await all_acked(receiver, ids)
    assert receiver.acked_ids() == ids


async def test_a_new_sink_starts_from_now_unless_from_start(node_with_sink: Make,
                                                            receiver: Receiver,
                                                            tmp_path: Path) -> None:
    n = await node_with_sink(sink_toml(receiver.url))
    await n.stop()
    n = await node_with_sink(fresh=False)
    before = await publish(n, "air-quality", 2)
    await all_acked(receiver, before)
    await n.stop()
    # a second sink, added later: from_start = true takes the records held before it
    with open(tmp_path / "jakarta" / "node.toml", "a") as f:
        f.write(sink_toml(receiver.url, extra="from_start = true").replace(
            'name = "bus"', 'name = "late"'))
    n = await node_with_sink(fresh=False)
    after = await publish(n, "air-quality", 1, start=2)
    await all_acked(receiver, after)
    await eventually(lambda: _count(receiver, before, 2), timeout=10)


async def _count(r: Receiver, ids: list[str], times: int) -> bool:
    acked = r.acked_ids()
    return all(acked.count(i) == times for i in ids)


async def test_a_wrong_url_is_waited_out_not_a_refusal_of_every_record(
        node_with_sink: Make, receiver: Receiver, tmp_path: Path) -> None:
    """A 404 (or 401, 403...) speaks of the sink, not the event: its records wait, the
    status says what to check, and once node.toml is fixed they all arrive, in order."""
    wrong = receiver.url.replace("/events", "/event")
    n = await node_with_sink(sink_toml(wrong))
    ids = await publish(n, "air-quality", 4)

    async def retried() -> bool:
        return (await n.sinks.status())["sinks"][0]["retries"] >= 2
    await eventually(retried, timeout=30, interval=0.05)
    st = (await n.sinks.status())["sinks"][0]
    assert (st["pending"], st["refused"], st["refused_held"]) == (4, 0, 0)
    assert "HTTP 404" in st["last_error"] and "check its url" in st["last_error"]
    await n.stop()
    toml = tmp_path / "jakarta" / "node.toml"
    toml.write_text(toml.read_text().replace(wrong, receiver.url))
    n = await node_with_sink(fresh=False)
    await all_acked(receiver, ids)
    assert receiver.acked_ids() == ids


async def test_a_sink_whose_token_file_is_missing_stops_the_start(
        tmp_path: Path, receiver: Receiver) -> None:
    """A secret file not there at start is a mistake in node.toml: said at once, by
    name, rather than a node that runs and retries a sink that can never deliver."""
    d = make_node_dir(tmp_path, "Jakarta")
    with open(d / "node.toml", "a") as f:
        f.write(sink_toml(receiver.url, extra='token_file = "bus-token"'))
    n = Node.load(d)
    with pytest.raises(ConfigError, match=r"sink bus: token_file: .*bus-token"):
        await n.start()
    await n.stop()
    (d / "bus-token").write_text("s3cret\n")
    n = Node.load(d)
    await n.start()
    try:
        ids = await publish(n, "air-quality", 1)
        await all_acked(receiver, ids)
    finally:
        await n.stop()


def test_the_rendered_template_shows_a_sink_and_still_loads() -> None:
    from citynode.config import parse_config, render_config

    text = render_config("Jakarta", "127.0.0.1:8443", "https://127.0.0.1:8443", ["localhost"])
    assert parse_config(text).sinks.all() == ()
    start = text.index("# [[sinks.cloudevents]]\n")
    end = text.index("# ---- [[bridges.mqtt]]")
    example = "\n".join(line[2:] for line in text[start:end].splitlines())
    (s,) = parse_config(text + "\n" + example).sinks.cloudevents
    assert (s.name, s.mode, s.filter.feed) == ("bus", "structured", "air-quality")


def test_sink_config_errors_name_the_key() -> None:
    from citynode.errors import ConfigError
    from citynode.sinks.config import parse_sinks

    def one(**kw: Any) -> Any:
        return parse_sinks({"cloudevents": [{"name": "bus", "url": "https://x.example/e",
                                             **kw}]}, "node.toml")

    assert one().cloudevents[0].filter.feed is None
    for bad, key in (({"url": "ftp://x"}, "url"), ({"filter": "color=red"}, "filter"),
                     ({"mode": "batch"}, "mode"), ({"retry_min_seconds": 9,
                                                    "retry_max_seconds": 1},
                                                   "retry_min_seconds"),
                     ({"lanes": 0}, "lanes"), ({"tenant": "x"}, "tenant"),
                     ({"batch": "8"}, "batch")):
        with pytest.raises(ConfigError, match=f"bus {key}|#1 {key}"):
            one(**bad)


def test_sinks_status_on_a_stopped_node(tmp_path: Path) -> None:
    import json

    from tests.test_cli import ok

    d = make_node_dir(tmp_path, "Jakarta")
    assert "no sinks in node.toml" in ok("sinks", "status", "-d", str(d)).stdout
    with open(d / "node.toml", "a") as f:
        f.write(sink_toml("https://events.example/x"))
    (s,) = json.loads(ok("sinks", "status", "-d", str(d), "--json").stdout)["sinks"]
    assert (s["name"], s["running"], s["pending"], s["refused_recent"]) == (
        "bus", False, 0, [])
    assert "bus" in ok("sinks", "status", "-d", str(d)).stdout


@pytest.mark.integration
async def test_kill_9_of_a_running_node_mid_delivery_loses_nothing(
        cluster: Any, receiver: Receiver) -> None:
    """A real ``citynode run`` killed (SIGKILL) while events are in flight: after a
    restart every record is delivered, in order per feed; an event the receiver
    acknowledged just before the crash may come again, with the same id (receivers drop
    copies by id), at most one batch a feed."""
    (n,) = cluster.create(["Jakarta"])
    with open(n.dir / "node.toml", "a") as f:
        f.write(sink_toml(receiver.url))
    await cluster.start()
    receiver.delay = 0.02  # so that the crash finds deliveries under way
    ids: list[str] = []
    for feed in ("a-air", "b-air"):
        out = await n.publish(feed, "AirQualityObserved", [reading(i) for i in range(40)])
        ids += out["ids"]

    async def some() -> bool:
        return len(receiver.events) >= 15
    await eventually(some, timeout=30, interval=0.01)
    n.kill()
    assert len(set(receiver.acked_ids())) < len(ids)  # killed mid-stream
    await n.close()
    receiver.delay = 0.0
    await cluster.start([n])
    await all_acked(receiver, ids)
    assert receiver.errors == []
    for source, seqs in by_source(receiver).items():
        first = list(dict.fromkeys(seqs))  # each event's first delivery
        assert first == list(range(1, 41)), source
        assert len(seqs) - len(first) <= 8, source  # copies: at most a batch
    copies = {}
    for e in receiver.events:  # a copy is the same event, byte for byte
        copies.setdefault(e.get_id(), []).append(
            (e.get_extension("citynodeenvelope"), e.get_data()))
    assert all(len(set(map(str, v))) == 1 for v in copies.values())
