"""NGSI-LD / NGSI-v2 notifications -> payloads (pure: no event loop, no network).

The entities are Smart Data Models' published examples (tests/bridges/fixtures/ngsi,
provenance in PROVENANCE.md), each in its four forms, wrapped in a notification; the
hostile variants are built from them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from citynode.bridges.config import NgsiBridgeConfig, parse_bridges
from citynode.bridges.ngsi import (
    NotificationRefused,
    entity_message,
    entity_payload,
    read_notification,
)
from citynode.core.types import validate_payload
from citynode.errors import ConfigError, PayloadError, UnmappableMessage

FIXTURES = Path(__file__).parent / "fixtures" / "ngsi"
TYPES = ("AirQualityObserved", "WeatherObserved", "TrafficFlowObserved",
         "WaterQualityObserved")
FORMS = ("example-normalized.jsonld", "example.jsonld", "example-normalized.json",
         "example.json")
LD, JSON = "application/ld+json", "application/json"


def config(**kw: Any) -> NgsiBridgeConfig:
    return parse_bridges({"ngsi": [{"name": "orion", "feed": "city", **kw}]}, "node.toml",
                         1 << 20).ngsi[0]


def entity(type_name: str, form: str) -> dict[str, Any]:
    value = json.loads((FIXTURES / f"{type_name}.{form}").read_text())
    assert isinstance(value, dict)
    return value


def ld_note(*entities: Any, **top: Any) -> bytes:
    return json.dumps({"id": "urn:ngsi-ld:Notification:1", "type": "Notification",
                       "subscriptionId": "urn:ngsi-ld:Subscription:1",
                       "notifiedAt": "2026-12-07T10:00:00Z", "data": list(entities),
                       **top}).encode()


def v2_note(*entities: Any) -> bytes:
    return json.dumps({"subscriptionId": "5fd7", "data": list(entities)}).encode()


def body_of(type_name: str, form: str) -> tuple[bytes, str]:
    e = entity(type_name, form)
    return (ld_note(e), LD) if form.endswith(".jsonld") else (v2_note(e), JSON)


def payload(body: bytes, ctype: str, cfg: NgsiBridgeConfig, link: str | None = None,
            ) -> Any:
    (e,) = read_notification(body, ctype, link, cfg).entities
    if isinstance(e, UnmappableMessage):
        return e
    return entity_payload(e, cfg)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("type_name", TYPES)
def test_published_examples_become_valid_payloads_of_their_type(type_name: str,
                                                                form: str) -> None:
    cfg = config(local_time_offset="+01:00")  # the examples are in Spain (CET)
    m = payload(*body_of(type_name, form), cfg)
    assert not isinstance(m, UnmappableMessage), m
    validate_payload(m.type, m.data)
    src = entity(type_name, form)
    assert (m.feed, m.type, m.subject) == ("city", type_name, src["id"])
    # the location is the example's GeoJSON, whatever the form it was notified in
    loc = src["location"]
    geo = loc.get("value", loc) if loc.get("type") in ("GeoProperty", "geo:json") else loc
    assert m.data["location"] == geo
    assert "id" not in m.data and "type" not in m.data and "@context" not in m.data


def test_the_forms_of_one_example_give_the_same_measurements() -> None:
    cfg = config(local_time_offset="+01:00")
    views = [payload(*body_of("WeatherObserved", f), cfg).data for f in FORMS]
    # (the four published forms differ in some values, relativeHumidity among them)
    for key in ("temperature", "atmosphericPressure", "location"):
        assert len({json.dumps(v[key]) for v in views}) == 1, key
    assert {v["dateObserved"] for v in views} == {"2016-11-30T07:00:00.00Z"}


def test_a_units_code_is_kept_and_checked_by_the_payload_type() -> None:
    m = payload(*body_of("AirQualityObserved", "example-normalized.jsonld"),
                config(local_time_offset="+01:00"))
    assert m.data["co"] == {"value": 500, "unitCode": "GP"}
    assert m.data["no2"] == {"value": 69, "unitCode": "GQ"}
    assert m.data["refPointOfInterest"] == "urn:ngsi-ld:PointOfInterest:28079004-Pza.deEspanya"
    e = entity("AirQualityObserved", "example-normalized.jsonld")
    e["no2"]["unitCode"] = "KEL"  # kelvin: not a concentration
    bad = payload(ld_note(e), LD, config(local_time_offset="+01:00"))
    with pytest.raises(PayloadError) as err:
        validate_payload(bad.type, bad.data)
    assert err.value.reason == "bad_unit"


def test_a_date_time_without_offset_is_refused_unless_the_bridge_gives_one() -> None:
    m = payload(*body_of("AirQualityObserved", "example.json"), config())
    with pytest.raises(PayloadError) as err:
        validate_payload(m.type, m.data)
    assert err.value.reason == "bad_value" and "dateObserved" in str(err.value)
    m = payload(*body_of("AirQualityObserved", "example.json"),
                config(local_time_offset="+01:00"))
    assert m.data["dateObserved"] == "2016-03-15T11:00:00+01:00"


def test_an_interval_date_observed_becomes_from_and_to() -> None:
    m = payload(*body_of("TrafficFlowObserved", "example.jsonld"), config())
    assert "dateObserved" not in m.data
    assert (m.data["dateObservedFrom"], m.data["dateObservedTo"]) == (
        "2016-12-07T11:10:00Z", "2016-12-07T11:15:00Z")


def test_observed_at_gives_date_observed_when_the_entity_has_none() -> None:
    e = {"id": "urn:ngsi-ld:AirQualityObserved:x", "type": "AirQualityObserved",
         "pm25": {"type": "Property", "value": 12, "observedAt": "2026-12-07T07:00:00Z"},
         "no2": {"type": "Property", "value": 20, "observedAt": "2026-12-07T07:05:00Z"},
         "location": {"type": "GeoProperty",
                      "value": {"type": "Point", "coordinates": [106.8, -6.2]}}}
    m = payload(ld_note(e), JSON, config())  # JSON without a Link: the core context
    assert m.data["dateObserved"] == "2026-12-07T07:05:00Z"
    validate_payload(m.type, m.data)


# --------------------------------------------------------------------------- @context


def test_json_takes_its_context_from_the_link_header_or_the_core_context() -> None:
    e = entity("WeatherObserved", "example-normalized.jsonld")
    del e["@context"]
    sdm = ('<https://raw.githubusercontent.com/smart-data-models/dataModel.Weather/master/'
           'context.jsonld>; rel="http://www.w3.org/ns/json-ld#context"; '
           'type="application/ld+json"')
    assert payload(ld_note(e), JSON, config(), link=sdm).type == "WeatherObserved"
    assert payload(ld_note(e), JSON, config()).type == "WeatherObserved"  # core context
    other = sdm.replace("raw.githubusercontent.com/smart-data-models", "example.org/x")
    with pytest.raises(NotificationRefused) as err:
        read_notification(ld_note(e), JSON, other, config())
    assert err.value.reason == "unknown_context"
    assert "contexts of [[bridges.ngsi]] orion" in str(err.value)
    # ... unless the operator says that context uses the Smart Data Models' terms
    trusted = config(contexts=["https://example.org/x/dataModel.Weather/master/context.jsonld"])
    assert payload(ld_note(e), JSON, trusted, link=other).type == "WeatherObserved"
    with pytest.raises(NotificationRefused) as err:
        read_notification(ld_note(e), JSON, f"{sdm}, {sdm}", config())
    assert err.value.reason == "bad_context"


def test_json_must_not_carry_a_context_and_ld_json_must() -> None:
    e = entity("WeatherObserved", "example-normalized.jsonld")  # has @context
    with pytest.raises(NotificationRefused) as err:
        read_notification(ld_note(e), JSON, None, config())
    assert err.value.reason == "bad_context"
    link = f'<{"https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context.jsonld"}>; ' \
           'rel="http://www.w3.org/ns/json-ld#context"'
    with pytest.raises(NotificationRefused) as err:
        read_notification(ld_note(e), LD, link, config())
    assert err.value.reason == "bad_context"
    del e["@context"]
    got = payload(ld_note(e), LD, config())
    assert isinstance(got, UnmappableMessage) and got.reason == "bad_context"
    # the context on the notification serves every entity
    ctx = "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context-v1.8.jsonld"
    assert payload(ld_note(e, **{"@context": ctx}), LD, config()).type == "WeatherObserved"


def test_published_notification_with_an_unknown_context_is_refused_entity_by_entity() -> None:
    body = (FIXTURES / "cygnus-notification-offstreetparking.jsonld").read_bytes()
    note = read_notification(body, LD, None, config())
    (e,) = note.entities
    assert note.kind == "ngsi-ld"
    assert isinstance(e, UnmappableMessage) and e.reason == "unknown_context"
    assert "http://example.org/ngsi-ld/parking.jsonld" in str(e)


def test_inline_contexts_rename_known_terms_and_refuse_foreign_ones() -> None:
    e = {"id": "urn:ngsi-ld:WeatherObserved:1", "type": "Obs",
         "temp": {"type": "Property", "value": 3.5},
         "dateObserved": {"type": "Property", "value": "2026-12-07T07:00:00Z"},
         "location": {"type": "GeoProperty",
                      "value": {"type": "Point", "coordinates": [127.0, 37.5]}},
         "@context": [{"sdm": "https://smartdatamodels.org/dataModel.Weather/",
                       "Obs": "sdm:WeatherObserved", "temp": "sdm:temperature"},
                      "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context.jsonld"]}
    m = payload(ld_note(e), LD, config())
    assert (m.type, m.data["temperature"]) == ("WeatherObserved", 3.5)
    validate_payload(m.type, m.data)
    e["@context"][0]["temp"] = "https://example.org/vocab/temperatureInFahrenheit"
    got = payload(ld_note(e), LD, config())
    assert isinstance(got, UnmappableMessage) and got.reason == "unknown_term"
    e["@context"][0] = {"@vocab": "https://example.org/"}
    got = payload(ld_note(e), LD, config())
    assert isinstance(got, UnmappableMessage) and got.reason == "bad_context"


def test_expanded_iris_are_compacted_and_may_not_name_an_attribute_twice() -> None:
    e = entity("WeatherObserved", "example.jsonld")
    e["https://smartdatamodels.org/dataModel.Weather/temperature"] = e.pop("temperature")
    assert payload(ld_note(e), LD, config()).data["temperature"] == 3.3
    e["temperature"] = 4.0
    got = payload(ld_note(e), LD, config())
    assert isinstance(got, UnmappableMessage) and got.reason == "duplicate_attribute"


# --------------------------------------------------------------------------- hostile


def refused(body: bytes, ctype: str = LD, cfg: NgsiBridgeConfig | None = None) -> str:
    with pytest.raises(NotificationRefused) as err:
        read_notification(body, ctype, None, cfg or config())
    return err.value.reason


def test_hostile_notifications_are_refused_whole_with_a_reason() -> None:
    e = entity("WeatherObserved", "example.jsonld")
    assert refused(ld_note(e) + b" " * 2000, cfg=config(max_notification_bytes=2000)) \
        == "too_large"
    assert refused(b"\xff\xfe{}") == "not_json"
    assert refused(b'{"a": NaN}') == "not_json"
    deep = b'{"data": [' + b"[" * 100 + b"]" * 100 + b'], "subscriptionId": "s"}'
    assert refused(deep) == "not_json"
    assert refused(b'{"subscriptionId": "s", "subscriptionId": "t", "data": []}') \
        == "duplicate_key"
    assert refused(b"[1, 2]") == "not_notification"
    assert refused(b'{"data": {"id": 1}, "subscriptionId": "s"}') == "not_notification"
    assert refused(json.dumps({"data": []}).encode()) == "not_notification"
    assert refused(ld_note(*[e] * 3), cfg=config(max_entities=2)) == "too_many_entities"
    assert refused(ld_note(e), "text/plain") == "bad_content_type"
    assert refused(v2_note(e), LD) == "bad_context"  # NGSI-v2 has no JSON-LD


def test_hostile_entities_are_refused_alone() -> None:
    good = entity("WeatherObserved", "example.jsonld")
    no_id = {k: v for k, v in good.items() if k != "id"}
    no_type = {k: v for k, v in good.items() if k != "type"}
    long_id = {**good, "id": "urn:" + "x" * 300}
    numeric_id = {**good, "id": 12}
    unknown = {**good, "type": "OffStreetParking"}
    two_types = {**good, "type": ["WeatherObserved", "AirQualityObserved"]}
    dup = json.dumps(good)[:-1] + ', "temperature": 9}'  # duplicate key inside an entity
    body = ld_note(good, no_id, no_type, long_id, numeric_id, unknown, two_types, "text")
    reasons = [e.reason if isinstance(e, UnmappableMessage) else "ok"
               for e in read_notification(body, LD, None, config()).entities]
    assert reasons == ["ok", "missing_id", "missing_type", "missing_id", "missing_id",
                       "unknown_type", "unknown_type", "not_notification"]
    raw = ld_note(good).replace(json.dumps(good).encode(), dup.encode())
    assert refused(raw) == "duplicate_key"


def mapped_or_error(body: bytes, ctype: str, attrs_format: str | None = None) -> Any:
    """What the one entity of ``body`` becomes: a payload, or the error of its mapping
    (the notification itself is read without error)."""
    (x,) = read_notification(body, ctype, None, config(), attrs_format=attrs_format).entities
    assert not isinstance(x, UnmappableMessage)
    try:
        return entity_payload(x, config())
    except UnmappableMessage as exc:
        return exc


def test_wrong_attribute_shapes_fail_the_entity_not_the_notification() -> None:
    e = entity("WeatherObserved", "example-normalized.jsonld")
    e["temperature"] = {"type": "Property"}  # no value
    got = mapped_or_error(ld_note(e), LD)
    assert isinstance(got, UnmappableMessage) and got.reason == "bad_attribute"
    e["temperature"] = {"type": "Property", "value": "warm"}  # wrong type: the payload's
    got = mapped_or_error(ld_note(e), LD)
    with pytest.raises(PayloadError) as perr:
        validate_payload(got.type, got.data)
    assert perr.value.reason == "bad_value" and "temperature" in str(perr.value)
    v2 = entity("WeatherObserved", "example-normalized.json")
    v2["temperature"] = 3.3  # a bare value in a normalized notification
    got = mapped_or_error(v2_note(v2), JSON, "normalized")
    assert isinstance(got, UnmappableMessage) and got.reason == "bad_attribute"
    # without Orion's Ngsiv2-AttrsFormat header the form is guessed: key-values here
    got = mapped_or_error(v2_note(v2), JSON)
    assert got.data["temperature"] == 3.3 and got.data["atmosphericPressure"] == {
        "type": "Number", "value": 938.9}


def test_multi_attributes_take_the_default_instance() -> None:
    e = entity("WeatherObserved", "example-normalized.jsonld")
    e["temperature"] = [{"type": "Property", "value": 3.3},
                        {"type": "Property", "value": 40.0, "datasetId": "urn:x:sensor2"}]
    assert payload(ld_note(e), LD, config()).data["temperature"] == 3.3
    e["temperature"] = [{"type": "Property", "value": 3.3, "datasetId": "urn:x:1"},
                        {"type": "Property", "value": 40.0, "datasetId": "urn:x:2"}]
    with pytest.raises(UnmappableMessage) as err:
        payload(ld_note(e), LD, config())
    assert err.value.reason == "bad_attribute"


def test_the_same_entity_state_is_the_same_message() -> None:
    a = entity("WeatherObserved", "example.jsonld")
    b = dict(reversed(list(a.items())))  # same members, another order
    (ra,) = read_notification(ld_note(a), LD, None, config()).entities
    (rb,) = read_notification(ld_note(b), LD, None, config()).entities
    assert isinstance(ra, dict) and isinstance(rb, dict)
    assert entity_message(ra) == entity_message(rb)
    c = {**a, "temperature": 3.4}
    (rc,) = read_notification(ld_note(c), LD, None, config()).entities
    assert isinstance(rc, dict) and entity_message(rc) != entity_message(ra)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="local_time_offset"):
        config(local_time_offset="CET")
    with pytest.raises(ConfigError, match="types Noise"):
        config(types={"Noise": "Noise"})
    with pytest.raises(ConfigError, match="contexts"):
        config(contexts=["ftp://x"])
    with pytest.raises(ConfigError, match="used twice"):
        parse_bridges({"ngsi": [{"name": "a", "feed": "f"}, {"name": "a", "feed": "g"}]},
                      "node.toml", 1000)
    cfg = config(types={"NoiseLevelObserved": "org.example.Noise"},
                 feeds={"NoiseLevelObserved": "noise"})
    assert cfg.type_of("NoiseLevelObserved") == "org.example.Noise"
    assert cfg.feed_of("NoiseLevelObserved") == "noise" and cfg.feed_of("X") == "city"
    assert cfg.type_of("OffStreetParking") is None
