"""Three ``citynode run`` processes of one node on one PostgreSQL database: one leads
(signs), all serve (a publish sent to a follower is handed on to the leader), streams
everywhere see every record, and when the leader is killed mid-publish another takes
over within seconds without ever signing a seq twice."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from citynode.cluster import Cluster, LocalNode, free_ports, set_config
from citynode.core.keys import parse_node_id
from citynode.core.records import stored_record
from citynode.errors import PeerError, PeerRejected
from citynode.sinks.receiver import Receiver
from citynode.storage_pg import PgStorage
from tests.pg import PgServer

pytestmark = pytest.mark.integration

#: What "within a few seconds" means here (the followers try every 0.5 s; a killed
#: process's database session ends with it). Generous for a loaded CI machine.
TAKEOVER_S = 10.0


def _item(i: int) -> dict[str, Any]:
    return {"dateObserved": "2026-12-07T10:00:00Z", "pm25": float(i),
            "location": {"type": "Point", "coordinates": [106.823, -6.195]},
            "name": f"station {i}"}


def _processes(cluster: Cluster, tmp_path: Path, url: str, toml: str = ""
               ) -> list[LocalNode]:
    """One node's data dir (its key, certificate, token) three times, each process on
    its own port, all with ``[storage] url`` on the same database (and ``toml`` added
    to node.toml)."""
    (first,) = cluster.create(["Jakarta"], settings={("storage", "url"): url})
    if toml:
        with open(first.dir / "node.toml", "a") as f:
            f.write(toml)
    out = [first]
    for i, port in enumerate(free_ports(2), 2):
        d = tmp_path / f"jakarta-{i}"
        shutil.copytree(first.dir, d, ignore=shutil.ignore_patterns("run.lock", "*.log"))
        set_config(d / "node.toml", "node", "listen", f"127.0.0.1:{port}")
        set_config(d / "node.toml", "node", "public_url", f"https://127.0.0.1:{port}")
        n = LocalNode(f"Jakarta-{i}", d, port, first.node_id, first.token,
                      first.fingerprint)
        cluster.nodes[n.name] = n
        out.append(n)
    return out


async def _leaders(nodes: list[LocalNode]) -> list[LocalNode]:
    out = []
    for n in nodes:
        try:
            if (await n.api("GET", "/v1/admin/status"))["leader"]:
                out.append(n)
        except PeerError:
            continue
    return out


async def _collect(n: LocalNode, seqs: set[int], want: int) -> None:
    """Record events of ``n``'s live stream (opened now: only the live tail feeds it,
    no catch-up from the database) into ``seqs`` until ``want`` seqs came."""
    s = await n.session()
    async with s.get(n.url + "/v1/stream?feed=air",
                     headers={"Accept": "text/event-stream"}) as r:
        assert r.status == 200
        buf = b""
        while len(seqs) < want:
            chunk = await r.content.readany()
            assert chunk, "the stream ended early"
            buf += chunk
            *events, buf = buf.split(b"\r\n\r\n")
            for ev in events:
                f = dict(line.split(b": ", 1) for line in ev.split(b"\r\n") if b": " in line)
                if f.get(b"event") == b"record":
                    seqs.add(int(json.loads(f[b"data"])["seq"]))


async def test_three_processes_one_database_the_leader_killed_mid_publish(
        cluster: Cluster, tmp_path: Path, pg_url: str) -> None:
    nodes = _processes(cluster, tmp_path, pg_url)
    await cluster.start()
    leaders = await _leaders(nodes)
    assert len(leaders) == 1, "exactly one process leads"
    leader = leaders[0]
    followers = [n for n in nodes if n is not leader]

    # Live streams on both followers, opened before anything is published.
    total = 30
    seen: dict[str, set[int]] = {n.name: set() for n in followers}
    streams = [asyncio.create_task(_collect(n, seen[n.name], total)) for n in followers]
    await asyncio.sleep(0.5)

    # Any process takes a publish: a follower hands it on to the leader, which signs.
    acked: list[str] = []
    for i in range(10):
        via = followers[i % 2] if i in (0, 1, 5) else leader
        out = await via.publish("air", "AirQualityObserved", [_item(i)])
        assert out["first_seq"] == i + 1
        acked += out["ids"]

    # Mid-publish: a burst of publishes under way when the leader is killed.
    async def one(i: int) -> list[str]:
        out = await leader.publish("air", "AirQualityObserved", [_item(i)])
        return list(out["ids"])

    burst = [asyncio.create_task(one(i)) for i in range(10, 20)]
    await asyncio.sleep(0.05)
    leader.kill()
    killed_at = time.monotonic()
    for t in burst:
        with contextlib.suppress(PeerError):  # not acknowledged: landed or not, once
            acked += await t

    new: list[LocalNode] = []
    while not new:
        assert time.monotonic() - killed_at < TAKEOVER_S, "no process took over"
        new = await _leaders(followers)
        await asyncio.sleep(0.1)
    assert len(new) == 1
    took = time.monotonic() - killed_at

    head = None
    with PgStorage.open_url(pg_url) as st:
        head = st.head(parse_node_id(leader.node_id), "air")
    held = head[0] if head else 0
    assert 10 <= held <= 20
    for i in range(held, total):
        out = await new[0].publish("air", "AirQualityObserved", [_item(100 + i)])
        acked += out["ids"]
        assert out["first_seq"] == i + 1  # the new leader goes on from the database

    # One record per seq, chained, every acknowledged one among them.
    with PgStorage.open_url(pg_url) as st:
        envs = st.range(parse_node_id(leader.node_id), "air", 1, 1000, 1000)
        assert st.fork_proofs() == []
    recs = [stored_record(e) for e in envs]
    assert [r.seq for r in recs] == list(range(1, total + 1))
    assert all(b.prev == a.id for a, b in itertools.pairwise(recs))
    assert set(acked) <= {r.id.hex() for r in recs}

    # Every process's stream saw every record: NOTIFY, not polling.
    await asyncio.wait_for(asyncio.gather(*streams), 30)
    for name, seqs in seen.items():
        assert seqs == set(range(1, total + 1)), name

    # Every record verifies (citynode check, on PostgreSQL).
    survivor = new[0]
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "citynode", "check", "-d", str(survivor.dir),
                         "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["records"] >= total
    print(f"takeover after kill -9 of the leader: {took:.2f} s")


async def test_a_publish_to_a_follower_is_handed_on_to_the_leader(
        cluster: Cluster, tmp_path: Path, pg_url: str) -> None:
    nodes = _processes(cluster, tmp_path, pg_url)
    await cluster.start()
    (leader,) = await _leaders(nodes)
    followers = [n for n in nodes if n is not leader]

    # Publish and erase through the followers: the leader signs, the client gets its
    # answer as if it had asked the leader.
    out = await followers[0].publish("air", "AirQualityObserved", [_item(0), _item(1)])
    assert (out["first_seq"], out["last_seq"]) == (1, 2)
    out2 = await followers[1].publish("air", "AirQualityObserved", [_item(2)])
    assert out2["first_seq"] == 3
    erased = await followers[1].api("POST", "/v1/admin/erase", json_body={
        "ids": [out["ids"][0]], "reason": "test"})
    assert erased["seq"] >= 1 and erased["erased"] == [out["ids"][0]]
    batch = await followers[0].api(
        "POST", "/v1/bridges/publish?feed=air&type=AirQualityObserved",
        body=json.dumps({"subject": "s1", "data": _item(3)}).encode() + b"\n")
    assert batch["first_seq"] == 4
    # The leader's own answer passes through as it is, errors included.
    with pytest.raises(PeerRejected) as bad:
        await followers[0].api("POST", "/v1/admin/erase", json_body={"ids": ["zz"]})
    assert bad.value.status == 400
    # A wrong operator token is refused (by the follower, before handing anything on).
    s = await followers[0].session()
    async with s.post(followers[0].url + "/v1/publish?feed=air&type=AirQualityObserved",
                      data=b"{}\n", headers={"Authorization": "Bearer wrong"}) as r:
        assert r.status == 403

    # A request already handed on is never handed on again (no loop while the
    # leadership moves): 503, retry.
    async with s.post(followers[0].url + "/v1/publish?feed=air&type=AirQualityObserved",
                      data=json.dumps(_item(9)).encode() + b"\n",
                      headers={"Authorization": f"Bearer {followers[0].token}",
                               "Citynode-Forwarded": "1"}) as r:
        assert r.status == 503
        assert (await r.json())["error"] == "no_leader"
        assert r.headers["Retry-After"] == "2"

    # The leader stopped: until another takes over and writes its address, a follower
    # cannot hand on (503); then it hands on to the new leader.
    leader.kill()
    deadline = time.monotonic() + TAKEOVER_S
    while True:
        try:
            out = await followers[0].publish("air", "AirQualityObserved", [_item(4)])
            break
        except PeerRejected as exc:
            assert exc.status == 503 and exc.reason == "no_leader", exc
            assert time.monotonic() < deadline, "no process took over"
            await asyncio.sleep(0.2)
    assert out["first_seq"] == 5  # the erasure request went to a feed of its own
    with PgStorage.open_url(pg_url) as st:
        envs = st.range(parse_node_id(leader.node_id), "air", 1, 100, 100)
    assert [stored_record(e).seq for e in envs] == [1, 2, 3, 4, 5]


async def test_the_database_away_writes_refused_clearly_then_resumed_by_itself(
        cluster: Cluster) -> None:
    """A failover seen from the node: the server stops under it (pg_ctl stop -m fast),
    publishes are refused with a 503 saying why, and once it is back they work again,
    with no restart of citynode and no seq lost or signed twice."""
    server = PgServer().start()
    try:
        url = server.create_database("failover")
        (node,) = cluster.create(["Jakarta"], settings={("storage", "url"): url})
        await cluster.start()
        assert (await node.publish("air", "AirQualityObserved", [_item(0)]))["first_seq"] == 1

        server.pause()
        for i in range(3):  # each refused, none acknowledged
            with pytest.raises(PeerRejected) as refused:
                await node.publish("air", "AirQualityObserved", [_item(10 + i)])
            assert refused.value.status == 503, refused.value
            assert refused.value.reason in ("storage", "no_leader"), refused.value
            assert "retry" in str(refused.value) or "refused until" in str(refused.value)
        assert node.proc is not None and node.proc.poll() is None, "the node must not exit"

        server.resume()
        deadline = time.monotonic() + 30
        while True:
            try:
                out = await node.publish("air", "AirQualityObserved", [_item(1)])
                break
            except PeerRejected as exc:
                assert exc.status == 503, exc
                assert time.monotonic() < deadline, f"publish not resumed: {exc}"
                await asyncio.sleep(0.3)
        assert out["first_seq"] == 2  # nothing refused took a seq
        assert node.proc is not None and node.proc.poll() is None
        with PgStorage.open_url(url) as st:
            envs = st.range(parse_node_id(node.node_id), "air", 1, 100, 100)
        recs = [stored_record(e) for e in envs]
        assert [r.seq for r in recs] == [1, 2] and recs[1].prev == recs[0].id
    finally:
        cluster.stop()  # before the server: the node's stop needs no database
        server.stop()


async def test_a_sink_is_delivered_by_the_leader_alone_and_goes_on_after_a_takeover(
        cluster: Cluster, tmp_path: Path, pg_url: str) -> None:
    """Every process has the sink in its node.toml; only the leader delivers (sinks are
    singleton work), so each record reaches the receiver once, not once per process;
    after the leader is killed the new leader goes on from the shared outbox."""
    receiver = Receiver()
    await receiver.start()
    try:
        nodes = _processes(cluster, tmp_path, pg_url, f"""
[[sinks.cloudevents]]
name = "bus"
url = "{receiver.url}"
filter = "type=AirQualityObserved"
retry_min_seconds = 0.05
retry_max_seconds = 0.4
""")
        await cluster.start()
        (leader,) = await _leaders(nodes)
        followers = [n for n in nodes if n is not leader]

        async def published(via: list[LocalNode], start: int, count: int) -> list[str]:
            ids: list[str] = []
            for i in range(start, start + count):
                deadline = time.monotonic() + 20
                while True:
                    try:
                        out = await via[i % len(via)].publish("air", "AirQualityObserved",
                                                              [_item(i)])
                        break
                    except PeerRejected as exc:
                        # Right after a takeover a follower may still hand on to the
                        # killed leader's address: 503 no_leader, Retry-After (a client
                        # retries; the dead process carried nothing out).
                        if exc.status != 503 or exc.reason != "no_leader":
                            raise
                        assert time.monotonic() < deadline, "no_leader for 20 s"
                        await asyncio.sleep(0.2)
                ids += out["ids"]
            return ids

        async def delivered(ids: list[str], st: PgStorage) -> None:
            deadline = time.monotonic() + 30
            while not (set(ids) <= set(receiver.acked_ids())
                       and st.sink_counts().get("bus", (0, 0))[0] == 0):
                assert time.monotonic() < deadline, (
                    f"{len(set(ids) - set(receiver.acked_ids()))} not delivered")
                await asyncio.sleep(0.1)

        with PgStorage.open_url(pg_url) as st:
            ids = await published(nodes, 0, 12)  # through every process
            await delivered(ids, st)
            await asyncio.sleep(1.0)  # a second deliverer, were there one, shows here
            assert receiver.acked_ids() == ids
            assert all(receiver.seen[i] == 1 for i in ids), receiver.seen

            leader.kill()
            deadline = time.monotonic() + TAKEOVER_S
            while not (new := await _leaders(followers)):
                assert time.monotonic() < deadline, "no process took over"
                await asyncio.sleep(0.1)
            ids += await published(followers, 12, 8)
            await delivered(ids, st)
            await asyncio.sleep(1.0)
        assert len(new) == 1
        assert receiver.acked_ids() == ids  # in order, once each, across the takeover
        assert all(receiver.seen[i] == 1 for i in ids), receiver.seen
        assert receiver.errors == []
    finally:
        await receiver.stop()


async def test_a_database_rolled_back_under_the_node_is_treated_as_restored(
        cluster: Cluster) -> None:
    """A failover to a standby that had not received the last commits, as the node
    lives it: the server comes back holding fewer of the node's records than the node
    acknowledged. The node does not sign those seqs again (partners may hold them): it
    marks the database restored and refuses to publish until partners confirm."""
    server = PgServer().start()
    try:
        url = server.create_database("rollback")
        (node,) = cluster.create(["Jakarta"], settings={("storage", "url"): url})
        await cluster.start()
        assert (await node.publish("air", "AirQualityObserved", [_item(0)]))["first_seq"] == 1
        # A copy of the server as it is now (cold: stopped): the standby "behind".
        server.pause()
        behind = server.root / "behind"
        subprocess.run(["cp", "-a", str(server.data), str(behind)], check=True)
        server.resume()
        for i in (1, 2):  # acknowledged, then lost with the failover
            await asyncio.sleep(0.5)  # (the node's connections are back)
            deadline = time.monotonic() + 30
            while True:
                try:
                    out = await node.publish("air", "AirQualityObserved", [_item(i)])
                    break
                except PeerRejected as exc:
                    assert exc.status == 503 and time.monotonic() < deadline, exc
                    await asyncio.sleep(0.3)
            assert out["first_seq"] == i + 1
        server.pause()
        shutil.rmtree(server.data)
        behind.rename(server.data)
        server.resume()

        deadline = time.monotonic() + 30
        while True:
            try:
                await node.publish("air", "AirQualityObserved", [_item(9)])
                raise AssertionError("signed again on a database that lost seqs 2 and 3")
            except PeerRejected as exc:
                if exc.status == 409:
                    assert exc.reason == "publish_refused" and "restored" in str(exc), exc
                    break
                assert exc.status == 503 and time.monotonic() < deadline, exc
                await asyncio.sleep(0.3)
        assert node.proc is not None and node.proc.poll() is None
        with PgStorage.open_url(url) as st:
            assert st.head(parse_node_id(node.node_id), "air") is not None
            assert st.head(parse_node_id(node.node_id), "air")[0] == 1
            why = st.restored()
        assert why is not None and "lost records" in why, why
    finally:
        cluster.stop()
        server.stop()
