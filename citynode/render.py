"""JSON views of records and other protocol objects (binary fields as base64 or hex).

Msgpack envelopes are the canonical form; JSON is for humans and for clients that ask
for it with ``Accept: application/json``. A JSON record carries the envelope in base64
so a JSON client can still verify the signature itself.
"""

from __future__ import annotations

import base64
import datetime as _dt
import functools
from typing import Any

from citynode.core.keybook import CN1_NAMES, Names
from citynode.core.keylog import origin_id
from citynode.core.keys import SigningKey
from citynode.core.records import (
    SEALED_TYPE,
    Record,
    stored_record,
)
from citynode.core.sealed import open_payload, reader_key
from citynode.errors import CitynodeError

__all__ = [
    "b64",
    "iso_time",
    "jsonable",
    "parse_json_items",
    "record_json",
    "row_json",
    "stored_record_json",
]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def iso_time(ms: int) -> str:
    """RFC 3339 UTC with milliseconds."""
    t = _dt.datetime.fromtimestamp(ms / 1000, tz=_dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def jsonable(v: Any) -> Any:
    """Make a decoded msgpack value JSON-serialisable (bytes become base64 strings)."""
    if isinstance(v, bytes):
        return b64(v)
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [jsonable(x) for x in v]
    return v


@functools.lru_cache(maxsize=4096)
def _origin_id(origin: bytes, key: bytes | None) -> str:
    return origin_id(origin, key)


def record_json(rec: Record, *, rowid: int | None = None,
                key: SigningKey | None = None, envelope: bytes | None = None,
                erased: tuple[bytes, str] | None = None,
                names: Names = CN1_NAMES) -> dict[str, Any]:
    """The JSON view of a verified record. A sealed record shows its recipients (named
    by ``names``: the ``cn2`` id of a reader whose log the caller holds); with
    ``key`` of one of them it is decrypted, and ``type``/``data`` are the plaintext.
    A tombstone (payload removed) has no ``data``; it says why: ``"erased": {"by":
    erasure request id, "reason": text}`` (``erased``) or else ``"pruned": true``
    (past its feed's retention)."""
    out: dict[str, Any] = {
        "id": rec.id.hex(),
        "origin": _origin_id(rec.origin, rec.key),
        "feed": rec.feed,
        "seq": rec.seq,
        "prev": rec.prev.hex() if rec.prev else None,
        "time": rec.time,
        "time_iso": iso_time(rec.time),
        "type": rec.type,
        "data": jsonable(rec.data),
        "envelope": b64(envelope if envelope is not None else rec.envelope),
    }
    if rec.sealed is not None:
        out["sealed"] = {"to": [names.holder_name(r[0])
                                for r in rec.sealed.get("to", ())],
                         "ciphertext_bytes": len(rec.sealed.get("ct", b""))}
        if rec.type != SEALED_TYPE:  # already opened (citynode.client does it for readers)
            out["decrypted"] = True
        else:
            del out["data"]
        if rec.type == SEALED_TYPE and key is not None and \
                reader_key(rec.sealed, key) is not None:
            try:
                inner = open_payload(rec.sealed, origin=rec.origin, signer=rec.signer,
                                     feed=rec.feed, seq=rec.seq, key=key)
            except CitynodeError as exc:
                out["decrypt_error"] = str(exc)
            else:
                out.update(type=inner.type, data=jsonable(inner.data), decrypted=True)
                if inner.subject is not None:
                    out["subject"] = inner.subject
                if inner.dataschema is not None:
                    out["dataschema"] = inner.dataschema
    if rec.payload is None:
        out.pop("data", None)
        if erased is not None:
            out["erased"] = {"by": erased[0].hex(), "reason": erased[1]}
        else:
            out["pruned"] = True
    if rec.subject is not None:
        out["subject"] = rec.subject
    if rec.dataschema is not None:
        out["dataschema"] = rec.dataschema
    if rowid is not None:
        out["cursor"] = rowid
    return out


def stored_record_json(envelope: bytes, *, rowid: int | None = None,
                       key: SigningKey | None = None,
                       erased: tuple[bytes, str] | None = None,
                       names: Names = CN1_NAMES) -> dict[str, Any]:
    """JSON view of an envelope read from our own database (verified when it was stored;
    decoded again here, not re-verified). ``erased``, ``names``: see
    :func:`record_json`."""
    return record_json(stored_record(envelope), rowid=rowid, key=key, envelope=envelope,
                       erased=erased, names=names)


def row_json(row: Any, *, key: SigningKey | None = None, cursor: bool = True,
             names: Names = CN1_NAMES) -> dict[str, Any]:
    """JSON view of a stored row (:class:`citynode.storage.StoredRow`), tombstones
    saying why their payload is gone. ``names``: see :func:`record_json`."""
    by = getattr(row, "erased_by", None)  # rows of other shapes carry full records
    erased = (by, row.erased_reason) if by is not None else None
    return stored_record_json(row.envelope, rowid=row.rowid if cursor else None, key=key,
                              erased=erased, names=names)


def parse_json_items(text: str) -> list[dict[str, Any]]:
    """Payloads to publish: one JSON object (pretty-printed or not), a JSON array of
    objects, or JSON Lines. Raises ValueError saying what is wrong (and on which line)."""
    import json

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # JSON allows a key twice (the last wins): a payload that says two things about
        # one attribute is refused, as the canonical encoding refuses duplicate keys.
        out = dict(pairs)
        if len(out) != len(pairs):  # the rare case: find which key, for the message
            seen: set[str] = set()
            for k, _v in pairs:
                if k in seen:
                    raise ValueError(f"key {k!r} appears twice in one object")
                seen.add(k)
        return out

    text = text.strip()
    if not text:
        raise ValueError("no input: give a JSON object, a JSON array or JSON Lines")
    try:
        whole = json.loads(text, object_pairs_hook=no_duplicates)
        items = whole if isinstance(whole, list) else [whole]
    except ValueError as exc:  # invalid JSON, or a key twice (in JSON Lines: which line?)
        not_json = isinstance(exc, json.JSONDecodeError)
        if "\n" not in text:
            raise ValueError(f"invalid JSON: {exc}" if not_json else str(exc)) from None
        items = []  # JSON Lines
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line, object_pairs_hook=no_duplicates))
                except json.JSONDecodeError as exc2:
                    if not not_json:  # one pretty-printed document, with a key twice
                        raise ValueError(str(exc)) from None
                    raise ValueError(f"line {n}: invalid JSON: {exc2}") from None
                except ValueError as exc2:
                    raise ValueError(f"line {n}: {exc2}") from None
    if not all(isinstance(i, dict) for i in items):
        raise ValueError("each item must be a JSON object")
    return items
