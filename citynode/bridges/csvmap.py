"""CSV in: a mapping file (TOML) and what one row becomes. Pure (no file is read here).

``citynode import csv FILE --feed F --type T --map mapping.toml`` publishes each row of
FILE as a payload of type T. The mapping says which column gives which attribute and
how its text is read::

    subject = "station-{station}"        # optional; {column} is the cell of that column

    [columns]                            # payload attribute = column (text as it is) ...
    stationName = "name"
    pm25 = { column = "PM2.5", as = "number" }                 # ... or a column and a kind
    dateObserved = { column = "time", as = "datetime", offset = "+07:00" }

    [location]                           # optional: a GeoJSON Point from two columns
    lon = "longitude"
    lat = "latitude"

Kinds (``as``): ``text`` (the default), ``number``, ``integer``, ``boolean`` (true/false,
1/0, yes/no), ``datetime`` (RFC 3339; ``offset`` is added to a date-time without one),
``json`` (the cell is a JSON value). An empty cell leaves its attribute out (unless
``required = true``). Every problem with a row is a :class:`RowError` with a stable
``reason``: ``missing_column``, ``empty_cell``, ``bad_number``, ``bad_integer``,
``bad_boolean``, ``bad_datetime``, ``bad_json``, ``bad_location``, ``bad_subject``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from citynode.errors import ConfigError

__all__ = ["Column", "CsvMapping", "RowError", "map_row", "parse_csv_mapping"]

KINDS = ("text", "number", "integer", "boolean", "datetime", "json")
_MAX_COLUMNS = 1000
_PLACEHOLDER_RE = re.compile(r"\{([^{}]+)\}")
_OFFSET_RE = re.compile(r"[+-](?:[01][0-9]|2[0-3]):[0-5][0-9]|Z", re.ASCII)
_LOCAL_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}(?::[0-9]{2}"
                       r"(?:\.[0-9]{1,9})?)?", re.ASCII)
_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


class RowError(ValueError):
    """One row cannot become a payload (``reason``: a code, see the module docstring)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Column:
    """One attribute: from ``column``, read as ``kind``."""

    attribute: str
    column: str
    kind: str = "text"
    offset: str = ""
    required: bool = False


@dataclass(frozen=True, slots=True)
class CsvMapping:
    """A parsed mapping file."""

    columns: tuple[Column, ...]
    subject: tuple[str | tuple[str], ...] | None = None  # text, or (column,)
    lon: str | None = None
    lat: str | None = None

    def needs(self) -> set[str]:
        """The column names the mapping reads."""
        out = {c.column for c in self.columns}
        out.update(p[0] for p in self.subject or () if isinstance(p, tuple))
        out.update(c for c in (self.lon, self.lat) if c)
        return out


def parse_csv_mapping(doc: dict[str, Any], source: str) -> CsvMapping:
    """Check a mapping file's TOML table. Raises :class:`ConfigError` naming the key."""
    def fail(where: str, what: str) -> ConfigError:
        return ConfigError(f"{source}: {where}: {what}")

    for key in doc:
        if key not in ("subject", "columns", "location"):
            raise fail(key, "unknown key (known: subject, columns, location)")
    cols = doc.get("columns")
    if not isinstance(cols, dict) or not cols or len(cols) > _MAX_COLUMNS:
        raise fail("columns", f"give 1 to {_MAX_COLUMNS} attribute = \"column\" lines")
    out: list[Column] = []
    for attr, spec in cols.items():
        if not 1 <= len(attr) <= 64:
            raise fail(f"columns {attr[:64]}", "an attribute name is 1 to 64 characters")
        if isinstance(spec, str):
            spec = {"column": spec}
        if not isinstance(spec, dict):
            raise fail(f"columns {attr}", "expected a column name or a table {column, as}")
        for k in spec:
            if k not in ("column", "as", "offset", "required"):
                raise fail(f"columns {attr} {k}", "unknown key (known: column, as, offset, "
                           "required)")
        column, kind = spec.get("column"), spec.get("as", "text")
        offset, required = spec.get("offset", ""), spec.get("required", False)
        if not isinstance(column, str) or not column:
            raise fail(f"columns {attr} column", "expected a column name")
        if kind not in KINDS:
            raise fail(f"columns {attr} as", f"{kind!r} is not one of {', '.join(KINDS)}")
        if not isinstance(offset, str) or (offset and not _OFFSET_RE.fullmatch(offset)):
            raise fail(f"columns {attr} offset", f'expected "+hh:mm", "-hh:mm" or "Z", got '
                       f"{offset!r}")
        if offset and kind != "datetime":
            raise fail(f"columns {attr} offset", 'only for as = "datetime"')
        if type(required) is not bool:
            raise fail(f"columns {attr} required", "expected true or false")
        out.append(Column(attr, column, kind, offset, required))
    lon = lat = None
    loc = doc.get("location")
    if loc is not None:
        if not isinstance(loc, dict) or set(loc) != {"lon", "lat"} or not all(
                isinstance(v, str) and v for v in loc.values()):
            raise fail("location", "expected lon = \"column\" and lat = \"column\"")
        if any(c.attribute == "location" for c in out):
            raise fail("location", "columns has a location attribute too: give one")
        lon, lat = loc["lon"], loc["lat"]
    subject = None
    if "subject" in doc:
        text = doc["subject"]
        if not isinstance(text, str) or not text:
            raise fail("subject", "expected a template such as \"station-{station}\"")
        parts: list[str | tuple[str]] = []
        pos = 0
        for m in _PLACEHOLDER_RE.finditer(text):
            if m.start() > pos:
                parts.append(text[pos:m.start()])
            parts.append((m.group(1),))
            pos = m.end()
        if text[pos:]:
            parts.append(text[pos:])
        if any(isinstance(p, str) and ("{" in p or "}" in p) for p in parts):
            raise fail("subject", f"{text!r}: unbalanced braces")
        subject = tuple(parts)
    return CsvMapping(tuple(out), subject, lon, lat)


def _number(text: str, where: str) -> float | int:
    try:
        v: float | int = int(text) if re.fullmatch(r"[+-]?[0-9]+", text) else float(text)
    except ValueError:
        raise RowError(f"{where}: {text[:50]!r} is not a number", "bad_number") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise RowError(f"{where}: {text[:50]!r} is not a finite number", "bad_number")
    return v


def _cell(col: Column, text: str) -> Any:
    where = f"column {col.column!r}"
    if col.kind == "text":
        return text
    if col.kind == "number":
        return _number(text, where)
    if col.kind == "integer":
        if not re.fullmatch(r"[+-]?[0-9]{1,18}", text):
            raise RowError(f"{where}: {text[:50]!r} is not an integer", "bad_integer")
        return int(text)
    if col.kind == "boolean":
        low = text.lower()
        if low not in _TRUE | _FALSE:
            raise RowError(f"{where}: {text[:50]!r} is not true/false", "bad_boolean")
        return low in _TRUE
    if col.kind == "datetime":
        if col.offset and _LOCAL_RE.fullmatch(text):
            text = text.replace(" ", "T", 1)
            if text.count(":") == 1:
                text += ":00"
            return text + col.offset
        return text  # checked by the payload type (RFC 3339 with an offset)
    try:
        return json.loads(text)
    except ValueError:
        raise RowError(f"{where}: not a JSON value", "bad_json") from None


def map_row(m: CsvMapping, row: dict[str, str]) -> tuple[str | None, dict[str, Any]]:
    """``(subject, payload)`` of one row (column name -> cell text). Raises
    :class:`RowError`."""
    data: dict[str, Any] = {}
    for col in m.columns:
        if col.column not in row:
            raise RowError(f"column {col.column!r} is missing", "missing_column")
        text = row[col.column].strip()
        if not text:
            if col.required:
                raise RowError(f"column {col.column!r} is empty", "empty_cell")
            continue
        data[col.attribute] = _cell(col, text)
    if m.lon is not None and m.lat is not None:
        try:
            lon = _number(row.get(m.lon, "").strip(), f"column {m.lon!r}")
            lat = _number(row.get(m.lat, "").strip(), f"column {m.lat!r}")
        except RowError as exc:
            raise RowError(str(exc), "bad_location") from None
        data["location"] = {"type": "Point", "coordinates": [lon, lat]}
    subject = None
    if m.subject is not None:
        out = []
        for part in m.subject:
            if isinstance(part, str):
                out.append(part)
                continue
            cell = row.get(part[0], "").strip()
            if not cell:
                raise RowError(f"subject: column {part[0]!r} is empty or missing",
                               "bad_subject")
            out.append(cell)
        subject = "".join(out)
    return subject, data
