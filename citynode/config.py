"""node.toml: load, validate and render the node configuration.

A node's configuration is one TOML file (``DIR/node.toml``, written by ``citynode init``).
:func:`load_config` reads it into frozen dataclasses. It is strict on purpose, because a
typo in a limit or an access rule must not silently fall back to a default:

* an unknown section or key is a :class:`ConfigError` with a did-you-mean suggestion;
* a value of the wrong type is a :class:`ConfigError` (``true`` is not an integer, and
  ``"64k"`` is not one either);
* values are range-checked, URLs must be ``http``/``https``, ``listen`` must be
  ``"HOST:PORT"``, node ids must carry a valid checksum, feed names must be valid.

Every message names the file and the key, e.g.
``node.toml: [limits] max_body_bytes: expected an integer, got "64k"``.

The schema lives in one table (``_SCHEMA``) that drives loading *and*
:func:`render_config`, so the commented file ``init`` writes can never drift from what
the loader accepts.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import urlsplit

from citynode.bridges.config import BRIDGES_HELP, BridgesConfig, parse_bridges
from citynode.core.cards import MAX_CADENCE_S, CardFeed, check_card_feed
from citynode.core.egress import DEFAULT_TEXT_ATTRIBUTES, OPEN, EgressPolicy, parse_policy
from citynode.core.keys import canonical_id
from citynode.core.records import check_feed_name
from citynode.errors import ConfigError, InvalidNodeId, InvalidRecord
from citynode.sinks.config import SINKS_HELP, SinksConfig, parse_sinks

__all__ = [
    "ACCEPT_POLICIES",
    "ACCESS_KINDS",
    "FEEDS_MARKER",
    "AlertsConfig",
    "CheckpointsConfig",
    "Config",
    "FederationConfig",
    "FeedConfig",
    "LimitsConfig",
    "LogConfig",
    "NodeConfig",
    "StorageConfig",
    "TlsConfig",
    "WitnessConfig",
    "is_dns_name",
    "load_config",
    "parse_config",
    "render_config",
    "split_listen",
]

ACCEPT_POLICIES = ("partners", "vouched", "any")
ACCESS_KINDS = ("public", "partners", "restricted")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("auto", "json", "text")

DEFAULT_LISTEN = "127.0.0.1:8443"
ALERT_URLS_MAX = 8  # webhook URLs in [alerts]
DEFAULT_HOSTS = ("localhost", "127.0.0.1")


# ---------------------------------------------------------------------------------------
# The dataclasses callers use


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """``[node]``: who this node is and where it listens."""

    name: str
    listen: str = DEFAULT_LISTEN
    public_url: str = "https://" + DEFAULT_LISTEN
    hosts: tuple[str, ...] = DEFAULT_HOSTS

    @property
    def listen_host(self) -> str:
        """The host part of ``listen`` (IPv6 without brackets)."""
        return split_listen(self.listen)[0]

    @property
    def listen_port(self) -> int:
        """The port part of ``listen`` (0 lets the OS choose one)."""
        return split_listen(self.listen)[1]


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """``[tls]``: serve HTTPS ourselves, or plaintext behind a reverse proxy."""

    enabled: bool = True
    trusted_proxy: str = ""


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """``[limits]``: bounds on everything a peer or client can make us hold or do."""

    max_body_bytes: int = 65536
    max_request_bytes: int = 8388608
    max_batch_records: int = 1000
    max_headers: int = 64
    max_header_bytes: int = 8190
    read_timeout_seconds: float = 30.0
    query_time_limit_seconds: float = 2.0
    max_connections: int = 2048
    max_connections_per_address: int = 128
    partner_requests_per_second: float = 50.0
    partner_request_burst: int = 200
    partner_loop_share: float = 0.05
    partner_reconcile_ranges_per_second: float = 1024.0
    partner_max_in_flight: int = 8
    partner_max_pushes_in_flight: int = 2
    future_tolerance_seconds: int = 900
    request_max_age_seconds: int = 300
    rejected_log_rows: int = 10000
    pending_max_records: int = 10000
    pending_max_bytes: int = 67108864


@dataclass(frozen=True, slots=True)
class FederationConfig:
    """``[federation]``: whom we accept records from and how we exchange them."""

    accept: str = "vouched"
    vouch_hops: int = 3
    push_batch: int = 256
    push_queue_max: int = 10000
    pull_interval_seconds: float = 10.0
    backoff_max_seconds: float = 60.0
    origin_quota_records_per_day: int = 1000000
    origin_quota_bytes_per_day: int = 1073741824
    sync_bound_seconds: float = 120.0


@dataclass(frozen=True, slots=True)
class CheckpointsConfig:
    """``[checkpoints]``: how often we sign a Merkle tree head of what we hold."""

    interval_seconds: float = 60.0


@dataclass(frozen=True, slots=True)
class WitnessConfig:
    """``[witness]``: whose checkpoints this node cosigns, and whose cosignatures it
    requires before it calls a checkpoint trusted (docs/PROTOCOL.md, "Cosignatures")."""

    #: Cosign partners' checkpoints at all.
    cosign: bool = True
    #: Node ids of the partners whose checkpoints are cosigned; empty: every partner.
    cosign_for: tuple[str, ...] = ()
    #: Node ids of the witnesses whose cosignatures count towards ``quorum``.
    require: tuple[str, ...] = ()
    #: Cosignatures of distinct ``require`` witnesses a checkpoint needs to be trusted
    #: (0: all of them).
    quorum: int = 0

    @property
    def k(self) -> int:
        """The quorum in force: ``quorum``, or every witness named when it is 0."""
        return self.quorum or len(self.require)


@dataclass(frozen=True, slots=True)
class FeedConfig:
    """``[feeds.<name>]``: who may read one of our feeds."""

    name: str
    access: str = "public"
    readers: tuple[str, ...] = ()
    description: str = ""
    #: Days the payloads of this feed are kept (by us and, as our card declares it, by
    #: every node holding them); None: for ever.
    retention_days: int | None = None
    #: ``[feeds.<name>.egress]``: what of a payload may leave (default: all of it).
    egress: EgressPolicy = OPEN
    #: The terms stated in our signed card (core/cards.py ``CardFeed``); None: unstated.
    license: str | None = None
    attribution: str | None = None
    terms_url: str | None = None
    terms_digest: bytes | None = None
    #: Expected cadence: a checkpoint is signed at least this often (liveness).
    cadence_seconds: int | None = None

    def card_feed(self) -> CardFeed:
        """This feed's entry in our signed card: access, retention, terms, the egress
        policy's digest (when the policy is not the open one) and cadence."""
        return CardFeed(self.name, self.access, retention_days=self.retention_days,
                        license=self.license, terms_url=self.terms_url,
                        terms_digest=self.terms_digest, attribution=self.attribution,
                        policy=None if self.egress.is_open else self.egress.digest(),
                        cadence_s=self.cadence_seconds)


@dataclass(frozen=True, slots=True)
class LogConfig:
    """``[log]``: how much we log and in what format."""

    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True, slots=True)
class AlertsConfig:
    """``[alerts]``: signed webhook alerts (docs/ALERTS.md)."""

    webhook_urls: tuple[str, ...] = ()
    allow_http_loopback: bool = False
    partner_down_minutes: float = 10.0
    disk_free_percent: float = 10.0
    invalid_rate_per_minute: int = 100
    check_interval_seconds: float = 30.0
    resolve_after_seconds: float = 60.0
    retry_attempts: int = 6
    retry_base_seconds: float = 2.0
    queue_max: int = 1000
    timeout_seconds: float = 10.0


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """``[storage]``: where the records live (README "When one box is not enough")."""

    url: str = ""  # empty: SQLite, DIR/citynode.db


def _no_feeds() -> Mapping[str, FeedConfig]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Config:
    """A whole, validated node.toml. ``feeds`` maps feed name to its :class:`FeedConfig`
    (read-only, in file order); a feed not listed there has no configured access rule."""

    node: NodeConfig
    tls: TlsConfig = field(default_factory=TlsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    checkpoints: CheckpointsConfig = field(default_factory=CheckpointsConfig)
    witness: WitnessConfig = field(default_factory=WitnessConfig)
    feeds: Mapping[str, FeedConfig] = field(default_factory=_no_feeds)
    log: LogConfig = field(default_factory=LogConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    #: ``[[bridges.mqtt]]`` ...: parsed and checked by citynode/bridges/config.py.
    bridges: BridgesConfig = field(default_factory=BridgesConfig)
    #: ``[[sinks.cloudevents]]`` ...: parsed and checked by citynode/sinks/config.py.
    sinks: SinksConfig = field(default_factory=SinksConfig)

    def feed(self, name: str) -> FeedConfig:
        """The access rule of feed ``name``: its ``[feeds.<name>]`` table, or a public
        feed with no description if it has none (the one place that default lives)."""
        return self.feeds.get(name) or FeedConfig(name=name)


# ---------------------------------------------------------------------------------------
# Value checks shared with identity.py

_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def is_dns_name(host: str) -> bool:
    """True if ``host`` is an ASCII DNS name (labels of 1-63 letters, digits, hyphens)."""
    if not host or len(host) > 253:
        return False
    return all(_DNS_LABEL.fullmatch(label) for label in host.split("."))


def _host_error(host: str) -> str | None:
    """None if ``host`` is an IP address or DNS name, else what is wrong with it."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        if is_dns_name(host):
            return None
        return f"{_show(host)} is neither an IP address nor a DNS name"
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id:
        return f"{_show(host)}: an IPv6 scope id (%...) is not allowed here"
    return None


def split_listen(listen: str) -> tuple[str, int]:
    """Split ``"HOST:PORT"`` (``"[v6]:PORT"`` for IPv6) into host and port.

    Raises :class:`ValueError` with what is wrong (the loader adds file and key).
    """
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host:
        raise ValueError(f'expected "HOST:PORT" (e.g. "{DEFAULT_LISTEN}"), got {_show(listen)}')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ValueError(f"{_show(host)} in brackets is not an IPv6 address") from exc
    elif ":" in host:
        raise ValueError(f'put an IPv6 address in brackets, e.g. "[::1]:8443", got {_show(listen)}')
    problem = _host_error(host)
    if problem:
        raise ValueError(problem)
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise ValueError(f"port {_show(port_text)} is not a number from 0 to 65535")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} is not a number from 0 to 65535")
    return host, port


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------
# The schema: one row per key, driving both loading and rendering

_REQUIRED: Final = object()  # the default of a key that has none
Check = Callable[[Any], str | None]  # returns what is wrong, or None


def _num(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def _range(lo: float, hi: float, *, lo_open: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if (v <= lo if lo_open else v < lo) or v > hi:
            low = f"greater than {_num(lo)}" if lo_open else f"at least {_num(lo)}"
            return f"must be {low} and at most {_num(hi)}, got {_num(v)}"
        return None

    return check


def _choice(options: tuple[str, ...]) -> Check:
    def check(v: Any) -> str | None:
        if v not in options:
            listed = ", ".join(_show(o) for o in options)
            return f"must be one of {listed}, got {_show(v)}"
        return None

    return check


def _check_name(v: str) -> str | None:
    if not v.strip():
        return "must not be empty"
    if len(v.encode("utf-8")) > 64:
        # The name is the TLS certificate's common name, which X.509 caps at 64.
        return f"must be at most 64 bytes of UTF-8, got {len(v.encode('utf-8'))}"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in v):
        return "must not contain control characters"
    return None


def _check_listen(v: str) -> str | None:
    try:
        split_listen(v)
    except ValueError as exc:
        return str(exc)
    return None


def _check_url(v: str) -> str | None:
    try:
        parts = urlsplit(v)
        port = parts.port
    except ValueError as exc:
        return f"{_show(v)} is not a URL: {exc}"
    if parts.scheme not in ("https", "http"):
        return f'must start with "https://" (or "http://"), got {_show(v)}'
    if not parts.hostname:
        return f"{_show(v)} has no host"
    if parts.username is not None or parts.query or parts.fragment:
        return f"{_show(v)} must not contain user info, a query or a fragment"
    problem = _host_error(parts.hostname)
    if problem:
        return problem
    if _is_wildcard(parts.hostname):
        return f"{_show(v)}: partners cannot reach a wildcard address; use a real host"
    if port == 0:
        return f"{_show(v)} has port 0"
    return None


def _check_storage_url(v: str) -> str | None:
    if v and not v.startswith(("postgresql://", "postgres://")):
        return f'must be empty (SQLite) or start with "postgresql://", got {_show(v)}'
    return None


def _check_hosts(v: list[str]) -> str | None:
    if not v:
        return "must list at least one host name or IP address"
    for i, host in enumerate(v):
        problem = _host_error(host)
        if problem:
            return f"[{i}] {problem}"
    return None


def _check_proxy(v: str) -> str | None:
    if v == "":
        return None
    try:
        ipaddress.ip_address(v)
    except ValueError:
        return f"must be the IP address of the reverse proxy (or empty), got {_show(v)}"
    return None


@dataclass(frozen=True, slots=True)
class _Key:
    name: str
    kind: str  # "str" | "int" | "float" | "bool" | "strs"
    default: object  # of `kind`, None (computed, see doc) or _REQUIRED
    doc: str
    check: Check | None = None


_SCHEMA: dict[str, tuple[_Key, ...]] = {
    "node": (
        _Key("name", "str", _REQUIRED, "Name of this node, shown to partners and used as the "
             "TLS certificate's common name (at most 64 bytes of UTF-8).", _check_name),
        _Key("listen", "str", DEFAULT_LISTEN, 'Address to listen on, "HOST:PORT" '
             '("[v6]:PORT" for IPv6; port 0 lets the OS choose).', _check_listen),
        _Key("public_url", "str", None, "URL partners use to reach this node "
             '(https or http). Default: "https://<listen>" ("http://<listen>" when '
             "[tls] enabled = false); required when listening on 0.0.0.0 or [::].",
             _check_url),
        _Key("hosts", "strs", list(DEFAULT_HOSTS), "Host names and IP addresses written "
             "into the TLS certificate by `citynode init` (changing this later does not "
             "reissue the certificate).", _check_hosts),
    ),
    "tls": (
        _Key("enabled", "bool", True, "Serve HTTPS with DIR/tls/cert.pem. Set to false only "
             "behind a reverse proxy that terminates TLS: citynode then refuses to listen "
             "on a non-loopback address unless trusted_proxy is set."),
        _Key("trusted_proxy", "str", "", "IP address of the reverse proxy whose "
             "X-Forwarded-For / X-Forwarded-Proto headers are trusted (empty: none).",
             _check_proxy),
    ),
    "limits": (
        _Key("max_body_bytes", "int", 65536, "Largest record body accepted or published, "
             "in bytes; at most the protocol's limit, 65536 (larger records are refused "
             "by every other node).", _range(256, 65536)),
        _Key("max_request_bytes", "int", 8388608, "Largest HTTP request body, in bytes "
             "(a batch of records); at least max_body_bytes.", _range(1024, 1024**3)),
        _Key("max_batch_records", "int", 1000, "Most records in one batch between partners "
             "(a push received, a fetch answered or asked for).",
             _range(1, 100_000)),
        _Key("max_headers", "int", 64, "Most HTTP header fields in one request.",
             _range(8, 1000)),
        _Key("max_header_bytes", "int", 8190, "Longest HTTP request line or header field, "
             "in bytes.", _range(256, 65536)),
        _Key("read_timeout_seconds", "float", 30.0, "Seconds to wait for a slow client or "
             "peer before dropping the connection.", _range(0, 3600, lo_open=True)),
        _Key("query_time_limit_seconds", "float", 2.0, "Longest a reader's query (records, "
             "a stream catching up) may run in the database before it is stopped.",
             _range(0, 3600, lo_open=True)),
        _Key("max_connections", "int", 2048, "Most client and partner connections open at "
             "once; more are closed as they arrive (each live stream holds one).",
             _range(1, 1_000_000)),
        _Key("max_connections_per_address", "int", 128, "Most connections open at once from "
             "one IP address (the reverse proxy's, trusted_proxy, excepted); more are "
             "closed as they arrive, so that one host holding connections open cannot take "
             "max_connections from everyone else (a value above max_connections acts as "
             "max_connections).",
             _range(1, 1_000_000)),
        _Key("partner_requests_per_second", "float", 50.0, "Signed requests each partner "
             "may make per second on average (a token bucket; an honest partner makes a "
             "few: one push in flight, a sync round per pull interval). Beyond, it is "
             "answered 429 with Retry-After before its body is read or its records "
             "verified, and each refusal is counted on it as rate_limited.",
             _range(0.1, 1_000_000)),
        _Key("partner_request_burst", "int", 200, "Signed requests a partner may make at "
             "once above partner_requests_per_second (the bucket's size).",
             _range(1, 1_000_000)),
        _Key("partner_loop_share", "float", 0.05, "Share of this node's time (its event "
             "loop: decoding batches, answering reconciliation messages) the requests of "
             "one partner may take on average, with a quarter of a second saved up at "
             "most. A partner over it is answered 429 (over_loop_share) until it is back under, "
             "so that no partner's costly requests can slow what this node does for the "
             "others. An honest partner takes about 1%.", _range(0, 1, lo_open=True)),
        _Key("partner_reconcile_ranges_per_second", "float", 1024.0, "Ranges of "
             "reconciliation messages (POST /v1/reconcile) one partner may send per second "
             "on average, with four messages of the most ranges (4 x 4096) saved up at "
             "most. Each message is answered in one piece of this node's time, about 2 us "
             "a range; beyond, it is answered 429 (reconcile_rate) before it is decoded. "
             "Two nodes in sync exchange one range a session, a cold sync of thousands of "
             "chains a few thousand.", _range(1, 1_000_000)),
        _Key("partner_max_in_flight", "int", 8, "Signed requests of one partner under way "
             "at once, at most (a node's client of a partner keeps at most 8); more are "
             "answered 429 (too_many_in_flight).", _range(1, 10_000)),
        _Key("partner_max_pushes_in_flight", "int", 2, "Of those, pushes (batches of "
             "records) at most: a node pushes one batch at a time to each partner, and "
             "concurrent batches of one partner queue its records ahead of everyone "
             "else's writes.", _range(1, 10_000)),
        _Key("future_tolerance_seconds", "int", 900, "How far in the future a record's "
             "time may be (clock skew between cities) before it is rejected.",
             _range(0, 86400)),
        _Key("request_max_age_seconds", "int", 300, "How old a signed peer request may be "
             "before it is refused as stale (replay protection).", _range(1, 86400)),
        _Key("rejected_log_rows", "int", 10000, "Rows kept in the log of rejected input "
             "(oldest dropped first; 0 keeps none).", _range(0, 10_000_000)),
        _Key("pending_max_records", "int", 10000, "Most out-of-order records held while "
             "waiting for the records before them.", _range(0, 10_000_000)),
        _Key("pending_max_bytes", "int", 67108864, "Most bytes of out-of-order records "
             "held while waiting for the records before them.", _range(0, 64 * 1024**3)),
    ),
    "federation": (
        _Key("accept", "str", "vouched", 'Whose records we store: "partners" (only our '
             'partners\' own records), "vouched" (also origins a partner vouches for), or '
             '"any" (any origin a partner forwards).', _choice(ACCEPT_POLICIES)),
        _Key("vouch_hops", "int", 3, 'With accept = "vouched": how many vouches away an '
             "origin may be. 1: origins our partners vouch for; 2: also origins those "
             "vouch for; and so on.", _range(1, 16)),
        _Key("push_batch", "int", 256, "Records sent to a partner in one push.",
             _range(1, 100_000)),
        _Key("push_queue_max", "int", 10000, "Records queued per partner before we stop "
             "pushing and let the partner pull instead.", _range(1, 10_000_000)),
        _Key("pull_interval_seconds", "float", 10.0, "Seconds between pulls from each "
             "partner.", _range(0.1, 86400)),
        _Key("backoff_max_seconds", "float", 60.0, "Longest wait between retries when a "
             "partner is unreachable.", _range(1, 86400)),
        _Key("origin_quota_records_per_day", "int", 1000000, "Most records stored per "
             "origin node per day (its erasure requests always pass).", _range(1, 10**12)),
        _Key("origin_quota_bytes_per_day", "int", 1073741824, "Most bytes stored per origin "
             "node per day.", _range(1, 2**50)),
        _Key("sync_bound_seconds", "float", 120.0, "How long records an origin signed "
             "(in a checkpoint) may take to reach us before the feed shows as withheld "
             "rather than lagging.", _range(1, 7 * 86400)),
    ),
    "checkpoints": (
        _Key("interval_seconds", "float", 60.0, "Seconds between signed checkpoints "
             "(Merkle tree heads) of what this node holds.", _range(1, 86400)),
    ),
    "witness": (
        _Key("cosign", "bool", True, "Act as a witness: cosign the checkpoints partners "
             "send when they are consistent with the last one cosigned of their feed, "
             "keep and send the cosignatures to every partner, and refuse (and prove) a "
             "split view."),
        _Key("cosign_for", "strs", [], "Node ids of the partners whose checkpoints are "
             "cosigned (empty: every partner)."),
        _Key("require", "strs", [], "Node ids of the witnesses whose cosignatures this "
             "node requires: a checkpoint with fewer than quorum of them is shown as not "
             "trusted (status, /v1/cosignatures, the citynode_checkpoints_untrusted "
             "metric)."),
        _Key("quorum", "int", 0, "Cosignatures by distinct witnesses of require a "
             "checkpoint needs to be trusted (0: all of them).", _range(0, 64)),
    ),
    "log": (
        _Key("level", "str", "info", 'Least severe messages logged: "debug", "info", '
             '"warning", "error" or "critical".', _choice(LOG_LEVELS)),
        _Key("format", "str", "auto", '"json" (one object a line), "text", or "auto" '
             "(text on a terminal, else json).", _choice(LOG_FORMATS)),
    ),
    "storage": (
        _Key("url", "str", "", 'Empty: SQLite in DIR/citynode.db (one process, one box). '
             '"postgresql://USER@HOST:PORT/DBNAME": a PostgreSQL database, which several '
             "`citynode run` processes of this node may share (put the password in "
             "~/.pgpass or PGPASSWORD, not here).", _check_storage_url),
    ),
    "alerts": (
        _Key("webhook_urls", "strs", [], "https:// URLs that receive signed JSON alerts "
             "(a fork or split view, a partner down, an own feed late, the disk nearly "
             f"full, a spike of invalid input; docs/ALERTS.md). At most {ALERT_URLS_MAX}; "
             "empty: no alerts."),
        _Key("allow_http_loopback", "bool", False, "Also allow http:// webhook URLs on a "
             "loopback address (127.0.0.1, ::1, localhost): for tests and a local relay."),
        _Key("partner_down_minutes", "float", 10.0, "Alert when a partner has been "
             "unreachable for longer than this.", _range(0, 10080, lo_open=True)),
        _Key("disk_free_percent", "float", 10.0, "Alert when less than this share of the "
             "data dir's file system is free (or the database found the disk full).",
             _range(0, 99)),
        _Key("invalid_rate_per_minute", "int", 100, "Alert when more records or messages "
             "than this were refused as invalid in the last minute.", _range(1, 10**9)),
        _Key("check_interval_seconds", "float", 30.0, "Seconds between checks of the "
             "alert conditions.", _range(0.05, 3600)),
        _Key("resolve_after_seconds", "float", 60.0, "An alert resolves once its "
             "condition has stayed clear this long (hysteresis: a partner answering once "
             "between failures does not resolve and fire again).", _range(0, 86400)),
        _Key("retry_attempts", "int", 6, "Attempts to deliver one alert to one URL before "
             "giving up (logged and counted).", _range(1, 20)),
        _Key("retry_base_seconds", "float", 2.0, "Wait before the first retry; each "
             "further retry waits twice as long (at most 10 minutes).",
             _range(0.01, 600)),
        _Key("queue_max", "int", 1000, "Alerts waiting for delivery, at most; beyond, the "
             "oldest are dropped (counted).", _range(1, 100000)),
        _Key("timeout_seconds", "float", 10.0, "Seconds one delivery attempt may take.",
             _range(0.1, 120)),
    ),
}

_FEED_KEYS: tuple[_Key, ...] = (
    _Key("access", "str", "public", 'Who may read it: "public" (anyone), "partners" '
         '(partner nodes only) or "restricted" (only the node ids in readers).',
         _choice(ACCESS_KINDS)),
    _Key("readers", "strs", [], 'Node ids allowed to read a "restricted" feed (required '
         "then, and only then)."),
    _Key("description", "str", "", "Free text shown to partners."),
    _Key("retention_days", "int", None, "Days the payloads are kept, here and (declared "
         "in this node's card) at every node holding them; older records keep only their "
         "signed skeleton. None: kept for ever.", _range(1, 36500)),
    _Key("license", "str", None, "SPDX license identifier of the data, signed in the node "
         'card, e.g. "CC-BY-4.0", "ODbL-1.0", "CC0-1.0" or "LicenseRef-...".'),
    _Key("attribution", "str", None, "Attribution text readers must show (at most 512 "
         "characters), signed in the node card."),
    _Key("terms_url", "str", None, "https:// URL of the terms of use, signed in the node "
         "card with terms_digest (both or neither)."),
    _Key("terms_digest", "str", None, "SHA-256 of the terms document at terms_url, as 64 "
         "hex digits (sha256sum FILE)."),
    _Key("cadence_seconds", "int", None, "Expected cadence: the node signs a checkpoint of "
         "the feed at least this often, even with no new record, so partners can tell "
         "silence from loss (1 to 604800).", _range(1, MAX_CADENCE_S)),
)

_EGRESS_KEYS: tuple[_Key, ...] = (
    _Key("types", "strs", None, "Only these payload types may be published on the feed."),
    _Key("allow", "strs", None, "Only these top-level attributes leave the city; others "
         "are removed."),
    _Key("deny", "strs", None, "Attributes that must never leave: a payload holding one, "
         "at any depth and in any case, is refused, naming its path."),
    _Key("location_decimals", "int", None, "Round location coordinates to this many "
         "decimals (3: about 110 m)."),
    _Key("location_grid_degrees", "float", None, "Or snap location coordinates to a grid "
         "of this step, in degrees."),
    _Key("time_resolution_seconds", "int", None, "Round date-times, at any depth, down to "
         "a multiple of this many seconds."),
    _Key("text_max_chars", "int", None, "Cut free-text attributes to this length (0 "
         "removes them)."),
    _Key("text_attributes", "strs", list(DEFAULT_TEXT_ATTRIBUTES), "The top-level "
         "free-text attributes text_max_chars applies to (subject: the record's subject); "
         "other text, e.g. dataProvider, only if listed; nested text "
         "(address.streetAddress) never: keep it out with allow or deny."),
)

# Section order in the file; [feeds.*] comes after [log] when rendered.
_SECTIONS = ("node", "tls", "limits", "federation", "checkpoints", "witness", "log",
             "alerts",
             "storage", "feeds")

_KIND_TEXT = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "strs": "an array of strings",
}


def _show(value: object) -> str:
    """``value`` as an operator would write it in TOML (shortened if long)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, dict):
        text = "a table"
    elif isinstance(value, list):
        text = "an array"
    elif isinstance(value, float) and math.isfinite(value):
        text = repr(value)
    else:
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_ok(kind: str, value: Any) -> bool:
    # type() rather than isinstance(): a bool is an int in Python, never in node.toml.
    t = type(value)
    if kind == "int":
        return t is int
    if kind == "float":
        return t is int or (t is float and math.isfinite(value))
    if kind == "strs":
        return t is list and all(type(v) is str for v in value)
    return t is {"str": str, "bool": bool}[kind]


def _suggest(word: str, options: list[str], fmt: str = "{}") -> str:
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"; did you mean {fmt.format(match[0])}?" if match else ""


# ---------------------------------------------------------------------------------------
# Loading


class _Loader:
    """Turns the parsed TOML of one file into a :class:`Config`, or one ConfigError."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {where}: {message}")

    def section(self, where: str, table: object, keys: tuple[_Key, ...]) -> dict[str, Any]:
        if not isinstance(table, dict):
            raise self.fail(where, f"expected a table, got {_show(table)}")
        known = [k.name for k in keys]
        for name in table:
            if name not in known:
                raise self.fail(f"{where} {name}", "unknown key" + _suggest(name, known))
        values: dict[str, Any] = {}
        for key in keys:
            path = f"{where} {key.name}"
            if key.name not in table:
                if key.default is _REQUIRED:
                    raise self.fail(path, "is required")
                values[key.name] = key.default
                continue
            value = table[key.name]
            if not _type_ok(key.kind, value):
                raise self.fail(path, f"expected {_KIND_TEXT[key.kind]}, got {_show(value)}")
            if key.kind == "float":
                value = float(value)
            problem = key.check(value) if key.check else None
            if problem:
                raise self.fail(path, problem)
            values[key.name] = value
        return values

    def load(self, doc: dict[str, Any]) -> Config:
        for name, value in doc.items():
            if name in _SCHEMA or name in ("feeds", "bridges", "sinks"):
                continue
            if not isinstance(value, dict):
                owners = [s for s, keys in _SCHEMA.items() if any(k.name == name for k in keys)]
                hint = f"; did you mean to put it under [{owners[0]}]?" if owners else ""
                raise self.fail(name, "unknown top-level key" + hint)
            raise self.fail(f"[{name}]", "unknown section" + _suggest(name, list(_SECTIONS),
                                                                      "[{}]"))
        if "node" not in doc:
            raise self.fail("[node]", 'section is required (at least: name = "...")')

        tls = TlsConfig(**self.section("[tls]", doc.get("tls", {}), _SCHEMA["tls"]))
        node = self.node(doc["node"], tls)
        limits = LimitsConfig(**self.section("[limits]", doc.get("limits", {}),
                                             _SCHEMA["limits"]))
        if limits.max_request_bytes < limits.max_body_bytes:
            raise self.fail("[limits] max_request_bytes",
                            f"must be at least max_body_bytes ({limits.max_body_bytes}), "
                            f"got {limits.max_request_bytes}")
        federation = FederationConfig(**self.section(
            "[federation]", doc.get("federation", {}), _SCHEMA["federation"]))
        checkpoints = CheckpointsConfig(**self.section(
            "[checkpoints]", doc.get("checkpoints", {}), _SCHEMA["checkpoints"]))
        witness = self.witness(doc.get("witness", {}))
        log = LogConfig(**self.section("[log]", doc.get("log", {}), _SCHEMA["log"]))
        alerts = self.alerts(doc.get("alerts", {}))
        storage = StorageConfig(**self.section("[storage]", doc.get("storage", {}),
                                               _SCHEMA["storage"]))
        feeds = self.feeds(doc.get("feeds", {}))
        bridges = parse_bridges(doc.get("bridges", {}), self.source, limits.max_body_bytes)
        return Config(node=node, tls=tls, limits=limits, federation=federation,
                      checkpoints=checkpoints, witness=witness, feeds=feeds, log=log,
                      alerts=alerts,
                      storage=storage, bridges=bridges,
                      sinks=parse_sinks(doc.get("sinks", {}), self.source))

    def witness(self, table: object) -> WitnessConfig:
        v = self.section("[witness]", table, _SCHEMA["witness"])
        for name in ("cosign_for", "require"):
            ids: list[str] = []
            for i, text in enumerate(v[name]):
                try:
                    canonical = canonical_id(text)
                except InvalidNodeId as exc:
                    raise self.fail(f"[witness] {name}[{i}]", str(exc)) from exc
                if canonical in ids:
                    raise self.fail(f"[witness] {name}[{i}]",
                                    f"repeats {name}[{ids.index(canonical)}]")
                ids.append(canonical)
            v[name] = tuple(ids)
        if v["quorum"] > len(v["require"]):
            raise self.fail("[witness] quorum", f"is {v['quorum']}, but require names "
                            f"{len(v['require'])} witness(es)")
        return WitnessConfig(**v)

    def alerts(self, table: object) -> AlertsConfig:
        v = self.section("[alerts]", table, _SCHEMA["alerts"])
        urls = v["webhook_urls"]
        if len(urls) > ALERT_URLS_MAX:
            raise self.fail("[alerts] webhook_urls",
                            f"at most {ALERT_URLS_MAX} URLs, got {len(urls)}")
        for i, url in enumerate(urls):
            problem = _check_url(url)
            if problem is None and urlsplit(url).scheme != "https":
                host = urlsplit(url).hostname or ""
                if not (v["allow_http_loopback"] and _is_loopback(host)):
                    problem = (f'must start with "https://", got {_show(url)} (http:// only '
                               "on a loopback address with allow_http_loopback = true)")
            if problem:
                raise self.fail(f"[alerts] webhook_urls[{i}]", problem)
        v["webhook_urls"] = tuple(urls)
        return AlertsConfig(**v)

    def node(self, table: object, tls: TlsConfig) -> NodeConfig:
        v = self.section("[node]", table, _SCHEMA["node"])
        host = split_listen(v["listen"])[0]
        if v["public_url"] is None:
            if _is_wildcard(host):
                raise self.fail("[node] public_url", f"is required when listen is "
                                f"{_show(v['listen'])}: set the URL partners reach this node at")
            v["public_url"] = ("https://" if tls.enabled else "http://") + v["listen"]
        v["public_url"] = v["public_url"].rstrip("/")
        v["hosts"] = tuple(v["hosts"])
        if not tls.enabled and not tls.trusted_proxy and not _is_loopback(host):
            raise self.fail("[tls] enabled", f"refusing plaintext on a public address: listen "
                            f"is {_show(v['listen'])}; listen on 127.0.0.1, or set "
                            "trusted_proxy to the reverse proxy's IP address, or enable TLS")
        return NodeConfig(**v)

    def feeds(self, table: object) -> Mapping[str, FeedConfig]:
        if not isinstance(table, dict):
            raise self.fail("[feeds]", f"expected tables like [feeds.air-quality], got "
                            f"{_show(table)}")
        out: dict[str, FeedConfig] = {}
        for name, body in table.items():
            where = f"[feeds.{name}]"
            try:
                check_feed_name(name)
            except InvalidRecord as exc:
                raise self.fail(where, str(exc)) from exc
            if isinstance(body, dict) and "egress" in body:
                body = dict(body)
                rules = self.section(f"{where[:-1]}.egress]", body.pop("egress"),
                                     _EGRESS_KEYS)
                egress = parse_policy(rules, f"{where[:-1]}.egress]")
            else:
                egress = OPEN
            v = self.section(where, body, _FEED_KEYS)
            readers: list[str] = []
            for i, text in enumerate(v["readers"]):
                try:
                    canonical = canonical_id(text)
                except InvalidNodeId as exc:
                    raise self.fail(f"{where} readers[{i}]", str(exc)) from exc
                if canonical in readers:
                    raise self.fail(f"{where} readers[{i}]",
                                    f"repeats readers[{readers.index(canonical)}]")
                readers.append(canonical)
            if v["access"] == "restricted" and not readers:
                raise self.fail(f"{where} readers", 'access = "restricted" needs at least '
                                "one reader node id")
            if v["access"] != "restricted" and readers:
                raise self.fail(f"{where} readers", 'only applies to access = "restricted" '
                                f"(access is {_show(v['access'])})")
            digest = v["terms_digest"]
            if digest is not None:
                if not re.fullmatch(r"[0-9a-f]{64}", digest):
                    raise self.fail(f"{where} terms_digest", "must be the SHA-256 of the terms "
                                    "document as 64 lowercase hex digits, got "
                                    f"{_show(digest)}")
                digest = bytes.fromhex(digest)
            fc = FeedConfig(name=name, access=v["access"], readers=tuple(readers),
                            description=v["description"], egress=egress,
                            license=v["license"], attribution=v["attribution"],
                            terms_url=v["terms_url"], terms_digest=digest,
                            cadence_seconds=v["cadence_seconds"],
                            retention_days=v["retention_days"])
            try:
                check_card_feed(fc.card_feed())
            except InvalidRecord as exc:
                raise self.fail(where, str(exc).replace("card feed", "feed")) from exc
            out[name] = fc
        return MappingProxyType(out)


def parse_config(text: str, source: str = "node.toml") -> Config:
    """Parse and validate the text of a node.toml; ``source`` names it in messages.

    Raises :class:`ConfigError` for invalid TOML, an unknown section or key, a value of
    the wrong type, or a value out of range.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    return _Loader(source).load(doc)


def load_config(path: Path) -> Config:
    """Read and validate the node.toml at ``path``.

    Raises :class:`ConfigError` (naming the file and the key) if the file is missing,
    unreadable, not UTF-8 TOML, or does not satisfy the schema.
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: not found: run `citynode init -d {path.parent}` "
                          "first") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {exc.start})") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return parse_config(text, str(path))


# ---------------------------------------------------------------------------------------
# Rendering the commented file `citynode init` writes


def _toml_str(s: str) -> str:
    """A TOML basic string. (json.dumps is close but would emit surrogate pairs.)"""
    out = ['"']
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    out.append('"')
    return "".join(out)


def _toml_value(kind: str, value: Any) -> str:
    if kind == "bool":
        return "true" if value else "false"
    if kind == "str":
        return _toml_str(value)
    if kind == "strs":
        return "[" + ", ".join(_toml_str(v) for v in value) + "]"
    if kind == "float":
        return repr(float(value))
    return str(value)


def _wrap(text: str, width: int = 88) -> list[str]:
    lines: list[str] = []
    line = "#"
    for word in text.split():
        if len(line) + 1 + len(word) > width and line != "#":
            lines.append(line)
            line = "#"
        line += " " + word
    lines.append(line)
    return lines


_HEADER = """\
# citynode node configuration (node.toml).
#
# Every key is listed with what it does and its default. Unknown keys and values of
# the wrong type are errors, so a typo is reported instead of silently ignored.
# Secrets are not kept here: see node.key, operator.token and tls/ next to this file.
# A passphrase-sealed node.key is opened with the CITYNODE_PASSPHRASE environment variable.
"""

FEEDS_MARKER = "# ---- [feeds.<name>] "


def _keys_help(keys: tuple[_Key, ...]) -> str:
    """Comment lines explaining ``keys``: name, what it does, its default."""
    return "\n".join(line for key in keys for line in _wrap(
        f"{key.name}: {key.doc}" + ("" if key.default is None else
                                    f" (Default: {_toml_value(key.kind, key.default)})")))


_FEEDS_HELP = (
    FEEDS_MARKER + "-" * (88 - len(FEEDS_MARKER)) + "\n"
    "# One table per feed this node publishes. Feed names: 1-64 of a-z 0-9 . _ -,\n"
    "# starting with a letter or digit. A feed not listed here is public.\n"
    "#\n"
    + _keys_help(_FEED_KEYS)
    + "\n#\n"
    "# [feeds.<name>.egress]: what may leave the city, applied before each record is\n"
    "# signed (README; its digest is signed in the card: docs/PROTOCOL.md).\n"
    "# Without the table the feed publishes payloads as given.\n"
    "#\n"
    + _keys_help(_EGRESS_KEYS)
    + "\n"
)

_FEEDS_EXAMPLE = """\
#
# [feeds.air-quality]
# access = "public"
# description = "Hourly PM2.5, PM10, NO2 and O3 from city monitoring stations"
# license = "CC-BY-4.0"
# attribution = "Ciudad Ejemplo, air quality network"
# cadence_seconds = 300
# retention_days = 365
#
# [feeds.air-quality.egress]
# types = ["AirQualityObserved"]
# deny = ["operatorPhone", "email"]
# location_decimals = 3
# time_resolution_seconds = 300
# text_max_chars = 0
#
# [feeds.cyber-notices]
# access = "restricted"
# readers = ["cn2...", "cn2..."]   # node ids of the partners allowed to read it
"""


def render_config(name: str, listen: str, public_url: str, hosts: list[str]) -> str:
    """Return the commented node.toml that ``citynode init`` writes.

    Every key of every section is present with its default, under a comment saying
    what it does. The result loads back (:func:`parse_config`) to the same values.
    Raises :class:`ConfigError` if the arguments would make an invalid file.
    """
    given = {"name": name, "listen": listen, "public_url": public_url, "hosts": list(hosts)}
    out = [_HEADER]
    for section in _SECTIONS[:-1]:
        out.append(f"[{section}]")
        for key in _SCHEMA[section]:
            value = given[key.name] if section == "node" else key.default
            out.extend(_wrap(key.doc))
            if key.default is _REQUIRED:
                out.append("# Required.")
            elif key.default is not None:  # None: the doc explains a computed default
                out.append(f"# Default: {_toml_value(key.kind, key.default)}")
            out.append(f"{key.name} = {_toml_value(key.kind, value)}")
        out.append("")
    out.append(_FEEDS_HELP + _FEEDS_EXAMPLE)
    out.append(SINKS_HELP)
    out.append(BRIDGES_HELP)  # last: its example runs to the end of the file
    text = "\n".join(out)
    parse_config(text)  # init must never write a file the node then refuses
    return text
