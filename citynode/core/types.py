"""Payload types: which payloads a record may carry, and their validation.

:func:`validate_payload` runs on every record this node signs and every record it
receives, so it is table-driven: the tables below are turned into small checking
closures once, at import, and a call does dictionary look-ups, ``type()`` tests and at
most a few precompiled regular-expression matches. It raises :class:`PayloadError` and
nothing else; ``PayloadError.reason`` is one of:

``unknown_type``   the type is neither built in nor a namespaced custom type
``missing_field``  a required attribute, or every one of the measurements, is missing
``bad_value``      an attribute has the wrong type, shape or range
``bad_unit``       a normalized measurement names a unit code not accepted for it
``bad_key``        an extra attribute name is not a string of 1 to 64 characters
``bad_erasure``    a ``citynode.Erasure`` payload is not exactly as specified

Built-in types are the key-values form of FIWARE Smart Data Models
(AirQualityObserved, TrafficFlowObserved, WeatherObserved, WaterQualityObserved,
WasteContainer) plus our CyberSecurityNotice. Attributes a type does not list are
allowed (Smart Data Models define many more), values unchecked, as long as their name
is a string of 1 to 64 characters; ``id`` and ``type`` attributes are such extras.
Any other type name is rejected unless it is a namespaced custom type: a lowercase
dotted namespace of two labels or more, a dot and a CamelCase name, at most 128
characters (``org.example.Noise``, ``id.go.jakarta.FloodGauge``); its payload must be
a map and is not checked further.

Measurements
------------
A measurement is a plain number in its default unit, or the NGSI-LD normalized form
``{"value": number, "unitCode": CODE}`` with a UN/CEFACT Common Code allowed for it
(``unitCode`` may be left out to mean the default unit; ``type`` ("Property") and
``observedAt`` (date-time) are also allowed there, nothing else). Numbers are finite
``int`` or ``float``, never ``bool``. "plain" means that no unit code exists: such a
value is a bare number, and any ``unitCode`` is refused.

==================================================  =========  ====================  ===============
attribute                                           default    also accepted         range (default)
==================================================  =========  ====================  ===============
pm1 pm25 pm10 no2 no nox o3 so2 nh3 c6h6            GQ µg/m³   GP mg/m³, 59 ppm,     >= 0
                                                               61 ppb
co                                                  GP mg/m³   GQ, 59, 61            >= 0
co2                                                 59 ppm     -                     >= 0
methaneConcentration                                59 ppm     61, GQ, GP            >= 0
temperature dewPoint feelsLikeTemperature           CEL °C     -                     >= -273.15
relativeHumidity occupancy fillingLevel reliability C62 ratio  P1 percent (0..100)   0..1
atmosphericPressure                                 A97 hPa    -                     >= 0
windSpeed averageVehicleSpeed                       KMH km/h   MTS m/s               >= 0
windDirection                                       DD degree  -                     -180..360
precipitation                                       MMT mm     -                     >= 0
snowHeight                                          MMT mm     CMT cm                >= 0
solarRadiation                                      D54 W/m²   -                     >= 0
illuminance                                         LUX lx     -                     >= 0
visibility averageGapDistance averageVehicleLength  MTR m      -                     >= 0
averageHeadwayTime                                  SEC s      -                     >= 0
conductivity                                        D10 S/m    -                     >= 0
O2 NO3 NH4 PO4 Cl tds                               M1 mg/L    -                     >= 0
chla                                                GP mg/m³   -                     >= 0
orp                                                 2Z mV      -                     any
cargoWeight                                         KGM kg     -                     >= 0
intensity (vehicles per observation period)         plain      integer only          >= 0
pH                                                  plain      -                     0..14
turbidity salinity uVIndexMax airQualityIndex       plain      -                     >= 0
==================================================  =========  ====================  ===============

Other attributes: date-times (``dateObserved``, ``dateIssued`` ...) are RFC 3339
strings with a ``Z`` or ``+hh:mm`` offset (``2026-11-28T07:00:00+07:00``); a local time
without an offset is ambiguous between cities and is refused. ``location`` is a GeoJSON
Point (``[longitude, latitude]``, optional altitude), LineString (2 to 1000 positions)
or Polygon (closed rings of 4 positions or more, 1000 positions in all).
:func:`describe_types` gives all of this as data, built from the same tables.

Every node must accept exactly the same records, or replicas would diverge: so
date-times are matched by a pattern here rather than by ``datetime.fromisoformat``,
whose accepted forms differ between Python versions.
"""

from __future__ import annotations

import ipaddress
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from citynode.errors import PayloadError

__all__ = [
    "BUILTIN_TYPES",
    "CUSTOM_TYPE_PATTERN",
    "ERASURE_FEED",
    "ERASURE_TYPE",
    "MAX_ERASURE_ENTRIES",
    "describe_types",
    "is_custom_type",
    "point_of",
    "validate_erasure",
    "validate_payload",
]

Checker = Callable[[Any], None]

# The largest finite float: ``lo <= v <= hi`` with these bounds also rejects NaN and
# +-infinity in the same comparison.
_BIG = 1.7976931348623157e308
_HUGE_INT = 2**1024  # above every finite float
_MAX_EXTRA_KEY = 64
_MAX_CUSTOM_NAME = 128
_MAX_POSITIONS = 1000
_MAX_INDICATOR_VALUE = 2048
_NORMALIZED_KEYS = frozenset({"value", "unitCode", "type", "observedAt"})

CUSTOM_TYPE_PATTERN = r"[a-z][a-z0-9-]*(?:\.[a-z][a-z0-9-]*)+\.[A-Z][A-Za-z0-9]*"
_CUSTOM_RE = re.compile(CUSTOM_TYPE_PATTERN, re.ASCII)

# RFC 3339 date-time. Month lengths are in the pattern; the one group captures a
# February 29th, whose year must then be a leap year.
_DATETIME_RE = re.compile(
    r"[0-9]{4}-"
    r"(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])"
    r"|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
    r"|02-(?:0[1-9]|1[0-9]|2[0-8]|(29)))"
    r"[Tt](?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\.[0-9]{1,9})?"
    r"(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])",
    re.ASCII,
)
# Only for ordering two date-times already accepted by _DATETIME_RE.
_DATETIME_PARTS_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2}).([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))",
    re.ASCII,
)
_CVE_RE = re.compile(r"CVE-[0-9]{4}-[0-9]{4,19}", re.ASCII)
_HEX64_RE = re.compile(r"[0-9a-fA-F]{64}", re.ASCII)
_HEX32_RE = re.compile(r"[0-9a-fA-F]{32}", re.ASCII)
_DOMAIN_RE = re.compile(
    r"(?=.{1,253}\Z)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?",
    re.ASCII,
)
# "Whitespace" in the url and email rules is the six ASCII characters tab, LF, VT, FF,
# CR and space, written out (not \s, whose meaning varies between regex engines);
# non-ASCII characters, U+00A0 included, are allowed.
_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\t\n\v\f\r ]+", re.ASCII)
_EMAIL_RE = re.compile(r"[^@\t\n\v\f\r ]+@[^@\t\n\v\f\r ]+", re.ASCII)


class _Problem(Exception):
    """A check failed. ``sub`` locates the fault below the attribute being checked
    (``.value``, ``.coordinates[1]``); :func:`validate_payload` prefixes the attribute
    name and the type and raises :class:`PayloadError`. Never escapes this module."""

    def __init__(self, reason: str, detail: str, sub: str = "") -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.sub = sub


def _show(value: Any) -> str:
    """A short printable form of a bad value, for error messages (error path only)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_KINDS: dict[type, str] = {
    dict: "a map",
    list: "a list",
    tuple: "a list",
    str: "a string",
    bytes: "bytes",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    type(None): "null",
}


def _kind(value: Any) -> str:
    """What ``value`` is, in words, for error messages."""
    return _KINDS.get(type(value), type(value).__name__)


def _field(key: Any) -> str:
    """An attribute name as shown in error messages (quoted and cut if odd or long)."""
    if type(key) is str and 0 < len(key) <= _MAX_EXTRA_KEY and key.isprintable():
        return key
    return _show(key)


def _listing(items: Iterable[str]) -> str:
    words = list(items)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


# --------------------------------------------------------------------------- scalars


def _check_datetime(v: Any) -> None:
    if type(v) is not str:
        raise _Problem("bad_value", f"must be an RFC 3339 date-time string, not {_kind(v)}")
    m = _DATETIME_RE.fullmatch(v)
    if m is None:
        raise _Problem(
            "bad_value",
            f"{_show(v)} is not an RFC 3339 date-time with an offset, such as "
            "2026-11-28T07:00:00Z or 2026-11-28T07:00:00+07:00",
        )
    if m.lastindex is not None:  # February 29th
        year = int(v[:4])
        if year % 4 or (year % 100 == 0 and year % 400):
            raise _Problem("bad_value", f"{_show(v)}: {year} is not a leap year")


def _instant(v: str) -> tuple[int, int]:
    """``(seconds, nanoseconds)`` since 0000-03-01 of a date-time accepted by
    :func:`_check_datetime`, so that date-times with different offsets compare."""
    m = _DATETIME_PARTS_RE.fullmatch(v)
    assert m is not None  # guaranteed by _check_datetime
    y, mo, d, hh, mi, ss = (int(m[i]) for i in range(1, 7))
    # Days from civil date (Howard Hinnant's algorithm), valid for years 0..9999.
    if mo <= 2:  # the computation counts years from March
        y -= 1
    era, yoe = divmod(y, 400)
    doy = (153 * (mo + (-3 if mo > 2 else 9)) + 2) // 5 + d - 1
    days = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy
    seconds = days * 86400 + hh * 3600 + mi * 60 + ss
    if m[8] is not None:
        offset = int(m[9]) * 3600 + int(m[10]) * 60
        seconds -= offset if m[8] == "+" else -offset
    nanos = int((m[7] or "0").ljust(9, "0")[:9])
    return seconds, nanos


def _check_str(v: Any) -> None:
    if type(v) is not str:
        raise _Problem("bad_value", f"must be a string, not {_kind(v)}")


def _check_bool(v: Any) -> None:
    if type(v) is not bool:
        raise _Problem("bad_value", f"must be true or false, not {_kind(v)}")


def _check_map(v: Any) -> None:
    if type(v) is not dict:
        raise _Problem("bad_value", f"must be a map, not {_kind(v)}")


def _check_str_or_list(v: Any) -> None:
    if type(v) is str:
        return
    if type(v) is list or type(v) is tuple:
        for i, item in enumerate(v):
            if type(item) is not str:
                raise _Problem("bad_value", f"must be a string, not {_kind(item)}", f"[{i}]")
        return
    raise _Problem("bad_value", f"must be a string or a list of strings, not {_kind(v)}")


# --------------------------------------------------------------------------- attributes


class _Attr(ABC):
    """One attribute's rule: a checking closure for the hot path, a description for docs."""

    __slots__ = ()

    @abstractmethod
    def checker(self) -> Checker:
        """The function that checks a value of this attribute."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The rule, for describe_types() and the docs."""


class _Simple(_Attr):
    """An attribute checked by a shared module-level function."""

    __slots__ = ("_check", "_kind")

    def __init__(self, check: Checker, kind: str) -> None:
        self._check = check
        self._kind = kind

    def checker(self) -> Checker:
        return self._check

    def describe(self) -> dict[str, Any]:
        return {"kind": self._kind}


_DATETIME = _Simple(_check_datetime, "datetime")
_STR = _Simple(_check_str, "string")
_BOOL = _Simple(_check_bool, "boolean")
_MAP = _Simple(_check_map, "map")
_STR_OR_LIST = _Simple(_check_str_or_list, "string-or-string-list")


class _Str(_Attr):
    """A string with a length range."""

    __slots__ = ("max_len", "min_len")

    def __init__(self, min_len: int, max_len: int | None = None) -> None:
        self.min_len = min_len
        self.max_len = max_len

    def checker(self) -> Checker:
        lo, hi = self.min_len, self.max_len if self.max_len is not None else _BIG
        span = f"{lo} or more" if self.max_len is None else f"{lo} to {self.max_len}"

        def check(v: Any) -> None:
            if type(v) is not str:
                raise _Problem("bad_value", f"must be a string, not {_kind(v)}")
            if not lo <= len(v) <= hi:
                raise _Problem("bad_value", f"must have {span} characters, not {len(v)}")

        return check

    def describe(self) -> dict[str, Any]:
        return {"kind": "string", "min_length": self.min_len, "max_length": self.max_len}


class _Enum(_Attr):
    """One of a fixed set of strings."""

    __slots__ = ("hints", "values")

    def __init__(self, values: tuple[str, ...], hints: Mapping[str, str] | None = None) -> None:
        self.values = values
        self.hints = dict(hints or {})

    def checker(self) -> Checker:
        allowed = frozenset(self.values)
        values, hints = self.values, self.hints

        def check(v: Any) -> None:
            if type(v) is not str or v not in allowed:
                hint = hints.get(v, "") if type(v) is str else ""
                raise _Problem("bad_value", f"{_show(v)} is not one of {_listing(values)}{hint}")

        return check

    def describe(self) -> dict[str, Any]:
        return {"kind": "enum", "values": list(self.values)}


class _Int(_Attr):
    """An integer (not a bool) in a range."""

    __slots__ = ("hi", "lo")

    def __init__(self, lo: int, hi: int) -> None:
        self.lo = lo
        self.hi = hi

    def checker(self) -> Checker:
        lo, hi = self.lo, self.hi

        def check(v: Any) -> None:
            if type(v) is not int or not lo <= v <= hi:
                raise _Problem("bad_value", f"must be an integer from {lo} to {hi}, not {_show(v)}")

        return check

    def describe(self) -> dict[str, Any]:
        return {"kind": "integer", "min": self.lo, "max": self.hi}


class _StrList(_Attr):
    """A list of strings, optionally each matching a pattern."""

    __slots__ = ("example", "max_items", "pattern")

    def __init__(
        self, max_items: int, pattern: re.Pattern[str] | None = None, example: str = ""
    ) -> None:
        self.max_items = max_items
        self.pattern = pattern
        self.example = example

    def checker(self) -> Checker:
        max_items, pattern, example = self.max_items, self.pattern, self.example

        def check(v: Any) -> None:
            if type(v) is not list and type(v) is not tuple:
                raise _Problem("bad_value", f"must be a list of strings, not {_kind(v)}")
            if len(v) > max_items:
                raise _Problem("bad_value", f"has {len(v)} items; at most {max_items} allowed")
            for i, item in enumerate(v):
                if type(item) is not str:
                    raise _Problem("bad_value", f"must be a string, not {_kind(item)}", f"[{i}]")
                if pattern is not None and pattern.fullmatch(item) is None:
                    raise _Problem(
                        "bad_value", f"{_show(item)} is not of the form {example}", f"[{i}]"
                    )

        return check

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "string-list", "max_items": self.max_items}
        if self.pattern is not None:
            out["pattern"] = self.pattern.pattern
        return out


class _Unit:
    """A unit a measurement may be given in; ``code`` None means no unit code exists."""

    __slots__ = ("code", "hi", "ihi", "ilo", "label", "lo")

    def __init__(self, code: str | None, label: str, lo: float = 0.0, hi: float = _BIG) -> None:
        self.code = code
        self.label = label
        self.lo = lo
        self.hi = hi
        # The same bounds for int values (v >= lo <=> v >= ceil(lo) for an integer v).
        self.ilo = math.ceil(lo) if lo > -_BIG else -_HUGE_INT
        self.ihi = math.floor(hi) if hi < _BIG else _HUGE_INT

    def span(self) -> str:
        if self.hi == _BIG:
            return "any finite value" if self.lo == -_BIG else f">= {self.lo:g}"
        return f"{self.lo:g}..{self.hi:g}"

    def name(self) -> str:
        return f"{self.code} ({self.label})" if self.code else self.label


class _Quantity(_Attr):
    """A measurement: a number in the default unit (``units[0]``), or the normalized
    form ``{"value", "unitCode"}`` with any of ``units``."""

    __slots__ = ("_by_code", "integer", "units")

    def __init__(self, *units: _Unit, integer: bool = False) -> None:
        self.units = units
        self.integer = integer
        self._by_code = {u.code: u for u in units if u.code is not None}

    def checker(self) -> Checker:
        unit = self.units[0]
        lo, hi, ilo, ihi = unit.lo, unit.hi, unit.ilo, unit.ihi
        by_code = {code: (u.lo, u.hi, u.ilo, u.ihi) for code, u in self._by_code.items()}
        full = self._full
        # The closures accept the common valid cases with the fewest operations and
        # leave everything else (normalized form, errors) to _full. Integers are
        # compared with integer bounds: comparing an int with a float is much slower.
        if self.integer:

            def check_count(v: Any) -> None:
                if type(v) is not int or not ilo <= v <= ihi:
                    full(v)

            return check_count

        def check(v: Any) -> None:
            t = type(v)
            if t is float:
                if lo <= v <= hi:
                    return
            elif t is int:
                if ilo <= v <= ihi:
                    return
            elif t is dict and len(v) == 2:  # {"value": x, "unitCode": code}
                code = v.get("unitCode")
                bounds = by_code.get(code) if type(code) is str else None
                if bounds is not None:
                    x = v.get("value")
                    t = type(x)
                    if (t is float and bounds[0] <= x <= bounds[1]) or (
                        t is int and bounds[2] <= x <= bounds[3]
                    ):
                        return
            full(v)

        return check

    def _full(self, v: Any) -> None:
        """The whole rule, with messages: raises :class:`_Problem` or returns."""
        t = type(v)
        if t is dict:
            self._normalized(v)
        elif t is int or t is float:
            self._number(v, self.units[0], "")
        else:
            raise _Problem("bad_value", f"must be a number or {{value, unitCode}}, not {_kind(v)}")

    def _number(self, v: Any, unit: _Unit, sub: str) -> None:
        t = type(v)
        if t is not int and (self.integer or t is not float):
            want = "an integer" if self.integer else "a number"
            raise _Problem("bad_value", f"must be {want}, not {_kind(v)}", sub)
        if not unit.lo <= v <= unit.hi:
            raise _Problem(
                "bad_value", f"{_show(v)} is out of range: {unit.span()} in {unit.name()}", sub
            )

    def _normalized(self, v: dict[Any, Any]) -> None:
        for key in v:
            if key not in _NORMALIZED_KEYS:
                raise _Problem(
                    "bad_value",
                    f"unexpected key {_show(key)} in a normalized value; allowed are "
                    "value, unitCode, type and observedAt",
                )
        if "value" not in v:
            raise _Problem("bad_value", "a normalized value needs a 'value'")
        unit = self.units[0]
        if "unitCode" in v:
            code = v["unitCode"]
            found = self._by_code.get(code) if type(code) is str else None
            if found is None:
                if not self._by_code:
                    why = "has no UN/CEFACT unit code: leave unitCode out"
                else:
                    why = "is not accepted here: use " + _listing(
                        u.name() for u in self.units if u.code
                    )
                raise _Problem("bad_unit", f"unit {_show(code)} {why}", ".unitCode")
            unit = found
        self._number(v["value"], unit, ".value")
        if "type" in v and v["type"] != "Property":
            raise _Problem("bad_value", "must be 'Property' when present", ".type")
        if "observedAt" in v:
            try:
                _check_datetime(v["observedAt"])
            except _Problem as p:
                p.sub = ".observedAt"
                raise

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "quantity",
            "integer": self.integer,
            "default_unit": self.units[0].code,
            "units": [
                {
                    "code": u.code,
                    "label": u.label,
                    "min": None if u.lo == -_BIG else u.lo,
                    "max": None if u.hi == _BIG else u.hi,
                }
                for u in self.units
            ],
        }


# --------------------------------------------------------------------------- GeoJSON


def _check_position(p: Any) -> None:
    if type(p) is not list and type(p) is not tuple:
        raise _Problem("bad_value", f"a position is a list [longitude, latitude], not {_kind(p)}")
    n = len(p)
    if n != 2 and n != 3:
        raise _Problem("bad_value", f"a position has 2 or 3 numbers, not {n}")
    lon, lat = p[0], p[1]
    t = type(lon)
    if t is not float and t is not int:
        raise _Problem("bad_value", f"longitude must be a number, not {_kind(lon)}", "[0]")
    t = type(lat)
    if t is not float and t is not int:
        raise _Problem("bad_value", f"latitude must be a number, not {_kind(lat)}", "[1]")
    if not -180 <= lon <= 180:
        raise _Problem("bad_value", f"longitude {_show(lon)} is outside -180..180", "[0]")
    if not -90 <= lat <= 90:
        hint = (
            "; GeoJSON positions are [longitude, latitude]: are they swapped?"
            if -90 <= lon <= 90 and -180 <= lat <= 180
            else ""
        )
        raise _Problem("bad_value", f"latitude {_show(lat)} is outside -90..90{hint}", "[1]")
    if n == 3:
        alt = p[2]
        t = type(alt)
        if (t is not float and t is not int) or not -_BIG <= alt <= _BIG:
            raise _Problem(
                "bad_value", f"altitude must be a finite number, not {_show(alt)}", "[2]"
            )


def _check_positions(ps: Any, lo: int, where: str) -> int:
    """Check a list of ``lo`` or more positions; return how many there are."""
    if type(ps) is not list and type(ps) is not tuple:
        raise _Problem("bad_value", f"must be a list of positions, not {_kind(ps)}", where)
    if ps and (type(ps[0]) is float or type(ps[0]) is int):
        raise _Problem(
            "bad_value", "must be a list of positions, not a single position (check nesting)", where
        )
    if not lo <= len(ps) <= _MAX_POSITIONS:
        raise _Problem(
            "bad_value", f"must have {lo} to {_MAX_POSITIONS} positions, not {len(ps)}", where
        )
    for i, p in enumerate(ps):
        try:
            _check_position(p)
        except _Problem as e:
            e.sub = f"{where}[{i}]{e.sub}"
            raise
    return len(ps)


def _check_polygon(rings: Any) -> None:
    if (type(rings) is not list and type(rings) is not tuple) or not rings:
        raise _Problem("bad_value", "a Polygon is a non-empty list of rings", ".coordinates")
    total = 0
    for i, ring in enumerate(rings):
        where = f".coordinates[{i}]"
        total += _check_positions(ring, 4, where)
        if total > _MAX_POSITIONS:
            raise _Problem("bad_value", f"a Polygon has at most {_MAX_POSITIONS} positions", where)
        if ring[0] != ring[-1]:
            raise _Problem(
                "bad_value", "a Polygon ring must be closed (last position = first)", where
            )


def _check_location(v: Any) -> None:
    # Fast path for the common case, a 2D Point of floats; anything else, valid or
    # not, takes the full check below.
    if type(v) is dict and v.get("type") == "Point":
        p = v.get("coordinates")
        if type(p) is list and len(p) == 2:
            lon, lat = p
            if (
                type(lon) is float
                and type(lat) is float
                and -180.0 <= lon <= 180.0
                and -90.0 <= lat <= 90.0
            ):
                return
    _check_geometry(v)


def _check_geometry(v: Any) -> None:
    if type(v) is not dict:
        raise _Problem("bad_value", f"must be a GeoJSON geometry map, not {_kind(v)}")
    kind = v.get("type")
    if "coordinates" not in v:
        hint = (
            ": send the GeoJSON geometry itself, not an NGSI-LD GeoProperty"
            if kind == "GeoProperty"
            else ""
        )
        raise _Problem("bad_value", f"GeoJSON geometry lacks 'coordinates'{hint}")
    coords = v["coordinates"]
    if kind == "Point":
        try:
            _check_position(coords)
        except _Problem as e:
            e.sub = ".coordinates" + e.sub
            raise
    elif kind == "LineString":
        _check_positions(coords, 2, ".coordinates")
    elif kind == "Polygon":
        _check_polygon(coords)
    else:
        raise _Problem(
            "bad_value",
            f"geometry type {_show(kind)} is not Point, LineString or Polygon",
            ".type",
        )


_LOCATION = _Simple(_check_location, "geojson")


# How deep a geometry's first position lies in its coordinates.
_NESTING = {"Point": 0, "LineString": 1, "Polygon": 2}


def point_of(data: Any) -> tuple[float, float] | None:
    """``(longitude, latitude)`` of a payload's ``location``: the Point itself, the first
    position of a LineString, or the first position of a Polygon's first ring.

    Returns None when there is no usable location (storage then indexes no area);
    never raises.
    """
    if type(data) is not dict:
        return None
    loc = data.get("location")
    if type(loc) is not dict:
        return None
    kind = loc.get("type")
    p: Any = loc.get("coordinates")
    depth = _NESTING.get(kind) if type(kind) is str else None
    if depth is None:
        return None
    for _ in range(depth):
        if (type(p) is not list and type(p) is not tuple) or not p:
            return None
        p = p[0]
    try:
        _check_position(p)
    except _Problem:
        return None
    return float(p[0]), float(p[1])


# --------------------------------------------------------------------------- indicators

_INDICATOR_TYPES = ("ipv4", "ipv6", "domain", "url", "sha256", "md5", "cve", "email", "other")


# A prefix length: decimal, no leading zero (its range is ipaddress's check).
_PREFIX_LEN_RE = re.compile(r"0|[1-9][0-9]{0,2}", re.ASCII)


def _ip_checker(version: int) -> Callable[[str], bool]:
    """The ipv4/ipv6 rule of docs/PROTOCOL.md: an address, optionally ``/`` and a prefix
    length. ``ipaddress`` alone also takes a netmask or hostmask after the ``/``, leading
    zeros in the prefix length and an IPv6 zone index (``%`` and any text, non-ASCII
    included), which the rule does not: those are refused first."""

    def ok(s: str) -> bool:
        addr, slash, prefix = s.partition("/")
        if not s.isascii() or "%" in addr or (slash and not _PREFIX_LEN_RE.fullmatch(prefix)):
            return False
        try:
            net = ipaddress.ip_network(s, strict=False)
        except ValueError:
            return False
        return net.version == version

    return ok


def _regex_checker(pattern: re.Pattern[str]) -> Callable[[str], bool]:
    return lambda s: pattern.fullmatch(s) is not None


_INDICATOR_VALUE: dict[str, tuple[Callable[[str], bool], str]] = {
    "ipv4": (_ip_checker(4), "an IPv4 address or network, such as 203.0.113.7"),
    "ipv6": (_ip_checker(6), "an IPv6 address or network, such as 2001:db8::7"),
    "domain": (_regex_checker(_DOMAIN_RE), "a domain name, such as example.org"),
    "url": (_regex_checker(_URL_RE), "a URL with a scheme, such as https://example.org/x"),
    "sha256": (_regex_checker(_HEX64_RE), "64 hexadecimal digits"),
    "md5": (_regex_checker(_HEX32_RE), "32 hexadecimal digits"),
    "cve": (_regex_checker(_CVE_RE), "CVE-YYYY-NNNN"),
    "email": (_regex_checker(_EMAIL_RE), "an e-mail address"),
    "other": (lambda s: True, "any text"),
}


class _Indicators(_Attr):
    """Indicators of compromise: a list of ``{type, value}`` maps."""

    __slots__ = ("max_items",)

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items

    def checker(self) -> Checker:
        max_items = self.max_items

        def check(v: Any) -> None:
            if type(v) is not list and type(v) is not tuple:
                raise _Problem(
                    "bad_value", f"must be a list of {{type, value}} maps, not {_kind(v)}"
                )
            if len(v) > max_items:
                raise _Problem("bad_value", f"has {len(v)} items; at most {max_items} allowed")
            for i, item in enumerate(v):
                if type(item) is not dict or item.keys() != {"type", "value"}:
                    raise _Problem("bad_value", "must be a map of exactly type and value", f"[{i}]")
                kind, value = item["type"], item["value"]
                rule = _INDICATOR_VALUE.get(kind) if type(kind) is str else None
                if rule is None:
                    raise _Problem(
                        "bad_value",
                        f"{_show(kind)} is not one of {_listing(_INDICATOR_TYPES)}",
                        f"[{i}].type",
                    )
                if type(value) is not str or not 0 < len(value) <= _MAX_INDICATOR_VALUE:
                    raise _Problem(
                        "bad_value",
                        f"must be a string of 1 to {_MAX_INDICATOR_VALUE} characters",
                        f"[{i}].value",
                    )
                if not rule[0](value):
                    raise _Problem("bad_value", f"{_show(value)} is not {rule[1]}", f"[{i}].value")

        return check

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "indicator-list",
            "max_items": self.max_items,
            "types": list(_INDICATOR_TYPES),
        }


# --------------------------------------------------------------------------- the tables

_CONC = (_Unit("GQ", "µg/m³"), _Unit("GP", "mg/m³"), _Unit("59", "ppm"), _Unit("61", "ppb"))
_POLLUTANT = _Quantity(*_CONC)
_CO = _Quantity(_CONC[1], _CONC[0], _CONC[2], _CONC[3])
_CO2 = _Quantity(_CONC[2])
_METHANE = _Quantity(_CONC[2], _CONC[3], _CONC[0], _CONC[1])
_TEMPERATURE = _Quantity(_Unit("CEL", "°C", -273.15))
_RATIO = _Quantity(_Unit("C62", "ratio", 0.0, 1.0), _Unit("P1", "percent", 0.0, 100.0))
_PRESSURE = _Quantity(_Unit("A97", "hPa"))
_SPEED = _Quantity(_Unit("KMH", "km/h"), _Unit("MTS", "m/s"))
_DIRECTION = _Quantity(_Unit("DD", "degree", -180.0, 360.0))
_PRECIPITATION = _Quantity(_Unit("MMT", "mm"))
_SNOW = _Quantity(_Unit("MMT", "mm"), _Unit("CMT", "cm"))
_IRRADIANCE = _Quantity(_Unit("D54", "W/m²"))
_ILLUMINANCE = _Quantity(_Unit("LUX", "lx"))
_LENGTH = _Quantity(_Unit("MTR", "m"))
_DURATION = _Quantity(_Unit("SEC", "s"))
_CONDUCTIVITY = _Quantity(_Unit("D10", "S/m"))
_DISSOLVED = _Quantity(_Unit("M1", "mg/L"))
_CHLOROPHYLL = _Quantity(_Unit("GP", "mg/m³"))
_REDOX = _Quantity(_Unit("2Z", "mV", -_BIG))
_MASS = _Quantity(_Unit("KGM", "kg"))
_COUNT = _Quantity(_Unit(None, "vehicles per observation period"), integer=True)
_PH = _Quantity(_Unit(None, "pH", 0.0, 14.0))
_PLAIN = _Quantity(_Unit(None, "plain number"))

# Attributes every Smart Data Model shares (GSMA-Commons); checked where listed.
_COMMON: dict[str, _Attr] = {
    "name": _STR,
    "address": _MAP,
    "areaServed": _STR,
    "dataProvider": _STR,
    "source": _STR,
}

_SEVERITIES = ("low", "medium", "high", "critical")
_TLP = ("TLP:CLEAR", "TLP:GREEN", "TLP:AMBER", "TLP:AMBER+STRICT", "TLP:RED")
_WASTE_STATUS = (
    "ok",
    "lidOpen",
    "dropped",
    "moved",
    "burning",
    "door_open",
    "vandalized",
    "unknown",
)


class _TypeSpec:
    """One built-in type: its attribute tables, and the closures made from them."""

    __slots__ = (
        "alternatives",
        "checks",
        "measure_names",
        "measures",
        "name",
        "optional",
        "post",
        "required",
        "required_names",
    )

    def __init__(
        self,
        name: str,
        required: dict[str, _Attr],
        measures: dict[str, _Attr],
        optional: dict[str, _Attr],
        alternatives: dict[str, tuple[str, ...]] | None = None,
        post: Callable[[str, dict[Any, Any]], None] | None = None,
    ) -> None:
        self.name = name
        self.required = required
        self.measures = measures
        self.optional = optional
        self.alternatives = alternatives or {}
        self.post = post
        attrs = {**optional, **measures, **required}
        for alts in self.alternatives.values():
            for alt in alts:
                attrs.setdefault(alt, _DATETIME)
        self.checks: dict[str, Checker] = {k: a.checker() for k, a in attrs.items()}
        self.required_names = tuple(required)
        self.measure_names = frozenset(measures)

    def lacks(self, name: str, data: dict[Any, Any]) -> PayloadError | None:
        """The error for required attribute ``name`` missing from ``data``, or None
        if ``data`` holds all of its alternatives instead."""
        alts = self.alternatives.get(name)
        if alts is not None and all(a in data for a in alts):
            return None
        also = f" (or give {' and '.join(alts)})" if alts else ""
        return PayloadError(
            f"{self.name} payload: {name}: required attribute is missing{also}", "missing_field"
        )

    def describe(self) -> dict[str, Any]:
        def table(attrs: dict[str, _Attr]) -> dict[str, Any]:
            return {k: a.describe() for k, a in attrs.items()}

        return {
            "required": table(self.required),
            "alternatives": {k: list(v) for k, v in self.alternatives.items()},
            "at_least_one_of": table(self.measures),
            "optional": table(
                {
                    **self.optional,
                    **{a: _DATETIME for alts in self.alternatives.values() for a in alts},
                }
            ),
            "extra_attributes": f"allowed, unchecked; names of 1 to {_MAX_EXTRA_KEY} characters",
        }


def _interval_in_order(type_name: str, data: dict[Any, Any]) -> None:
    start, end = data.get("dateObservedFrom"), data.get("dateObservedTo")
    if start is None and end is None:
        return
    if start is None or end is None:
        lacking = "dateObservedFrom" if start is None else "dateObservedTo"
        raise PayloadError(
            f"{type_name} payload: {lacking}: required with "
            f"{'dateObservedTo' if start is None else 'dateObservedFrom'}",
            "missing_field",
        )
    if _instant(start) > _instant(end):
        raise PayloadError(
            f"{type_name} payload: dateObservedTo: {_show(end)} is before dateObservedFrom "
            f"{_show(start)}",
            "bad_value",
        )


_SPECS: dict[str, _TypeSpec] = {
    spec.name: spec
    for spec in (
        _TypeSpec(
            "AirQualityObserved",
            required={"dateObserved": _DATETIME, "location": _LOCATION},
            measures={
                **dict.fromkeys(
                    ("pm1", "pm25", "pm10", "no2", "no", "nox", "o3", "so2", "nh3", "c6h6"),
                    _POLLUTANT,
                ),
                "co": _CO,
                "co2": _CO2,
            },
            optional={
                **_COMMON,
                "airQualityIndex": _PLAIN,
                "airQualityLevel": _STR,
                "refDevice": _STR_OR_LIST,
                "temperature": _TEMPERATURE,
                "relativeHumidity": _RATIO,
                "reliability": _RATIO,
                "stationName": _STR,
                "stationCode": _STR,
            },
        ),
        _TypeSpec(
            "TrafficFlowObserved",
            required={"dateObserved": _DATETIME, "location": _LOCATION},
            alternatives={"dateObserved": ("dateObservedFrom", "dateObservedTo")},
            post=_interval_in_order,
            measures={
                "intensity": _COUNT,
                "averageVehicleSpeed": _SPEED,
                "occupancy": _RATIO,
                "averageHeadwayTime": _DURATION,
                "averageGapDistance": _LENGTH,
                "congested": _BOOL,
                "averageVehicleLength": _LENGTH,
            },
            optional={
                **_COMMON,
                "laneId": _Int(0, 2**31 - 1),
                "laneDirection": _Enum(("forward", "backward")),
                "refRoadSegment": _STR,
                "vehicleType": _STR,
                "reversedLane": _BOOL,
            },
        ),
        _TypeSpec(
            "WeatherObserved",
            required={"dateObserved": _DATETIME, "location": _LOCATION},
            measures={
                "temperature": _TEMPERATURE,
                "relativeHumidity": _RATIO,
                "atmosphericPressure": _PRESSURE,
                "windSpeed": _SPEED,
                "windDirection": _DIRECTION,
                "precipitation": _PRECIPITATION,
                "solarRadiation": _IRRADIANCE,
                "visibility": _LENGTH,
                "dewPoint": _TEMPERATURE,
                "feelsLikeTemperature": _TEMPERATURE,
                "uVIndexMax": _PLAIN,
                "snowHeight": _SNOW,
            },
            optional={
                **_COMMON,
                "stationName": _STR,
                "stationCode": _STR,
                "weatherType": _STR,
                "illuminance": _ILLUMINANCE,
            },
        ),
        _TypeSpec(
            "WaterQualityObserved",
            required={"dateObserved": _DATETIME, "location": _LOCATION},
            measures={
                "temperature": _TEMPERATURE,
                "pH": _PH,
                "conductivity": _CONDUCTIVITY,
                "turbidity": _PLAIN,
                **dict.fromkeys(("O2", "NO3", "NH4", "PO4", "Cl", "tds"), _DISSOLVED),
                "orp": _REDOX,
                "chla": _CHLOROPHYLL,
                "salinity": _PLAIN,
            },
            optional={**_COMMON, "refPointOfInterest": _STR},
        ),
        _TypeSpec(
            "WasteContainer",
            required={"location": _LOCATION},
            measures={
                "fillingLevel": _RATIO,
                "status": _Enum(_WASTE_STATUS),
                "temperature": _TEMPERATURE,
                "cargoWeight": _MASS,
                "methaneConcentration": _METHANE,
            },
            optional={
                **_COMMON,
                "serialNumber": _STR,
                "wasteType": _STR,
                "refWasteContainerModel": _STR,
                "dateLastEmptying": _DATETIME,
                "nextActuationDeadline": _DATETIME,
                "dateObserved": _DATETIME,
                "storedWasteKind": _STR_OR_LIST,
            },
        ),
        _TypeSpec(
            "CyberSecurityNotice",
            required={
                "severity": _Enum(_SEVERITIES),
                "tlp": _Enum(
                    _TLP,
                    hints={
                        "TLP:WHITE": " (TLP 2.0 renamed TLP:WHITE to TLP:CLEAR)",
                        **{t.lower(): f" (did you mean {t}?)" for t in _TLP},
                    },
                ),
                "affectedSystem": _Str(1),
                "description": _Str(1, 10000),
                "dateIssued": _DATETIME,
            },
            measures={},
            optional={
                "indicators": _Indicators(1000),
                "cve": _StrList(1000, _CVE_RE, "CVE-YYYY-NNNN"),
                "title": _STR,
                "mitigation": _STR,
                "references": _StrList(1000),
            },
        ),
    )
}

BUILTIN_TYPES: frozenset[str] = frozenset(_SPECS)


# --------------------------------------------------------------------------- public API


def is_custom_type(name: Any) -> bool:
    """True if ``name`` is a namespaced custom type name (``org.example.Noise``):
    a lowercase dotted namespace of two labels or more, a dot, a CamelCase name,
    at most 128 characters. Never raises."""
    return (
        type(name) is str
        and len(name) <= _MAX_CUSTOM_NAME
        and _CUSTOM_RE.fullmatch(name) is not None
    )


def _unknown_type(type_name: Any) -> PayloadError:
    hint = ""
    if type(type_name) is str:
        for builtin in sorted(BUILTIN_TYPES):
            if builtin.lower() == type_name.lower():
                hint = f" (did you mean {builtin}?)"
    return PayloadError(
        f"unknown payload type {_show(type_name)}{hint}: use one of "
        f"{', '.join(sorted(BUILTIN_TYPES))}, or a namespaced custom type such as "
        "org.example.Noise",
        "unknown_type",
    )


#: The payload type of an erasure request (docs/PROTOCOL.md, "Payloads, retention and
#: erasure"): reserved, neither CamelCase-only like the built-ins nor a custom name.
ERASURE_TYPE = "citynode.Erasure"
#: The feed in which a node publishes its erasure requests, and nothing else.
ERASURE_FEED = "citynode.erasures"
MAX_ERASURE_ENTRIES = 1000
_MAX_ERASURE_REASON = 1000
_ERASURE_KEYS = frozenset({"erase", "reason"})
_ENTRY_KEYS = frozenset({"feed", "id", "seq"})
_FEED_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}", re.ASCII)


def _bad_erasure(detail: str) -> PayloadError:
    return PayloadError(f"{ERASURE_TYPE} payload: {detail}", "bad_erasure")


def validate_erasure(data: Any) -> list[tuple[str, int, bytes]]:
    """Check an erasure request's payload and return its entries ``(feed, seq, id)``.

    The payload is exactly ``{"erase": [{"feed", "seq", "id"}, ...], "reason": str}``:
    1 to :data:`MAX_ERASURE_ENTRIES` entries, each a feed name of the signer's (never
    :data:`ERASURE_FEED`: an erasure request is never erased), a seq from 1 to 2^63-1
    and a 32-byte record id, no position twice; a reason of 1 to 1000 characters.
    Raises :class:`PayloadError` with reason ``bad_erasure``; nothing else.
    """
    if type(data) is not dict or data.keys() != _ERASURE_KEYS:
        raise _bad_erasure("a map of exactly erase and reason")
    reason = data["reason"]
    if type(reason) is not str or not 0 < len(reason) <= _MAX_ERASURE_REASON:
        raise _bad_erasure(f"reason must be a string of 1 to {_MAX_ERASURE_REASON} characters")
    entries = data["erase"]
    if type(entries) is not list or not 0 < len(entries) <= MAX_ERASURE_ENTRIES:
        raise _bad_erasure(f"erase must be a list of 1 to {MAX_ERASURE_ENTRIES} entries")
    out: list[tuple[str, int, bytes]] = []
    seen: set[tuple[str, int]] = set()
    for n, e in enumerate(entries):
        if type(e) is not dict or e.keys() != _ENTRY_KEYS:
            raise _bad_erasure(f"erase[{n}] must be a map of exactly feed, seq and id")
        feed, seq, rid = e["feed"], e["seq"], e["id"]
        if type(feed) is not str or not _FEED_NAME_RE.fullmatch(feed):
            raise _bad_erasure(f"erase[{n}].feed is not a feed name")
        if feed == ERASURE_FEED:
            raise _bad_erasure(f"erase[{n}] names an erasure request: those are never erased")
        if type(seq) is not int or not 1 <= seq <= 2**63 - 1:
            raise _bad_erasure(f"erase[{n}].seq must be an integer from 1 to 2^63-1")
        if type(rid) is not bytes or len(rid) != 32:
            raise _bad_erasure(f"erase[{n}].id must be 32 bytes (a record id)")
        if (feed, seq) in seen:
            raise _bad_erasure(f"erase[{n}] names {feed} seq {seq} a second time")
        seen.add((feed, seq))
        out.append((feed, seq, rid))
    return out


def validate_payload(type_name: str, data: Any) -> None:
    """Check that ``data`` is a valid payload of type ``type_name``.

    Built-in types are checked attribute by attribute (see the module docstring);
    custom types only need a map. Raises :class:`PayloadError` whose message names
    the type and the attribute (``AirQualityObserved payload: pm25.unitCode: ...``)
    and whose ``reason`` is ``unknown_type``, ``missing_field``, ``bad_value``,
    ``bad_unit`` or ``bad_key``; never raises anything else, whatever ``data`` holds.
    """
    spec = _SPECS.get(type_name) if type(type_name) is str else None
    if spec is None:
        if type_name == ERASURE_TYPE:
            validate_erasure(data)
            return
        if not is_custom_type(type_name):
            raise _unknown_type(type_name)
        if type(data) is not dict:
            raise PayloadError(f"{type_name} payload must be a map, not {_kind(data)}", "bad_value")
        return
    if type(data) is not dict:
        raise PayloadError(f"{type_name} payload must be a map, not {_kind(data)}", "bad_value")
    for name in spec.required_names:
        if name not in data:
            error = spec.lacks(name, data)
            if error is not None:
                raise error
    get_check = spec.checks.get
    key: Any = None
    try:
        for key, value in data.items():
            check = get_check(key)
            if check is not None:
                check(value)
            elif type(key) is not str or not 0 < len(key) <= _MAX_EXTRA_KEY:
                raise _Problem(
                    "bad_key",
                    f"attribute names must be strings of 1 to {_MAX_EXTRA_KEY} characters",
                )
    except _Problem as p:
        raise PayloadError(
            f"{type_name} payload: {_field(key)}{p.sub}: {p.detail}",
            p.reason,
        ) from None
    measures = spec.measure_names
    if measures and measures.isdisjoint(data):
        raise PayloadError(
            f"{type_name} payload: no measurement: give at least one of {_listing(spec.measures)}",
            "missing_field",
        )
    if spec.post is not None:
        spec.post(type_name, data)


def describe_types() -> dict[str, Any]:
    """A machine-readable summary of the built-in types, for docs and the CLI.

    ``{type: {"required", "at_least_one_of", "optional": {attribute: rule},
    "alternatives": {attribute: [attributes that may replace it]}, "extra_attributes"}}``
    where a rule is a map with ``kind`` ("quantity", "datetime", "string", "enum",
    "geojson", ...) and, for quantities, ``default_unit`` and ``units`` (code, label,
    min, max; None where unbounded). Custom type names follow
    :data:`CUSTOM_TYPE_PATTERN`. A fresh structure on every call.
    """
    return {name: spec.describe() for name, spec in _SPECS.items()}
