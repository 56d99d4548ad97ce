"""Takeovers under load, with real ``citynode run`` processes on one PostgreSQL database:
publishes keep arriving at every process while the leader is killed (kill -9) or frozen
(SIGSTOP, its sockets still open). No seq is ever signed twice, every acknowledged
record is stored, and no client is told its publish was wrong (no 4xx): a publish caught
by the takeover is a 503 to retry."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
import time
from pathlib import Path

import pytest

from citynode.cluster import Cluster, LocalNode
from citynode.core.keys import parse_node_id
from citynode.core.records import stored_record
from citynode.errors import PeerError, PeerRejected
from citynode.storage_pg import LEASE_S, WRITER_IDLE_S, PgStorage
from tests.integration.test_shared_database import _item, _leaders, _processes

pytestmark = pytest.mark.integration


class _Load:
    """Publishers sending to random processes until stopped: what was acknowledged,
    and every refusal's status."""

    def __init__(self, nodes: list[LocalNode]) -> None:
        self.nodes = nodes
        self.acked: list[str] = []
        self.statuses: list[tuple[int, str]] = []
        self.stop = False
        self.n = 0

    async def publisher(self, k: int) -> None:
        rnd = random.Random(k)
        while not self.stop:
            via = rnd.choice(self.nodes)
            if via.proc is None or via.proc.poll() is not None:
                continue
            self.n += 1
            items = [_item(k * 100_000 + self.n * 10 + j) for j in range(rnd.choice((1, 3, 20)))]
            try:
                out = await asyncio.wait_for(
                    via.publish("air", "AirQualityObserved", items), 40)
                self.acked += out["ids"]
            except PeerRejected as exc:
                self.statuses.append((exc.status, exc.reason))
                await asyncio.sleep(0.1)
            except (PeerError, TimeoutError):  # a process killed or frozen under it
                await asyncio.sleep(0.1)


def _stored(pg_url: str, origin: str) -> list[bytes]:
    with PgStorage.open_url(pg_url) as st:
        envs = st.range(parse_node_id(origin), "air", 1, 10**6, 10**6)
        assert st.fork_proofs() == []
    return envs


def _check_chain(envs: list[bytes], acked: list[str]) -> None:
    recs = [stored_record(e) for e in envs]
    assert [r.seq for r in recs] == list(range(1, len(recs) + 1)), "a seq missing or twice"
    assert all(b.prev == a.id for a, b in itertools.pairwise(recs))
    assert set(acked) <= {r.id.hex() for r in recs}, "an acknowledged record is not stored"


async def _new_leader(followers: list[LocalNode], since: float, within: float
                      ) -> LocalNode:
    while True:
        assert time.monotonic() - since < within, "no process took over"
        new = await _leaders(followers)
        if new:
            assert len(new) == 1
            return new[0]
        await asyncio.sleep(0.2)


async def test_concurrent_publishes_through_every_process_while_the_leader_is_killed(
        cluster: Cluster, tmp_path: Path, pg_url: str) -> None:
    nodes = _processes(cluster, tmp_path, pg_url)
    await cluster.start()
    [leader] = await _leaders(nodes)
    followers = [n for n in nodes if n is not leader]
    load = _Load(nodes)
    pubs = [asyncio.create_task(load.publisher(k)) for k in range(6)]
    await asyncio.sleep(3)
    before = len(load.acked)
    leader.kill()
    killed = time.monotonic()
    new = await _new_leader(followers, killed, 15)
    await asyncio.sleep(4)  # publishes go on through both survivors after the takeover
    load.stop = True
    await asyncio.gather(*pubs)

    assert before > 0 and len(load.acked) > before, "publishes went on after the takeover"
    assert [s for s in load.statuses if 400 <= s[0] < 500] == [], load.statuses
    assert {r for _s, r in load.statuses} <= {"no_leader", "storage"}, load.statuses
    _check_chain(_stored(pg_url, leader.node_id), load.acked)
    for n in followers:  # nothing signed against heads the takeover had not read yet
        assert n.log_path is not None
        text = n.log_path.read_text(errors="replace")
        assert "ChainError" not in text and "does not extend the chain" not in text, n.name
    assert (await new.api("GET", "/v1/admin/status"))["leader"]


async def test_a_frozen_leader_is_ended_by_its_lease_and_another_takes_over(
        cluster: Cluster, tmp_path: Path, pg_url: str) -> None:
    """SIGSTOP: the leader's sockets stay open (its kernel answers keepalives), so only
    the lease ends it; its write under way (the writers' lock held in an open
    transaction) fails instead of blocking every process, and never lands later."""
    nodes = _processes(cluster, tmp_path, pg_url)
    await cluster.start()
    [leader] = await _leaders(nodes)
    followers = [n for n in nodes if n is not leader]
    load = _Load([leader])
    pubs = [asyncio.create_task(load.publisher(k)) for k in range(4)]
    await asyncio.sleep(2)
    assert leader.proc is not None
    pid = leader.proc.pid
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        load.nodes = followers  # clients move on to the other processes
        new = await _new_leader(followers, stopped, LEASE_S + WRITER_IDLE_S + 15)
        # Writes work again through every survivor.
        for i, via in enumerate(followers):
            out = await asyncio.wait_for(
                via.publish("air", "AirQualityObserved", [_item(900_000 + i)]), 40)
            load.acked += out["ids"]
        with PgStorage.open_url(pg_url) as st:
            st.set_meta("probe", b"x").result(timeout=30)  # the writers' lock is free
    finally:
        os.kill(pid, signal.SIGCONT)
    await asyncio.sleep(3)  # the frozen one wakes: its sessions were ended
    load.stop = True
    await asyncio.gather(*pubs)
    with contextlib.suppress(PeerError):
        assert not (await leader.api("GET", "/v1/admin/status"))["leader"]
    assert [s for s in load.statuses if 400 <= s[0] < 500] == [], load.statuses
    _check_chain(_stored(pg_url, leader.node_id), load.acked)
    assert (await new.api("GET", "/v1/admin/status"))["leader"]
    text = "".join(n.log_path.read_text(errors="replace") for n in followers
                   if n.log_path is not None)
    assert "stopped renewing its lease" in text
