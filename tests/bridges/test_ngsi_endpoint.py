"""NGSI in over real HTTPS: a node serving ``POST /v1/bridges/ngsi/<name>`` takes the
notifications a context broker sends (published Smart Data Models examples), makes each
entity state a record once, and keeps what it refuses as dead letters."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from citynode.node import Node
from citynode.transport.server import serve
from tests.bridges.test_ngsi import FIXTURES, LD, entity, ld_note, v2_note
from tests.conftest import InProc, make_node_dir

NGSI_TOML = """
[[bridges.ngsi]]
name = "orion"
feed = "environment"
feeds = { TrafficFlowObserved = "traffic" }
local_time_offset = "+01:00"
max_notification_bytes = 20000
"""


@contextlib.asynccontextmanager
async def serving(base: Path, toml: str = "") -> AsyncIterator[InProc]:
    """A node named Seoul with ``toml`` added to its node.toml, serving HTTPS here."""
    d = make_node_dir(base, "Seoul")
    with open(d / "node.toml", "a") as f:
        f.write(toml)
    n = Node.load(d)
    await n.start()
    runner = await serve(n, host="127.0.0.1", port=n.config.node.listen_port)
    p = InProc(n, runner)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[InProc]:
    async with serving(tmp_path, NGSI_TOML) as p:
        yield p


async def notify(n: InProc, body: bytes, ctype: str = LD, *, token: str | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, Any]:
    h = {"Authorization": f"Bearer {token or n.token}", "Content-Type": ctype,
         **(headers or {})}
    async with n.session.post(f"{n.url}/v1/bridges/ngsi/orion", data=body,
                              headers=h) as r:
        return r.status, await r.json()


async def records(n: InProc, feed: str) -> list[dict[str, Any]]:
    async with n.session.get(f"{n.url}/v1/records?feed={feed}", headers={
            **n.auth(), "Accept": "application/json"}) as r:
        assert r.status == 200
        out: list[dict[str, Any]] = (await r.json())["records"]
        return out


async def test_notifications_become_records_once(node: InProc) -> None:
    air = entity("AirQualityObserved", "example-normalized.jsonld")
    weather = entity("WeatherObserved", "example.jsonld")
    traffic = entity("TrafficFlowObserved", "example.jsonld")
    status, out = await notify(node, ld_note(air, weather, traffic))
    assert status == 200, out
    assert (out["kind"], out["entities"], out["published"], out["duplicates"]) == (
        "ngsi-ld", 3, 3, 0)
    env = await records(node, "environment")
    assert [(r["type"], r["subject"]) for r in env] == [
        ("AirQualityObserved", air["id"]), ("WeatherObserved", weather["id"])]
    assert env[0]["data"]["no2"] == {"value": 69, "unitCode": "GQ"}
    (t,) = await records(node, "traffic")
    assert t["data"]["dateObservedFrom"] == "2016-12-07T11:10:00Z"
    # the broker retries (a timeout on its side): the same states are not records again
    status, out = await notify(node, ld_note(air, weather, traffic))
    assert (status, out["published"], out["duplicates"]) == (200, 0, 3)
    # a new state of the same entity is a new record
    weather["temperature"] = 4.1
    status, out = await notify(node, ld_note(weather))
    assert (status, out["published"]) == (200, 1)
    assert len(await records(node, "environment")) == 3


async def test_ngsi_v2_notifications_from_orion(node: InProc) -> None:
    v2 = entity("WaterQualityObserved", "example-normalized.json")
    status, out = await notify(node, v2_note(v2), "application/json",
                               headers={"Ngsiv2-AttrsFormat": "normalized"})
    assert status == 200 and (out["kind"], out["published"]) == ("ngsi-v2", 1), out
    (r,) = await records(node, "environment")
    assert r["type"] == "WaterQualityObserved" and r["subject"] == v2["id"]


async def test_bad_entities_are_dead_letters_and_the_rest_is_published(
        node: InProc) -> None:
    good = entity("WeatherObserved", "example.jsonld")
    wrong = {**entity("WeatherObserved", "example.jsonld"), "id": "urn:x:2",
             "temperature": "warm"}
    parking = json.loads((FIXTURES / "cygnus-notification-offstreetparking.jsonld")
                         .read_text())["data"][0]
    no_id = {k: v for k, v in good.items() if k != "id"}
    status, out = await notify(node, ld_note(good, wrong, parking, no_id))
    assert status == 200, out
    assert out["published"] == 1
    assert [(d["index"], d["reason"]) for d in out["dead_lettered"]] == [
        (1, "bad_value"), (2, "unknown_context"), (3, "missing_id")]
    async with node.session.get(f"{node.url}/v1/admin/bridges", headers=node.auth()) as r:
        st = await r.json()
    (b,) = st["bridges"]
    assert (b["kind"], b["published"], b["dead_lettered"], b["dead_letters_held"]) == (
        "ngsi", 1, 3, 3)
    assert {d["reason"] for d in st["dead_letters"]} == {"bad_value", "unknown_context",
                                                          "missing_id"}
    # sent again: nothing new, not even a second dead letter
    status, out = await notify(node, ld_note(good, wrong, parking, no_id))
    assert (status, out["published"], out["duplicates"], out["dead_lettered"]) == (
        200, 0, 4, [])


async def test_refused_notifications_and_callers(node: InProc) -> None:
    good = ld_note(entity("WeatherObserved", "example.jsonld"))
    status, out = await notify(node, good, token="not-the-token")
    assert (status, out["error"]) == (403, "access_denied")
    async with node.session.post(f"{node.url}/v1/bridges/ngsi/nope", data=good,
                                 headers={**node.auth(), "Content-Type": LD}) as r:
        assert r.status == 404
    status, out = await notify(node, good + b" " * 20_001)
    assert (status, out["error"]) == (413, "too_large")
    status, out = await notify(node, b'{"data": [' + b"[" * 5000 + b"]" * 5000 + b"]}")
    assert (status, out["error"]) == (400, "not_json")
    status, out = await notify(node, good, "application/json")  # @context in the body
    assert (status, out["error"]) == (400, "bad_context")
    status, out = await notify(node, good, "text/plain")
    assert (status, out["error"]) == (415, "bad_content_type")
    assert await records(node, "environment") == []
    async with node.session.get(f"{node.url}/v1/admin/bridges", headers=node.auth()) as r:
        st = await r.json()
    # kept: a refused notification does not vanish (the 403 and the 404 are not ours)
    assert sorted(d["reason"] for d in st["dead_letters"]) == [
        "bad_content_type", "bad_context", "not_json", "too_large"]
