"""One real ``citynode run`` process, driven over HTTPS and through the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import msgpack
import pytest

from citynode.cluster import Cluster
from citynode.core.keys import Verifier
from citynode.core.records import decode_record, open_record
from citynode.errors import PeerError, PeerRejected
from citynode.transport.client import fetch_card
from tests.conftest import key_states

pytestmark = pytest.mark.integration

AIR = {
    "dateObserved": "2026-11-28T07:00:00+07:00",
    "location": {"type": "Point", "coordinates": [106.8230, -6.1950]},
    "name": "DKI1 Bundaran HI",
    "pm25": 35.2,
    "pm10": 51.0,
}


def cli(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "citynode", *args], input=input,
                          capture_output=True, text=True, timeout=60)


async def test_run_serves_card_publish_and_reads(cluster: Cluster) -> None:
    (n,) = cluster.create(["Jakarta"])
    await cluster.start()

    # The card verifies against the node id alone, and pins the served certificate.
    card = await fetch_card(n.url, n.node_id, now_ms=int(__import__("time").time() * 1000))
    assert card.name == "Jakarta" and card.tls == n.fingerprint

    # Publishing through the CLI goes through the running node's operator API.
    lines = "\n".join(json.dumps(dict(AIR, pm25=30 + i)) for i in range(5)) + "\n"
    r = cli("publish", "-d", str(n.dir), "--feed", "air-quality", "--type",
            "AirQualityObserved", "--json", "-", input=lines)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["first_seq"] == 1 and len(out["ids"]) == 5

    # Read back as JSON and as msgpack; every envelope verifies independently.
    page = await n.api("GET", "/v1/records?feed=air-quality&limit=3", operator=False)
    assert [x["seq"] for x in page["records"]] == [1, 2, 3]
    assert page["next"] is not None
    page2 = await n.api("GET", f"/v1/records?feed=air-quality&after={page['next']}",
                        operator=False)
    assert [x["seq"] for x in page2["records"]] == [4, 5] and page2["next"] is None
    raw = msgpack.unpackb(await n.api("GET", "/v1/records?limit=10", operator=False, raw=True))
    v = Verifier()
    recs = [open_record(*decode_record(e), now_ms=2**60, verifier=v,
                        key_states=key_states(n.dir)) for e in raw["records"]]
    assert [r.id.hex() for r in recs] == out["ids"]
    assert recs[1].prev == recs[0].id
    one = await n.api("GET", f"/v1/records/{out['ids'][2]}", operator=False)
    assert one["seq"] == 3 and one["data"]["pm25"] == 32
    with pytest.raises(PeerRejected) as e:
        await n.api("GET", "/v1/records/" + "00" * 32, operator=False)
    assert e.value.status == 404

    # Metrics need the operator token.
    with pytest.raises(PeerRejected) as e:
        await n.api("GET", "/metrics", operator=False, raw=True)
    assert e.value.status == 403
    metrics = (await n.api("GET", "/metrics", raw=True)).decode()
    assert 'citynode_records_stored_total{kind="own"} 5.0' in metrics

    # CLI reads work while the node runs (WAL readers).
    r = cli("records", "-d", str(n.dir), "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["records"]) == 5


async def test_sigterm_loses_nothing_acknowledged(cluster: Cluster) -> None:
    (n,) = cluster.create(["Seoul"])
    await cluster.start()
    acked = 0
    for i in range(20):
        out = await n.publish("air-quality", "AirQualityObserved",
                              [dict(AIR, pm25=float(i))] * 50)
        acked += len(out["ids"])
    await n.close()
    assert n.stop() == 0  # graceful exit on SIGTERM
    r = cli("check", "-d", str(n.dir), "--json")
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["records"] == acked == 1000, report


async def test_sigterm_ends_open_streams_promptly(cluster: Cluster) -> None:
    """Graceful shutdown ends live streams (cleanly: the response completes), so SIGTERM
    with a stream open exits about as fast as without, and frees the data dir at once."""
    (n,) = cluster.create(["Hanoi"])
    await cluster.start()
    s = await n.session()
    assert n.proc is not None
    async with s.get(f"{n.url}/v1/stream", headers={"Accept": "text/event-stream"},
                     timeout=aiohttp.ClientTimeout(total=None)) as r:
        assert r.status == 200  # the stream is registered before its headers are sent
        start = time.monotonic()
        n.proc.send_signal(signal.SIGTERM)
        # The node ends the response properly: a broken one would raise here.
        await asyncio.wait_for(r.content.read(), 10)
        rc = await asyncio.to_thread(n.proc.wait, 10)
    assert rc == 0
    assert time.monotonic() - start < 6, n.tail_log()  # it took over 20 s
    n.proc = None
    await n.close()
    await cluster.start([n])  # the run lock is free again


async def test_refuses_key_file_readable_by_others(cluster: Cluster) -> None:
    (n,) = cluster.create(["Surabaya"])
    os.chmod(n.dir / "node.key", 0o644)
    r = cli("run", "-d", str(n.dir))
    assert r.returncode == 1
    assert "chmod 600" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


async def test_second_run_on_same_dir_is_refused(cluster: Cluster) -> None:
    (n,) = cluster.create(["Singapore"])
    await cluster.start()
    r = await asyncio.to_thread(cli, "run", "-d", str(n.dir))
    assert r.returncode == 1 and "in use by another" in r.stderr


def test_init_prints_id_and_partner_command(tmp_path: Path) -> None:
    d = tmp_path / "jkt"
    r = cli("init", "-d", str(d), "--name", "Jakarta", "--listen", "127.0.0.1:18500",
            "--print-recovery")  # the output is a pipe: secrets only when asked
    assert r.returncode == 0, r.stderr
    node_id = cli("id", "-d", str(d)).stdout.strip()
    assert node_id.startswith("cn2") and node_id in r.stdout
    assert f"citynode partner add https://127.0.0.1:18500 --id {node_id}" in r.stdout
    for name, mode in [("node.key", 0o600), ("operator.token", 0o600), ("tls/key.pem", 0o600)]:
        assert (d / name).stat().st_mode & 0o777 == mode
    assert (d / "tls/cert.pem").exists() and (d / "node.toml").exists()


async def test_sync_command_catches_up_a_stopped_node(cluster: Cluster) -> None:
    a, b = cluster.create(["Jakarta", "Seoul"])
    await cluster.start()
    await cluster.link(a, b)
    await b.close()
    assert b.stop() == 0
    for i in range(3):
        await a.publish("air-quality", "AirQualityObserved",
                        [dict(AIR, pm25=float(j)) for j in range(100 * i, 100 * i + 100)])
    r = await asyncio.to_thread(cli, "sync", "-d", str(b.dir))
    assert r.returncode == 0, r.stderr
    assert "fetched 300 record(s)" in r.stdout
    r = cli("feeds", "-d", str(b.dir), "--json")
    feeds = {(f["origin"], f["feed"]): f["seq"] for f in json.loads(r.stdout)["feeds"]}
    assert feeds == {(a.node_id, "air-quality"): 300}


async def test_a_damaged_database_makes_the_node_not_ready(cluster: Cluster) -> None:
    """Disk damage among a node's records that its start does not meet (and one it does):
    reads that meet it answer 503 with one line, and /readyz turns false for good,
    naming the file, so a load balancer or an operator's monitor stops trusting this
    replica; /healthz still answers (the process is alive)."""
    from tests.conftest import damage_table, eventually

    (n,) = cluster.create(["Seoul"])
    await cluster.start()
    await n.publish("air-quality", "AirQualityObserved", [dict(AIR, pm25=float(i))
                                                          for i in range(300)])
    await n.close()
    assert n.stop() == 0
    damage_table(n.dir / "citynode.db", where="middle")
    n.start()

    async def serving() -> bool:
        assert n.proc is not None and n.proc.poll() is None, n.tail_log()
        try:
            return (await n.api("GET", "/healthz", operator=False))["status"] == "ok"
        except (PeerError, PeerRejected):
            return False

    await eventually(serving, timeout=30)
    with pytest.raises(PeerRejected) as caught:
        await n.api("GET", "/v1/records?feed=air-quality&limit=1000", operator=False)
    assert caught.value.status == 503 and b"corrupt" in str(caught.value).encode()
    async with (await n.session()).get(n.url + "/readyz") as r:
        assert r.status == 503
        ready = await r.json()
    assert ready["ready"] is False and ready["database_intact"] is False
    assert "citynode.db" in ready["database_error"] and ready["database_writable"] is True
    assert "database corrupt" in n.tail_log(50)

    await n.close()
    n.stop()
    # Damage the start meets (the root of the records table): no start, one clear line.
    damage_table(n.dir / "citynode.db")
    r = cli("run", "-d", str(n.dir))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("Error: ") and "corrupt" in r.stderr


def test_one_shot_commands_print_warnings_as_one_line_with_their_facts(tmp_path: Path
                                                                       ) -> None:
    """A library warning in a one-shot command reaches the operator as one line with its
    facts (unconfigured, Python printed the bare message); errors are left to the
    command's own one ``Error:`` line, not said twice."""
    from tests.conftest import damage_table, make_node_dir

    d = make_node_dir(tmp_path, "Lima")
    r = cli("publish", "-d", str(d), "--feed", "n", "--type", "org.example.Noise", "-",
            input='{"x": 1}\n')
    assert r.returncode == 0, r.stderr
    os.chmod(d / "citynode.db", 0o644)  # as a copy restored with sqlite3 .backup is
    r = cli("feeds", "-d", str(d))
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines() == [
        "warning: database file was readable by others: mode set to 0600 "
        f"(path={d / 'citynode.db'}, was=citynode.db 0o644, citynode.db-wal 0o644, "
        "citynode.db-shm 0o644)"], r.stderr
    damage_table(d / "citynode.db")
    r = cli("records", "-d", str(d))
    assert r.returncode == 1
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("Error: ") and "corrupt" in line, r.stderr


async def test_an_export_of_a_nodes_own_feed_carries_its_card(cluster: Cluster,
                                                               tmp_path: Path) -> None:
    """The node keeps its signed card from its start (not first when some partner asks
    for it): an export of its own feeds, right away, carries it, and so tells the
    auditor and the export which feeds are public."""
    (n,) = cluster.create(["Lima"])
    await cluster.start()
    await n.publish("air-quality", "AirQualityObserved", [AIR])
    await n.close()
    n.stop()
    out = tmp_path / "own.bundle"
    r = cli("export", "-d", str(n.dir), "--origin", n.node_id, "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    # Its card history: the card signed at start, and the one re-signed when the feed
    # appeared (the newest, last).
    assert summary["cards"] == 2 and summary["records"] == 1, summary
    assert summary["left_out_not_public"] == [] and summary["not_public"] == []


async def test_an_export_of_a_nodes_own_feed_follows_its_node_toml(cluster: Cluster,
                                                                   tmp_path: Path) -> None:
    """The operator makes a public feed partners-only in node.toml and exports before the
    node has run with it: the card kept still says public, node.toml wins (the feed is
    left out of the default bundle)."""
    (n,) = cluster.create(["Lima"])
    await cluster.start()
    await n.publish("air-quality", "AirQualityObserved", [AIR])
    await n.close()
    n.stop()
    with open(n.dir / "node.toml", "a") as f:
        f.write('\n[feeds.air-quality]\naccess = "partners"\n')
    r = cli("export", "-d", str(n.dir), "--origin", n.node_id, "--out",
            str(tmp_path / "b"), "--json")
    assert r.returncode == 1 and "--include-partners" in r.stderr, (r.stdout, r.stderr)
    r = cli("export", "-d", str(n.dir), "--origin", n.node_id, "--out",
            str(tmp_path / "b"), "--json", "--include-partners")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["not_public"] == [{"feed": "air-quality",
                                                    "access": "partners"}]
