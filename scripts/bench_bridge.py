"""MQTT-in benchmark: station messages through a real Mosquitto into one running node.

One ``citynode run`` process with a ``[[bridges.mqtt]]`` bridge to a local Mosquitto.
Measured in the same run:

* the node's bulk publish rate: ``POST /v1/publish`` of the same payloads, ``--batch``
  items a request (sign + durable commit), records per second;
* MQTT in: ``--messages`` messages queued at the broker for the bridge's session while
  the node is stopped, then drained by the node: messages per second to signed and
  committed records (first to last record's signing time), and its ratio to the bulk
  publish rate (the issue's target: at least 0.5). Queued first because a Python MQTT
  publisher on the same machine (about 900 messages/s here) is slower than the bridge;
* latency from broker to record at a steady ``--rate`` (``--latency-messages`` of them):
  each message carries the time it was sent, the record the time the node signed it
  (committed right after); p50 and p99 in milliseconds;
* CloudEvents out: ``--messages`` records published (bulk) while the
  ``[[sinks.cloudevents]]`` receiver (a local aiohttp server parsing each event with the
  official SDK) is away, then delivered when it is back: deliveries per second (first to
  last acknowledged event) and the ratio to the bulk publish rate; on one feed (the
  ordered, one-event-at-a-time case), then spread over ``--ce-feeds`` feeds (feeds are
  delivered to at once).

Each figure is also given as a ratio to the bulk publish rate of the same run.

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import aiomqtt

from citynode.bridges.mosquitto import Broker, bridge_toml, reading, wait_for
from citynode.cluster import Cluster, LocalNode
from citynode.sinks.receiver import Receiver


async def records_after(n: LocalNode, feed: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        page = await n.api("GET", f"/v1/records?feed={feed}&limit=1000&after={after}")
        out += page["records"]
        if page["next"] is None:
            return out
        after = page["next"]


async def head(n: LocalNode, feed: str) -> int:
    for f in await n.feeds():
        if f["feed"] == feed:
            return int(f["seq"])
    return 0


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-bridge-") as tmp:
        base = Path(tmp)
        broker = Broker(base)
        broker.start()
        cluster = Cluster(base)
        receiver = Receiver()  # not started yet: away while the records are published
        try:
            (n,) = cluster.create(["Jakarta"])
            with open(n.dir / "node.toml", "a") as f:
                f.write(bridge_toml(broker.port))
                f.write(f'''
[[sinks.cloudevents]]
name = "bench"
url = "{receiver.url}"
filter = "type=WeatherObserved"
retry_min_seconds = 0.05
retry_max_seconds = 0.2
''')
            await cluster.start()

            async def up() -> bool:
                text = (await n.api("GET", "/metrics", raw=True)).decode()
                return 'citynode_bridge_connected{bridge="air"} 1.0' in text
            await wait_for(up, what="bridge connected")

            # Bulk publish: the same mapped payloads, through the operator API.
            items = [{"pm25": 10.0 + i % 50, "no2": 20.0, "name": f"bulk-{i}",
                      "dateObserved": "2026-12-07T07:00:00+07:00",
                      "location": {"type": "Point", "coordinates": [106.823, -6.195]}}
                     for i in range(args.messages)]
            t0 = time.perf_counter()
            for start in range(0, len(items), args.batch):
                await n.publish("bulk", "AirQualityObserved", items[start:start + args.batch])
            bulk_rate = len(items) / (time.perf_counter() - t0)

            # MQTT in: queued at the broker for the bridge's session, then drained.
            await n.close()
            n.stop()
            sent: dict[str, int] = {}
            await _send(broker, range(args.messages), 100, sent, 0.0)
            await cluster.start([n])
            total = args.messages

            async def drained() -> bool:
                return bool(await head(n, "air-quality") >= total)
            await wait_for(drained, timeout=900, what="every queued message a record")
            times = sorted(r["time"] for r in await records_after(n, "air-quality"))
            mqtt_rate = (len(times) - 1) / max(1e-3, (times[-1] - times[0]) / 1000)

            # Latency at a steady rate.
            more = range(total, total + args.latency_messages)
            await _send(broker, more, 1, sent, 1 / args.rate)
            total += args.latency_messages
            await wait_for(drained, timeout=300, what="every message a record")
            recs = await records_after(n, "air-quality")
            lat = [r["time"] - sent[r["data"]["name"]] for r in recs
                   if int(r["data"]["name"].split("-")[1]) >= args.messages]
            names = [r["data"]["name"] for r in recs]
            exactly_once = sorted(names) == sorted(sent)

            # CloudEvents out: published while the receiver is away, then delivered:
            # one feed (in order, one event at a time), then --ce-feeds feeds at once.
            ce: dict[int, tuple[float, bool]] = {}
            weather = [{"temperature": 27.0 + i % 10, "relativeHumidity": 0.8,
                        "dateObserved": "2026-12-07T07:00:00+07:00",
                        "location": {"type": "Point", "coordinates": [106.823, -6.195]}}
                       for i in range(args.messages)]
            for feeds in (1, args.ce_feeds):
                ce[feeds] = await _cloudevents(n, receiver, weather, feeds, args.batch)
            ce_rate, ce_in_order_once = ce[1]
            ce_many_rate, many_ok = ce[args.ce_feeds]
            ce_in_order_once = ce_in_order_once and many_ok
            await n.close()
        finally:
            cluster.stop()
            broker.stop()
            await receiver.stop()
    out = {"bench": "bridge", "messages": args.messages, "bulk_publish_per_s": round(bulk_rate, 1),
           "mqtt_in_per_s": round(mqtt_rate, 1),
           "ratio": round(mqtt_rate / bulk_rate, 3), "target_ratio": 0.5,
           "latency_rate_per_s": args.rate,
           "p50_ms": round(pct(lat, 0.5), 1), "p99_ms": round(pct(lat, 0.99), 1),
           "exactly_once": exactly_once,
           "cloudevents_per_s": round(ce_rate, 1),
           "cloudevents_ratio": round(ce_rate / bulk_rate, 3),
           "cloudevents_feeds": args.ce_feeds,
           "cloudevents_many_feeds_per_s": round(ce_many_rate, 1),
           "cloudevents_many_feeds_ratio": round(ce_many_rate / bulk_rate, 3),
           "cloudevents_in_order_once": ce_in_order_once,
           "cloudevents_sdk_errors": len(receiver.errors)}
    print(f"bulk publish: {out['bulk_publish_per_s']} records/s "
          f"(batches of {args.batch})")
    print(f"MQTT in: {out['mqtt_in_per_s']} messages/s to committed records, "
          f"ratio {out['ratio']} (target >= 0.5)")
    print(f"broker -> record latency at {args.rate} messages/s: p50 {out['p50_ms']} ms, "
          f"p99 {out['p99_ms']} ms")
    print(f"every message exactly one record: {exactly_once}")
    print(f"CloudEvents out, one feed (in order): {out['cloudevents_per_s']} deliveries/s, "
          f"ratio {out['cloudevents_ratio']}")
    print(f"CloudEvents out, {args.ce_feeds} feeds: {out['cloudevents_many_feeds_per_s']} "
          f"deliveries/s, ratio {out['cloudevents_many_feeds_ratio']}")
    print(f"every record delivered once, in order per feed: {ce_in_order_once}")
    return out


async def _cloudevents(n: LocalNode, receiver: Receiver, items: list[dict[str, Any]],
                       feeds: int, batch: int) -> tuple[float, bool]:
    """Publish ``items`` on ``feeds`` feeds while the receiver is away, start it, wait
    for every event; deliveries per second (first to last event) and whether each
    feed's records came once each, in order."""
    await receiver.stop()
    receiver.events.clear()
    receiver.times.clear()
    names = [f"ce{feeds}-{k}" for k in range(feeds)]
    for k, feed in enumerate(names):
        mine = items[k::feeds]
        for start in range(0, len(mine), batch):
            await n.publish(feed, "WeatherObserved", mine[start:start + batch])
    await receiver.start()

    async def delivered() -> bool:
        return len(receiver.events) >= len(items)
    await wait_for(delivered, timeout=900, what="every record delivered")
    rate = (len(receiver.times) - 1) / max(1e-3, receiver.times[-1] - receiver.times[0])
    seqs: dict[str, list[int]] = {}
    for e in receiver.events:
        seqs.setdefault(e.get_source(), []).append(int(e.get_extension("citynodeseq")))
    ok = len(seqs) == feeds and all(v == list(range(1, len(v) + 1)) for v in seqs.values())
    return rate, ok and len(receiver.events) == len(items)


async def _send(broker: Broker, which: range, in_flight: int, sent: dict[str, int],
                pause: float) -> None:
    """Publish station messages ``which``, ``in_flight`` at a time (``pause`` seconds
    between), each stamped with the time it is handed to the client (noted in ``sent``
    by reading name)."""
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="bench-pub", timeout=60,
                              max_inflight_messages=max(20, in_flight)) as c:
        c.pending_calls_threshold = 10**9  # many publishes in flight is the point here
        for start in range(which.start, which.stop, in_flight):
            now = int(time.time() * 1000)
            chunk = range(start, min(which.stop, start + in_flight))
            for i in chunk:
                sent[f"reading-{i}"] = now
            await asyncio.gather(*(c.publish(f"city/air/st{i % 10}/reading",
                                             reading(i, sent_ms=now), qos=1) for i in chunk))
            if pause:
                await asyncio.sleep(pause)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--batch", type=int, default=256, help="items per bulk publish")
    p.add_argument("--rate", type=float, default=50.0,
                   help="messages per second for the latency run")
    p.add_argument("--latency-messages", type=int, default=500)
    p.add_argument("--ce-feeds", type=int, default=8,
                   help="feeds of the second CloudEvents measurement")
    print(json.dumps(asyncio.run(main(p.parse_args()))))
