"""NGSI-LD and NGSI-v2 notifications -> entities -> payloads. Pure.

A context broker (Orion-LD, Scorpio, Stellio: NGSI-LD; Orion: NGSI-v2) POSTs a
notification for a subscription; :func:`read_notification` checks it and gives its
entities, each with its terms resolved to Smart Data Models names; :func:`entity_payload`
makes a citynode payload of one of them.

Every byte is hostile: the size is checked before parsing, JSON is parsed strictly (no
NaN, no duplicate keys, bounded nesting), the number of entities is bounded. A problem
with the whole notification raises :class:`NotificationRefused` (``status``, ``reason``);
a problem with one entity raises :class:`~citynode.errors.UnmappableMessage` for it alone.

@context (ETSI GS CIM 009, "JSON-LD @context resolution"):

* ``Content-Type: application/json``: the body holds no ``@context``; it is given by a
  ``Link`` header with ``rel="http://www.w3.org/ns/json-ld#context"`` (at most one), or
  is the NGSI-LD core context when there is none.
* ``Content-Type: application/ld+json``: the ``@context`` is in the body (on the
  notification or on each entity) and no context ``Link`` header may be given.
* No remote context is ever fetched. A context URL is accepted if it is the NGSI-LD core
  context, a Smart Data Models context, or one listed in the bridge's ``contexts``; its
  terms then mean what Smart Data Models says. Any other URL could give the same term any
  meaning, so it is refused (``unknown_context``) rather than guessed at. An inline
  context may map terms to IRIs of the Smart Data Models, FIWARE or NGSI-LD namespaces
  (the term becomes the name at the end of the IRI); a term mapped anywhere else is
  refused (``unknown_term``).

Reason codes (the dead-letter table and the HTTP answer carry them):

    too_large          over max_notification_bytes (notification)
    not_json           not UTF-8 JSON, or nested too deep (notification)
    duplicate_key      an object has the same key twice
    not_notification   not the shape of an NGSI-LD or NGSI-v2 notification
    too_many_entities  over max_entities
    bad_content_type   not application/json or application/ld+json
    bad_context        @context where the spec forbids it, or missing where it needs it
    unknown_context    a context URL this node does not know (see above)
    unknown_term       an inline context maps a term outside the known namespaces
    missing_id         an entity without an id (or with an id that is not text)
    missing_type       an entity without a type
    unknown_type       an entity type this bridge takes no payload type for
    bad_attribute      an attribute that is not a valid NGSI-LD/NGSI-v2 attribute
    duplicate_attribute two attributes with the same name once their terms are resolved
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from citynode.bridges.config import NgsiBridgeConfig
from citynode.bridges.mapping import Mapped, depth_ok
from citynode.errors import UnmappableMessage

__all__ = [
    "CORE_CONTEXT",
    "Notification",
    "NotificationRefused",
    "entity_payload",
    "read_notification",
]

#: The NGSI-LD core context (the default when none is given).
CORE_CONTEXT = "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context.jsonld"
_CONTEXT_REL = "http://www.w3.org/ns/json-ld#context"
_MAX_DEPTH = 32
_MAX_ID = 256
_MAX_ATTRS = 512
_MAX_INLINE_TERMS = 1024

_CORE_RE = re.compile(
    r"https://uri\.etsi\.org/ngsi-ld/v1/ngsi-ld-core-context(?:-v1\.[0-9]+)?\.jsonld", re.ASCII)
_SDM_CONTEXT_RE = re.compile(
    r"https://(?:raw\.githubusercontent\.com/smart-data-models/dataModel\.[A-Za-z0-9_-]+/"
    r"(?:master|main)/context\.jsonld"
    r"|smart-data-models\.github\.io/dataModel\.[A-Za-z0-9_-]+/context\.jsonld"
    r"|smartdatamodels\.org/context\.jsonld"
    r"|fiware\.github\.io/data-models/context\.jsonld)", re.ASCII)
# IRIs whose last segment is the Smart Data Models (or NGSI-LD) term it names.
_KNOWN_IRI_RE = re.compile(
    r"(?:https://smartdatamodels\.org/(?:dataModel\.[A-Za-z0-9_-]+/)?"
    r"|https://uri\.fiware\.org/ns/data-?models#"
    r"|https://uri\.etsi\.org/ngsi-ld/(?:default-context/)?"
    r"|https://schema\.org/)"
    r"([A-Za-z_][A-Za-z0-9_]{0,63})", re.ASCII)
_LOCAL_DATETIME_RE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?", re.ASCII)
_LD_ATTR_TYPES = {"Property", "GeoProperty", "Relationship", "LanguageProperty",
                  "ListProperty", "VocabProperty", "JsonProperty", "ListRelationship"}
# Members of an entity that are not attributes of the observation.
_SKIP = {"@context", "id", "type", "createdAt", "modifiedAt", "deletedAt", "scope"}
_V2_KEYS = {"type", "value", "metadata"}


class NotificationRefused(Exception):
    """The whole notification is refused (``status``: the HTTP status to answer)."""

    def __init__(self, message: str, reason: str, status: int = 400) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


@dataclass(frozen=True, slots=True)
class Notification:
    """A notification checked: its kind, subscription and entities (terms resolved)."""

    kind: str  # "ngsi-ld" | "ngsi-v2"
    subscription: str
    #: each entity, with its terms resolved, or the error that refuses it alone
    entities: tuple[dict[str, Any] | UnmappableMessage, ...]


# --------------------------------------------------------------------------- parsing


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


class _Duplicate(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(body: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys, nesting bounded. Raises
    :class:`NotificationRefused`."""
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_no_constant,
                           object_pairs_hook=_pairs)
    except _Duplicate as exc:
        raise NotificationRefused(f"an object has the key {str(exc)[:100]!r} twice",
                                  "duplicate_key") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise NotificationRefused(f"not UTF-8 JSON: {str(exc)[:200]}", "not_json") from None
    if not depth_ok(value, _MAX_DEPTH):
        raise NotificationRefused(f"JSON nested deeper than {_MAX_DEPTH}", "not_json")
    return value


def _link_context(link: str | None) -> str | None:
    """The context URL of a JSON-LD ``Link`` header, or None. Raises
    :class:`NotificationRefused` for more than one."""
    if not link:
        return None
    found = []
    for part in link.split(","):
        m = re.match(r"\s*<([^>]*)>(.*)", part)
        if m and re.search(r'rel\s*=\s*"?' + re.escape(_CONTEXT_REL) + '"?', m.group(2)):
            found.append(m.group(1).strip())
    if len(found) > 1:
        raise NotificationRefused("more than one JSON-LD context Link header", "bad_context")
    return found[0] if found else None


def read_notification(body: bytes, content_type: str, link: str | None,
                      cfg: NgsiBridgeConfig, *, attrs_format: str | None = None
                      ) -> Notification:
    """Check a notification POST and resolve its entities' terms.

    ``content_type``: the request's media type (parameters removed); ``link``: its
    ``Link`` header; ``attrs_format``: NGSI-v2's ``Ngsiv2-AttrsFormat`` header.
    Raises :class:`NotificationRefused`."""
    if len(body) > cfg.max_notification_bytes:
        raise NotificationRefused(
            f"notification of {len(body)} bytes is over max_notification_bytes "
            f"({cfg.max_notification_bytes})", "too_large", 413)
    ctype = content_type.lower().strip()
    if ctype not in ("application/json", "application/ld+json"):
        raise NotificationRefused(
            f"Content-Type {content_type[:100]!r}: send application/json or "
            "application/ld+json", "bad_content_type", 415)
    doc = parse_json(body)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise NotificationRefused("not a notification: expected an object with a data "
                                  "array of entities", "not_notification")
    entities = doc["data"]
    if len(entities) > cfg.max_entities:
        raise NotificationRefused(f"{len(entities)} entities: at most {cfg.max_entities} "
                                  "a notification (max_entities)", "too_many_entities", 413)
    sub = doc.get("subscriptionId")
    if not isinstance(sub, str) or not sub or len(sub) > _MAX_ID:
        raise NotificationRefused("not a notification: subscriptionId missing",
                                  "not_notification")
    kind = "ngsi-ld" if doc.get("type") == "Notification" else "ngsi-v2"
    linked = _link_context(link)
    top = doc.get("@context")
    if kind == "ngsi-v2":
        if top is not None or linked is not None or ctype != "application/json":
            raise NotificationRefused("an NGSI-v2 notification (no \"type\": "
                                      "\"Notification\") has no JSON-LD context",
                                      "bad_context")
        v2_normalized = None if attrs_format is None else attrs_format == "normalized"
        out = tuple(_v2_entity(e, v2_normalized, cfg) for e in entities)
        return Notification(kind, sub, out)
    base: dict[str, str | None] | None
    if ctype == "application/json":
        if top is not None or any(isinstance(e, dict) and "@context" in e for e in entities):
            raise NotificationRefused("Content-Type application/json: the @context goes "
                                      "in a Link header, not in the body", "bad_context")
        base = _resolve_context(linked or CORE_CONTEXT, cfg)
    else:
        if linked is not None:
            raise NotificationRefused("Content-Type application/ld+json: the @context is "
                                      "in the body; no context Link header may be given",
                                      "bad_context")
        base = _resolve_context(top, cfg) if top is not None else None
    resolved: list[dict[str, Any] | UnmappableMessage] = []
    for e in entities:
        try:
            if not isinstance(e, dict):
                raise UnmappableMessage("an entity is not a JSON object", "not_notification")
            own = e.get("@context")
            if base is None and own is None:
                raise UnmappableMessage("Content-Type application/ld+json, and neither the "
                                        "notification nor the entity has an @context",
                                        "bad_context")
            terms = _resolve_context(own, cfg) if own is not None else base
            resolved.append(_ld_entity(e, terms or {}, cfg))
        except NotificationRefused as exc:
            resolved.append(UnmappableMessage(str(exc), exc.reason))
        except UnmappableMessage as exc:
            resolved.append(exc)
    return Notification(kind, sub, tuple(resolved))


# --------------------------------------------------------------------------- @context


def _resolve_context(ctx: Any, cfg: NgsiBridgeConfig) -> dict[str, str | None]:
    """Term -> Smart Data Models name (None: a term this node cannot read) for a context
    given as a URL, an inline object or a list of both. Known URLs add no mapping: their
    terms are the names themselves. Raises :class:`NotificationRefused`."""
    items = ctx if isinstance(ctx, list) else [ctx]
    if not items or len(items) > 64:
        raise NotificationRefused("@context: give 1 to 64 contexts", "bad_context")
    terms: dict[str, str | None] = {}
    for item in items:
        if isinstance(item, str):
            if not (_CORE_RE.fullmatch(item) or _SDM_CONTEXT_RE.fullmatch(item)
                    or item in cfg.contexts):
                raise NotificationRefused(
                    f"@context {item[:200]!r} is not a context this node knows, so its terms "
                    "could mean anything: if they are the Smart Data Models' terms, add the "
                    f"URL to contexts of [[bridges.ngsi]] {cfg.name} in node.toml",
                    "unknown_context")
            continue
        if not isinstance(item, dict) or len(item) > _MAX_INLINE_TERMS:
            raise NotificationRefused("@context: each context is a URL or an object of "
                                      "term definitions", "bad_context")
        prefixes = {k: v for k, v in item.items() if isinstance(v, str) and
                    v.endswith(("/", "#"))}
        for term, definition in item.items():
            if term.startswith("@"):
                if term in ("@version", "@protected"):
                    continue
                raise NotificationRefused(f"@context: {term} is not supported (it would "
                                          "change the meaning of every term)", "bad_context")
            iri = definition.get("@id") if isinstance(definition, dict) else definition
            if not isinstance(iri, str):
                terms[term] = None
                continue
            iri = _expand(iri, prefixes)
            m = _KNOWN_IRI_RE.fullmatch(iri)
            terms[term] = m.group(1) if m else None
        # a prefix definition is not itself an attribute name
        for p in prefixes:
            terms.pop(p, None)
        terms.update({f"__prefix__{p}": v for p, v in prefixes.items()})
    return terms


def _expand(name: str, prefixes: dict[str, str]) -> str:
    if ":" in name and not name.startswith(("http://", "https://", "urn:")):
        prefix, _, rest = name.partition(":")
        if prefix in prefixes:
            return prefixes[prefix] + rest
    return name


def _term(name: str, terms: dict[str, str | None]) -> str:
    """The Smart Data Models name of a member name. Raises UnmappableMessage."""
    if name in terms:
        sdm = terms[name]
        if sdm is None:
            raise UnmappableMessage(f"term {name[:100]!r} is defined by the @context as an "
                                    "IRI outside the Smart Data Models, FIWARE and NGSI-LD "
                                    "namespaces", "unknown_term")
        return sdm
    prefixes = {k[10:]: v for k, v in terms.items() if k.startswith("__prefix__") and v}
    expanded = _expand(name, prefixes)
    if expanded.startswith(("http://", "https://", "urn:")):
        m = _KNOWN_IRI_RE.fullmatch(expanded)
        if m is None:
            raise UnmappableMessage(f"{name[:100]!r} is an IRI outside the Smart Data Models, "
                                    "FIWARE and NGSI-LD namespaces", "unknown_term")
        return m.group(1)
    return name


# --------------------------------------------------------------------------- entities


def _entity_head(e: Any) -> tuple[str, Any]:
    if not isinstance(e, dict):
        raise UnmappableMessage("an entity is not a JSON object", "not_notification")
    eid = e.get("id")
    if not isinstance(eid, str) or not eid or len(eid) > _MAX_ID:
        raise UnmappableMessage("entity without an id (text of 1 to 256 characters)",
                                "missing_id")
    if "type" not in e:
        raise UnmappableMessage(f"entity {eid[:100]!r} has no type", "missing_type")
    if len(e) > _MAX_ATTRS:
        raise UnmappableMessage(f"entity {eid[:100]!r}: more than {_MAX_ATTRS} attributes",
                                "bad_attribute")
    return eid, e["type"]


def _ld_entity(e: Any, terms: dict[str, str | None], cfg: NgsiBridgeConfig
               ) -> dict[str, Any]:
    eid, etype = _entity_head(e)
    types = etype if isinstance(etype, list) else [etype]
    if not types or not all(isinstance(t, str) for t in types):
        raise UnmappableMessage(f"entity {eid[:100]!r}: type is not a name", "missing_type")
    names = [_term(t, terms) for t in types]
    taken = [n for n in names if cfg.type_of(n) is not None]
    if len(taken) != 1:
        raise UnmappableMessage(
            f"entity {eid[:100]!r} of type {'/'.join(names)[:200]!r}: this bridge takes "
            f"{'no payload type' if not taken else 'more than one payload type'} for it "
            f"(map it in types of [[bridges.ngsi]] {cfg.name})", "unknown_type")
    attrs: dict[str, Any] = {}
    for key, value in e.items():
        if key in _SKIP:
            continue
        name = _term(key, terms)
        if name in attrs:
            raise UnmappableMessage(f"entity {eid[:100]!r}: attribute {name!r} is given "
                                    "twice (under two terms for the same name)",
                                    "duplicate_attribute")
        attrs[name] = value
    return {"id": eid, "type": taken[0], "form": "ld", "attrs": attrs}


def _v2_entity(e: Any, normalized: bool | None, cfg: NgsiBridgeConfig
               ) -> dict[str, Any] | UnmappableMessage:
    try:
        eid, etype = _entity_head(e)
        if not isinstance(etype, str) or cfg.type_of(etype) is None:
            raise UnmappableMessage(
                f"entity {eid[:100]!r} of type {str(etype)[:100]!r}: this bridge takes no "
                f"payload type for it (map it in types of [[bridges.ngsi]] {cfg.name})",
                "unknown_type")
        attrs = {k: v for k, v in e.items() if k not in _SKIP}
        if normalized is None:  # no Ngsiv2-AttrsFormat header: Orion's default form
            normalized = bool(attrs) and all(
                isinstance(v, dict) and "value" in v and "type" in v and set(v) <= _V2_KEYS
                for v in attrs.values())
        return {"id": eid, "type": etype, "form": "v2" if normalized else "kv",
                "attrs": attrs}
    except UnmappableMessage as exc:
        return exc


def entity_message(entity: dict[str, Any]) -> tuple[str, bytes]:
    """``(topic, bytes)`` of a resolved entity, as the exactly-once path keys it: the
    same entity state notified twice is the same message."""
    body = json.dumps(entity, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"ngsi/{entity['type']}/{entity['id']}", body.encode("utf-8")


def _unwrap(v: Any) -> Any:
    """A JSON-LD value object ``{"@type": ..., "@value": v}`` is ``v``."""
    if isinstance(v, dict) and "@value" in v and set(v) <= {"@value", "@type", "@language"}:
        return v["@value"]
    return v


def _ld_attr(name: str, a: Any) -> tuple[Any, str | None]:
    """``(citynode value, observedAt)`` of one NGSI-LD attribute (normalized, concise
    or key-values)."""
    if isinstance(a, list) and a and all(isinstance(x, dict) and (
            x.get("type") in _LD_ATTR_TYPES or "datasetId" in x) for x in a):
        # a multi-attribute: take its default instance
        default = [x for x in a if isinstance(x, dict) and "datasetId" not in x]
        if len(default) != 1:
            raise UnmappableMessage(f"attribute {name}: {len(a)} instances and no single "
                                    "default one (without datasetId)", "bad_attribute")
        a = default[0]
    if not isinstance(a, dict):
        return _unwrap(a), None
    t = a.get("type")
    if t in _LD_ATTR_TYPES or (t is None and any(k in a for k in (
            "value", "object", "languageMap", "valueList", "vocab", "json"))):
        if t in ("Relationship", "ListRelationship") or (t is None and "object" in a):
            value = a.get("object", a.get("objectList"))
        elif t == "LanguageProperty" or (t is None and "languageMap" in a):
            value = a.get("languageMap")
        elif t == "ListProperty":
            value = a.get("valueList")
        elif t == "VocabProperty":
            value = a.get("vocab")
        elif t == "JsonProperty":
            value = a.get("json")
        else:
            value = _unwrap(a.get("value"))
        if value is None:
            raise UnmappableMessage(f"attribute {name}: a {t or 'Property'} without its "
                                    "value", "bad_attribute")
        unit = a.get("unitCode")
        if unit is not None:
            if not isinstance(unit, str):
                raise UnmappableMessage(f"attribute {name}: unitCode is not text",
                                        "bad_attribute")
            value = {"value": value, "unitCode": unit}
        seen = a.get("observedAt")
        return value, seen if isinstance(seen, str) else None
    return a, None  # key-values: a structured value (GeoJSON, an address, ...)


def _v2_attr(name: str, a: Any) -> Any:
    if not isinstance(a, dict) or "value" not in a:
        raise UnmappableMessage(f"attribute {name}: not an NGSI-v2 attribute "
                                "({type, value, metadata})", "bad_attribute")
    value = a["value"]
    if a.get("type") == "geo:point" and isinstance(value, str):
        try:
            lat, lon = (float(x) for x in value.split(","))
        except ValueError:
            raise UnmappableMessage(f"attribute {name}: geo:point is \"lat, lon\"",
                                    "bad_attribute") from None
        value = {"type": "Point", "coordinates": [lon, lat]}
    meta = a.get("metadata")
    unit = meta.get("unitCode") if isinstance(meta, dict) else None
    if isinstance(unit, dict) and isinstance(unit.get("value"), str):
        value = {"value": value, "unitCode": unit["value"]}
    return value


def _local(v: Any, offset: str) -> Any:
    if offset and isinstance(v, str) and _LOCAL_DATETIME_RE.fullmatch(v):
        return v + offset
    return v


def entity_payload(entity: dict[str, Any], cfg: NgsiBridgeConfig) -> Mapped:
    """The payload a resolved entity becomes: its feed and payload type by this bridge's
    config, the entity id as the subject. Attributes become key-values (a measurement
    with a unit stays ``{"value", "unitCode"}``); an NGSI-LD ``observedAt`` gives
    ``dateObserved`` when the entity has none; a Smart Data Models interval
    ``dateObserved`` ("start/end") becomes ``dateObservedFrom``/``dateObservedTo``.
    Raises UnmappableMessage."""
    etype = entity["type"]
    ptype = cfg.type_of(etype)
    if ptype is None:
        raise UnmappableMessage(f"entity type {etype!r}: no payload type", "unknown_type")
    form = entity["form"]
    offset = cfg.local_time_offset
    data: dict[str, Any] = {}
    observed: list[str] = []
    for name, a in entity["attrs"].items():
        if form == "ld":
            value, seen = _ld_attr(name, a)
            if seen is not None:
                observed.append(_local(seen, offset))
        elif form == "v2":
            value = _v2_attr(name, a)
        else:
            value = _unwrap(a)
        data[name] = _local(value, offset)
    when = data.get("dateObserved")
    if isinstance(when, str) and "/" in when:
        start, _, end = when.partition("/")
        data.setdefault("dateObservedFrom", _local(start, offset))
        data.setdefault("dateObservedTo", _local(end, offset))
        del data["dateObserved"]
    if "dateObserved" not in data and "dateObservedFrom" not in data and observed:
        # all in UTC ("Z"): the latest; otherwise they cannot be ordered as text
        zulu = all(o.endswith("Z") for o in observed)
        data["dateObserved"] = max(observed) if zulu else observed[0]
    return Mapped(feed=cfg.feed_of(etype), type=ptype, subject=entity["id"], data=data)
