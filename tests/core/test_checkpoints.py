"""Merkle trees, proofs and signed checkpoints (citynode.core.checkpoints).

The tree code is checked three ways: a naive recursive implementation of the RFC 9162
definitions written here (MTH, PATH, PROOF/SUBPROOF), the published Certificate
Transparency reference vectors (which pin that naive implementation to the rest of the
world), and tampering probes that must all fail verification.
"""

from __future__ import annotations

import contextlib
import hashlib
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from citynode.core import encoding
from citynode.core.checkpoints import (
    EMPTY_ROOT,
    MAX_PROOF_HASHES,
    MAX_TREE_SIZE,
    TILE_HEIGHT,
    Checkpoint,
    ConsistencyProof,
    InclusionProof,
    MerkleLog,
    SplitViewProof,
    StoredTree,
    decode_consistency,
    decode_inclusion,
    encode_consistency,
    encode_inclusion,
    open_checkpoint,
    root_of,
    sign_checkpoint,
    stored_subtree_hash,
    subtrees_completed,
    verify_consistency,
    verify_inclusion,
    verify_split_view,
)
from citynode.core.keys import DOMAIN_CHECKPOINT, DOMAIN_RECORD, SigningKey, Verifier
from citynode.core.records import encode_envelope
from citynode.errors import EncodingError, InvalidProof, InvalidRecord, SignatureError

# ---------------------------------------------------------------------------------------
# The RFC 9162 definitions, naively (recursion over Python lists of leaf data)


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def largest_pow2_below(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(d: list[bytes]) -> bytes:
    if not d:
        return sha(b"")
    if len(d) == 1:
        return sha(b"\x00" + d[0])
    k = largest_pow2_below(len(d))
    return sha(b"\x01" + mth(d[:k]) + mth(d[k:]))


def path(m: int, d: list[bytes]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = largest_pow2_below(len(d))
    if m < k:
        return [*path(m, d[:k]), mth(d[k:])]
    return [*path(m - k, d[k:]), mth(d[:k])]


def subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    if m == len(d):
        return [] if b else [mth(d)]
    k = largest_pow2_below(len(d))
    if m <= k:
        return [*subproof(m, d[:k], b), mth(d[k:])]
    return [*subproof(m - k, d[k:], False), mth(d[:k])]


def proof(m: int, d: list[bytes]) -> list[bytes]:
    return subproof(m, d, True)


# ---------------------------------------------------------------------------------------
# Certificate Transparency reference vectors (RFC 6962 tree; leaves are raw data here)

CT_LEAVES = [bytes.fromhex(h) for h in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
)]
CT_ROOTS = [bytes.fromhex(h) for h in (
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
)]
# (index, size, path)
CT_INCLUSION = [
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (1, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]
# (old_size, new_size, proof)
CT_CONSISTENCY = [
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]


def test_naive_definitions_match_ct_vectors() -> None:
    for n in range(9):
        assert mth(CT_LEAVES[:n]) == CT_ROOTS[n]
    for index, size, hexes in CT_INCLUSION:
        assert path(index, CT_LEAVES[:size]) == [bytes.fromhex(h) for h in hexes]
    for m, n, hexes in CT_CONSISTENCY:
        assert proof(m, CT_LEAVES[:n]) == [bytes.fromhex(h) for h in hexes]


def test_verify_consistency_accepts_ct_vectors() -> None:
    for m, n, hexes in CT_CONSISTENCY:
        verify_consistency(m, n, CT_ROOTS[m], CT_ROOTS[n], [bytes.fromhex(h) for h in hexes])


def test_empty_root_is_sha256_of_nothing() -> None:
    assert CT_ROOTS[0] == EMPTY_ROOT
    assert MerkleLog().root() == EMPTY_ROOT
    assert root_of([]) == EMPTY_ROOT


# ---------------------------------------------------------------------------------------
# MerkleLog against the naive definitions, exhaustively for sizes 1..70

N = 70
IDS = [sha(b"record %d" % i) for i in range(N)]
LOG = MerkleLog(IDS)
ROOTS = [mth(IDS[:n]) for n in range(N + 1)]


def test_roots_match_naive_for_every_size() -> None:
    by_append = MerkleLog()
    for n in range(N + 1):
        assert LOG.root(n) == ROOTS[n], n
        assert root_of(IDS[:n]) == ROOTS[n], n
        assert by_append.size == n
        assert by_append.root() == ROOTS[n], n
        if n < N:
            assert by_append.append(IDS[n]) == n
    assert LOG.size == N
    assert LOG.root() == ROOTS[N]


def test_extend_in_pieces_equals_one_build() -> None:
    log = MerkleLog()
    for lo, hi in ((0, 3), (3, 4), (4, 4), (4, 33), (33, 70)):
        log.extend(IDS[lo:hi])
        assert log.root() == ROOTS[hi]
    assert [log.root(n) for n in range(N + 1)] == ROOTS


def test_inclusion_proofs_match_path_and_verify() -> None:
    for n in range(1, N + 1):
        for i in range(n):
            p = LOG.inclusion_proof(i, n)
            assert p == path(i, IDS[:n]), (i, n)
            assert verify_inclusion(IDS[i], i, n, p, ROOTS[n]) is None
    assert LOG.inclusion_proof(5) == path(5, IDS)


def test_consistency_proofs_match_proof_and_verify() -> None:
    for n in range(0, N + 1):
        for m in range(0, n + 1):
            p = LOG.consistency_proof(m, n)
            assert p == (proof(m, IDS[:n]) if 0 < m < n else []), (m, n)
            assert verify_consistency(m, n, ROOTS[m], ROOTS[n], p) is None
    assert LOG.consistency_proof(7) == proof(7, IDS)


def test_builder_rejects_arguments_outside_the_tree() -> None:
    with pytest.raises(ValueError):
        LOG.root(N + 1)
    with pytest.raises(ValueError):
        LOG.inclusion_proof(N)
    with pytest.raises(ValueError):
        LOG.inclusion_proof(3, 3)
    with pytest.raises(ValueError):
        LOG.inclusion_proof(-1)
    with pytest.raises(ValueError):
        LOG.consistency_proof(5, 4)
    with pytest.raises(ValueError):
        LOG.consistency_proof(1, N + 1)
    log = MerkleLog()
    with pytest.raises(ValueError):
        log.append(b"\x00" * 31)
    with pytest.raises(ValueError):
        log.extend([IDS[0], b"short"])
    assert log.size == 0  # nothing appended when one id of a batch is bad
    with pytest.raises(ValueError):
        root_of([IDS[0], "not bytes"])  # type: ignore[list-item]


# ---------------------------------------------------------------------------------------
# StoredTree: the same roots and proofs from stored subtree hashes (as storage keeps them)


class DictStore:
    """A store as storage.py keeps one: the record ids, plus every subtree hash that
    ``subtrees_completed`` names, computed with ``stored_subtree_hash`` as the tree
    grows in uneven steps. Counts what it is asked for."""

    def __init__(self, ids: list[bytes], tile: int, steps: tuple[int, ...] = (1, 7, 64)) -> None:
        self.ids = ids
        self.tile = tile
        self.hashes: dict[tuple[int, int], bytes] = {}
        self.reads = 0
        size, k = 0, 0
        while size < len(ids):
            new = min(len(ids), size + steps[k % len(steps)])
            for height, j in subtrees_completed(size, new, tile):
                n = 1 << tile
                if height == tile:
                    children = ids[j << height: (j << height) + n]
                else:
                    children = [self.hashes[(height - tile, c)]
                                for c in range(j << tile, (j << tile) + n)]
                self.hashes[(height, j)] = stored_subtree_hash(height, children, tile)
            size, k = new, k + 1

    def leaf_ids(self, start: int, end: int) -> list[bytes]:
        self.reads += 1
        return self.ids[start:end]

    def subtree_hashes(self, height: int, start: int, end: int) -> list[bytes]:
        self.reads += 1
        return [self.hashes[(height, j)] for j in range(start, end) if (height, j) in self.hashes]


@pytest.mark.parametrize("tile", [1, 2, 3])
def test_stored_tree_gives_the_same_roots_and_proofs_as_merkle_log(tile: int) -> None:
    store = DictStore(IDS, tile)
    tree = StoredTree(store, N, tile)
    assert tree.size == N
    for n in range(N + 1):
        assert tree.root(n) == ROOTS[n], n
        for i in range(n):
            assert tree.inclusion_proof(i, n) == LOG.inclusion_proof(i, n), (i, n)
        for m in range(n + 1):
            assert tree.consistency_proof(m, n) == LOG.consistency_proof(m, n), (m, n)


def test_stored_tree_at_the_default_tile_height() -> None:
    ids = [sha(i.to_bytes(4, "big")) for i in range(70_000)]
    log = MerkleLog(ids)
    store = DictStore(ids, TILE_HEIGHT, steps=(1000, 1, 333))
    assert len(store.hashes) == 70_000 // 256 + 70_000 // 65536
    tree = StoredTree(store, len(ids))
    for n in (1, 255, 256, 257, 65_535, 65_536, 65_537, 70_000):
        assert tree.root(n) == log.root(n), n
        for i in (0, n // 3, n - 1):
            store.reads = 0
            assert tree.inclusion_proof(i, n) == log.inclusion_proof(i, n), (i, n)
            # O(log n) reads, not O(n): one per perfect subtree of the path at most.
            assert store.reads <= 2 * n.bit_length(), (i, n, store.reads)
        for m in (1, n // 2, n - 1):
            if m:
                assert tree.consistency_proof(m, n) == log.consistency_proof(m, n), (m, n)


def test_subtrees_completed_lists_each_stored_subtree_once_children_first() -> None:
    seen: list[tuple[int, int]] = []
    for old, new in ((0, 3), (3, 4), (4, 4), (4, 17), (17, 64), (64, 65)):
        seen += subtrees_completed(old, new, 2)
    assert seen == [(2, 0), (2, 1), (2, 2), (2, 3), (4, 0), (2, 4), (2, 5), (2, 6), (2, 7),
                    (2, 8), (2, 9), (2, 10), (2, 11), (2, 12), (2, 13), (2, 14), (2, 15),
                    (4, 1), (4, 2), (4, 3), (6, 0)]
    with pytest.raises(ValueError):
        subtrees_completed(5, 4)


def test_stored_tree_refuses_a_store_that_lacks_the_tree() -> None:
    store = DictStore(IDS[:40], 2)
    tree = StoredTree(store, N, 2)  # claims more than the store holds
    assert tree.root(40) == ROOTS[40]
    with pytest.raises(ValueError, match="does not hold this tree"):
        tree.root(N)
    with pytest.raises(ValueError):
        tree.root(N + 1)
    with pytest.raises(ValueError):
        StoredTree(store, -1)
    with pytest.raises(ValueError):
        stored_subtree_hash(2, IDS[:3], 2)  # four children, not three
    with pytest.raises(ValueError):
        stored_subtree_hash(3, IDS[:4], 2)  # not a stored height


# ---------------------------------------------------------------------------------------
# Tampered proofs fail (the probes the Certificate Transparency verifier tests use)

SOME_HASH = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")


def _flip(h: bytes, bit: int = 3) -> bytes:
    return bytes([h[0] ^ (1 << bit)]) + h[1:]


def _inclusion_probes(
    leaf: bytes, i: int, n: int, p: list[bytes], root: bytes
) -> list[tuple[str, tuple[object, ...]]]:
    probes: list[tuple[str, tuple[object, ...]]] = [
        ("index - 1", (leaf, i - 1, n, p, root)),
        ("index + 1", (leaf, i + 1, n, p, root)),
        ("index ^ 2", (leaf, i ^ 2, n, p, root)),
        ("size * 2", (leaf, i, n * 2, p, root)),
        ("size // 2", (leaf, i, n // 2, p, root)),
        ("wrong leaf", (sha(b"other"), i, n, p, root)),
        ("empty root", (leaf, i, n, p, EMPTY_ROOT)),
        ("random root", (leaf, i, n, p, SOME_HASH)),
        ("short root", (leaf, i, n, p, root[:31])),
        ("trailing garbage", (leaf, i, n, [*p, b""], root)),
        ("trailing root", (leaf, i, n, [*p, root], root)),
        ("preceding garbage", (leaf, i, n, [b"", *p], root)),
        ("preceding root", (leaf, i, n, [root, *p], root)),
    ]
    for j in range(len(p)):
        probes.append((f"flipped proof[{j}]", (leaf, i, n, [*p[:j], _flip(p[j]), *p[j + 1:]],
                                               root)))
        probes.append((f"proof[{j}] byte 31", (leaf, i, n,
                                               [*p[:j], p[j][:31] + bytes([p[j][31] ^ 1]),
                                                *p[j + 1:]], root)))
    if p:
        probes.append(("truncated", (leaf, i, n, p[:-1], root)))
    if len(p) > 1:
        probes.append(("inserted", (leaf, i, n, [p[0], SOME_HASH, *p[1:]], root)))
    return probes


def test_every_tampered_inclusion_proof_fails() -> None:
    for n in range(1, N + 1):
        for i in range(n):
            p = LOG.inclusion_proof(i, n)
            for desc, args in _inclusion_probes(IDS[i], i, n, p, ROOTS[n]):
                with pytest.raises(InvalidProof):
                    verify_inclusion(*args)  # type: ignore[arg-type]
                    pytest.fail(f"size {n} index {i}: {desc} verified")


def _consistency_probes(
    m: int, n: int, r1: bytes, r2: bytes, p: list[bytes]
) -> list[tuple[str, tuple[object, ...]]]:
    probes: list[tuple[str, tuple[object, ...]]] = [
        ("old - 1", (m - 1, n, r1, r2, p)),
        ("old + 1", (m + 1, n, r1, r2, p)),
        ("old ^ 2", (m ^ 2, n, r1, r2, p)),
        ("new * 2", (m, n * 2, r1, r2, p)),
        ("new // 2", (m, n // 2, r1, r2, p)),
        ("wrong old root", (m, n, SOME_HASH, r2, p)),
        ("wrong new root", (m, n, r1, SOME_HASH, p)),
        ("swapped roots", (m, n, r2, r1, p)),
        ("empty proof", (m, n, r1, r2, [])),
        ("trailing garbage", (m, n, r1, r2, [*p, b""])),
        ("trailing old root", (m, n, r1, r2, [*p, r1])),
        ("trailing new root", (m, n, r1, r2, [*p, r2])),
        ("preceding garbage", (m, n, r1, r2, [b"", *p])),
        ("preceding old root", (m, n, r1, r2, [r1, *p])),
        ("preceding new root", (m, n, r1, r2, [r2, *p])),
        ("preceding proof[0]", (m, n, r1, r2, [p[0], *p])),
        ("truncated", (m, n, r1, r2, p[:-1])),
    ]
    for j in range(len(p)):
        probes.append((f"flipped proof[{j}]", (m, n, r1, r2,
                                               [*p[:j], _flip(p[j], 4), *p[j + 1:]])))
    return probes


def test_every_tampered_consistency_proof_fails() -> None:
    for n in range(2, N + 1):
        for m in range(1, n):
            p = LOG.consistency_proof(m, n)
            for desc, args in _consistency_probes(m, n, ROOTS[m], ROOTS[n], p):
                with pytest.raises(InvalidProof):
                    verify_consistency(*args)  # type: ignore[arg-type]
                    pytest.fail(f"sizes {m}->{n}: {desc} verified")


def test_consistency_edge_cases() -> None:
    r5 = ROOTS[5]
    verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    verify_consistency(0, 5, EMPTY_ROOT, r5, [])
    verify_consistency(5, 5, r5, r5, [])
    cases = [
        (0, 5, r5, r5, []),  # size 0 with a non-empty root
        (0, 0, EMPTY_ROOT, r5, []),
        (0, 5, EMPTY_ROOT, r5, [r5]),  # nothing to prove from an empty tree
        (5, 5, r5, ROOTS[4], []),  # split view: same size, two roots
        (5, 5, r5, r5, [r5]),
        (6, 5, ROOTS[6], r5, []),  # shrinking
        (-1, 5, EMPTY_ROOT, r5, []),
        (1, MAX_TREE_SIZE, ROOTS[1], r5, [r5]),
        (True, 5, ROOTS[1], r5, LOG.consistency_proof(1, 5)),  # bool is not a size
        (1, 5, ROOTS[1], r5, tuple(LOG.consistency_proof(1, 5)) + (SOME_HASH,) * 64),
        (1, 5, ROOTS[1], r5, "not a list"),
    ]
    for args in cases:
        with pytest.raises(InvalidProof):
            verify_consistency(*args)  # type: ignore[arg-type]
            pytest.fail(f"{args[:2]} verified")


def test_inclusion_edge_cases() -> None:
    verify_inclusion(IDS[0], 0, 1, [], ROOTS[1])
    verify_inclusion(IDS[3], 3, 4, tuple(LOG.inclusion_proof(3, 4)), ROOTS[4])
    for args in [
        (IDS[0], 0, 0, [], EMPTY_ROOT),
        (IDS[0], 0, 1, [], EMPTY_ROOT),
        (IDS[0], 1, 1, [], ROOTS[1]),
        (IDS[0][:31], 0, 1, [], ROOTS[1]),
        (IDS[0], 0, MAX_TREE_SIZE, [], ROOTS[1]),
        (IDS[0], 0, 1, [SOME_HASH] * (MAX_PROOF_HASHES + 1), ROOTS[1]),
        (IDS[0], 0, 2, [bytearray(IDS[1])], ROOTS[2]),
    ]:
        with pytest.raises(InvalidProof):
            verify_inclusion(*args)  # type: ignore[arg-type]
            pytest.fail(f"{args[1:3]} verified")


# ---------------------------------------------------------------------------------------
# Hypothesis: larger random trees against the naive definitions

leaf_lists = st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=300)


@settings(max_examples=40, deadline=None)
@given(leaf_lists, st.data())
def test_random_trees_match_naive(ids: list[bytes], data: st.DataObject) -> None:
    log = MerkleLog(ids)
    n = len(ids)
    assert log.root() == mth(ids) == root_of(ids)
    i = data.draw(st.integers(0, n - 1), "index")
    size = data.draw(st.integers(i + 1, n), "size")
    root = log.root(size)
    p = log.inclusion_proof(i, size)
    assert p == path(i, ids[:size])
    verify_inclusion(ids[i], i, size, p, root)
    m = data.draw(st.integers(0, size), "old size")
    c = log.consistency_proof(m, size)
    assert c == (proof(m, ids[:size]) if 0 < m < size else [])
    verify_consistency(m, size, log.root(m), root, c)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 200), st.data())
def test_random_byte_flip_breaks_proofs(n: int, data: st.DataObject) -> None:
    log = MerkleLog([sha(b"%d" % k) for k in range(n)])
    i = data.draw(st.integers(0, n - 1))
    p = log.inclusion_proof(i)
    j = data.draw(st.integers(0, len(p) - 1))
    byte = data.draw(st.integers(0, 31))
    bit = data.draw(st.integers(0, 7))
    bad = bytearray(p[j])
    bad[byte] ^= 1 << bit
    with pytest.raises(InvalidProof):
        verify_inclusion(sha(b"%d" % i), i, n, [*p[:j], bytes(bad), *p[j + 1:]], log.root())
    m = data.draw(st.integers(1, n - 1))
    c = log.consistency_proof(m)
    j = data.draw(st.integers(0, len(c) - 1))
    bad = bytearray(c[j])
    bad[byte] ^= 1 << bit
    with pytest.raises(InvalidProof):
        verify_consistency(m, n, log.root(m), log.root(), [*c[:j], bytes(bad), *c[j + 1:]])


# ---------------------------------------------------------------------------------------
# Proof encodings


def test_inclusion_encoding_round_trip() -> None:
    p = LOG.inclusion_proof(17, 50)
    data = encode_inclusion(17, 50, p)
    assert encoding.decode(data) == {"kind": "inclusion", "index": 17, "size": 50, "path": p}
    assert decode_inclusion(data) == InclusionProof(17, 50, tuple(p))
    assert decode_inclusion(encode_inclusion(0, 1, [])) == InclusionProof(0, 1, ())


def test_consistency_encoding_round_trip() -> None:
    p = LOG.consistency_proof(17, 50)
    data = encode_consistency(17, 50, p)
    assert encoding.decode(data) == {"kind": "consistency", "old_size": 17, "new_size": 50,
                                     "path": p}
    assert decode_consistency(data) == ConsistencyProof(17, 50, tuple(p))
    assert decode_consistency(encode_consistency(0, 0, [])) == ConsistencyProof(0, 0, ())


def _enc(v: object) -> bytes:
    return encoding.encode(v)


H = SOME_HASH


@pytest.mark.parametrize("value", [
    {"kind": "inclusion", "index": 0, "size": 1},  # no path
    {"kind": "inclusion", "index": 0, "size": 1, "path": [], "extra": 1},
    {"kind": "consistency", "index": 0, "size": 1, "path": []},
    {"kind": "inclusion", "index": 1, "size": 1, "path": []},
    {"kind": "inclusion", "index": -1, "size": 1, "path": []},
    {"kind": "inclusion", "index": 0, "size": MAX_TREE_SIZE, "path": []},
    {"kind": "inclusion", "index": 0, "size": 2, "path": [H[:31]]},
    {"kind": "inclusion", "index": 0, "size": 2, "path": ["x" * 32]},
    {"kind": "inclusion", "index": 0, "size": 2, "path": H},
    {"kind": "inclusion", "index": 0, "size": 2, "path": [H] * 65},
    {"kind": "inclusion", "index": 0.0, "size": 2, "path": []},
    [0, 1, []],
])
def test_decode_inclusion_rejects(value: object) -> None:
    with pytest.raises(InvalidProof):
        decode_inclusion(_enc(value))


@pytest.mark.parametrize("value", [
    {"kind": "consistency", "old_size": 2, "new_size": 1, "path": []},
    {"kind": "consistency", "old_size": 0, "new_size": MAX_TREE_SIZE, "path": []},
    {"kind": "consistency", "old_size": 1, "new_size": 2, "path": [H] * 65},
    {"kind": "consistency", "old_size": 1, "new_size": 2, "path": [[H]]},
    {"kind": "inclusion", "old_size": 1, "new_size": 2, "path": [H]},
    {"kind": "consistency", "old_size": 1, "new_size": 2},
])
def test_decode_consistency_rejects(value: object) -> None:
    with pytest.raises(InvalidProof):
        decode_consistency(_enc(value))


def test_proof_decoders_reject_non_canonical_and_oversized_bytes() -> None:
    good = encode_inclusion(0, 2, [H])
    # Same map with a non-shortest integer for index (0xcc 0x00 instead of 0x00).
    bad = good.replace(b"\xa5index\x00", b"\xa5index\xcc\x00")
    assert bad != good
    with pytest.raises(InvalidProof):
        decode_inclusion(bad)
    with pytest.raises(InvalidProof):
        decode_inclusion(good + b"\x00")
    with pytest.raises(InvalidProof):
        decode_consistency(b"\xc1")
    with pytest.raises(InvalidProof):
        decode_consistency(b"\x00" * 5000)
    with pytest.raises(InvalidProof):
        encode_inclusion(2, 2, [])
    with pytest.raises(InvalidProof):
        encode_consistency(0, 1, [H[:5]])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_proof_decoders_raise_only_invalid_proof(data: bytes) -> None:
    for decode in (decode_inclusion, decode_consistency, SplitViewProof.decode):
        with contextlib.suppress(InvalidProof):
            decode(data)


# ---------------------------------------------------------------------------------------
# Signed checkpoints

KEY = SigningKey(bytes(range(32)))
OTHER = SigningKey(bytes(range(1, 33)))
T0 = 1_700_000_000_000


def _cp(key: SigningKey = KEY, feed: str = "air.quality", size: int = 50,
        root: bytes | None = None, t: int = T0) -> Checkpoint:
    return sign_checkpoint(key, feed, size, ROOTS[size] if root is None else root, t)


def _fields(cp: Checkpoint) -> dict[str, object]:
    f = encoding.decode(cp.body)
    assert isinstance(f, dict)
    return f


def _resign(fields: dict[str, object], key: SigningKey = KEY,
            domain: bytes = DOMAIN_CHECKPOINT) -> bytes:
    body = encoding.encode(fields)
    return encode_envelope(body, key.sign(domain, body))


def test_checkpoint_round_trip() -> None:
    cp = _cp()
    assert _fields(cp) == {"kind": "checkpoint", "version": 1, "origin": KEY.public_key,
                           "feed": "air.quality", "size": 50, "root": ROOTS[50], "time": T0}
    v = Verifier()
    got = open_checkpoint(cp.envelope, verifier=v, now_ms=T0)
    assert got == cp
    assert (got.origin, got.feed, got.size, got.root, got.time) == (
        KEY.public_key, "air.quality", 50, ROOTS[50], T0)
    assert v.count == 1
    assert open_checkpoint(bytearray(cp.envelope), verifier=v) == cp  # type: ignore[arg-type]
    empty = sign_checkpoint(KEY, "air.quality", 0, EMPTY_ROOT, T0)
    assert open_checkpoint(empty.envelope, verifier=v).size == 0


def test_checkpoint_signature_and_body_tampering_rejected() -> None:
    cp = _cp()
    env = cp.envelope
    v = Verifier()
    bad_sig = env[:-1] + bytes([env[-1] ^ 1])
    with pytest.raises(SignatureError):
        open_checkpoint(bad_sig, verifier=v)
    # Same body bytes re-signed for another purpose, or by another key.
    with pytest.raises(SignatureError):
        open_checkpoint(encode_envelope(cp.body, KEY.sign(DOMAIN_RECORD, cp.body)), verifier=v)
    with pytest.raises(SignatureError):
        open_checkpoint(encode_envelope(cp.body, OTHER.sign(DOMAIN_CHECKPOINT, cp.body)),
                        verifier=v)
    # A changed field under the original signature.
    for field, value in (("size", 49), ("root", ROOTS[49]), ("time", T0 + 1),
                         ("feed", "air.qualitx")):
        body = encoding.encode({**_fields(cp), field: value})
        with pytest.raises(SignatureError):
            open_checkpoint(encode_envelope(body, cp.sig), verifier=v)
    # Every single-byte change of the envelope is rejected, one way or another.
    for pos in range(len(env)):
        mutated = env[:pos] + bytes([env[pos] ^ 0x20]) + env[pos + 1:]
        with pytest.raises(InvalidRecord):
            open_checkpoint(mutated, verifier=v)
            pytest.fail(f"byte {pos} changed and the checkpoint still opened")


@pytest.mark.parametrize(("change", "reason"), [
    ({"kind": "record"}, "bad_kind"),
    ({"version": 2}, "unknown_version"),
    ({"version": True}, "unknown_version"),
    ({"extra": 1}, "unknown_field"),
    ({"origin": b"\x00" * 31}, "bad_field"),
    ({"feed": "Air Quality"}, "bad_field"),
    ({"size": -1}, "bad_field"),
    ({"size": MAX_TREE_SIZE}, "bad_field"),
    ({"size": 0}, "bad_field"),  # size 0 with a non-empty root
    ({"root": b"\x00" * 33}, "bad_field"),
    ({"root": "00" * 32}, "bad_field"),
    ({"time": -5}, "bad_field"),
    ({"time": 1.5}, "bad_field"),
])
def test_checkpoint_field_checks(change: dict[str, object], reason: str) -> None:
    with pytest.raises(InvalidRecord) as info:
        open_checkpoint(_resign({**_fields(_cp()), **change}), verifier=Verifier())
    assert info.value.reason == reason
    assert not isinstance(info.value, SignatureError)


def test_checkpoint_missing_field_and_wrong_shapes() -> None:
    v = Verifier()
    fields = _fields(_cp())
    del fields["time"]
    with pytest.raises(InvalidRecord) as info:
        open_checkpoint(_resign(fields), verifier=v)
    assert info.value.reason == "missing_field"
    with pytest.raises(EncodingError):
        open_checkpoint(_resign([1, 2]), verifier=v)  # type: ignore[arg-type]
    with pytest.raises(EncodingError):
        open_checkpoint(b"\x92\xc4\x00", verifier=v)
    with pytest.raises(EncodingError):
        open_checkpoint("not bytes", verifier=v)  # type: ignore[arg-type]
    with pytest.raises(EncodingError):
        open_checkpoint(_cp().envelope + b"\x00", verifier=v)
    # A non-canonical body (size as uint16 instead of a positive fixint) is refused
    # before its signature is checked.
    body = _cp().body
    bad = body.replace(b"\xa4size\x32", b"\xa4size\xcd\x00\x32")
    assert bad != body
    with pytest.raises(EncodingError):
        open_checkpoint(encode_envelope(bad, KEY.sign(DOMAIN_CHECKPOINT, bad)), verifier=v)
    assert v.count == 0


def test_checkpoint_future_time() -> None:
    cp = _cp(t=T0 + 16 * 60 * 1000)
    v = Verifier()
    with pytest.raises(InvalidRecord) as info:
        open_checkpoint(cp.envelope, verifier=v, now_ms=T0)
    assert info.value.reason == "future_time"
    assert open_checkpoint(cp.envelope, verifier=v, now_ms=T0,
                           future_tolerance_ms=20 * 60 * 1000) == cp
    assert open_checkpoint(cp.envelope, verifier=v) == cp  # no clock: no future check
    assert open_checkpoint(_cp(t=T0 + 15 * 60 * 1000).envelope, verifier=v, now_ms=T0)


@pytest.mark.parametrize("args", [
    ("Bad Feed", 1, ROOTS[1], T0),
    ("feed", -1, ROOTS[1], T0),
    ("feed", 0, ROOTS[1], T0),
    ("feed", 1, ROOTS[1][:31], T0),
    ("feed", 1, ROOTS[1], -1),
])
def test_sign_checkpoint_refuses_what_receivers_reject(args: tuple[str, int, bytes, int]) -> None:
    with pytest.raises(InvalidRecord):
        sign_checkpoint(KEY, *args)


# ---------------------------------------------------------------------------------------
# Split-view proofs


def test_split_view_valid() -> None:
    a, b = _cp(root=ROOTS[50]), _cp(root=sha(b"another history"), t=T0 + 5)
    proof_ = SplitViewProof(a.envelope, b.envelope)
    data = proof_.encode()
    assert encoding.decode(data) == {"kind": "split-view", "a": a.envelope, "b": b.envelope}
    assert SplitViewProof.decode(data) == proof_
    assert verify_split_view(SplitViewProof.decode(data), Verifier()) == (a, b)


@pytest.mark.parametrize(("b_args", "message"), [
    ({"t": T0 + 5}, "agree on the root"),  # same root, other time
    ({}, "agree on the root"),  # the very same checkpoint
    ({"feed": "water.level", "root": SOME_HASH}, "different feeds"),
    ({"key": OTHER, "root": SOME_HASH}, "different origins"),
    ({"size": 49, "root": SOME_HASH}, "different sizes"),
])
def test_split_view_invalid(b_args: dict[str, object], message: str) -> None:
    a = _cp()
    b = _cp(**b_args)  # type: ignore[arg-type]
    with pytest.raises(InvalidProof, match=message):
        verify_split_view(SplitViewProof(a.envelope, b.envelope), Verifier())


def test_split_view_with_a_bad_checkpoint_is_invalid() -> None:
    a, b = _cp(), _cp(root=SOME_HASH)
    forged = b.envelope[:-1] + bytes([b.envelope[-1] ^ 1])
    with pytest.raises(InvalidProof, match="checkpoint b"):
        verify_split_view(SplitViewProof(a.envelope, forged), Verifier())
    with pytest.raises(InvalidProof, match="checkpoint a"):
        verify_split_view(SplitViewProof(b"junk", b.envelope), Verifier())
    # A checkpoint dated far in the future still proves a split view (read later).
    late = _cp(root=SOME_HASH, t=T0 + 10**12)
    verify_split_view(SplitViewProof(a.envelope, late.envelope), Verifier())


@pytest.mark.parametrize("value", [
    {"kind": "fork", "a": b"x", "b": b"y"},
    {"kind": "split-view", "a": b"x"},
    {"kind": "split-view", "a": b"x", "b": "y"},
    {"kind": "split-view", "a": b"x", "b": b"y", "c": b""},
    [b"x", b"y"],
])
def test_split_view_decode_rejects(value: object) -> None:
    with pytest.raises(InvalidProof):
        SplitViewProof.decode(_enc(value))


# ---------------------------------------------------------------------------------------
# Speed: a regression guard against quadratic work (the figure itself is ~0.25 s)


def test_hundred_thousand_leaves_quickly() -> None:
    ids = [sha(i.to_bytes(4, "big")) for i in range(100_000)]
    start = time.perf_counter()
    log = MerkleLog()
    for rid in ids:
        log.append(rid)
    root = log.root()
    p = log.inclusion_proof(54_321)
    elapsed = time.perf_counter() - start
    verify_inclusion(ids[54_321], 54_321, 100_000, p, root)
    assert root == root_of(ids)
    assert elapsed < 5.0, f"building 100,000 leaves took {elapsed:.2f} s"
