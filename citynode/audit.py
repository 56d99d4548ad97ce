"""Verification tools that trust nothing.

* ``citynode check``: :func:`check_storage` re-verifies a data dir's database;
* ``citynode audit``: :func:`audit_bundle` verifies an export bundle
  (:mod:`citynode.bundle`) offline, with only the file and the origin's node id.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from citynode.bundle import (
    CARD,
    CHECKPOINT,
    COSIGNATURE,
    DEFAULT_BUNDLE_LIMITS,
    END,
    FORK,
    HEADER,
    KEY_LOG,
    RECORD,
    SPLIT_VIEW,
    BundleHeader,
    BundleLimits,
    Item,
    iter_bundle,
    read_item_at,
)
from citynode.core import cosign, encoding, keylog
from citynode.core.cards import (
    NodeCard,
    check_terms_document,
    judge_card_key,
    open_card,
    signer_retired_at,
)
from citynode.core.chain import ForkProof, verify_fork_proof
from citynode.core.checkpoints import (
    Checkpoint,
    MerkleLog,
    SplitViewProof,
    open_checkpoint,
    verify_split_view,
)
from citynode.core.erasure import past_retention, retention_in_force
from citynode.core.keybook import HeldLog, KeyBook
from citynode.core.keys import DOMAIN_RECORD, Verifier, canonical_id, node_id, parse_node_id
from citynode.core.records import (
    DEFAULT_FUTURE_TOLERANCE_MS,
    RecordPolicy,
    check_key,
    check_payload,
    decode_envelope,
    decode_record,
    open_record,
    parse_body,
)
from citynode.core.types import ERASURE_TYPE, validate_erasure
from citynode.errors import CitynodeError, InvalidProof, InvalidRecord
from citynode.render import iso_time

if TYPE_CHECKING:
    from citynode.storage import Storage

__all__ = [
    "AuditReport",
    "CheckReport",
    "FeedAudit",
    "Finding",
    "audit_bundle",
    "check_storage",
    "check_terms",
    "terms_periods",
]

# Stored records were checked against the clock when they arrived; a re-check must not
# reject them for the time that has passed since, so "now" is beyond any record's time.
_NO_FUTURE = 2**62


@dataclass
class CheckReport:
    records: int = 0
    feeds: int = 0
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"records": self.records, "feeds": self.feeds, "problems": self.problems,
                "ok": not self.problems}


def stored_key_logs(st: Storage, problems: list[str] | None = None) -> KeyBook:
    """The key logs a node kept (its own and its cn2 origins'), verified again; one that
    does not verify is left out (and said in ``problems``)."""
    keys = KeyBook()
    for name, log in st.meta_prefixed("keylog:"):
        try:
            keys.restore(bytes.fromhex(name.removeprefix("keylog:")), log,
                         verifier=Verifier())
        except (ValueError, InvalidRecord) as exc:
            if problems is not None:
                problems.append(f"the key log kept as {name} does not verify: {exc}")
    return keys


def check_storage(st: Storage, *, progress: bool = False, batch: int = 2000) -> CheckReport:
    """Re-verify every stored record (signature, canonical encoding, payload, chain link,
    seq contiguity) and every feed head. Never raises for a bad record: reports it."""
    rep = CheckReport()
    verifier = Verifier()
    policy = RecordPolicy(check_payload=True)
    keys = stored_key_logs(st, rep.problems)
    feeds = st.feeds()
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("checking", total=sum(f.count for f in feeds))
    try:
        for f in feeds:
            rep.feeds += 1
            name = f"{keys.name(f.origin)[:14]}…/{f.feed}"
            expect_seq, prev_id = 1, None
            while True:
                envs = st.range(f.origin, f.feed, expect_seq, expect_seq + batch - 1, batch)
                if not envs:
                    break
                for env in envs:
                    rep.records += 1
                    try:
                        body, sig, payload = decode_record(env)
                        rec = open_record(body, sig, payload, now_ms=_NO_FUTURE,
                                          verifier=verifier, policy=policy,
                                          key_states=keys.state)
                    except InvalidRecord as exc:
                        rep.problems.append(f"{name} seq {expect_seq}: {exc} [{exc.reason}]")
                        expect_seq += 1
                        prev_id = None
                        continue
                    if rec.origin != f.origin or rec.feed != f.feed:
                        rep.problems.append(f"{name} seq {expect_seq}: stored under the wrong feed")
                    if rec.seq != expect_seq:
                        rep.problems.append(f"{name}: seq {expect_seq} missing (found {rec.seq})")
                    elif expect_seq > 1 and prev_id is not None and rec.prev != prev_id:
                        rep.problems.append(f"{name} seq {rec.seq}: prev does not link to seq "
                                            f"{rec.seq - 1}")
                    expect_seq, prev_id = rec.seq + 1, rec.id
                if bar is not None:
                    bar.advance(task, len(envs))
            if expect_seq - 1 != f.seq:
                rep.problems.append(f"{name}: head says seq {f.seq} but the chain ends at "
                                    f"{expect_seq - 1}")
            elif prev_id is not None and prev_id != f.head:
                rep.problems.append(f"{name}: head id does not match the record at seq {f.seq}")
    finally:
        if bar is not None:
            bar.stop()
    return rep


# =========================================================================== offline audit

ERROR, WARNING, INFO = "error", "warning", "info"
#: Findings kept per kind; the rest are only counted (a bundle of 100,000 bad records
#: must not make a report of 100,000 lines).
MAX_FINDINGS_PER_KIND = 100


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing the audit found. ``severity`` is ``error`` (the bundle or the origin's
    history fails), ``warning`` (could not be checked, or harmless oddity) or ``info``.
    ``kind`` is a stable code (docs/PROTOCOL.md, "Export bundles"); ``seq`` is the record
    seq, or the checkpoint size for checkpoint findings; ``feed``/``seq`` are None when
    the finding is about the whole bundle."""

    severity: str
    kind: str
    feed: str | None
    seq: int | None
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"severity": self.severity, "kind": self.kind, "feed": self.feed,
                "seq": self.seq, "message": self.message}

    def line(self) -> str:
        where = ""
        if self.feed is not None:
            where = f"{self.feed}" + (f" seq {self.seq}" if self.seq is not None else "") + ": "
        return f"{self.severity.upper():7} [{self.kind}] {where}{self.message}"


@dataclass(slots=True)
class FeedAudit:
    """Per-feed figures of an audit (records of the audited origin only)."""

    name: str
    listed: bool = False  # named in the bundle header
    records: int = 0  # distinct valid records
    invalid: int = 0  # record items that failed verification
    contiguous: int = 0  # every seq 1..contiguous is held (valid)
    max_seq: int = 0  # highest seq of a record of this feed in the bundle (valid or not)
    # seqs with no valid record, up to max_seq or, beyond it, the largest checkpoint size
    # (a checkpoint of size N proves the origin published seq 1..N)
    missing: int = 0
    checkpoints: int = 0  # valid checkpoints of the origin for this feed
    checkpoints_matched: int = 0  # whose root equals the root of the bundle's records
    erased: int = 0  # valid records held without payload: an erasure request names them
    pruned: int = 0  # ... past the retention the origin's card declares for the feed

    def to_json(self) -> dict[str, Any]:
        return {"feed": self.name, "listed": self.listed, "records": self.records,
                "invalid": self.invalid, "contiguous": self.contiguous,
                "max_seq": self.max_seq, "missing": self.missing,
                "checkpoints": self.checkpoints,
                "checkpoints_matched": self.checkpoints_matched,
                "erased": self.erased, "pruned": self.pruned}

    def held_text(self) -> str:
        """What the bundle holds of this feed, in words: ``"no records"`` when it holds
        none, else the record count and the contiguous run from seq 1 (never
        ``"seq 1..0"``)."""
        if self.records == 0 and self.invalid == 0:
            return "no records"
        if self.contiguous == 0:
            return f"{self.records} record(s), none contiguous from seq 1 (max {self.max_seq})"
        return (f"{self.records} record(s), seq 1..{self.contiguous} contiguous "
                f"(max {self.max_seq})")


#: Tombstones listed one by one in a report (the rest are counted per feed).
MAX_TOMBSTONES_LISTED = 1000


@dataclass(frozen=True, slots=True)
class Tombstone:
    """A valid record the bundle holds without its payload, and why: ``erased`` (``by``
    the id of the origin's erasure request, which gives ``reason``) or ``pruned`` (past
    the feed's retention)."""

    feed: str
    seq: int
    id: bytes
    why: str
    by: bytes | None = None
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"feed": self.feed, "seq": self.seq, "id": self.id.hex(), "why": self.why,
                "by": None if self.by is None else self.by.hex(), "reason": self.reason}


@dataclass
class AuditReport:
    """The result of :func:`audit_bundle`. ``ok`` is True when no finding is an error."""

    path: str
    origin: str
    now_ms: int
    header: BundleHeader | None = None
    card: NodeCard | None = None
    #: Every valid card of the origin the bundle carries (its card history), by time.
    cards: list[NodeCard] = field(default_factory=list)
    complete: bool = False  # the end item was read and matched
    items: int = 0
    record_items: int = 0
    signatures: int = 0  # Ed25519 verifications made
    bytes: int = 0
    seconds: float = 0.0
    feeds: dict[str, FeedAudit] = field(default_factory=dict)
    # Feeds the origin's signed card lists of which the bundle holds no record: the
    # audit says nothing about them (finding ``missing_feed``).
    feeds_not_covered: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    # Records held as tombstones with an erasure request or retention behind them
    # (at most MAX_TOMBSTONES_LISTED; FeedAudit counts them all).
    tombstones: list[Tombstone] = field(default_factory=list)
    kind_counts: dict[str, int] = field(default_factory=dict)  # every finding, kept or not
    severity_counts: dict[str, int] = field(
        default_factory=lambda: {ERROR: 0, WARNING: 0, INFO: 0})
    #: A cn2 origin's key events and each key's window (empty for a cn1 origin).
    key_history: list[dict[str, Any]] = field(default_factory=list)
    #: The witness check (``--witness ... --quorum K``): None when not asked for; else
    #: ``{"witnesses": [ids], "quorum": k, "checkpoints": [{"feed", "size",
    #: "witnesses": [ids counted], "ok"}]}``.
    witness: dict[str, Any] | None = None
    #: Whether a key log was given besides the bundle's (``--key-log``): without one,
    #: recoveries after the bundle's card cannot be seen.
    key_log_given: bool = False

    @property
    def key_log_text(self) -> str | None:
        """The key log the audit judged by (its last event's date, its size), with a
        warning when no newer log was given; None for a cn1 origin."""
        if not self.key_history:
            return None
        last = self.key_history[-1]
        text = (f"key log as of {iso_time(last['time'])} ({len(self.key_history)} "
                f"event(s), last: {last['type']})")
        if not self.key_log_given:
            text += (": WARNING: only the bundle's own log was used; pass --key-log with "
                     "the city's newest log (GET /v1/keylog?origin=ID) to see recoveries "
                     "since")
        return text

    @property
    def ok(self) -> bool:
        return self.severity_counts[ERROR] == 0

    @property
    def suppressed(self) -> int:
        """Findings counted but not listed (over :data:`MAX_FINDINGS_PER_KIND` per kind)."""
        return sum(self.severity_counts.values()) - len(self.findings)

    def add(self, severity: str, kind: str, feed: str | None, seq: int | None,
            message: str) -> None:
        n = self.kind_counts.get(kind, 0) + 1
        self.kind_counts[kind] = n
        self.severity_counts[severity] += 1
        if n <= MAX_FINDINGS_PER_KIND:
            self.findings.append(Finding(severity, kind, feed, seq, message))

    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    def kinds(self) -> set[str]:
        """Every finding kind seen (listed or only counted)."""
        return set(self.kind_counts)

    def to_json(self) -> dict[str, Any]:
        h = self.header
        return {
            "ok": self.ok,
            "bundle": self.path,
            "origin": self.origin,
            "header": None if h is None else {
                "version": h.version, "created": h.created,
                "origin": self.origin if h.origin == parse_node_id(self.origin)
                else node_id(h.origin),
                "feeds": list(h.feeds)},
            "card": None if self.card is None else {
                "name": self.card.name, "url": self.card.url, "time": self.card.time},
            "complete": self.complete,
            "items": self.items,
            "records": self.record_items,
            "signatures_verified": self.signatures,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "records_per_s": round(self.record_items / self.seconds) if self.seconds else None,
            "feeds": [f.to_json() for f in sorted(self.feeds.values(), key=lambda f: f.name)],
            "feeds_not_covered": list(self.feeds_not_covered),
            "erased": sum(f.erased for f in self.feeds.values()),
            "pruned": sum(f.pruned for f in self.feeds.values()),
            "tombstones": [t.to_json() for t in self.tombstones],
            "terms": terms_periods(self.cards),
            "key_history": self.key_history,
            "witness": self.witness,
            "key_log": None if not self.key_history else {
                "as_of": self.key_history[-1]["time"], "events": len(self.key_history),
                "given": self.key_log_given, "note": self.key_log_text},
            "errors": self.severity_counts[ERROR],
            "warnings": self.severity_counts[WARNING],
            "finding_counts": dict(sorted(self.kind_counts.items())),
            "findings": [f.to_json() for f in self.findings],
            "findings_not_listed": self.suppressed,
        }

    def coverage_text(self) -> str:
        """One sentence saying which feeds of the origin the audit covers: only those the
        bundle holds, and, when the bundle carries the origin's card, which feeds the
        card lists that the bundle does not hold (or that it holds every one)."""
        held = sorted(n for n, f in self.feeds.items() if f.records or f.invalid)
        what = ", ".join(held) if held else "none"
        if self.card is None:
            return (f"the audit covers only the feeds the bundle holds ({what}); the bundle "
                    "carries no valid card of the origin, so it cannot tell whether the "
                    "origin has other feeds")
        if self.feeds_not_covered:
            return (f"the audit covers only the feeds the bundle holds ({what}); the "
                    f"origin's card also lists {', '.join(self.feeds_not_covered)}, NOT in "
                    "this bundle")
        return f"the bundle holds every feed the origin's card lists ({what})"

    def render_text(self) -> str:
        """The human report, plain text (one finding per line)."""
        out = [f"bundle {self.path}", f"origin {self.origin}"]
        if self.card is not None:
            out.append(f"card   {self.card.name} ({self.card.url}), signed by the origin")
        if self.key_log_text is not None:
            out.append(self.key_log_text)
        for ev in self.key_history:
            heads = ", ".join(f"{f}={n}" for f, n in sorted(ev["heads"].items()))
            out.append(f"key event {ev['seq']}: {ev['type']} to key {ev['key'][:16]}..."
                       + (f" (the key before signed up to {heads})" if heads else "")
                       + (f"; retired by {ev['retired_by']}" if ev["retired_by"] else ""))
        rate = f" ({self.record_items / self.seconds:,.0f} records/s)" if self.seconds else ""
        out.append(
            f"read {self.record_items} record(s) in {self.items} item(s), "
            f"{self.signatures} signature(s) verified in {self.seconds:.2f} s{rate}"
            + ("" if self.complete else " -- bundle INCOMPLETE")
        )
        for f in sorted(self.feeds.values(), key=lambda f: f.name):
            out.append(
                f"  feed {f.name}: {f.held_text()}, {f.missing} missing, {f.invalid} invalid, "
                f"{f.checkpoints_matched}/{f.checkpoints} checkpoint(s) matched"
                + (f", {f.erased} erased, {f.pruned} pruned (chains verified across "
                   "them)" if f.erased or f.pruned else "")
            )
        out.append(f"coverage: {self.coverage_text()}")
        if self.witness is not None:
            wit = self.witness
            out.append(f"witnesses: quorum {wit['quorum']} of {len(wit['witnesses'])} "
                       f"({', '.join(wit['witnesses'])})")
            for c in wit["checkpoints"][:100]:
                out.append(f"  checkpoint {c['feed']} size {c['size']}: "
                           f"{len(c['witnesses'])} of {wit['quorum']} cosignature(s) "
                           f"{'-- quorum met' if c['ok'] else '-- NO QUORUM'}")
        for t in self.tombstones[:100]:
            why = (f"erased by {t.by.hex()[:16]}...: {t.reason}" if t.by is not None
                   else f"pruned ({t.reason})")
            out.append(f"  tombstone {t.feed} seq {t.seq} {t.id.hex()[:16]}...: {why}")
        if len(self.tombstones) > 100:
            out.append(f"  ... and {len(self.tombstones) - 100} more tombstone(s) listed "
                       "in --json")
        for name, periods in terms_periods(self.cards).items():
            for p in periods:
                tm = p["terms"]
                what = ("not listed" if tm is None else
                        ", ".join(f"{k} {v}" for k, v in tm.items() if v is not None)
                        or "no terms stated")
                until = "now" if p["until"] is None else iso_time(p["until"])
                out.append(f"  terms {name}: {what} (from {iso_time(p['from'])} to {until})")
        order = {ERROR: 0, WARNING: 1, INFO: 2}
        for fd in sorted(self.findings, key=lambda f: order[f.severity]):
            out.append(fd.line())
        if self.suppressed:
            counts = ", ".join(f"{k} {n}" for k, n in sorted(self.kind_counts.items())
                               if n > MAX_FINDINGS_PER_KIND)
            out.append(f"... and {self.suppressed} more finding(s) not listed ({counts})")
        e, w = self.severity_counts[ERROR], self.severity_counts[WARNING]
        out.append(f"{'OK' if self.ok else 'FAILED'}: {e} error(s), {w} warning(s)")
        return "\n".join(out)


class _Feed:
    """Working state of one feed of the audited origin during an audit."""

    __slots__ = ("audit", "bad_seqs", "broken", "checkpoints", "held", "last_seq", "late",
                 "unlinked")

    def __init__(self, audit: FeedAudit) -> None:
        self.audit = audit
        # seq -> (id, item offset) of the first valid record seen at that seq
        self.held: dict[int, tuple[bytes, int]] = {}
        # Links are checked as records arrive, so a record's prev is kept only while the
        # record below it has not been seen (about 250 bytes a record in all).
        self.unlinked: dict[int, bytes] = {}  # seq -> prev, waiting for seq - 1
        self.broken: list[int] = []  # seqs whose prev is not the id held at seq - 1
        self.last_seq = 0  # highest new seq seen so far, in bundle order
        self.late = 0  # records that came after a higher seq (out of order)
        self.bad_seqs: set[int] = set()  # seqs where an invalid record of ours was seen
        self.checkpoints: list[Checkpoint] = []


_sha256 = hashlib.sha256


def _range_text(a: int, b: int) -> str:
    return f"seq {a}" if a == b else f"seqs {a}..{b}"


# A record read and parsed, waiting for (or back from) its signature check:
# (id, parsed body, body, sig, item offset, envelope, repeat of a pending id?, what its
# payload says: None, ("tombstone",) or ("erasure", entries, reason))
_Cand = tuple[bytes, dict[str, Any], bytes, bytes, int, bytes, bool, tuple[Any, ...] | None]
_BATCH = 256  # records per verification job when verifying on worker threads


def _verify_batch(origin: bytes, cands: list[_Cand], keys: KeyBook | None = None
                  ) -> tuple[list[InvalidRecord | None], int]:
    """Verify the signatures of a batch (on a worker thread: libsodium releases the GIL).
    Returns one error or None per candidate, and the number of verifications made."""
    verifier = Verifier()
    out: list[InvalidRecord | None] = []
    for c in cands:
        if c[6]:
            out.append(None)  # a repeat: decided when its first copy is
            continue
        try:
            _verify_one(verifier, origin, c, keys)
            out.append(None)
        except InvalidRecord as exc:
            out.append(exc)
    return out, verifier.count


def _verify_one(verifier: Verifier, origin: bytes, c: _Cand, keys: KeyBook | None) -> None:
    """A record's signature: by ``origin`` (body version 2), or by its ``key`` and then
    the key verdict of the origin's longest key log the audit holds (version 3: a
    record beyond a retired key's heads is refused, whatever time it claims)."""
    f = c[1]
    verifier.verify(f.get("key", origin), DOMAIN_RECORD, c[2], c[3])
    check_key(f, c[0], None if keys is None else keys.state)


class _Audit:
    """The state of one :func:`audit_bundle` run."""

    def __init__(self, rep: AuditReport, path: str | os.PathLike[str], expected: bytes,
                 now_ms: int, limits: BundleLimits) -> None:
        self.rep = rep
        self.path = path
        self.expected = expected
        self.now_ms = now_ms
        self.limits = limits
        self.verifier = Verifier()
        self.keys = KeyBook()  # the origin's longest key log seen (a cn2 origin)
        self.extra_signatures = 0  # made on worker threads
        self.feeds: dict[str, _Feed] = {}
        self.seen: set[bytes] = set()  # ids of valid records: never verified again
        self.pending: set[bytes] = set()  # ids parsed, signature not yet decided
        self.conflicts: list[tuple[str, int, int, bytes]] = []  # feed, seq, 1st offset, env
        self.foreign: dict[bytes, int] = {}  # other origin -> records
        self.header_feeds: frozenset[str] = frozenset()
        self.future_limit = now_ms + DEFAULT_FUTURE_TOLERANCE_MS
        # valid tombstones (feed, seq, id, time), decided once every erasure is read
        self.tombstones: list[tuple[str, int, bytes, int]] = []
        # (feed, seq, id) -> (erasure request id, reason), of the origin's valid requests
        self.erasures: dict[tuple[str, int, bytes], tuple[bytes, str]] = {}
        self.cosignatures: list[bytes] = []  # cosignature envelopes, checked at the end
        self.key_logs: list[bytes] = []  # witnesses' key logs carried

    def feed(self, name: str) -> _Feed:
        st = self.feeds.get(name)
        if st is None:
            fa = FeedAudit(name, listed=name in self.header_feeds)
            self.rep.feeds[name] = fa
            st = self.feeds[name] = _Feed(fa)
            if self.rep.header is not None and not fa.listed:
                self.rep.add(WARNING, "unlisted_feed", name, None, "the bundle holds "
                             "records or checkpoints of this feed but its header does not "
                             "list it")
        return st

    def _invalid(self, exc: InvalidRecord, f: dict[str, Any] | None, offset: int) -> None:
        if f is None:
            self.rep.add(ERROR, exc.reason, None, None,
                         f"record item at byte {offset} is invalid: {exc}")
            return
        st = self.feed(f["feed"])
        st.audit.invalid += 1
        st.bad_seqs.add(f["seq"])
        self.rep.add(ERROR, exc.reason, f["feed"], f["seq"], str(exc))

    def parse(self, item: Item) -> _Cand | None:
        """Everything about a record but its signature, cheapest first. Returns the
        candidate to verify, or None when the record was settled here (invalid, of
        another origin, or a repeat of a valid record)."""
        env = item.data
        f: dict[str, Any] | None = None
        try:
            body, sig, payload = decode_record(env)
            rid = _sha256(body).digest()
            if rid in self.seen:
                f = parse_body(body)  # valid already: parsed only to name it
                self.rep.add(WARNING, "duplicate", f["feed"], f["seq"],
                             "the same record appears twice in the bundle")
                return None
            f = parse_body(body)
            origin = f["origin"]
            if origin != self.expected:
                self.foreign[origin] = self.foreign.get(origin, 0) + 1
                return None
            # The payload against the body's digest, then its type (a sealed one: its
            # shape; what it holds only a reader can see, as open_record). A tombstone is
            # placed by settle(): erased or pruned, or a finding.
            info: tuple[Any, ...] | None = None
            if payload is None:
                info = ("tombstone",)
            else:
                value = check_payload(f, payload)
                if f.get("type") == ERASURE_TYPE:
                    info = ("erasure", validate_erasure(value["data"]), value["data"]["reason"])
        except InvalidRecord as exc:
            self._invalid(exc, f if f is not None and f["origin"] == self.expected else None,
                          item.offset)
            return None
        repeat = rid in self.pending
        self.pending.add(rid)
        return (rid, f, body, sig, item.offset, env, repeat, info)

    def settle(self, c: _Cand, error: InvalidRecord | None) -> None:
        """Place a candidate whose signature was checked (in bundle order)."""
        rid, f, _body, _sig, offset, env, repeat, info = c
        if repeat:
            if rid in self.seen:
                self.rep.add(WARNING, "duplicate", f["feed"], f["seq"],
                             "the same record appears twice in the bundle")
                return
            try:  # the first copy was invalid: this one is checked on its own
                _verify_one(self.verifier, self.expected, c, self.keys)
                error = None
            except InvalidRecord as exc:
                error = exc
        else:
            self.pending.discard(rid)
        if error is not None:
            self._invalid(error, f, offset)
            return
        self.seen.add(rid)
        name, seq = f["feed"], f["seq"]
        st = self.feeds.get(name) or self.feed(name)
        if info is not None:
            if info[0] == "tombstone":
                self.tombstones.append((name, seq, rid, f["time"]))
            else:
                for entry in info[1]:
                    self.erasures.setdefault(entry, (rid, info[2]))
        if f["time"] > self.future_limit:
            self.rep.add(ERROR, "future_time", name, seq,
                         f"record is dated {(f['time'] - self.now_ms) // 1000} s after the "
                         f"audit time (tolerance {DEFAULT_FUTURE_TOLERANCE_MS // 1000} s)")
        held = st.held
        if seq in held:
            # Same seq, different id (the same id was caught as a duplicate).
            self.conflicts.append((name, seq, held[seq][1], env))
            return
        held[seq] = (rid, offset)
        if seq > 1:
            below = held.get(seq - 1)
            if below is None:
                st.unlinked[seq] = f["prev"]
            elif f["prev"] != below[0]:
                st.broken.append(seq)
        above = st.unlinked.pop(seq + 1, None)
        if above is not None and above != rid:
            st.broken.append(seq + 1)
        if seq < st.last_seq:
            st.late += 1
        else:
            st.last_seq = seq


def audit_bundle(
    path: str | os.PathLike[str],
    origin_node_id: str,
    *,
    now_ms: int,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 0,
    limits: BundleLimits = DEFAULT_BUNDLE_LIMITS,
    terms_documents: Mapping[str, bytes] | None = None,
    key_logs: Sequence[bytes] = (),
    witnesses: Sequence[str] = (),
    quorum: int = 0,
    witness_key_logs: Sequence[bytes] = (),
) -> AuditReport:
    """Verify a bundle offline against the origin's node id (obtained out of band).

    A ``cn2`` origin's records are checked under the key valid for each (version 3
    bodies): the key logs of the bundle's cards and ``key_logs`` (e.g. the origin's
    current log, fetched from any node: it verifies from the id alone) are verified and
    the longest kept as ``keylog.compare_logs`` decides; the report lists the key
    history (``key_history``), and every record beyond a retired key's heads -- the
    forgeries of a stolen key that a recovery cut off -- is an error
    (``beyond_last_good``), whatever time it claims. A log refused is a finding.

    Needs nothing but the file: no network, no data dir. Checks, streaming, each record
    verified once (its id is looked up before any signature work): the header names the
    origin; the card, if any, is signed by it; every record is a canonical envelope and
    body of the origin with a valid payload and signature, not dated beyond ``now_ms``
    + 15 minutes; per feed, seqs are contiguous from 1, in order, and each ``prev`` is
    the id of the record below; two records for one seq are an equivocation (verified
    as a fork proof); every checkpoint is signed by the origin and its root equals the
    RFC 9162 Merkle root of the bundle's record ids at its size (when the bundle holds
    that many contiguously); a checkpoint of size N proves the origin published seq
    1..N, so a bundle whose records of that feed stop before N is missing records (an
    error); two checkpoints at one size with different roots are a split view; every
    fork and split-view proof carried verifies. Feeds the origin's card (if carried)
    lists of which the bundle holds no record are a warning and listed in
    :attr:`AuditReport.feeds_not_covered`: a bundle may cover only some feeds.

    ``workers`` > 0 verifies record signatures on that many threads while the calling
    thread reads and parses (libsodium releases the GIL); 0 does everything on the
    calling thread. The report is the same either way. ``progress(bytes_read,
    bytes_total)`` is called now and then. ``terms_documents`` (feed -> the bytes of a
    terms document, e.g. fetched from the feed's ``terms_url``) are checked against the
    terms digest the origin's card signed (:func:`check_terms`).

    ``witnesses`` (node ids, out of band) and ``quorum`` (0: all of them): the newest
    checkpoint of each feed must carry cosignatures of at least ``quorum`` distinct
    witnesses named (``core.cosign.check_quorum``; a cn2 witness's keys from its key log,
    carried in the bundle or among ``witness_key_logs``), else ``no_quorum`` (an error, also for
    a feed with no checkpoint); each checkpoint's count is reported
    (:attr:`AuditReport.witness`); cosignatures not counted are findings with the
    reason, and one witness key cosigning two roots of one size is
    ``witness_equivocation``.

    Never raises for anything inside the bundle (it becomes a finding); raises
    :class:`InvalidNodeId` for a malformed ``origin_node_id`` and
    :class:`CitynodeError` if the file cannot be read.
    """
    expected = parse_node_id(origin_node_id)
    oid = canonical_id(origin_node_id)  # cn1 or cn2, as the auditor was given it
    named = list(dict.fromkeys(parse_node_id(w) for w in witnesses))
    if quorum < 0 or quorum > len(named) or (quorum and not named):
        raise ValueError(f"a quorum of {quorum} with {len(named)} witness(es) named")
    started = time.perf_counter()
    rep = AuditReport(os.fspath(path), oid, now_ms)
    try:
        total = os.path.getsize(path)
    except OSError as exc:
        raise CitynodeError(f"cannot read bundle {os.fspath(path)}: "
                            f"{exc.strerror or exc}") from exc
    a = _Audit(rep, path, expected, now_ms, limits)
    pool = ThreadPoolExecutor(workers, "citynode-audit") if workers > 0 else None
    inflight: deque[tuple[list[_Cand], Future[tuple[list[InvalidRecord | None], int]]]] = \
        deque()

    def drain(keep: int) -> None:
        while len(inflight) > keep:
            cands, fut = inflight.popleft()
            errors, count = fut.result()
            a.extra_signatures += count
            for c, err in zip(cands, errors, strict=True):
                a.settle(c, err)

    parse, settle = a.parse, a.settle
    for i, log in enumerate(key_logs):
        _take_log(rep, a.keys, expected, log, f"key log {i + 1} given")
    rep.key_log_given = bool(key_logs)
    batch: list[_Cand] = []
    records = 0
    next_progress = 0
    try:
        for item in iter_bundle(path, limits=limits):
            rep.items += 1
            kind = item.kind
            if kind == RECORD:
                records += 1
                if progress is not None and records >= next_progress:
                    progress(item.offset, total)
                    next_progress = records + 2000
                c = parse(item)
                if c is None:
                    continue
                if pool is None:
                    err: InvalidRecord | None = None
                    if not c[6]:
                        try:
                            _verify_one(a.verifier, expected, c, a.keys)
                        except InvalidRecord as exc:
                            err = exc
                    settle(c, err)
                    continue
                batch.append(c)
                if len(batch) >= _BATCH:
                    inflight.append((batch, pool.submit(_verify_batch, expected, batch,
                                                        a.keys)))
                    batch = []
                    drain(workers + 1)  # bounded memory; keeps every worker busy
            elif kind == HEADER:
                h = item.info
                assert isinstance(h, BundleHeader)
                rep.header = h
                a.header_feeds = frozenset(h.feeds)
                if h.origin != expected:
                    rep.add(ERROR, "header_origin", None, None,
                            f"the bundle header names origin {node_id(h.origin)}, not "
                            f"{oid}: it is not a bundle of this origin (or the id given "
                            "is wrong: check it with that city's operators)")
            elif kind == CARD:
                _audit_card(rep, item, expected, a.verifier, now_ms)
                if rep.card is not None and rep.card.keylog is not None:
                    _take_log(rep, a.keys, expected, rep.card.keylog, "the bundle's card")
            elif kind == CHECKPOINT:
                _audit_checkpoint(rep, item, expected, a.verifier, now_ms, a.feed, a.keys)
            elif kind in (FORK, SPLIT_VIEW):
                _audit_proof(rep, item, expected, a.verifier, a.keys)
            elif kind == COSIGNATURE:
                a.cosignatures.append(item.data)
            elif kind == KEY_LOG:
                a.key_logs.append(item.data)
            elif kind == END:
                rep.complete = True
    except InvalidRecord as exc:
        what = {"truncated": "truncated", "bad_counts": "bad_counts"}.get(exc.reason,
                                                                          "bad_bundle")
        rep.add(ERROR, what, None, None,
                f"{exc} (the audit covers the {rep.items} item(s) read before this)")
    finally:
        if pool is not None:
            try:
                if batch:
                    inflight.append((batch, pool.submit(_verify_batch, expected, batch,
                                                        a.keys)))
                drain(0)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    rep.record_items = records
    _judge_cards(rep, a.keys.held(expected))
    _finish(a)
    if named:
        _finish_witnesses(a, named, quorum or len(named), witness_key_logs)
    check_terms(rep, terms_documents or {})
    # One order whatever the threading: bundle-level first, then by feed and seq.
    rank = {ERROR: 0, WARNING: 1, INFO: 2}
    rep.findings.sort(key=lambda f: (rank[f.severity], f.feed or "", f.seq or 0, f.kind))
    rep.signatures = a.verifier.count + a.extra_signatures
    rep.bytes = total
    rep.seconds = time.perf_counter() - started
    if progress is not None:
        progress(total, total)
    return rep


def check_terms(rep: AuditReport, documents: Mapping[str, bytes]) -> None:
    """Issue 13: check each terms document (feed -> its bytes) against the
    ``terms_digest`` the origin's newest card in the bundle signed for that feed
    (:func:`citynode.core.cards.check_terms_document`): ``terms_ok`` (info) if it
    matches; else an error, ``terms_mismatch`` (another document: changed without a new
    card, or not the origin's) or ``no_terms`` (the card states no terms document for
    the feed, does not list it, or the bundle carries no card of the origin)."""
    for name, doc in sorted(documents.items()):
        entry = None if rep.card is None else next(
            (f for f in rep.card.feeds if f.name == name), None)
        if entry is None:
            rep.add(ERROR, "no_terms", name, None,
                    "a terms document was given for this feed, but " + (
                        "the bundle carries no card of the origin to check it against"
                        if rep.card is None else "the origin's card does not list it"))
            continue
        try:
            check_terms_document(entry, doc)
        except InvalidRecord as exc:
            rep.add(ERROR, exc.reason, name, None, str(exc))
        else:
            digest = entry.terms_digest.hex() if entry.terms_digest else ""
            rep.add(INFO, "terms_ok", name, None,
                    f"the terms document given ({len(doc)} bytes) is the one the "
                    f"origin's card signed (SHA-256 {digest})")


def _finish(a: _Audit) -> None:
    """The checks that need every item: empty and foreign feeds, chains, equivocations,
    and the feeds the origin's card lists that the bundle does not hold."""
    rep, add = a.rep, a.rep.add
    card_feeds = {} if rep.card is None else {f.name: f.access for f in rep.card.feeds}
    if rep.header is not None:
        for name in sorted(a.header_feeds - set(a.feeds)):
            rep.feeds[name] = FeedAudit(name, listed=True)
            if name not in card_feeds:  # else reported as missing_feed below
                add(INFO, "empty_feed", name, None, "listed in the header, but no record of it")
    for other, n in a.foreign.items():
        add(ERROR, "foreign_record", None, None,
            f"{n} record(s) signed by another origin ({node_id(other)}): not part of "
            f"{rep.origin}'s history (not verified)")
    for name in sorted(a.feeds):
        _finish_feed(rep, a.path, name, a.feeds[name], a.verifier, a.limits, a.keys)
    _finish_settled(a)
    _finish_tombstones(a)
    for name, seq, first_offset, env in a.conflicts:
        if rep.kind_counts.get("equivocation", 0) >= MAX_FINDINGS_PER_KIND:
            add(ERROR, "equivocation", name, seq, "two different records for this seq")
            continue
        first = read_item_at(a.path, first_offset, limits=a.limits).data
        try:
            verify_fork_proof(ForkProof(first, env), a.verifier, key_states=a.keys.state)
        except InvalidProof as exc:  # cannot happen for two valid records; say so if it does
            add(ERROR, "equivocation", name, seq, f"two records at this seq: {exc}")
            continue
        add(ERROR, "equivocation", name, seq,
            "two different records signed by the origin for this seq: the origin "
            "equivocated (fork proof verified)")
    # A bundle may hold only some of the origin's feeds (export --feed, or feeds the
    # exporting node may not read): not an error, but the report must say so.
    for name, access in sorted(card_feeds.items()):
        fa = rep.feeds.get(name)
        if fa is not None and (fa.records or fa.invalid):
            continue
        rep.feeds_not_covered.append(name)
        listed = " (its header lists it)" if fa is not None and fa.listed else ""
        add(WARNING, "missing_feed", name, None,
            f"the origin's signed card lists this feed (access {access}), but the bundle "
            f"holds no record of it{listed}: this audit says nothing about it. The "
            "exporting node may not be allowed to read it or may hold none of it yet, or "
            "it was left out (export leaves feeds in clear that are not public out unless "
            "asked) or removed; for an audit of it, ask for a bundle that holds it "
            f"(citynode export ... --feed {name}, or --include-partners)")


def _finish_witnesses(a: _Audit, named: list[bytes], k: int, given: Sequence[bytes]
                      ) -> None:
    """The witness check (see :func:`audit_bundle`): the witnesses' keys from the key
    logs carried or given (each tried against each cn2 witness named: a log verifies
    from its id alone, so a wrong one is simply not taken), then each checkpoint's
    cosignatures through ``cosign.check_quorum``."""
    rep, add = a.rep, a.rep.add
    book = KeyBook()
    for w in named:
        for log in [*a.key_logs, *given]:
            try:
                book.offer(w, log, verifier=Verifier())
            except InvalidRecord:
                continue
    keys = {w: cosign.witness_keys(w, book.state(w)) for w in named}
    names = [book.name(w) for w in named]
    by_feed: dict[str, list[Checkpoint]] = {}
    for name, st in a.feeds.items():
        by_feed[name] = sorted(st.checkpoints, key=lambda c: (c.size, c.time))
    # One pass over the cosignatures, no signature checked yet: by the checkpoint
    # position they claim, and by (key, witness, position) -> root for equivocations.
    claims: dict[tuple[str, int], list[bytes]] = {}
    roots: dict[tuple[bytes, bytes, str, int], dict[bytes, bytes]] = {}
    for env in a.cosignatures:
        f = _fields(env)
        if f is None or f.get("origin") != a.expected:
            continue
        feed, size = f.get("feed"), f.get("size")
        if type(feed) is not str or type(size) is not int:
            continue
        claims.setdefault((feed, size), []).append(env)
        key, witness, root = f.get("key"), f.get("witness"), f.get("root")
        if type(key) is bytes and type(witness) is bytes and type(root) is bytes:
            roots.setdefault((key, witness, feed, size), {}).setdefault(root, env)
    out: list[dict[str, Any]] = []
    for feed in sorted(by_feed):
        cps = by_feed[feed]
        if not cps:
            if a.feeds[feed].audit.records:
                add(ERROR, "no_quorum", feed, None,
                    "the bundle carries no checkpoint of this feed: no witness vouches "
                    "for any of its records")
            continue
        for i, cp in enumerate(cps):
            q = cosign.check_quorum(cp, claims.get((feed, cp.size), []), keys, k,
                                    verifier=a.verifier, now_ms=a.now_ms)
            counted = sorted(book.name(w) for w in q.witnesses)
            out.append({"feed": feed, "size": cp.size, "root": cp.root.hex(),
                        "witnesses": counted, "ok": q.ok})
            for _j, reason in q.rejected:
                if reason in ("not_witness", "duplicate"):
                    continue  # another witness's (not named here), or one twice
                add(WARNING, "cosignature_refused", feed, None,
                    f"a cosignature of the checkpoint of size {cp.size} is not counted: "
                    f"{reason}")
            if i == len(cps) - 1 and not q.ok:
                add(ERROR, "no_quorum", feed, None,
                    f"the newest checkpoint (size {cp.size}) carries {len(q.witnesses)} "
                    f"valid cosignature(s) of the witnesses named, {k} required"
                    + (f" (counted: {', '.join(counted)})" if counted else ""))
    # One witness key vouching for two roots at one size: that witness equivocated.
    for (_key, witness, feed, size), by_root in roots.items():
        if len(by_root) < 2:
            continue
        valid: list[bytes] = []
        for env in by_root.values():  # two that verify, of different roots
            try:
                cosign.open_cosignature(env, verifier=a.verifier)
            except InvalidRecord:
                continue
            valid.append(env)
            if len(valid) == 2:
                break
        if len(valid) < 2:
            continue
        try:
            cosign.verify_witness_equivocation(valid[0], valid[1], verifier=a.verifier)
        except InvalidProof:
            continue
        add(ERROR, "witness_equivocation", feed, None,
            f"witness {book.name(witness)} cosigned two roots of size {size}")
    rep.witness = {"witnesses": names, "quorum": k, "checkpoints": out}


def _fields(env: bytes) -> dict[Any, Any] | None:
    """A cosignature envelope's body fields, decoded but not verified (None: not even
    that), to sort it to the checkpoint it claims; ``check_quorum`` verifies."""
    try:
        f = encoding.decode(decode_envelope(env)[0])
    except InvalidRecord:
        return None
    return f if type(f) is dict else None


def _take_log(rep: AuditReport, keys: KeyBook, expected: bytes, log: bytes, where: str
              ) -> None:
    """Offer a key log of the origin to the audit's book; a refused one is a finding."""
    try:
        d = keys.offer(expected, log, verifier=Verifier())
    except InvalidRecord as exc:
        rep.add(ERROR, "bad_key_log", None, None, f"{where}: the key log is refused: {exc}")
        return
    if d.error is not None and d.outcome != "stale":
        rep.add(ERROR, "bad_key_log", None, None, f"{where}: {d.error} [{d.error.reason}]")
    held = keys.held(expected)
    if held is not None:
        rep.key_history = _key_history(held.state, held.events)


def _key_history(state: keylog.KeyState, events: Sequence[keylog.KeyEvent]
                 ) -> list[dict[str, Any]]:
    """The key history for the report: each event, and each key's window."""
    out: list[dict[str, Any]] = []
    for e in events:
        w = next((w for w in state.keys if w.key == e.key), None)
        out.append({"seq": e.seq, "type": e.type, "time": e.time, "key": e.key.hex(),
                    "heads": {f: h.seq for f, h in e.heads.items()},
                    "retired_by": w.retired_by if w is not None else "superseded",
                    "until": ({f: h.seq for f, h in w.end.items()}
                              if w is not None and w.end is not None else None)})
    return out


def _audit_card(rep: AuditReport, item: Item, expected: bytes, verifier: Verifier,
                now_ms: int) -> None:
    """Verify the bundle's card; keep it in ``rep.card`` only if the origin signed it.
    A card that does not verify, or is signed by another node, is ``bad_card``."""
    try:
        # No expected id here: open_card's "wrong node" message speaks of a card fetched
        # from a URL; an offline audit says where this card came from itself.
        card = open_card(item.data, expected_node_id=None, verifier=verifier, now_ms=now_ms)
    except InvalidRecord as exc:
        rep.add(ERROR, "bad_card", None, None, f"the bundle's card is refused: {exc}")
        return
    if card.node != expected:
        rep.add(ERROR, "bad_card", None, None,
                f"the bundle's card is signed by {card.node_id}, not by the origin audited "
                f"({rep.origin}): it is another node's card, or the id given for the "
                "origin is wrong (check it with that city's operators)")
        return
    rep.cards = sorted([*(c for c in rep.cards if c.time != card.time), card],
                       key=lambda c: c.time)
    rep.card = rep.cards[-1]


def _judge_cards(rep: AuditReport, held: HeldLog | None) -> None:
    """Judge the origin's cards by the key log the audit prefers (the one
    ``compare_logs`` let it hold, of the logs given and the bundle's cards):
    :func:`citynode.core.cards.judge_card_key`. A card signed by a key not in force
    there is not the origin's card: neither ``rep.card`` nor part of the card history
    the terms come from. Dated after the key event that retired its key (the origin
    signs with the new key from then on), or signed by a key that log does not name or
    the identity died with, it is an error (``key_not_in_force``): a thief's, such as
    one signed by a key a recovery retired with the log of before the recovery. Signed
    by a key a recovery retired and dated before that recovery, it is a warning
    (``retired_key_card``): the origin's own from before the compromise, or a thief's
    backdated -- nobody can tell, so it is not used."""
    kept = []
    for c in rep.cards:
        try:
            judge_card_key(c, held)
        except InvalidRecord as exc:
            at = None if held is None else signer_retired_at(c, held)
            if at is not None and c.time <= at:
                rep.add(WARNING, "retired_key_card", None, None,
                        f"the bundle's card dated {iso_time(c.time)} is not used: it is "
                        f"signed by a key a recovery retired on {iso_time(at)} (the "
                        "origin's card of before the compromise, or a thief's backdated)")
            else:
                rep.add(ERROR, "key_not_in_force", None, None,
                        f"the bundle's card dated {iso_time(c.time)} is refused: {exc} "
                        "(judged by the key log in the key history)")
            continue
        kept.append(c)
    rep.cards = kept
    rep.card = kept[-1] if kept else None


def terms_periods(cards: list[NodeCard]) -> dict[str, list[dict[str, Any]]]:
    """Issue 13: per feed, the terms each card stated and the period they applied --
    from that card's time until the next card that changed them (``until`` None: still
    in force) -- from an origin's cards sorted by time. A feed a card does not list has
    unknown terms in that period (``terms`` None)."""
    names = sorted({f.name for c in cards for f in c.feeds})
    out: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        periods: list[dict[str, Any]] = []
        for c in cards:
            entry = next((f for f in c.feeds if f.name == name), None)
            terms = entry.terms() if entry is not None else None
            if periods and periods[-1]["terms"] == terms:
                continue
            if periods:
                periods[-1]["until"] = c.time
            periods.append({"from": c.time, "until": None, "terms": terms})
        out[name] = periods
    return out


def _audit_checkpoint(
    rep: AuditReport, item: Item, expected: bytes, verifier: Verifier, now_ms: int,
    feed_state: Callable[[str], _Feed], keys: KeyBook,
) -> None:
    try:
        cp = open_checkpoint(item.data, verifier=verifier,  # time checked below
                             key_states=keys.state)
    except InvalidRecord as exc:
        rep.add(ERROR, "bad_checkpoint", None, None,
                f"checkpoint at byte {item.offset} is invalid: {exc} [{exc.reason}]")
        return
    if cp.origin != expected:
        rep.add(ERROR, "foreign_checkpoint", cp.feed, None,
                f"checkpoint of size {cp.size} is signed by another origin "
                f"({node_id(cp.origin)})")
        return
    if cp.time > now_ms + DEFAULT_FUTURE_TOLERANCE_MS:
        rep.add(ERROR, "future_time", cp.feed, None,
                f"checkpoint of size {cp.size} is dated {(cp.time - now_ms) // 1000} s after "
                "the audit time")
    st = feed_state(cp.feed)
    st.checkpoints.append(cp)
    st.audit.checkpoints += 1


def _audit_proof(rep: AuditReport, item: Item, expected: bytes, verifier: Verifier,
                 keys: KeyBook) -> None:
    try:
        if item.kind == FORK:
            a, _b = verify_fork_proof(ForkProof.decode(item.data), verifier,
                                      key_states=keys.state)
            origin, feed, seq = a.origin, a.feed, a.seq
            what = f"fork proof: the origin signed two histories of this feed at seq {seq}"
        else:
            ca, _cb = verify_split_view(SplitViewProof.decode(item.data), verifier,
                                        keys.state)
            origin, feed, seq = ca.origin, ca.feed, None
            what = (f"split-view proof: the origin signed two roots for size {ca.size} of "
                    "this feed")
    except InvalidProof as exc:
        rep.add(ERROR, "bad_proof", None, None,
                f"{item.kind} proof at byte {item.offset} does not hold: {exc}")
        return
    if origin != expected:
        rep.add(WARNING, "foreign_proof", feed, seq,
                f"the bundle carries a valid {item.kind} proof against another origin "
                f"({node_id(origin)})")
        return
    rep.add(ERROR, "equivocation" if item.kind == FORK else "split_view", feed, seq,
            f"{what} (carried in the bundle, verified)")


def _finish_settled(a: _Audit) -> None:
    """A key event settled a retired key's window at a named head (docs/PROTOCOL.md,
    "Settled windows"): the records there count only on the chain that ends at it.
    A feed whose records held from seq 1 end inside such a window, below its head,
    cannot be checked against that chain (a thief's chain of the same seqs would
    verify record by record): ``settled_unconfirmed``, a warning naming the head."""
    state = a.keys.state(a.expected)
    if state is None:
        return
    for name, fa in sorted(a.rep.feeds.items()):
        if not fa.contiguous:
            continue
        for w in state.keys:
            hd = state.settled(w.key, name, fa.contiguous)
            if hd is not None and hd.seq > fa.contiguous:
                a.rep.add(WARNING, "settled_unconfirmed", name, fa.contiguous,
                          f"a key event names seq {hd.seq} (id {hd.id.hex()[:16]}...) as "
                          f"the last record of a retired key; the bundle holds this feed "
                          f"only up to seq {fa.contiguous}, inside that window, so its "
                          "records there cannot be checked against the named chain: "
                          f"audit a bundle that holds seq {hd.seq}")
                break


def _finish_tombstones(a: _Audit) -> None:
    """Why each record held without its payload may be so: an erasure request of the origin in the
    bundle naming it exactly, or the retention the origin's card in force when it was signed
    (of the cards the bundle carries) declares for its feed; else ``payload_missing``, an
    error (a payload withheld and passed off as removed). Erasure entries naming a position
    held under another id are ``erasure_mismatch`` (a warning: that entry erases nothing)."""
    rep = a.rep
    for name, seq, rid, t in sorted(a.tombstones):
        fa = rep.feeds[name]
        by = a.erasures.get((name, seq, rid))
        days = retention_in_force(rep.cards, name, t)
        if by is not None:
            fa.erased += 1
            tomb = Tombstone(name, seq, rid, "erased", by[0], by[1])
        elif past_retention(t, days, a.now_ms):
            fa.pruned += 1
            tomb = Tombstone(name, seq, rid, "pruned", None,
                             f"older than the feed's retention of {days} day(s)")
        else:
            rep.add(ERROR, "payload_missing", name, seq,
                    "held without its payload, but no erasure request of the origin in "
                    "the bundle names it and the origin's card in force when it was "
                    "signed declares no retention it is past: its payload was withheld")
            continue
        if len(rep.tombstones) < MAX_TOMBSTONES_LISTED:
            rep.tombstones.append(tomb)
    for (name, seq, rid), (request, _reason) in sorted(a.erasures.items()):
        st = a.feeds.get(name)
        held = None if st is None else st.held.get(seq)
        if held is not None and held[0] != rid:
            rep.add(WARNING, "erasure_mismatch", name, seq,
                    f"erasure request {request.hex()[:16]}... names this seq under another id: "
                    "that entry erases nothing")


def _finish_feed(
    rep: AuditReport, path: str | os.PathLike[str], name: str, st: _Feed,
    verifier: Verifier, limits: BundleLimits, keys: KeyBook,
) -> None:
    """Chain, gap, order and checkpoint checks of one feed, once every item was read."""
    fa, held = st.audit, st.held
    fa.records = len(held)
    seqs = sorted(held)
    fa.max_seq = max(seqs[-1] if seqs else 0, max(st.bad_seqs, default=0))
    if st.late:
        rep.add(ERROR, "out_of_order", name, None,
                f"{st.late} record(s) come after a record with a higher seq: the bundle's "
                "records were reordered (a bundle lists each feed in seq order)")
    # A checkpoint the origin signed of size N proves it published seq 1..N.
    proven = max((cp.size for cp in st.checkpoints), default=0)
    # Gaps: seqs below the highest with no valid record, by ranges (a seq can be near
    # 2**63: never step through a gap one seq at a time). Seqs where an invalid record
    # of the origin stood were reported with it, so they are left out here.
    fa.missing = max(fa.max_seq, proven) - len(held)
    bad = sorted(s for s in st.bad_seqs if s not in held)
    expect = 1
    for s in [*seqs, fa.max_seq + 1]:
        if s > expect:
            lo = expect
            i = bisect.bisect_left(bad, lo)
            while lo < s:
                hi = bad[i] - 1 if i < len(bad) and bad[i] < s else s - 1
                if hi >= lo:
                    rep.add(ERROR, "gap", name, lo,
                            f"{_range_text(lo, hi)} missing: the bundle lacks "
                            f"{hi - lo + 1} record(s) of the chain")
                lo = hi + 2  # past the bad seq (or past s - 1: the loop ends)
                i += 1
        expect = s + 1
    if proven > fa.max_seq:
        # The tail the origin signed for is not in the bundle: records removed (the
        # "removed last record" tampering), or written by an exporter that had a newer
        # checkpoint than records (citynode export leaves such checkpoints out).
        lo = fa.max_seq + 1
        held_text = (f"its last record of this feed is seq {fa.max_seq}" if fa.max_seq
                     else "it holds no record of this feed")
        rep.add(ERROR, "missing_records", name, lo,
                f"{_range_text(lo, proven)} missing: the origin signed a checkpoint of size "
                f"{proven}, so it published seq 1..{proven}, but {held_text}: "
                f"{proven - lo + 1} record(s) the origin signed for were removed or left "
                "out. Do not accept this bundle as the feed's history; ask for one "
                "exported by a node that holds the whole feed")
    contiguous = 0
    for s in seqs:
        if s != contiguous + 1:
            break
        contiguous = s
    fa.contiguous = contiguous
    # Chain links (found as records arrived).
    for s in sorted(st.broken):
        how = "both are signed by the origin: it signed two histories"
        # Only listed findings get the proof re-checked (bounded extra work).
        if rep.kind_counts.get("broken_link", 0) < MAX_FINDINGS_PER_KIND:
            env_lo = read_item_at(path, held[s - 1][1], limits=limits).data
            env_hi = read_item_at(path, held[s][1], limits=limits).data
            try:
                verify_fork_proof(ForkProof(env_lo, env_hi), verifier,
                                  key_states=keys.state)
                how += " (fork proof verified)"
            except InvalidProof as exc:
                how = str(exc)
        rep.add(ERROR, "broken_link", name, s,
                f"prev is not the id of the record at seq {s - 1}: {how}")
    if not st.checkpoints:
        return
    # Checkpoints: roots against the bundle's own record ids, then against each other.
    cps = sorted(st.checkpoints, key=lambda c: c.size)
    upto = min(contiguous, cps[-1].size)
    log = MerkleLog(held[s][0] for s in range(1, upto + 1))
    by_size: dict[int, Checkpoint] = {}
    for cp in cps:
        other = by_size.get(cp.size)
        if other is not None and other.root != cp.root:
            try:
                verify_split_view(SplitViewProof(other.envelope, cp.envelope), verifier,
                                  keys.state)
                rep.add(ERROR, "split_view", name, None,
                        f"two checkpoints of size {cp.size} with different roots: the "
                        "origin showed two histories (split-view proof verified)")
            except InvalidProof as exc:
                rep.add(ERROR, "split_view", name, None, str(exc))
        by_size.setdefault(cp.size, cp)
        if cp.size <= upto:
            if log.root(cp.size) == cp.root:
                fa.checkpoints_matched += 1
            else:
                rep.add(ERROR, "checkpoint_mismatch", name, cp.size,
                        f"the checkpoint of size {cp.size} signed by the origin does not "
                        f"match the Merkle root of the bundle's first {cp.size} records: the "
                        "records were altered, or the origin showed a split view")
        elif cp.size <= fa.max_seq:
            # The hole below it was reported (gap, or the invalid record's reason).
            held_run = (f"holds only seq 1..{contiguous} of this feed contiguously"
                        if contiguous else "holds no valid seq 1 of this feed")
            rep.add(WARNING, "checkpoint_beyond", name, cp.size,
                    f"the checkpoint of size {cp.size} cannot be checked: the bundle "
                    f"{held_run} (the records missing or invalid below it are reported "
                    "as errors)")
        # else: beyond every record held, reported once as missing_records above
    sizes = sorted(by_size)
    for a, b in itertools.pairwise(sizes):
        if by_size[b].time < by_size[a].time:
            rep.add(WARNING, "checkpoint_time_order", name, b,
                    f"the checkpoint of size {b} is dated before the one of size {a}: "
                    "check the origin's clock")
