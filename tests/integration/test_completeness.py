"""Completeness and terms with real ``citynode run`` processes over HTTPS on 127.0.0.1
(issue 13, points 2 and 4).

A line A - B - C. B's operator caps how many of A's records B stores a day
(``origin_quota_records_per_day``): B honestly refuses A's records beyond the cap, yet
relays A's signed checkpoints, so C learns that A signed records no path delivers and
shows the feed ``withheld``. A feed whose records all arrived shows ``silent`` between
A's heartbeats. Stopping A, C shows both ``dead`` after three cadences.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from citynode.client import Client
from citynode.cluster import Cluster, LocalNode
from tests.conftest import eventually
from tests.integration.test_federation import FAST, TYPE, cli_json, rec

pytestmark = pytest.mark.integration

AIR_TERMS = ('[feeds.air]\nlicense = "CC-BY-4.0"\nattribution = "A city air network"\n'
             "cadence_seconds = 1\n"
             '[feeds.quiet]\nlicense = "CC0-1.0"\ncadence_seconds = 1\n')


async def liveness(n: LocalNode, origin: LocalNode) -> dict[str, dict[str, Any]]:
    out = await n.api("GET", "/v1/liveness")
    return {f["feed"]: f for f in out["feeds"] if f["origin"] == origin.node_id}


async def test_withheld_at_the_far_end_then_dead(cluster: Cluster) -> None:
    settings = {**FAST, ("federation", "sync_bound_seconds"): 2.0}
    (a,) = cluster.create(["A"], settings=settings)
    (b,) = cluster.create(["B"], settings={**settings,
                                            ("federation", "origin_quota_records_per_day"): 3})
    (c,) = cluster.create(["C"], settings=settings)
    with (a.dir / "node.toml").open("a") as f:
        f.write(AIR_TERMS)
    await cluster.start()
    await cluster.link(a, b)
    await cluster.link(b, c)

    await a.publish("quiet", TYPE, [rec(0)])

    async def c_holds_quiet() -> bool:
        return (await liveness(c, a)).get("quiet", {}).get("head") == 1

    await eventually(c_holds_quiet, timeout=30)
    await a.publish("air", TYPE, [rec(i) for i in range(10)])  # B stores 2 of them

    async def withheld() -> bool:
        lv = await liveness(c, a)
        return (lv.get("air", {}).get("state") == "withheld"
                and lv["quiet"]["state"] == "silent")

    await eventually(withheld, timeout=40, interval=0.3)
    lv = await liveness(c, a)
    assert (lv["air"]["head"], lv["air"]["signed_size"], lv["air"]["cadence_s"]) == (2, 10, 1)
    assert lv["air"]["behind_since"] is not None
    assert lv["air"]["terms"]["license"] == "CC-BY-4.0"
    assert lv["air"]["terms"]["attribution"] == "A city air network"
    assert (lv["quiet"]["head"], lv["quiet"]["signed_size"]) == (1, 1)
    # The origin itself: all its feeds complete.
    own = await liveness(a, a)
    assert own["air"]["signed_size"] == own["air"]["head"] == 10
    # B, which refused the records itself, says so too.
    assert (await liveness(b, a))["air"]["state"] == "withheld"
    # The metric counts feeds per state.
    metrics = (await c.api("GET", "/metrics", raw=True)).decode()
    m = re.search(r'^citynode_feed_liveness\{state="withheld"\} ([0-9.]+)$', metrics, re.M)
    assert m is not None and float(m[1]) == 1.0, metrics[-3000:]
    # And one series per origin and feed, labelled with its state.
    per_feed = {}
    for labels, value in re.findall(r'^citynode_feed_state\{(.*)\} ([0-9.]+)$', metrics, re.M):
        lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if lab["origin"] == a.node_id:
            assert float(value) == 1.0 and lab["feed"] not in per_feed
            per_feed[lab["feed"]] = lab["state"]
    assert per_feed == {"air": "withheld", "quiet": "silent"}, metrics[-3000:]
    # `citynode feeds --json` on the running node: terms and completeness per feed.
    rc, out, err = await asyncio.to_thread(cli_json, "feeds", "-d", str(c.dir))
    assert rc == 0, err
    air = next(f for f in out["feeds"] if f["origin"] == a.node_id and f["feed"] == "air")
    assert (air["seq"], air["completeness"]["state"], air["completeness"]["signed_size"],
            air["terms"]["license"]) == (2, "withheld", 10, "CC-BY-4.0")

    # A stops: no statement for three cadences (3 s), C calls both feeds dead.
    await a.close()
    assert a.stop() == 0

    async def dead() -> bool:
        lv = await liveness(c, a)
        return lv["air"]["state"] == lv["quiet"]["state"] == "dead"

    await eventually(dead, timeout=20, interval=0.3)
    # A partner without the operator token sees the public feeds' states too.
    anon = await c.api("GET", "/v1/liveness", operator=False)
    assert {(f["feed"], f["state"]) for f in anon["feeds"] if f["origin"] == a.node_id} == {
        ("air", "dead"), ("quiet", "dead")}

    # C restarts with no path to A (B stopped too): the statements it kept tell the
    # states at once, not "unknown" until new ones arrive.
    await b.close()
    assert b.stop() == 0
    await c.close()
    assert c.stop() == 0
    c.start()
    await c.wait_ready()
    lv = await liveness(c, a)
    assert (lv["air"]["state"], lv["air"]["signed_size"], lv["air"]["head"]) == ("dead", 10, 2)
    assert (lv["quiet"]["state"], lv["quiet"]["signed_size"]) == ("dead", 1)


def _set_terms(n: LocalNode, text: str) -> None:
    toml = n.dir / "node.toml"
    body = toml.read_text()
    if "[feeds.air]" in body:
        body = body[:body.index("[feeds.air]")]
    toml.write_text(body + "[feeds.air]\n" + text)


async def _first_events(n: LocalNode, path_qs: str, want: int) -> list[tuple[str, Any]]:
    """The first ``want`` named events of an SSE stream, as (event, parsed data)."""
    s = await n.session()
    out: list[tuple[str, Any]] = []
    async with s.get(n.url + path_qs, headers={"Accept": "text/event-stream"}) as r:
        assert r.status == 200
        buf = b""
        while len(out) < want:
            chunk = await asyncio.wait_for(r.content.readany(), 10)
            assert chunk, "the stream ended early"
            buf += chunk
            *events, buf = buf.split(b"\r\n\r\n")
            for ev in events:
                fields = dict(line.split(b": ", 1) for line in ev.split(b"\r\n")
                              if b": " in line)
                if b"event" in fields:
                    out.append((fields[b"event"].decode(), json.loads(fields[b"data"])))
    return out[:want]


async def test_a_change_of_terms_is_a_new_card_and_old_records_keep_theirs(
        cluster: Cluster, tmp_path: Path) -> None:
    a, b = cluster.create(["A", "B"], settings=FAST)
    _set_terms(a, 'license = "CC0-1.0"\n')
    await cluster.start()
    await cluster.link(a, b)
    await a.publish("air", TYPE, [rec(0), rec(1)])

    async def b_holds(n: int) -> bool:
        return any(f["origin"] == a.node_id and f["feed"] == "air" and f["seq"] == n
                   for f in await b.feeds())

    await eventually(lambda: b_holds(2), timeout=30)
    # New terms: node.toml changed, the node restarted, a new card signed.
    await a.close()
    assert a.stop() == 0
    _set_terms(a, 'license = "CC-BY-4.0"\nattribution = "A city, air network"\n')
    a.start()
    await a.wait_ready()
    await a.publish("air", TYPE, [rec(2), rec(3)])

    async def new_terms_at_b() -> bool:
        if not await b_holds(4):
            return False
        page = await b.api("GET", f"/v1/records?origin={a.node_id}&feed=air")
        t = page["records"][-1]["terms"]
        return t is not None and t["license"] == "CC-BY-4.0"

    await eventually(new_terms_at_b, timeout=40, interval=0.3)
    # The read API: each record with the terms in force when it was signed.
    page = await b.api("GET", f"/v1/records?origin={a.node_id}&feed=air", operator=False)
    got = [(r["seq"], r["terms"]["license"], r["terms"]["attribution"])
           for r in page["records"]]
    assert got == [(1, "CC0-1.0", None), (2, "CC0-1.0", None),
                   (3, "CC-BY-4.0", "A city, air network"),
                   (4, "CC-BY-4.0", "A city, air network")]
    assert page["records"][0]["terms"]["card_time"] < page["records"][2]["terms"]["card_time"]

    # The client verifies the origin's cards itself and gives each record its terms.
    async with Client(b.url, fingerprint=b.fingerprint) as c:
        recs = [r async for r in c.query(origin=a.node_id, feed="air")]
        terms = [await c.terms(r) for r in recs]
        assert [t.license if t else None for t in terms] == [
            "CC0-1.0", "CC0-1.0", "CC-BY-4.0", "CC-BY-4.0"]
        hist = await c.card_history(a.node_id)
        assert len(hist) >= 2 and all(h.node_id == a.node_id for h in hist)

    # A stream, asked for terms: before each record whose terms in force differ from
    # the last announced for its feed, an event with the terms it was signed under
    # (issue 13 review: not the current terms before records signed under older ones).
    events = await _first_events(b, f"/v1/stream?origin={a.node_id}&after=0&terms=1", 6)
    assert [e for e, _ in events] == ["terms", "record", "record", "terms", "record",
                                      "record"]
    for n, rec_ in ((0, 0), (3, 2)):
        want = page["records"][rec_]["terms"]
        assert events[n][1]["feeds"] == [{
            "origin": a.node_id, "feed": "air", "card_time": want["card_time"],
            "terms": {k: v for k, v in want.items() if k != "card_time"}}]
    assert events[0][1]["feeds"][0]["terms"]["license"] == "CC0-1.0"
    assert events[3][1]["feeds"][0]["terms"]["license"] == "CC-BY-4.0"
    assert [e[1]["seq"] for e in events if e[0] == "record"] == [1, 2, 3, 4]

    # citynode subscribe prints each record with the terms it was signed under.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "citynode", "subscribe", b.url, "--id", b.node_id,
        "--origin", a.node_id, "--feed", "air", "--after", "0", "--count", "4",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out_, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode()
    lines = [json.loads(x) for x in out_.decode().splitlines()]
    assert [x["terms"]["license"] for x in lines] == [
        "CC0-1.0", "CC0-1.0", "CC-BY-4.0", "CC-BY-4.0"]

    # An export bundle carries the card history; the audit reports each period's terms.
    out = tmp_path / "a.bundle"
    rc, summary, err = await asyncio.to_thread(
        cli_json, "export", "-d", str(b.dir), "--origin", a.node_id, "--out", str(out))
    assert rc == 0, err
    assert summary["cards"] >= 2  # A's cards before and after the change
    rc, report, err = await asyncio.to_thread(cli_json, "audit", str(out), "--origin",
                                              a.node_id)
    assert rc == 0 and report["ok"], err
    periods = report["terms"]["air"]
    assert [p["terms"]["license"] for p in periods] == ["CC0-1.0", "CC-BY-4.0"]
    assert periods[0]["until"] == periods[1]["from"] and periods[1]["until"] is None
    assert periods[0]["from"] <= page["records"][0]["time"] < periods[1]["from"]
    assert periods[1]["from"] <= page["records"][2]["time"]
