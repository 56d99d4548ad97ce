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
import re
from typing import Any

import pytest

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
