"""The committed test vectors (tests/vectors/) against the code and against PROTOCOL.md.

(a) the generator, rerun in memory, reproduces the committed files byte for byte;
(b) every vector, checked through the public API, gives its expected verdict and reason;
(c) the auditor's recipe, extracted from docs/PROTOCOL.md, really verifies a record with
    openssl (and really refuses a bad one), and the doc's worked examples are the vectors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import msgpack
import ormsgpack
import pytest

from citynode.core import checkpoints as cps
from citynode.core import encoding, keys, liveness
from citynode.core import types as payload_types
from citynode.core.cards import card_from_json, check_terms_document, open_card
from citynode.core.chain import (
    FeedHead,
    ForkProof,
    Verdict,
    canonical_fork_proof,
    classify,
    verify_fork_proof,
)
from citynode.core.egress import EgressPolicy
from citynode.core.encoding import Limits
from citynode.core.keybook import KeyBook
from citynode.core.keylog import decode_log, identity_id, identity_of, parse_identity_id
from citynode.core.keys import DOMAIN_RECORD, Verifier, node_id, parse_node_id
from citynode.core.records import decode_envelope, decode_record, open_record
from citynode.errors import InvalidNodeId, InvalidProof, InvalidRecord, SignatureError

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "tests" / "vectors"
PROTOCOL = ROOT / "docs" / "PROTOCOL.md"


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("citynode_vector_generator",
                                                  VECTORS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text(encoding="utf-8"))
    return data


RECORDS = _load("records.json")
CHAIN = _load("chain.json")
KEYS = _load("keys.json")
CHECKPOINTS = _load("checkpoints.json")
CARDS = _load("cards.json")
CASES = RECORDS["cases"]
BY_NAME = {c["name"]: c for c in CASES}
DOC = PROTOCOL.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- (a)


def test_generator_reproduces_committed_files_byte_for_byte() -> None:
    gen = _load_generator()
    built = gen.build()
    assert set(built) == {"records.json", "chain.json", "keys.json", "checkpoints.json",
                          "sync.json", "cards.json", "payloads.json"}
    for name, text in built.items():
        committed = (VECTORS / name).read_text(encoding="utf-8")
        assert text == committed, f"{name} is stale: run python tests/vectors/generate.py"
    assert gen.build() == built  # deterministic within one process too


# --------------------------------------------------------------------------- (b) records


def test_case_names_are_unique_and_cover_every_kind() -> None:
    names = [c["name"] for c in CASES]
    assert len(names) == len(set(names))
    reasons = {c["expect"]["error"] for c in CASES if c["expect"] != "valid"}
    assert reasons >= {
        "bad_envelope", "too_large", "too_deep", "too_many_items", "malformed",
        "non_canonical", "unknown_version", "missing_field", "unknown_field", "bad_field",
        "bad_prev", "future_time", "bad_signature", "unknown_type", "bad_value", "bad_unit",
        "bad_key", "payload_mismatch",
    }
    valid_types = {
        encoding.decode(bytes.fromhex(c["body_hex"]))["type"]
        for c in CASES if c["expect"] == "valid"
    }
    # One valid vector per built-in type: a type added to types.py needs a vector.
    assert valid_types >= payload_types.BUILTIN_TYPES
    assert "org.example.Test" in valid_types


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_record_vector(case: dict[str, Any]) -> None:
    env = bytes.fromhex(case["envelope_hex"])
    expect = case["expect"]
    verifier = Verifier()
    if case["body_hex"] is None:
        # The envelope itself is to be rejected.
        with pytest.raises(InvalidRecord) as info:
            decode_record(env)
        assert info.value.reason == expect["error"], str(info.value)
        return
    body, sig, payload = decode_record(env)
    assert body.hex() == case["body_hex"]
    assert sig.hex() == case["sig_hex"]
    assert (None if payload is None else payload.hex()) == case["payload_hex"]
    if expect == "valid":
        rec = open_record(body, sig, payload, now_ms=case["now_ms"], verifier=verifier)
        assert rec.id.hex() == case["id_hex"] == hashlib.sha256(body).hexdigest()
        assert rec.origin.hex() == case["public_key_hex"]
        assert node_id(rec.origin) == case["node_id"]
        assert parse_node_id(case["node_id"]) == rec.origin
        assert rec.envelope == env
        assert encoding.encode(rec.fields()) == body
        assert verifier.count == 1
    else:
        with pytest.raises(InvalidRecord) as info:
            open_record(body, sig, payload, now_ms=case["now_ms"], verifier=verifier)
        assert info.value.reason == expect["error"], str(info.value)
        assert case["id_hex"] is None


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c["body_hex"] is not None and c["expect"] != "valid"
     and c["expect"]["error"] != "bad_signature"],
    ids=lambda c: c["name"],
)
def test_invalid_vectors_are_correctly_signed(case: dict[str, Any]) -> None:
    """Each invalid body carries a good signature, so it is rejected for its one fault
    whatever order a verifier checks in."""
    body, sig = bytes.fromhex(case["body_hex"]), bytes.fromhex(case["sig_hex"])
    keys.verify(bytes.fromhex(case["public_key_hex"]), DOMAIN_RECORD, body, sig)


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c["body_hex"] is not None and c["expect"] != "valid"
     and c["expect"]["error"] == "non_canonical"],
    ids=lambda c: c["name"],
)
def test_non_canonical_vectors_are_valid_msgpack(case: dict[str, Any]) -> None:
    """A lenient decoder reads them: the rejection is the canonical rules' doing (in the
    body or in the payload)."""
    body = bytes.fromhex(case["body_hex"])
    if case["payload_hex"] is not None:
        msgpack.unpackb(body, strict_map_key=False)
        body = bytes.fromhex(case["payload_hex"])
    if "ext" in case["name"]:
        # Python's msgpack refuses reserved ext types and odd timestamps itself;
        # ormsgpack with an ext hook reads any ext as (type, data).
        ormsgpack.unpackb(body, ext_hook=lambda t, d: (t, d))
        return
    msgpack.unpackb(body, strict_map_key=False)


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c["expect"] != "valid" and c["expect"]["error"] == "malformed"],
    ids=lambda c: c["name"],
)
def test_malformed_vectors_are_not_msgpack(case: dict[str, Any]) -> None:
    """The body, or else the payload, is not one msgpack value."""
    def lenient(hex_: str) -> None:
        msgpack.unpackb(bytes.fromhex(hex_), strict_map_key=False)

    try:
        lenient(case["body_hex"])
    except (ValueError, msgpack.UnpackException):
        return
    with pytest.raises((ValueError, msgpack.UnpackException)):
        lenient(case["payload_hex"])


def test_bad_signature_vectors_fail_only_the_signature() -> None:
    for case in CASES:
        if case["expect"] != {"error": "bad_signature"}:
            continue
        body, sig = bytes.fromhex(case["body_hex"]), bytes.fromhex(case["sig_hex"])
        encoding.decode(body)  # canonical
        with pytest.raises(SignatureError):
            keys.verify(bytes.fromhex(case["public_key_hex"]), DOMAIN_RECORD, body, sig)


# --------------------------------------------------------------------------- (b) chains


def _record(name: str) -> Any:
    env = bytes.fromhex(CHAIN["records"][name]["envelope_hex"])
    body, sig, payload = decode_record(env)
    rec = open_record(body, sig, payload, now_ms=RECORDS["cases"][0]["now_ms"],
                      verifier=Verifier())
    assert rec.id.hex() == CHAIN["records"][name]["id_hex"]
    return rec


@pytest.mark.parametrize("case", CHAIN["classify"], ids=[c["name"] for c in CHAIN["classify"]])
def test_classify_vector(case: dict[str, Any]) -> None:
    rec = _record(case["record"])
    head = case["head"]
    fh = None if head is None else FeedHead(head["seq"], bytes.fromhex(head["id_hex"]))
    held = case["held_id_at_seq_hex"]
    decision = classify(rec, fh, None if held is None else bytes.fromhex(held))
    expect = case["expect"]
    assert decision.verdict is Verdict(expect["verdict"])
    missing = None if expect["missing"] is None else tuple(expect["missing"])
    assert decision.missing == missing
    assert decision.conflicts_with_seq == expect["conflicts_with_seq"]


@pytest.mark.parametrize(
    "case", CHAIN["fork_proofs"], ids=[c["name"] for c in CHAIN["fork_proofs"]]
)
def test_fork_proof_vector(case: dict[str, Any]) -> None:
    raw = bytes.fromhex(case["proof_hex"])
    if case["expect"] == "valid":
        proof = ForkProof.decode(raw)
        assert proof.encode() == raw
        a, b = verify_fork_proof(proof, Verifier())
        assert a.origin == b.origin and a.feed == b.feed and a.id != b.id
        assert a.seq == b.seq or abs(a.seq - b.seq) == 1
        # The one form nodes store and send, whichever order the proof came in.
        for x, y in ((a, b), (b, a)):
            kept, at = canonical_fork_proof(x, y)
            assert (kept.encode().hex(), at) == (case["canonical_hex"], case["listed_at_seq"])
        verify_fork_proof(ForkProof.decode(bytes.fromhex(case["canonical_hex"])), Verifier())
    else:
        with pytest.raises(InvalidProof):
            verify_fork_proof(ForkProof.decode(raw), Verifier())


def test_chain_vectors_cover_both_proof_kinds() -> None:
    kinds = set()
    for case in CHAIN["fork_proofs"]:
        if case["expect"] == "valid":
            a, b = verify_fork_proof(ForkProof.decode(bytes.fromhex(case["proof_hex"])),
                                     Verifier())
            kinds.add("same_seq" if a.seq == b.seq else "prev_mismatch")
    assert kinds == {"same_seq", "prev_mismatch"}


# --------------------------------------------------------------------------- (b) checkpoints

LEAVES = [bytes.fromhex(x) for x in CHECKPOINTS["leaves_hex"]]


@pytest.mark.parametrize("case", CHECKPOINTS["trees"], ids=lambda c: f"size-{c['size']}")
def test_merkle_root_vector(case: dict[str, Any]) -> None:
    n, root = case["size"], bytes.fromhex(case["root_hex"])
    assert cps.root_of(LEAVES[:n]) == root
    assert cps.MerkleLog(LEAVES).root(n) == root


@pytest.mark.parametrize("case", CHECKPOINTS["inclusion"],
                         ids=lambda c: f"{c['index']}-of-{c['size']}")
def test_inclusion_proof_vector(case: dict[str, Any]) -> None:
    m, n = case["index"], case["size"]
    path = [bytes.fromhex(x) for x in case["path_hex"]]
    root = bytes.fromhex(CHECKPOINTS["trees"][n]["root_hex"])
    assert cps.MerkleLog(LEAVES).inclusion_proof(m, n) == path
    cps.verify_inclusion(LEAVES[m], m, n, path, root)
    with pytest.raises(InvalidProof):  # another leaf at that index
        cps.verify_inclusion(LEAVES[(m + 1) % n] if n > 1 else b"\0" * 32, m, n, path, root)


@pytest.mark.parametrize("case", CHECKPOINTS["consistency"],
                         ids=lambda c: f"{c['old_size']}-to-{c['new_size']}")
def test_consistency_proof_vector(case: dict[str, Any]) -> None:
    m, n = case["old_size"], case["new_size"]
    path = [bytes.fromhex(x) for x in case["path_hex"]]
    old = bytes.fromhex(CHECKPOINTS["trees"][m]["root_hex"])
    new = bytes.fromhex(CHECKPOINTS["trees"][n]["root_hex"])
    assert cps.MerkleLog(LEAVES).consistency_proof(m, n) == path
    cps.verify_consistency(m, n, old, new, path)
    if m < n:  # an old tree that is not a prefix of the new one
        with pytest.raises(InvalidProof):
            cps.verify_consistency(m, n, bytes.fromhex(CHECKPOINTS["trees"][n - 1]["root_hex"])
                                   if m != n - 1 else b"\0" * 32, new, path)


def _held_log(case: dict[str, Any]) -> KeyBook:
    """The key book of a checkpoint vector's verifier, as a node keeps it: the one key
    log it holds (``log_hex``, offered for the identity its inception founds), or
    none."""
    book = KeyBook()
    if case.get("log_hex") is not None:
        log = bytes.fromhex(case["log_hex"])
        ident = identity_of(decode_envelope(decode_log(log)[0], Limits())[0])
        assert book.offer(ident, log, verifier=Verifier()).error is None
    return book


@pytest.mark.parametrize("case", CHECKPOINTS["checkpoints"], ids=lambda c: c["name"])
def test_checkpoint_vector(case: dict[str, Any]) -> None:
    env = bytes.fromhex(case["envelope_hex"])
    expect = case["expect"]
    states = _held_log(case).state
    if "error" in expect:
        with pytest.raises(InvalidRecord) as e:
            cps.open_checkpoint(env, verifier=Verifier(), now_ms=case["now_ms"],
                                key_states=states)
        assert e.value.reason == expect["error"]
        return
    cp = cps.open_checkpoint(env, verifier=Verifier(), now_ms=case["now_ms"],
                             key_states=states)
    name = node_id(cp.origin) if cp.key is None else identity_id(cp.origin)
    assert (name, cp.feed, cp.size, cp.root.hex(), cp.time) == (
        expect["origin"], expect["feed"], expect["size"], expect["root_hex"], expect["time"])
    assert (cp.key.hex() if cp.key is not None else None) == expect.get("key_hex")
    assert cp.envelope == env
    assert cp.root == bytes.fromhex(CHECKPOINTS["trees"][cp.size]["root_hex"])


@pytest.mark.parametrize("case", CHECKPOINTS["split_views"], ids=lambda c: c["name"])
def test_split_view_vector(case: dict[str, Any]) -> None:
    raw = bytes.fromhex(case["proof_hex"])
    proof = cps.SplitViewProof.decode(raw)
    if case["expect"] == "valid":
        assert proof.canonical().encode() == raw
        a, b = cps.verify_split_view(proof, Verifier())
        assert (a.origin, a.feed, a.size) == (b.origin, b.feed, b.size) and a.root != b.root
    else:
        with pytest.raises(InvalidProof):
            cps.verify_split_view(proof, Verifier())


# --------------------------------------------------------------------------- (b) keys


@pytest.mark.parametrize("case", KEYS["node_ids"], ids=lambda c: c["seed"])
def test_node_id_vector(case: dict[str, Any]) -> None:
    key = keys.SigningKey(bytes.fromhex(case["seed_hex"]))
    pk = bytes.fromhex(case["public_key_hex"])
    assert key.public_key == pk
    assert hashlib.sha256(b"citynode/node-id/v1" + pk).digest()[:3].hex() == case["checksum_hex"]
    assert node_id(pk) == key.node_id == case["node_id"]
    assert parse_node_id(case["node_id"]) == pk


@pytest.mark.parametrize("case", KEYS["invalid"], ids=lambda c: c["name"])
def test_invalid_node_id_vector(case: dict[str, Any]) -> None:
    with pytest.raises(InvalidNodeId):
        parse_node_id(case["text"])


@pytest.mark.parametrize("case", KEYS["cn2_ids"], ids=lambda c: c["node_id"])
def test_cn2_id_vector(case: dict[str, Any]) -> None:
    ident = bytes.fromhex(case["identity_hex"])
    check = hashlib.sha256(b"citynode/node-id/v2" + ident).digest()[:3]
    assert check.hex() == case["checksum_hex"]
    assert identity_id(ident) == case["node_id"]
    assert parse_identity_id(case["node_id"]) == ident
    assert parse_identity_id(" " + case["node_id"].upper().replace("CN2", "cn2") + "\n") == ident


@pytest.mark.parametrize("case", KEYS["invalid_cn2"], ids=lambda c: c["name"])
def test_invalid_cn2_id_vector(case: dict[str, Any]) -> None:
    with pytest.raises(InvalidNodeId) as info:
        parse_identity_id(case["text"])
    if not case["text"].isascii():  # refused for that, before any case folding
        assert "non-ASCII" in str(info.value)


# --------------------------------------------------------------------------- (b) cards


def _card_verdict(fn: Any, data: Any, expected: str | None) -> Any:
    try:
        fn(data, expected_node_id=expected, verifier=Verifier(), now_ms=CARDS["now_ms"])
    except InvalidNodeId:
        return {"error_class": "InvalidNodeId"}
    except InvalidRecord as exc:
        return {"error": exc.reason}
    return "valid"


@pytest.mark.parametrize("case", CARDS["open"], ids=lambda c: c["name"])
def test_card_open_vector(case: dict[str, Any]) -> None:
    env = bytes.fromhex(case["envelope_hex"])
    assert _card_verdict(open_card, env, case["expected_node_id"]) == case["expect"]


@pytest.mark.parametrize("case", CARDS["json"], ids=lambda c: c["name"])
def test_card_json_vector(case: dict[str, Any]) -> None:
    got = _card_verdict(card_from_json, case["json"], case["expected_node_id"])
    assert got == case["expect"]


def test_policy_digest_vector() -> None:
    v = CARDS["policy_digest"]
    st = v["settings"]
    policy = EgressPolicy(types=frozenset(st["types"]), deny=frozenset(st["deny"]),
                          location_decimals=st["location_decimals"])
    assert policy.settings() == st
    assert encoding.encode(policy.settings()).hex() == v["settings_msgpack_hex"]
    assert policy.digest().hex() == v["digest_hex"]
    card = open_card(bytes.fromhex(CARDS["open"][0]["envelope_hex"]), expected_node_id=None,
                     verifier=Verifier())
    assert card.feeds[0].policy == policy.digest()


@pytest.mark.parametrize("case", CARDS["terms_documents"], ids=lambda c: c["name"])
def test_terms_document_vector(case: dict[str, Any]) -> None:
    card = open_card(bytes.fromhex(CARDS["open"][0]["envelope_hex"]), expected_node_id=None,
                     verifier=Verifier())
    doc = bytes.fromhex(case["document_hex"])
    if case["expect"] == "valid":
        check_terms_document(card.feeds[1], doc)
    else:
        with pytest.raises(InvalidRecord) as e:
            check_terms_document(card.feeds[1], doc)
        assert e.value.reason == case["expect"]["error"]


@pytest.mark.parametrize("case", CHECKPOINTS["liveness"], ids=lambda c: c["name"])
def test_liveness_vector(case: dict[str, Any]) -> None:
    def statement(hex_: str) -> liveness.Statement:
        cp = cps.open_checkpoint(bytes.fromhex(hex_), verifier=Verifier(),
                                 now_ms=case["now_ms"])
        return liveness.Statement(cp.size, cp.time, cp.root, cp.envelope)

    f = liveness.FeedLiveness()
    held = statement(case["held_hex"])
    assert f.observe(held, case["now_ms"])
    try:
        offered = statement(case["offered_hex"])
        got: Any = f.verdict(offered)
        assert f.observe(offered, case["now_ms"]) is (got == "new")
    except InvalidRecord as exc:
        got = {"error": exc.reason}
        assert f.newest == held  # a refusal changes nothing
    assert got == case["expect"]


def test_card_vector_is_the_docs_card_example() -> None:
    env = next(c["envelope_hex"] for c in CARDS["open"] if c["name"] == "valid")
    assert "".join(_fenced("hex card-example").split()) == env


# --------------------------------------------------------------------------- (c) the doc


def _fenced(info: str) -> str:
    blocks = re.findall(r"^```" + re.escape(info) + r"\n(.*?)^```", DOC, re.S | re.M)
    assert len(blocks) == 1, f"PROTOCOL.md needs exactly one ```{info} block"
    return str(blocks[0])


def test_doc_example_envelope_is_the_vector() -> None:
    case = BY_NAME["valid/custom-seq1"]
    assert "".join(_fenced("hex example-envelope").split()) == case["envelope_hex"]
    assert case["id_hex"] in DOC
    assert case["node_id"] in DOC


def test_doc_byte_by_byte_listing_reassembles_the_envelope() -> None:
    """Each line of the listing is hex, then (after two spaces) a comment; the one
    ``...`` stands for the middle of the 32-byte key."""
    case = BY_NAME["valid/custom-seq1"]
    pieces = []
    for line in _fenced("text envelope-bytes").splitlines():
        hex_part = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        pieces.append(hex_part.replace(" ", ""))
    joined = "".join(pieces)
    head, tail = joined.split("...")
    key = case["public_key_hex"]
    assert head.endswith(key[:8]) and tail.startswith(key[-8:])
    assert head + key[8:-8] + tail == case["envelope_hex"]


def test_doc_node_id_worked_example_is_the_vector() -> None:
    v = KEYS["node_ids"][0]
    for text in (v["seed_hex"], v["public_key_hex"], v["node_id"], v["node_id"][3:]):
        assert text in DOC
    assert " ".join(textwrap.wrap(v["checksum_hex"], 2)) in DOC


def test_doc_lists_every_domain_prefix_byte_for_byte() -> None:
    domains = [getattr(keys, n) for n in keys.__all__ if n.startswith("DOMAIN_")]
    assert len(domains) >= 5
    for d in domains:
        assert d.hex(" ") in DOC, f"PROTOCOL.md lacks the bytes of {d!r}"


def test_doc_has_the_sections_others_will_fill() -> None:
    assert re.search(r"^## Payload types$", DOC, re.M)
    assert "describe_types()" in DOC
    for title in ("Node cards", "Request signatures", "Sync messages and trust policy",
                  "Checkpoints", "Export bundles", "Encrypted (restricted) records"):
        assert re.search(rf"^## {re.escape(title)}$", DOC, re.M), title


# --------------------------------------------------------------------------- (c) openssl


def _openssl() -> str:
    exe = shutil.which("openssl")
    assert exe is not None, "openssl is needed for the auditor's recipe test"
    out = subprocess.run([exe, "version"], capture_output=True, text=True, check=True).stdout
    major = int(re.match(r"OpenSSL (\d+)\.", out).group(1))  # type: ignore[union-attr]
    assert major >= 3, f"pkeyutl -rawin needs OpenSSL 3, found {out.strip()}"
    return exe


def _run_recipe(tmp: Path, envelope_hex: str, nid: str) -> subprocess.CompletedProcess[str]:
    _openssl()
    (tmp / "envelope.bin").write_bytes(bytes.fromhex(envelope_hex))
    env = dict(os.environ)
    # The recipe's python3 must have msgpack: use this interpreter's directory first.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["NODE_ID"] = nid
    return subprocess.run(
        ["sh", "-c", _fenced("sh auditor-recipe")],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize(
    "name",
    ["valid/custom-seq1", "valid/CyberSecurityNotice", "valid/payload-64KiB",
     "valid/tombstone"],
)
def test_auditor_recipe_verifies_a_valid_record(tmp_path: Path, name: str) -> None:
    """bin8, bin16 and bin32 payload headers, and no payload, checked by openssl alone."""
    case = BY_NAME[name]
    p = _run_recipe(tmp_path, case["envelope_hex"], case["node_id"])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Signature Verified Successfully" in p.stdout
    assert f"{case['id_hex']} *body.bin" in p.stdout
    assert (tmp_path / "body.bin").read_bytes().hex() == case["body_hex"]
    if case["payload_hex"] is None:
        assert "no payload: a tombstone" in p.stdout
    else:
        assert "payload matches its digest" in p.stdout
        assert (tmp_path / "payload.bin").read_bytes().hex() == case["payload_hex"]


def test_recipe_covers_every_payload_header_width() -> None:
    def payload_tag(env: bytes) -> int:
        body, _sig, _payload = decode_record(env)
        return env[1 + {0xC4: 2, 0xC5: 3, 0xC6: 5}[env[1]] + len(body) + 66]

    tags = {payload_tag(bytes.fromhex(BY_NAME[n]["envelope_hex"])) for n in
            ("valid/custom-seq1", "valid/CyberSecurityNotice", "valid/payload-64KiB",
             "valid/tombstone")}
    assert tags == {0xC4, 0xC5, 0xC6, 0xC0}


def test_auditor_recipe_rejects_a_payload_that_does_not_match(tmp_path: Path) -> None:
    case = BY_NAME["payload/flipped-byte"]
    p = _run_recipe(tmp_path, case["envelope_hex"], case["node_id"])
    assert p.returncode != 0
    assert "the payload does not match its digest" in p.stdout + p.stderr


@pytest.mark.parametrize(
    "name", ["signature/bad-signature", "signature/other-key", "signature/flipped-body-byte"]
)
def test_auditor_recipe_rejects_a_bad_signature(tmp_path: Path, name: str) -> None:
    case = BY_NAME[name]
    p = _run_recipe(tmp_path, case["envelope_hex"], case["node_id"])
    assert p.returncode != 0
    assert "Signature Verification Failure" in p.stdout + p.stderr
    assert "*body.bin" not in p.stdout


def test_auditor_recipe_rejects_the_wrong_node(tmp_path: Path) -> None:
    case = BY_NAME["valid/custom-seq1"]
    other = KEYS["node_ids"][1]["node_id"]
    assert other != case["node_id"]
    p = _run_recipe(tmp_path, case["envelope_hex"], other)
    assert p.returncode != 0
    assert "Signature Verification Failure" in p.stdout + p.stderr


def test_auditor_recipe_rejects_a_mistyped_node_id(tmp_path: Path) -> None:
    case = BY_NAME["valid/custom-seq1"]
    typo = next(c["text"] for c in KEYS["invalid"] if c["name"] == "one-character-typo")
    p = _run_recipe(tmp_path, case["envelope_hex"], typo)
    assert p.returncode != 0
    assert "checksum mismatch" in p.stdout + p.stderr


def test_auditor_recipe_rejects_a_broken_envelope(tmp_path: Path) -> None:
    case = BY_NAME["envelope/trailing-bytes"]
    p = _run_recipe(tmp_path, case["envelope_hex"], case["node_id"])
    assert p.returncode != 0
    assert "envelope length does not match" in p.stdout + p.stderr


# --------------------------------------------------------------------------- sync


SYNC = _load("sync.json")


def _chainset(items: list[dict[str, Any]]) -> Any:
    from citynode.core import reconcile

    return reconcile.ChainSet({(bytes.fromhex(i["origin"]), i["feed"]):
                               (i["seq"], bytes.fromhex(i["head"])) for i in items})


def test_sync_item_hash_vectors() -> None:
    from citynode.core import reconcile

    for c in SYNC["item_hashes"]:
        key = reconcile.key_bytes(bytes.fromhex(c["origin"]), c["feed"])
        assert f"{reconcile.item_hash(key, c['seq'], bytes.fromhex(c['head'])):032x}" == c["hash"]


def test_sync_fingerprint_and_initial_vectors() -> None:
    from citynode.core import reconcile

    for c in SYNC["fingerprints"]:
        s = _chainset(c["items"])
        assert s.fp(0, len(s)).hex() == c["fingerprint"]
    for c in SYNC["initial"]:
        msg = reconcile.encode_message(reconcile.initial(_chainset(c["items"])))
        assert msg.hex() == c["message_hex"], c["name"]
        reconcile.decode_message(msg)


def test_sync_invalid_vectors() -> None:
    from citynode.core import reconcile
    from citynode.errors import EncodingError

    for c in SYNC["invalid"]:
        with pytest.raises(EncodingError) as exc:
            reconcile.decode_message(bytes.fromhex(c["message_hex"]))
        assert exc.value.reason == c["reason"], c["name"]


def test_two_records_with_the_same_data_have_different_digests() -> None:
    """The salt vector: the data is identical, the payloads and digests are not, and
    the digest is not the hash of the data alone."""
    a, b = BY_NAME["valid/custom-seq1"], BY_NAME["valid/same-data-other-salt"]
    pa, pb = (encoding.decode(bytes.fromhex(c["payload_hex"])) for c in (a, b))
    assert pa["data"] == pb["data"] == {"reading": 42, "unit": "dB"}
    assert pa["salt"] != pb["salt"] and len(pa["salt"]) == len(pb["salt"]) == 16
    da, db = (encoding.decode(bytes.fromhex(c["body_hex"]))["data_digest"] for c in (a, b))
    assert da != db
    assert hashlib.sha256(encoding.encode(pa["data"])).digest() not in (da, db)
