"""The version 2 identity vectors (tests/vectors/keylog.json, cosign.json) against the
code: the generator reproduces the committed files, and every vector gives its
expected verdict through the public API."""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from citynode.core import cosign, keylog
from citynode.core.cards import judge_card_key, open_card
from citynode.core.checkpoints import SplitViewProof, open_checkpoint, verify_split_view
from citynode.core.cosign import CosignedCheckpoint, check_quorum, split_view
from citynode.core.keybook import KeyBook
from citynode.core.keylog import (
    EquivocationProof,
    compare_logs,
    identity_id,
    parse_identity_id,
    verified_events,
    verify_equivocation,
    verify_log,
)
from citynode.core.keys import SigningKey, Verifier
from citynode.errors import InvalidProof, InvalidRecord

VECTORS = Path(__file__).resolve().parents[2] / "tests" / "vectors"
KEYLOG: dict[str, Any] = json.loads((VECTORS / "keylog.json").read_text(encoding="utf-8"))
COSIGN: dict[str, Any] = json.loads((VECTORS / "cosign.json").read_text(encoding="utf-8"))
LOGS = {c["name"]: c for c in KEYLOG["logs"]}


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("citynode_keylog_vectors",
                                                  VECTORS / "generate_keylog.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _envs(hexes: list[str]) -> list[bytes]:
    return [bytes.fromhex(h) for h in hexes]


def test_generator_reproduces_committed_files_byte_for_byte() -> None:
    built = _generator().build()
    assert set(built) == {"keylog.json", "cosign.json"}
    for name, text in built.items():
        assert text == (VECTORS / name).read_text(encoding="utf-8"), (
            f"{name} is stale: run python tests/vectors/generate_keylog.py")


def test_worked_example_id() -> None:
    ex = KEYLOG["example"]
    body = bytes.fromhex(ex["inception_body_hex"])
    ident = keylog.identity_of(body)
    assert ident.hex() == ex["identity_hex"]
    assert identity_id(ident) == ex["node_id"] and parse_identity_id(ex["node_id"]) == ident
    ev = keylog.open_event(bytes.fromhex(ex["inception_envelope_hex"]), verifier=Verifier())
    assert ev.next.hex() == ex["next_commitment_hex"]
    assert ev.recovery is not None and ev.recovery.hex() == ex["recovery_commitment_hex"]


def test_vectors_cover_the_required_cases() -> None:
    reasons = {c["expect"].get("error") for c in KEYLOG["logs"]}
    assert {"bad_signature", "not_precommitted", "bad_recovery", "key_event_order",
            "bad_prev", "wrong_identity", "heads_regress", "key_reused",
            "future_time"} <= reasons
    assert {"valid", "beyond_last_good", "unknown_key", "before_key",
            "wrong_head"} == {v["expect"] for v in KEYLOG["verdicts"]}
    assert {c["outcome"] for c in KEYLOG["compare"]} == {
        "stale", "same", "extends", "recovered", "superseded", "key-fork", "dead"}
    assert {str(c["expect"]) for c in KEYLOG["cards"]} == {
        "current", "past", str({"error": "key_not_in_force"})}


@pytest.mark.parametrize("case", KEYLOG["logs"], ids=[c["name"] for c in KEYLOG["logs"]])
def test_log_vector(case: dict[str, Any]) -> None:
    envs = _envs(case["events_hex"])
    expect = case["expect"]
    if "error" in expect:
        with pytest.raises(InvalidRecord) as e:
            verify_log(case["node_id"], envs, verifier=Verifier(), now_ms=case["now_ms"])
        assert e.value.reason == expect["error"], str(e.value)
        return
    s = verify_log(case["node_id"], keylog.encode_log(envs), verifier=Verifier(),
                   now_ms=case["now_ms"])
    assert (s.seq, s.key.hex(), s.next.hex(), s.recovery.hex(), s.head_id.hex()) == (
        expect["seq"], expect["key_hex"], expect["next_hex"], expect["recovery_hex"],
        expect["head_id_hex"])


@pytest.mark.parametrize("case", KEYLOG["verdicts"],
                         ids=[f"{v['feed']}-{v['seq']}-{v['expect']}"
                              for v in KEYLOG["verdicts"]])
def test_verdict_vector(case: dict[str, Any]) -> None:
    log = LOGS[case["log"]]
    s = verify_log(log["node_id"], _envs(log["events_hex"]), verifier=Verifier())
    rid = case["record_id_hex"]
    v = s.key_verdict(bytes.fromhex(case["key_hex"]), case["feed"], case["seq"],
                      None if rid is None else bytes.fromhex(rid))
    assert v.reason == case["expect"] and v.valid == (case["expect"] == "valid")


@pytest.mark.parametrize("case", KEYLOG["compare"], ids=[c["name"] for c in KEYLOG["compare"]])
def test_compare_vector(case: dict[str, Any]) -> None:
    ident = KEYLOG["example"]["node_id"]
    hs, held = verified_events(ident, _envs(case["held_hex"]), verifier=Verifier())
    rs, got = verified_events(ident, _envs(case["received_hex"]), verifier=Verifier())
    d = compare_logs(held, got, held_state=hs, received_state=rs)
    assert d.outcome == case["outcome"]
    assert (None if d.error is None else d.error.reason) == case["reason"]
    assert (None if d.proof is None else d.proof.encode().hex()) == case["proof_hex"]
    if case["proof_hex"] is not None:
        proof = EquivocationProof.decode(bytes.fromhex(case["proof_hex"]))
        after = verify_equivocation(ident, proof, verifier=Verifier())
        assert after.dead == (case["outcome"] == "dead")


@pytest.mark.parametrize("case", KEYLOG["cards"], ids=[c["name"] for c in KEYLOG["cards"]])
def test_card_key_vector(case: dict[str, Any]) -> None:
    """A card of D, verified, its log offered to the log held, then judged by the log
    held (docs/PROTOCOL.md, Wiring: Cards)."""
    ident = KEYLOG["example"]["node_id"]
    book = KeyBook()
    book.restore(parse_identity_id(ident), keylog.encode_log(
        _envs(LOGS[case["held"]]["events_hex"])), verifier=Verifier())
    card = open_card(bytes.fromhex(case["card_hex"]), expected_node_id=ident,
                     verifier=Verifier(), now_ms=case["now_ms"])
    assert card.keylog is not None
    book.offer(card.node, card.keylog, verifier=Verifier(), now_ms=case["now_ms"])
    expect = case["expect"]
    if isinstance(expect, dict):
        with pytest.raises(InvalidRecord) as e:
            judge_card_key(card, book.held(card.node))
        assert e.value.reason == expect["error"], str(e.value)
    else:
        assert judge_card_key(card, book.held(card.node)) == expect


@pytest.mark.parametrize("case", COSIGN["quorum"], ids=[c["name"] for c in COSIGN["quorum"]])
def test_quorum_vector(case: dict[str, Any]) -> None:
    cp = open_checkpoint(bytes.fromhex(COSIGN["checkpoint_hex"]), verifier=Verifier())
    witnesses = {bytes.fromhex(k): frozenset({bytes.fromhex(k)})
                 for k in COSIGN["witnesses"].values()}
    names = {bytes.fromhex(k): n for n, k in COSIGN["witnesses"].items()}
    for n, wl in COSIGN["witness_logs"].items():  # cn2 witnesses: keys from their log
        ident = bytes.fromhex(wl["identity_hex"])
        held = keylog.verify_log(ident, [bytes.fromhex(h) for h in wl["log_hex"]],
                                 verifier=Verifier())
        witnesses[ident] = cosign.witness_keys(ident, held)
        names[ident] = n
    if case.get("origin_named"):
        origin = bytes.fromhex(COSIGN["origin_hex"])
        witnesses[origin] = frozenset({origin})
        names[origin] = "K0"
    cosigs = [bytes.fromhex(COSIGN["cosignatures"][n]) for n in case["cosignatures"]]
    q = check_quorum(cp, cosigs, witnesses, case["k"], verifier=Verifier(),
                     now_ms=COSIGN["now_ms"])
    expect = case["expect"]
    assert q.ok == expect["ok"]
    assert sorted(names[w] for w in q.witnesses) == expect["witnesses"]
    assert [list(r) for r in q.rejected] == expect["rejected"]


def test_split_view_vector() -> None:
    sv = COSIGN["split_view"]
    a, b = (CosignedCheckpoint(bytes.fromhex(sv[x]["checkpoint_hex"]),
                               tuple(_envs(sv[x]["cosignatures_hex"]))) for x in ("a", "b"))
    proof = split_view(a, b, verifier=Verifier())
    assert proof is not None and proof.encode().hex() == sv["proof_hex"]
    verify_split_view(SplitViewProof.decode(bytes.fromhex(sv["proof_hex"])), Verifier())


@pytest.mark.parametrize("case", COSIGN["decisions"],
                         ids=[c["name"] for c in COSIGN["decisions"]])
def test_witness_decision_vector(case: dict[str, Any]) -> None:
    """The witness's decision (cosign.cosign) on a checkpoint, given the one it cosigned
    last and a consistency proof: cosign, or refuse with the vector's reason."""
    cp = open_checkpoint(bytes.fromhex(case["checkpoint_hex"]), verifier=Verifier())
    last = (None if case["last_hex"] is None
            else open_checkpoint(bytes.fromhex(case["last_hex"]), verifier=Verifier()))
    proof = [bytes.fromhex(h) for h in case["proof_hex"]]
    w = SigningKey(bytes([0x66]) * 32)
    if case["reason"] is None:
        c = cosign.cosign(w, w.public_key, cp, COSIGN["now_ms"], last=last, proof=proof)
        assert c.covers(cp)
    else:
        with pytest.raises(InvalidRecord) as info:
            cosign.cosign(w, w.public_key, cp, COSIGN["now_ms"], last=last, proof=proof)
        assert info.value.reason == case["reason"]


# --------------------------------------------------------------------------- the doc

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"


def _section() -> str:
    doc = PROTOCOL.read_text(encoding="utf-8")
    start = doc.index("\n## Key events and witnesses (version 2 identity)\n")
    return doc[start:doc.index("\n## Test vectors\n")]


def test_worked_example_in_the_doc_is_the_vector() -> None:
    sec = _section()
    ex = KEYLOG["example"]
    body = ex["inception_body_hex"]
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    assert "```\n" + "\n".join(lines) + "\n```" in sec
    assert f"The {len(body) // 2}-byte inception body" in sec
    assert f"D           {ex['identity_hex']}" in sec
    assert f"node id     {ex['node_id']}" in sec
    assert f"checksum    {bytes.fromhex(ex['checksum_hex']).hex(' ')}" in sec
    assert f"next        {ex['next_commitment_hex']}" in sec
    assert f"recovery    {ex['recovery_commitment_hex']}" in sec
    assert f"key         {KEYLOG['keys']['K0']}" in sec


def test_constants_in_the_doc_are_the_codes() -> None:
    doc = PROTOCOL.read_text(encoding="utf-8")
    sec = _section()
    for prefix in (keylog.DOMAIN_KEY_EVENT, cosign.DOMAIN_COSIGNATURE):
        assert f"`{prefix.hex(' ')}` ({len(prefix)} bytes)" in doc
    assert keylog.DOMAIN_IDENTITY == b"citynode/identity/v1\x00"
    assert '"citynode/identity/v1" || 00' in sec
    assert keylog.DOMAIN_KEY_COMMITMENT == b"citynode/key-commitment/v1\x00"
    assert '"citynode/key-commitment/v1" || 00' in sec
    assert f"decoded within {keylog.MAX_EVENT_BYTES} bytes, depth 3, " \
           f"{keylog._EVENT_LIMITS.max_items} items" in sec
    assert f"1 to {keylog.MAX_LOG_EVENTS} events, at most {keylog.MAX_LOG_BYTES} bytes" in sec
    assert f"at most {keylog.MAX_HEAD_FEEDS} feeds" in sec
    assert f"the first {cosign.MAX_COSIGNATURES} in the order given are verified" in sec


# --------------------------------------------------------------------------- hostile bytes

_SEEDS = [bytes.fromhex(h) for c in KEYLOG["logs"] for h in c["events_hex"]]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_SEEDS), st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)),
                                        max_size=4), st.binary(max_size=64))
def test_mutated_events_and_logs_only_ever_raise_our_errors(
        seed: bytes, flips: list[tuple[int, int]], tail: bytes) -> None:
    """Every byte from outside is hostile: whatever the bytes, opening an event, a log,
    a proof, a cosignature or a cosigned checkpoint raises InvalidRecord/InvalidProof
    or succeeds, nothing else."""
    data = bytearray(seed)
    for pos, val in flips:
        data[pos % len(data)] = val
    mutated = bytes(data) + tail
    ident = KEYLOG["example"]["node_id"]
    for attempt in (
        lambda: keylog.open_event(mutated, verifier=Verifier()),
        lambda: verify_log(ident, [_SEEDS[0], mutated], verifier=Verifier()),
        lambda: verify_log(ident, mutated, verifier=Verifier()),
        lambda: cosign.open_cosignature(mutated, verifier=Verifier()),
        lambda: CosignedCheckpoint.decode(mutated),
    ):
        with contextlib.suppress(InvalidRecord):
            attempt()
    with contextlib.suppress(InvalidProof):
        verify_equivocation(ident, EquivocationProof.decode(mutated), verifier=Verifier())


@pytest.mark.parametrize("case", KEYLOG["records"], ids=lambda c: c["name"])
def test_record_of_a_cn2_origin_vector(case: dict[str, Any]) -> None:
    """A record of body version 3 is valid only under the key its origin's log lets
    sign that position (docs/PROTOCOL.md, "Records of a cn2 origin")."""
    from citynode.core.records import decode_record, open_record

    log = next(c for c in KEYLOG["logs"] if c["name"] == case["log"])
    state = keylog.verify_log(log["node_id"], [bytes.fromhex(e) for e in log["events_hex"]],
                              verifier=Verifier())
    body, sig, payload = decode_record(bytes.fromhex(case["envelope_hex"]))

    def opened() -> Any:
        return open_record(body, sig, payload, now_ms=case["now_ms"], verifier=Verifier(),
                           key_states=lambda origin: state if origin == state.identity
                           else None)

    if case["expect"] == "valid":
        assert opened().origin == state.identity
    else:
        with pytest.raises(InvalidRecord) as exc:
            opened()
        assert exc.value.reason == case["expect"]["error"]
    # Without the origin's log the verdict is always to fetch it (or the signature).
    with pytest.raises(InvalidRecord) as exc:
        open_record(body, sig, payload, now_ms=case["now_ms"], verifier=Verifier())
    assert exc.value.reason in ("unknown_key", "bad_signature")


@pytest.mark.parametrize("case", KEYLOG["settled"], ids=lambda c: c["name"])
def test_settled_window_vector(case: dict[str, Any]) -> None:
    """A key event settles a retired key's window: its fork and split-view proofs
    inside it prove nothing (docs/PROTOCOL.md, "Settled windows")."""
    from citynode.core.chain import ForkProof, verify_fork_proof

    log = next(c for c in KEYLOG["logs"] if c["name"] == case["log"])
    state = keylog.verify_log(log["node_id"], [bytes.fromhex(e) for e in log["events_hex"]],
                              verifier=Verifier())

    def states(origin: bytes) -> keylog.KeyState | None:
        return state if origin == state.identity else None

    data = bytes.fromhex(case["proof_hex"])

    def check() -> None:
        if case["kind"] == "fork":
            verify_fork_proof(ForkProof.decode(data), Verifier(), key_states=states)
        else:
            verify_split_view(SplitViewProof.decode(data), Verifier(), states)

    if case["expect"] == "valid":
        check()
    else:
        with pytest.raises(InvalidProof) as exc:
            check()
        assert exc.value.reason == case["expect"]["error"]
