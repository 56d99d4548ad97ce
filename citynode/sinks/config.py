"""``[[sinks.*]]`` tables of node.toml: parsed and validated, one error a line. Pure.

::

    [[sinks.cloudevents]]
    name = "bus"                       # 1-32 of a-z 0-9 _ - (CLI, metrics, storage)
    url = "https://events.example.org/citynode"
    filter = "feed=air-quality"        # the record filter (as GET /v1/records); default: all
    mode = "structured"                # or "binary"
    token_file = "bus-token"           # sent as Authorization: Bearer <token>
    # ca_file = "bus-ca.pem"           # trust for the receiver's TLS (default: system CAs)
    # from_start = false               # true: also the records held before the sink ran
    # timeout_seconds = 10
    # retry_min_seconds = 1            # backoff: doubles per failure, capped, with jitter
    # retry_max_seconds = 300
    # batch = 32                       # records of one feed sent in a row per round
    # lanes = 16                       # feeds delivered to at once

``[[sinks.ngsi_ld]]`` takes the same keys but ``mode`` (it posts batch upserts to
``url``/ngsi-ld/v1/entityOperations/upsert), plus ``tenant`` (NGSILD-Tenant) and
``context`` (the @context URL of the entities, default the Smart Data Models').
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from citynode.core.filters import ALL_RECORDS, RecordFilter, parse_filter
from citynode.errors import ConfigError, InvalidFilter

__all__ = ["SINKS_HELP", "SinkConfig", "SinksConfig", "parse_sinks"]

SINKS_HELP = """\
# ---- [[sinks.cloudevents]] / [[sinks.ngsi_ld]] ------------------------------------------
# Records delivered to a partner's systems, durably, in order per feed: CloudEvents 1.0
# to a webhook, or NGSI-LD batch upserts to a context broker. See docs/BRIDGES.md.
#
# [[sinks.cloudevents]]
# name = "bus"
# url = "https://events.example.org/citynode"
# filter = "feed=air-quality"         # as GET /v1/records; default: every record
# token_file = "bus-token"            # Authorization: Bearer <token>
"""

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}", re.ASCII)
KINDS = ("cloudevents", "ngsi_ld")


@dataclass(frozen=True, slots=True)
class SinkConfig:
    """One ``[[sinks.<kind>]]`` table."""

    kind: str
    name: str
    url: str
    filter: RecordFilter
    filter_text: str
    mode: str
    token_file: str
    ca_file: str
    from_start: bool
    timeout_seconds: float
    retry_min_seconds: float
    retry_max_seconds: float
    batch: int
    lanes: int
    tenant: str
    context: str


@dataclass(frozen=True, slots=True)
class SinksConfig:
    """The ``[sinks]`` section."""

    cloudevents: tuple[SinkConfig, ...] = ()
    ngsi_ld: tuple[SinkConfig, ...] = ()

    def all(self) -> tuple[SinkConfig, ...]:
        return self.cloudevents + self.ngsi_ld


SDM_CONTEXT = "https://smartdatamodels.org/context.jsonld"
_NUM = (int, float)
_KEYS: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "name": (str, ...), "url": (str, ...), "filter": (str, ""), "mode": (str, "structured"),
    "token_file": (str, ""), "ca_file": (str, ""), "from_start": (bool, False),
    "timeout_seconds": (_NUM, 10.0), "retry_min_seconds": (_NUM, 1.0),
    "retry_max_seconds": (_NUM, 300.0), "batch": (int, 32), "lanes": (int, 16),
    "tenant": (str, ""), "context": (str, SDM_CONTEXT),
}


def parse_sinks(table: object, source: str) -> SinksConfig:
    """Parse the ``[sinks]`` section. Raises :class:`ConfigError` naming the key."""
    def fail(where: str, what: str) -> ConfigError:
        return ConfigError(f"{source}: {where}: {what}")

    if not isinstance(table, dict):
        raise fail("[sinks]", "expected tables like [[sinks.cloudevents]]")
    out: dict[str, list[SinkConfig]] = {k: [] for k in KINDS}
    names: set[str] = set()
    for kind, items in table.items():
        if kind not in KINDS:
            raise fail(f"[sinks.{kind}]", f"unknown sink kind (known: {', '.join(KINDS)})")
        if not isinstance(items, list):
            raise fail(f"[sinks.{kind}]", f"write it as [[sinks.{kind}]] (an array of tables)")
        for i, item in enumerate(items):
            s = _sink(kind, i, item, fail)
            if s.name in names:
                raise fail(f"[[sinks.{kind}]] {s.name} name", "is used by another sink")
            names.add(s.name)
            out[kind].append(s)
    return SinksConfig(cloudevents=tuple(out["cloudevents"]), ngsi_ld=tuple(out["ngsi_ld"]))


def _sink(kind: str, i: int, item: object, fail: Any) -> SinkConfig:
    where = f"[[sinks.{kind}]] #{i + 1}"
    if not isinstance(item, dict):
        raise fail(where, "expected a table")
    keys = {k: v for k, v in _KEYS.items() if not (kind == "cloudevents" and k in (
        "tenant", "context")) and not (kind == "ngsi_ld" and k == "mode")}
    for k in item:
        if k not in keys:
            raise fail(f"{where} {k}", f"unknown key (known: {', '.join(keys)})")
    v: dict[str, Any] = {}
    for k, (typ, default) in keys.items():
        if k not in item:
            if default is ...:
                raise fail(f"{where} {k}", "is required")
            v[k] = default
            continue
        kinds = typ if isinstance(typ, tuple) else (typ,)
        if type(item[k]) not in kinds:
            raise fail(f"{where} {k}", f"expected {' or '.join(t.__name__ for t in kinds)}"
                       f", got {item[k]!r}")
        v[k] = float(item[k]) if typ == _NUM else item[k]
    if not _NAME_RE.fullmatch(v["name"]):
        raise fail(f"{where} name", f"must be 1-32 of a-z 0-9 _ -, got {v['name']!r}")
    where = f"[[sinks.{kind}]] {v['name']}"
    url = urlsplit(v["url"])
    if url.scheme not in ("https", "http") or not url.hostname:
        raise fail(f"{where} url", f"expected an http(s) URL, got {v['url']!r}")
    try:
        flt = (parse_filter(parse_qsl(v["filter"], keep_blank_values=True,
                                      strict_parsing=True))
               if v["filter"] else ALL_RECORDS)
    except (InvalidFilter, ValueError) as exc:
        raise fail(f"{where} filter", f"{exc} (write it as a query string: "
                   '"feed=air-quality&type=AirQualityObserved")') from None
    if v.get("mode", "structured") not in ("structured", "binary"):
        raise fail(f"{where} mode", f'"structured" or "binary", got {v["mode"]!r}')
    if not 0.1 <= v["timeout_seconds"] <= 600:
        raise fail(f"{where} timeout_seconds", "must be 0.1 to 600")
    if not 0.001 <= v["retry_min_seconds"] <= v["retry_max_seconds"] <= 86400:
        raise fail(f"{where} retry_min_seconds", "must be 0.001 to retry_max_seconds, and "
                   "retry_max_seconds at most 86400")
    if not 1 <= v["batch"] <= 1000:
        raise fail(f"{where} batch", "must be 1 to 1000")
    if not 1 <= v["lanes"] <= 256:
        raise fail(f"{where} lanes", "must be 1 to 256")
    return SinkConfig(kind=kind, name=v["name"], url=v["url"].rstrip("/") if kind == "ngsi_ld"
                      else v["url"], filter=flt, filter_text=v["filter"],
                      mode=v.get("mode", "structured"), token_file=v["token_file"],
                      ca_file=v["ca_file"], from_start=v["from_start"],
                      timeout_seconds=v["timeout_seconds"],
                      retry_min_seconds=v["retry_min_seconds"],
                      retry_max_seconds=v["retry_max_seconds"], batch=v["batch"],
                      lanes=v["lanes"], tenant=v.get("tenant", ""),
                      context=v.get("context", SDM_CONTEXT))
