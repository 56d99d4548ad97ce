"""``[[bridges.mqtt]]`` tables of node.toml: parsed and validated, one error a line.

An MQTT bridge names a broker, how to log in to it, and routes: each route maps an MQTT
topic filter (``+`` one level, ``#`` the rest) to a feed, a payload type, a subject
template and, optionally, field paths::

    [[bridges.mqtt]]
    name = "air"
    host = "broker.jakarta.example"
    ca_file = "broker-ca.pem"          # TLS (on by default when a CA file is given)

    [[bridges.mqtt.routes]]
    topic = "city/air/+/reading"
    feed = "air-quality"
    type = "AirQualityObserved"
    subject = "station-{topic.2}"      # topic level 2 (from 0); or {a.b}: a message field
    fields = { pm25 = "values.pm25", dateObserved = "ts", location = "geo" }

Without ``fields`` the message's JSON object is the payload as it is. Relative file
paths are relative to the data dir. Secrets are not kept in node.toml: the password is
read from ``password_file``.

Pure: no file is read here (the bridge opens its files when it starts).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

from citynode.core.records import check_feed_name
from citynode.core.types import BUILTIN_TYPES, is_custom_type
from citynode.errors import ConfigError, InvalidRecord

__all__ = [
    "BRIDGES_HELP",
    "BridgesConfig",
    "MqttBridgeConfig",
    "NgsiBridgeConfig",
    "Path",
    "Route",
    "Template",
    "parse_bridges",
    "parse_path",
    "parse_template",
    "parse_topic_filter",
]

#: A field path: keys of JSON objects, and indexes (ints) of arrays.
Path = tuple[str | int, ...]
#: A subject template: literal text, ("topic", level) or ("field", path) parts.
Template = tuple[str | tuple[str, int] | tuple[str, Path], ...]

#: The commented example `citynode init` writes at the end of node.toml.
BRIDGES_HELP = """\
# ---- [[bridges.mqtt]] -------------------------------------------------------------------
# MQTT in: the node subscribes to a broker (QoS 1, persistent session) and publishes each
# message as a record of a feed, once. See docs/BRIDGES.md for every key.
#
# [[bridges.mqtt]]
# name = "air"                        # 1-32 of a-z 0-9 _ -
# host = "broker.example.org"
# ca_file = "broker-ca.pem"           # TLS, on when a CA file is given (port 8883)
# username = "citynode"               # and password_file = "mqtt-password"
#
# [[bridges.mqtt.routes]]
# topic = "city/air/+/reading"        # + one level, # the rest
# feed = "air-quality"
# type = "AirQualityObserved"
# subject = "station-{topic.2}"       # {topic.N}: level N from 0; {a.b}: a message field
# fields = { pm25 = "values.pm25", dateObserved = "ts", location = "geo" }
"""


_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}", re.ASCII)
_CLIENT_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}", re.ASCII)
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
_MAX_ROUTES = 256
_MAX_FIELDS = 256
_MAX_TOPIC = 1024


@dataclass(frozen=True, slots=True)
class Route:
    """One ``[[bridges.mqtt.routes]]`` entry: messages on ``topic`` become records."""

    topic: str
    feed: str
    type: str
    subject: Template | None = None
    #: payload attribute -> path in the message; None: the message object as it is.
    fields: tuple[tuple[str, Path], ...] | None = None


@dataclass(frozen=True, slots=True)
class MqttBridgeConfig:
    """One ``[[bridges.mqtt]]`` table (see the module docstring)."""

    name: str
    host: str
    port: int
    client_id: str
    tls: bool
    ca_file: str
    cert_file: str
    key_file: str
    username: str
    password_file: str
    keepalive_seconds: int
    max_message_bytes: int
    backoff_max_seconds: float
    dedupe_hours: float
    dead_letter_rows: int
    routes: tuple[Route, ...]


@dataclass(frozen=True, slots=True)
class NgsiBridgeConfig:
    """One ``[[bridges.ngsi]]`` table: the endpoint ``POST /v1/bridges/ngsi/<name>``
    takes the notifications of an NGSI-LD or NGSI-v2 context broker (docs/BRIDGES.md)."""

    name: str
    feed: str
    #: entity type -> feed, for entity types not on ``feed``
    feeds: tuple[tuple[str, str], ...]
    #: entity type -> payload type; the built-in Smart Data Models types map to
    #: themselves unless listed
    types: tuple[tuple[str, str], ...]
    #: context URLs (besides the NGSI-LD core and Smart Data Models ones) whose terms
    #: are the Smart Data Models'
    contexts: tuple[str, ...]
    #: "+hh:mm" given to date-times that have no offset ("" : such a date-time is refused)
    local_time_offset: str
    max_notification_bytes: int
    max_entities: int
    dedupe_hours: float
    dead_letter_rows: int

    def feed_of(self, entity_type: str) -> str:
        return dict(self.feeds).get(entity_type, self.feed)

    def type_of(self, entity_type: str) -> str | None:
        """The payload type of an entity type, or None if this bridge takes none."""
        mapped = dict(self.types).get(entity_type)
        if mapped is not None:
            return mapped
        return entity_type if entity_type in BUILTIN_TYPES else None


@dataclass(frozen=True, slots=True)
class BridgesConfig:
    """The ``[bridges]`` section: every bridge the node runs."""

    mqtt: tuple[MqttBridgeConfig, ...] = ()
    ngsi: tuple[NgsiBridgeConfig, ...] = ()


# (name, type, default, check) of the keys of one [[bridges.mqtt]] table; default None:
# computed (see _mqtt), ... : required.
_MQTT_KEYS: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "name": (str, ...),
    "host": (str, ...),
    "port": (int, None),
    "client_id": (str, None),
    "tls": (bool, None),
    "ca_file": (str, ""),
    "cert_file": (str, ""),
    "key_file": (str, ""),
    "username": (str, ""),
    "password_file": (str, ""),
    "keepalive_seconds": (int, 60),
    "max_message_bytes": (int, None),
    "backoff_max_seconds": ((int, float), 60.0),
    "dedupe_hours": ((int, float), 168.0),
    "dead_letter_rows": (int, 10000),
    "routes": (list, ...),
}
_NGSI_KEYS: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "name": (str, ...),
    "feed": (str, ...),
    "feeds": (dict, None),
    "types": (dict, None),
    "contexts": (list, None),
    "local_time_offset": (str, ""),
    "max_notification_bytes": (int, None),
    "max_entities": (int, 1000),
    "dedupe_hours": ((int, float), 168.0),
    "dead_letter_rows": (int, 10000),
}
_OFFSET_RE = re.compile(r"[+-](?:[01][0-9]|2[0-3]):[0-5][0-9]|Z", re.ASCII)
_ENTITY_TYPE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,127}", re.ASCII)
_MAX_CONTEXTS = 64
_ROUTE_KEYS: dict[str, tuple[type, Any]] = {
    "topic": (str, ...),
    "feed": (str, ...),
    "type": (str, ...),
    "subject": (str, None),
    "fields": (dict, None),
}
_KIND = {str: "a string", int: "an integer", bool: "true or false", list: "an array",
         dict: "a table", (int, float): "a number"}


def parse_topic_filter(text: str) -> str:
    """Check an MQTT topic filter (``+`` a whole level, ``#`` only last); return it.
    Raises :class:`ValueError` saying what is wrong."""
    if not text or len(text.encode("utf-8")) > _MAX_TOPIC:
        raise ValueError(f"must be 1 to {_MAX_TOPIC} bytes")
    if "\x00" in text:
        raise ValueError("must not contain NUL")
    levels = text.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"{text!r}: '#' must be a whole level, and the last one")
        if "+" in level and level != "+":
            raise ValueError(f"{text!r}: '+' must be a whole level")
    return text


def parse_path(text: str) -> Path:
    """``"values.pm25"`` or ``"readings.0.value"`` -> a field path (digits index arrays).
    Raises :class:`ValueError`."""
    if not text or any(not part for part in text.split(".")):
        raise ValueError(f"field path {text!r} has an empty part (write a.b.c)")
    return tuple(int(p) if p.isascii() and p.isdigit() else p for p in text.split("."))


def parse_template(text: str) -> Template:
    """A subject template: literal text with ``{topic.N}`` (topic level N, from 0) and
    ``{a.b}`` (a field of the message) placeholders. Raises :class:`ValueError`."""
    parts: list[str | tuple[str, int] | tuple[str, Path]] = []
    pos = 0
    for m in _PLACEHOLDER_RE.finditer(text):
        if m.start() > pos:
            parts.append(text[pos:m.start()])
        inner = m.group(1).strip()
        if inner.startswith("topic."):
            level = inner[6:]
            if not (level.isascii() and level.isdigit()):
                raise ValueError(f"{{{inner}}}: a topic level is {{topic.N}}, N from 0")
            parts.append(("topic", int(level)))
        else:
            parts.append(("field", parse_path(inner)))
        pos = m.end()
    rest = text[pos:]
    if "{" in rest or "}" in rest or any("{" in p or "}" in p for p in parts
                                          if isinstance(p, str)):
        raise ValueError(f"{text!r}: unbalanced braces")
    if rest:
        parts.append(rest)
    if not parts:
        raise ValueError("is empty (leave it out for no subject)")
    return tuple(parts)


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {where}: {message}")

    def table(self, where: str, table: object, keys: dict[str, tuple[Any, Any]]
              ) -> dict[str, Any]:
        if not isinstance(table, dict):
            raise self.fail(where, f"expected a table, got {type(table).__name__}")
        for name in table:
            if name not in keys:
                match = difflib.get_close_matches(name, list(keys), n=1, cutoff=0.6)
                hint = f"; did you mean {match[0]}?" if match else ""
                raise self.fail(f"{where} {name}", "unknown key" + hint)
        out: dict[str, Any] = {}
        for name, (kind, default) in keys.items():
            if name not in table:
                if default is ...:
                    raise self.fail(f"{where} {name}", "is required")
                out[name] = default
                continue
            value = table[name]
            kinds = kind if isinstance(kind, tuple) else (kind,)
            if type(value) not in kinds:  # type(): a bool is not an int in node.toml
                raise self.fail(f"{where} {name}", f"expected {_KIND[kind]}, got {value!r}")
            out[name] = float(value) if kind == (int, float) else value
        return out


def parse_bridges(table: object, source: str, max_body_bytes: int) -> BridgesConfig:
    """Parse the ``[bridges]`` section (``{"mqtt": [ {...}, ... ]}``) of a node.toml.

    ``max_body_bytes`` is the default (and most) ``max_message_bytes``. Raises
    :class:`ConfigError` naming the file, the bridge and the key.
    """
    r = _Reader(source)
    if not isinstance(table, dict):
        raise r.fail("[bridges]", "expected tables like [[bridges.mqtt]]")
    for kind in table:
        if kind not in ("mqtt", "ngsi"):
            raise r.fail(f"[bridges.{kind}]", 'unknown bridge kind (known: "mqtt", "ngsi")')
    items = table.get("mqtt", [])
    if not isinstance(items, list):
        raise r.fail("[bridges.mqtt]", "write it as [[bridges.mqtt]] (an array of tables)")
    bridges: list[MqttBridgeConfig] = []
    for i, item in enumerate(items):
        b = _mqtt(r, i, item, max_body_bytes)
        if any(o.name == b.name for o in bridges):
            raise r.fail(f"[[bridges.mqtt]] #{i + 1} name", f"{b.name!r} is used twice")
        if any(o.client_id == b.client_id and o.host == b.host and o.port == b.port
               for o in bridges):
            raise r.fail(f"[[bridges.mqtt]] {b.name} client_id",
                         f"{b.client_id!r} is used by another bridge to the same broker")
        bridges.append(b)
    ngsi_items = table.get("ngsi", [])
    if not isinstance(ngsi_items, list):
        raise r.fail("[bridges.ngsi]", "write it as [[bridges.ngsi]] (an array of tables)")
    ngsi: list[NgsiBridgeConfig] = []
    for i, item in enumerate(ngsi_items):
        n = _ngsi(r, i, item, max_body_bytes)
        if n.name in {o.name for o in bridges} | {o.name for o in ngsi}:
            # dead letters and metrics are kept by bridge name, whatever its kind
            raise r.fail(f"[[bridges.ngsi]] #{i + 1} name", f"{n.name!r} is used twice")
        ngsi.append(n)
    return BridgesConfig(mqtt=tuple(bridges), ngsi=tuple(ngsi))


def _feed_name(r: _Reader, where: str, name: object) -> str:
    if type(name) is not str:
        raise r.fail(where, f"expected a feed name, got {name!r}")
    try:
        check_feed_name(name)
    except InvalidRecord as exc:
        raise r.fail(where, str(exc)) from exc
    return name


def _ngsi(r: _Reader, i: int, item: object, max_body_bytes: int) -> NgsiBridgeConfig:
    where, v = _named(r, "ngsi", i, item, _NGSI_KEYS)
    feed = _feed_name(r, f"{where} feed", v["feed"])
    feeds = tuple((_entity_type(r, f"{where} feeds", k), _feed_name(r, f"{where} feeds {k}", f))
                  for k, f in (v["feeds"] or {}).items())
    types: list[tuple[str, str]] = []
    for k, t in (v["types"] or {}).items():
        _entity_type(r, f"{where} types", k)
        if type(t) is not str or (t not in BUILTIN_TYPES and not is_custom_type(t)):
            raise r.fail(f"{where} types {k}", f"unknown payload type {t!r}: use one of "
                         f"{', '.join(sorted(BUILTIN_TYPES))}, or a custom type such as "
                         "org.example.Noise")
        types.append((k, t))
    contexts = v["contexts"] or []
    if len(contexts) > _MAX_CONTEXTS:
        raise r.fail(f"{where} contexts", f"at most {_MAX_CONTEXTS}")
    for c in contexts:
        if type(c) is not str or not c.startswith(("https://", "http://")) or \
                any(ch.isspace() for ch in c) or len(c) > 2000:
            raise r.fail(f"{where} contexts", f"expected http(s) URLs, got {c!r}")
    offset = v["local_time_offset"]
    if offset and not _OFFSET_RE.fullmatch(offset):
        raise r.fail(f"{where} local_time_offset", f'expected "+hh:mm", "-hh:mm" or "Z", '
                     f"got {offset!r}")
    limit = (v["max_notification_bytes"] if v["max_notification_bytes"] is not None
             else max_body_bytes)
    if not 1 <= limit <= max_body_bytes:
        raise r.fail(f"{where} max_notification_bytes",
                     f"must be 1 to [limits] max_body_bytes ({max_body_bytes}), got {limit}")
    if not 1 <= v["max_entities"] <= 100_000:
        raise r.fail(f"{where} max_entities", "must be 1 to 100000")
    _check_keeping(r, where, v)
    return NgsiBridgeConfig(
        name=v["name"], feed=feed, feeds=feeds, types=tuple(types), contexts=tuple(contexts),
        local_time_offset=offset, max_notification_bytes=limit,
        max_entities=v["max_entities"], dedupe_hours=v["dedupe_hours"],
        dead_letter_rows=v["dead_letter_rows"])


def _named(r: _Reader, kind: str, i: int, item: object,
           keys: dict[str, tuple[Any, Any]]) -> tuple[str, dict[str, Any]]:
    """The keys of the ``i``-th ``[[bridges.<kind>]]``, its name checked; and the
    ``where`` of its errors ("[[bridges.mqtt]] air")."""
    where = f"[[bridges.{kind}]] #{i + 1}"
    v = r.table(where, item, keys)
    if not _NAME_RE.fullmatch(v["name"]):
        raise r.fail(f"{where} name", f"must be 1-32 of a-z 0-9 _ -, got {v['name']!r}")
    return f"[[bridges.{kind}]] {v['name']}", v


def _check_keeping(r: _Reader, where: str, v: dict[str, Any]) -> None:
    """What every bridge keeps: message identities, and dead letters."""
    if not 1 / 60 <= v["dedupe_hours"] <= 24 * 365:
        raise r.fail(f"{where} dedupe_hours", "must be 1/60 to 8760 (a year)")
    if not 1 <= v["dead_letter_rows"] <= 10_000_000:
        raise r.fail(f"{where} dead_letter_rows", "must be 1 to 10000000")


def _entity_type(r: _Reader, where: str, name: str) -> str:
    if not _ENTITY_TYPE_RE.fullmatch(name):
        raise r.fail(where, f"{name!r} is not an entity type name")
    return name


def _mqtt(r: _Reader, i: int, item: object, max_body_bytes: int) -> MqttBridgeConfig:
    where, v = _named(r, "mqtt", i, item, _MQTT_KEYS)
    if not v["host"] or any(c.isspace() or c in "/@" for c in v["host"]):
        raise r.fail(f"{where} host", f"must be a host name or IP address, got {v['host']!r}")
    tls = v["tls"] if v["tls"] is not None else bool(v["ca_file"])
    port = v["port"] if v["port"] is not None else (8883 if tls else 1883)
    if not 1 <= port <= 65535:
        raise r.fail(f"{where} port", f"must be 1 to 65535, got {port}")
    client_id = v["client_id"] if v["client_id"] is not None else f"citynode-{v['name']}"
    if not _CLIENT_ID_RE.fullmatch(client_id):
        raise r.fail(f"{where} client_id",
                     f"must be 1-64 of A-Z a-z 0-9 _ . : -, got {client_id!r}")
    if bool(v["cert_file"]) != bool(v["key_file"]):
        raise r.fail(f"{where} cert_file", "a client certificate needs both cert_file and "
                     "key_file")
    if (v["cert_file"] or v["ca_file"]) and not tls:
        raise r.fail(f"{where} tls", "is false, but certificate files are given: remove "
                     "them or set tls = true")
    if v["password_file"] and not v["username"]:
        raise r.fail(f"{where} password_file", "needs a username")
    if not 5 <= v["keepalive_seconds"] <= 3600:
        raise r.fail(f"{where} keepalive_seconds", "must be 5 to 3600")
    limit = v["max_message_bytes"] if v["max_message_bytes"] is not None else max_body_bytes
    if not 1 <= limit <= max_body_bytes:
        raise r.fail(f"{where} max_message_bytes",
                     f"must be 1 to [limits] max_body_bytes ({max_body_bytes}), got {limit}")
    if not 0.1 <= v["backoff_max_seconds"] <= 3600:
        raise r.fail(f"{where} backoff_max_seconds", "must be 0.1 to 3600")
    _check_keeping(r, where, v)
    routes = v["routes"]
    if not routes or len(routes) > _MAX_ROUTES:
        raise r.fail(f"{where} routes", f"give 1 to {_MAX_ROUTES} [[bridges.mqtt.routes]]")
    parsed = tuple(_route(r, f"{where} routes #{j + 1}", t) for j, t in enumerate(routes))
    return MqttBridgeConfig(
        name=v["name"], host=v["host"], port=port, client_id=client_id, tls=tls,
        ca_file=v["ca_file"], cert_file=v["cert_file"], key_file=v["key_file"],
        username=v["username"], password_file=v["password_file"],
        keepalive_seconds=v["keepalive_seconds"], max_message_bytes=limit,
        backoff_max_seconds=v["backoff_max_seconds"], dedupe_hours=v["dedupe_hours"],
        dead_letter_rows=v["dead_letter_rows"], routes=parsed)


def _route(r: _Reader, where: str, table: object) -> Route:
    v = r.table(where, table, _ROUTE_KEYS)
    try:
        topic = parse_topic_filter(v["topic"])
    except ValueError as exc:
        raise r.fail(f"{where} topic", str(exc)) from exc
    try:
        check_feed_name(v["feed"])
    except InvalidRecord as exc:
        raise r.fail(f"{where} feed", str(exc)) from exc
    if v["type"] not in BUILTIN_TYPES and not is_custom_type(v["type"]):
        raise r.fail(f"{where} type", f"unknown payload type {v['type']!r}: use one of "
                     f"{', '.join(sorted(BUILTIN_TYPES))}, or a custom type such as "
                     "org.example.Noise")
    subject = None
    if v["subject"] is not None:
        try:
            subject = parse_template(v["subject"])
        except ValueError as exc:
            raise r.fail(f"{where} subject", str(exc)) from exc
        levels = [p[1] for p in subject if isinstance(p, tuple) and p[0] == "topic"]
        fixed = topic.split("/")
        for level in levels:
            assert isinstance(level, int)
            if "#" not in fixed and level >= len(fixed):
                raise r.fail(f"{where} subject", f"{{topic.{level}}}: topic {topic!r} has "
                             f"only {len(fixed)} levels (counted from 0)")
    fields = None
    if v["fields"] is not None:
        if not v["fields"] or len(v["fields"]) > _MAX_FIELDS:
            raise r.fail(f"{where} fields", f"give 1 to {_MAX_FIELDS} attribute = \"path\"")
        out: list[tuple[str, Path]] = []
        for name, path in v["fields"].items():
            if type(path) is not str:
                raise r.fail(f"{where} fields {name}", f"expected a path string like "
                             f'"values.pm25", got {path!r}')
            try:
                out.append((name, parse_path(path)))
            except ValueError as exc:
                raise r.fail(f"{where} fields {name}", str(exc)) from exc
        fields = tuple(out)
    return Route(topic=topic, feed=v["feed"], type=v["type"], subject=subject, fields=fields)
