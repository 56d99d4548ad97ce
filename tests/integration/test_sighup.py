"""SIGHUP to a real ``citynode run`` process: node.toml is read again without a restart,
the card served says what changed, and a broken node.toml changes nothing."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from citynode.cluster import Cluster, set_config
from citynode.core.cards import NodeCard
from citynode.core.keys import parse_node_id
from citynode.node.coordinator import DB_NAME
from citynode.transport.client import fetch_card
from tests.conftest import eventually

pytestmark = pytest.mark.integration


def _logged(path: Path, **want: object) -> list[dict[str, object]]:
    """The node's JSON log lines that carry every field in ``want``."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and all(obj.get(k) == v for k, v in want.items()):
            out.append(obj)
    return out


async def test_sighup_reloads_feed_terms_into_the_served_card(cluster: Cluster) -> None:
    (n,) = cluster.create(["Hanoi"])
    toml = n.dir / "node.toml"
    with open(toml, "a") as f:
        f.write('\n[feeds.air-quality]\naccess = "public"\nlicense = "CC-BY-4.0"\n')
    await cluster.start()
    assert n.proc is not None and n.log_path is not None
    log = n.log_path

    async def card() -> NodeCard:
        return await fetch_card(n.url, n.node_id, now_ms=int(time.time() * 1000))

    (air,) = [f for f in (await card()).feeds if f.name == "air-quality"]
    assert air.access == "public" and air.license == "CC-BY-4.0"
    pid = n.proc.pid

    # Change the feed's access level and licence, and (not live) the body limit.
    toml.write_text(toml.read_text().replace('access = "public"', 'access = "partners"')
                    .replace("CC-BY-4.0", "ODbL-1.0"))
    set_config(toml, "limits", "max_body_bytes", 4096)
    n.proc.send_signal(signal.SIGHUP)

    async def changed() -> bool:
        feeds = {f.name: f for f in (await card()).feeds}
        return feeds["air-quality"].access == "partners"

    await eventually(changed)
    (air,) = [f for f in (await card()).feeds if f.name == "air-quality"]
    assert air.license == "ODbL-1.0"
    assert _logged(log, key="feeds.air-quality.access", old="public", new="partners")
    assert _logged(log, key="feeds.air-quality.license", old="CC-BY-4.0",
                   new="ODbL-1.0")
    (restart,) = _logged(log, key="limits.max_body_bytes")
    assert restart["level"] == "warning" and "needs a restart" in str(restart["msg"])
    assert n.proc.poll() is None and n.proc.pid == pid  # the same process, not a restart

    # A broken node.toml: one error line, and the node serves on with what it had.
    good = toml.read_text()
    toml.write_text(good.replace('access = "partners"', 'access = "everyone"'))
    n.proc.send_signal(signal.SIGHUP)

    async def refused() -> bool:
        return bool(_logged(log, level="error"))

    await eventually(refused)
    (err,) = _logged(log, level="error")
    assert "node.toml is invalid" in str(err["msg"]) and "everyone" in str(err["error"])
    assert n.proc.poll() is None
    (air,) = [f for f in (await card()).feeds if f.name == "air-quality"]
    assert air.access == "partners" and air.license == "ODbL-1.0"
    page = await n.api("GET", "/v1/records?feed=air-quality", operator=False)
    assert page["records"] == []


async def test_sighup_closes_the_link_of_a_partner_removed_from_storage(
        cluster: Cluster) -> None:
    """The partner table changed behind the node's back (another tool, a restored table):
    SIGHUP makes the links match it, and the card re-signed lists the partners left."""
    a, b = cluster.create(["Lagos", "Accra"])
    await cluster.start()
    await cluster.link(a, b)
    assert a.proc is not None and a.log_path is not None

    async def partners() -> list[str]:
        out = await a.api("GET", "/v1/admin/partners")
        return [p["node_id"] for p in out["partners"]]

    assert await partners() == [b.node_id]
    with sqlite3.connect(a.dir / DB_NAME, timeout=10) as db:
        db.execute("DELETE FROM partners WHERE node_id = ?", (b.node_id,))
    db.close()  # the with block commits; it does not close
    assert await partners() == [b.node_id]  # not noticed until told
    a.proc.send_signal(signal.SIGHUP)

    async def closed() -> bool:
        return await partners() == []

    await eventually(closed)

    async def logged() -> bool:
        # The link leaves the list before it is closed, and the line is written after
        # the close returned: under load the list showed it gone first.
        return bool(_logged(a.log_path, msg="partner link closed on reload"))

    await eventually(logged)
    (line,) = _logged(a.log_path, msg="partner link closed on reload")
    assert line["partner"] == b.node_id and line["name"] == "Accra"
    card = await fetch_card(a.url, a.node_id, now_ms=int(time.time() * 1000))
    assert parse_node_id(b.node_id) not in card.partners  # the bytes: cn1 or cn2 alike
