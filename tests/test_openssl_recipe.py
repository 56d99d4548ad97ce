"""The auditor's recipe of docs/PROTOCOL.md, run literally, agrees with the node.

The ```sh auditor-recipe block is extracted from the doc and run by a real shell (POSIX
``sh`` and ``bash``) with the machine's ``openssl`` on every signature vector of
tests/vectors/records.json: every valid record (tombstones included) and every
``bad_signature`` one, including the hand-made Ed25519 edge cases (small-order keys and
R, non-canonical encodings, S out of range), and every ``payload_mismatch`` one (the
recipe's payload digest check). Its verdict must equal the node's for each one.

A second test shows the recipe's strict step is load-bearing: openssl alone accepts
exactly the vectors whose plain RFC 8032 equation holds with S < L, forgeries included.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from citynode.core.keys import DOMAIN_RECORD, Verifier
from citynode.core.records import decode_record, open_record
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


def _recipe() -> str:
    blocks = re.findall(r"^```sh auditor-recipe\n(.*?)^```", DOC, re.S | re.M)
    assert len(blocks) == 1, "PROTOCOL.md needs exactly one ```sh auditor-recipe block"
    return str(blocks[0])


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
    _openssl()
    exe = shutil.which(shell)
    assert exe is not None, f"{shell} is needed to run the recipe"
    node = _node_accepts(case)
    assert node == (case["expect"] == "valid")
    (tmp_path / "envelope.bin").write_bytes(bytes.fromhex(case["envelope_hex"]))
    env = dict(os.environ, NODE_ID=case["node_id"], LC_ALL="C")
    # The recipe's step 6 uses python3 with msgpack: this interpreter's first.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    p = subprocess.run([exe, "-c", _recipe()], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
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
    der = bytes.fromhex("302a300506032b6570032100" + case["public_key_hex"])
    (tmp_path / "key.der").write_bytes(der)
    (tmp_path / "msg.bin").write_bytes(DOMAIN_RECORD + bytes.fromhex(case["body_hex"]))
    (tmp_path / "sig.bin").write_bytes(sig)
    p = subprocess.run(
        [_openssl(), "pkeyutl", "-verify", "-pubin", "-keyform", "DER", "-inkey",
         "key.der", "-rawin", "-in", "msg.bin", "-sigfile", "sig.bin"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    s_in_range = int.from_bytes(sig[32:], "little") < L
    assert (p.returncode == 0) == (case["equation_holds"] and s_in_range), p.stdout + p.stderr
    if case["equation_holds"] and s_in_range and case["expect"] != "valid":
        assert not _node_accepts(case)  # a forgery openssl takes and the node refuses
