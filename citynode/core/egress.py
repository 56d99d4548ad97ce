"""Egress policy: what of a payload may leave the city, applied before it is signed.

A city states per feed (``[feeds.NAME.egress]`` in node.toml) what its records may
carry. Publishing applies the policy to each payload, deterministically, in this order:

1. ``types``: only these payload types may be published on the feed; another type is
   refused (``egress_type``).
2. ``deny``: attributes that must never leave (personal data, internal identifiers). A
   deny name matches an attribute at any depth (``contact.email`` and
   ``items[2].email`` as well as ``email``) and regardless of case (names are compared
   after Unicode case folding, so ``Email`` and ``EMAIL`` match ``email``). A payload
   holding one is refused, naming its full path (``egress_denied``): never silently
   dropped, since the system that produced it must be fixed.
3. ``allow``: when given, only these top-level attributes leave; the others are
   removed. It names attributes exactly (case-sensitive) and does not look inside
   them: an allowed attribute leaves whole, after the deny check and the coarsening
   below have looked inside it.
4. Location coarsening of ``location`` (every GeoJSON position's longitude and
   latitude): ``location_decimals`` rounds to N decimals (3 is about 110 m), or
   ``location_grid_degrees`` snaps to the nearest multiple of a grid step.
5. Time coarsening: ``time_resolution_seconds`` rounds every RFC 3339 date-time string,
   at any depth (``dateObserved``, but also an NGSI ``observedAt`` inside an attribute
   or a date-time in a list), down to a multiple of that many seconds since the Unix
   epoch, written in the same UTC offset, without fractions.
6. Free text: ``text_max_chars`` cuts the top-level string attributes named in
   ``text_attributes`` to that many characters; 0 removes those attributes.

The record's ``subject`` leaves the city too (in the salted payload map, beside the
data), so every rule applies to it as to a top-level attribute named ``subject``: a
deny-list naming ``subject`` refuses a record that has one (``egress_denied``); an
allow-list that does not name it removes it; time coarsening rounds it if it is a
date-time; and it is free text (in :data:`DEFAULT_TEXT_ATTRIBUTES`), so
``text_max_chars`` cuts or removes it.

Walking inside a payload is bounded: one nested deeper than :data:`MAX_DEPTH` levels
is refused (``too_deep``); the record decoder's own limit is far below it.

The result is then validated against its payload type like any payload: a policy that
removes a required attribute makes publishing fail with that attribute's name.

The policy has a digest (:meth:`EgressPolicy.digest`): SHA-256 over the domain
``citynode/egress-policy/v1`` and the canonical msgpack of its settings, so partners
and auditors can tell which rules applied.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from citynode.core import encoding
from citynode.errors import ConfigError, PayloadError

__all__ = ["DEFAULT_TEXT_ATTRIBUTES", "MAX_DEPTH", "OPEN", "Applied", "EgressPolicy", "apply"]

DOMAIN = b"citynode/egress-policy/v1\x00"
#: The free-text attributes of the built-in payload types.
#: ``subject`` is the record's subject (any text its publisher gives).
DEFAULT_TEXT_ATTRIBUTES = ("alternateName", "description", "name", "stationName", "subject")
#: The name the rules know the record's subject by.
SUBJECT = "subject"
_MAX_DECIMALS = 12
#: The deepest nesting the deny check and time coarsening walk (see the docstring).
MAX_DEPTH = 64

# The same RFC 3339 form payload types accept (core/types.py), split into its parts.
_DATETIME = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.[0-9]{1,9})?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))",
    re.ASCII,
)


@dataclass(frozen=True)
class EgressPolicy:
    """One feed's egress rules (see the module docstring). The default lets everything
    through unchanged."""

    types: frozenset[str] | None = None
    allow: frozenset[str] | None = None
    deny: frozenset[str] = frozenset()
    location_decimals: int | None = None
    location_grid_degrees: float | None = None
    time_resolution_seconds: int | None = None
    text_max_chars: int | None = None
    text_attributes: tuple[str, ...] = field(default=DEFAULT_TEXT_ATTRIBUTES)

    def __post_init__(self) -> None:
        if self.location_decimals is not None and self.location_grid_degrees is not None:
            raise ConfigError("give location_decimals or location_grid_degrees, not both")
        if self.location_decimals is not None and not (
                0 <= self.location_decimals <= _MAX_DECIMALS):
            raise ConfigError(f"location_decimals must be 0 to {_MAX_DECIMALS}")
        g = self.location_grid_degrees
        if g is not None and not (math.isfinite(g) and 0 < g <= 90):
            raise ConfigError("location_grid_degrees must be above 0 and at most 90")
        if self.time_resolution_seconds is not None and not (
                1 <= self.time_resolution_seconds <= 366 * 86400):
            raise ConfigError("time_resolution_seconds must be 1 to 31622400 (a year)")
        if self.text_max_chars is not None and self.text_max_chars < 0:
            raise ConfigError("text_max_chars must be 0 (remove) or more")
        # Deny matches case-insensitively, so an allowed name that folds to a denied one
        # could never leave either: say so at load time.
        denied = {d.casefold() for d in self.deny}
        both = {a for a in self.allow or () if a.casefold() in denied}
        if both:
            raise ConfigError(f"attributes both allowed and denied: {', '.join(sorted(both))}")

    @property
    def is_open(self) -> bool:
        """Does this policy let every payload through unchanged?"""
        return self == OPEN

    def settings(self) -> dict[str, Any]:
        """The rules as a plain map (sorted lists; unset rules left out): what the
        digest covers, and what ``citynode policy check`` shows."""
        out: dict[str, Any] = {}
        if self.types is not None:
            out["types"] = sorted(self.types)
        if self.allow is not None:
            out["allow"] = sorted(self.allow)
        if self.deny:
            out["deny"] = sorted(self.deny)
        for name in ("location_decimals", "location_grid_degrees",
                     "time_resolution_seconds"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.text_max_chars is not None:
            out["text_max_chars"] = self.text_max_chars
            out["text_attributes"] = sorted(self.text_attributes)
        return out

    def digest(self) -> bytes:
        """SHA-256 of the domain and the canonical msgpack of :meth:`settings`."""
        return hashlib.sha256(DOMAIN + encoding.encode(self.settings())).digest()


OPEN = EgressPolicy()


@dataclass(frozen=True)
class Applied:
    """A payload as it leaves the city (its data and its subject: None when it has
    none or the policy removed it), and what the policy changed (in words)."""

    data: dict[str, Any]
    changes: tuple[str, ...]
    subject: str | None = None


def apply(policy: EgressPolicy, type_name: str, data: Mapping[str, Any],
          subject: str | None = None) -> Applied:
    """Apply ``policy`` to one payload of ``type_name`` and its record's ``subject``
    (see the module docstring). Pure and deterministic; the input is not modified.
    Raises :class:`PayloadError` (``egress_type``, ``egress_denied``) if the payload may
    not leave at all."""
    if policy.types is not None and type_name not in policy.types:
        raise PayloadError(
            f"type {type_name} may not be published on this feed (its egress policy "
            f"allows {', '.join(sorted(policy.types)) or 'no type'})", "egress_type")
    deny = frozenset(d.casefold() for d in policy.deny)
    denied = _denied_paths(data, deny)
    if subject is not None and SUBJECT in deny:
        denied = sorted([*denied, f"{SUBJECT} (the record's subject)"])
    if denied:
        raise PayloadError(
            f"attribute {', '.join(denied)} may not leave this city (the feed's egress "
            "policy denies it): remove it at the source", "egress_denied")
    changes: list[str] = []
    out = dict(data)
    if policy.allow is not None:
        dropped = sorted(k for k in out if k not in policy.allow)
        for k in dropped:
            del out[k]
        if dropped:
            changes.append(f"removed {', '.join(dropped)} (not on the allow-list)")
    if "location" in out and (policy.location_decimals is not None
                              or policy.location_grid_degrees is not None):
        coarse = _coarsen_geometry(out["location"], policy)
        if coarse != out["location"]:
            out["location"] = coarse
            changes.append("location coarsened to " + (
                f"{policy.location_decimals} decimals" if policy.location_decimals is not None
                else f"a grid of {policy.location_grid_degrees} degrees"))
    if policy.time_resolution_seconds is not None:
        rounded: list[str] = []
        for k in sorted(out):
            out[k] = _floor_times(out[k], policy.time_resolution_seconds, k, rounded, 1)
        changes.extend(f"{path} rounded down to {policy.time_resolution_seconds} s"
                       for path in rounded)
    if policy.text_max_chars is not None:
        for k in sorted(set(policy.text_attributes) & set(out)):
            v = out[k]
            if policy.text_max_chars == 0:
                del out[k]
                changes.append(f"removed {k} (free text)")
            elif isinstance(v, str) and len(v) > policy.text_max_chars:
                out[k] = v[:policy.text_max_chars]
                changes.append(f"{k} cut to {policy.text_max_chars} characters")
    leaving = _subject(policy, subject, changes)
    return Applied(out, tuple(changes), leaving)


def _subject(policy: EgressPolicy, subject: str | None, changes: list[str]) -> str | None:
    """The record's subject as it leaves, by the rules of a top-level attribute named
    ``subject`` (the deny check was made with the data's); changes appended."""
    if subject is None:
        return None
    what = f"{SUBJECT} (the record's subject)"
    if policy.allow is not None and SUBJECT not in policy.allow:
        changes.append(f"removed {what} (not on the allow-list)")
        return None
    if policy.time_resolution_seconds is not None:
        floored = _floor_datetime(subject, policy.time_resolution_seconds)
        if floored is not None and floored != subject:
            changes.append(f"{what} rounded down to {policy.time_resolution_seconds} s")
            subject = floored
    if policy.text_max_chars is not None and SUBJECT in policy.text_attributes:
        if policy.text_max_chars == 0:
            changes.append(f"removed {what} (free text)")
            return None
        if len(subject) > policy.text_max_chars:
            changes.append(f"{what} cut to {policy.text_max_chars} characters")
            return subject[:policy.text_max_chars]
    return subject


def parse_policy(table: Mapping[str, Any], where: str) -> EgressPolicy:
    """An :class:`EgressPolicy` from the values of a node.toml ``egress`` table, already
    type-checked by the config loader. Raises ConfigError naming ``where``."""
    def names(key: str) -> frozenset[str] | None:
        v = table.get(key)
        return None if v is None else frozenset(_names(v, f"{where} {key}"))

    try:
        return EgressPolicy(
            types=names("types"),
            allow=names("allow"),
            deny=names("deny") or frozenset(),
            location_decimals=table.get("location_decimals"),
            location_grid_degrees=table.get("location_grid_degrees"),
            time_resolution_seconds=table.get("time_resolution_seconds"),
            text_max_chars=table.get("text_max_chars"),
            text_attributes=tuple(table.get("text_attributes", DEFAULT_TEXT_ATTRIBUTES)),
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _names(values: Iterable[str], where: str) -> list[str]:
    out = list(values)
    for v in out:
        if not v or len(v) > 64:
            raise ConfigError(f"{where}: {v!r} is not an attribute or type name")
    return out


def _denied_paths(data: Mapping[str, Any], deny: frozenset[str]) -> list[str]:
    """The paths (``a.b``, ``a[0].b``) of every attribute, at any depth, whose
    case-folded name is in ``deny`` (already case-folded), sorted. Raises PayloadError
    (``too_deep``) past :data:`MAX_DEPTH`."""
    found: list[str] = []
    if not deny:
        return found

    def walk(v: Any, path: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise PayloadError(f"{path} nests deeper than {MAX_DEPTH} levels", "too_deep")
        if isinstance(v, Mapping):
            for k, x in v.items():
                sub = f"{path}.{k}" if path else str(k)
                if isinstance(k, str) and k.casefold() in deny:
                    found.append(sub)  # refused whole: no need to look inside it
                else:
                    walk(x, sub, depth + 1)
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(x, f"{path}[{i}]", depth + 1)

    walk(data, "", 0)
    return sorted(found)


def _floor_times(v: Any, resolution: int, path: str, rounded: list[str],
                 depth: int) -> Any:
    """``v`` with every RFC 3339 date-time string in it, at any depth, rounded down to
    ``resolution`` seconds; the path of each one changed is appended to ``rounded``, in
    sorted key order, so the changes read the same for the same payload. Raises
    PayloadError (``too_deep``) past :data:`MAX_DEPTH`."""
    if depth > MAX_DEPTH:
        raise PayloadError(f"{path} nests deeper than {MAX_DEPTH} levels", "too_deep")
    if isinstance(v, str):
        floored = _floor_datetime(v, resolution)
        if floored is None or floored == v:
            return v
        rounded.append(path)
        return floored
    if isinstance(v, Mapping):
        # Visit in sorted key order (the changes' order), keep the map's own order.
        done = {k: _floor_times(v[k], resolution, f"{path}.{k}", rounded, depth + 1)
                for k in sorted(v, key=str)}
        return {k: done[k] for k in v}
    if isinstance(v, list):
        return [_floor_times(x, resolution, f"{path}[{i}]", rounded, depth + 1)
                for i, x in enumerate(v)]
    return v


def _coarsen_geometry(v: Any, policy: EgressPolicy) -> Any:
    """``v`` with every position's first two numbers coarsened (GeoJSON nests positions
    in lists; other members, and altitude, are kept)."""
    if isinstance(v, dict):
        return {k: (_coarsen_geometry(x, policy) if k == "coordinates" else x)
                for k, x in v.items()}
    if isinstance(v, list):
        if v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            return [_coarsen(x, policy) if i < 2 else x for i, x in enumerate(v)]
        return [_coarsen_geometry(x, policy) for x in v]
    return v


def _coarsen(x: float, policy: EgressPolicy) -> float:
    if policy.location_decimals is not None:
        return float(round(x, policy.location_decimals))
    g = policy.location_grid_degrees
    assert g is not None
    # round() twice: the grid step, then away the binary noise of multiplying by it.
    return float(round(round(x / g) * g, _MAX_DECIMALS))


def _floor_datetime(v: str, resolution: int) -> str | None:
    """An RFC 3339 date-time rounded down to ``resolution`` seconds since the Unix epoch,
    in its own offset; None if ``v`` is not one."""
    m = _DATETIME.fullmatch(v)
    if m is None:
        return None
    y, mo, d, hh, mi, ss = (int(m[i]) for i in range(1, 7))
    if m[7]:
        tz = dt.UTC
    else:
        delta = dt.timedelta(hours=int(m[9]), minutes=int(m[10]))
        tz = dt.timezone(delta if m[8] == "+" else -delta)
    try:
        # A leap second (:60) is second 0 of the next minute, as payload types order it.
        when = dt.datetime(y, mo, d, hh, mi, min(ss, 59), tzinfo=tz) + dt.timedelta(
            seconds=1 if ss == 60 else 0)
    except ValueError:
        return None  # not a calendar date: the payload type refuses it
    epoch = int(when.timestamp())
    floored = dt.datetime.fromtimestamp(epoch - epoch % resolution, tz)
    suffix = "Z" if m[7] else floored.strftime("%z")[:3] + ":" + floored.strftime("%z")[3:]
    return floored.strftime("%Y-%m-%dT%H:%M:%S") + suffix
