#!/usr/bin/env python3
"""Deterministic generator of the version 2 identity vectors (docs/PROTOCOL.md, "Key
events and witnesses (version 2 identity)").

``python tests/vectors/generate_keylog.py`` rewrites, byte for byte identically:

* ``keylog.json``  the worked example of a cn2 id; key logs to verify from the id alone
  (valid histories, a forged rotation by a stolen key, a recovery without the recovery
  key, and one log per structural fault) with the expected state or reason; key
  verdicts after a recovery (backdated records by the superseded key); pairs of
  logs (held, received) with the expected decision; and cards of the identity judged
  by the log held (a card signed by a key a recovery retired is refused);
  The ``signature/*`` logs carry key events signed by hand on the edge of the strict
  Ed25519 rules (small-order keys and R, non-canonical encodings, S out of range), with
  the curve arithmetic of ``generate.py``; ``equation_holds`` says whether the plain
  RFC 8032 equation holds for the last event (so a lax verifier, openssl's, accepts it);
* ``cosign.json``  a checkpoint, cosignatures of it (valid, bad signature, non-witness,
  another checkpoint) with the quorum verdicts, and a split view between two witnesses.

Kept apart from ``generate.py`` (a separate file, a separate test:
``tests/core/test_keylog_vectors.py``). Bodies are built here field by field, and ids,
commitments and checksums computed here with hashlib; the expected verdicts are written
out by hand, never computed by the code under test.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from citynode.core import encoding
from citynode.core.keys import DOMAIN_CHECKPOINT, SigningKey

HERE = Path(__file__).resolve().parent

T0 = 1_735_689_600_000  # 2025-01-01T00:00:00Z
NOW = T0 + 3_600_000

DOMAIN_KEY_EVENT = b"citynode/key-event/v1\x00"
DOMAIN_IDENTITY = b"citynode/identity/v1\x00"
DOMAIN_COMMIT = b"citynode/key-commitment/v1\x00"
DOMAIN_COSIGNATURE = b"citynode/cosignature/v1\x00"
ID_CHECKSUM_DOMAIN = b"citynode/node-id/v2"

# Signing keys K0.. (K0 is origin A of the other vectors), recovery keys Q0.., a thief's X.
K = [SigningKey(bytes([1]) * 32), SigningKey(bytes([2]) * 32),
     *(SigningKey(bytes([0x10 + i]) * 32) for i in range(2, 8))]
Q = [SigningKey(bytes([0x40 + i]) * 32) for i in range(3)]
X = SigningKey(bytes([0x66]) * 32)
WITNESSES = [SigningKey(bytes([0x70 + i]) * 32) for i in range(3)]


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def commit(key: SigningKey) -> bytes:
    return sha(DOMAIN_COMMIT + key.public_key)


def cn2(identity: bytes) -> str:
    raw = identity + sha(ID_CHECKSUM_DOMAIN + identity)[:3]
    return "cn2" + base64.b32encode(raw).decode("ascii").lower()


def envelope(body: bytes, sig: bytes) -> bytes:
    """0x92, bin(body) with the shortest header, c4 40, signature."""
    n = len(body)
    head = (b"\xc4" + bytes([n]) if n < 0x100 else b"\xc5" + n.to_bytes(2, "big")
            if n < 0x10000 else b"\xc6" + n.to_bytes(4, "big"))
    return b"\x92" + head + body + b"\xc4\x40" + sig


def rid(n: int) -> bytes:
    """The stand-in record id of seq ``n`` of a feed."""
    return sha(b"citynode vector record %d" % n)


class Ev:
    """One event as built here: its body, envelope and id."""

    def __init__(self, signer: SigningKey, fields: dict[str, Any]) -> None:
        self.fields = {"kind": "key-event", "version": 1, **fields}
        self.body = encoding.encode(self.fields)
        self.env = envelope(self.body, signer.sign(DOMAIN_KEY_EVENT, self.body))
        self.id = sha(self.body)


def inception(time: int = T0) -> Ev:
    return Ev(K[0], {"type": "inception", "seq": 0, "time": time, "key": K[0].public_key,
                     "next": commit(K[1]), "recovery": commit(Q[0])})


INC = inception()
D = sha(DOMAIN_IDENTITY + INC.body)


def rotation(after: Ev, signer: SigningKey, key: SigningKey, nxt: SigningKey, time: int,
             heads: dict[str, list[Any]], **over: Any) -> Ev:
    f = {"type": "rotation", "seq": after.fields["seq"] + 1, "time": time, "identity": D,
         "prev": after.id, "key": key.public_key, "next": commit(nxt), "heads": heads}
    return Ev(signer, {**f, **over})


def recovery(prev: Ev, q: SigningKey, key: SigningKey, nxt: SigningKey, q_next: SigningKey,
             time: int, heads: dict[str, list[Any]]) -> Ev:
    return Ev(q, {"type": "recovery", "seq": prev.fields["seq"] + 1, "time": time,
                  "identity": D, "prev": prev.id, "key": key.public_key, "next": commit(nxt),
                  "recovery": commit(q_next), "recovery_key": q.public_key, "heads": heads})


# The histories: R1 (K0 -> K1, air up to 10), R2 (K1 -> K2, air up to 20, water up to 5).
R1 = rotation(INC, K[1], K[1], K[2], T0 + 60_000, {"air": [10, rid(10)]})
R2 = rotation(R1, K[2], K[2], K[3], T0 + 120_000,
              {"air": [20, rid(20)], "water": [5, rid(105)]})
# K1 and K2 are stolen: the thief rotates to their own key, claiming air up to 90.
THIEF = rotation(R1, K[2], K[2], X, T0 + 130_000, {"air": [90, rid(90)]})
# The owner recovers from R1 (the last good event) with Q0, keeping air up to 15.
REC = recovery(R1, Q[0], K[4], K[5], Q[1], T0 + 180_000, {"air": [15, rid(15)]})
# A second, different recovery from R1 by Q0: the recovery key used twice.
REC2 = recovery(R1, Q[0], K[6], K[7], Q[2], T0 + 190_000, {})


def hexes(*evs: Ev) -> list[str]:
    return [e.env.hex() for e in evs]


def state(seq: int, key: SigningKey, nxt: SigningKey, q: SigningKey, head: Ev) -> dict[str, Any]:
    return {"seq": seq, "key_hex": key.public_key.hex(), "next_hex": commit(nxt).hex(),
            "recovery_hex": commit(q).hex(), "head_id_hex": head.id.hex()}


def err(reason: str) -> dict[str, str]:
    return {"error": reason}


def _resigned(ev: Ev, signer: SigningKey, **over: Any) -> Ev:
    return Ev(signer, {**{k: v for k, v in ev.fields.items() if k not in ("kind", "version")},
                       **over})


# --------------------------------------------------------------------------- Ed25519 edges


def _curve() -> ModuleType:
    """generate.py, for its curve arithmetic (written there by hand, never the code under
    test) and libsodium's list of small-order encodings."""
    spec = importlib.util.spec_from_file_location("citynode_record_vectors",
                                                  HERE / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def commit_raw(public_key: bytes) -> bytes:
    return sha(DOMAIN_COMMIT + public_key)


def _edge_h(r: bytes, a: bytes, body: bytes, c: ModuleType) -> int:
    h = hashlib.sha512(r + a + DOMAIN_KEY_EVENT + body).digest()
    return int.from_bytes(h, "little") % int(c._L)


def _edge_ground(make: Callable[[int], dict[str, Any]], key: bytes, r: bytes,
                 ok: Callable[[int], bool], c: ModuleType) -> bytes:
    """The first event body made by ``make(t)`` (t = 0, 1, .. moves its time) whose h
    satisfies ``ok(h)``: h depends on the whole body, so a few tries meet any condition
    mod 8."""
    for t in range(256):
        body = encoding.encode({"kind": "key-event", "version": 1, **make(t)})
        if ok(_edge_h(r, key, body, c)):
            return body
    raise AssertionError("no body found")


def _residue(n: int, want: int) -> Callable[[int], bool]:
    return lambda h: h % n == want


def _edge_inception(key: bytes, nxt: bytes, rec: bytes) -> Callable[[int], dict[str, Any]]:
    return lambda t: {"type": "inception", "seq": 0, "time": T0 + t, "key": key,
                      "next": nxt, "recovery": rec}


def signature_edge_logs() -> list[dict[str, Any]]:
    """Key event logs whose last event is signed on the edge of the strict Ed25519
    rules (docs/PROTOCOL.md, 'Signature'); the same cases as records.json's
    signature/*, for key events."""
    c = _curve()
    out: list[dict[str, Any]] = []
    bs = err("bad_signature")
    a = c._scalar(K[0].seed)
    pub_a = K[0].public_key
    s32 = c._s
    nk1, rq0 = commit(K[1]), commit(Q[0])

    def case(name: str, note: str, events: list[bytes], signer: bytes, *, holds: bool,
             expect: dict[str, Any]) -> None:
        first = events[0]
        assert first[:2] == b"\x92\xc4"  # an inception body is under 256 bytes
        ident = sha(DOMAIN_IDENTITY + first[3:3 + first[2]])
        out.append({"name": name, "description": note, "node_id": cn2(ident),
                    "events_hex": [e.hex() for e in events], "now_ms": NOW,
                    "expect": expect, "signer_hex": signer.hex(), "equation_holds": holds})

    # A small-order key: S = k, R = [k]B and h a multiple of the key's order make the
    # plain equation hold for anyone, on any body: a forgery, refused.
    small = c._small_order_encodings()
    for label, key in small:
        order = c._order(c._decode(key))
        k = c._nonce("key-event " + label)
        r = c._encode(c._mul(k, c._B))
        body = _edge_ground(_edge_inception(key, nk1, rq0), key, r,
                            _residue(order, 0), c)
        case(f"signature/small-order-key/{label}",
             f"An inception naming key {key.hex()}, a point of order {order} (blocked), "
             "signed with R = [k]B, S = k, h a multiple of the order: the plain equation "
             "holds for anyone. Refused.", [envelope(body, r + s32(k))], key,
             holds=True, expect=bs)

    # A small-order R = T: the key A' = [a]B - T and h = 1 mod the order of T give
    # [S]B - [h]A' = [h]T = T with S = h*a (A itself when T is the identity).
    for label, r in small:
        t = c._decode(r)
        n = c._order(t)
        key = pub_a if n == 1 else c._encode(c._add(c._mul(a, c._B), c._neg(t)))
        body = _edge_ground(_edge_inception(key, nk1, rq0), key, r,
                            _residue(n, 1 % n), c)
        holds = c._encode(t) == r
        case(f"signature/small-order-r/{label}",
             f"An inception whose signature has R = {r.hex()}, a point of order {n} "
             "(blocked); " + ("the plain equation holds: refused for R alone." if holds
                              else "not the canonical encoding of its point either."),
             [envelope(body, r + s32(_edge_h(r, key, body, c) * a % c._L))], key,
             holds=holds, expect=bs)

    # Non-canonical keys and R, S out of range, on the worked example's inception.
    y3 = (c._P + 3).to_bytes(32, "little")
    k = c._nonce("key-event non-canonical-key")
    kb = c._encode(c._mul(k, c._B))
    for name, key, note in (
        ("non-canonical-key", y3, "names key y = p + 3 (y >= p: y = 3 written "
         "non-canonically)"),
        ("key-not-a-point", (2).to_bytes(32, "little"), "names key y = 2, not a point"),
    ):
        body = encoding.encode({"kind": "key-event", "version": 1,
                                **_edge_inception(key, nk1, rq0)(0)})
        case(f"signature/{name}", f"An inception that {note}. Refused.",
             [envelope(body, kb + s32(k))], key, holds=False, expect=bs)
    honest = K[0].sign(DOMAIN_KEY_EVENT, INC.body)
    s_honest = int.from_bytes(honest[32:], "little")
    assert s_honest < c._L
    case("signature/non-canonical-r", "The worked example's inception with R = y = p + 3 "
         "(non-canonical) and its S. Refused.", [envelope(INC.body, y3 + honest[32:])],
         pub_a, holds=False, expect=bs)
    for label, s, holds, note in (
        ("s-plus-l", s_honest + c._L, True, "its S + L: the equation holds mod L, but "
         "S >= L."),
        ("s-equals-l", c._L, False, "S = L exactly."),
        ("s-max", 2**256 - 1, False, "S = 2^256 - 1."),
        ("s-l-minus-1", c._L - 1, False, "S = L - 1: in range, the equation fails."),
    ):
        case(f"signature/{label}", f"The worked example's inception signed with {note} "
             "Refused.", [envelope(INC.body, honest[:32] + s32(s))], pub_a, holds=holds,
             expect=bs)

    # A key with a torsion part (order 8L) is not refused (no subgroup check).
    t8 = c._decode(bytes.fromhex(c.SMALL_ORDER_Y[2][1]))
    mixed = c._encode(c._add(c._mul(a, c._B), t8))
    k = c._nonce("key-event mixed-order-key")
    r = c._encode(c._mul(k, c._B))
    body = _edge_ground(_edge_inception(mixed, nk1, rq0), mixed, r, lambda h: h % 8 == 0, c)
    case("signature/mixed-order-key-valid",
         "An inception naming key A + T, T of order 8 (not a blocked encoding), h a "
         "multiple of 8, S = k + h*a: valid. Verifiers MUST NOT add a subgroup check.",
         [envelope(body, r + s32((k + _edge_h(r, mixed, body, c) * a) % c._L))], mixed,
         holds=True, expect={"seq": 0, "key_hex": mixed.hex(), "next_hex": nk1.hex(),
                             "recovery_hex": rq0.hex(), "head_id_hex": sha(body).hex()})

    # The signer of a later event: a rotation's new key, a recovery's recovery key, each
    # pre-committed by an honest inception and small-order: the rotation or recovery is
    # a forgery anyone could sign.
    tkey = bytes.fromhex(c.SMALL_ORDER_Y[3][1])
    k = c._nonce("key-event later-signer")
    r = c._encode(c._mul(k, c._B))
    for name, what, nxt, rec in (
        ("rotation-by-small-order-key", "a rotation to", commit_raw(tkey), rq0),
        ("recovery-by-small-order-key", "a recovery by", nk1, commit_raw(tkey)),
    ):
        inc = Ev(K[0], {"type": "inception", "seq": 0, "time": T0, "key": pub_a,
                        "next": nxt, "recovery": rec})
        ident = sha(DOMAIN_IDENTITY + inc.body)
        later = {"seq": 1, "identity": ident, "prev": inc.id, "heads": {}}
        if name.startswith("rotation"):
            def make(t: int, later: dict[str, Any] = later) -> dict[str, Any]:
                return {**later, "type": "rotation", "time": T0 + 60_000 + t, "key": tkey,
                        "next": commit(K[2])}
        else:
            def make(t: int, later: dict[str, Any] = later) -> dict[str, Any]:
                return {**later, "type": "recovery", "time": T0 + 60_000 + t,
                        "key": K[4].public_key, "next": commit(K[5]),
                        "recovery": commit(Q[1]), "recovery_key": tkey}
        body = _edge_ground(make, tkey, r, lambda h: h % 8 == 0, c)
        case(f"signature/{name}",
             f"An honest inception pre-committing {tkey.hex()} (order 8), then {what} "
             "that key, signed with R = [k]B, S = k, h a multiple of 8: a forgery anyone "
             "could sign. Refused.", [inc.env, envelope(body, r + s32(k))], tkey,
             holds=True, expect=bs)
    return out


def wide_logs() -> list[dict[str, Any]]:
    """A rotation whose heads make its body longer than 65535 bytes (a bin32 header in
    its envelope): valid, so every envelope header width occurs in the vectors."""
    heads = {f"f{n:03d}-" + "x" * 59: [n + 1, rid(n + 1)] for n in range(700)}
    rot = rotation(INC, K[1], K[1], K[2], T0 + 60_000, heads)
    assert len(rot.body) > 0xFFFF and rot.env[1] == 0xC6
    return [{"name": "rotation-heads-over-64-kib", "description": "A rotation naming 700 "
             "feed heads (64-character names): a body of more than 65535 bytes, so its "
             "envelope has a bin32 header.", "node_id": cn2(D),
             "events_hex": hexes(INC, rot), "now_ms": NOW,
             "expect": state(1, K[1], K[2], Q[0], rot)}]


DOMAIN_RECORD = b"citynode/record/v1\x00"


def record_v3(signer: SigningKey, named: SigningKey, feed: str, seq: int, time: int,
              n: int | None = None, prev: bytes | None = None) -> bytes:
    """The envelope of a record of D (body version 3) naming ``named`` as its key,
    signed by ``signer``; a fixed salt; data ``{"n": n}`` (default: the seq); ``prev``
    the stand-in id of the seq before unless given."""
    payload = encoding.encode({"data": {"n": seq if n is None else n}, "salt": bytes(16)})
    body = {"data_digest": sha(payload), "feed": feed, "key": named.public_key,
            "origin": D, "seq": seq, "time": time, "type": "org.example.Test", "version": 3}
    if seq > 1:
        body["prev"] = rid(seq - 1) if prev is None else prev
    b = encoding.encode(body)
    return encoding.encode([b, signer.sign(DOMAIN_RECORD, b), payload])


def checkpoint_v3(key: SigningKey, size: int, root: bytes, time: int) -> bytes:
    """A checkpoint of D's feed air (a cn2 origin: it names its signing ``key``)."""
    f = {"kind": "checkpoint", "version": 1, "origin": D, "feed": "air", "size": size,
         "root": root, "time": time, "key": key.public_key}
    body = encoding.encode(f)
    return envelope(body, key.sign(DOMAIN_CHECKPOINT, body))


def settled_cases() -> list[dict[str, Any]]:
    """Fork and split-view proofs of D against a log: statements of a retired key
    inside the window a key event closed prove nothing about the identity (the chain
    ending at the named head is its history there); the key in force still answers
    for its own."""
    def fork(a: bytes, b: bytes) -> bytes:
        x, y = sorted((a, b))
        return encoding.encode({"kind": "fork", "a": x, "b": y})

    def split(a: bytes, b: bytes) -> bytes:
        x, y = sorted((a, b))
        return encoding.encode({"kind": "split-view", "a": x, "b": y})

    def r(key: SigningKey, seq: int, n: int, prev: bytes | None = None) -> bytes:
        return record_v3(key, key, "air", seq, T0 + seq, n, prev)

    settled = err("settled_by_key_event")
    root = [sha(b"citynode vector root %d" % i) for i in range(3)]
    cases = [
        ("k0-fork-before-any-key-event", "Two K0 records at air seq 5 while K0 is in force: "
         "a fork of the identity.", "inception", "fork", fork(r(K[0], 5, 5), r(K[0], 5, 55)),
         "valid"),
        ("k0-fork-after-rotation-and-recovery", "The same two records once R1 named air "
         "head 10 (K0's window closed): at most one is on the chain ending at it.",
         "recovery-after-theft", "fork", fork(r(K[0], 5, 5), r(K[0], 5, 55)), settled),
        ("stolen-k1-fork-backdated", "The thief's K1 signs a second air seq 12, dated a day "
         "before the inception, inside the window (10, 15] the recovery settled.",
         "recovery-after-theft", "fork",
         fork(r(K[1], 12, 12), record_v3(K[1], K[1], "air", 12, T0 - 86_400_000, 1212)),
         settled),
        ("stolen-k1-prev-mismatch", "K1's seq 13 not linking to K1's seq 12, both inside "
         "the settled window.", "recovery-after-theft", "fork",
         fork(r(K[1], 12, 12), r(K[1], 13, 13, sha(b"off the chain"))), settled),
        ("k4-fork", "Two K4 records at air seq 16: K4 is in force, its fork stands.",
         "recovery-after-theft", "fork", fork(r(K[4], 16, 16), r(K[4], 16, 1616)), "valid"),
        ("k0-split-view-in-force", "Two K0 checkpoints of air at size 5 with different "
         "roots while K0 is in force.", "inception", "split-view",
         split(checkpoint_v3(K[0], 5, root[0], T0 + 1),
               checkpoint_v3(K[0], 5, root[1], T0 + 2)), "valid"),
        ("stolen-k1-split-view", "Two K1 checkpoints of air at size 12 with different "
         "roots: the recovery settled (10, 15].", "recovery-after-theft", "split-view",
         split(checkpoint_v3(K[1], 12, root[0], NOW), checkpoint_v3(K[1], 12, root[1], NOW)),
         settled),
        ("stolen-k1-against-k4", "K1's checkpoint at size 12 against K4's of the same size "
         "(a new key vouches for older records): the retired key's word is not the "
         "identity's.", "recovery-after-theft", "split-view",
         split(checkpoint_v3(K[1], 12, root[0], NOW), checkpoint_v3(K[4], 12, root[1], NOW)),
         settled),
        ("k4-split-view", "Two K4 checkpoints at size 16: K4 answers for them.",
         "recovery-after-theft", "split-view",
         split(checkpoint_v3(K[4], 16, root[0], NOW), checkpoint_v3(K[4], 16, root[2], NOW)),
         "valid"),
    ]
    return [{"name": n, "description": d, "log": log, "kind": k, "proof_hex": p.hex(),
             "expect": x} for n, d, log, k, p, x in cases]


DOMAIN_CARD = b"citynode/card/v1\x00"


def card_v2(signer: SigningKey, log: list[Ev], time: int) -> bytes:
    """The envelope of a card of D (version 2) carrying ``log`` (its wire bytes: a
    msgpack array of the event envelopes), no feeds, no partners, signed by
    ``signer``."""
    body = encoding.encode({
        "feeds": [], "keylog": encoding.encode([e.env for e in log]), "kind": "card",
        "name": "D", "node": D, "partners": [], "software": "citynode/0.1.0",
        "time": time, "url": "https://d.example", "version": 2})
    return envelope(body, signer.sign(DOMAIN_CARD, body))


def card_cases() -> list[dict[str, Any]]:
    """Cards of D judged by the log the receiver holds after offering it the card's own
    log (docs/PROTOCOL.md, Wiring: Cards): "current" (signed by the key in force: the
    node's card), "past" (by a key a rotation retired, dated no later than that
    rotation: card history only) or refused, key_not_in_force."""
    refused = err("key_not_in_force")
    cases = [
        ("k4-after-recovery", "K4, put in force by the recovery, signs D's card.",
         "recovery-after-theft", K[4], [INC, R1, REC], NOW, "current"),
        ("stolen-k1-after-recovery", "The thief's K1 signs a card carrying the log of "
         "before the recovery (it verifies from the id alone and puts K1 in force), dated "
         "after the recovery: the receiver keeps its log and refuses the card.",
         "recovery-after-theft", K[1], [INC, R1], NOW, refused),
        ("stolen-k1-backdated", "The same, dated before the recovery (the thief can "
         "backdate): a key a recovery retired signs no card, whatever its time.",
         "recovery-after-theft", K[1], [INC, R1], T0 + 100_000, refused),
        ("thief-rotation-branch", "K2 signs a card carrying the thief's rotation, which "
         "the recovery held supersedes: K2 is no key of the held log.",
         "recovery-after-theft", K[2], [INC, R1, THIEF], NOW, refused),
        ("k0-at-its-rotation", "K0 signs a card dated at the time of R1, the rotation "
         "that retired it: its honest card of before the rotation, history only.",
         "recovery-after-theft", K[0], [INC], T0 + 60_000, "past"),
        ("k0-after-its-rotation", "K0 signs a card dated 1 ms after R1 retired it.",
         "recovery-after-theft", K[0], [INC], T0 + 60_001, refused),
        ("k1-extends-held", "K1 signs a card whose log extends the held one (the "
         "inception): the log is taken, K1 is in force.", "inception", K[1], [INC, R1],
         T0 + 70_000, "current"),
        ("k1-before-r2", "K1 signs a card dated before R2 retired it (held: two "
         "rotations).", "two-rotations", K[1], [INC, R1], T0 + 100_000, "past"),
    ]
    return [{"name": n, "description": d, "held": h, "card_hex": card_v2(k, log, t).hex(),
             "now_ms": NOW, "expect": x} for n, d, h, k, log, t, x in cases]


def keylog_file() -> dict[str, Any]:
    forged_k1 = _resigned(R1, K[0])  # the stolen current key signs the planned rotation
    forged_x = rotation(INC, X, X, X, T0 + 60_000, {})  # or rotates to the thief's key
    rec_by_x = recovery(INC, X, K[4], K[5], Q[1], T0 + 60_000, {})
    logs = [
        ("inception", "The inception alone.", [INC], state(0, K[0], K[1], Q[0], INC)),
        ("two-rotations", "Two planned rotations: K0 -> K1 -> K2.", [INC, R1, R2],
         state(2, K[2], K[3], Q[0], R2)),
        ("recovery-after-theft", "K1 and K2 stolen; the owner recovers from seq 1 with Q0, "
         "naming K4, committing to K5 and Q1, keeping air up to seq 15.", [INC, R1, REC],
         state(2, K[4], K[5], Q[1], REC)),
        ("thief-rotation", "The thief's rotation (K2 was stolen with K1): valid on its own; "
         "see 'compare' for why the recovery beats it.", [INC, R1, THIEF],
         state(2, K[2], X, Q[0], THIEF)),
        ("forged-rotation-stolen-key", "A thief holding only K0 signs the planned rotation "
         "with it: the rotation is signed by the new key.", [INC, forged_k1],
         err("bad_signature")),
        ("forged-rotation-own-key", "A thief rotates to their own key, self-signed: it was "
         "not pre-committed.", [INC, forged_x], err("not_precommitted")),
        ("recovery-without-recovery-key", "A recovery signed by a key that does not hash "
         "to the recovery commitment.", [INC, rec_by_x], err("bad_recovery")),
        ("no-inception", "A log that does not start with its inception.", [R1],
         err("key_event_order")),
        ("gap", "Seq 2 right after seq 0.", [INC, R2], err("key_event_order")),
        ("replayed-event", "Seq 1 twice.", [INC, R1, R1], err("key_event_order")),
        ("time-goes-back", "A rotation dated before the inception.",
         [INC, rotation(INC, K[1], K[1], K[2], T0 - 1, {})], err("key_event_order")),
        ("bad-prev", "A rotation naming another prev.",
         [INC, rotation(INC, K[1], K[1], K[2], T0 + 1, {}, prev=sha(b"x"))], err("bad_prev")),
        ("wrong-identity", "A rotation naming another identity.",
         [INC, rotation(INC, K[1], K[1], K[2], T0 + 1, {}, identity=sha(b"x"))],
         err("wrong_identity")),
        ("heads-regress", "A rotation whose air head goes back from 10 to 9.",
         [INC, R1, rotation(R1, K[2], K[2], K[3], T0 + 120_000, {"air": [9, rid(9)]})],
         err("heads_regress")),
        ("key-reused", "A recovery naming K0 again as its signing key.",
         [INC, recovery(INC, Q[0], K[0], K[5], Q[1], T0 + 1, {})], err("key_reused")),
        ("rotation-to-revealed-recovery-key", "A recovery that commits its next key to "
         "Q0, the recovery key it reveals, then a rotation to Q0: every key the log "
         "reveals is used once.",
         [INC, (rq := recovery(INC, Q[0], K[4], Q[0], Q[1], T0 + 1, {})),
          rotation(rq, Q[0], Q[0], K[5], T0 + 2, {})], err("key_reused")),
        ("recovery-by-a-signing-key", "A recovery putting K4 in force and committing to K4 "
         "as the next recovery key, then a recovery by K4: a key that signed cannot "
         "recover.",
         [INC, (rk := recovery(INC, Q[0], K[4], K[5], K[4], T0 + 1, {})),
          recovery(rk, K[4], K[6], K[7], Q[1], T0 + 2, {})], err("key_reused")),
        ("future-dated", "A rotation dated beyond now_ms + 900000.",
         [INC, rotation(INC, K[1], K[1], K[2], NOW + 900_001, {})], err("future_time")),
        ("other-inception", "An inception of another identity.",
         [Ev(K[3], {"type": "inception", "seq": 0, "time": T0, "key": K[3].public_key,
                    "next": commit(K[1]), "recovery": commit(Q[0])})],
         err("wrong_identity")),
    ]
    k0, k1, k2, k4 = (k.public_key.hex() for k in (K[0], K[1], K[2], K[4]))
    verdicts = [
        # After recovery-after-theft. Record times are shown to make the point: the
        # verdict never reads them.
        (k0, "air", 10, rid(10), T0, "valid"),
        (k0, "air", 10, rid(11), T0, "wrong_head"),
        (k0, "air", 11, None, T0, "beyond_last_good"),
        (k1, "air", 10, None, T0, "before_key"),
        (k1, "air", 15, rid(15), T0 + 100_000, "valid"),
        (k1, "air", 16, None, T0 + 100_000, "beyond_last_good"),
        (k1, "air", 17, None, T0 - 86_400_000, "beyond_last_good"),  # backdated a day
        (k1, "water", 1, None, T0, "beyond_last_good"),  # a feed the recovery did not name
        (k2, "air", 16, None, T0 + 100_000, "unknown_key"),  # the thief's rotation's key
        (X.public_key.hex(), "air", 16, None, T0, "unknown_key"),
        (k4, "air", 15, None, T0 + 200_000, "before_key"),
        (k4, "air", 16, None, T0 + 200_000, "valid"),
        (k4, "water", 1, None, T0 + 200_000, "valid"),
    ]
    key_fork_proof = {"kind": "key-fork", "prefix": [INC.env, R1.env],
                      "a": [min(R2.env, THIEF.env)], "b": [max(R2.env, THIEF.env)]}
    dead_proof = {"kind": "recovery-equivocation", "prefix": [INC.env, R1.env],
                  "a": [min(REC.env, REC2.env)], "b": [max(REC.env, REC2.env)]}
    compare = [
        ("truncated", [INC, R1, R2], [INC, R1], "stale", "stale_key_log", None),
        ("replayed-inception", [INC, R1], [INC], "stale", "stale_key_log", None),
        ("same", [INC, R1], [INC, R1], "same", None, None),
        ("extends", [INC, R1], [INC, R1, R2], "extends", None, None),
        ("recovery-beats-thief", [INC, R1, THIEF], [INC, R1, REC], "recovered", None, None),
        ("thief-after-recovery", [INC, R1, REC], [INC, R1, THIEF], "superseded",
         "superseded_key_log", None),
        ("key-fork", [INC, R1, R2], [INC, R1, THIEF], "key-fork", "key_fork",
         encoding.encode(key_fork_proof)),
        ("recovery-equivocation", [INC, R1, REC], [INC, R1, REC2], "dead",
         "recovery_equivocation", encoding.encode(dead_proof)),
    ]
    checksum = sha(ID_CHECKSUM_DOMAIN + D)[:3]
    # Records of D (body version 3) against the log 'recovery-after-theft' (air: K0 up
    # to 10, K1 up to 15, then K4). Built field by field here, not by the code under
    # test; prev is a stand-in (chains are another check).
    records = [
        ("k0-valid", "K0 signs air seq 5, inside its window.", K[0], K[0], "air", 5, T0,
         "valid"),
        ("k1-valid", "K1 signs air seq 14, inside its window (10, 15].", K[1], K[1], "air",
         14, T0 + 100_000, "valid"),
        ("k4-valid", "K4, put in force by the recovery, signs air seq 16.", K[4], K[4],
         "air", 16, T0 + 200_000, "valid"),
        ("k0-beyond", "K0 signs air seq 12, after the rotation closed it at 10.", K[0], K[0],
         "air", 12, T0, "beyond_last_good"),
        ("stolen-k1-backdated", "The thief's K1 signs air seq 16 dated a day before the "
         "inception: beyond the recovery's last good head 15, whatever its time.", K[1],
         K[1], "air", 16, T0 - 86_400_000, "beyond_last_good"),
        ("stolen-k1-unnamed-feed", "The thief's K1 signs water seq 1, a feed the recovery "
         "did not name: nothing of K1 there stays valid.", K[1], K[1], "water", 1,
         T0 + 100_000, "beyond_last_good"),
        ("thief-key", "A key of no window (the thief's own) signs air seq 16.", X, X, "air",
         16, T0 + 100_000, "unknown_key"),
        ("k1-before", "K1 signs air seq 10, K0's position.", K[1], K[1], "air", 10, T0,
         "before_key"),
        ("k0-wrong-head", "K0 signs air seq 10, the head its rotation closed it at, but "
         "not the record the rotation named there.", K[0], K[0], "air", 10, T0,
         "wrong_head"),
        ("wrong-signer", "The body names K4 as key but K1 signed it.", K[1], K[4], "air", 16,
         T0 + 200_000, "bad_signature"),
    ]
    return {
        "about": (
            "citynode key log vectors (docs/PROTOCOL.md, 'Key events and witnesses'). "
            "'example': the worked example of a cn2 id. 'logs': envelopes in seq order, "
            "verified from 'node_id' alone at now_ms; expect the folded state (seq, "
            "current key, next and recovery commitments, id of the last event) or "
            "{error: reason}. 'verdicts': key_verdict(key, feed, seq, record id) after "
            "the log 'recovery-after-theft' (record_time is never read). 'records': "
            "record envelopes of D (body version 3) verified at now_ms against the state "
            "of 'log': 'valid' or {error: reason}. 'settled': fork and split-view "
            "proofs of D (kind, proof_hex) verified against the state of 'log': 'valid' "
            "or {error: reason}; a retired key's statements inside the window a key "
            "event closed prove nothing ('settled_by_key_event'). 'compare': a "
            "held and a received log (both valid) and the decision; 'proof_hex' the "
            "equivocation proof, branches in byte order. 'cards': a card of D (card_hex, "
            "verified at now_ms) judged by the log 'held' after offering it the card's "
            "own log: 'current' (signed by the key in force), 'past' (by a key a "
            "rotation retired, dated no later than that rotation: card history only) "
            "or {error: 'key_not_in_force'}. The 'signature/*' logs also give "
            "signer_hex, the key that signs their last event (its key, or a recovery's "
            "recovery_key), and equation_holds: whether the plain RFC 8032 equation "
            "encode([S]B - [h]A) == R holds for it (S as an integer), i.e. whether only "
            "the strict rules refuse it."
        ),
        "generator": "tests/vectors/generate_keylog.py",
        "now_ms": NOW,
        "keys": {
            **{f"K{i}": k.public_key.hex() for i, k in enumerate(K)},
            **{f"Q{i}": q.public_key.hex() for i, q in enumerate(Q)},
            "X": X.public_key.hex(),
        },
        "seeds": {
            **{f"K{i}": k.seed.hex() for i, k in enumerate(K)},
            **{f"Q{i}": q.seed.hex() for i, q in enumerate(Q)},
            "X": X.seed.hex(),
        },
        "example": {
            "inception_body_hex": INC.body.hex(),
            "inception_envelope_hex": INC.env.hex(),
            "next_commitment_hex": commit(K[1]).hex(),
            "recovery_commitment_hex": commit(Q[0]).hex(),
            "identity_hex": D.hex(),
            "checksum_hex": checksum.hex(),
            "node_id": cn2(D),
        },
        "logs": [{"name": n, "description": d, "node_id": cn2(D), "events_hex": hexes(*evs),
                  "now_ms": NOW, "expect": x} for n, d, evs, x in logs]
        + wide_logs() + signature_edge_logs(),
        "verdicts": [{"log": "recovery-after-theft", "key_hex": k, "feed": f, "seq": s,
                      "record_id_hex": None if r is None else r.hex(), "record_time": t,
                      "expect": x} for k, f, s, r, t, x in verdicts],
        "records": [{"name": n, "description": d, "log": "recovery-after-theft",
                     "envelope_hex": record_v3(signer, named, f, q, t).hex(),
                     "now_ms": NOW, "expect": x if x == "valid" else err(x)}
                    for n, d, signer, named, f, q, t, x in records],
        "settled": settled_cases(),
        "cards": card_cases(),
        "compare": [{"name": n, "held_hex": hexes(*h), "received_hex": hexes(*r),
                     "outcome": o, "reason": why,
                     "proof_hex": None if p is None else p.hex()}
                    for n, h, r, o, why, p in compare],
    }


# --------------------------------------------------------------------------- cosign


def _mth(d: list[bytes]) -> bytes:
    if not d:
        return sha(b"")
    if len(d) == 1:
        return sha(b"\x00" + d[0])
    k = 1 << ((len(d) - 1).bit_length() - 1)
    return sha(b"\x01" + _mth(d[:k]) + _mth(d[k:]))


def _checkpoint(size: int, root: bytes, time: int) -> bytes:
    f = {"kind": "checkpoint", "version": 1, "origin": K[0].public_key, "feed": "air",
         "size": size, "root": root, "time": time}
    body = encoding.encode(f)
    return envelope(body, K[0].sign(DOMAIN_CHECKPOINT, body))


def _cosig(signer: SigningKey, witness: bytes, size: int, root: bytes, time: int) -> bytes:
    f = {"kind": "cosignature", "version": 1, "origin": K[0].public_key, "feed": "air",
         "size": size, "root": root, "time": time, "witness": witness,
         "key": signer.public_key}
    body = encoding.encode(f)
    return envelope(body, signer.sign(DOMAIN_COSIGNATURE, body))


def _consistency(m: int, d: list[bytes], complete: bool = True) -> list[bytes]:
    """RFC 9162 section 2.1.4.1 SUBPROOF(m, D[n], b), from the definition."""
    n = len(d)
    if m == n:
        return [] if complete else [_mth(d)]
    k = 1 << ((n - 1).bit_length() - 1)
    if m <= k:
        return [*_consistency(m, d[:k], complete), _mth(d[k:])]
    return [*_consistency(m - k, d[k:], False), _mth(d[:k])]


def cosign_file() -> dict[str, Any]:
    leaves = [sha(b"citynode vector leaf %d" % i) for i in range(7)]
    root = _mth(leaves)
    other = _mth([*leaves[:6], sha(b"another seventh record")])
    cp = _checkpoint(7, root, T0 + 60_000)
    cp_other = _checkpoint(7, other, T0 + 61_000)
    w0, w1, w2 = WITNESSES
    stranger = SigningKey(bytes([0x55]) * 32)
    good = [_cosig(w, w.public_key, 7, root, T0 + 70_000) for w in (w0, w1, w2)]
    flipped = bytearray(good[1])
    flipped[-1] ^= 0x01
    cosigs = {
        "w0": good[0], "w1": good[1], "w2": good[2],
        "w1-bad-signature": bytes(flipped),
        "stranger": _cosig(stranger, stranger.public_key, 7, root, T0 + 70_000),
        "w2-id-stranger-key": _cosig(stranger, w2.public_key, 7, root, T0 + 70_000),
        "w2-other-root": _cosig(w2, w2.public_key, 7, other, T0 + 70_000),
        "w0-future": _cosig(w0, w0.public_key, 7, root, NOW + 900_001),
        # The cn2 witness D (log INC, R1, R2: K2 in force): by its key in force, and by
        # K1, which R2 rotated away from (only the key in force counts).
        "d-current": _cosig(K[2], D, 7, root, T0 + 70_000),
        "d-rotated-key": _cosig(K[1], D, 7, root, T0 + 70_000),
        # The origin K0 cosigning its own checkpoint: never counted, even when named.
        "origin-self": _cosig(K[0], K[0].public_key, 7, root, T0 + 70_000),
    }
    quorum = [
        ("three-of-three", ["w0", "w1", "w2"], 3, ["W0", "W1", "W2"], []),
        ("bad-cosignature", ["w0", "w1-bad-signature"], 2, ["W0"],
         [[1, "bad_cosignature"]]),
        ("non-witness", ["w0", "stranger"], 2, ["W0"], [[1, "not_witness"]]),
        ("witness-id-wrong-key", ["w0", "w2-id-stranger-key"], 2, ["W0"],
         [[1, "wrong_key"]]),
        ("other-checkpoint", ["w0", "w2-other-root"], 2, ["W0"], [[1, "wrong_checkpoint"]]),
        ("one-witness-twice", ["w1", "w1"], 2, ["W1"], [[1, "duplicate"]]),
        ("future-dated", ["w0-future", "w1"], 1, ["W1"], [[0, "future_time"]]),
        ("cn2-witness", ["w0", "d-current"], 2, ["D", "W0"], []),
        ("cn2-rotated-key", ["d-rotated-key", "w0"], 2, ["W0"], [[0, "wrong_key"]]),
        ("too-many-items", ["w0"] * 64 + ["w1"], 2, ["W0"],
         [*([i, "duplicate"] for i in range(1, 64)), [64, "too_many_items"]]),
        ("strangers-set-aside", ["stranger"] * 64 + ["w1"], 1, ["W1"],
         [[i, "not_witness"] for i in range(64)]),
    ]
    # Cases where the auditor names the origin K0 as a witness too.
    origin_named = {"origin-named-as-witness"}
    quorum.append(("origin-named-as-witness", ["origin-self", "w0"], 2, ["W0"],
                   [[0, "not_witness"]]))
    a, b = sorted([cp, cp_other])
    split = encoding.encode({"kind": "split-view", "a": a, "b": b})
    cp4 = _checkpoint(4, _mth(leaves[:4]), T0 + 50_000)
    cp7_bogus = _checkpoint(7, sha(b"a tree that does not extend the one of size 4"),
                            T0 + 62_000)
    p47 = _consistency(4, leaves)
    decisions = [
        ("first", None, cp, [], None),
        ("same-head-again", cp, cp, [], None),
        ("consistent-growth", cp4, cp, p47, None),
        ("smaller", cp, cp4, [], "checkpoint_regress"),
        ("split-view", cp, cp_other, [], "split_view"),
        ("not-consistent", cp4, cp7_bogus, p47, "not_consistent"),
        ("proof-of-another-size", cp4, cp, _consistency(3, leaves), "not_consistent"),
        ("from-size-0", _checkpoint(0, sha(b""), T0 + 40_000), cp, [], None),
    ]
    return {
        "about": (
            "citynode cosignature vectors (docs/PROTOCOL.md, 'Key events and witnesses'). "
            "'checkpoint_hex' is origin K0's checkpoint of feed air at size 7; "
            "'cosignatures' name envelopes; each 'quorum' case checks the named "
            "cosignatures of that checkpoint against the witnesses W0, W1, W2 (each "
            "named by its key, the key accepted for it) and the cn2 witness D (the key "
            "accepted for it: only the one in force at the end of its log "
            "'witness_logs'.D) at now_ms, with quorum k (with 'origin_named': the "
            "origin K0 is named as a witness too, by its key: its own cosignature "
            "is still never counted); "
            "'ok', the witnesses counted and the [index, reason] of each not counted. "
            "'split_view': W0 cosigned one root at size 7 and W2 another; the proof is "
            "the origin's two checkpoints in byte order. 'decisions': the witness's "
            "decision on 'checkpoint_hex' given the checkpoint it cosigned last "
            "('last_hex', null: none) and the RFC 9162 consistency proof from its size "
            "('proof_hex'): cosign (reason null) or refuse with 'reason'."
        ),
        "generator": "tests/vectors/generate_keylog.py",
        "now_ms": NOW,
        "origin_hex": K[0].public_key.hex(),
        "witnesses": {f"W{i}": w.public_key.hex() for i, w in enumerate(WITNESSES)},
        "witness_logs": {"D": {"identity_hex": D.hex(), "log_hex": hexes(INC, R1, R2)}},
        "checkpoint_hex": cp.hex(),
        "cosignatures": {n: e.hex() for n, e in cosigs.items()},
        "quorum": [{"name": n, "cosignatures": c, "k": k,
                    **({"origin_named": True} if n in origin_named else {}),
                    "expect": {"ok": len(counted) >= k, "witnesses": counted,
                               "rejected": rej}}
                   for n, c, k, counted, rej in quorum],
        "split_view": {
            "a": {"checkpoint_hex": cp.hex(), "cosignatures_hex": [good[0].hex()]},
            "b": {"checkpoint_hex": cp_other.hex(),
                  "cosignatures_hex": [cosigs["w2-other-root"].hex()]},
            "proof_hex": split.hex(),
        },
        "decisions": [{"name": n, "last_hex": None if last is None else last.hex(),
                       "checkpoint_hex": new.hex(), "proof_hex": [h.hex() for h in pr],
                       "reason": why}
                      for n, last, new, pr, why in decisions],
    }


# --------------------------------------------------------------------------- output


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=True) + "\n"


def build() -> dict[str, str]:
    """File name -> exact file text. Pure."""
    return {"keylog.json": dumps(keylog_file()), "cosign.json": dumps(cosign_file())}


def main() -> int:
    for name, text in build().items():
        (HERE / name).write_text(text, encoding="utf-8", newline="\n")
        print(f"wrote {HERE / name} ({len(text)} characters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
