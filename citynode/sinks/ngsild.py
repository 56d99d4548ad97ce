"""Records -> NGSI-LD entities (normalized), and the sink that upserts them into a
partner's context broker (:class:`NgsiLdSink`; the rest of the module is pure).

A record becomes one entity (ETSI GS CIM 009, normalized representation):

* ``id``: the record's subject when it is already a URN (an entity id that came in through
  NGSI in), else ``urn:ngsi-ld:<type>:<origin node id>:<feed>:<subject, or seq>``: the
  records of one station are successive states of one entity;
* ``type``: the payload type (the Smart Data Models names are citynode's);
* each attribute a ``Property`` (``value``, ``unitCode`` when the payload gives one,
  ``observedAt``: the observation time in UTC), ``location`` a ``GeoProperty``, a
  ``ref...`` attribute naming URIs a ``Relationship``; date-times are typed
  ``{"@type": "DateTime", "@value": ...}`` as in the Smart Data Models examples;
* provenance, as Properties: ``citynodeOrigin`` (node id), ``citynodeFeed``,
  ``citynodeSeq``, ``citynodeRecordId``, ``citynodeSignature`` and
  ``citynodeEnvelope`` (base64: the signed record, verifiable with the origin's id).

Attributes NGSI-LD reserves (``id``, ``type``, ``@context``, ``scope``, ...) or whose
names it does not allow are left out of the entity (they stay in the signed envelope).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
from typing import Any
from urllib.parse import quote

import aiohttp

from citynode.core.keylog import origin_id
from citynode.core.records import SEALED_TYPE, Record, stored_record
from citynode.errors import InvalidRecord
from citynode.render import iso_time, jsonable
from citynode.sinks.outbox import Outcome, Sink, outcome_of_status
from citynode.storage import OutboxRow

__all__ = ["CORE_CONTEXT", "NgsiLdSink", "entity_id", "entity_of", "upsert_request"]

CORE_CONTEXT = "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context.jsonld"
UPSERT_PATH = "/ngsi-ld/v1/entityOperations/upsert"
_RESERVED = {"id", "type", "@context", "scope", "createdAt", "modifiedAt", "deletedAt",
             "observedAt", "location_", "observationSpace_", "operationSpace_"}
# NGSI-LD attribute names: no control characters, whitespace or < > " ' = ; ( )
_BAD_NAME_RE = re.compile(r"[\x00-\x20<>\"'=;()\x7f]")
_DATETIME_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}"
                          r"(?:\.[0-9]+)?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})", re.ASCII)
_GEO_TYPES = {"Point", "LineString", "Polygon", "MultiPoint", "MultiLineString",
              "MultiPolygon"}
_URN_SAFE = "-._~:!$&*+,@/"


def _utc(text: str) -> str:
    """An RFC 3339 date-time (any offset) in UTC, as NGSI-LD's observedAt wants it."""
    t = dt.datetime.fromisoformat(text.replace("z", "Z").replace("t", "T"))
    return t.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def entity_id(rec: Record) -> str:
    """The entity ``rec`` is a state of (see the module docstring)."""
    if rec.subject is not None and rec.subject.startswith("urn:") and \
            not any(c.isspace() for c in rec.subject):
        return rec.subject
    tail = quote(rec.subject, safe=_URN_SAFE) if rec.subject is not None else str(rec.seq)
    return (f"urn:ngsi-ld:{quote(rec.type, safe=_URN_SAFE)}:{origin_id(rec.origin, rec.key)}:"
            f"{quote(rec.feed, safe=_URN_SAFE)}:{tail}")


def _observed(rec: Record) -> str:
    data = rec.data if isinstance(rec.data, dict) else {}
    for key in ("dateObserved", "dateObservedTo", "dateIssued"):
        v = data.get(key)
        if isinstance(v, str) and _DATETIME_RE.fullmatch(v):
            return _utc(v)
    return iso_time(rec.time)


def _is_uri(v: Any) -> bool:
    return isinstance(v, str) and bool(re.match(r"(?:urn|https?):\S+$", v))


def _attribute(name: str, value: Any, observed: str) -> dict[str, Any]:
    if name == "location" and isinstance(value, dict) and value.get("type") in _GEO_TYPES:
        return {"type": "GeoProperty", "value": value}
    if name.startswith("ref") and (_is_uri(value) or (
            isinstance(value, list) and value and all(_is_uri(x) for x in value))):
        if isinstance(value, list):
            return {"type": "Relationship", "object": value}
        return {"type": "Relationship", "object": value}
    out: dict[str, Any] = {"type": "Property"}
    if isinstance(value, dict) and "value" in value and set(value) <= {
            "value", "unitCode", "type", "observedAt"}:
        out["value"] = value["value"]
        if "unitCode" in value:
            out["unitCode"] = value["unitCode"]
    elif isinstance(value, str) and _DATETIME_RE.fullmatch(value):
        out["value"] = {"@type": "DateTime", "@value": value}
    else:
        out["value"] = jsonable(value)
    out["observedAt"] = observed
    return out


def entity_of(rec: Record, envelope: bytes) -> dict[str, Any]:
    """The NGSI-LD entity (normalized, without ``@context``) of a record held."""
    ent: dict[str, Any] = {"id": entity_id(rec), "type": rec.type}
    if rec.payload is not None and rec.type != SEALED_TYPE and isinstance(rec.data, dict):
        observed = _observed(rec)
        for name, value in rec.data.items():
            if not isinstance(name, str) or name in _RESERVED or \
                    name.startswith("citynode") or _BAD_NAME_RE.search(name):
                continue
            ent[name] = _attribute(name, value, observed)
    prov = {"citynodeOrigin": origin_id(rec.origin, rec.key), "citynodeFeed": rec.feed,
            "citynodeSeq": rec.seq, "citynodeRecordId": rec.id.hex(),
            "citynodeSignature": base64.b64encode(rec.sig).decode("ascii"),
            "citynodeEnvelope": base64.b64encode(envelope).decode("ascii")}
    for k, v in prov.items():
        ent[k] = {"type": "Property", "value": v}
    return ent


def context_of(context: str) -> list[str]:
    """The ``@context`` of the entities: the given one (Smart Data Models' by default)
    and the NGSI-LD core context."""
    return [context, CORE_CONTEXT] if context != CORE_CONTEXT else [CORE_CONTEXT]


def upsert_request(entities: list[dict[str, Any]], context: str, tenant: str = ""
                   ) -> tuple[dict[str, str], bytes]:
    """``(headers, body)`` of a batch upsert (``POST .../entityOperations/upsert``):
    ``application/ld+json``, the ``@context`` in each entity, as the API asks of a
    batch in that media type."""
    ctx = context_of(context)
    body = json.dumps([{**e, "@context": ctx} for e in entities], ensure_ascii=False,
                      separators=(",", ":")).encode()
    headers = {"Content-Type": "application/ld+json"}
    if tenant:
        headers["NGSILD-Tenant"] = tenant
    return headers, body


class NgsiLdSink(Sink):
    """``[[sinks.ngsi_ld]]``: batch upserts of one feed's records, in order."""

    async def send(self, session: aiohttp.ClientSession, rows: list[OutboxRow]
                   ) -> list[Outcome]:
        outcomes: list[Outcome] = []
        entities: list[dict[str, Any]] = []
        ids: list[str] = []
        for row in rows:
            try:
                ent = entity_of(stored_record(row.envelope), row.envelope)
            except InvalidRecord as exc:  # our own database: cannot happen
                if entities:
                    break
                return [Outcome(False, False, f"unreadable record: {exc}")]
            if ent["id"] in ids:
                break  # one state of an entity per upsert: the next state next time
            entities.append(ent)
            ids.append(ent["id"])
        headers, body = upsert_request(entities, self.cfg.context, self.cfg.tenant)
        async with session.post(self.cfg.url + UPSERT_PATH, data=body,
                                headers=headers) as resp:
            if resp.status == 207:  # some upserted, some not: which
                return _multi_status(await resp.content.read(1 << 20), ids)
            text = "" if 200 <= resp.status < 300 else \
                (await resp.content.read(300)).decode("utf-8", "replace")
            one = outcome_of_status(resp.status, text, resp.headers.get("Retry-After"))
        outcomes = [one] * len(entities)
        return outcomes


def _multi_status(body: bytes, ids: list[str]) -> list[Outcome]:
    """The outcomes of a 207 answer (``{"success": [ids], "errors": [{"entityId",
    "error": {..., "status"}}]}``); an entity the answer does not name is retried."""
    try:
        doc = json.loads(body)
        failed = {e["entityId"]: e.get("error", {}) for e in doc.get("errors", [])}
        done = set(doc.get("success", []))
    except (ValueError, TypeError, KeyError, AttributeError):
        return [Outcome(False, True, "HTTP 207 with an unreadable body")]
    out = []
    for i in ids:
        if i in done:
            out.append(Outcome(True))
            continue
        err = failed.get(i)
        if err is None:
            out.append(Outcome(False, True, f"HTTP 207: {i} neither upserted nor refused"))
            break
        status = err.get("status") if isinstance(err, dict) else None
        retry = isinstance(status, int) and status >= 500
        out.append(Outcome(False, retry, f"HTTP 207: {str(err)[:300]}"))
        if retry:
            break
    return out
