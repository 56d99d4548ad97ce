"""Signed checkpoints (Merkle tree heads) over a feed, and the proofs that go with them.

The leaves of a feed's tree are the record ids (32 bytes, SHA-256 of the record body)
of one (origin, feed), in seq order: leaf index ``i`` holds the record at seq ``i + 1``.
Hashing is RFC 9162 §2.1.1 exactly (the Certificate Transparency v2 tree)::

    MTH({})        = SHA-256()
    MTH({d0})      = SHA-256(0x00 || d0)
    MTH(D[n])      = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))
                     where k is the largest power of two smaller than n

Inclusion proofs are RFC 9162 ``PATH`` (§2.1.3.1), consistency proofs are ``PROOF`` /
``SUBPROOF`` (§2.1.4.1); both are verified with the RFC's own algorithms (§2.1.3.2,
§2.1.4.2), which fold the proof hashes into roots without rebuilding any tree.

A **checkpoint** is a signed statement by an origin: "my feed F had N records and its
tree root was R at time T". Its body is a canonical msgpack map::

    feed     str      feed name (same rules as records)
    key      bin(32)  optional: the signing key of a cn2 origin (one its key log holds)
    kind     str      "checkpoint"
    origin   bin(32)  a cn1 origin's Ed25519 public key (which signs), or a cn2
                      origin's identity D (then ``key`` signs)
    root     bin(32)  MTH of the first ``size`` record ids of the feed
    size     int      number of leaves, 0 <= size < 2**62
    time     int      milliseconds since the Unix epoch, UTC
    version  int      1

signed with Ed25519 (by ``key`` when present, else ``origin``) over
``DOMAIN_CHECKPOINT || body``, in the envelope
``[body: bin, signature: bin(64)]`` exactly as records are. Two valid checkpoints of one
origin and feed at the same size with different roots form a :class:`SplitViewProof`:
the origin showed two different histories.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from citynode.core import encoding
from citynode.core.keys import DOMAIN_CHECKPOINT, NodeKey, SigningKey, Verifier
from citynode.core.records import (
    DEFAULT_FUTURE_TOLERANCE_MS,
    KeyStates,
    check_feed_name,
    decode_envelope,
    encode_envelope,
)
from citynode.errors import EncodingError, InvalidProof, InvalidRecord

__all__ = [
    "CHECKPOINT_VERSION",
    "EMPTY_ROOT",
    "HASH_SIZE",
    "MAX_PROOF_HASHES",
    "MAX_TREE_SIZE",
    "TILE_HEIGHT",
    "Checkpoint",
    "ConsistencyProof",
    "InclusionProof",
    "MerkleLog",
    "SplitViewProof",
    "StoredTree",
    "SubtreeSource",
    "decode_consistency",
    "decode_inclusion",
    "encode_consistency",
    "encode_inclusion",
    "leaf_hash",
    "node_hash",
    "open_checkpoint",
    "parse_checkpoint_body",
    "root_of",
    "sign_checkpoint",
    "stored_subtree_hash",
    "subtrees_completed",
    "verify_consistency",
    "verify_inclusion",
    "verify_split_view",
]

HASH_SIZE = 32
MAX_TREE_SIZE = 2**62  # exclusive bound on every tree size and leaf index
MAX_PROOF_HASHES = 64  # a tree below 2**62 leaves never needs more than 62
CHECKPOINT_VERSION = 1
#: A tree kept on disk stores the hashes of its complete subtrees whose height is a
#: positive multiple of this (as the tiles of C2SP tlog-tiles, 256 hashes wide).
TILE_HEIGHT = 8

_sha256 = hashlib.sha256
EMPTY_ROOT: bytes = _sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 leaf hash: ``SHA-256(0x00 || data)``. For citynode ``data`` is a record id."""
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 interior node hash: ``SHA-256(0x01 || left || right)``."""
    return _sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def _check_leaf_id(record_id: object) -> bytes:
    if not isinstance(record_id, bytes) or len(record_id) != HASH_SIZE:
        raise ValueError("a Merkle leaf is a 32-byte record id")
    return record_id


# ---------------------------------------------------------------------------------------
# Building trees and proofs


class _Tree(ABC):
    """The RFC 9162 recursion (MTH, PATH, PROOF) over a tree that can give the hash of
    any complete, aligned subtree (:meth:`_perfect`): subclasses say where those come
    from (memory, or a store on disk)."""

    __slots__ = ()

    @property
    @abstractmethod
    def size(self) -> int:
        """The number of leaves."""

    @abstractmethod
    def _perfect(self, start: int, height: int) -> bytes:
        """Hash of the perfect subtree of ``2**height`` leaves from ``start`` (a multiple
        of ``2**height``), within :attr:`size`."""

    def _size_arg(self, size: int | None) -> int:
        if size is None:
            return self.size
        if type(size) is not int or not 0 <= size <= self.size:
            raise ValueError(f"tree size {size!r} is not between 0 and {self.size}")
        return size

    def _mth(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) for a subtree the RFC recursion can reach.

        Such a range starts at a multiple of a power of two at least its length, so it
        splits into perfect subtrees of decreasing sizes, one per set bit of
        ``end - start``, and MTH folds them from the right.
        """
        parts = []
        pos = start
        while pos < end:
            height = (end - pos).bit_length() - 1
            parts.append(self._perfect(pos, height))
            pos += 1 << height
        r = parts.pop()
        while parts:
            r = _sha256(b"\x01" + parts.pop() + r).digest()
        return r

    def root(self, size: int | None = None) -> bytes:
        """MTH of the first ``size`` leaves (default: all). Raises :class:`ValueError`."""
        size = self._size_arg(size)
        return self._mth(0, size) if size else EMPTY_ROOT

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 ``PATH(index, D[size])``: the audit path of leaf ``index`` in the tree
        of the first ``size`` leaves (default: all), leaf-side first.

        Raises :class:`ValueError` unless ``0 <= index < size <= self.size``.
        """
        size = self._size_arg(size)
        if type(index) is not int or not 0 <= index < size:
            raise ValueError(f"leaf index {index!r} is not below tree size {size}")
        path = []
        lo, hi = 0, size
        while hi - lo > 1:
            k = _split(hi - lo)
            if index < lo + k:
                path.append(self._mth(lo + k, hi))
                hi = lo + k
            else:
                path.append(self._mth(lo, lo + k))
                lo += k
        # Collected root-side first; PATH lists the deepest sibling first.
        path.reverse()
        return path

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """RFC 9162 ``PROOF(old_size, D[new_size])`` (default ``new_size``: all leaves).

        Empty when ``old_size`` is 0 or equals ``new_size`` (nothing to prove beyond the
        roots themselves; :func:`verify_consistency` checks those). Raises
        :class:`ValueError` unless ``0 <= old_size <= new_size <= self.size``.
        """
        new_size = self._size_arg(new_size)
        if type(old_size) is not int or not 0 <= old_size <= new_size:
            raise ValueError(f"old size {old_size!r} is not between 0 and {new_size}")
        if old_size in (0, new_size):
            return []
        proof = []
        lo, hi, m, whole = 0, new_size, old_size, True
        while True:
            n = hi - lo
            if m == n:
                # SUBPROOF(m, D[m], b): {} if b, else {MTH(D[m])}.
                if not whole:
                    proof.append(self._mth(lo, hi))
                break
            k = _split(n)
            if m <= k:
                proof.append(self._mth(lo + k, hi))
                hi = lo + k
            else:
                proof.append(self._mth(lo, lo + k))
                lo += k
                m -= k
                whole = False
        proof.reverse()
        return proof


class MerkleLog(_Tree):
    """An append-only Merkle tree of record ids held in memory, able to answer for any
    past size (for offline tools: a running node keeps its trees on disk, see
    :class:`StoredTree`).

    Every complete (perfect, aligned) subtree hash is kept: ``level h`` holds the hashes
    of the subtrees covering leaves ``[j * 2**h, (j + 1) * 2**h)``, packed 32 bytes each
    in one bytearray per level (about 64 bytes of memory per leaf in total).

    Complexity: ``append`` is amortised O(1) hashes (two per leaf overall);
    ``root(size)``, ``inclusion_proof`` and ``consistency_proof`` are O(log n) hashes
    at any past size, because every subtree of the RFC recursion is either a stored
    perfect subtree or folds from at most ``log2(n)`` of them.

    Arguments outside the tree (an index not below the size, a size above
    :attr:`size`, a leaf that is not 32 bytes) raise :class:`ValueError`: they are the
    caller's mistake, so check untrusted numbers against :attr:`size` first.
    """

    __slots__ = ("_levels",)

    def __init__(self, leaf_ids: Iterable[bytes] = ()) -> None:
        self._levels: list[bytearray] = [bytearray()]
        self.extend(leaf_ids)

    @property
    def size(self) -> int:
        """The number of leaves appended so far."""
        return len(self._levels[0]) >> 5

    def append(self, record_id: bytes) -> int:
        """Append one record id; return its leaf index. Raises :class:`ValueError`."""
        _check_leaf_id(record_id)
        levels = self._levels
        lvl = levels[0]
        lvl += _sha256(b"\x00" + record_id).digest()
        count = len(lvl) >> 5
        index = count - 1
        h = 0
        # An even count at a level means its last two hashes just became a complete
        # pair: hash them into the level above (they sit side by side in the buffer).
        while not count & 1:
            parent = _sha256(b"\x01" + lvl[-64:]).digest()
            h += 1
            if h == len(levels):
                levels.append(bytearray())
            lvl = levels[h]
            lvl += parent
            count = len(lvl) >> 5
        return index

    def extend(self, leaf_ids: Iterable[bytes]) -> None:
        """Append many record ids in order (faster than repeated :meth:`append`).

        Raises :class:`ValueError` before appending anything if one is not 32 bytes.
        """
        ids = list(leaf_ids)
        for rid in ids:
            _check_leaf_id(rid)
        if not ids:
            return
        levels = self._levels
        levels[0] += b"".join([_sha256(b"\x00" + rid).digest() for rid in ids])
        h = 0
        while len(levels[h]) >= 64:
            lower = levels[h]
            if h + 1 == len(levels):
                levels.append(bytearray())
            upper = levels[h + 1]
            done, want = len(upper) >> 5, len(lower) >> 6
            if want > done:
                upper += b"".join(
                    [_sha256(b"\x01" + lower[64 * j : 64 * j + 64]).digest()
                     for j in range(done, want)]
                )
            h += 1

    def _perfect(self, start: int, height: int) -> bytes:
        off = (start >> height) << 5
        return bytes(self._levels[height][off : off + 32])


# ---------------------------------------------------------------------------------------
# Trees kept on disk
#
# A store keeps, per feed, the hash of every complete subtree whose height is a positive
# multiple of TILE_HEIGHT (8, 16, 24, ...): about one hash per 255 leaves, so a feed of
# 10M records costs ~40,000 hashes on disk and nothing in memory. Leaves are not stored
# again: they are the record ids, which the store already holds. Any perfect subtree of
# height h folds from at most 2**(TILE_HEIGHT - 1) stored hashes (or record ids) of the
# level below it, so a root or proof costs O(log n) reads of at most 128 hashes each.


def _fold_perfect(hashes: Sequence[bytes]) -> bytes:
    """The root of a perfect subtree given the ``2**k`` hashes of its nodes at one level,
    left to right (k >= 0)."""
    level = list(hashes)
    while len(level) > 1:
        level = [_sha256(b"\x01" + level[i] + level[i + 1]).digest()
                 for i in range(0, len(level), 2)]
    return level[0]


def subtrees_completed(
    old_size: int, new_size: int, tile_height: int = TILE_HEIGHT
) -> list[tuple[int, int]]:
    """``(height, index)`` of every stored subtree (height a positive multiple of
    ``tile_height``) that becomes complete when a tree grows from ``old_size`` to
    ``new_size`` leaves, lower heights first: each one's children are leaves or stored
    subtrees already complete, or listed before it.

    Raises :class:`ValueError` unless ``0 <= old_size <= new_size``.
    """
    if not 0 <= old_size <= new_size or tile_height < 1:
        raise ValueError(f"cannot grow a tree from {old_size} to {new_size} leaves")
    out: list[tuple[int, int]] = []
    height = tile_height
    while new_size >> height:
        out.extend((height, j) for j in range(old_size >> height, new_size >> height))
        height += tile_height
    return out


def stored_subtree_hash(
    height: int, children: Sequence[bytes], tile_height: int = TILE_HEIGHT
) -> bytes:
    """The hash of the stored subtree of ``height`` (a positive multiple of
    ``tile_height``) from its ``2**tile_height`` children, left to right: record ids
    when ``height == tile_height``, else the stored hashes ``tile_height`` below.

    Raises :class:`ValueError` for a wrong number of children or a leaf not 32 bytes.
    """
    if height < tile_height or height % tile_height or len(children) != 1 << tile_height:
        raise ValueError(f"a stored subtree of height {height} has {1 << tile_height} "
                         f"children, not {len(children)}")
    if height == tile_height:
        return _fold_perfect([_sha256(b"\x00" + _check_leaf_id(c)).digest()
                              for c in children])
    return _fold_perfect(children)


class SubtreeSource(Protocol):
    """Where a :class:`StoredTree` reads from (the node's storage implements it)."""

    def leaf_ids(self, start: int, end: int) -> Sequence[bytes]:
        """The record ids of leaves ``start <= i < end``, in order."""
        ...

    def subtree_hashes(self, height: int, start: int, end: int) -> Sequence[bytes]:
        """The stored hashes at ``height`` of the subtrees ``start <= j < end``, in order."""
        ...


class StoredTree(_Tree):
    """The Merkle tree of the first ``size`` leaves of a feed, read from a store that
    keeps the subtree hashes :func:`subtrees_completed` names (and the record ids): the
    same roots and proofs as :class:`MerkleLog`, with nothing held in memory.

    Each root or proof reads O(log n) ranges of at most ``2**(tile_height - 1)`` hashes
    from ``source``. Arguments outside the tree raise :class:`ValueError`, and so does a
    source that returns fewer hashes than asked (a store that does not hold the tree).
    """

    __slots__ = ("_size", "_source", "_tile")

    def __init__(self, source: SubtreeSource, size: int,
                 tile_height: int = TILE_HEIGHT) -> None:
        if type(size) is not int or not 0 <= size < MAX_TREE_SIZE or tile_height < 1:
            raise ValueError(f"tree size {size!r} is out of range")
        self._source = source
        self._size = size
        self._tile = tile_height

    @property
    def size(self) -> int:
        """The number of leaves of this tree (it answers for any size up to it)."""
        return self._size

    def _perfect(self, start: int, height: int) -> bytes:
        below = height // self._tile * self._tile  # highest stored level at or below
        count = 1 << (height - below)
        first = start >> below
        if below == 0:
            got = self._source.leaf_ids(start, start + count)
            hashes = [_sha256(b"\x00" + _check_leaf_id(rid)).digest() for rid in got]
        else:
            hashes = list(self._source.subtree_hashes(below, first, first + count))
        if len(hashes) != count:
            raise ValueError(f"the store holds {len(hashes)} of the {count} hashes of "
                             f"height {below} from {first}: it does not hold this tree")
        return _fold_perfect(hashes)


def root_of(leaf_ids: Iterable[bytes]) -> bytes:
    """MTH of ``leaf_ids`` (32-byte record ids) in O(n) hashes and O(log n) memory.

    Raises :class:`ValueError` if a leaf is not 32 bytes.
    """
    # Stack of (height, hash) of perfect subtrees, heights strictly decreasing: the
    # binary decomposition of the count so far.
    stack: list[tuple[int, bytes]] = []
    for rid in leaf_ids:
        _check_leaf_id(rid)
        height, h = 0, _sha256(b"\x00" + rid).digest()
        while stack and stack[-1][0] == height:
            h = _sha256(b"\x01" + stack.pop()[1] + h).digest()
            height += 1
        stack.append((height, h))
    if not stack:
        return EMPTY_ROOT
    r = stack.pop()[1]
    while stack:
        r = _sha256(b"\x01" + stack.pop()[1] + r).digest()
    return r


# ---------------------------------------------------------------------------------------
# Verifying proofs (RFC 9162 §2.1.3.2 and §2.1.4.2)


def _check_size(name: str, value: object) -> int:
    if type(value) is not int or not 0 <= value < MAX_TREE_SIZE:
        raise InvalidProof(f"{name} must be an integer from 0 to 2**62 - 1, not {value!r}")
    return value


def _check_hash(name: str, value: object) -> bytes:
    if type(value) is not bytes or len(value) != HASH_SIZE:
        raise InvalidProof(f"{name} must be {HASH_SIZE} bytes")
    return value


def _check_path(proof: object) -> Sequence[bytes]:
    if not isinstance(proof, (list, tuple)):
        raise InvalidProof("a Merkle proof is a list of 32-byte hashes")
    if len(proof) > MAX_PROOF_HASHES:
        raise InvalidProof(
            f"Merkle proof has {len(proof)} hashes, more than the limit of {MAX_PROOF_HASHES}"
        )
    for i, h in enumerate(proof):
        _check_hash(f"proof hash {i}", h)
    return proof


def verify_inclusion(
    leaf_id: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf_id`` is leaf ``index`` of the tree of ``size`` leaves with ``root``.

    RFC 9162 §2.1.3.2. ``root`` and ``size`` must come from a verified checkpoint: the
    proof binds the leaf to the root, and the signature binds the root to the size.
    Returns None on success; raises :class:`InvalidProof` saying what failed.
    """
    _check_hash("leaf id", leaf_id)
    _check_size("leaf index", index)
    _check_size("tree size", size)
    _check_path(proof)
    _check_hash("root", root)
    if index >= size:
        raise InvalidProof(f"leaf index {index} is not below tree size {size}")
    fn, sn = index, size - 1
    r = _sha256(b"\x00" + leaf_id).digest()
    for p in proof:
        if sn == 0:
            raise InvalidProof(
                f"inclusion proof has more hashes than a tree of {size} leaves needs"
            )
        if fn & 1 or fn == sn:
            r = _sha256(b"\x01" + p + r).digest()
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = _sha256(b"\x01" + r + p).digest()
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InvalidProof(f"inclusion proof has fewer hashes than a tree of {size} leaves needs")
    if r != root:
        raise InvalidProof(
            f"inclusion proof does not lead to the root: the record is not leaf {index} "
            f"of this tree of {size} leaves"
        )


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree of ``new_size`` leaves with ``new_root`` extends the tree of
    ``old_size`` leaves with ``old_root`` (append-only: the first ``old_size`` leaves
    are unchanged).

    RFC 9162 §2.1.4.2 for ``0 < old_size < new_size``. The RFC leaves the other cases
    open; here: ``old_size == 0`` needs an empty proof and ``old_root`` equal to
    :data:`EMPTY_ROOT`; ``old_size == new_size`` needs an empty proof and equal roots.
    Returns None on success; raises :class:`InvalidProof` saying what failed.
    """
    _check_size("old size", old_size)
    _check_size("new size", new_size)
    _check_hash("old root", old_root)
    _check_hash("new root", new_root)
    path = list(_check_path(proof))
    if old_size > new_size:
        raise InvalidProof(
            f"old size {old_size} is larger than new size {new_size}: a feed never shrinks"
        )
    if old_size == 0 or old_size == new_size:
        if path:
            raise InvalidProof(
                f"a consistency proof from size {old_size} to {new_size} must be empty"
            )
        if old_size == 0 and old_root != EMPTY_ROOT:
            raise InvalidProof("the root of an empty tree must be SHA-256 of nothing")
        if old_size == new_size and old_root != new_root:
            raise InvalidProof(f"two different roots for the same tree size {new_size}")
        return
    if not path:
        raise InvalidProof(f"consistency proof from size {old_size} to {new_size} is empty")
    if old_size & (old_size - 1) == 0:
        # The old tree is a complete subtree of the new one; PROOF omits its hash.
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise InvalidProof(
                f"consistency proof has more hashes than sizes {old_size} to {new_size} need"
            )
        if fn & 1 or fn == sn:
            fr = _sha256(b"\x01" + c + fr).digest()
            sr = _sha256(b"\x01" + c + sr).digest()
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = _sha256(b"\x01" + sr + c).digest()
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InvalidProof(
            f"consistency proof has fewer hashes than sizes {old_size} to {new_size} need"
        )
    if fr != old_root:
        raise InvalidProof(
            f"consistency proof does not lead to the old root of size {old_size}"
        )
    if sr != new_root:
        raise InvalidProof(
            f"consistency proof does not lead to the new root of size {new_size}: the tree "
            f"of {new_size} leaves does not extend the tree of {old_size}"
        )


# ---------------------------------------------------------------------------------------
# Proofs on the wire

_PROOF_LIMITS = encoding.Limits(max_bytes=4096, max_depth=2, max_items=MAX_PROOF_HASHES + 8)


@dataclass(frozen=True, slots=True)
class InclusionProof:
    """A decoded (not yet verified) inclusion proof: leaf ``index`` in a tree of ``size``."""

    index: int
    size: int
    path: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ConsistencyProof:
    """A decoded (not yet verified) consistency proof from ``old_size`` to ``new_size``."""

    old_size: int
    new_size: int
    path: tuple[bytes, ...]


def _decode_proof_map(data: bytes, kind: str, keys: set[str]) -> dict[str, Any]:
    try:
        v: Any = encoding.decode(data, _PROOF_LIMITS)
    except InvalidRecord as exc:
        raise InvalidProof(f"{kind} proof is not canonical msgpack: {exc}") from exc
    if type(v) is not dict or v.get("kind") != kind or set(v) != keys:
        names = ", ".join(sorted(keys))
        raise InvalidProof(f"{kind} proof must be a map with exactly: {names} (kind {kind!r})")
    return v


def encode_inclusion(index: int, size: int, path: Sequence[bytes]) -> bytes:
    """Canonical msgpack ``{"index": int, "kind": "inclusion", "path": [bin32...],
    "size": int}``. Raises :class:`InvalidProof` for values a receiver would reject."""
    _check_size("leaf index", index)
    _check_size("tree size", size)
    if index >= size:
        raise InvalidProof(f"leaf index {index} is not below tree size {size}")
    _check_path(path)
    return encoding.encode({"kind": "inclusion", "index": index, "size": size,
                            "path": list(path)})


def decode_inclusion(data: bytes) -> InclusionProof:
    """Decode :func:`encode_inclusion` bytes, bounded (at most 64 hashes of 32 bytes,
    sizes below 2**62, index below size). Raises :class:`InvalidProof`."""
    v = _decode_proof_map(data, "inclusion", {"kind", "index", "size", "path"})
    index = _check_size("leaf index", v["index"])
    size = _check_size("tree size", v["size"])
    if index >= size:
        raise InvalidProof(f"leaf index {index} is not below tree size {size}")
    return InclusionProof(index, size, tuple(_check_path(v["path"])))


def encode_consistency(old_size: int, new_size: int, path: Sequence[bytes]) -> bytes:
    """Canonical msgpack ``{"kind": "consistency", "new_size": int, "old_size": int,
    "path": [bin32...]}``. Raises :class:`InvalidProof` for values a receiver would
    reject."""
    _check_size("old size", old_size)
    _check_size("new size", new_size)
    if old_size > new_size:
        raise InvalidProof(f"old size {old_size} is larger than new size {new_size}")
    _check_path(path)
    return encoding.encode({"kind": "consistency", "old_size": old_size,
                            "new_size": new_size, "path": list(path)})


def decode_consistency(data: bytes) -> ConsistencyProof:
    """Decode :func:`encode_consistency` bytes, bounded (at most 64 hashes of 32 bytes,
    sizes below 2**62, old size not above new size). Raises :class:`InvalidProof`."""
    v = _decode_proof_map(data, "consistency", {"kind", "old_size", "new_size", "path"})
    old_size = _check_size("old size", v["old_size"])
    new_size = _check_size("new size", v["new_size"])
    if old_size > new_size:
        raise InvalidProof(f"old size {old_size} is larger than new size {new_size}")
    return ConsistencyProof(old_size, new_size, tuple(_check_path(v["path"])))


# ---------------------------------------------------------------------------------------
# Signed checkpoints

# A body is about 200 bytes (feed names are at most 64 characters).
_BODY_LIMITS = encoding.Limits(max_bytes=1024, max_depth=1, max_items=16)
_FIELDS = frozenset({"kind", "version", "origin", "feed", "size", "root", "time"})


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A verified checkpoint. Only :func:`open_checkpoint` and :func:`sign_checkpoint`
    make them."""

    origin: bytes
    feed: str
    size: int
    root: bytes
    time: int
    body: bytes
    sig: bytes
    key: bytes | None = None  # the signing key of a cn2 origin; None: origin signed

    @property
    def envelope(self) -> bytes:
        """The canonical envelope bytes ``[body, sig]``."""
        return encode_envelope(self.body, self.sig)


def _bad(msg: str, reason: str = "bad_field") -> InvalidRecord:
    return InvalidRecord(msg, reason)


def parse_checkpoint_body(body: bytes) -> dict[str, Any]:
    """Strictly decode a checkpoint body and check every field (no signature, no time
    check). Raises :class:`EncodingError` or :class:`InvalidRecord` with a reason."""
    f = encoding.decode(body, _BODY_LIMITS)
    if type(f) is not dict:
        raise EncodingError("a checkpoint body is a map", "bad_field")
    if f.get("kind") != "checkpoint":
        raise _bad(f"body kind is {f.get('kind')!r}, not 'checkpoint'", "bad_kind")
    version = f.get("version")
    if type(version) is not int or version != CHECKPOINT_VERSION:
        raise _bad(
            f"unknown checkpoint format version {version!r}: this node reads version "
            f"{CHECKPOINT_VERSION}; upgrade citynode if the origin is newer",
            "unknown_version",
        )
    keys = f.keys()
    if not keys >= _FIELDS:
        raise _bad(f"checkpoint lacks field(s): {', '.join(sorted(_FIELDS - keys))}",
                   "missing_field")
    if not keys <= _FIELDS | {"key"}:
        extra = ", ".join(sorted(keys - _FIELDS - {"key"}))
        raise _bad(f"checkpoint has unknown field(s): {extra}", "unknown_field")
    origin = f["origin"]
    if type(origin) is not bytes or len(origin) != 32:
        raise _bad("checkpoint origin must be a 32-byte public key")
    if "key" in f and (type(f["key"]) is not bytes or len(f["key"]) != 32):
        raise _bad("checkpoint key must be a 32-byte public key")
    check_feed_name(f["feed"])
    size = f["size"]
    if type(size) is not int or not 0 <= size < MAX_TREE_SIZE:
        raise _bad(f"checkpoint size must be an integer from 0 to 2**62 - 1, not {size!r}")
    root = f["root"]
    if type(root) is not bytes or len(root) != HASH_SIZE:
        raise _bad("checkpoint root must be a 32-byte hash")
    if size == 0 and root != EMPTY_ROOT:
        raise _bad("a checkpoint of size 0 must carry the empty-tree root (SHA-256 of nothing)")
    t = f["time"]
    if type(t) is not int or t < 0:
        raise _bad("checkpoint time must be a non-negative integer (milliseconds since the epoch)")
    return f


def open_checkpoint(
    envelope_bytes: bytes,
    *,
    verifier: Verifier,
    now_ms: int | None = None,
    future_tolerance_ms: int = DEFAULT_FUTURE_TOLERANCE_MS,
    key_states: KeyStates | None = None,
) -> Checkpoint:
    """Verify a checkpoint envelope completely and return it.

    A checkpoint of a ``cn2`` origin carries ``key``: it is verified by that key, which
    the origin's log held (``key_states``) must let sign the feed up to ``size``, or
    have come in force after it (a new key vouches for older records); a retired key
    beyond its heads, or one the log does not name, is refused with that verdict.

    Checks, cheapest first: envelope shape, strict canonical body within limits, every
    field (feed name rules as for records), time not beyond ``now_ms +
    future_tolerance_ms`` (skipped when ``now_ms`` is None, as for proofs read later),
    the signature over ``DOMAIN_CHECKPOINT || body`` by ``key`` (else ``origin``), then
    ``key``'s verdict (no state of the origin, as for every cn1 origin:
    ``unknown_key``). Raises
    :class:`InvalidRecord` or a subclass (:class:`EncodingError`,
    :class:`SignatureError`) with a ``reason``; nothing else.
    """
    if type(envelope_bytes) is not bytes:
        if not isinstance(envelope_bytes, (bytes, bytearray, memoryview)):
            raise EncodingError("a checkpoint envelope is bytes", "bad_envelope")
        envelope_bytes = bytes(envelope_bytes)
    body, sig = decode_envelope(envelope_bytes, _BODY_LIMITS)
    f = parse_checkpoint_body(body)
    if now_ms is not None and f["time"] > now_ms + future_tolerance_ms:
        raise InvalidRecord(
            f"checkpoint is dated {(f['time'] - now_ms) // 1000} s in the future (tolerance "
            f"{future_tolerance_ms // 1000} s): check the origin's clock",
            "future_time",
        )
    key = f.get("key")
    verifier.verify(f["origin"] if key is None else key, DOMAIN_CHECKPOINT, body, sig)
    if key is not None:
        state = key_states(f["origin"]) if key_states is not None else None
        v = None if state is None else state.key_verdict(key, f["feed"], f["size"])
        if v is None or not (v.valid or v.reason == "before_key"):
            r = "unknown_key" if v is None else v.reason
            raise InvalidRecord(
                f"checkpoint signed by a key its origin's log does not let sign it ({r})",
                "beyond_last_good" if r == "beyond_last_good" else
                "identity_dead" if r == "identity_dead" else "unknown_key")
    return Checkpoint(f["origin"], f["feed"], f["size"], f["root"], f["time"], body, sig, key)


def sign_checkpoint(
    key: SigningKey, feed: str, size: int, root: bytes, time_ms: int
) -> Checkpoint:
    """Build and sign a checkpoint of ``key``'s node. Runs the receiver's field checks
    first, so nothing others would reject is ever signed; raises :class:`InvalidRecord`
    for a bad feed name, size, root or time."""
    ident = key.record_identity if isinstance(key, NodeKey) else None
    fields: dict[str, Any] = {
        "kind": "checkpoint",
        "version": CHECKPOINT_VERSION,
        "origin": key.public_key if ident is None else ident,
        "feed": feed,
        "size": size,
        "root": root,
        "time": time_ms,
    }
    if ident is not None:
        fields["key"] = key.public_key
    body = encoding.encode(fields)
    parse_checkpoint_body(body)
    sig = key.sign(DOMAIN_CHECKPOINT, body)
    return Checkpoint(fields["origin"], feed, size, root, time_ms, body, sig,
                      None if ident is None else key.public_key)


# ---------------------------------------------------------------------------------------
# Split views


@dataclass(frozen=True, slots=True)
class SplitViewProof:
    """Two checkpoint envelopes signed by one origin for the same feed and size with
    different roots: the origin showed two different histories of that feed.

    Anyone can check it offline with :func:`verify_split_view`; no trust in the node
    that produced it is needed.
    """

    a: bytes  # either order verifies; citynode stores the one of canonical()
    b: bytes

    def canonical(self) -> SplitViewProof:
        """The same proof with its envelopes in byte order: nodes that found one split
        view from either side hold, and exchange, one proof."""
        return SplitViewProof(*sorted((self.a, self.b)))

    def encode(self) -> bytes:
        """Canonical msgpack map ``{"a": bin, "b": bin, "kind": "split-view"}``."""
        return encoding.encode({"kind": "split-view", "a": self.a, "b": self.b})

    @staticmethod
    def decode(data: bytes) -> SplitViewProof:
        """Decode a proof's bytes (not yet verified). Raises :class:`InvalidProof`."""
        try:
            v: Any = encoding.decode(data, encoding.Limits(max_bytes=4096, max_depth=1,
                                                           max_items=8))
        except InvalidRecord as exc:
            raise InvalidProof(f"split-view proof is not canonical msgpack: {exc}") from exc
        if (
            type(v) is not dict
            or set(v) != {"kind", "a", "b"}
            or v["kind"] != "split-view"
            or type(v["a"]) is not bytes
            or type(v["b"]) is not bytes
        ):
            raise InvalidProof(
                "split-view proof must be a map {kind: 'split-view', a: bin, b: bin}"
            )
        return SplitViewProof(v["a"], v["b"])


def verify_split_view(
    proof: SplitViewProof, verifier: Verifier, key_states: KeyStates | None = None,
) -> tuple[Checkpoint, Checkpoint]:
    """Check that ``proof`` proves its origin signed two roots for one feed and size;
    return the two checkpoints.

    Both envelopes must verify completely (no future-time check: a proof stays true
    whenever it is read). Raises :class:`InvalidProof` saying why the proof does not hold.
    """
    cps = []
    for name, env in (("a", proof.a), ("b", proof.b)):
        try:
            cps.append(open_checkpoint(env, verifier=verifier, key_states=key_states))
        except InvalidRecord as exc:
            raise InvalidProof(f"checkpoint {name} of the split-view proof is invalid: {exc}") \
                from exc
    a, b = cps
    if a.origin != b.origin:
        raise InvalidProof("the two checkpoints are signed by different origins")
    state = key_states(a.origin) if key_states is not None else None
    if state is not None and any(c.key is not None and c.feed == a.feed
                                 and state.settled(c.key, c.feed, c.size) is not None
                                 for c in (a, b)):
        # A key event retired that key and named the feed's head past this size: the
        # chain ending there is the history, and the retired key's word on it is no
        # longer the identity's (a thief may hold it).
        raise InvalidProof("a checkpoint of the proof is by a retired key at a size a key "
                           "event of its origin settled (the named head is the history "
                           "there): it proves no split view of the identity",
                           "settled_by_key_event")
    if a.feed != b.feed:
        raise InvalidProof(f"the two checkpoints are of different feeds ({a.feed!r}, {b.feed!r})")
    if a.size != b.size:
        raise InvalidProof(
            f"the two checkpoints are at different sizes ({a.size}, {b.size}): a split view "
            "needs the same size (use a consistency proof across sizes)"
        )
    if a.root == b.root:
        raise InvalidProof(f"the two checkpoints agree on the root at size {a.size}")
    return a, b
