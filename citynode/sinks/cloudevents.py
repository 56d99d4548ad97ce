"""A record -> a CloudEvents 1.0 HTTP request (structured or binary content mode), and
the sink that POSTs them (:class:`CloudEventsSink`; the rest of the module is pure).

The event (CloudEvents 1.0, HTTP protocol binding):

==================  ===================================================================
``id``              the record id (hex): the same record is always the same event, so a
                    receiver drops a redelivered copy by ``(source, id)``
``source``          ``urn:citynode:<origin node id>:<feed>`` (the feed's owner)
``type``            ``org.citynode.record``
``subject``         the record's subject, if it has one
``time``            the record's time (RFC 3339, UTC)
``datacontenttype`` ``application/json``; ``data`` is the payload (absent for a record
                    whose payload was erased or pruned)
``citynodetype``    the payload type (AirQualityObserved ...)
``citynodeseq``     the record's seq in its feed (Integer)
``citynodeenvelope`` the signed envelope (Binary: base64), so the receiver can verify
                    the record itself (core/records.py open_record; docs/PROTOCOL.md)
==================  ===================================================================

Structured mode: ``Content-Type: application/cloudevents+json``, the event as a JSON
object. Binary mode: the attributes as ``ce-*`` headers (values percent-encoded as the
binding says), ``Content-Type: application/json`` and the payload as the body; the
envelope then travels in a header, as large as the record (receivers must accept it).
"""

from __future__ import annotations

import base64
import functools
import json
from typing import Any
from urllib.parse import quote

import aiohttp

from citynode.core.keylog import origin_id
from citynode.core.records import Record, stored_record
from citynode.errors import InvalidRecord
from citynode.render import iso_time, jsonable
from citynode.sinks.outbox import Outcome, Sink, outcome_of_status
from citynode.storage import OutboxRow

__all__ = ["EVENT_TYPE", "CloudEventsSink", "event_attributes", "event_request", "source_of"]

EVENT_TYPE = "org.citynode.record"
# Printable ASCII but space, '"' and '%': sent as they are; the rest percent-encoded.
_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')


@functools.lru_cache(maxsize=4096)
def source_of(origin: bytes, feed: str, key: bytes | None = None) -> str:
    """``urn:citynode:<origin node id>:<feed>`` (cached: one per feed, every event);
    ``key``: the signing key the record names (version 3: a cn2 origin), else None."""
    return f"urn:citynode:{origin_id(origin, key)}:{feed}"


def event_attributes(rec: Record, envelope: bytes) -> dict[str, Any]:
    """The context attributes of ``rec``'s event (see the module docstring)."""
    out: dict[str, Any] = {
        "specversion": "1.0",
        "id": rec.id.hex(),
        "source": source_of(rec.origin, rec.feed, rec.key),
        "type": EVENT_TYPE,
        "time": iso_time(rec.time),
        "datacontenttype": "application/json",
        "citynodetype": rec.type,
        "citynodeseq": rec.seq,
        "citynodeenvelope": base64.b64encode(envelope).decode("ascii"),
    }
    if rec.subject is not None:
        out["subject"] = rec.subject
    return out


def event_request(rec: Record, envelope: bytes, mode: str) -> tuple[dict[str, str], bytes]:
    """``(headers, body)`` of the POST delivering ``rec`` in ``mode`` ("structured" or
    "binary")."""
    attrs = event_attributes(rec, envelope)
    has_data = rec.payload is not None
    if mode == "structured":
        event = dict(attrs)
        if has_data:
            event["data"] = jsonable(rec.data)
        return ({"Content-Type": "application/cloudevents+json; charset=utf-8"},
                json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode())
    headers = {f"ce-{k}": quote(str(v), safe=_SAFE) for k, v in attrs.items()
               if k != "datacontenttype"}
    headers["Content-Type"] = "application/json"
    body = (json.dumps(jsonable(rec.data), ensure_ascii=False, separators=(",", ":")).encode()
            if has_data else b"")
    return headers, body


class CloudEventsSink(Sink):
    """``[[sinks.cloudevents]]``: one POST per record, in order per feed."""

    async def send(self, session: aiohttp.ClientSession, rows: list[OutboxRow]
                   ) -> list[Outcome]:
        out: list[Outcome] = []
        for row in rows:
            try:
                rec = stored_record(row.envelope)
            except InvalidRecord as exc:  # our own database: cannot happen; never blocks
                out.append(Outcome(False, False, f"unreadable record: {exc}"))
                continue
            headers, body = event_request(rec, row.envelope, self.cfg.mode)
            async with session.post(self.cfg.url, data=body, headers=headers) as resp:
                text = "" if 200 <= resp.status < 300 else await _text(resp)
                result = outcome_of_status(resp.status, text, resp.headers.get("Retry-After"))
            out.append(result)
            if not result.ok and result.retry:
                break
        return out


async def _text(resp: aiohttp.ClientResponse) -> str:
    """The start of an error answer (bounded: the receiver is not trusted either)."""
    try:
        return (await resp.content.read(300)).decode("utf-8", "replace")
    except (aiohttp.ClientError, TimeoutError):
        return ""
