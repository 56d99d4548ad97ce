"""Federation with real ``citynode run`` processes over HTTPS on 127.0.0.1.

Every test ends by asserting exact final states: the same (seq, count) per (origin, feed)
on every node, the same record id at every seq 1..n on every node, and, once the nodes are
stopped, ``citynode check --json`` (every record re-verified, chains contiguous, the exact
number of records) and ``citynode forks --json`` (no equivocation proof) on each data dir.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from citynode.cli import main as cli_main
from citynode.cluster import Cluster, LocalNode, set_config
from citynode.core.keys import parse_node_id
from citynode.errors import PeerError, PeerRejected
from tests.conftest import InProc, eventually

pytestmark = pytest.mark.integration

FAST = {("federation", "pull_interval_seconds"): 1.0, ("federation", "backoff_max_seconds"): 2.0}
TYPE = "org.example.Test"
FeedKey = tuple[str, str]  # (origin node id, feed)
State = dict[FeedKey, tuple[int, int]]  # -> (head seq, count)


def rec(i: int) -> dict[str, Any]:
    return {"n": i, "station": "DKI1"}


async def held(n: LocalNode) -> dict[tuple[str, str], int]:
    return {(f["origin"], f["feed"]): f["seq"] for f in await n.feeds()}


async def state(n: LocalNode) -> State:
    """(seq, count) per (origin, feed) as ``/v1/feeds`` reports it."""
    return {(f["origin"], f["feed"]): (f["seq"], f["count"]) for f in await n.feeds()}


async def holdings(n: LocalNode) -> dict[FeedKey, list[tuple[int, str]]]:
    """Every record the node serves, as (seq, id) per (origin, feed), read page by page."""
    out: dict[FeedKey, list[tuple[int, str]]] = {}
    for origin, feed in await state(n):
        rows: list[tuple[int, str]] = []
        after = 0
        while True:
            page = await n.api(
                "GET", f"/v1/records?origin={origin}&feed={feed}&limit=1000&after={after}",
                operator=True,  # what the node holds, whatever the feed's access level
            )
            rows.extend((r["seq"], r["id"]) for r in page["records"])
            if page["next"] is None:
                break
            after = page["next"]
        out[(origin, feed)] = rows
    return out


def expected(counts: dict[FeedKey, int]) -> State:
    return {k: (v, v) for k, v in counts.items()}


async def converge(nodes: list[LocalNode], want: State, timeout: float = 30.0) -> None:
    """Wait until every node reports exactly ``want``; then check every node holds the
    same records (same id at every seq, seqs 1..n once each)."""

    async def done() -> bool:
        states = await asyncio.gather(*(state(n) for n in nodes))
        return all(s == want for s in states)

    try:
        await eventually(done, timeout=timeout, interval=0.2)
    except pytest.fail.Exception:
        states = {n.name: await state(n) for n in nodes}
        pytest.fail(f"nodes did not converge to {want} within {timeout} s: {states}")
    ref = await holdings(nodes[0])
    for key, (seq, _count) in want.items():
        assert [s for s, _ in ref[key]] == list(range(1, seq + 1)), (nodes[0].name, key)
    for n in nodes[1:]:
        assert await holdings(n) == ref, f"{n.name} holds other records than {nodes[0].name}"


def cli_json(*args: str) -> tuple[int, Any, str]:
    """Run a ``citynode`` command with ``--json`` (in this process: the same code as the
    command line, without the cost of starting Python once per data dir)."""
    r = CliRunner().invoke(cli_main, [*args, "--json"])
    try:
        out = json.loads(r.stdout)
    except ValueError:
        out = None
    return r.exit_code, out, r.output


async def stop_all(nodes: list[LocalNode]) -> None:
    """SIGTERM each node; each must exit cleanly."""
    for n in nodes:
        await n.close()
    rcs = await asyncio.gather(*(asyncio.to_thread(n.stop) for n in nodes))
    assert list(rcs) == [0] * len(nodes), dict(zip([n.name for n in nodes], rcs, strict=True))


async def verify_offline(dirs: dict[str, Path], records: int) -> None:
    """``citynode check`` finds exactly ``records`` records and no problem in each data dir,
    and ``citynode forks`` lists no fork proof."""

    def one(name: str, d: Path) -> None:
        rc, out, err = cli_json("check", "-d", str(d))
        assert rc == 0 and out is not None, f"check {name}: rc {rc}: {err}"
        assert out["ok"] and out["problems"] == [], f"check {name}: {out['problems']}"
        assert out["records"] == records, f"check {name}: {out['records']} != {records}"
        rc, out, err = cli_json("forks", "-d", str(d))
        assert rc == 0 and out == {"forks": []}, f"forks {name}: {err}"

    def all_dirs() -> None:
        for k, v in dirs.items():
            one(k, v)

    await asyncio.to_thread(all_dirs)


async def publish_raw(n: LocalNode, items: list[dict[str, Any]], feed: str = "test"
                      ) -> tuple[int, dict[str, Any]]:
    """POST /v1/publish; return (status, JSON answer) whatever the status."""
    s = await n.session()
    body = "\n".join(json.dumps(i) for i in items).encode() + b"\n"
    async with s.post(f"{n.url}/v1/publish?feed={feed}&type={TYPE}", data=body,
                      headers={"Authorization": f"Bearer {n.token}"}) as r:
        return r.status, json.loads(await r.read())


# ----------------------------------------------------------------------------- tests


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
    # B got A's records pushed (not only fetched), and says so by path.
    metrics = (await b.api("GET", "/metrics", raw=True)).decode()
    pushed = re.search(r'^citynode_records_received_total\{via="push"\} ([0-9.]+)$', metrics,
                       re.M)
    assert pushed is not None and float(pushed[1]) >= 10, metrics[:2000]


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
async def test_middle_node_sigkilled_while_both_ends_publish(
        cluster: Cluster, engine: str, request: pytest.FixtureRequest) -> None:
    """B, the second node of the line A-B-C-D, is SIGKILLed while A and D publish, then
    restarted: every node ends with every record, once, and `check` finds no problem.
    PostgreSQL leg: B (killed) and C keep their records in PostgreSQL, each its own
    database, A and D in SQLite: the two engines relay to each other."""
    nodes = cluster.create(["A", "B", "C", "D"], settings=FAST)
    a, b, c, d = nodes
    if engine == "postgresql":
        server = request.getfixturevalue("pg_server")
        for n in (b, c):
            set_config(n.dir / "node.toml", "storage", "url", server.create_database())
    await cluster.start()
    for x, y in [(a, b), (b, c), (c, d)]:
        await cluster.link(x, y)
    published = {a.name: 0, d.name: 0}
    restarted = asyncio.Event()

    async def publisher(n: LocalNode) -> None:
        # before, during and after B's crash: at least 3 batches after B is back
        after = 0
        while after < 3:
            i = published[n.name]
            out = await n.publish("test", TYPE, [rec(i + j) for j in range(5)])
            assert out["first_seq"] == i + 1
            published[n.name] += 5
            after += restarted.is_set()
            await asyncio.sleep(0.05)

    async def crash_b() -> None:
        await eventually(lambda: _some_reached(b, a, 10), timeout=20)
        b.kill()
        await asyncio.sleep(1.0)
        b.start()
        await b.wait_ready()
        restarted.set()

    await asyncio.gather(publisher(a), publisher(d), crash_b())
    na, nd = published[a.name], published[d.name]
    await converge(nodes, expected({(a.node_id, "test"): na, (d.node_id, "test"): nd}))
    await stop_all(nodes)
    await verify_offline({n.name: n.dir for n in nodes}, records=na + nd)


async def _some_reached(n: LocalNode, origin: LocalNode, seq: int) -> bool:
    return (await held(n)).get((origin.node_id, "test"), 0) >= seq


async def test_node_offline_during_1000_publishes_catches_up(cluster: Cluster) -> None:
    """B is stopped while A publishes 1,000 records in batches; after restart B holds
    exactly A's chain."""
    a, b = cluster.create(["A", "B"], settings=FAST)
    await cluster.start()
    await cluster.link(a, b)
    await a.publish("test", TYPE, [rec(0)])
    await eventually(lambda: _some_reached(b, a, 1), timeout=20)
    await stop_all([b])
    for batch in range(10):
        out = await a.publish("test", TYPE, [rec(1 + batch * 100 + j) for j in range(100)])
        assert (out["first_seq"], out["last_seq"]) == (2 + batch * 100, 101 + batch * 100)
    total = 1001
    assert await state(a) == expected({(a.node_id, "test"): total})
    b.start()
    await b.wait_ready()
    await converge([a, b], expected({(a.node_id, "test"): total}), timeout=40)
    await stop_all([a, b])
    await verify_offline({"A": a.dir, "B": b.dir}, records=total)


async def test_partition_heals_without_duplicates(cluster: Cluster) -> None:
    """{A,B} and {C,D} linked only by B-C: B and C drop each other, both sides publish,
    nothing crosses; once B-C is re-added both sides end identical, without duplicates."""
    nodes = cluster.create(["A", "B", "C", "D"], settings=FAST)
    a, b, c, d = nodes
    await cluster.start()
    for x, y in [(a, b), (b, c), (c, d)]:
        await cluster.link(x, y)
    await asyncio.gather(a.publish("test", TYPE, [rec(i) for i in range(3)]),
                         d.publish("test", TYPE, [rec(i) for i in range(3)]))
    await converge(nodes, expected({(a.node_id, "test"): 3, (d.node_id, "test"): 3}))

    # Partition: B and C forget each other (the only link between the groups).
    await asyncio.gather(b.api("DELETE", f"/v1/admin/partners/{c.node_id}"),
                         c.api("DELETE", f"/v1/admin/partners/{b.node_id}"))
    assert [p["node_id"] for p in (await b.api("GET", "/v1/admin/partners"))["partners"]] \
        == [a.node_id]
    assert [p["node_id"] for p in (await c.api("GET", "/v1/admin/partners"))["partners"]] \
        == [d.node_id]
    for n, k in [(a, 10), (b, 4), (c, 4), (d, 10)]:
        await n.publish("test", TYPE, [rec(100 + i) for i in range(k)])
    left = expected({(a.node_id, "test"): 13, (b.node_id, "test"): 4, (d.node_id, "test"): 3})
    right = expected({(a.node_id, "test"): 3, (c.node_id, "test"): 4, (d.node_id, "test"): 13})
    await converge([a, b], left)
    await converge([c, d], right)
    # Several pull intervals later nothing crossed the partition.
    await asyncio.sleep(2.5)
    for n, want in [(a, left), (b, left), (c, right), (d, right)]:
        assert await state(n) == want, f"{n.name} got records across the partition"

    # Heal.
    await cluster.link(b, c)
    full = expected({(a.node_id, "test"): 13, (b.node_id, "test"): 4,
                     (c.node_id, "test"): 4, (d.node_id, "test"): 13})
    await converge(nodes, full)
    await stop_all(nodes)
    await verify_offline({n.name: n.dir for n in nodes}, records=34)


# --------------------------------------------------------------------- own-feed safety


async def _restored_from_old_backup(a: LocalNode, b_has: Callable[[int], Awaitable[bool]],
                                    backup: Path) -> list[str]:
    """A publishes 5, is stopped and copied (the backup), publishes 5 more that reach B,
    is stopped and restored from the backup. Returns the ids of A's seqs 1..10."""
    first = await a.publish("test", TYPE, [rec(i) for i in range(1, 6)])
    assert first["first_seq"] == 1
    await eventually(lambda: b_has(5), timeout=20)
    await stop_all([a])
    shutil.copytree(a.dir, backup)
    a.start()
    await a.wait_ready()
    second = await a.publish("test", TYPE, [rec(i) for i in range(6, 11)])
    assert (second["first_seq"], second["last_seq"]) == (6, 10)
    await eventually(lambda: b_has(10), timeout=20)
    await stop_all([a])
    shutil.rmtree(a.dir)
    shutil.copytree(backup, a.dir)
    return list(first["ids"]) + list(second["ids"])


async def _publish_until_allowed(a: LocalNode, timeout: float = 20.0) -> dict[str, Any]:
    """Publish one record, retrying while refused by own-feed safety; return the answer.
    Every refusal must be a 409 ``publish_refused`` with a one-line explanation."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        status, out = await publish_raw(a, [rec(11)])
        if status == 200:
            return out
        assert status == 409 and out["error"] == "publish_refused", (status, out)
        assert "\n" not in out["message"] and "test" in out["message"], out
        assert loop.time() < deadline, f"A still refuses to publish after {timeout} s: {out}"
        await asyncio.sleep(0.1)


async def test_restored_node_refuses_to_publish_until_it_fetched_its_newer_records(
    cluster: Cluster, inproc: Callable[..., Awaitable[InProc]], tmp_path: Path
) -> None:
    """A restored from a backup at seq 5 learns from B that B holds A's records up to
    seq 10: it refuses to publish (409) until it has them back, then continues at 11."""
    (a,) = cluster.create(["A"], settings=FAST)
    await cluster.start()
    b = await inproc("B", settings=FAST)
    a_pk = parse_node_id(a.node_id)
    await a.api("POST", "/v1/admin/partners", json_body={"url": b.url, "id": b.node.node_id})
    await b.node.add_partner(a.url, a.node_id)

    async def b_has(seq: int) -> bool:
        h = b.node.heads.get((a_pk, "test"))
        return h is not None and h.seq == seq

    ids = await _restored_from_old_backup(a, b_has, tmp_path / "backup")

    # B answers A's sync at once but is slow to serve records: A then knows that B holds
    # its records up to seq 10 while A itself has only 5, and must not sign seq 6.
    gate = asyncio.Event()
    serve_fetch = b.node.reads.serve_fetch

    async def slow_serve_fetch(wants: Any, requester: bytes) -> list[bytes]:
        await gate.wait()
        return await serve_fetch(wants, requester)

    b.node.reads.serve_fetch = slow_serve_fetch  # type: ignore[method-assign]
    a.start()
    try:
        await a.wait_ready()

        async def blocked() -> bool:
            return "test" in (await a.api("GET", "/v1/admin/status"))["own_blocked"]

        await eventually(blocked, timeout=20)
        status, out = await publish_raw(a, [rec(11)])
        assert status == 409, f"restored A published while B holds its seqs 6-10: {out}"
        assert out["error"] == "publish_refused", out
        msg = out["message"]
        assert "\n" not in msg and "'test'" in msg and "seq 10" in msg and "B" in msg, msg
        assert await state(a) == expected({(a.node_id, "test"): 5})
    finally:
        gate.set()
    out = await _publish_until_allowed(a)
    assert out["first_seq"] == 11, f"A re-signed seq {out['first_seq']} (B holds 1-10)"
    ids.append(out["ids"][0])

    async def b_has_11() -> bool:
        return await b_has(11)

    await eventually(b_has_11, timeout=20)
    got = await holdings(a)
    assert got == {(a.node_id, "test"): list(enumerate(ids, start=1))}, \
        "A's chain differs from what it signed before the restore"
    assert b.node.storage.fork_proofs() == []
    await stop_all([a])
    await verify_offline({"A": a.dir}, records=11)


async def test_restored_node_does_not_publish_before_its_first_sync(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Right after a restore, A cannot know whether a partner holds newer records of
    its own feeds until it has synced with it once: it must not sign meanwhile."""
    a, b = cluster.create(["A", "B"], settings=FAST)
    await cluster.start()
    await cluster.link(a, b)

    async def b_has(seq: int) -> bool:
        return (await held(b)).get((a.node_id, "test")) == seq

    ids = await _restored_from_old_backup(a, b_has, tmp_path / "backup")
    # B is frozen (unreachable) while the restored A starts; it is thawed once A has
    # answered a publish request, or 3 s after it was sent.
    assert b.proc is not None
    b.proc.send_signal(signal.SIGSTOP)
    try:
        a.start()
        await _wait_serving(a)
        first = asyncio.create_task(publish_raw(a, [rec(11)]))
        await asyncio.wait({first}, timeout=3.0)
    finally:
        b.proc.send_signal(signal.SIGCONT)
    status, out = await first
    assert status == 409 or (status == 200 and out["first_seq"] == 11), (
        f"restored A signed seq {out.get('first_seq')} before it synced once with its "
        f"partner B, which holds A's seqs 1-10: a fork (answer {status} {out})"
    )
    if status == 409:
        assert out["error"] == "publish_refused" and "\n" not in out["message"], out
        out = await _publish_until_allowed(a)
    assert out["first_seq"] == 11
    ids.append(out["ids"][0])
    await converge([a, b], expected({(a.node_id, "test"): 11}))
    assert await holdings(a) == {(a.node_id, "test"): list(enumerate(ids, start=1))}
    await stop_all([a, b])
    await verify_offline({"A": a.dir, "B": b.dir}, records=11)


async def _wait_serving(n: LocalNode, timeout: float = 30.0) -> None:
    """Wait until the node's process answers /healthz (ready or not)."""

    async def serving() -> bool:
        assert n.proc is not None and n.proc.poll() is None, n.tail_log()
        try:
            await n.api("GET", "/healthz", operator=False)
        except (PeerError, PeerRejected):
            return False
        return True

    await eventually(serving, timeout=timeout)


async def test_a_new_feed_crosses_relays_without_waiting_for_pulls(cluster: Cluster) -> None:
    """Relays hold records of a feed their origin's card does not list yet (unknown is
    never public). Learning the card that lists it must send them on at once, not one
    hop per pull interval (60 s here: three hops would take minutes)."""
    slow = {("federation", "pull_interval_seconds"): 60.0,
            ("federation", "backoff_max_seconds"): 2.0}
    a, b, c, d = cluster.create(["A", "B", "C", "D"], settings=slow)
    await cluster.start()
    for x, y in [(a, b), (b, c), (c, d)]:
        await cluster.link(x, y)
    await a.publish("warm", TYPE, [rec(0)])  # every node learns A's first card

    async def d_holds(feed: str, n: int) -> bool:
        return (await held(d)).get((a.node_id, feed)) == n

    await eventually(lambda: d_holds("warm", 1), timeout=120)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await a.publish("brand-new", TYPE, [rec(i) for i in range(3)])
    await eventually(lambda: d_holds("brand-new", 3), timeout=30)
    assert loop.time() - t0 < 30  # three hops at one pull each would be 120 s or more
    await stop_all([a, b, c, d])
    await verify_offline({n.name: n.dir for n in (a, b, c, d)}, 4)


async def test_a_checkpoint_signed_while_a_partner_was_down_still_reaches_it(
        cluster: Cluster) -> None:
    """Checkpoints travel by push. One signed while the partner was down reaches it
    after it comes back (resent after the next good round), and so does the latest one
    after the origin itself restarts (the resend queue does not outlive a process)."""
    settings = {**FAST, ("checkpoints", "interval_seconds"): 1.0}
    a, b = cluster.create(["Lima", "Quito"], settings=settings)
    await cluster.start()
    await cluster.link(a, b)

    async def sizes(n: LocalNode) -> list[int]:
        try:
            out = await n.api("GET", f"/v1/checkpoints?origin={a.node_id}&feed=air")
        except PeerRejected:
            return []
        return [c["size"] for c in out["checkpoints"]]

    async def b_holds(size: int) -> bool:
        return size in await sizes(b)

    await a.publish("air", TYPE, [rec(1)])
    await eventually(lambda: b_holds(1), timeout=30)
    await b.close()
    b.stop()
    await a.publish("air", TYPE, [rec(2), rec(3)])

    async def a_signed(size: int) -> bool:
        return size in await sizes(a)

    await eventually(lambda: a_signed(3), timeout=30)
    await cluster.start([b])
    await eventually(lambda: b_holds(3), timeout=30)

    # Both down; the origin signs while its partner is away, then restarts first.
    await b.close()
    b.stop()
    await a.publish("air", TYPE, [rec(4)])
    await eventually(lambda: a_signed(4), timeout=30)
    await a.close()
    a.stop()
    await cluster.start([a])
    await cluster.start([b])
    await eventually(lambda: b_holds(4), timeout=30)


async def test_a_new_partner_gets_the_checkpoints_its_relay_already_held(
        cluster: Cluster) -> None:
    """A relay that holds an origin's checkpoint when a new partner joins it sends that
    partner the latest one held, though the origin signs nothing new (a feed that has
    stopped growing would otherwise never be provable there)."""
    settings = {**FAST, ("checkpoints", "interval_seconds"): 1.0}
    a, b, c = cluster.create(["Lima", "Quito", "Bogota"], settings=settings)
    await cluster.start()
    await cluster.link(a, b)
    await a.publish("air", TYPE, [rec(1), rec(2)])

    async def holds_cp(n: LocalNode) -> bool:
        try:
            out = await n.api("GET", f"/v1/checkpoints?origin={a.node_id}&feed=air")
        except PeerRejected:
            return False
        return 2 in [cp["size"] for cp in out["checkpoints"]]

    await eventually(lambda: holds_cp(b), timeout=30)
    await cluster.link(b, c)  # Bogota joins Quito after the checkpoint was signed
    await eventually(lambda: holds_cp(c), timeout=30)


async def test_a_restarted_relay_serves_an_origin_that_is_down(cluster: Cluster) -> None:
    """Serving a city's data while that city is offline is what relays are for. B holds
    A's records of a feed A's card did not list when B added A (it learned the newer card
    since). A goes down, B restarts: B must still know A's newer card (stored, not only
    the one pinned when the partner was added), so it lists A's records and C, a partner
    of B only, gets every one of them from B."""
    a, b, c = cluster.create(["A", "B", "C"], settings=FAST)
    await cluster.start()
    await cluster.link(a, b)
    await a.publish("late", TYPE, [rec(i) for i in range(10)])  # not in A's first card

    async def b_lists_late() -> bool:
        # Anyone may read a public feed's records: B lists them once it holds them AND
        # has learned A's newer card, which says the feed is public.
        out = await b.api("GET", "/v1/records?feed=late&limit=100", operator=False)
        return len(out["records"]) == 10

    await eventually(b_lists_late, timeout=60)
    await a.close()
    assert await asyncio.to_thread(a.stop) == 0
    await b.close()
    assert await asyncio.to_thread(b.stop) == 0
    b.start()
    await b.wait_ready()
    anyone = await b.api("GET", "/v1/records?feed=late&limit=100", operator=False)
    assert len(anyone["records"]) == 10  # a public feed, listed to anyone again
    await cluster.link(b, c)
    await eventually(lambda: _holds(c, a, "late", 10), timeout=30)
    await stop_all([b, c])
    await verify_offline({n.name: n.dir for n in (b, c)}, 10)


async def _holds(n: LocalNode, origin: LocalNode, feed: str, seq: int) -> bool:
    return (await held(n)).get((origin.node_id, feed)) == seq
