"""Export bundles: one self-contained file an auditor verifies with only the file and the
origin's node id (docs/PROTOCOL.md, "Export bundles").

Layout, designed to be written and read as a stream (a bundle may hold millions of
records)::

    "citynode-bundle-v1\\n"                     19-byte magic line
    ( uint32 big-endian length || item )*       each item one canonical msgpack map

Items, in this order (the writer's order; the reader enforces first/last/once rules):

=============  ==============================================================  =========
kind           map (keys in canonical order)                                   how many
=============  ==============================================================  =========
header         ``{created: int ms, feeds: [str], kind, origin: bin32,          first, 1
               version: 1}`` -- feeds sorted, unique
card           ``{env: bin, kind}`` -- the origin's signed card envelopes: its  0 to 65
               card history, oldest first, the last one its newest card
record         ``{env: bin, kind}`` -- a record envelope, feeds in name order,  any
               seq order within a feed
checkpoint     ``{env: bin, kind}`` -- a signed checkpoint envelope             any
cosignature    ``{env: bin, kind}`` -- a witness's cosignature envelope of a    any
               checkpoint the bundle carries (docs/PROTOCOL.md, "Cosignatures")
key-log        ``{env: bin, kind}`` -- a cn2 witness's key log (its wire bytes) any
               so the auditor can check its cosignatures from its id alone
fork           the :class:`~citynode.core.chain.ForkProof` encoding             any
               ``{a: bin, b: bin, kind: "fork"}``
split-view     the :class:`~citynode.core.checkpoints.SplitViewProof` encoding  any
               ``{a: bin, b: bin, kind: "split-view"}``
end            ``{cards, checkpoints, forks, kind, records, split_views}``      last, 1
               -- item counts, so a truncated or spliced file is detected; with
               ``cosignatures`` and ``key_logs`` too when the bundle holds any
=============  ==============================================================  =========

Nothing in the bundle is trusted because of the bundle: the header and the end item are
not signed (they only describe), every envelope and proof carries its own signature.
This module checks the *format* only; :func:`citynode.audit.audit_bundle` verifies.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple

from citynode.core import encoding
from citynode.core.cards import open_card
from citynode.core.chain import ForkProof
from citynode.core.checkpoints import SplitViewProof
from citynode.core.keylog import identity_id
from citynode.core.keys import Verifier, node_id
from citynode.core.records import check_feed_name, decode_envelope, decode_record
from citynode.core.types import ERASURE_FEED
from citynode.errors import CitynodeError, InvalidRecord

if TYPE_CHECKING:
    from citynode.storage import Storage

__all__ = [
    "BUNDLE_VERSION",
    "COSIGNATURE",
    "DEFAULT_BUNDLE_LIMITS",
    "KEY_LOG",
    "MAGIC",
    "BundleCounts",
    "BundleEnd",
    "BundleHeader",
    "BundleLimits",
    "ExportSummary",
    "Item",
    "export_from_storage",
    "iter_bundle",
    "read_item_at",
    "write_bundle",
]

MAGIC = b"citynode-bundle-v1\n"
BUNDLE_VERSION = 1
MAX_FEEDS = 1000

HEADER, CARD, RECORD, CHECKPOINT, FORK, SPLIT_VIEW, END = (
    "header", "card", "record", "checkpoint", "fork", "split-view", "end",
)
COSIGNATURE, KEY_LOG = "cosignature", "key-log"
_ENV_KINDS = frozenset({CARD, RECORD, CHECKPOINT, COSIGNATURE, KEY_LOG})
_PROOF_KINDS = frozenset({FORK, SPLIT_VIEW})
_END_FIELDS = ("cards", "checkpoints", "forks", "records", "split_views")
#: End-item counts written only when not 0 (a bundle without witnesses is as before).
_END_OPTIONAL = ("cosignatures", "key_logs")
#: Key-log items a bundle may hold (the witnesses' logs).
MAX_KEY_LOG_ITEMS = 1000
#: Card items a bundle may hold: the card history kept (64) and the current card.
MAX_CARD_ITEMS = 65

# The canonical encoding of {"env": <bin>, "kind": "record"} is exactly this prefix, the
# bin header and envelope, and this suffix ("env" sorts before "kind"). Records are
# nearly every item, so the reader checks this layout directly instead of running the
# generic strict decoder on each: same acceptance, a fraction of the cost.
_REC_PREFIX = b"\x82\xa3env"
_REC_SUFFIX = b"\xa4kind\xa6record"


@dataclass(frozen=True, slots=True)
class BundleLimits:
    """Bounds the reader applies before doing work proportional to them."""

    max_item_bytes: int = 1024 * 1024  # a card body is at most 1 MiB - 1024 (cards.py)
    max_records: int = 50_000_000  # the audit keeps about 250 bytes per record
    max_checkpoints: int = 10_000_000
    max_proofs: int = 100_000  # fork and split-view items together
    max_cosignatures: int = 200_000  # the audit keeps them (about 250 bytes each)


DEFAULT_BUNDLE_LIMITS = BundleLimits()


@dataclass(frozen=True, slots=True)
class BundleHeader:
    """The (unsigned) header: whose records the bundle claims to hold, and which feeds."""

    version: int
    origin: bytes
    created: int
    feeds: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BundleCounts:
    """How many items of each kind a bundle holds (the end item)."""

    records: int = 0
    checkpoints: int = 0
    forks: int = 0
    split_views: int = 0
    cards: int = 0
    cosignatures: int = 0
    key_logs: int = 0

    def to_json(self) -> dict[str, int]:
        return {"records": self.records, "checkpoints": self.checkpoints,
                "forks": self.forks, "split_views": self.split_views, "cards": self.cards,
                "cosignatures": self.cosignatures, "key_logs": self.key_logs}


BundleEnd = BundleCounts


class Item(NamedTuple):
    """One bundle item as read.

    ``data`` is the envelope (card, record, checkpoint), the proof encoding (fork,
    split-view) or the raw item bytes (header, end); ``offset`` is where the item's
    length prefix starts in the file (for :func:`read_item_at`); ``info`` is the parsed
    :class:`BundleHeader` or :class:`BundleCounts` for header and end items.
    """

    kind: str
    data: bytes
    offset: int
    info: BundleHeader | BundleCounts | None = None


def _bad(msg: str, reason: str = "bad_bundle") -> InvalidRecord:
    return InvalidRecord(msg, reason)


# --------------------------------------------------------------------------- writing


def _frame(item: bytes, limits: BundleLimits) -> bytes:
    if len(item) > limits.max_item_bytes:
        raise _bad(f"a bundle item of {len(item)} bytes is over the limit of "
                   f"{limits.max_item_bytes}", "too_large")
    return len(item).to_bytes(4, "big") + item


def _bin_header(n: int) -> bytes:
    if n < 0x100:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def _record_item(env: bytes) -> bytes:
    # Same bytes as encoding.encode({"env": env, "kind": "record"}), without the
    # generic encoder's recursive key sort (this runs once per record).
    return _REC_PREFIX + _bin_header(len(env)) + env + _REC_SUFFIX


def _proof_bytes(p: bytes | ForkProof | SplitViewProof, kind: str) -> bytes:
    data = p.encode() if isinstance(p, ForkProof | SplitViewProof) else p
    # Decoding checks the encoding is canonical and of the right kind: never write an
    # item a reader would refuse.
    (ForkProof if kind == FORK else SplitViewProof).decode(data)
    return data


def write_bundle(
    path: str | os.PathLike[str],
    *,
    origin: bytes,
    card: bytes | None,
    feeds: Mapping[str, Iterable[bytes]],
    card_history: Iterable[bytes] = (),
    checkpoints: Iterable[bytes] = (),
    forks: Iterable[bytes | ForkProof] = (),
    split_views: Iterable[bytes | SplitViewProof] = (),
    cosignatures: Iterable[bytes] = (),
    key_logs: Iterable[bytes] = (),
    now_ms: int,
    limits: BundleLimits = DEFAULT_BUNDLE_LIMITS,
) -> BundleCounts:
    """Write a bundle to ``path`` and return its item counts.

    ``feeds`` maps each feed name to its record envelopes in seq order (any iterable:
    consumed once, in feed-name order, so a storage cursor streams straight to disk).
    ``checkpoints`` are checkpoint envelopes; ``forks`` / ``split_views`` proofs or their
    encodings; ``cosignatures`` witnesses' cosignature envelopes and ``key_logs`` their
    key logs (at most :data:`MAX_KEY_LOG_ITEMS`). Only the format is checked (envelope
    layout, proof encodings, feed names, item sizes), not signatures: the writer
    exports what it holds, the auditor verifies.

    The file is written to ``<path>.part`` and renamed into place after an fsync, so
    ``path`` never holds half a bundle. Raises :class:`InvalidRecord` for input a reader
    would refuse (:class:`InvalidProof` for a malformed proof) and :class:`CitynodeError`
    if the file cannot be written.
    """
    if type(origin) is not bytes or len(origin) != 32:
        raise _bad("the bundle origin must be a 32-byte public key", "bad_field")
    names = sorted(feeds)
    if len(names) > MAX_FEEDS:
        raise _bad(f"a bundle holds at most {MAX_FEEDS} feeds, not {len(names)}")
    for name in names:
        check_feed_name(name)
    target = Path(path)
    tmp = target.with_name(target.name + ".part")
    counts = {k: 0 for k in (*_END_FIELDS, *_END_OPTIONAL)}
    try:
        with open(tmp, "wb", buffering=1024 * 1024) as f:
            f.write(MAGIC)
            f.write(_frame(encoding.encode({
                "kind": HEADER, "version": BUNDLE_VERSION, "origin": origin,
                "created": now_ms, "feeds": names,
            }), limits))
            # Issue 13: the origin's earlier cards (which decide the terms in force for
            # its older records), oldest first, then its newest card last.
            for env in [*(e for e in card_history if e != card), card][-MAX_CARD_ITEMS:]:
                if env is None:
                    continue
                decode_envelope(env, encoding.Limits(max_bytes=limits.max_item_bytes))
                f.write(_frame(encoding.encode({"kind": CARD, "env": env}), limits))
                counts["cards"] += 1
            n = 0
            for name in names:
                for env in feeds[name]:
                    decode_record(env)
                    f.write(_frame(_record_item(env), limits))
                    n += 1
            counts["records"] = n
            for env in checkpoints:
                decode_envelope(env)
                f.write(_frame(encoding.encode({"kind": CHECKPOINT, "env": env}), limits))
                counts["checkpoints"] += 1
            for env in cosignatures:
                decode_envelope(env)
                f.write(_frame(encoding.encode({"kind": COSIGNATURE, "env": env}), limits))
                counts["cosignatures"] += 1
            for log in key_logs:
                if counts["key_logs"] >= MAX_KEY_LOG_ITEMS:
                    raise _bad(f"a bundle holds at most {MAX_KEY_LOG_ITEMS} key logs")
                f.write(_frame(encoding.encode({"kind": KEY_LOG, "env": log}), limits))
                counts["key_logs"] += 1
            for fork in forks:
                f.write(_frame(_proof_bytes(fork, FORK), limits))
                counts["forks"] += 1
            for split in split_views:
                f.write(_frame(_proof_bytes(split, SPLIT_VIEW), limits))
                counts["split_views"] += 1
            end = {k: n for k, n in counts.items() if k in _END_FIELDS or n}
            f.write(_frame(encoding.encode({"kind": END, **end}), limits))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise CitynodeError(
            f"cannot write bundle {target}: {exc.strerror or exc}: check the directory "
            "exists and is writable"
        ) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return BundleCounts(**counts)


# --------------------------------------------------------------------------- reading

_ITEM_LIMITS_CACHE: dict[int, encoding.Limits] = {}


def _item_limits(limits: BundleLimits) -> encoding.Limits:
    lim = _ITEM_LIMITS_CACHE.get(limits.max_item_bytes)
    if lim is None:
        # depth 2: header map -> feeds array; items: header with MAX_FEEDS names at most
        lim = encoding.Limits(max_bytes=limits.max_item_bytes, max_depth=2,
                              max_items=MAX_FEEDS + 16)
        _ITEM_LIMITS_CACHE[limits.max_item_bytes] = lim
    return lim


def _parse_record_item(data: bytes) -> bytes | None:
    """The envelope of a canonical record item, or None if ``data`` is not laid out as
    one (then the generic decoder decides what it is)."""
    if data[:5] != _REC_PREFIX or data[-12:] != _REC_SUFFIX:
        return None
    tag = data[5] if len(data) > 5 else 0
    if tag == 0xC4:
        start, n = 7, data[6]
    elif tag == 0xC5:
        start, n = 8, int.from_bytes(data[6:8], "big")
    elif tag == 0xC6:
        start, n = 10, int.from_bytes(data[6:10], "big")
    else:
        return None
    if start + n + 12 != len(data) or _bin_header(n) != data[5:start]:
        return None
    return data[start : start + n]


def _parse_header(v: dict[str, Any]) -> BundleHeader:
    if set(v) != {"kind", "version", "origin", "created", "feeds"}:
        if v.get("version") != BUNDLE_VERSION:
            raise _bad(f"bundle format version {v.get('version')!r} is unknown: this citynode "
                       f"reads version {BUNDLE_VERSION}; upgrade it", "unknown_version")
        raise _bad("bundle header must be {created, feeds, kind, origin, version}")
    version = v["version"]
    if type(version) is not int or version != BUNDLE_VERSION:
        raise _bad(f"bundle format version {version!r} is unknown: this citynode reads "
                   f"version {BUNDLE_VERSION}; upgrade it", "unknown_version")
    origin, created, feeds = v["origin"], v["created"], v["feeds"]
    if type(origin) is not bytes or len(origin) != 32:
        raise _bad("bundle header origin must be a 32-byte public key")
    if type(created) is not int or created < 0:
        raise _bad("bundle header created must be a non-negative integer (ms)")
    if type(feeds) is not list or len(feeds) > MAX_FEEDS:
        raise _bad(f"bundle header feeds must be a list of at most {MAX_FEEDS} names")
    for i, name in enumerate(feeds):
        check_feed_name(name)
        if i and name <= feeds[i - 1]:
            raise _bad("bundle header feeds are not sorted without duplicates")
    return BundleHeader(version, origin, created, tuple(feeds))


def _parse_end(v: dict[str, Any]) -> BundleCounts:
    if not {"kind", *_END_FIELDS} <= set(v) <= {"kind", *_END_FIELDS, *_END_OPTIONAL}:
        raise _bad(f"bundle end item must be {{{', '.join(sorted(['kind', *_END_FIELDS]))}}}"
                   f" (and {', '.join(_END_OPTIONAL)} when not 0)")
    for k in (*_END_FIELDS, *_END_OPTIONAL):
        if k in v and (type(v[k]) is not int or v[k] < 0 or (k in _END_OPTIONAL
                                                             and v[k] == 0)):
            raise _bad(f"bundle end item {k} must be a "
                       f"{'positive' if k in _END_OPTIONAL else 'non-negative'} integer")
    return BundleCounts(**{k: v[k] for k in (*_END_FIELDS, *_END_OPTIONAL) if k in v})


def _parse_item(data: bytes, offset: int, limits: BundleLimits) -> Item:
    env = _parse_record_item(data)
    if env is not None:
        return Item(RECORD, env, offset)
    v = encoding.decode(data, _item_limits(limits))
    kind = v.get("kind") if type(v) is dict else None
    if type(kind) is not str:  # a list or map is unhashable: `in` a set would raise
        raise _bad(f"bundle item at byte {offset} is not a known item (no string kind)")
    if kind in _ENV_KINDS:
        if set(v) != {"kind", "env"} or type(v["env"]) is not bytes:
            raise _bad(f"bundle {kind} item must be {{env: bin, kind}}")
        return Item(kind, v["env"], offset)
    if kind in _PROOF_KINDS:
        # The proof decoders check the exact shape; here only that it is bytes-valued.
        return Item(kind, data, offset)
    if kind == HEADER:
        return Item(HEADER, data, offset, _parse_header(v))
    if kind == END:
        return Item(END, data, offset, _parse_end(v))
    raise _bad(f"bundle item at byte {offset} is not a known item (kind {kind!r})")


def _read_exact(f: IO[bytes], n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise _bad("the bundle ends in the middle of an item: it is truncated (copy it "
                   "again)", "truncated")
    return data


def _open(path: str | os.PathLike[str]) -> IO[bytes]:
    try:
        return open(path, "rb", buffering=1024 * 1024)
    except OSError as exc:
        raise CitynodeError(f"cannot read bundle {os.fspath(path)}: "
                            f"{exc.strerror or exc}") from exc


def iter_bundle(
    path: str | os.PathLike[str], *, limits: BundleLimits = DEFAULT_BUNDLE_LIMITS
) -> Iterator[Item]:
    """Read a bundle item by item, checking the format as it goes.

    Yields the header first and the end item last. Raises :class:`InvalidRecord`
    (reason ``bad_bundle``, ``truncated``, ``too_large``, ``bad_counts``,
    ``unknown_version``, or an :class:`EncodingError` reason) as soon as the stream
    breaks a rule: wrong magic, an item over ``limits.max_item_bytes``, an item that is
    not canonical msgpack of a known kind, a header that is not first, a second header,
    card or end, anything after the end item, no end item (truncated), or counts that
    do not match the end item. Raises :class:`CitynodeError` if the file cannot be read.
    Items already yielded stay valid as far as the format goes; signatures are the
    caller's to verify.
    """
    f = _open(path)
    try:
        yield from _iter(f, limits)
    except OSError as exc:
        raise CitynodeError(f"cannot read bundle {os.fspath(path)}: "
                            f"{exc.strerror or exc}") from exc
    finally:
        f.close()


def _iter(f: IO[bytes], limits: BundleLimits) -> Iterator[Item]:
    magic = f.read(len(MAGIC))
    if magic != MAGIC:
        raise _bad("this is not a citynode bundle (it does not start with "
                   "'citynode-bundle-v1')")
    offset = len(MAGIC)
    max_item = limits.max_item_bytes
    counts = dict.fromkeys((*_END_FIELDS, *_END_OPTIONAL), 0)
    records = 0
    read = f.read
    first = True
    while True:
        prefix = read(4)
        if len(prefix) != 4:
            if not prefix:
                raise _bad("the bundle has no end item: it is truncated (copy it again)",
                           "truncated")
            raise _bad("the bundle ends in the middle of an item length: it is truncated",
                       "truncated")
        n = int.from_bytes(prefix, "big")
        if not 0 < n <= max_item:
            raise _bad(f"bundle item at byte {offset} has length {n}: items are 1 to "
                       f"{max_item} bytes", "too_large" if n else "bad_bundle")
        data = read(n)
        if len(data) != n:
            raise _bad("the bundle ends in the middle of an item: it is truncated (copy "
                       "it again)", "truncated")
        item = _parse_item(data, offset, limits)
        offset += 4 + n
        kind = item.kind
        if kind == RECORD:
            records += 1
            if records > limits.max_records:
                raise _bad(f"the bundle holds more than {limits.max_records} records",
                           "too_large")
            if first:
                raise _bad("the bundle does not start with its header item")
            yield item
            continue
        if first != (kind == HEADER):
            raise _bad("the bundle does not start with its header item"
                       if first else "the bundle has a second header item")
        first = False
        if kind == CARD:
            counts["cards"] += 1
            if counts["cards"] > MAX_CARD_ITEMS:
                raise _bad(f"the bundle has more than {MAX_CARD_ITEMS} card items")
        elif kind == CHECKPOINT:
            counts["checkpoints"] += 1
            if counts["checkpoints"] > limits.max_checkpoints:
                raise _bad(f"the bundle holds more than {limits.max_checkpoints} "
                           "checkpoints", "too_large")
        elif kind == COSIGNATURE:
            counts["cosignatures"] += 1
            if counts["cosignatures"] > limits.max_cosignatures:
                raise _bad(f"the bundle holds more than {limits.max_cosignatures} "
                           "cosignatures", "too_large")
        elif kind == KEY_LOG:
            counts["key_logs"] += 1
            if counts["key_logs"] > MAX_KEY_LOG_ITEMS:
                raise _bad(f"the bundle holds more than {MAX_KEY_LOG_ITEMS} key logs",
                           "too_large")
        elif kind in _PROOF_KINDS:
            counts["forks" if kind == FORK else "split_views"] += 1
            if counts["forks"] + counts["split_views"] > limits.max_proofs:
                raise _bad(f"the bundle holds more than {limits.max_proofs} proofs",
                           "too_large")
        elif kind == END:
            counts["records"] = records
            end = item.info
            assert isinstance(end, BundleCounts)
            got = BundleCounts(**counts)
            if got != end:
                diff = ", ".join(f"{k} {getattr(end, k)} listed but {getattr(got, k)} read"
                                 for k in (*_END_FIELDS, *_END_OPTIONAL)
                                 if getattr(end, k) != getattr(got, k))
                raise _bad(f"the bundle's end item does not match its content ({diff}): "
                           "items were removed or added", "bad_counts")
            if read(1):
                raise _bad("the bundle has data after its end item")
            yield item
            return
        yield item


def read_item_at(
    path: str | os.PathLike[str], offset: int, *, limits: BundleLimits = DEFAULT_BUNDLE_LIMITS
) -> Item:
    """Read the one item whose length prefix starts at ``offset`` (an :attr:`Item.offset`
    from :func:`iter_bundle`). Raises as :func:`iter_bundle`."""
    f = _open(path)
    try:
        f.seek(offset)
        n = int.from_bytes(_read_exact(f, 4), "big")
        if not 0 < n <= limits.max_item_bytes:
            raise _bad(f"bundle item at byte {offset} has length {n}", "too_large")
        return _parse_item(_read_exact(f, n), offset, limits)
    except OSError as exc:
        raise CitynodeError(f"cannot read bundle {os.fspath(path)}: "
                            f"{exc.strerror or exc}") from exc
    finally:
        f.close()


# --------------------------------------------------------------------------- export


@dataclass(frozen=True, slots=True)
class ExportSummary:
    """What :func:`export_from_storage` wrote."""

    path: str
    origin: str
    feeds: dict[str, int] = field(default_factory=dict)  # feed -> records written
    counts: BundleCounts = BundleCounts()
    bytes: int = 0
    skipped_proofs: int = 0  # stored proofs of a kind a bundle cannot carry
    # checkpoints held but left out: of a size beyond the records written of their feed
    skipped_checkpoints: int = 0
    # feeds the card written lists of which the bundle holds no record (not held here,
    # or not asked for with ``feeds``)
    card_feeds_not_held: tuple[str, ...] = ()
    # the origin's citynode.erasures feed went in, not asked for, because a feed written
    # holds records its requests erased (the audit checks them against the requests)
    erasures_added: bool = False

    @property
    def has_card(self) -> bool:
        return self.counts.cards >= 1

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "origin": self.origin, "feeds": dict(self.feeds),
                **self.counts.to_json(), "bytes": self.bytes,
                "skipped_proofs": self.skipped_proofs,
                "skipped_checkpoints": self.skipped_checkpoints,
                "card_feeds_not_held": list(self.card_feeds_not_held),
                "erasures_added": self.erasures_added}


def export_from_storage(
    storage: Storage,
    origin: bytes,
    feeds: list[str] | None,
    path: str | os.PathLike[str],
    *,
    card: bytes | None,
    now_ms: int,
) -> ExportSummary:
    """Write a bundle of ``origin``'s records held in ``storage``: every record of
    each feed in seq order, every checkpoint held of those feeds whose size is at most
    the records written of its feed, the witnesses' cosignatures held of those
    checkpoints and the key logs held of those witnesses, and every fork / split-view
    proof held against them.

    A checkpoint of size N proves the origin published seq 1..N, so the audit fails a
    bundle whose records stop before N; a replica may hold a checkpoint newer than its
    records (still catching up): such checkpoints are left out and counted in
    :attr:`ExportSummary.skipped_checkpoints`, so an honest export audits clean.
    Feeds the card lists that the bundle does not hold are named in
    :attr:`ExportSummary.card_feeds_not_held` (the audit warns about them).

    A record whose payload was erased is checked by the audit against the origin's
    erasure request, so whenever a feed written holds one, the origin's whole
    ``citynode.erasures`` feed goes in too, asked for or not (a chain is only verified
    from seq 1): :attr:`ExportSummary.erasures_added` says so.

    ``feeds`` None means every feed of ``origin`` held. ``card``, if given, must be the
    origin's own signed card (checked here, so a bundle never carries a card its
    auditor will reject). Raises :class:`CitynodeError` if a requested feed is not held
    or nothing is held of ``origin``, :class:`InvalidRecord` for a card of another node,
    :class:`StorageError` from reads.
    """
    # A cn2 origin (its key log kept here) by its cn2 id, as its operators give it.
    oid = (identity_id(origin) if storage.get_meta("keylog:" + origin.hex()) is not None
           else node_id(origin))
    held = {f.feed: f.count for f in storage.feeds() if f.origin == origin}
    if feeds is None:
        names = sorted(held)
        if not names:
            raise CitynodeError(f"no records of {oid} are held here: nothing to export")
    else:
        names = sorted(set(feeds))
        missing = [n for n in names if n not in held]
        if missing:
            raise CitynodeError(
                f"no records of feed(s) {', '.join(missing)} of {oid} are held here "
                f"(held: {', '.join(sorted(held)) or 'none'})"
            )
    # The erasure requests behind the tombstones written (see the docstring).
    erasures_added = (ERASURE_FEED in held and ERASURE_FEED not in names
                      and bool(storage.erased_feeds(origin) & set(names)))
    if erasures_added:
        names = sorted([*names, ERASURE_FEED])
    card_feeds: tuple[str, ...] = ()
    if card is not None:
        opened = open_card(card, expected_node_id=None, expected_key=origin,
                           verifier=Verifier())
        card_feeds = tuple(f.name for f in opened.feeds)
    written: dict[str, int] = {}

    def records(name: str) -> Iterator[bytes]:
        n = 0
        for _rowid, env in storage.iter_envelopes(origin, name):
            n += 1
            yield env
        written[name] = n

    wanted = set(names)
    held_cps = [(name, size, root, env) for name in names
                for size, root, env in storage.checkpoints(origin, name)]
    skipped_cps = 0
    cps_written: set[tuple[str, int, bytes]] = set()

    def checkpoints() -> Iterator[bytes]:
        # Consumed after the records (bundle order). Storage keeps each chain contiguous
        # from seq 1 and only appends, so the bundle holds seq 1..written[name] of a feed
        # (at least 1..held[name], the head read above, were it consumed before).
        nonlocal skipped_cps
        for name, size, root, env in held_cps:
            if size <= written.get(name, held[name]):
                cps_written.add((name, size, root))
                yield env
            else:
                skipped_cps += 1

    witnesses: set[bytes] = set()

    def cosignatures() -> Iterator[bytes]:
        # Consumed after the checkpoints: those of exactly the checkpoints written,
        # one checkpoint at a time (at most 64 each), so none is cut short by others.
        for name, size, root, _env in held_cps:
            if (name, size, root) not in cps_written:
                continue
            for _s, r, witness, env in storage.cosignatures(origin, name, size):
                if r == root:
                    witnesses.add(witness)
                    yield env

    def key_logs() -> Iterator[bytes]:
        # Consumed after the cosignatures: the logs held of their (cn2) witnesses.
        for witness in sorted(witnesses)[:MAX_KEY_LOG_ITEMS]:
            log = storage.get_meta(f"keylog:{witness.hex()}")
            # One that cannot fit an item stays out (the auditor may give it: --key-log).
            if log is not None and len(log) + 64 <= DEFAULT_BUNDLE_LIMITS.max_item_bytes:
                yield log

    forks: list[bytes] = []
    splits: list[bytes] = []
    skipped = 0
    for row in storage.fork_proofs():
        if row.origin != origin or row.feed not in wanted:
            continue
        if row.kind == FORK:
            forks.append(row.proof)
        elif row.kind in (SPLIT_VIEW, "split_view"):
            splits.append(row.proof)
        else:
            skipped += 1
    counts = write_bundle(
        path, origin=origin, card=card, card_history=storage.card_history(origin),
        feeds={n: records(n) for n in names},
        checkpoints=checkpoints(), forks=forks, split_views=splits,
        cosignatures=cosignatures(), key_logs=key_logs(), now_ms=now_ms,
    )
    try:
        size = os.path.getsize(path)
    except OSError:
        size = 0
    return ExportSummary(os.fspath(path), oid, {n: written.get(n, 0) for n in names},
                         counts, size, skipped, skipped_cps,
                         tuple(sorted(set(card_feeds) - wanted)), erasures_added)

