"""Operator alerts: what is wrong, said once, and signed (docs/ALERTS.md).

Everything here is pure: the node's shell (citynode/node/alerts.py) takes a
:class:`Snapshot` of what it sees, :func:`conditions` turns it into the conditions
that hold, and a :class:`Tracker` turns successive sets of conditions into events: a
condition that appears *fires* once, stays quiet while it holds, and *resolves* once
when it has stayed clear for ``clear_ms`` (no storm; hysteresis: a partner that
answers once between two failed exchanges, or a disk that flaps around its
threshold, does not resolve and fire again at every check). A resolved event says
what is well again in its own words (:func:`resolved_message`). :func:`alert_body`
gives an event's JSON bytes, signed with the node key over ``DOMAIN_ALERT || body``
(:func:`signature_header`), and :func:`verify_alert` is what a receiver runs.

Conditions (``alert`` codes, stable):

* ``fork``, ``split_view``  a proof held that an origin signed two histories of a feed
  (records, resp. checkpoints); proofs are kept for ever, so these never resolve;
* ``partner_down``  a partner unreachable for longer than the threshold;
* ``feed_late``     an own feed with a cadence whose liveness state (core/liveness.py)
  is ``silent`` or ``dead``: nothing new signed for more than its cadence;
* ``disk_low``      free space of the data dir below the threshold, or the database
  refused a write for a full disk;
* ``invalid_spike`` more input refused (records, messages) in the last minute than the
  threshold;
* ``key_stolen``    records of an own feed signed with this node's key that it never
  signed were seen (refused as ``own_forgery``): resolves when they no longer count
  (an own key event, or a restart).
"""

from __future__ import annotations

import base64
import json
import re
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from citynode.core.keys import SigningKey, parse_node_id, verify
from citynode.errors import InvalidNodeId, InvalidRecord, SignatureError

__all__ = [
    "ALERT_KIND",
    "CODES",
    "DOMAIN_ALERT",
    "KEYLOG_HEADER",
    "LATE_STATES",
    "SIGNATURE_HEADER",
    "Condition",
    "Event",
    "OwnFeed",
    "PartnerSeen",
    "RateWindow",
    "Snapshot",
    "Thresholds",
    "Tracker",
    "alert_body",
    "conditions",
    "resolved_message",
    "signature_header",
    "verify_alert",
]

#: Signature prefix of an alert body (docs/PROTOCOL.md, "Domain separation").
DOMAIN_ALERT = b"citynode/alert/v1\x00"
ALERT_KIND = "citynode.alert"
VERSION = 1
#: The HTTP header carrying the signature: ``keyid=<node id>, sig=<base64>``.
SIGNATURE_HEADER = "Citynode-Signature"
#: The HTTP header carrying a cn2 node's key log (standard base64 of its wire bytes): a
#: receiver verifies it from the node id alone and checks the signature by its key in
#: force.
KEYLOG_HEADER = "Citynode-Key-Log"
CODES = ("fork", "split_view", "partner_down", "feed_late", "disk_low", "invalid_spike",
         "key_stolen")
SEVERITY = {"fork": "critical", "split_view": "critical", "partner_down": "warning",
            "feed_late": "warning", "disk_low": "critical", "invalid_spike": "warning",
            "key_stolen": "critical"}
#: Liveness states of an own feed that count as late against its cadence.
LATE_STATES = frozenset({"silent", "dead"})
#: The window of the invalid-input rate.
RATE_WINDOW_MS = 60_000
_MAX_SIGNATURE_HEADER = 256
_HEADER_RE = re.compile(r"keyid=(cn[12][a-z2-7]{56}), sig=([A-Za-z0-9+/]{86}==)")


@dataclass(frozen=True, slots=True)
class Condition:
    """One thing wrong. ``key`` names it among others of its code (a partner's node
    id, a feed, ...): ``code`` and ``key`` together are its stable identity."""

    code: str
    key: str
    subject: dict[str, Any] = field(hash=False, compare=False)
    message: str = field(hash=False, compare=False)

    @property
    def id(self) -> str:
        return f"{self.code}:{self.key}"


@dataclass(frozen=True, slots=True)
class Event:
    """A condition that fired (``status`` "firing") or cleared ("resolved") at ``time``
    (ms); ``since``: when it fired. ``message``: the line for a human (the condition's
    when firing, :func:`resolved_message` when resolved)."""

    condition: Condition
    status: str
    time: int
    since: int
    message: str = ""


@dataclass(frozen=True, slots=True)
class PartnerSeen:
    node_id: str
    name: str
    up: bool
    last_ok_ms: int | None


@dataclass(frozen=True, slots=True)
class OwnFeed:
    feed: str
    cadence_s: int | None
    state: str  # core/liveness.py
    signed_time: int | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the node sees at ``now_ms``. ``forks``: (origin node id, feed, seq, kind)
    of every proof held; ``started_ms``: when the node started (a partner never
    reached counts as down from then); ``free_percent``: of the data dir's file
    system; ``invalid_last_minute``: input refused in the last minute;
    ``own_forgeries``: (feed, highest seq, sent by) of records of own feeds signed with
    this node's key that it never signed."""

    now_ms: int
    started_ms: int
    partners: Sequence[PartnerSeen] = ()
    own_feeds: Sequence[OwnFeed] = ()
    forks: Sequence[tuple[str, str, int, str]] = ()
    free_percent: float = 100.0
    disk_full: bool = False
    invalid_last_minute: int = 0
    own_forgeries: Sequence[tuple[str, int, str]] = ()


@dataclass(frozen=True, slots=True)
class Thresholds:
    partner_down_ms: int
    disk_free_percent: float
    invalid_per_minute: int


def conditions(s: Snapshot, t: Thresholds) -> list[Condition]:
    """Every condition that holds in ``s`` (at most one per code and key). Never
    raises."""
    out: list[Condition] = []
    for origin, feed, seq, kind in s.forks:
        code = "fork" if kind == "fork" else "split_view"  # stored as "split-view"
        what = ("two different checkpoints of one size" if code == "split_view"
                else "two different records for one seq")
        out.append(Condition(code, f"{origin}/{feed}",
                             {"origin": origin, "feed": feed, "seq": seq},
                             f"origin {origin} signed {what} of feed {feed!r} (at {seq})"))
    for p in s.partners:
        since = p.last_ok_ms if p.last_ok_ms is not None else s.started_ms
        if not p.up and s.now_ms - since > t.partner_down_ms:
            out.append(Condition("partner_down", p.node_id,
                                 {"partner": p.node_id, "name": p.name,
                                  "last_ok": p.last_ok_ms},
                                 f"partner {p.name} unreachable for "
                                 f"{(s.now_ms - since) // 1000} s"))
    for f in s.own_feeds:
        if f.cadence_s is not None and f.state in LATE_STATES:
            out.append(Condition("feed_late", f.feed,
                                 {"feed": f.feed, "cadence_s": f.cadence_s,
                                  "state": f.state, "signed_time": f.signed_time},
                                 f"own feed {f.feed!r} is {f.state}: nothing new signed "
                                 f"for more than its cadence of {f.cadence_s} s"))
    if s.disk_full or s.free_percent < t.disk_free_percent:
        out.append(Condition("disk_low", "data_dir",
                             {"free_percent": round(s.free_percent, 2),
                              "disk_full": s.disk_full},
                             f"disk {'full' if s.disk_full else 'nearly full'}: "
                             f"{s.free_percent:.1f}% free in the data dir"))
    for feed, seq, sender in s.own_forgeries:
        out.append(Condition("key_stolen", feed, {"feed": feed, "seq": seq, "from": sender},
                             f"records signed with this node's key that it never signed "
                             f"(own feed {feed!r} up to seq {seq}, from {sender}), or lost "
                             "in a rollback of its data: the key may be stolen; run "
                             "`citynode key recover` naming this node's own heads as "
                             "--last-good (if its data dir was rolled back or copied back "
                             "instead, restart it with `citynode run --restored`); nothing "
                             "is signed on that feed meanwhile"))
    if s.invalid_last_minute > t.invalid_per_minute:
        out.append(Condition("invalid_spike", "input",
                             {"count": s.invalid_last_minute, "window_s": 60,
                              "threshold": t.invalid_per_minute},
                             f"{s.invalid_last_minute} inputs refused in the last minute "
                             f"(threshold {t.invalid_per_minute})"))
    return out


def resolved_message(c: Condition, s: Snapshot | None, cleared_ms: int) -> str:
    """The line of a resolved event of ``c``, which held until ``cleared_ms`` (the first
    check it no longer held), said from ``s`` (the snapshot it resolves in; None: not
    known). Never raises."""
    sub = c.subject
    if c.code == "partner_down":
        last_ok = sub.get("last_ok")
        down_from = last_ok if isinstance(last_ok, int) else None
        seen = next((p for p in (s.partners if s else ()) if p.node_id == c.key), None)
        if down_from is None and s is not None:
            down_from = s.started_ms
        took = f" after {max(0, cleared_ms - down_from) // 1000} s" if down_from is not None else ""
        if s is not None and seen is None:
            return f"partner {sub.get('name')} is no longer a partner (was unreachable)"
        return f"partner {sub.get('name')} reachable again{took}"
    if c.code == "feed_late":
        state = next((f.state for f in (s.own_feeds if s else ()) if f.feed == c.key), None)
        now = f" ({state})" if state else ""
        return f"own feed {c.key!r} signed on again{now}, within its cadence"
    if c.code == "disk_low":
        if s is None:
            return "disk space back above the threshold in the data dir"
        return f"disk space back to {s.free_percent:.1f}% free in the data dir"
    if c.code == "key_stolen":
        return (f"no record of own feed {c.key!r} signed with a key this node did not "
                "use counts any more (a key event of this node, or a restart)")
    if c.code == "invalid_spike":
        n = f"{s.invalid_last_minute} inputs" if s is not None else "inputs"
        return (f"{n} refused in the last minute, back under the threshold of "
                f"{sub.get('threshold')}")
    return f"{c.code} of {c.key} no longer holds"


class Tracker:
    """Dedup with hysteresis: each condition fires once while it holds and resolves
    once it has not held for ``clear_ms`` (checked at each update: a condition that
    holds again within that time simply goes on firing, no event). Holds at most
    ``max_active`` conditions (further ones are ignored until room is made: a flood of
    forks must not grow memory without bound)."""

    def __init__(self, max_active: int = 10_000, clear_ms: int = 0) -> None:
        #: condition id -> (the condition as last held, when it fired, when it was
        #: first seen clear since it last held: None while it holds).
        self.active: dict[str, tuple[Condition, int, int | None]] = {}
        self.max_active = max_active
        self.clear_ms = clear_ms

    def update(self, held: Iterable[Condition], now_ms: int,
               snapshot: Snapshot | None = None) -> list[Event]:
        """The events that take the tracked set to ``held`` (found in ``snapshot``,
        which words the resolved events): new ones fire, ones clear for ``clear_ms``
        resolve; the others say nothing."""
        now = {c.id: c for c in held}
        out: list[Event] = []
        for cid in [c for c in self.active if c not in now]:
            cond, since, clear = self.active[cid]
            clear = now_ms if clear is None else clear
            if now_ms - clear >= self.clear_ms:
                del self.active[cid]
                out.append(Event(cond, "resolved", now_ms, since,
                                 resolved_message(cond, snapshot, clear)))
            else:
                self.active[cid] = (cond, since, clear)
        for cid, cond in now.items():
            if cid in self.active:
                self.active[cid] = (cond, self.active[cid][1], None)
            elif len(self.active) < self.max_active:
                self.active[cid] = (cond, now_ms, None)
                out.append(Event(cond, "firing", now_ms, now_ms, cond.message))
        return out


class RateWindow:
    """The increase of a cumulative count over the last minute, from samples taken
    at any pace (bounded: one sample per ``add`` within the window, at most
    ``max_samples``)."""

    def __init__(self, window_ms: int = RATE_WINDOW_MS, max_samples: int = 4096) -> None:
        self.window_ms = window_ms
        self._samples: deque[tuple[int, int]] = deque(maxlen=max_samples)

    def add(self, now_ms: int, total: int) -> int:
        """Record ``total`` at ``now_ms``; return its increase over the window (since
        the newest sample at least a window old, else the oldest held)."""
        self._samples.append((now_ms, total))
        while len(self._samples) > 1 and self._samples[1][0] <= now_ms - self.window_ms:
            self._samples.popleft()
        return max(0, total - self._samples[0][1])


def alert_body(node: str, ev: Event) -> bytes:
    """The JSON bytes of an event (docs/ALERTS.md): compact, keys sorted, UTF-8."""
    c = ev.condition
    doc = {"kind": ALERT_KIND, "version": VERSION, "node": node, "alert": c.code,
           "severity": SEVERITY.get(c.code, "warning"), "status": ev.status,
           "subject": c.subject, "message": ev.message or c.message, "time": ev.time,
           "since": ev.since, "id": c.id}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def signature_header(key: SigningKey, body: bytes) -> str:
    """The value of :data:`SIGNATURE_HEADER` for ``body`` signed by ``key`` (its node's
    id: a :class:`NodeKey` of a cn2 node names its cn2 id; send its log beside, in
    :data:`KEYLOG_HEADER`)."""
    sig = base64.b64encode(key.sign(DOMAIN_ALERT, body)).decode("ascii")
    return f"keyid={key.node_id}, sig={sig}"


def verify_alert(body: bytes, header: str, *, expected_node: str | None,
                 key_log: bytes | None = None) -> Any:
    """Check an alert as a receiver does: the header's signature over
    ``DOMAIN_ALERT || body`` by the key of its ``keyid``, which must be the body's
    ``node`` and ``expected_node``. A receiver passes the node id it trusts; passing
    None (explicitly: there is no default) accepts an alert signed by ANY node that
    names itself, and is only for tools that check the node afterwards. Returns the
    parsed body.

    A cn2 ``keyid`` needs ``key_log`` (the :data:`KEYLOG_HEADER` value, decoded): the
    signature is checked by the key in force at its end.

    Raises :class:`SignatureError` for anything that does not verify."""
    m = _HEADER_RE.fullmatch(header.strip()) if len(header) <= _MAX_SIGNATURE_HEADER else None
    if m is None:
        raise SignatureError("malformed alert signature header", "bad_signature")
    try:
        key = parse_node_id(m.group(1))
    except InvalidNodeId as exc:
        raise SignatureError("alert signed by a malformed node id", "bad_signature") from exc
    if expected_node is not None and m.group(1) != expected_node:
        raise SignatureError("alert signed by another node", "bad_signature")
    if m.group(1).startswith("cn2"):
        from citynode.core.keylog import verify_log
        from citynode.core.keys import Verifier

        if key_log is None:
            raise SignatureError("alert of a cn2 node without its key log", "bad_signature")
        try:
            key = verify_log(key, key_log, verifier=Verifier()).key
        except InvalidRecord as exc:
            raise SignatureError(f"alert with a key log that does not verify: {exc}",
                                 "bad_signature") from exc
    verify(key, DOMAIN_ALERT, body, base64.b64decode(m.group(2)))
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise SignatureError("alert body is not JSON", "bad_signature") from exc
    if not isinstance(doc, dict) or doc.get("node") != m.group(1):
        raise SignatureError("alert body names another node", "bad_signature")
    return doc
