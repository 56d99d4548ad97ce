"""Egress policy (core/egress.py): what of a payload may leave the city. Pure."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from citynode.core.egress import MAX_DEPTH, OPEN, EgressPolicy, apply, parse_policy
from citynode.core.types import validate_payload
from citynode.errors import ConfigError, PayloadError

AIR = {
    "dateObserved": "2026-11-28T07:03:27.250+07:00",
    "location": {"type": "Point", "coordinates": [106.822912, -6.194417, 12.5]},
    "name": "DKI1 Bundaran HI, next to the house of Ibu Sari",
    "pm25": 35.5,
    "operatorPhone": "+62 21 555 0100",
}


def test_the_open_policy_changes_nothing() -> None:
    out = apply(OPEN, "AirQualityObserved", AIR)
    assert out.data == AIR and out.changes == ()
    assert OPEN.is_open and OPEN.settings() == {}


def test_a_personal_data_field_is_refused_by_name_never_dropped() -> None:
    policy = EgressPolicy(deny=frozenset({"operatorPhone", "email"}))
    with pytest.raises(PayloadError) as e:
        apply(policy, "AirQualityObserved", AIR)
    assert e.value.reason == "egress_denied"
    assert "operatorPhone" in str(e.value) and "email" not in str(e.value)
    without = {k: v for k, v in AIR.items() if k != "operatorPhone"}
    assert apply(policy, "AirQualityObserved", without).data == without


@pytest.mark.parametrize(("payload", "path"), [
    ({"contact": {"email": "sari@example.id"}}, "contact.email"),
    ({"location": {"type": "Point", "coordinates": [1, 2], "email": "x"}}, "location.email"),
    ({"Email": "sari@example.id"}, "Email"),
    ({"owners": [{"name": "a"}, {"contact": {"EMAIL": "x"}}]}, "owners[1].contact.EMAIL"),
    ({"a": {"b": {"c": {"d": {"e": {"ſtraße": 1}}}}}}, "a.b.c.d.e.ſtraße"),  # casefold
])
def test_a_denied_attribute_is_refused_at_any_depth_and_in_any_case(
        payload: dict[str, object], path: str) -> None:
    policy = EgressPolicy(deny=frozenset({"email", "STRASSE"}))
    with pytest.raises(PayloadError) as e:
        apply(policy, "X", {"pm25": 3, **payload})
    assert e.value.reason == "egress_denied"
    assert f"attribute {path} may not leave" in str(e.value)


def test_every_denied_path_is_named_and_a_clean_nested_payload_passes() -> None:
    policy = EgressPolicy(deny=frozenset({"email", "phone"}))
    with pytest.raises(PayloadError, match=r"attribute a\.Phone, b\[0\]\.email may not"):
        apply(policy, "X", {"b": [{"email": 1}], "a": {"Phone": 2}})
    clean = {"contact": {"emails": 1, "name": "x"}, "list": [[{"mail": 2}]]}
    assert apply(policy, "X", clean).data == clean


def test_walking_a_payload_is_bounded() -> None:
    deep: dict[str, object] = {"x": 1}
    for _ in range(MAX_DEPTH + 1):
        deep = {"n": deep}
    for policy in (EgressPolicy(deny=frozenset({"email"})),
                   EgressPolicy(time_resolution_seconds=60)):
        with pytest.raises(PayloadError) as e:
            apply(policy, "X", deep)
        assert e.value.reason == "too_deep"


def test_an_allowed_name_that_folds_to_a_denied_one_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="both allowed and denied: Email"):
        EgressPolicy(allow=frozenset({"Email", "pm25"}), deny=frozenset({"email"}))


def test_a_type_not_allowed_is_refused() -> None:
    policy = EgressPolicy(types=frozenset({"WeatherObserved"}))
    with pytest.raises(PayloadError) as e:
        apply(policy, "AirQualityObserved", AIR)
    assert e.value.reason == "egress_type" and "WeatherObserved" in str(e.value)


def test_coarsening_location_time_and_text() -> None:
    policy = EgressPolicy(allow=frozenset({"dateObserved", "location", "name", "pm25"}),
                          location_decimals=2, time_resolution_seconds=900,
                          text_max_chars=12)
    out = apply(policy, "AirQualityObserved", AIR)
    assert out.data == {
        "dateObserved": "2026-11-28T07:00:00+07:00",
        "location": {"type": "Point", "coordinates": [106.82, -6.19, 12.5]},  # altitude kept
        "name": "DKI1 Bundara",
        "pm25": 35.5,
    }
    assert out.changes == (
        "removed operatorPhone (not on the allow-list)",
        "location coarsened to 2 decimals",
        "dateObserved rounded down to 900 s",
        "name cut to 12 characters",
    )
    validate_payload("AirQualityObserved", out.data)  # still a valid payload
    assert AIR["name"].startswith("DKI1 Bundaran HI")  # the input is not modified


def test_grid_snapping_and_text_removal() -> None:
    policy = EgressPolicy(location_grid_degrees=0.05, text_max_chars=0)
    line = {"type": "LineString", "coordinates": [[106.8229, -6.1944], [106.874, -6.126]]}
    out = apply(policy, "TrafficFlowObserved", {"location": line, "name": "x"})
    assert out.data == {"location": {"type": "LineString",
                                     "coordinates": [[106.8, -6.2], [106.85, -6.15]]}}


@pytest.mark.parametrize(("given_", "res", "expected"), [
    ("2026-11-28T07:03:27Z", 60, "2026-11-28T07:03:00Z"),
    ("2026-11-28T07:03:27.999999999-03:30", 3600, "2026-11-28T06:30:00-03:30"),
    ("2026-11-28T23:59:60Z", 60, "2026-11-29T00:00:00Z"),  # a leap second: next minute
    ("2026-11-28T07:03:27z", 86400, "2026-11-28T00:00:00Z"),
])
def test_time_is_floored_to_the_epoch_grid_in_its_own_offset(given_: str, res: int,
                                                              expected: str) -> None:
    out = apply(EgressPolicy(time_resolution_seconds=res), "X", {"t": given_, "n": "7"})
    assert out.data == {"t": expected, "n": "7"}


def test_time_is_coarsened_at_any_depth_deterministically() -> None:
    payload = {
        "dateObserved": "2026-11-28T07:03:27Z",
        "pm25": {"value": 35.5, "observedAt": "2026-11-28T07:04:59.5+07:00",
                 "metadata": {"since": "2026-11-28T07:01:00Z", "note": "07:01"}},
        "readings": [{"at": "2026-11-28T07:02:10Z"}, "2026-11-28T07:09:00Z", 4],
    }
    policy = EgressPolicy(time_resolution_seconds=300)
    out = apply(policy, "X", payload)
    assert out.data == {
        "dateObserved": "2026-11-28T07:00:00Z",
        "pm25": {"value": 35.5, "observedAt": "2026-11-28T07:00:00+07:00",
                 "metadata": {"since": "2026-11-28T07:00:00Z", "note": "07:01"}},
        "readings": [{"at": "2026-11-28T07:00:00Z"}, "2026-11-28T07:05:00Z", 4],
    }
    assert out.changes == (
        "dateObserved rounded down to 300 s",
        "pm25.metadata.since rounded down to 300 s",
        "pm25.observedAt rounded down to 300 s",
        "readings[0].at rounded down to 300 s",
        "readings[1] rounded down to 300 s",
    )
    assert payload["pm25"]["observedAt"].endswith("59.5+07:00")  # type: ignore[index]
    # The same payload with its keys in another order gives the same result.
    again = apply(policy, "X", dict(reversed(list(payload.items()))))
    assert again.data == out.data and again.changes == out.changes
    assert apply(policy, "X", out.data).changes == ()  # idempotent


def test_the_digest_covers_every_rule_and_nothing_else() -> None:
    a = EgressPolicy(deny=frozenset({"phone"}), location_decimals=3)
    assert a.digest() == EgressPolicy(location_decimals=3, deny=frozenset({"phone"})).digest()
    others = [EgressPolicy(deny=frozenset({"email"}), location_decimals=3),
              EgressPolicy(deny=frozenset({"phone"}), location_decimals=2),
              EgressPolicy(deny=frozenset({"phone"}), location_grid_degrees=0.001),
              EgressPolicy(deny=frozenset({"phone"}), location_decimals=3,
                           time_resolution_seconds=60), OPEN]
    assert len({a.digest(), *(o.digest() for o in others)}) == 1 + len(others)


def test_bad_policies_are_config_errors() -> None:
    for bad in ({"location_decimals": 2, "location_grid_degrees": 0.1},
                {"location_decimals": 13}, {"location_grid_degrees": 0.0},
                {"time_resolution_seconds": 0}, {"text_max_chars": -1},
                {"allow": ["a"], "deny": ["a"]}, {"deny": [""]}):
        with pytest.raises(ConfigError, match=r"\[feeds.f.egress\]"):
            parse_policy(bad, "[feeds.f.egress]")


@given(st.floats(-180, 180), st.floats(-90, 90), st.integers(0, 12))
def test_rounding_is_idempotent_and_close(lon: float, lat: float, n: int) -> None:
    policy = EgressPolicy(location_decimals=n)
    once = apply(policy, "X", {"location": {"type": "Point", "coordinates": [lon, lat]}})
    twice = apply(policy, "X", once.data)
    assert twice.data == once.data
    got = once.data["location"]["coordinates"]
    assert abs(got[0] - lon) <= 10 ** -n and abs(got[1] - lat) <= 10 ** -n


# ------------------------------------------------------------------ the record's subject


def test_a_denied_subject_is_refused_naming_it() -> None:
    """The subject leaves in the payload map: a deny-list naming it refuses the record,
    never drops the subject silently; a record without a subject passes."""
    policy = EgressPolicy(deny=frozenset({"Subject"}))
    with pytest.raises(PayloadError) as e:
        apply(policy, "X", {"pm25": 3}, "Ibu Sari's house")
    assert e.value.reason == "egress_denied"
    assert "attribute subject (the record's subject) may not leave" in str(e.value)
    assert apply(policy, "X", {"pm25": 3}).subject is None
    both = EgressPolicy(deny=frozenset({"subject", "phone"}))
    with pytest.raises(PayloadError, match=r"attribute phone, subject \(the record's"):
        apply(both, "X", {"phone": 1}, "s")


def test_free_text_rules_cut_or_remove_the_subject() -> None:
    long = "DKI1 next to the house of Ibu Sari"
    cut = apply(EgressPolicy(text_max_chars=4), "X", {"pm25": 3}, long)
    assert cut.subject == "DKI1"
    assert cut.changes == ("subject (the record's subject) cut to 4 characters",)
    gone = apply(EgressPolicy(text_max_chars=0), "X", {"pm25": 3}, long)
    assert gone.subject is None
    assert gone.changes == ("removed subject (the record's subject) (free text)",)
    # Not a free-text attribute when the operator's list leaves it out.
    kept = apply(EgressPolicy(text_max_chars=0, text_attributes=("name",)), "X", {}, long)
    assert kept.subject == long and kept.changes == ()
    assert apply(EgressPolicy(text_max_chars=40), "X", {}, "DKI1").subject == "DKI1"


def test_an_allow_list_without_subject_removes_it_and_time_rules_round_it() -> None:
    out = apply(EgressPolicy(allow=frozenset({"pm25"})), "X", {"pm25": 3}, "DKI1")
    assert out.subject is None
    assert out.changes == ("removed subject (the record's subject) (not on the allow-list)",)
    assert apply(EgressPolicy(allow=frozenset({"pm25", "subject"})), "X", {"pm25": 3},
                 "DKI1").subject == "DKI1"
    timed = apply(EgressPolicy(time_resolution_seconds=3600), "X", {},
                  "2026-11-28T07:03:27+07:00")
    assert timed.subject == "2026-11-28T07:00:00+07:00"
    assert timed.changes == ("subject (the record's subject) rounded down to 3600 s",)
