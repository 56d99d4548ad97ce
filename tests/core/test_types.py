"""Payload types: valid examples, every kind of rejection, units, GeoJSON, custom types.

No event loop: core/types.py is pure.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from citynode.core import encoding, types
from citynode.core.types import (
    BUILTIN_TYPES,
    describe_types,
    is_custom_type,
    point_of,
    validate_payload,
)
from citynode.errors import PayloadError

# --------------------------------------------------------------------------- examples


def jakarta_air() -> dict[str, Any]:
    return {
        "id": "urn:ngsi-ld:AirQualityObserved:id-jakarta:DKI1:2026-11-28T07",
        "type": "AirQualityObserved",
        "dateObserved": "2026-11-28T07:00:00+07:00",
        "location": {"type": "Point", "coordinates": [106.8230, -6.1950]},
        "stationName": "DKI1 Bundaran HI",
        "stationCode": "DKI1",
        "address": {"streetAddress": "Jl. M.H. Thamrin", "addressLocality": "Jakarta"},
        "pm25": 35,
        "pm10": 58.2,
        "no2": {"value": 41.5, "unitCode": "GQ"},
        "co": 0.9,
        "airQualityIndex": 101,
        "airQualityLevel": "moderate",
        "temperature": 29.4,
        "relativeHumidity": 0.78,
        "reliability": 0.9,
        "refDevice": "urn:ngsi-ld:Device:DKI1-bam1020",
    }


def seoul_traffic() -> dict[str, Any]:
    return {
        "dateObserved": "2026-11-28T08:15:00+09:00",
        "location": {
            "type": "LineString",
            "coordinates": [[127.0276, 37.4979], [127.0286, 37.5013]],
        },
        "name": "Gangnam-daero northbound",
        "refRoadSegment": "urn:ngsi-ld:RoadSegment:seoul:gangnam-daero:12",
        "laneId": 2,
        "laneDirection": "forward",
        "intensity": 1240,
        "averageVehicleSpeed": 23.5,
        "occupancy": 0.42,
        "averageHeadwayTime": 2.9,
        "congested": True,
        "reversedLane": False,
        "vehicleType": "car",
    }


def singapore_weather() -> dict[str, Any]:
    return {
        "dateObserved": "2026-11-28T14:00:00+08:00",
        "location": {"type": "Point", "coordinates": [103.9915, 1.3644, 16.0]},
        "stationName": "Changi",
        "stationCode": "S24",
        "temperature": 31.2,
        "relativeHumidity": {"value": 74, "unitCode": "P1"},
        "atmosphericPressure": 1008.6,
        "windSpeed": {"value": 4.1, "unitCode": "MTS"},
        "windDirection": 200,
        "precipitation": 12.4,
        "solarRadiation": 612.0,
        "uVIndexMax": 11,
        "weatherType": "thunderstorm",
    }


def bangkok_water() -> dict[str, Any]:
    return {
        "dateObserved": "2026-11-28T06:30:00Z",
        "location": {"type": "Point", "coordinates": [100.4930, 13.7510]},
        "name": "Chao Phraya at Tha Tien",
        "temperature": 29.0,
        "pH": 7.2,
        "O2": 5.8,
        "turbidity": 35,
        "conductivity": {"value": 0.031, "unitCode": "D10"},
        "orp": -45,
        "chla": 12.5,
    }


def manila_waste() -> dict[str, Any]:
    return {
        "location": {"type": "Point", "coordinates": [120.9842, 14.5995]},
        "serialNumber": "MNL-BIN-00412",
        "fillingLevel": 0.83,
        "status": "ok",
        "cargoWeight": 118.5,
        "methaneConcentration": {"value": 3.1, "unitCode": "59"},
        "dateLastEmptying": "2026-11-27T21:40:00+08:00",
        "storedWasteKind": ["organic", "plastic"],
    }


def jakarta_notice() -> dict[str, Any]:
    return {
        "severity": "high",
        "tlp": "TLP:AMBER",
        "affectedSystem": "traffic signal controllers (ATCS) firmware 4.2",
        "description": "Unauthenticated remote command execution on the controllers' web UI.",
        "dateIssued": "2026-11-28T09:00:00+07:00",
        "title": "ATCS controller RCE",
        "indicators": [
            {"type": "ipv4", "value": "203.0.113.45"},
            {"type": "ipv6", "value": "2001:db8::/32"},
            {"type": "domain", "value": "update-atcs.example.net"},
            {"type": "url", "value": "https://update-atcs.example.net/fw.bin"},
            {
                "type": "sha256",
                "value": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            },
            {"type": "md5", "value": "d41d8cd98f00b204e9800998ecf8427e"},
            {"type": "cve", "value": "CVE-2024-3400"},
            {"type": "email", "value": "ops@example.net"},
            {"type": "other", "value": "User-Agent: atcs-upd/1.0"},
        ],
        "cve": ["CVE-2024-3400", "CVE-2021-44228"],
        "mitigation": "Block the listed addresses; disable the web UI on the WAN port.",
        "references": ["https://csirt.example.go.id/advisories/2026-17"],
    }


EXAMPLES: dict[str, Callable[[], dict[str, Any]]] = {
    "AirQualityObserved": jakarta_air,
    "TrafficFlowObserved": seoul_traffic,
    "WeatherObserved": singapore_weather,
    "WaterQualityObserved": bangkok_water,
    "WasteContainer": manila_waste,
    "CyberSecurityNotice": jakarta_notice,
}


def rejected(type_name: str, data: Any) -> PayloadError:
    """Validate, expecting a rejection; return the error."""
    with pytest.raises(PayloadError) as info:
        validate_payload(type_name, data)
    return info.value


def with_(type_name: str, **changes: Any) -> dict[str, Any]:
    data = EXAMPLES[type_name]()
    data.update(changes)
    return data


def without(type_name: str, *names: str) -> dict[str, Any]:
    data = EXAMPLES[type_name]()
    for name in names:
        del data[name]
    return data


# --------------------------------------------------------------------------- valid payloads


def test_builtin_types_are_exactly_the_six() -> None:
    assert set(EXAMPLES) == BUILTIN_TYPES
    assert len(BUILTIN_TYPES) == 6


@pytest.mark.parametrize("type_name", sorted(EXAMPLES))
def test_realistic_examples_are_valid(type_name: str) -> None:
    validate_payload(type_name, EXAMPLES[type_name]())


@pytest.mark.parametrize("type_name", sorted(EXAMPLES))
def test_examples_stay_valid_after_a_msgpack_round_trip(type_name: str) -> None:
    # What a receiver validates is the strictly decoded body, not the sender's dict.
    decoded = encoding.decode(encoding.encode(EXAMPLES[type_name]()))
    validate_payload(type_name, decoded)


def test_tuples_are_accepted_where_lists_are() -> None:
    # Senders may build payloads with tuples; msgpack encodes them as arrays.
    data = with_(
        "TrafficFlowObserved",
        location={"type": "LineString", "coordinates": ((127.0276, 37.4979), (127.03, 37.5))},
    )
    validate_payload("TrafficFlowObserved", data)


@pytest.mark.parametrize("type_name", sorted(EXAMPLES))
def test_minimal_payloads_are_valid(type_name: str) -> None:
    spec = describe_types()[type_name]
    example = EXAMPLES[type_name]()
    minimal = {name: example[name] for name in spec["required"] if name in example}
    measures = [m for m in spec["at_least_one_of"] if m in example]
    if measures:
        minimal[measures[0]] = example[measures[0]]
    validate_payload(type_name, minimal)


def test_validation_does_not_modify_the_payload() -> None:
    data = jakarta_notice()
    before = copy.deepcopy(data)
    validate_payload("CyberSecurityNotice", data)
    assert data == before


# --------------------------------------------------------------------------- messages


def test_errors_name_the_type_and_the_field_on_one_line() -> None:
    err = rejected(
        "AirQualityObserved", with_("AirQualityObserved", pm25={"value": 35, "unitCode": "CEL"})
    )
    assert err.reason == "bad_unit"
    assert str(err).startswith("AirQualityObserved payload: pm25.unitCode: ")
    assert "GQ (µg/m³)" in str(err)
    assert "\n" not in str(err)


def test_long_bad_values_are_cut_in_messages() -> None:
    err = rejected("AirQualityObserved", with_("AirQualityObserved", pm25="x" * 5000))
    assert len(str(err)) < 200


def test_odd_attribute_names_are_quoted_in_messages() -> None:
    err = rejected("WeatherObserved", {**singapore_weather(), "bad\nname" * 10: 1})
    assert err.reason == "bad_key"
    assert "\n" not in str(err)


# --------------------------------------------------------------------------- missing


@pytest.mark.parametrize(
    ("type_name", "name"),
    [
        ("AirQualityObserved", "dateObserved"),
        ("AirQualityObserved", "location"),
        ("TrafficFlowObserved", "dateObserved"),
        ("TrafficFlowObserved", "location"),
        ("WeatherObserved", "dateObserved"),
        ("WeatherObserved", "location"),
        ("WaterQualityObserved", "dateObserved"),
        ("WaterQualityObserved", "location"),
        ("WasteContainer", "location"),
        ("CyberSecurityNotice", "severity"),
        ("CyberSecurityNotice", "tlp"),
        ("CyberSecurityNotice", "affectedSystem"),
        ("CyberSecurityNotice", "description"),
        ("CyberSecurityNotice", "dateIssued"),
    ],
)
def test_missing_required_attribute(type_name: str, name: str) -> None:
    err = rejected(type_name, without(type_name, name))
    assert err.reason == "missing_field"
    assert f"{type_name} payload: {name}: " in str(err)


@pytest.mark.parametrize("type_name", sorted(BUILTIN_TYPES - {"CyberSecurityNotice"}))
def test_a_payload_without_any_measurement_is_rejected(type_name: str) -> None:
    measures = describe_types()[type_name]["at_least_one_of"]
    data = {k: v for k, v in EXAMPLES[type_name]().items() if k not in measures}
    err = rejected(type_name, data)
    assert err.reason == "missing_field"
    assert "at least one of" in str(err)
    for name in measures:
        assert name in str(err)


def test_waste_container_does_not_need_a_date() -> None:
    validate_payload("WasteContainer", without("WasteContainer", "dateLastEmptying"))


def test_traffic_interval_may_replace_date_observed() -> None:
    data = without("TrafficFlowObserved", "dateObserved")
    data["dateObservedFrom"] = "2026-11-28T08:00:00+09:00"
    data["dateObservedTo"] = "2026-11-28T08:15:00+09:00"
    validate_payload("TrafficFlowObserved", data)
    # Equal instants written with different offsets are in order.
    data["dateObservedTo"] = "2026-11-27T23:00:00Z"
    validate_payload("TrafficFlowObserved", data)


def test_traffic_interval_needs_both_ends() -> None:
    data = without("TrafficFlowObserved", "dateObserved")
    data["dateObservedFrom"] = "2026-11-28T08:00:00+09:00"
    err = rejected("TrafficFlowObserved", data)
    assert err.reason == "missing_field"
    assert "dateObservedFrom and dateObservedTo" in str(err)
    # With dateObserved present, a lone end is still an incomplete interval.
    err = rejected(
        "TrafficFlowObserved",
        with_("TrafficFlowObserved", dateObservedTo="2026-11-28T08:15:00+09:00"),
    )
    assert err.reason == "missing_field"
    assert "dateObservedFrom" in str(err)


def test_traffic_interval_must_be_in_order() -> None:
    data = without("TrafficFlowObserved", "dateObserved")
    data["dateObservedFrom"] = "2026-11-28T08:15:00+09:00"
    # 23:14:59.5Z is 08:14:59.5+09:00, half a second before the start.
    data["dateObservedTo"] = "2026-11-27T23:14:59.5Z"
    err = rejected("TrafficFlowObserved", data)
    assert err.reason == "bad_value"
    assert "dateObservedTo" in str(err)


def test_traffic_interval_ends_are_date_times() -> None:
    data = without("TrafficFlowObserved", "dateObserved")
    data["dateObservedFrom"] = "08:00"
    data["dateObservedTo"] = "2026-11-28T08:15:00+09:00"
    err = rejected("TrafficFlowObserved", data)
    assert (err.reason, "dateObservedFrom") == ("bad_value", str(err).split(": ")[1])


# --------------------------------------------------------------------------- bad values

BAD_VALUES: list[tuple[str, str, Any]] = [
    ("AirQualityObserved", "pm25", "35"),
    ("AirQualityObserved", "pm25", -1),
    ("AirQualityObserved", "pm25", -0.001),
    ("AirQualityObserved", "pm25", True),
    ("AirQualityObserved", "pm25", None),
    ("AirQualityObserved", "pm25", math.nan),
    ("AirQualityObserved", "pm25", math.inf),
    ("AirQualityObserved", "pm25", [35]),
    ("AirQualityObserved", "pm25", b"\x23"),
    ("AirQualityObserved", "relativeHumidity", 78),  # a percentage needs unitCode P1
    ("AirQualityObserved", "reliability", 1.01),
    ("AirQualityObserved", "temperature", -300),
    ("AirQualityObserved", "airQualityIndex", -5),
    ("AirQualityObserved", "airQualityLevel", 3),
    ("AirQualityObserved", "address", "Jl. M.H. Thamrin"),
    ("AirQualityObserved", "refDevice", 5),
    ("AirQualityObserved", "refDevice", ["urn:a", 5]),
    ("AirQualityObserved", "name", None),
    ("AirQualityObserved", "stationName", {"en": "Bundaran HI"}),
    ("TrafficFlowObserved", "intensity", 12.5),
    ("TrafficFlowObserved", "intensity", -1),
    ("TrafficFlowObserved", "intensity", False),
    ("TrafficFlowObserved", "occupancy", 1.2),
    ("TrafficFlowObserved", "averageVehicleSpeed", -3),
    ("TrafficFlowObserved", "congested", "yes"),
    ("TrafficFlowObserved", "congested", 1),
    ("TrafficFlowObserved", "laneId", -1),
    ("TrafficFlowObserved", "laneId", 1.0),
    ("TrafficFlowObserved", "laneId", True),
    ("TrafficFlowObserved", "laneDirection", "north"),
    ("TrafficFlowObserved", "reversedLane", 0),
    ("WeatherObserved", "windDirection", 361),
    ("WeatherObserved", "windDirection", -181),
    ("WeatherObserved", "precipitation", -0.1),
    ("WeatherObserved", "atmosphericPressure", -1),
    ("WeatherObserved", "uVIndexMax", -1),
    ("WeatherObserved", "illuminance", "bright"),
    ("WaterQualityObserved", "pH", 14.5),
    ("WaterQualityObserved", "pH", -0.5),
    ("WaterQualityObserved", "O2", -2),
    ("WaterQualityObserved", "turbidity", "35 NTU"),
    ("WasteContainer", "fillingLevel", 83),
    ("WasteContainer", "status", "full"),
    ("WasteContainer", "status", "OK"),
    ("WasteContainer", "cargoWeight", -1),
    ("WasteContainer", "dateLastEmptying", "yesterday"),
    ("WasteContainer", "storedWasteKind", {"organic": True}),
    ("CyberSecurityNotice", "severity", "urgent"),
    ("CyberSecurityNotice", "severity", "High"),
    ("CyberSecurityNotice", "tlp", "AMBER"),
    ("CyberSecurityNotice", "tlp", "TLP:AMBER+strict"),
    ("CyberSecurityNotice", "affectedSystem", ""),
    ("CyberSecurityNotice", "affectedSystem", ["a"]),
    ("CyberSecurityNotice", "description", ""),
    ("CyberSecurityNotice", "description", "x" * 10001),
    ("CyberSecurityNotice", "dateIssued", 1764295200000),
    ("CyberSecurityNotice", "title", 7),
    ("CyberSecurityNotice", "cve", "CVE-2024-3400"),
    ("CyberSecurityNotice", "cve", ["CVE-24-3400"]),
    ("CyberSecurityNotice", "cve", ["CVE-2024-340"]),
    ("CyberSecurityNotice", "cve", ["cve-2024-3400"]),
    ("CyberSecurityNotice", "cve", ["CVE-2024-3400 "]),
    ("CyberSecurityNotice", "references", "https://csirt.example.go.id/a"),
    ("CyberSecurityNotice", "references", ["https://ok.example", None]),
    ("CyberSecurityNotice", "references", ["x"] * 1001),
]


@pytest.mark.parametrize(("type_name", "name", "value"), BAD_VALUES)
def test_bad_value(type_name: str, name: str, value: Any) -> None:
    err = rejected(type_name, with_(type_name, **{name: value}))
    assert err.reason == "bad_value"
    assert str(err).startswith(f"{type_name} payload: {name}")


def test_description_length_bounds_are_inclusive() -> None:
    validate_payload("CyberSecurityNotice", with_("CyberSecurityNotice", description="x"))
    validate_payload("CyberSecurityNotice", with_("CyberSecurityNotice", description="x" * 10000))


def test_tlp_1_white_gets_a_hint() -> None:
    err = rejected("CyberSecurityNotice", with_("CyberSecurityNotice", tlp="TLP:WHITE"))
    assert "TLP:CLEAR" in str(err)


@pytest.mark.parametrize(
    "tlp", ["TLP:CLEAR", "TLP:GREEN", "TLP:AMBER", "TLP:AMBER+STRICT", "TLP:RED"]
)
def test_every_tlp_2_label_is_accepted(tlp: str) -> None:
    validate_payload("CyberSecurityNotice", with_("CyberSecurityNotice", tlp=tlp))


@pytest.mark.parametrize(
    "status", ["ok", "lidOpen", "dropped", "moved", "burning", "door_open", "vandalized", "unknown"]
)
def test_every_waste_container_status_is_accepted(status: str) -> None:
    validate_payload(
        "WasteContainer", {**without("WasteContainer", "fillingLevel"), "status": status}
    )


@pytest.mark.parametrize(
    ("indicator", "where"),
    [
        ({"type": "ipv4", "value": "999.1.1.1"}, ".value"),
        ({"type": "ipv4", "value": "010.1.1.1"}, ".value"),  # leading zeros are ambiguous
        ({"type": "ipv4", "value": "2001:db8::1"}, ".value"),
        ({"type": "ipv6", "value": "203.0.113.45"}, ".value"),
        # What ipaddress alone would take, and the rule does not (issue 12, point 9):
        ({"type": "ipv4", "value": "192.0.2.0/255.255.255.0"}, ".value"),  # a netmask
        ({"type": "ipv4", "value": "192.0.2.0/0.0.0.255"}, ".value"),  # a hostmask
        ({"type": "ipv4", "value": "192.0.2.0/024"}, ".value"),
        ({"type": "ipv6", "value": "fe80::1%eth0"}, ".value"),  # a zone index
        ({"type": "ipv6", "value": "fe80::1%\u00e9 x/64"}, ".value"),  # ... of any text
        ({"type": "ipv6", "value": "::1/0128"}, ".value"),
        ({"type": "sha256", "value": "9f86d081"}, ".value"),
        ({"type": "md5", "value": "z" * 32}, ".value"),
        ({"type": "cve", "value": "CVE-2024"}, ".value"),
        ({"type": "domain", "value": "not a domain"}, ".value"),
        ({"type": "domain", "value": "-bad.example"}, ".value"),
        ({"type": "url", "value": "example.org/path"}, ".value"),
        ({"type": "email", "value": "no-at-sign"}, ".value"),
        ({"type": "other", "value": ""}, ".value"),
        ({"type": "other", "value": 5}, ".value"),
        ({"type": "other", "value": "x" * 2049}, ".value"),
        ({"type": "hash", "value": "abc"}, ".type"),
        ({"type": None, "value": "abc"}, ".type"),
        ({"type": "ipv4"}, ""),
        ({"type": "ipv4", "value": "203.0.113.45", "note": "c2"}, ""),
        ("203.0.113.45", ""),
    ],
)
def test_bad_indicator(indicator: Any, where: str) -> None:
    data = with_("CyberSecurityNotice", indicators=[{"type": "other", "value": "ok"}, indicator])
    err = rejected("CyberSecurityNotice", data)
    assert err.reason == "bad_value"
    assert str(err).startswith(f"CyberSecurityNotice payload: indicators[1]{where}: ")


def test_indicator_list_is_bounded() -> None:
    item = {"type": "ipv4", "value": "203.0.113.45"}
    validate_payload("CyberSecurityNotice", with_("CyberSecurityNotice", indicators=[item] * 1000))
    err = rejected("CyberSecurityNotice", with_("CyberSecurityNotice", indicators=[item] * 1001))
    assert "at most 1000" in str(err)
    err = rejected("CyberSecurityNotice", with_("CyberSecurityNotice", indicators=item))
    assert err.reason == "bad_value"


# --------------------------------------------------------------------------- extras


def test_extra_attributes_are_allowed_unchecked() -> None:
    data = with_(
        "WeatherObserved",
        id="urn:ngsi-ld:WeatherObserved:sg:S24",
        type="SomethingElse",
        windGust={"anything": [1, None, b"\x00"]},
        **{"x" * 64: None},
    )
    validate_payload("WeatherObserved", data)


@pytest.mark.parametrize("key", ["x" * 65, "", 7, b"pm25"])
def test_bad_extra_attribute_names(key: Any) -> None:
    data: dict[Any, Any] = singapore_weather()
    data[key] = 1
    err = rejected("WeatherObserved", data)
    assert err.reason == "bad_key"


def test_an_attribute_known_to_another_type_is_an_unchecked_extra() -> None:
    # laneDirection is checked for traffic only; elsewhere it is just an extra.
    validate_payload("WeatherObserved", with_("WeatherObserved", laneDirection=3))


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("type_name", "name", "value"),
    [
        ("AirQualityObserved", "pm25", {"value": 0.035, "unitCode": "GP"}),
        ("AirQualityObserved", "pm25", {"value": 35, "unitCode": "GQ"}),
        ("AirQualityObserved", "o3", {"value": 18.5, "unitCode": "61"}),
        ("AirQualityObserved", "co", {"value": 0.8, "unitCode": "59"}),
        ("AirQualityObserved", "co", {"value": 900, "unitCode": "GQ"}),
        ("AirQualityObserved", "co2", {"value": 415, "unitCode": "59"}),
        ("AirQualityObserved", "pm25", {"value": 35}),  # unitCode left out: default unit
        ("AirQualityObserved", "pm25", {"value": 35, "unitCode": "GQ", "type": "Property"}),
        (
            "AirQualityObserved",
            "pm25",
            {"value": 35, "unitCode": "GQ", "observedAt": "2026-11-28T00:00:00Z"},
        ),
        ("AirQualityObserved", "relativeHumidity", {"value": 100, "unitCode": "P1"}),
        ("AirQualityObserved", "relativeHumidity", {"value": 1, "unitCode": "C62"}),
        ("TrafficFlowObserved", "averageVehicleSpeed", {"value": 6.5, "unitCode": "MTS"}),
        ("TrafficFlowObserved", "occupancy", {"value": 42, "unitCode": "P1"}),
        ("TrafficFlowObserved", "intensity", {"value": 1240}),
        ("WeatherObserved", "snowHeight", {"value": 3, "unitCode": "CMT"}),
        ("WeatherObserved", "windDirection", {"value": -180, "unitCode": "DD"}),
        ("WeatherObserved", "temperature", {"value": -273.15, "unitCode": "CEL"}),
        ("WaterQualityObserved", "orp", {"value": -350, "unitCode": "2Z"}),
        ("WaterQualityObserved", "tds", {"value": 410, "unitCode": "M1"}),
        ("WasteContainer", "cargoWeight", {"value": 0, "unitCode": "KGM"}),
        ("WasteContainer", "methaneConcentration", {"value": 2100, "unitCode": "GQ"}),
    ],
)
def test_normalized_values_in_allowed_units(type_name: str, name: str, value: Any) -> None:
    validate_payload(type_name, with_(type_name, **{name: value}))


@pytest.mark.parametrize(
    ("type_name", "name", "value"),
    [
        ("AirQualityObserved", "pm25", {"value": 35, "unitCode": "CEL"}),
        ("AirQualityObserved", "pm25", {"value": 35, "unitCode": "gq"}),
        ("AirQualityObserved", "pm25", {"value": 35, "unitCode": "µg/m³"}),
        ("AirQualityObserved", "pm25", {"value": 35, "unitCode": 5}),
        ("AirQualityObserved", "pm25", {"value": 35, "unitCode": None}),
        ("AirQualityObserved", "pm25", {"value": 35, "unitCode": ["GQ"]}),
        ("AirQualityObserved", "co2", {"value": 415, "unitCode": "GQ"}),
        ("AirQualityObserved", "temperature", {"value": 84, "unitCode": "FAH"}),
        ("TrafficFlowObserved", "intensity", {"value": 12, "unitCode": "E50"}),
        ("WeatherObserved", "precipitation", {"value": 1.2, "unitCode": "CMT"}),
        ("WeatherObserved", "uVIndexMax", {"value": 11, "unitCode": "C62"}),
        ("WaterQualityObserved", "turbidity", {"value": 35, "unitCode": "NTU"}),
        ("WaterQualityObserved", "pH", {"value": 7, "unitCode": "C62"}),
    ],
)
def test_wrong_unit_is_rejected(type_name: str, name: str, value: Any) -> None:
    err = rejected(type_name, with_(type_name, **{name: value}))
    assert err.reason == "bad_unit"
    assert str(err).startswith(f"{type_name} payload: {name}.unitCode: ")


def test_unitless_quantity_message_says_to_leave_the_unit_out() -> None:
    err = rejected(
        "WaterQualityObserved",
        with_("WaterQualityObserved", turbidity={"value": 35, "unitCode": "NTU"}),
    )
    assert "leave unitCode out" in str(err)


@pytest.mark.parametrize(
    ("type_name", "name", "value", "where"),
    [
        ("AirQualityObserved", "pm25", {"unitCode": "GQ"}, ""),
        ("AirQualityObserved", "pm25", {"value": "35", "unitCode": "GQ"}, ".value"),
        ("AirQualityObserved", "pm25", {"value": -1, "unitCode": "GQ"}, ".value"),
        ("AirQualityObserved", "pm25", {"value": True, "unitCode": "GQ"}, ".value"),
        ("AirQualityObserved", "pm25", {"value": math.nan, "unitCode": "GQ"}, ".value"),
        ("AirQualityObserved", "pm25", {"value": 35, "unitCode": "GQ", "unit": "x"}, ""),
        ("AirQualityObserved", "pm25", {"value": 35, "type": "Relationship"}, ".type"),
        ("AirQualityObserved", "pm25", {"value": 35, "observedAt": "today"}, ".observedAt"),
        ("AirQualityObserved", "relativeHumidity", {"value": 101, "unitCode": "P1"}, ".value"),
        ("AirQualityObserved", "relativeHumidity", {"value": 78, "unitCode": "C62"}, ".value"),
        ("AirQualityObserved", "relativeHumidity", {"value": 78}, ".value"),
        ("TrafficFlowObserved", "intensity", {"value": 12.0}, ".value"),
        ("WeatherObserved", "windDirection", {"value": 361, "unitCode": "DD"}, ".value"),
    ],
)
def test_bad_normalized_value(type_name: str, name: str, value: Any, where: str) -> None:
    err = rejected(type_name, with_(type_name, **{name: value}))
    assert err.reason == "bad_value"
    assert str(err).startswith(f"{type_name} payload: {name}{where}: ")


def quantity_rules() -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for type_name, spec in describe_types().items():
        for group in ("at_least_one_of", "optional"):
            for name, rule in spec[group].items():
                if rule["kind"] == "quantity":
                    out.append((type_name, name, rule))
    return out


def bound_values(rule: dict[str, Any], unit: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """Values just inside and just outside ``unit``'s described range, as floats and as
    ints (validation compares ints with separate integer bounds, so both are needed)."""
    inside: list[Any] = []
    outside: list[Any] = []
    for bound, direction, rounded in ((unit["min"], -1, math.ceil), (unit["max"], 1, math.floor)):
        if bound is None:
            inside.append(direction * 10**9)
            if not rule["integer"]:
                inside.append(direction * 1e9)
            continue
        edge = rounded(bound)  # the last int inside
        inside.append(edge)
        outside.append(edge + direction)
        if not rule["integer"]:
            inside.append(float(bound))
            outside.append(bound + direction * 0.5)
    if rule["integer"]:
        outside.append(0.5)
    return inside, outside


@pytest.mark.parametrize(("type_name", "name", "rule"), quantity_rules())
def test_described_units_and_bounds_are_the_ones_enforced(
    type_name: str, name: str, rule: dict[str, Any]
) -> None:
    # describe_types() is what docs and the CLI show: it must match validation exactly.
    assert rule["default_unit"] == rule["units"][0]["code"]
    for i, unit in enumerate(rule["units"]):
        wrap: Callable[[Any], Any]
        if unit["code"] is None:
            wrap = lambda v: {"value": v}  # noqa: E731
        else:
            wrap = lambda v, code=unit["code"]: {"value": v, "unitCode": code}  # noqa: E731
        inside, outside = bound_values(rule, unit)
        forms = [wrap, lambda v: v] if i == 0 else [wrap]  # default unit: plain numbers too
        for form in forms:
            for v in inside:
                validate_payload(type_name, with_(type_name, **{name: form(v)}))
            for v in outside:
                err = rejected(type_name, with_(type_name, **{name: form(v)}))
                assert err.reason == "bad_value", (v, str(err))


def test_module_docstring_table_lists_every_quantity_and_unit_code() -> None:
    doc = types.__doc__ or ""
    table = doc[doc.index("Measurements") :]
    for _type_name, name, rule in quantity_rules():
        assert f" {name} " in table.replace("\n", " ") or f"\n{name} " in table, name
        for unit in rule["units"]:
            if unit["code"] is not None:
                assert f" {unit['code']} " in table, (name, unit["code"])


# --------------------------------------------------------------------------- date-times


@pytest.mark.parametrize(
    "when",
    [
        "2026-11-28T07:00:00Z",
        "2026-11-28T07:00:00+07:00",
        "2026-11-28T07:00:00-03:30",
        "2026-11-28T07:00:00.123456789Z",
        "2026-11-28T07:00:00.5+09:00",
        "2026-11-28t07:00:00z",
        "2024-02-29T00:00:00Z",
        "2000-02-29T00:00:00Z",
        "2026-12-31T23:59:60Z",  # leap second (RFC 3339)
        "2026-04-30T23:59:59Z",
        "2026-01-31T00:00:00+14:00",
    ],
)
def test_valid_date_times(when: str) -> None:
    validate_payload("AirQualityObserved", with_("AirQualityObserved", dateObserved=when))


@pytest.mark.parametrize(
    "when",
    [
        "2026-11-28T07:00:00",  # no offset: ambiguous between cities
        "2026-11-28",
        "2026-11-28 07:00:00Z",
        "2026-11-28T07:00Z",
        "2026-11-28T07:00:00+0700",
        "2026-11-28T07:00:00+07",
        "20261128T070000Z",
        "2026-02-29T00:00:00Z",
        "1900-02-29T00:00:00Z",
        "2026-04-31T00:00:00Z",
        "2026-13-01T00:00:00Z",
        "2026-00-10T00:00:00Z",
        "2026-11-00T00:00:00Z",
        "2026-11-28T24:00:00Z",
        "2026-11-28T07:60:00Z",
        "2026-11-28T07:00:61Z",
        "2026-11-28T07:00:00.Z",
        "2026-11-28T07:00:00.1234567890Z",
        "2026-11-28T07:00:00+24:00",
        "2026-11-28T07:00:00Z\n",
        " 2026-11-28T07:00:00Z",
        "２０２６-11-28T07:00:00Z",  # non-ASCII digits
        "2026-W48-6T07:00:00Z",
        "",
    ],
)
def test_invalid_date_times(when: str) -> None:
    err = rejected("AirQualityObserved", with_("AirQualityObserved", dateObserved=when))
    assert err.reason == "bad_value"
    assert str(err).startswith("AirQualityObserved payload: dateObserved: ")


@pytest.mark.parametrize("when", [1764295200000, 1764295200.0, None, ["2026-11-28T07:00:00Z"]])
def test_date_times_must_be_strings(when: Any) -> None:
    err = rejected("AirQualityObserved", with_("AirQualityObserved", dateObserved=when))
    assert err.reason == "bad_value"


# --------------------------------------------------------------------------- GeoJSON


def point(*coords: Any) -> dict[str, Any]:
    return {"type": "Point", "coordinates": list(coords)}


def square(lon: float, lat: float, d: float) -> list[list[float]]:
    return [[lon, lat], [lon + d, lat], [lon + d, lat + d], [lon, lat + d], [lon, lat]]


@pytest.mark.parametrize(
    "location",
    [
        point(106.8230, -6.1950),
        point(106, -6),  # integers are numbers too
        point(106.8230, -6.1950, 8.5),
        point(-180, -90),
        point(180.0, 90.0),
        point(0, 0, -10),
        {"type": "Point", "coordinates": [106.8, -6.2], "bbox": [106, -7, 107, -6]},
        {"type": "LineString", "coordinates": [[127.02, 37.49], [127.03, 37.50]]},
        {"type": "LineString", "coordinates": [[127.0, 37.0]] * 1000},
        {"type": "Polygon", "coordinates": [square(106.8, -6.2, 0.1)]},
        {
            "type": "Polygon",
            "coordinates": [square(106.8, -6.2, 0.1), square(106.82, -6.18, 0.01)],
        },
    ],
)
def test_valid_locations(location: dict[str, Any]) -> None:
    validate_payload("AirQualityObserved", with_("AirQualityObserved", location=location))


@pytest.mark.parametrize(
    ("location", "where"),
    [
        (point(-6.1950, 106.8230), ".coordinates[1]"),  # lat/lon swapped
        (point(181, 0), ".coordinates[0]"),
        (point(-180.01, 0), ".coordinates[0]"),
        (point(180.5, -6.2), ".coordinates[0]"),  # floats take a faster path than ints
        (point(106.8, 90.5), ".coordinates[1]"),
        (point(106.8, -90.000001), ".coordinates[1]"),
        (point(106.8, "-6.2"), ".coordinates[1]"),
        (point(0, 90.5), ".coordinates[1]"),
        (point(0, -91), ".coordinates[1]"),
        (point(True, 0), ".coordinates[0]"),
        (point(0, False), ".coordinates[1]"),
        (point("106.8", "-6.2"), ".coordinates[0]"),
        (point(math.nan, 0), ".coordinates[0]"),
        (point(0, math.inf), ".coordinates[1]"),
        (point(0, 0, math.inf), ".coordinates[2]"),
        (point(0, 0, "8m"), ".coordinates[2]"),
        (point(106.8), ".coordinates"),
        (point(1, 2, 3, 4), ".coordinates"),
        ({"type": "Point", "coordinates": "106.8,-6.2"}, ".coordinates"),
        ({"type": "Point", "coordinates": {"lon": 106.8, "lat": -6.2}}, ".coordinates"),
        ({"type": "Point"}, ""),
        ({"coordinates": [106.8, -6.2]}, ".type"),
        ({"type": "point", "coordinates": [106.8, -6.2]}, ".type"),
        ({"type": "MultiPoint", "coordinates": [[106.8, -6.2]]}, ".type"),
        ({"type": "LineString", "coordinates": [[127.0, 37.5]]}, ".coordinates"),
        ({"type": "LineString", "coordinates": [[127.0, 37.5]] * 1001}, ".coordinates"),
        (
            {"type": "LineString", "coordinates": [[127.0, 37.5], [37.5, 127.0]]},
            ".coordinates[1][1]",
        ),
        ({"type": "LineString", "coordinates": [127.0, 37.5]}, ".coordinates"),
        ({"type": "Polygon", "coordinates": []}, ".coordinates"),
        ({"type": "Polygon", "coordinates": square(106.8, -6.2, 0.1)}, ".coordinates[0]"),
        ({"type": "Polygon", "coordinates": [square(106.8, -6.2, 0.1)[:-1]]}, ".coordinates[0]"),
        (
            {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [0, 0]]]},  # 3 positions
            ".coordinates[0]",
        ),
        ({"type": "Polygon", "coordinates": [square(0, 0, 1)] * 201}, ".coordinates[200]"),
        ("POINT(106.8 -6.2)", ""),
        ([106.8, -6.2], ""),
        (None, ""),
    ],
)
def test_invalid_locations(location: Any, where: str) -> None:
    err = rejected("AirQualityObserved", with_("AirQualityObserved", location=location))
    assert err.reason == "bad_value"
    assert str(err).startswith(f"AirQualityObserved payload: location{where}: ")


def test_swapped_coordinates_get_a_hint() -> None:
    err = rejected(
        "AirQualityObserved", with_("AirQualityObserved", location=point(-6.195, 106.823))
    )
    assert "swapped" in str(err)
    # A latitude that could not be a longitude either gets no such hint.
    err = rejected("AirQualityObserved", with_("AirQualityObserved", location=point(10, 500)))
    assert "swapped" not in str(err)


def test_ngsi_ld_geoproperty_gets_a_hint() -> None:
    location = {"type": "GeoProperty", "value": point(106.8, -6.2)}
    err = rejected("AirQualityObserved", with_("AirQualityObserved", location=location))
    assert "GeoProperty" in str(err)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"location": point(106.823, -6.195)}, (106.823, -6.195)),
        ({"location": point(106, -6, 12.0)}, (106.0, -6.0)),
        (seoul_traffic(), (127.0276, 37.4979)),
        ({"location": {"type": "Polygon", "coordinates": [square(1.5, 2.5, 1)]}}, (1.5, 2.5)),
        ({"location": point(-6.195, 106.823)}, None),  # swapped: unusable
        ({"location": point(True, 0)}, None),
        ({"location": point(math.nan, 0)}, None),
        ({"location": {"type": "MultiPoint", "coordinates": [[1, 2]]}}, None),
        ({"location": {"type": "LineString", "coordinates": []}}, None),
        ({"location": {"type": "Polygon", "coordinates": [[]]}}, None),
        ({"location": {"type": "Polygon", "coordinates": "x"}}, None),
        ({"location": {"type": ["Point"], "coordinates": [1, 2]}}, None),
        ({"location": "106.8,-6.2"}, None),
        ({}, None),
        (None, None),
        ([point(1, 2)], None),
    ],
)
def test_point_of(data: Any, expected: tuple[float, float] | None) -> None:
    got = point_of(data)
    assert got == expected
    if got is not None:
        assert all(type(x) is float for x in got)


# --------------------------------------------------------------------------- custom types


@pytest.mark.parametrize(
    "name",
    [
        "org.example.Noise",
        "id.go.jakarta.FloodGauge",
        "kr.seoul.topis.BusArrival2",
        "org.my-city.X",
        "a.b.C",
        "org.example." + "N" * (128 - len("org.example.")),
    ],
)
def test_namespaced_custom_types_are_accepted(name: str) -> None:
    assert is_custom_type(name)
    validate_payload(name, {})
    validate_payload(name, {"level_cm": 142, "anything": [None, {"deep": b"\x00"}]})


@pytest.mark.parametrize(
    "name",
    [
        "Noise",
        "example.Noise",  # one namespace label only
        "Org.example.Noise",
        "org.Example.Noise",
        "org.example.noise",
        "org.example.Noise.",
        "org..example.Noise",
        ".org.example.Noise",
        "org.example.Noise-Level",
        "org.example.Noise_Level",
        "org.example.Noise Level",
        "1org.example.Noise",
        "org.example.Noisé",
        "org.example.Noise\n",
        "org.example." + "N" * (129 - len("org.example.")),
        "airqualityobserved",
        "AirQualityObserved2",
        "FIWARE.AirQualityObserved",
        "",
        None,
        5,
        b"org.example.Noise",
        ["org.example.Noise"],
    ],
)
def test_unknown_types_are_rejected(name: Any) -> None:
    assert not is_custom_type(name)
    err = rejected(name, {"dateObserved": "2026-11-28T07:00:00Z"})
    assert err.reason == "unknown_type"
    assert "org.example.Noise" in str(err)  # says what a custom type name looks like


def test_builtin_names_are_not_custom_types() -> None:
    for name in BUILTIN_TYPES:
        assert not is_custom_type(name)


def test_wrong_case_of_a_builtin_name_gets_a_hint() -> None:
    err = rejected("weatherobserved", singapore_weather())
    assert "did you mean WeatherObserved?" in str(err)


@pytest.mark.parametrize("type_name", ["org.example.Noise", *sorted(BUILTIN_TYPES)])
@pytest.mark.parametrize("data", [None, [], "{}", 5, b"\x80"])
def test_a_payload_must_be_a_map(type_name: str, data: Any) -> None:
    err = rejected(type_name, data)
    assert err.reason == "bad_value"
    assert "must be a map" in str(err)


# --------------------------------------------------------------------------- describe_types


def test_describe_types_covers_every_builtin_type() -> None:
    described = describe_types()
    assert set(described) == BUILTIN_TYPES
    json.dumps(described)  # machine-readable: plain JSON data
    aqo = described["AirQualityObserved"]
    assert set(aqo["required"]) == {"dateObserved", "location"}
    assert aqo["required"]["location"]["kind"] == "geojson"
    assert aqo["required"]["dateObserved"]["kind"] == "datetime"
    pm25 = aqo["at_least_one_of"]["pm25"]
    assert pm25["default_unit"] == "GQ"
    assert [u["code"] for u in pm25["units"]] == ["GQ", "GP", "59", "61"]
    assert aqo["at_least_one_of"]["co"]["default_unit"] == "GP"
    assert "stationName" in aqo["optional"]
    traffic = described["TrafficFlowObserved"]
    assert traffic["alternatives"] == {"dateObserved": ["dateObservedFrom", "dateObservedTo"]}
    assert traffic["at_least_one_of"]["intensity"]["integer"] is True
    assert traffic["optional"]["laneDirection"] == {
        "kind": "enum",
        "values": ["forward", "backward"],
    }
    notice = described["CyberSecurityNotice"]
    assert notice["at_least_one_of"] == {}
    assert notice["required"]["description"]["max_length"] == 10000


def test_describe_types_returns_a_fresh_structure() -> None:
    first = describe_types()
    first["AirQualityObserved"]["required"].clear()
    assert describe_types()["AirQualityObserved"]["required"]


@pytest.mark.parametrize("type_name", sorted(EXAMPLES))
def test_every_example_attribute_is_described(type_name: str) -> None:
    spec = describe_types()[type_name]
    described = set(spec["required"]) | set(spec["at_least_one_of"]) | set(spec["optional"])
    extras = {"id", "type"}
    assert set(EXAMPLES[type_name]()) - extras <= described


# --------------------------------------------------------------------------- never crashes

# Values as strict msgpack decoding produces them, plus NaN/inf and tuples.
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.binary(max_size=16)
    | st.sampled_from(["Point", "LineString", "Polygon", "GQ", "P1", "2026-02-29T00:00:00Z"])
)
NAMES = sorted(
    {
        name
        for spec in describe_types().values()
        for group in ("required", "at_least_one_of", "optional")
        for name in spec[group]
    }
    | {"value", "unitCode", "type", "coordinates", "observedAt", "dateObservedFrom"}
)
KEYS = st.sampled_from(NAMES) | st.text(max_size=70) | st.integers()
VALUES = st.recursive(
    LEAVES,
    lambda children: (
        st.lists(children, max_size=6)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(KEYS, children, max_size=6)
    ),
    max_leaves=20,
)
TYPE_NAMES = st.sampled_from([*sorted(BUILTIN_TYPES), "org.example.Noise"]) | VALUES


def check_never_crashes(type_name: Any, data: Any) -> None:
    try:
        validate_payload(type_name, data)
    except PayloadError as err:
        assert err.reason in {"unknown_type", "missing_field", "bad_value", "bad_unit", "bad_key"}
        assert "\n" not in str(err)
    got = point_of(data)
    assert got is None or (type(got) is tuple and len(got) == 2)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TYPE_NAMES, VALUES)
def test_arbitrary_values_only_ever_raise_payload_error(type_name: Any, data: Any) -> None:
    check_never_crashes(type_name, data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(EXAMPLES)),
    st.dictionaries(KEYS, VALUES, max_size=3),
    st.lists(st.sampled_from(NAMES), max_size=3),
)
def test_mutated_examples_only_ever_raise_payload_error(
    type_name: str, changes: dict[Any, Any], removed: list[str]
) -> None:
    # Start from a valid payload so that the checks after the first attribute run too.
    data: dict[Any, Any] = EXAMPLES[type_name]()
    data.update(changes)
    for name in removed:
        data.pop(name, None)
    check_never_crashes(type_name, data)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["ipv4", "ipv6", "domain", "url", "sha256", "md5", "cve", "email", "other"])
    | VALUES,
    st.text(max_size=80) | st.from_regex(r"[0-9a-f:./]{1,40}", fullmatch=True) | VALUES,
)
def test_arbitrary_indicators_only_ever_raise_payload_error(kind: Any, value: Any) -> None:
    data = with_("CyberSecurityNotice", indicators=[{"type": kind, "value": value}])
    check_never_crashes("CyberSecurityNotice", data)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40) | st.from_regex(r"[0-9Tt:+\-.Zz]{10,35}", fullmatch=True))
def test_arbitrary_date_strings_only_ever_raise_payload_error(when: str) -> None:
    data = without("TrafficFlowObserved", "dateObserved")
    data["dateObservedFrom"] = when
    data["dateObservedTo"] = when
    check_never_crashes("TrafficFlowObserved", data)
