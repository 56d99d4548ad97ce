"""A message from outside (topic + bytes) -> feed, type, subject and payload. Pure.

Every byte of a message is hostile: its size is checked before it is parsed, JSON is
parsed strictly (no NaN or Infinity, bounded nesting), and every failure is a
:class:`UnmappableMessage` whose ``reason`` is a stable code the dead-letter table keeps:

    too_large      the message is over max_message_bytes
    not_json       not UTF-8 JSON (or nested too deep)
    not_object     the JSON is not an object, or a field path runs through a non-object
    missing_field  a field path (in ``fields`` or the subject) is absent from the message
    bad_subject    the subject template gives a value that is not text or a number
    no_route       no route's topic filter matches the topic

The payload's own validation (its type's rules) is the publishing path's, not this one's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from citynode.bridges.config import Path, Route, Template
from citynode.errors import UnmappableMessage

__all__ = ["Mapped", "depth_ok", "map_message", "message_key", "topic_matches"]

_MAX_DEPTH = 64


@dataclass(frozen=True, slots=True)
class Mapped:
    """What one message becomes: a payload to publish on ``feed`` as ``type``."""

    feed: str
    type: str
    subject: str | None
    data: dict[str, Any]


def message_key(bridge: str, topic: str, payload: bytes) -> bytes:
    """The identity of a message: SHA-256 over the bridge name, topic and bytes (each
    length-prefixed, so no two different triples share an encoding). A redelivered
    message has the same key; two messages with the same bytes on the same topic are
    the same reading, sent twice."""
    h = hashlib.sha256(b"citynode-bridge-message-v1")
    for part in (bridge.encode(), topic.encode(), payload):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT topic matching: ``+`` one level, ``#`` this level and all below; a topic
    starting with ``$`` is matched by no wildcard at its first level."""
    if topic.startswith("$") and pattern[:1] in ("+", "#"):
        return False
    p, t = pattern.split("/"), topic.split("/")
    for i, level in enumerate(p):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(p) == len(t)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def depth_ok(value: Any, limit: int = _MAX_DEPTH) -> bool:
    """Whether parsed JSON ``value`` nests at most ``limit`` deep (without recursion)."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > limit:
            return False
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return True


def _parse(payload: bytes) -> dict[str, Any]:
    try:
        value = json.loads(payload.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UnmappableMessage(f"not UTF-8 JSON: {exc}", "not_json") from None
    if not depth_ok(value):
        raise UnmappableMessage(f"JSON nested deeper than {_MAX_DEPTH}", "not_json")
    if not isinstance(value, dict):
        raise UnmappableMessage(f"the message is JSON {type(value).__name__}, not an object",
                           "not_object")
    return value


def _get(doc: Any, path: Path) -> Any:
    here = doc
    for n, part in enumerate(path):
        shown = ".".join(str(p) for p in path[: n + 1])
        if isinstance(part, int) and isinstance(here, list):
            if part >= len(here):
                raise UnmappableMessage(f"field {shown} is absent from the message",
                                   "missing_field")
            here = here[part]
        elif isinstance(here, dict):
            key = str(part)
            if key not in here:
                raise UnmappableMessage(f"field {shown} is absent from the message",
                                   "missing_field")
            here = here[key]
        else:
            raise UnmappableMessage(f"field {shown}: its parent is not an object or array",
                               "not_object")
    return here


def _subject(template: Template, levels: list[str], doc: dict[str, Any]) -> str:
    out: list[str] = []
    for part in template:
        if isinstance(part, str):
            out.append(part)
            continue
        kind, ref = part
        if kind == "topic":
            assert isinstance(ref, int)
            if ref >= len(levels):
                raise UnmappableMessage(f"subject: the topic has no level {ref}", "missing_field")
            out.append(levels[ref])
            continue
        assert isinstance(ref, tuple)
        value = _get(doc, ref)
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise UnmappableMessage(f"subject: field {'.'.join(map(str, ref))} is "
                               f"{type(value).__name__}, not text or a number", "bad_subject")
        out.append(str(value))
    return "".join(out)


def map_message(routes: tuple[Route, ...], topic: str, payload: bytes,
                max_bytes: int) -> Mapped:
    """Map one message by the first route whose filter matches ``topic``.

    Raises :class:`UnmappableMessage` (``reason`` as in the module docstring)."""
    if len(payload) > max_bytes:
        raise UnmappableMessage(f"message of {len(payload)} bytes is over max_message_bytes "
                           f"({max_bytes})", "too_large")
    route = next((r for r in routes if topic_matches(r.topic, topic)), None)
    if route is None:
        raise UnmappableMessage(f"no route matches topic {topic[:200]!r}", "no_route")
    doc = _parse(payload)
    data = (doc if route.fields is None
            else {name: _get(doc, path) for name, path in route.fields})
    subject = (_subject(route.subject, topic.split("/"), doc)
               if route.subject is not None else None)
    return Mapped(feed=route.feed, type=route.type, subject=subject, data=data)
