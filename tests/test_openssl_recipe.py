"""The auditor's recipe of docs/PROTOCOL.md, run literally, agrees with the node.

The ```sh auditor-recipe block is extracted from the doc and run by a real shell (POSIX
``sh`` and ``bash``) with the machine's ``openssl`` on every signature vector of
tests/vectors/records.json: every valid record (tombstones included) and every
``bad_signature`` one, including the hand-made Ed25519 edge cases (small-order keys and
R, non-canonical encodings, S out of range), and every ``payload_mismatch`` one (the
recipe's payload digest check). Its verdict must equal the node's for each one.

A second test shows the recipe's strict step is load-bearing: openssl alone accepts
exactly the vectors whose plain RFC 8032 equation holds with S < L, forgeries included.

The ```sh auditor-recipe-key-log block (key logs of version 2 identities) is run the same
way on every log of tests/vectors/keylog.json, the signature/* ones (the same Ed25519
edge cases, as key events) included: its verdict equals the node's, except for the
faults the doc says it does not check (heads going back, the clock), which it accepts.

Records of a cn2 origin (body version 3, tests/vectors/keylog.json ``records``) are
checked as the doc says: the key log recipe first, then the record recipe in the same
directory, which checks the signature by the key the body names and that key's window
(unknown_key, before_key, beyond_last_good, wrong_head): its verdict equals the node's
on each.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest

from citynode.core import keylog
from citynode.core.encoding import Limits
from citynode.core.keys import DOMAIN_RECORD, Verifier
from citynode.core.records import decode_envelope, decode_record, open_record
from citynode.errors import InvalidRecord

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
CASES: list[dict[str, Any]] = json.loads(
    (ROOT / "tests" / "vectors" / "records.json").read_text(encoding="utf-8")
)["cases"]
L = 2**252 + 27742317777372353535851937790883648493

_RECIPE_REASONS = ("bad_signature", "payload_mismatch")
SIGNATURE_VECTORS = [
    c for c in CASES if c["expect"] == "valid"
    or c["expect"] in ({"error": r} for r in _RECIPE_REASONS)
]
EDGE_VECTORS = [c for c in CASES if "equation_holds" in c]
KEY_LOGS: list[dict[str, Any]] = json.loads(
    (ROOT / "tests" / "vectors" / "keylog.json").read_text(encoding="utf-8")
)["logs"]
KEY_EDGE_LOGS = [c for c in KEY_LOGS if "equation_holds" in c]
# What the key log recipe says it does not check: these it accepts, the node refuses.
_NOT_IN_KEY_RECIPE = frozenset({"heads_regress", "future_time"})


def _recipe(info: str = "sh auditor-recipe") -> str:
    blocks = re.findall(r"^```" + re.escape(info) + r"\n(.*?)^```", DOC, re.S | re.M)
    assert len(blocks) == 1, f"PROTOCOL.md needs exactly one ```{info} block"
    return str(blocks[0])


def _run(shell: str, script: str, cwd: Path, node_id: str) -> subprocess.CompletedProcess[str]:
    _openssl()
    exe = shutil.which(shell)
    assert exe is not None, f"{shell} is needed to run the recipe"
    env = dict(os.environ, NODE_ID=node_id, LC_ALL="C")
    # The recipes' msgpack steps use python3 with msgpack: this interpreter's first.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return subprocess.run([exe, "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def _openssl() -> str:
    exe = shutil.which("openssl")
    assert exe is not None, "openssl (3.0 or later) is needed: apt-get install openssl"
    out = subprocess.run([exe, "version"], capture_output=True, text=True, check=True).stdout
    m = re.match(r"OpenSSL (\d+)\.", out)
    assert m is not None and int(m.group(1)) >= 3, f"need OpenSSL 3, found {out.strip()}"
    return exe


def _node_accepts(case: dict[str, Any]) -> bool:
    body, sig, payload = decode_record(bytes.fromhex(case["envelope_hex"]))
    try:
        open_record(body, sig, payload, now_ms=case["now_ms"], verifier=Verifier())
    except InvalidRecord as exc:
        assert exc.reason in _RECIPE_REASONS, exc.reason  # a signature or payload vector
        return False
    return True


def test_the_signature_vectors_include_every_edge_case() -> None:
    names = {c["name"] for c in SIGNATURE_VECTORS}
    assert {c["name"] for c in EDGE_VECTORS} <= names
    small_keys = [n for n in names if n.startswith("signature/small-order-key/")]
    small_r = [n for n in names if n.startswith("signature/small-order-r/")]
    assert len(small_keys) == len(small_r) == 14  # libsodium's 7 y values, either sign
    for needed in ("signature/non-canonical-key", "signature/non-canonical-r",
                   "signature/s-plus-l", "signature/s-l-minus-1",
                   "signature/mixed-order-key-valid"):
        assert needed in names
    assert sum(c["expect"] == "valid" for c in SIGNATURE_VECTORS) >= 20
    assert any(c["payload_hex"] is None for c in SIGNATURE_VECTORS if c["expect"] == "valid")
    assert sum(c["expect"] == {"error": "payload_mismatch"} for c in SIGNATURE_VECTORS) >= 2


@pytest.mark.parametrize("shell", ["sh", "bash"])
@pytest.mark.parametrize("case", SIGNATURE_VECTORS, ids=lambda c: c["name"])
def test_recipe_verdict_equals_the_nodes(tmp_path: Path, shell: str,
                                         case: dict[str, Any]) -> None:
    node = _node_accepts(case)
    assert node == (case["expect"] == "valid")
    (tmp_path / "envelope.bin").write_bytes(bytes.fromhex(case["envelope_hex"]))
    p = _run(shell, _recipe(), tmp_path, case["node_id"])
    out = p.stdout + p.stderr
    assert (p.returncode == 0) == node, f"recipe {'refused' if node else 'accepted'}:\n{out}"
    if node:
        assert "Signature Verified Successfully" in p.stdout
        assert f"{case['id_hex']} *body.bin" in p.stdout
    elif case["expect"] == {"error": "payload_mismatch"}:
        assert "Signature Verified Successfully" in p.stdout  # the body is authentic
        assert "the payload does not match its digest" in out
    else:
        assert "Signature Verification Failure" in out
        assert "*body.bin" not in p.stdout


@pytest.mark.parametrize("case", EDGE_VECTORS, ids=lambda c: c["name"])
def test_openssl_alone_accepts_exactly_the_equation_holders(tmp_path: Path,
                                                             case: dict[str, Any]) -> None:
    """Without the recipe's step 3, openssl would accept every forgery whose plain
    equation holds (small-order keys and R): the strict step is what refuses them."""
    sig = bytes.fromhex(case["sig_hex"])
    msg = DOMAIN_RECORD + bytes.fromhex(case["body_hex"])
    s_in_range = int.from_bytes(sig[32:], "little") < L
    assert _openssl_alone(tmp_path, case["public_key_hex"], msg, sig) == (
        case["equation_holds"] and s_in_range)
    if case["equation_holds"] and s_in_range and case["expect"] != "valid":
        assert not _node_accepts(case)  # a forgery openssl takes and the node refuses


def _openssl_alone(tmp_path: Path, key_hex: str, msg: bytes, sig: bytes) -> bool:
    """Whether ``openssl pkeyutl -verify`` alone (no strict step) accepts ``sig``."""
    der = bytes.fromhex("302a300506032b6570032100" + key_hex)
    (tmp_path / "key.der").write_bytes(der)
    (tmp_path / "msg.bin").write_bytes(msg)
    (tmp_path / "sig.bin").write_bytes(sig)
    p = subprocess.run(
        [_openssl(), "pkeyutl", "-verify", "-pubin", "-keyform", "DER", "-inkey",
         "key.der", "-rawin", "-in", "msg.bin", "-sigfile", "sig.bin"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert p.returncode == 0 or "Signature Verification Failure" in p.stdout + p.stderr, (
        p.stdout + p.stderr)
    return p.returncode == 0


# --------------------------------------------------------------------------- key logs


def _node_reason(case: dict[str, Any]) -> str | None:
    """None if the node accepts the log, else its reason code."""
    envs = [bytes.fromhex(h) for h in case["events_hex"]]
    try:
        keylog.verify_log(case["node_id"], envs, verifier=Verifier(), now_ms=case["now_ms"])
    except InvalidRecord as exc:
        return exc.reason
    return None


def test_the_key_logs_include_every_edge_case() -> None:
    names = {c["name"] for c in KEY_EDGE_LOGS}
    assert sum(n.startswith("signature/small-order-key/") for n in names) == 14
    assert sum(n.startswith("signature/small-order-r/") for n in names) == 14
    for needed in ("signature/non-canonical-key", "signature/non-canonical-r",
                   "signature/s-plus-l", "signature/s-l-minus-1",
                   "signature/mixed-order-key-valid",
                   "signature/rotation-by-small-order-key",
                   "signature/recovery-by-small-order-key"):
        assert needed in names
    # Every width of the body's bin header (bin8, bin16, bin32) is split by the recipe.
    widths = {h[2:4] for c in KEY_LOGS if _node_reason(c) is None for h in c["events_hex"]}
    assert widths == {"c4", "c5", "c6"}, widths
    # The recipe is held to the node on signatures, order and commitments, and every
    # fault it does not check has a log, which it must accept (so the doc is exact).
    reasons = {_node_reason(c) for c in KEY_LOGS}
    assert {None, "bad_signature", "not_precommitted", "bad_recovery", "key_event_order",
            "wrong_identity", "bad_prev", "key_reused"} | _NOT_IN_KEY_RECIPE <= reasons


@pytest.mark.parametrize("shell", ["sh", "bash"])
@pytest.mark.parametrize("case", KEY_LOGS, ids=lambda c: c["name"])
def test_key_log_recipe_verdict_equals_the_nodes(tmp_path: Path, shell: str,
                                                 case: dict[str, Any]) -> None:
    reason = _node_reason(case)
    envs = [bytes.fromhex(h) for h in case["events_hex"]]
    # The wire form of a log, written here with msgpack (not the code under test).
    (tmp_path / "keylog.bin").write_bytes(msgpack.packb(envs, use_bin_type=True))
    p = _run(shell, _recipe("sh auditor-recipe-key-log"), tmp_path, case["node_id"])
    out = p.stdout + p.stderr
    accepts = reason is None or reason in _NOT_IN_KEY_RECIPE
    assert (p.returncode == 0) == accepts, (
        f"node: {reason or 'valid'}; recipe {'refused' if accepts else 'accepted'}:\n{out}")
    if accepts:
        assert f"key log of {case['node_id']} verified: {len(envs)} events" in p.stdout
        body, _sig = decode_envelope(envs[-1], Limits(max_bytes=keylog.MAX_EVENT_BYTES))
        assert f"id {hashlib.sha256(body).hexdigest()}," in p.stdout
    elif reason == "bad_signature":
        assert "Signature Verification Failure" in out
    else:
        assert "key log refused" in out and "Signature Verification Failure" not in out


@pytest.mark.parametrize("case", KEY_EDGE_LOGS, ids=lambda c: c["name"])
def test_openssl_alone_accepts_exactly_the_key_event_equation_holders(
        tmp_path: Path, case: dict[str, Any]) -> None:
    """As for records: openssl without the recipe's strict step would accept every
    key event forgery whose plain equation holds."""
    body, sig = decode_envelope(bytes.fromhex(case["events_hex"][-1]),
                                Limits(max_bytes=keylog.MAX_EVENT_BYTES))
    msg = keylog.DOMAIN_KEY_EVENT + body
    s_in_range = int.from_bytes(sig[32:], "little") < L
    assert _openssl_alone(tmp_path, case["signer_hex"], msg, sig) == (
        case["equation_holds"] and s_in_range)
    if case["equation_holds"] and s_in_range and "error" in case["expect"]:
        assert _node_reason(case) == "bad_signature"  # openssl takes it, the node does not


# --------------------------------------------------------------------------- cn2 records

V3_RECORDS: list[dict[str, Any]] = json.loads(
    (ROOT / "tests" / "vectors" / "keylog.json").read_text(encoding="utf-8")
)["records"]
_LOGS_BY_NAME = {c["name"]: c for c in KEY_LOGS}


def _v3_node_reason(case: dict[str, Any]) -> str | None:
    """None if the node accepts the record of a cn2 origin under its log, else why."""
    log = _LOGS_BY_NAME[case["log"]]
    state = keylog.verify_log(log["node_id"], [bytes.fromhex(h) for h in log["events_hex"]],
                              verifier=Verifier())
    body, sig, payload = decode_record(bytes.fromhex(case["envelope_hex"]))
    try:
        open_record(body, sig, payload, now_ms=case["now_ms"], verifier=Verifier(),
                    key_states=lambda origin: state if origin == state.identity else None)
    except InvalidRecord as exc:
        return exc.reason
    return None


def test_the_cn2_record_vectors_cover_every_key_verdict() -> None:
    reasons = {_v3_node_reason(c) for c in V3_RECORDS}
    assert reasons == {None, "bad_signature", "unknown_key", "before_key",
                       "beyond_last_good", "wrong_head"}
    assert all(_v3_node_reason(c) == (None if c["expect"] == "valid"
                                      else c["expect"]["error"]) for c in V3_RECORDS)


@pytest.mark.parametrize("shell", ["sh", "bash"])
@pytest.mark.parametrize("case", V3_RECORDS, ids=lambda c: c["name"])
def test_recipe_verdict_on_a_cn2_record_equals_the_nodes(tmp_path: Path, shell: str,
                                                         case: dict[str, Any]) -> None:
    """The key log recipe, then the record recipe in the same directory, as the doc
    says: the record is checked under the key its body names, in that key's window."""
    reason = _v3_node_reason(case)
    log = _LOGS_BY_NAME[case["log"]]
    envs = [bytes.fromhex(h) for h in log["events_hex"]]
    (tmp_path / "keylog.bin").write_bytes(msgpack.packb(envs, use_bin_type=True))
    p = _run(shell, _recipe("sh auditor-recipe-key-log"), tmp_path, log["node_id"])
    assert p.returncode == 0, p.stdout + p.stderr
    (tmp_path / "envelope.bin").write_bytes(bytes.fromhex(case["envelope_hex"]))
    p = _run(shell, _recipe(), tmp_path, log["node_id"])
    out = p.stdout + p.stderr
    assert (p.returncode == 0) == (reason is None), (
        f"node: {reason or 'valid'}; recipe {'accepted' if p.returncode == 0 else 'refused'}:"
        f"\n{out}")
    if reason is None:
        assert "Signature Verified Successfully" in p.stdout
        body = decode_record(bytes.fromhex(case["envelope_hex"]))[0]
        assert f"{hashlib.sha256(body).hexdigest()} *body.bin" in p.stdout
        assert " may sign " in p.stdout
    elif reason == "bad_signature":
        assert "Signature Verification Failure" in out
    else:
        assert "Signature Verified Successfully" in p.stdout  # authentic, wrong place
        assert f"{reason}:" in out


def test_the_record_recipe_needs_the_logs_recipe_first(tmp_path: Path) -> None:
    case = V3_RECORDS[0]
    (tmp_path / "envelope.bin").write_bytes(bytes.fromhex(case["envelope_hex"]))
    p = _run("sh", _recipe(), tmp_path, _LOGS_BY_NAME[case["log"]]["node_id"])
    assert p.returncode != 0 and "verify the key log" in p.stdout


def _refused_by_node_and_recipe(tmp_path: Path, shell: str, node_id: str,
                                wire: bytes) -> str:
    """The node refuses the log ``wire``; so does the recipe: its output."""
    with pytest.raises(InvalidRecord) as exc:
        keylog.verify_log(node_id, wire, verifier=Verifier())
    (tmp_path / "keylog.bin").write_bytes(wire)
    p = _run(shell, _recipe("sh auditor-recipe-key-log"), tmp_path, node_id)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "key log refused" in out, (exc.value.reason, out)
    return out


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_the_key_log_recipe_is_as_strict_as_the_node_on_encoding(tmp_path: Path,
                                                                 shell: str) -> None:
    """N4: a log array with a longer header than needed, and an inception whose seq is
    the string "0" (re-signed: a valid signature), pass a lenient msgpack decoder;
    the node refuses both, and so does the recipe."""
    from citynode.core.keys import SigningKey

    inc = next(c for c in KEY_LOGS if c["name"] == "inception")
    env = bytes.fromhex(inc["events_hex"][0])
    canonical = msgpack.packb([env], use_bin_type=True)
    assert canonical[0] == 0x91
    long_header = b"\xdc\x00\x01" + canonical[1:]  # array16 of one item
    assert msgpack.unpackb(long_header) == [env]  # lenient decoders take it
    out = _refused_by_node_and_recipe(tmp_path, shell, inc["node_id"], long_header)
    assert "not a canonical array" in out
    # seq as a string, signed by K0: a body a lenient decoder prints as "0".
    k0 = SigningKey(bytes.fromhex(json.loads(
        (ROOT / "tests" / "vectors" / "keylog.json").read_text(encoding="utf-8")
    )["seeds"]["K0"]))
    body, _sig = decode_envelope(env, Limits(max_bytes=keylog.MAX_EVENT_BYTES))
    fields = msgpack.unpackb(body)
    fields["seq"] = "0"
    bad = msgpack.packb(dict(sorted(fields.items())), use_bin_type=True)
    sig = k0.sign(keylog.DOMAIN_KEY_EVENT, bad)
    wire = msgpack.packb([msgpack.packb([bad, sig], use_bin_type=True)], use_bin_type=True)
    node_id = keylog.identity_id(keylog.identity_of(bad))
    out = _refused_by_node_and_recipe(tmp_path, shell, node_id, wire)
    assert "fields of their types" in out
