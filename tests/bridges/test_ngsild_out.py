"""NGSI-LD out: records as NGSI-LD entities (normalized), checked against the Smart Data
Models' published normalized examples (tests/bridges/fixtures/ngsi); served by
``GET /v1/records?format=ngsi-ld`` and upserted by ``[[sinks.ngsi_ld]]`` into a real HTTP
receiver."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from citynode.bridges.ngsi import entity_payload, read_notification
from citynode.core.keys import SigningKey, Verifier, node_id
from citynode.core.records import decode_record, open_record, sign_record
from citynode.node import Node
from citynode.sinks.ngsild import CORE_CONTEXT, entity_of, upsert_request
from citynode.sinks.receiver import Receiver
from tests.bridges.test_ngsi import LD, TYPES, config, entity, ld_note
from tests.bridges.test_ngsi_endpoint import serving
from tests.conftest import InProc, eventually, make_node_dir

KEY = SigningKey(bytes([7]) * 32)
T0 = 1_796_000_000_000
LD_TYPES = {"Property", "GeoProperty", "Relationship"}


def record_of(example: dict[str, Any], seq: int = 1) -> Any:
    """The record an SDM example becomes through NGSI in (signed by KEY)."""
    cfg = config(local_time_offset="+01:00")
    (e,) = read_notification(ld_note(example), LD, None, cfg).entities
    assert isinstance(e, dict)
    m = entity_payload(e, cfg)
    return sign_record(KEY, feed=m.feed, seq=seq, prev=None if seq == 1 else b"\0" * 32,
                       time_ms=T0, type=m.type, data=m.data, subject=m.subject)


def check_normalized(ent: dict[str, Any]) -> None:
    """The rules of an NGSI-LD entity in normalized form (ETSI GS CIM 009 clause 4.5):
    a URI id, a type, and attributes each of a known kind with its members."""
    assert ent["id"].startswith("urn:") and " " not in ent["id"]
    assert isinstance(ent["type"], str) and ent["type"]
    for name, a in ent.items():
        if name in ("id", "type", "@context"):
            continue
        assert a["type"] in LD_TYPES, name
        if a["type"] == "Relationship":
            assert isinstance(a["object"], str | list) and "value" not in a, name
        else:
            assert "value" in a and "object" not in a, name
        if a["type"] == "GeoProperty":
            assert a["value"]["type"] in ("Point", "LineString", "Polygon"), name
        if "observedAt" in a:
            assert a["observedAt"].endswith("Z"), name  # UTC, as the spec asks
        assert set(a) <= {"type", "value", "object", "unitCode", "observedAt"}, name


@pytest.mark.parametrize("type_name", TYPES)
def test_entities_match_the_published_normalized_examples(type_name: str) -> None:
    example = entity(type_name, "example-normalized.jsonld")
    rec = record_of(example)
    ent = entity_of(rec, rec.envelope)
    check_normalized(ent)
    assert (ent["id"], ent["type"]) == (example["id"], example["type"])
    compared = 0
    for name, a in example.items():
        if name in ("id", "type", "@context") or name not in ent:
            continue
        ours = ent[name]
        assert ours["type"] == a["type"], name
        key = "object" if a["type"] == "Relationship" else "value"
        want, got = a[key], ours[key]
        if isinstance(want, dict) and "@value" in want:
            want = want["@value"]
        if name.startswith("date") and isinstance(want, str) and not (
                want[-1] in "Zz" or "+" in want[10:]):
            want += "+01:00"  # a local time: the bridge's local_time_offset
        if isinstance(got, dict) and "@value" in got:
            got = got["@value"]
        assert got == want, name
        assert ours.get("unitCode") == a.get("unitCode"), name
        compared += 1
    assert compared >= 5
    # provenance: the signed record, verifiable by anyone with the origin's id
    assert ent["citynodeOrigin"]["value"] == node_id(KEY.public_key)
    assert ent["citynodeRecordId"]["value"] == rec.id.hex()
    env = base64.b64decode(ent["citynodeEnvelope"]["value"])
    body, sig, payload = decode_record(env)
    assert base64.b64decode(ent["citynodeSignature"]["value"]) == sig
    back = open_record(body, sig, payload, now_ms=T0, verifier=Verifier())
    assert back.id == rec.id


def test_what_we_serve_reads_back_through_ngsi_in_as_the_same_payload() -> None:
    rec = record_of(entity("WeatherObserved", "example-normalized.jsonld"))
    ent = entity_of(rec, rec.envelope)
    (e,) = read_notification(ld_note({**ent, "@context": [CORE_CONTEXT]}), LD, None,
                             config()).entities
    assert isinstance(e, dict)
    m = entity_payload(e, config())
    for k, v in rec.data.items():
        assert m.data[k] == v, k


def test_observed_at_is_the_observation_in_utc_and_ids_without_urn_subject() -> None:
    rec = sign_record(KEY, feed="air", seq=1, prev=None, time_ms=T0,
                      type="AirQualityObserved", subject="station 7",
                      data={"dateObserved": "2026-12-07T07:00:00+07:00", "pm25": 3,
                            "refDevice": "urn:ngsi-ld:Device:1", "id": "x",
                            "location": {"type": "Point", "coordinates": [106.8, -6.2]}})
    ent = entity_of(rec, rec.envelope)
    check_normalized(ent)
    assert ent["id"] == f"urn:ngsi-ld:AirQualityObserved:{node_id(KEY.public_key)}:air:" \
                       "station%207"
    assert ent["pm25"]["observedAt"] == "2026-12-07T00:00:00.000Z"
    assert ent["refDevice"] == {"type": "Relationship", "object": "urn:ngsi-ld:Device:1"}
    assert ent["type"] == "AirQualityObserved"  # the payload's own "id" is left out
    headers, body = upsert_request([ent], "https://smartdatamodels.org/context.jsonld",
                                   "seoul")
    assert headers == {"Content-Type": "application/ld+json", "NGSILD-Tenant": "seoul"}
    (sent,) = json.loads(body)
    assert sent["@context"] == ["https://smartdatamodels.org/context.jsonld", CORE_CONTEXT]


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[InProc]:
    async with serving(tmp_path) as p:
        yield p


async def test_get_records_as_ngsi_ld(served: InProc) -> None:
    n = served.node
    items = [{"dateObserved": f"2026-12-07T07:0{i}:00+09:00", "temperature": 1.5 + i,
              "location": {"type": "Point", "coordinates": [127.0, 37.5]}}
             for i in range(3)]
    recs = await n.publish("weather", "WeatherObserved", items,
                           subjects=["urn:ngsi-ld:WeatherObserved:Seoul-1"] * 3)
    url = f"{served.url}/v1/records?feed=weather&format=ngsi-ld&limit=2"
    async with served.session.get(url, headers={"Accept": "application/ld+json"}) as r:
        assert r.status == 200 and r.content_type == "application/ld+json"
        page = await r.json(content_type=None)
        nxt = r.headers["Link"]
    assert [e["citynodeRecordId"]["value"] for e in page] == [x.id.hex() for x in recs[:2]]
    for e in page:
        check_normalized(e)
        assert e["@context"][-1] == CORE_CONTEXT
        assert e["id"] == "urn:ngsi-ld:WeatherObserved:Seoul-1"
    assert 'rel="next"' in nxt and "format=ngsi-ld" in nxt and "after=" in nxt
    nxt_url = nxt[nxt.index("<") + 1:nxt.index(">")]
    async with served.session.get(f"{served.url}{nxt_url}",
                                  headers={"Accept": "application/json"}) as r:
        assert r.content_type == "application/json"
        (last,) = await r.json()
        assert "@context" not in last and "json-ld#context" in r.headers["Link"]
    assert last["temperature"]["value"] == 3.5
    async with served.session.get(f"{served.url}/v1/records?format=xml") as r:
        assert r.status == 400


def ngsi_sink_toml(url: str) -> str:
    base = url.rsplit("/events", 1)[0]
    return f"""
[[sinks.ngsi_ld]]
name = "partner"
url = "{base}"
filter = "feed=weather"
tenant = "seoul"
retry_min_seconds = 0.05
retry_max_seconds = 0.3
batch = 16
"""


async def test_upsert_sink_batches_in_order_with_one_state_per_entity(
        tmp_path: Path) -> None:
    receiver = Receiver()
    await receiver.start()
    d = make_node_dir(tmp_path, "Seoul")
    with open(d / "node.toml", "a") as f:
        f.write(ngsi_sink_toml(receiver.url))
    n = Node.load(d)
    await n.start()
    try:
        receiver.fail_next = 2  # the broker is busy at first: 503, retried
        items = [{"dateObserved": f"2026-12-07T07:{i:02d}:00Z", "temperature": float(i),
                  "location": {"type": "Point", "coordinates": [127.0, 37.5]}}
                 for i in range(6)]
        subjects = [f"urn:ngsi-ld:WeatherObserved:S{i % 3}" for i in range(6)]
        recs = await n.publish("weather", "WeatherObserved", items, subjects=subjects)

        async def all_in() -> bool:
            return sum(len(b) for _, b in receiver.upserts) == 6
        await eventually(all_in, timeout=20, interval=0.05)
        sent = [e for _, batch in receiver.upserts for e in batch]
        assert [e["citynodeRecordId"]["value"] for e in sent] == [r.id.hex() for r in recs]
        for headers, batch in receiver.upserts:
            assert headers["Content-Type"] == "application/ld+json"
            assert headers["NGSILD-Tenant"] == "seoul"
            ids = [e["id"] for e in batch]
            assert len(ids) == len(set(ids))  # one state of an entity per upsert
            for e in batch:
                check_normalized(e)
                assert e["@context"][-1] == CORE_CONTEXT
        assert [len(b) for _, b in receiver.upserts] == [3, 3]
        st = (await n.sinks.status())["sinks"][0]
        assert (st["kind"], st["delivered"], st["pending"]) == ("ngsi_ld", 6, 0)
        assert st["retries"] >= 1
    finally:
        await n.stop()
        await receiver.stop()
