"""Federation with real ``citynode run`` processes over HTTPS on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from citynode.cluster import Cluster, LocalNode
from tests.conftest import eventually

pytestmark = pytest.mark.integration

FAST = {("federation", "pull_interval_seconds"): 1.0, ("federation", "backoff_max_seconds"): 2.0}


def rec(i: int) -> dict:
    return {"n": i, "station": "DKI1"}


async def held(n: LocalNode) -> dict[tuple[str, str], int]:
    return {(f["origin"], f["feed"]): f["seq"] for f in await n.feeds()}


async def test_line_of_four_relays_end_to_end(cluster: Cluster) -> None:
    a, b, c, d = cluster.create(["A", "B", "C", "D"], settings=FAST)
    await cluster.start()
    for x, y in [(a, b), (b, c), (c, d)]:
        await cluster.link(x, y)
    await a.publish("test", "org.example.Test", [rec(i) for i in range(10)])
    await d.publish("test", "org.example.Test", [rec(i) for i in range(5)])

    async def done() -> bool:
        for n in (a, b, c, d):
            h = await held(n)
            if h.get((a.node_id, "test")) != 10 or h.get((d.node_id, "test")) != 5:
                return False
        return True

    await eventually(done, timeout=30)
