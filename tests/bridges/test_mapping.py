"""The bridges' config and message mapping: pure, no event loop, no broker."""

from __future__ import annotations

import json

import pytest

from citynode.bridges.config import Route, parse_path, parse_template, parse_topic_filter
from citynode.bridges.mapping import map_message, message_key, topic_matches
from citynode.config import parse_config, render_config
from citynode.errors import ConfigError, UnmappableMessage

NODE = '[node]\nname = "Jakarta"\n'
BRIDGE = """
[[bridges.mqtt]]
name = "air"
host = "broker.example.org"
{extra}
[[bridges.mqtt.routes]]
topic = "city/air/+/reading"
feed = "air-quality"
type = "AirQualityObserved"
{route}
"""


def bridges(extra: str = "", route: str = "", node: str = NODE) -> object:
    return parse_config(node + BRIDGE.format(extra=extra, route=route)).bridges


@pytest.mark.parametrize(("pattern", "topic", "match"), [
    ("a/+/c", "a/b/c", True),
    ("a/+/c", "a/b/d", False),
    ("a/+", "a/b/c", False),
    ("a/#", "a", True),
    ("a/#", "a/b/c", True),
    ("#", "a/b", True),
    ("#", "$SYS/broker", False),
    ("+/x", "$SYS/x", False),
    ("$SYS/#", "$SYS/x", True),
    ("a/b", "a/b", True),
    ("a/b", "a/b/", False),
    ("a/+", "a/", True),
])
def test_topic_filters_match_as_mqtt_says(pattern: str, topic: str, match: bool) -> None:
    assert topic_matches(parse_topic_filter(pattern), topic) is match


@pytest.mark.parametrize("bad", ["", "a/b#", "a/#/c", "a+/b", "a/\x00"])
def test_bad_topic_filters_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_topic_filter(bad)


def test_templates_and_paths_parse() -> None:
    assert parse_path("readings.0.value") == ("readings", 0, "value")
    assert parse_template("st-{topic.2}/{a.b}") == ("st-", ("topic", 2), "/",
                                                    ("field", ("a", "b")))
    for bad in ("{topic.x}", "{a..b}", "a}", "{", ""):
        with pytest.raises(ValueError):
            parse_template(bad)


ROUTES = (
    Route(topic="city/air/+/reading", feed="air-quality", type="AirQualityObserved",
          subject=parse_template("station-{topic.2}-{meta.id}"),
          fields=(("pm25", ("v", 0)), ("dateObserved", ("ts",)))),
    Route(topic="city/#", feed="misc", type="org.example.Thing"),
)


def test_a_message_maps_by_the_first_matching_route() -> None:
    doc = {"v": [12.5], "ts": "2026-12-07T07:00:00Z", "meta": {"id": 7}, "junk": 1}
    m = map_message(ROUTES, "city/air/hi/reading", json.dumps(doc).encode(), 1000)
    assert (m.feed, m.type, m.subject) == ("air-quality", "AirQualityObserved",
                                           "station-hi-7")
    assert m.data == {"pm25": 12.5, "dateObserved": "2026-12-07T07:00:00Z"}
    other = map_message(ROUTES, "city/noise", b'{"db": 40}', 1000)
    assert (other.feed, other.subject, other.data) == ("misc", None, {"db": 40})


@pytest.mark.parametrize(("topic", "payload", "reason"), [
    ("city/noise", b"x" * 1001, "too_large"),
    ("elsewhere", b"{}", "no_route"),
    ("city/noise", b"\xff{}", "not_json"),
    ("city/noise", b"{'a': 1}", "not_json"),
    ("city/noise", b'{"a": NaN}', "not_json"),
    ("city/noise", b"[" * 100 + b"]" * 100, "not_json"),
    ("city/noise", b'{"a":' * 100 + b"1" + b"}" * 100, "not_json"),
    ("city/noise", b"[1]", "not_object"),
    ("city/air/hi/reading", b'{"v": [], "ts": "t", "meta": {"id": 1}}', "missing_field"),
    ("city/air/hi/reading", b'{"v": 3, "ts": "t", "meta": {"id": 1}}', "not_object"),
    ("city/air/hi/reading", b'{"v": [1], "ts": "t", "meta": {"id": {}}}', "bad_subject"),
    ("city/air/hi/reading", b'{"v": [1], "ts": "t"}', "missing_field"),
])
def test_messages_that_cannot_map_say_why(topic: str, payload: bytes, reason: str) -> None:
    with pytest.raises(UnmappableMessage) as e:
        map_message(ROUTES, topic, payload, 1000)
    assert e.value.reason == reason


def test_message_identity_covers_bridge_topic_and_bytes() -> None:
    keys = {message_key("a", "t/1", b"x"), message_key("b", "t/1", b"x"),
            message_key("a", "t/1x", b""), message_key("a", "t/1", b"xx")}
    assert len(keys) == 4 and message_key("a", "t/1", b"x") in keys


def test_a_bridge_table_loads_with_its_defaults() -> None:
    (b,) = bridges(route='subject = "{topic.2}"\nfields = { pm25 = "v.pm25" }').mqtt
    assert (b.port, b.tls, b.client_id, b.max_message_bytes) == (1883, False,
                                                                 "citynode-air", 65536)
    (tls,) = bridges('ca_file = "ca.pem"\nusername = "u"\npassword_file = "pw"').mqtt
    assert (tls.port, tls.tls) == (8883, True)


@pytest.mark.parametrize(("extra", "route", "message"), [
    ("colour = 1", "", "[[bridges.mqtt]] #1 colour: unknown key"),
    ("prot = 1", "", "did you mean port?"),
    ("port = 70000", "", "port: must be 1 to 65535"),
    ('port = "1883"', "", "port: expected an integer"),
    ('cert_file = "c.pem"\ntls = true', "", "needs both cert_file and key_file"),
    ('ca_file = "c.pem"\ntls = false', "", "tls: is false, but certificate files"),
    ('password_file = "pw"', "", "password_file: needs a username"),
    ("max_message_bytes = 70000", "", "max_body_bytes (65536)"),
    ("", 'subject = "{topic.9}"', "has only 4 levels"),
    ("", 'fields = { pm25 = 3 }', 'expected a path string like "values.pm25"'),
    ("", "fields = {}", "give 1 to 256"),
])
def test_bad_bridge_tables_are_one_line_errors(extra: str, route: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        bridges(extra, route)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_routes_and_names_are_refused() -> None:
    for text, message in [
        (BRIDGE.replace('"air-quality"', '"Air Quality"'), "routes #1 feed"),
        (BRIDGE.replace('"AirQualityObserved"', '"Nope"'), "unknown payload type 'Nope'"),
        (BRIDGE.replace('"city/air/+/reading"', '"city/#/x"'), "'#' must be"),
        (BRIDGE.replace('name = "air"', 'name = "Air!"'), "name: must be 1-32"),
        (BRIDGE + BRIDGE.replace('host = "broker.example.org"', 'host = "b"'),
         "'air' is used twice"),
        ("[bridges.kafka]\nx = 1\n", "unknown bridge kind"),
        ("[bridges.mqtt]\nname = 'x'\n", "write it as [[bridges.mqtt]]"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("+", r"\+")):
            parse_config(NODE + text.format(extra="", route=""))


def test_the_rendered_template_shows_a_bridge_and_still_loads() -> None:
    text = render_config("Jakarta", "127.0.0.1:8443", "https://127.0.0.1:8443", ["localhost"])
    assert "# [[bridges.mqtt]]" in text and "docs/BRIDGES.md" in text
    assert parse_config(text).bridges.mqtt == ()
    # Uncommented, the example is a valid bridge.
    start = text.index("# [[bridges.mqtt]]\n")
    example = "\n".join(line[2:] for line in text[start:].splitlines())
    (b,) = parse_config(NODE + example).bridges.mqtt
    assert b.tls and b.routes[0].fields is not None
