"""``citynode backup`` of a running node, then ``citynode restore`` of that (by then
stale) backup, with real ``citynode run`` processes over HTTPS on 127.0.0.1.

A publishes 20 records (its partner B holds them), is backed up while it runs, publishes
10 more (B holds 30), stops, and is restored from the stale backup. The restored A must
never sign a seq B already holds: with B up, publishing is refused until B confirms A's
heads, then goes on after B's head; with B down, publishing is refused for as long as B
is down. No fork proof anywhere at the end. Then a backup with secrets is restored into
an empty directory "on a new machine": the same node, which goes on the same way.

With two partners (city A with partners B and C, which are not each other's): a restore
with every partner down refuses to sign until EVERY partner has confirmed A's heads (B
coming back, behind C, is not enough); a restore with both partners up waits for both,
then signs after their heads; and the operator's explicit ``--accept-fork-risk`` lets a
restored A sign with every partner down.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from citynode.cluster import Cluster, LocalNode
from citynode.errors import PeerError, PeerRejected
from tests.conftest import eventually

pytestmark = pytest.mark.integration

FAST = {("federation", "pull_interval_seconds"): 1.0, ("federation", "backoff_max_seconds"): 2.0}
FEED, TYPE = "air", "org.example.Test"
PASSPHRASE = "a passphrase for the test"


def citynode(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "citynode", *args], capture_output=True,
                       text=True, timeout=300, env={**os.environ, **(env or {})})
    assert r.returncode == 0, f"citynode {' '.join(args)}: {r.stderr}"
    assert "Traceback" not in r.stderr
    return r


async def head_at(n: LocalNode, origin: LocalNode) -> int:
    for f in await n.feeds():
        if f["origin"] == origin.node_id and f["feed"] == FEED:
            return int(f["seq"])
    return 0


async def holds(n: LocalNode, origin: LocalNode, seq: int) -> None:
    async def check() -> bool:
        try:
            return await head_at(n, origin) >= seq
        except PeerError:
            return False

    await eventually(check, timeout=60)


async def refused(a: LocalNode) -> PeerRejected:
    """Publishing at ``a`` is refused as a restored node's is; returns the refusal."""
    with pytest.raises(PeerRejected) as e:
        await a.publish(FEED, TYPE, [{"n": -1}])
    assert e.value.status == 409 and e.value.reason == "publish_refused", e.value
    return e.value


async def next_publish(a: LocalNode, timeout: float = 60) -> dict[str, Any]:
    """Publish one record as soon as ``a`` signs again; its answer."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await a.publish(FEED, TYPE, [{"n": 999}])
        except PeerRejected as exc:
            assert exc.status == 409 and exc.reason == "publish_refused", exc
            if time.monotonic() > deadline:
                pytest.fail(f"publishing still refused after {timeout} s: {exc}")
        await asyncio.sleep(0.2)


async def stop(*nodes: LocalNode) -> None:
    for n in nodes:
        await n.close()
        n.stop()


async def restore_and_start(a: LocalNode, backup: Path, *run_args: str) -> None:
    """Restore ``a`` (stopped) from ``backup`` over its data dir, and start it."""
    citynode("restore", "-d", str(a.dir), "--replace", str(backup))
    a.start(*run_args)
    await a.wait_ready()


async def refused_for(a: LocalNode, seconds: float, says: str) -> None:
    """Publishing at ``a`` is refused, with ``says`` in the refusal, every half second
    for ``seconds`` (several of its sync intervals)."""
    end = time.monotonic() + seconds
    tries = 0
    while time.monotonic() < end:
        err = await refused(a)
        assert says in err.detail, err.detail
        tries += 1
        await asyncio.sleep(0.5)
    assert tries >= seconds  # not one slow refusal


async def awaiting(a: LocalNode) -> list[str]:
    """The partners a restored ``a`` still waits for ([] once it signs again)."""
    status = await a.api("GET", "/v1/admin/status")
    return sorted(status["restored_awaiting"]) if status["restored_unconfirmed"] else []


def no_forks(n: LocalNode) -> None:
    out = json.loads(citynode("forks", "-d", str(n.dir), "--json").stdout)
    assert out == {"forks": []}, (n.name, out)


async def test_restore_a_stale_backup_with_the_partner_up_then_down(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    a, b = c.create(["A", "B"], settings=FAST)
    stale = tmp_path / "a-stale.cnbackup"
    try:
        await c.start()
        await c.link(a, b)
        out = await a.publish(FEED, TYPE, [{"n": i} for i in range(20)])
        assert out["last_seq"] == 20
        await holds(b, a, 20)
        made = citynode("backup", "-d", str(a.dir), str(stale))  # A is running
        assert "20 records" in made.stdout
        out = await a.publish(FEED, TYPE, [{"n": 20 + i} for i in range(10)])
        assert out["last_seq"] == 30
        await holds(b, a, 30)
        await a.close()
        a.stop()

        # (1) The partner is up: nothing is signed until B confirms A's heads (B's
        # first sync round, often done before the first publish arrives), then seq 31.
        r = citynode("restore", "-d", str(a.dir), "--replace", str(stale))
        assert "--accept-fork-risk" in r.stdout and "replaced-" in r.stdout
        a.start()
        await a.wait_ready()
        got = await next_publish(a)
        assert got["first_seq"] == 31
        log = (a.dir / "node.log").read_text()  # a new file: the old one was moved aside
        marked = log.index("database restored: own feeds wait for every partner")
        assert str(stale) in log[marked:]
        assert marked < log.index("every partner confirmed this restored node's heads")
        await holds(b, a, 31)
        await a.close()
        a.stop()

        # (2) The partner is down: refused for as long as it is down.
        await stop(b)
        await restore_and_start(a, stale)
        await refused_for(a, 8, "restored")
        status = await a.api("GET", "/v1/admin/status")
        assert status.get("restored_unconfirmed") is True, status
        assert await head_at(a, a) == 20  # nothing signed meanwhile
        b.start()
        await b.wait_ready()
        got = await next_publish(a)
        assert got["first_seq"] == 32  # after B's 31: nothing B held was signed again
        await holds(b, a, 32)
    finally:
        await c.close()
        c.stop()
    no_forks(a)
    no_forks(b)


async def test_backup_with_secrets_restored_on_a_new_machine(tmp_path: Path) -> None:
    c = Cluster(tmp_path / "old")
    a, b = c.create(["A", "B"], settings=FAST)
    file = tmp_path / "a.cnbackup"
    moved: LocalNode | None = None
    env = {"CITYNODE_BACKUP_PASSPHRASE": PASSPHRASE}
    try:
        await c.start()
        await c.link(a, b)
        await a.publish(FEED, TYPE, [{"n": i} for i in range(5)])
        await holds(b, a, 5)
        r = citynode("backup", "-d", str(a.dir), "--with-secrets", str(file), env=env)
        assert "secrets sealed" in r.stdout
        await a.close()
        a.stop()
        new = tmp_path / "new-machine" / "a"  # not there yet: restore makes it
        citynode("restore", "-d", str(new), str(file), env=env)
        assert citynode("id", "-d", str(new)).stdout.strip() == a.node_id
        moved = LocalNode("A on the new machine", new, a.port, a.node_id, a.token,
                          a.fingerprint)
        moved.start()
        await moved.wait_ready()
        got = await next_publish(moved)
        assert got["first_seq"] == 6
        await holds(b, moved, 6)
    finally:
        if moved is not None:
            await moved.close()
            moved.stop()
        await c.close()
        c.stop()
    assert moved is not None
    no_forks(moved)
    no_forks(b)


async def test_restore_with_two_partners_down_then_up(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    a, b, cc = c.create(["A", "B", "C"], settings=FAST)
    stale = tmp_path / "a-stale.cnbackup"
    fresh = tmp_path / "a-fresh.cnbackup"
    try:
        await c.start()
        await c.link(a, b)
        await c.link(a, cc)
        await a.publish(FEED, TYPE, [{"n": i} for i in range(20)])
        await holds(b, a, 20)
        await holds(cc, a, 20)
        citynode("backup", "-d", str(a.dir), str(stale))
        # B goes down; A signs 21..30, which only C holds: B is now behind C.
        await b.close()
        b.stop()
        out = await a.publish(FEED, TYPE, [{"n": 20 + i} for i in range(10)])
        assert out["last_seq"] == 30
        await holds(cc, a, 30)
        await stop(a, cc)

        # (1) Every partner down: A, restored from the stale backup (head 20), signs
        # nothing however long it waits.
        await restore_and_start(a, stale)
        await refused_for(a, 6, "still waiting for")
        assert await awaiting(a) == ["B", "C"]
        ready = await a.api("GET", "/readyz")
        assert ready["own_publishing"] is False
        assert sorted(ready["restored_awaiting"]) == ["B", "C"]
        # B comes back: it confirms what it holds (seq 20), but C, still down, holds
        # 21..30: A goes on refusing, now waiting for C alone.
        b.start()
        await b.wait_ready()

        async def b_confirmed() -> bool:
            return await awaiting(a) == ["C"]

        await eventually(b_confirmed, timeout=60)
        await refused_for(a, 2, "still waiting for C")
        assert await head_at(a, a) == 20  # nothing signed, nothing to fetch from B
        # C comes back: A fetches 21..30 from it, and only then signs, at 31.
        cc.start()
        await cc.wait_ready()
        got = await next_publish(a)
        assert got["first_seq"] == 31
        assert await awaiting(a) == []
        log = (a.dir / "node.log").read_text()
        marked = log.index("database restored: own feeds wait for every partner")
        assert marked < log.index("every partner confirmed this restored node's heads")
        await holds(b, a, 31)  # B caught up through A, with no fork
        await holds(cc, a, 31)
        await stop(a)

        # (2) Both partners up (both hold 31): A restored from the same stale backup
        # waits for both, fetches 21..31, then signs at 32.
        await restore_and_start(a, stale)
        got = await next_publish(a)
        assert got["first_seq"] == 32
        log = (a.dir / "node.log").read_text()
        marked = log.index("database restored: own feeds wait for every partner")
        assert marked < log.index("every partner confirmed this restored node's heads")
        await holds(b, a, 32)
        await holds(cc, a, 32)

        # (3) The operator's explicit risk: a backup as new as anything partners hold
        # (seq 32), restored with every partner down. Refused without the flag ...
        citynode("backup", "-d", str(a.dir), str(fresh))
        await stop(a, b, cc)
        await restore_and_start(a, fresh)
        await refused(a)
        await stop(a)
        # ... signed at once with it (partners still down), the choice logged.
        await restore_and_start(a, fresh, "--accept-fork-risk")
        got = await a.publish(FEED, TYPE, [{"n": 1000}])
        assert got["first_seq"] == 33
        assert "--accept-fork-risk given" in (a.dir / "node.log").read_text()
        assert await awaiting(a) == []
        for n in (b, cc):
            n.start()
        for n in (b, cc):
            await n.wait_ready()
        await holds(b, a, 33)
        await holds(cc, a, 33)
    finally:
        await c.close()
        c.stop()
    for n in (a, b, cc):
        no_forks(n)


def query(n: LocalNode, sql: str) -> list[Any]:
    """Rows of ``sql`` on ``n``'s database (read beside the running node)."""
    import sqlite3

    db = sqlite3.connect(f"file:{n.dir / 'citynode.db'}?mode=ro", uri=True, timeout=10)
    try:
        return list(db.execute(sql))
    finally:
        db.close()


def proof_counts(n: LocalNode) -> dict[str, int]:
    """Fork and split-view proofs held by ``n``, by kind."""
    return dict(query(n, "SELECT kind, count(*) FROM fork_proofs GROUP BY kind"))


async def own_statement_time(a: LocalNode) -> int:
    """When ``a`` signed its newest checkpoint or heartbeat of its own feed FEED."""
    out = await a.api("GET", "/v1/liveness")
    [t] = [f["signed_time"] for f in out["feeds"]
           if f["origin"] == a.node_id and f["feed"] == FEED]
    return int(t)


async def test_a_fork_forced_with_accept_fork_risk_is_proven_once_not_again_and_again(
        tmp_path: Path) -> None:
    """The operator's explicit risk taken wrongly: A, restored from a stale backup and
    run with --accept-fork-risk, re-signs seqs B holds. B proves the fork (and the split
    view of A's checkpoints) and tells A, which then signs nothing more on that feed,
    not even heartbeats (its feed has a cadence of 2 s: one every second): the proofs
    held stop growing (they grew by one split view per heartbeat, without end)."""
    c = Cluster(tmp_path)
    a, b = c.create(["A", "B"], settings=FAST)
    with (a.dir / "node.toml").open("a") as f:
        f.write(f"\n[feeds.{FEED}]\ncadence_seconds = 2\n")
    stale = tmp_path / "a-stale.cnbackup"
    try:
        await c.start()
        await c.link(a, b)
        await a.publish(FEED, TYPE, [{"n": i} for i in range(2)])
        await holds(b, a, 2)
        citynode("backup", "-d", str(a.dir), str(stale))
        await a.publish(FEED, TYPE, [{"n": 2 + i} for i in range(2)])
        await holds(b, a, 4)
        await asyncio.sleep(2.5)  # B holds A's checkpoint (and heartbeats) of size 4
        await stop(a, b)
        await restore_and_start(a, stale, "--accept-fork-risk")
        got = await a.publish(FEED, TYPE, [{"n": 100 + i} for i in range(2)])
        assert (got["first_seq"], got["last_seq"]) == (3, 4)
        b.start()
        await b.wait_ready()

        async def a_knows() -> bool:
            ready = await a.api("GET", "/readyz")
            return bool(ready.get("own_forked"))

        await eventually(a_knows, timeout=60)
        ready = await a.api("GET", "/readyz")
        assert ready["own_forked"] == [FEED] and ready["own_publishing"] is False
        assert proof_counts(b)
        await asyncio.sleep(3)  # what was in flight lands
        before = proof_counts(b), proof_counts(a)
        signed = await own_statement_time(a)
        await asyncio.sleep(8)  # eight heartbeats' worth
        assert await own_statement_time(a) == signed  # A signed none
        assert (proof_counts(b), proof_counts(a)) == before
        # At most one proof of each kind per seq (size) of the one feed.
        assert all(n <= 4 for n in before[0].values()), before
    finally:
        await c.close()
        c.stop()


def _citynode_fails(*args: str, env: dict[str, str] | None = None) -> str:
    """``citynode ARGS`` exits 1 with one error line: that line."""
    r = subprocess.run([sys.executable, "-m", "citynode", *args], capture_output=True,
                       text=True, timeout=300, env={**os.environ, **(env or {})})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    return r.stderr.strip()


async def test_a_backup_from_before_rotations_takes_the_newer_log_or_stops_signing(
        tmp_path: Path) -> None:
    """A backup taken before a rotation, restored: the node takes its newer key log
    from its partner and signs with the key in force (node.next.key of the backup),
    and refuses to rotate (the next key it commits to is not in the backup). From a
    backup older than two rotations the key in force is not held: nothing is signed,
    and the refusal says what to do; `key rotate` refuses too instead of signing a
    second event at one seq (a key fork) (S6)."""
    c = Cluster(tmp_path / "c")
    a, b = c.create(["A", "B"], settings=FAST)
    env = {"CITYNODE_BACKUP_PASSPHRASE": PASSPHRASE}
    one, two = tmp_path / "one.cnbackup", tmp_path / "two.cnbackup"
    try:
        await c.start()
        await c.link(a, b)
        await a.publish(FEED, TYPE, [{"n": i} for i in range(3)])
        await holds(b, a, 3)
        citynode("backup", "-d", str(a.dir), "--with-secrets", str(two), env=env)
        npw = {"CITYNODE_NEXT_KEY_PASSPHRASE": a.recovery_passphrase}
        citynode("key", "rotate", "-d", str(a.dir), env=npw)
        citynode("backup", "-d", str(a.dir), "--with-secrets", str(one), env=env)
        citynode("key", "rotate", "-d", str(a.dir), env=npw)
        await a.publish(FEED, TYPE, [{"n": 3}])
        await holds(b, a, 4)
        # Two rotations since backup `two`: the key in force is not in it.
        await stop(a)
        citynode("restore", "-d", str(a.dir), "--replace", str(two), env=env)
        a.start()
        await a.wait_ready()

        async def says_what_to_do() -> bool:
            with pytest.raises(PeerRejected) as e:
                await a.publish(FEED, TYPE, [{"n": -1}])
            return "key recover" in e.value.detail and "seq 2" in e.value.detail

        await eventually(says_what_to_do, timeout=30)
        line = _citynode_fails("key", "rotate", "-d", str(a.dir), env=npw)
        assert "key recover" in line, line
        # One rotation since backup `one`: its node.next.key is the key in force.
        await stop(a)
        citynode("restore", "-d", str(a.dir), "--replace", str(one), env=env)
        a.start()
        await a.wait_ready()
        await eventually(says_what_to_do, timeout=30)
        # Its next key (sealed with its own passphrase, which the node does not hold)
        # is the key in force: `key rotate` takes the newer log instead of rotating.
        r = citynode("key", "rotate", "-d", str(a.dir), env=npw)
        assert "took the newer key log" in r.stdout, r.stdout
        got = await next_publish(a)
        assert got["first_seq"] == 5
        await holds(b, a, 5)  # B takes it: signed by the key in force
        line = _citynode_fails("key", "rotate", "-d", str(a.dir), env=npw)
        assert "key recover" in line, line
    finally:
        await c.close()
        c.stop()
    no_forks(b)
