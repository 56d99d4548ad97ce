"""Identity that outlives its keys, with real ``citynode run`` processes over HTTPS
(issue 12, point 8): a node rotates while publishing and its partners follow with no
re-pinning; a stolen key's forgeries are refused everywhere once the owner recovers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from citynode.cli import main as cli_main
from citynode.cluster import Cluster, LocalNode
from citynode.core import keylog
from citynode.core.keys import Verifier
from citynode.errors import PeerRejected
from tests.conftest import eventually
from tests.integration.test_federation import FAST, TYPE, converge, expected, rec, stop_all

pytestmark = pytest.mark.integration



def recover_env(b: LocalNode) -> dict[str, str]:
    """The passphrases a one-step `key recover` reads: the recovery file's, and one for
    the new next key (its own, not the recovery passphrase)."""
    return {"CITYNODE_RECOVERY_PASSPHRASE": b.recovery_passphrase,
            "CITYNODE_NEXT_KEY_PASSPHRASE": "next-key-after-recovery"}

def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    r = CliRunner().invoke(cli_main, list(args), env=env)
    return r.exit_code, r.output


async def partner_ids(n: LocalNode) -> list[str]:
    return sorted(p["node_id"] for p in (await n.api("GET", "/v1/admin/partners"))["partners"])


async def key_log_at(n: LocalNode, origin: str) -> keylog.KeyState | None:
    s = await n.session()
    async with s.get(f"{n.url}/v1/keylog?origin={origin}") as r:
        if r.status == 404:
            return None
        assert r.status == 200, await r.text()
        return keylog.verify_log(origin, await r.read(), verifier=Verifier())


async def test_middle_city_rotates_while_publishing_and_nobody_repins(
        cluster: Cluster) -> None:
    """B, in the middle of the line A-B-C, rotates while publishing; then A, at the end,
    rotates too, so its new key log reaches C only through B (two hops). Everyone
    follows, nobody re-pins, and no partner counts any input as invalid meanwhile."""
    a, b, c = cluster.create(["A", "B", "C"], settings=FAST)
    await cluster.start()
    for x, y in [(a, b), (b, c)]:
        await cluster.link(x, y)
    assert b.node_id.startswith("cn2")
    pins = {n.name: await partner_ids(n) for n in (a, c)}
    published = [0]
    rotated = asyncio.Event()

    async def publisher() -> None:
        after = 0
        while after < 4:
            i = published[0]
            out = await b.publish("test", TYPE, [rec(i + j) for j in range(5)])
            assert out["first_seq"] == i + 1
            published[0] += 5
            after += rotated.is_set()
            await asyncio.sleep(0.05)

    async def rotate() -> None:
        await eventually(lambda: _reached(c, b, 10), timeout=30)
        rc, out = await asyncio.to_thread(
            cli, "key", "rotate", "-d", str(b.dir),
            env={"CITYNODE_NEXT_KEY_PASSPHRASE": b.recovery_passphrase})
        assert rc == 0, out
        assert f"rotated: {b.node_id}" in out
        rotated.set()

    await asyncio.gather(publisher(), rotate())
    n = published[0]
    await converge([a, b, c], expected({(b.node_id, "test"): n}), timeout=60)
    # The far end holds B's new log (one rotation), and its records under both keys.
    for other in (a, c):
        st = await key_log_at(other, b.node_id)
        assert st is not None and st.seq == 1 and len(st.keys) == 2
    # Nobody re-pinned: the partner lists hold the same ids.
    for x in (a, c):
        assert await partner_ids(x) == pins[x.name]
    # Records both before and after the rotation verify at C under the key valid for them.
    page = await c.api("GET", f"/v1/records?origin={b.node_id}&feed=test&limit=1000",
                       operator=True)
    assert [r["seq"] for r in page["records"]] == list(range(1, n + 1))
    # The end city rotates between two publishes: C, two hops away, takes A's new log
    # (through B) and A's records under both keys.
    await a.publish("test", TYPE, [rec(i) for i in range(3)])
    rc, out = await asyncio.to_thread(
        cli, "key", "rotate", "-d", str(a.dir),
        env={"CITYNODE_NEXT_KEY_PASSPHRASE": a.recovery_passphrase})
    assert rc == 0, out
    await a.publish("test", TYPE, [rec(i) for i in range(3, 6)])
    await converge([a, b, c], expected({(b.node_id, "test"): n, (a.node_id, "test"): 6}),
                   timeout=60)
    st = await key_log_at(c, a.node_id)
    assert st is not None and st.seq == 1 and len(st.keys) == 2
    assert await partner_ids(c) == pins["C"]
    # No partner counted anything as invalid through both switches.
    for x, y in [(a, b), (b, a), (b, c), (c, b)]:
        assert await _invalid_on(x, y) == {}, (x.name, y.name)
    await stop_all([a, b, c])
    for x in (a, b, c):
        rc, out = await asyncio.to_thread(cli, "check", "-d", str(x.dir))
        assert rc == 0, out


async def _invalid_on(n: LocalNode, partner: LocalNode) -> dict[str, int]:
    """What ``n`` counts as invalid input from ``partner``, by reason."""
    rows = (await n.api("GET", "/v1/admin/partners"))["partners"]
    return dict(next(p["invalid"] for p in rows if p["node_id"] == partner.node_id))


async def _reached(n: LocalNode, origin: LocalNode, seq: int) -> bool:
    for f in await n.feeds():
        if f["origin"] == origin.node_id and f["feed"] == "test":
            return int(f["seq"]) >= seq
    return False


def _sign_forgeries(key: Any, head: dict[str, Any], n: int, time_ms: int) -> list[bytes]:
    """A thief holding a copy of a node's key signs ``n`` records after ``head`` (seq,
    id hex), dated ``time_ms`` and earlier (before the honest ones)."""
    from citynode.core.records import sign_record

    out, prev, seq = [], bytes.fromhex(head["id"]) or None, int(head["seq"])
    for i in range(n):
        seq += 1
        r = sign_record(key, feed="test", seq=seq, prev=prev, time_ms=time_ms - i,
                        type=TYPE, data={"n": -seq, "station": "FORGED"})
        out.append(r.envelope)
        prev = r.id
    return out


async def _post_forged_checkpoint(thief: Any, to: LocalNode, honest: list[dict[str, Any]],
                                  forged: list[bytes]) -> None:
    """The thief signs, now, a checkpoint of the honest records then the forged ones
    and posts it to ``to``, signing the request as their origin."""
    import time

    from citynode.core.checkpoints import root_of, sign_checkpoint
    from citynode.core.records import decode_record, record_id
    from citynode.transport.client import PeerClient

    ids = [bytes.fromhex(r["id"]) for r in honest] + [
        record_id(decode_record(e)[0]) for e in forged]
    cp = sign_checkpoint(thief, "test", len(ids), root_of(ids), int(time.time() * 1000))
    client = PeerClient(thief, to.url, node_id=to.node_id, fingerprint=to.fingerprint)
    try:
        await client.request("POST", "/v1/checkpoints", cp.envelope)
    finally:
        await client.close()


async def test_stolen_key_forgeries_are_refused_everywhere_after_recovery(
        cluster: Cluster, tmp_path: Path) -> None:
    """B's key is stolen; the thief pushes forgeries to C (later seqs, earlier times)
    and C takes them (the key is B's key in force), and relays them to A. B, which was
    never restored, refuses them (own_forgery), says its key may be stolen and stays at
    its own head (review M3). B recovers with its recovery file, naming seq 6 as last
    good: every node drops the forgeries and refuses them when pushed again, by the
    thief or relayed by honest C, an audit of a bundle taken before the recovery flags
    them (given the log after it) and nothing else, and B publishes on from seq 7
    under its new key."""

    from citynode.core.keys import NodeKey, parse_node_id, unseal_secret_key
    from citynode.transport.client import PeerClient

    a, b, c = cluster.create(["A", "B", "C"], settings={
        **FAST, ("checkpoints", "interval_seconds"): 1.0})
    await cluster.start()
    for x, y in [(a, b), (b, c), (a, c)]:
        await cluster.link(x, y)
    await b.publish("test", TYPE, [rec(i) for i in range(6)])
    await converge([a, b, c], expected({(b.node_id, "test"): 6}), timeout=60)
    page = await c.api("GET", f"/v1/records?origin={b.node_id}&feed=test&limit=1000",
                       operator=True)
    last = page["records"][-1]
    assert last["seq"] == 6
    # The thief copies B's node.key and pushes to C, signing requests as B.
    seed = unseal_secret_key((b.dir / "node.key").read_bytes(), None)
    log_before = (b.dir / "keylog").read_bytes()
    thief = NodeKey(seed, parse_node_id(b.node_id), b.node_id, log_before)
    forged = _sign_forgeries(thief, last, 3, int(last["time"]) - 3_600_000)
    client = PeerClient(thief, c.url, node_id=c.node_id, fingerprint=c.fingerprint)
    try:
        out = await client.push(forged)
    finally:
        await client.close()
    assert out["accepted"] == 3, out  # the key is B's key in force: C cannot tell yet
    await eventually(lambda: _reached(c, b, 9), timeout=10)
    await eventually(lambda: _reached(a, b, 9), timeout=30)  # C relayed them to A
    # B never signed them and was not restored: it refuses them (from A, which C relayed
    # them to, or fetched from C as evidence of C's claim), keeps its own head, and
    # says what to do; its status and metrics show it.
    async def b_saw_forgeries() -> bool:
        status = await b.api("GET", "/v1/admin/status")
        return status["own_forgeries"].get("test", {}).get("seq") == 9

    await eventually(b_saw_forgeries, timeout=30)
    status = await b.api("GET", "/v1/admin/status")
    assert "citynode key recover" in status["own_forgeries"]["test"]["do"]
    assert status["own_blocked"] == {} and await _at(b, b, 6)
    refused = {p["name"]: p["invalid"].get("own_forgery", 0)
               for p in (await b.api("GET", "/v1/admin/partners"))["partners"]}
    assert sum(refused.values()) >= 1, refused
    assert "citynode_own_forgeries 1.0" in (await b.api("GET", "/metrics", raw=True)).decode()
    assert "records signed with this node's key beyond what it holds" in b.tail_log(200)
    # ... and a checkpoint of the nine, signed now: C takes it as B's newest liveness
    # statement (an honest one of fewer records would then be "smaller").
    await _post_forged_checkpoint(thief, c, page["records"], forged)
    assert await _signed_size(c, b) == 9
    # An auditor takes a bundle of B's records from C before the recovery.
    bundle = tmp_path / "before.bundle"
    rc, text = await asyncio.to_thread(cli, "export", "-d", str(c.dir), "--origin", b.node_id,
                                       "--out", str(bundle))
    assert rc == 0, text
    # The owner recovers, naming seq 6 as the last record it made itself.
    rc, text = await asyncio.to_thread(
        cli, "key", "recover", "-d", str(b.dir), "--recovery", str(b.dir / "recovery.key"),
        "--last-good", "test=6", env=recover_env(b))
    assert rc == 0, text
    assert "MOVE IT OFFLINE" in text and "recovered: " + b.node_id in text

    async def forgeries_gone() -> bool:
        for x in (a, b, c):
            st = await key_log_at(x, b.node_id)
            if st is None or st.seq != 1 or not await _at(x, b, 6):
                return False
        return True

    try:
        await eventually(forgeries_gone, timeout=60)
    except pytest.fail.Exception:
        seen = {}
        for x in (a, b, c):
            st = await key_log_at(x, b.node_id)
            seen[x.name] = (None if st is None else st.seq, await x.feeds(), x.tail_log(8))
        pytest.fail(f"the forgeries were not dropped everywhere: {seen}")
    assert (await b.api("GET", "/v1/admin/status"))["own_forgeries"] == {}
    # Pushed again (the thief still signs requests with the stolen key): refused, at
    # the request (the stolen key no longer signs for B) or as records.
    client = PeerClient(thief, c.url, node_id=c.node_id, fingerprint=c.fingerprint)
    try:
        with pytest.raises(PeerRejected):
            await client.push(forged)
    finally:
        await client.close()
    # Relayed by an honest partner (C signs the push with its own key): the records
    # themselves are judged (A held them before the recovery: not answered as copies
    # held), refused at A as beyond the last-good head, counted on C.
    before = (await _invalid_on(a, c)).get("beyond_last_good", 0)
    relay = NodeKey(unseal_secret_key((c.dir / "node.key").read_bytes(), None),
                    parse_node_id(c.node_id), c.node_id, (c.dir / "keylog").read_bytes())
    client = PeerClient(relay, a.url, node_id=a.node_id, fingerprint=a.fingerprint)
    try:
        out = await client.push(forged)
    finally:
        await client.close()
    assert out["accepted"] == 0 and out["rejected"] == [
        [i, "beyond_last_good"] for i in range(3)], out
    assert (await _invalid_on(a, c)).get("beyond_last_good", 0) == before + 3
    # B publishes on under its new key; everyone takes it after the honest six.
    await b.publish("test", TYPE, [rec(100)])
    await converge([a, b, c], expected({(b.node_id, "test"): 7}), timeout=60)
    # The forged checkpoint went with the records it counted: B's honest checkpoint of
    # seven is C's liveness statement of the feed (not refused as smaller than nine).
    await eventually(lambda: _signed_size_is(c, b, 7), timeout=30)
    # The audit of the bundle taken before the recovery, given the log after it, flags
    # the three forgeries and accepts the six honest records.
    log_after = tmp_path / "keylog"
    log_after.write_bytes((b.dir / "keylog").read_bytes())
    rc, text = await asyncio.to_thread(cli, "audit", str(bundle), "--origin", b.node_id,
                                       "--key-log", str(log_after), "--json")
    assert rc == 1, text
    report = json.loads(text)
    bad = [f for f in report["findings"] if f["kind"] == "beyond_last_good"]
    assert sorted(f["seq"] for f in bad) == [7, 8, 9], report["findings"]
    # ... and nothing about the honest records up to the last-good head.
    assert not [f for f in report["findings"]
                if f.get("seq") is not None and f["seq"] <= 6], report["findings"]
    assert [e["type"] for e in report["key_history"]] == ["inception", "recovery"]
    assert "WARNING" not in report["key_log"]["note"] and report["key_log"]["given"]
    # Without the newer log the same bundle verifies: only the recovery reveals them,
    # and the report says which log it judged by and how to see recoveries since.
    rc, text = await asyncio.to_thread(cli, "audit", str(bundle), "--origin", b.node_id)
    assert rc == 0, text
    assert "key log as of " in text and "(1 event(s), last: inception)" in text
    assert "pass --key-log with the city's newest log" in text
    await stop_all([a, b, c])


async def test_a_stolen_keys_checkpoint_held_without_its_records_goes_at_recovery(
        cluster: Cluster) -> None:
    """A thief's checkpoint of more records than B's honest chain travels on its own:
    A takes it (without the records it counts) and passes it on to B. B recovers
    naming seq 6: both forget it, so B's next honest checkpoint (of seven) is signed at
    B and taken at A, not refused as smaller than the thief's nine."""

    from citynode.core.keys import NodeKey, parse_node_id, unseal_secret_key

    a, b = cluster.create(["A", "B"], settings={
        **FAST, ("checkpoints", "interval_seconds"): 1.0})
    await cluster.start()
    await cluster.link(a, b)
    await b.publish("test", TYPE, [rec(i) for i in range(6)])
    await converge([a, b], expected({(b.node_id, "test"): 6}), timeout=60)
    await eventually(lambda: _signed_size_is(a, b, 6), timeout=30)
    page = await a.api("GET", f"/v1/records?origin={b.node_id}&feed=test&limit=1000",
                       operator=True)
    seed = unseal_secret_key((b.dir / "node.key").read_bytes(), None)
    thief = NodeKey(seed, parse_node_id(b.node_id), b.node_id,
                    (b.dir / "keylog").read_bytes())
    forged = _sign_forgeries(thief, page["records"][-1], 3,
                             int(page["records"][-1]["time"]) - 3_600_000)
    await _post_forged_checkpoint(thief, a, page["records"], forged)
    # A holds it (B's key in force) ...
    await eventually(lambda: _signed_size_is(a, b, 9), timeout=30)
    # ... and sends it to B too, with what it holds, at its first round after a restart
    # (not forwarded to the partner it came from: the thief signed the request as B):
    # then B holds one of its own feed.
    await asyncio.to_thread(a.stop)
    a.start()
    await a.wait_ready()
    await eventually(lambda: _signed_size_is(b, b, 9), timeout=60)
    assert await _at(a, b, 6) and await _at(b, b, 6)
    rc, text = await asyncio.to_thread(
        cli, "key", "recover", "-d", str(b.dir), "--recovery", str(b.dir / "recovery.key"),
        "--last-good", "test=6", env=recover_env(b))
    assert rc == 0, text

    async def forgotten() -> bool:
        for x in (a, b):
            st = await key_log_at(x, b.node_id)
            if st is None or st.seq != 1 or await _signed_size(x, b) == 9:
                return False
        return True

    await eventually(forgotten, timeout=60)
    await b.publish("test", TYPE, [rec(100)])
    await converge([a, b], expected({(b.node_id, "test"): 7}), timeout=60)
    for x in (a, b):
        await eventually(lambda x=x: _signed_size_is(x, b, 7), timeout=30)
    await stop_all([a, b])
    for x in (a, b):
        rc, out = await asyncio.to_thread(cli, "check", "-d", str(x.dir))
        assert rc == 0, out


async def _signed_size(n: LocalNode, origin: LocalNode) -> int | None:
    for f in (await n.api("GET", "/v1/liveness"))["feeds"]:
        if f["origin"] == origin.node_id and f["feed"] == "test":
            return int(f["signed_size"]) if f["signed_size"] is not None else None
    return None


async def _signed_size_is(n: LocalNode, origin: LocalNode, size: int) -> bool:
    return await _signed_size(n, origin) == size


async def _at(n: LocalNode, origin: LocalNode, seq: int) -> bool:
    for f in await n.feeds():
        if f["origin"] == origin.node_id and f["feed"] == "test":
            return int(f["seq"]) == seq
    return False


async def _forks(n: LocalNode) -> list[dict[str, Any]]:
    rc, out = await asyncio.to_thread(cli, "forks", "-d", str(n.dir), "--json")
    assert rc == 0, out
    forks: list[dict[str, Any]] = json.loads(out)["forks"]
    return forks


async def test_a_thiefs_fork_below_the_last_good_head_does_not_outlive_the_recovery(
        cluster: Cluster) -> None:
    """Before the recovery the thief signs a second seq 5 (below the head the owner
    will name) and pushes it to C: a fork proof of B spreads to A, B and C, and B stops
    publishing on the feed. The recovery names test=6: its chain is B's history there,
    the proof no longer holds, every node drops it and B publishes on (docs/PROTOCOL.md,
    "Settled windows")."""
    from citynode.core.keys import NodeKey, parse_node_id, unseal_secret_key
    from citynode.core.records import sign_record
    from citynode.transport.client import PeerClient

    a, b, c = cluster.create(["A", "B", "C"], settings=FAST)
    await cluster.start()
    for x, y in [(a, b), (b, c)]:
        await cluster.link(x, y)
    await b.publish("test", TYPE, [rec(i) for i in range(6)])
    await converge([a, b, c], expected({(b.node_id, "test"): 6}), timeout=60)
    page = await c.api("GET", f"/v1/records?origin={b.node_id}&feed=test&limit=100",
                       operator=True)
    r4 = page["records"][3]
    seed = unseal_secret_key((b.dir / "node.key").read_bytes(), None)
    thief = NodeKey(seed, parse_node_id(b.node_id), b.node_id,
                    (b.dir / "keylog").read_bytes())
    alt5 = sign_record(thief, feed="test", seq=5, prev=bytes.fromhex(r4["id"]),
                       time_ms=int(r4["time"]) + 1, type=TYPE, data={"n": 555})
    client = PeerClient(thief, c.url, node_id=c.node_id, fingerprint=c.fingerprint)
    try:
        assert (await client.push([alt5.envelope]))["forks"] == 1
    finally:
        await client.close()

    async def forked_everywhere() -> bool:
        return all([await _forks(x) for x in (a, b, c)])

    await eventually(forked_everywhere, timeout=30)
    with pytest.raises(Exception, match="forked"):
        await b.publish("test", TYPE, [rec(50)])
    rc, text = await asyncio.to_thread(
        cli, "key", "recover", "-d", str(b.dir), "--recovery", str(b.dir / "recovery.key"),
        "--last-good", "test=6", env=recover_env(b))
    assert rc == 0, text

    async def no_forks() -> bool:
        return not any([await _forks(x) for x in (a, b, c)])

    await eventually(no_forks, timeout=60)
    await b.publish("test", TYPE, [rec(100)])
    await converge([a, b, c], expected({(b.node_id, "test"): 7}), timeout=60)
    # Pushed again after the recovery, the thief's seq 5 makes no fork anywhere.
    client = PeerClient(thief, c.url, node_id=c.node_id, fingerprint=c.fingerprint)
    try:
        with pytest.raises(PeerRejected):
            await client.push([alt5.envelope])
    finally:
        await client.close()
    assert not await _forks(c)
    await stop_all([a, b, c])


async def test_a_thiefs_chain_below_the_named_head_is_replaced_by_the_named_one(
        cluster: Cluster) -> None:
    """C holds none of B's records when the thief pushes its own chain 1..5 (B's key
    in force then: C takes it). B recovers naming its honest seq 6: when C meets that
    record, whose prev is not C's seq 5, the fork it shows is settled by the recovery,
    so C drops the chain it cannot confirm and takes B's named one (docs/PROTOCOL.md,
    "Settled windows")."""
    from citynode.core.keys import NodeKey, parse_node_id, unseal_secret_key
    from citynode.transport.client import PeerClient

    b, c = cluster.create(["B", "C"], settings=FAST)
    await cluster.start()
    await cluster.link(b, c)
    await c.close()
    c.stop()
    await b.publish("test", TYPE, [rec(i) for i in range(6)])
    honest = (await b.api("GET", f"/v1/records?origin={b.node_id}&feed=test&limit=100",
                          operator=True))["records"]
    seed = unseal_secret_key((b.dir / "node.key").read_bytes(), None)
    thief = NodeKey(seed, parse_node_id(b.node_id), b.node_id,
                    (b.dir / "keylog").read_bytes())
    await b.close()
    b.stop()
    c.start()
    await c.wait_ready()
    forged = _sign_forgeries(thief, {"seq": 0, "id": ""}, 5, int(honest[0]["time"]))
    client = PeerClient(thief, c.url, node_id=c.node_id, fingerprint=c.fingerprint)
    try:
        assert (await client.push(forged))["accepted"] == 5
    finally:
        await client.close()
    rc, text = await asyncio.to_thread(
        cli, "key", "recover", "-d", str(b.dir), "--recovery", str(b.dir / "recovery.key"),
        "--last-good", "test=6", env=recover_env(b))
    assert rc == 0, text
    b.start()
    await b.wait_ready()

    async def named_chain_at_c() -> bool:
        page = await c.api("GET", f"/v1/records?origin={b.node_id}&feed=test&limit=100",
                           operator=True)
        return [r["id"] for r in page["records"]] == [r["id"] for r in honest]

    await eventually(named_chain_at_c, timeout=60)
    assert not await _forks(c)
    await stop_all([b, c])
