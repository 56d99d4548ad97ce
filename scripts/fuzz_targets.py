"""Fuzz targets: every decoder that takes bytes from outside, run by ``scripts/fuzz``.

A target is a function of one ``bytes`` input. It must return normally or raise a
:class:`~citynode.errors.CitynodeError` (a refusal, the decoder doing its job). Anything
else -- ``KeyError``, ``RecursionError``, ``OverflowError``, ``MemoryError`` ... -- is a
crash: outside bytes reached code that did not expect them. :class:`Disagreement` is
raised when two decoders of the same bytes disagree (one accepts what the other
refuses, or both accept with different results): that is a crash too, because an
attacker can feed one path what another would refuse.

The module is imported twice: by ``scripts/fuzz.py`` (the driver, to list targets and
build seed corpora) and by the atheris child process it starts per target (``python
scripts/fuzz_targets.py TARGET [libFuzzer flags] CORPUS_DIR``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import msgpack

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

NOW_MS = 1_735_693_200_000  # the vectors' "now": records dated then are not in the future


class Disagreement(AssertionError):
    """Two decoders of the same input disagree."""


def _verdict(fn: Callable[[], Any]) -> tuple[str, Any]:
    """("ok", result) or ("refused", reason) -- a CitynodeError is a verdict, not a crash."""
    from citynode.errors import CitynodeError

    try:
        return "ok", fn()
    except CitynodeError as exc:
        return "refused", getattr(exc, "reason", type(exc).__name__)


# ---- targets ------------------------------------------------------------------------


def t_msgpack(data: bytes) -> None:
    """The strict canonical decoder, against the reference msgpack library: whatever we
    accept, msgpack decodes to the same value, and we re-encode to the same bytes."""
    from citynode.core import encoding

    kind, value = _verdict(lambda: encoding.decode(data))
    if kind != "ok":
        return
    try:
        ref = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # the reference refuses what we accepted
        raise Disagreement(f"accepted by encoding.decode, refused by msgpack: {exc!r}") from exc
    if ref != value or type(ref) is not type(value):
        raise Disagreement(f"decoded differently: ours {value!r}, msgpack's {ref!r}")
    if encoding.encode(value) != data:
        raise Disagreement("accepted bytes that do not re-encode to themselves")


def t_envelope(data: bytes) -> None:
    """A record envelope: the one-record and the batch verification paths agree."""
    from citynode.core import records
    from citynode.core.keys import Verifier

    verifier = Verifier()

    def split() -> tuple[bytes, bytes, bytes | None]:
        return records.decode_record(data)

    kind, parts = _verdict(split)
    if kind != "ok":
        return
    body, sig, payload = parts[0], parts[1], parts[2]
    one = _verdict(lambda: records.open_record(body, sig, payload, now_ms=NOW_MS,
                                               verifier=verifier))
    batch = records.open_records([(body, sig, payload, None)], now_ms=NOW_MS,
                                 verifier=verifier)[0]
    two = ("refused", batch.reason) if isinstance(batch, Exception) else ("ok", batch)
    if one[0] != two[0] or (one[0] == "refused" and one[1] != two[1]):
        raise Disagreement(f"open_record says {one[:1]} {one[1] if one[0] != 'ok' else ''}, "
                           f"open_records says {two[:1]} {two[1] if two[0] != 'ok' else ''}")
    if one[0] == "ok" and one[1] != two[1]:
        raise Disagreement("open_record and open_records return different records")


def t_body(data: bytes) -> None:
    """A record body alone (no signature to stop the fuzzer early): field rules; and
    the same bytes as a payload (format 2 carries it beside the body): its decoding and
    validation as a built-in type and as an erasure request."""
    from citynode.core import encoding, records
    from citynode.core.types import ERASURE_TYPE, validate_payload

    _verdict(lambda: records.parse_body(data))
    kind, value = _verdict(lambda: encoding.decode(data))
    if kind == "ok":
        for type_name in ("AirQualityObserved", ERASURE_TYPE):
            _verdict(functools.partial(validate_payload, type_name, value))


def t_card(data: bytes) -> None:
    """A node card envelope, and its JSON form: both readings agree."""
    from citynode.core import cards
    from citynode.core.keys import Verifier

    verifier = Verifier()
    kind, card = _verdict(lambda: cards.open_card(data, expected_node_id=None,
                                                  verifier=verifier, now_ms=NOW_MS))
    if kind != "ok":
        return
    as_json = json.loads(json.dumps(cards.card_to_json(card)))
    back = _verdict(lambda: cards.card_from_json(as_json, expected_node_id=card.node_id,
                                                 verifier=verifier, now_ms=NOW_MS))
    if back[0] != "ok" or back[1] != card:
        raise Disagreement(f"a card's JSON form does not read back: {back!r}")


def t_card_json(data: bytes) -> None:
    """A node card as JSON text (how /.well-known/citynode serves it)."""
    from citynode.core import cards
    from citynode.core.keys import Verifier

    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return
    if isinstance(doc, dict):
        _verdict(lambda: cards.card_from_json(doc, expected_node_id=None,
                                              verifier=Verifier(), now_ms=NOW_MS))


def t_request(data: bytes) -> None:
    """Request signature headers (the input, split into header lines) of a request
    with an empty body: parsed, time-checked and verified as a partner endpoint does;
    a request that verifies must then be refused as a replay."""
    from citynode.core import httpsig
    from citynode.core.keys import Verifier

    headers: dict[str, str] = {}
    for line in data.decode("latin-1").split("\n")[:16]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    kind, sh = _verdict(lambda: httpsig.read_signature(headers))
    if kind != "ok":
        return
    _verdict(lambda: httpsig.claimed_signer(sh, now_ms=NOW_MS))
    replay, verifier = httpsig.ReplayCache(), Verifier()

    def verify() -> bytes:
        return httpsig.verify_request("POST", "/v1/push", sh, b"", now_ms=NOW_MS,
                                      replay=replay, verifier=verifier,
                                      expected_target=_SEED_ORIGIN)

    if _verdict(verify)[0] == "ok" and _verdict(verify)[0] == "ok":
        raise Disagreement("a verified request was accepted a second time (replay)")


def t_sync(data: bytes) -> None:
    """Sync messages: a frontier, wants, and a range-reconciliation message."""
    from citynode.core import reconcile, sync

    _verdict(lambda: sync.decode_frontier(data))
    _verdict(lambda: sync.decode_wants(data))
    _verdict(lambda: reconcile.decode_message(data))


def t_checkpoint(data: bytes) -> None:
    """Checkpoints, Merkle proofs, and fork and split-view proofs."""
    from citynode.core import chain, checkpoints
    from citynode.core.keys import Verifier

    verifier = Verifier()
    _verdict(lambda: checkpoints.open_checkpoint(data, verifier=verifier))
    _verdict(lambda: checkpoints.decode_inclusion(data))
    _verdict(lambda: checkpoints.decode_consistency(data))
    _verdict(lambda: checkpoints.verify_split_view(checkpoints.SplitViewProof.decode(data),
                                                   verifier))
    _verdict(lambda: chain.verify_fork_proof(chain.ForkProof.decode(data), verifier))


_SHM = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


@contextlib.contextmanager
def _bundle_file(data: bytes | None = None) -> Iterator[Path]:
    """A file of this process's for a bundle (in memory where /dev/shm is), removed
    after use: made at import, a directory each was left behind by every fuzzing and
    test process (libFuzzer ends its process without Python's exit handlers)."""
    path = Path(_SHM) / f"citynode-fuzz-{os.getpid()}.cnb"
    if data is not None:
        path.write_bytes(data)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def t_bundle(data: bytes) -> None:
    """An export bundle file, read item by item and then audited as `citynode audit`
    does: the format reader and the auditor agree on what is a bundle."""
    from citynode import audit, bundle

    with _bundle_file(data) as path:

        def read_all() -> int:
            return sum(1 for _ in bundle.iter_bundle(path))

        read = _verdict(read_all)
        report = _verdict(lambda: audit.audit_bundle(path, _SEED_ORIGIN, now_ms=NOW_MS))
    if read[0] == "refused" and report[0] == "ok" and report[1].ok:
        raise Disagreement(f"the reader refuses ({read[1]}) a bundle the audit passes")


#: The origin of the chain vectors (seed 01 * 32), whose records seed the bundle corpus.
_SEED_ORIGIN = "cn1rkeohxlubhyzl7ks3mwtzos5olfgocn7dwkbeg7toseadnapn5ogapgi"


def _seed_bundle() -> bytes:
    """A real bundle of the chain vectors' records of feed 'chain' (r1, r2, r3)."""
    from citynode import bundle
    from citynode.core.keys import parse_node_id

    chain = json.loads((ROOT / "tests" / "vectors" / "chain.json").read_text())["records"]
    envs = [bytes.fromhex(chain[k]["envelope_hex"]) for k in ("r1", "r2", "r3")]
    with _bundle_file() as path:
        bundle.write_bundle(path, origin=parse_node_id(_SEED_ORIGIN), card=None,
                            feeds={"chain": envs}, now_ms=NOW_MS)
        return path.read_bytes()


def t_config(data: bytes) -> None:
    """node.toml: any text either loads into a Config or is refused with ConfigError."""
    from citynode.config import parse_config

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    _verdict(lambda: parse_config(text))


def t_filter(data: bytes) -> None:
    """A record filter from a query string; what parses renders back to a query string
    that parses to the same filter."""
    from citynode.core.filters import parse_filter

    try:
        pairs = parse_qsl(data.decode("utf-8", "replace"), keep_blank_values=True,
                          max_num_fields=64)
    except ValueError:
        return  # more than 64 fields: the test's own query parser refuses it
    kind, flt = _verdict(lambda: parse_filter(pairs))
    if kind != "ok":
        return
    again = _verdict(lambda: parse_filter(parse_qsl(flt.to_query(), keep_blank_values=True)))
    if again != ("ok", flt):
        raise Disagreement(f"filter does not round-trip through its query string: {again!r}")


def _first_identity() -> bytes:
    from citynode.core.keylog import parse_identity_id

    logs = json.loads((ROOT / "tests" / "vectors" / "keylog.json").read_text())["logs"]
    return parse_identity_id(logs[0]["node_id"])


def t_keylog(data: bytes) -> None:
    """A key event log (version 2 identity) of the vectors' first identity, one event
    alone, and a cn2 id: a log that verifies folds to a state whose every event opens
    alone too."""
    from citynode.core import keylog
    from citynode.core.keys import Verifier
    from citynode.errors import CitynodeError

    verifier = Verifier()
    _verdict(lambda: keylog.open_event(data, verifier=verifier))
    _verdict(lambda: keylog.parse_identity_id(data.decode("latin-1")))
    kind, events = _verdict(lambda: keylog.decode_log(data))
    if kind != "ok":
        return
    state = _verdict(lambda: keylog.verify_log(_first_identity(), events, verifier=verifier))
    if state[0] == "ok":
        for env in events:
            try:
                keylog.open_event(env, verifier=verifier)
            except CitynodeError as exc:
                raise Disagreement("a verified log holds an event that does not open "
                                   f"alone: {exc}") from exc


def t_cosign(data: bytes) -> None:
    """A witness cosignature envelope."""
    from citynode.core import cosign
    from citynode.core.keys import Verifier

    _verdict(lambda: cosign.open_cosignature(data, verifier=Verifier()))


TARGETS: dict[str, Callable[[bytes], None]] = {
    "msgpack": t_msgpack,
    "envelope": t_envelope,
    "body": t_body,
    "card": t_card,
    "card-json": t_card_json,
    "request": t_request,
    "sync": t_sync,
    "checkpoint": t_checkpoint,
    "bundle": t_bundle,
    "config": t_config,
    "filter": t_filter,
    "keylog": t_keylog,
    "cosign": t_cosign,
}

if os.environ.get("CITYNODE_FUZZ_CANARY") == "1":
    def t_canary(data: bytes) -> None:
        """A target with a planted bug, so a test can show the driver reports crashes."""
        if data.startswith(b"CRASH"):
            raise KeyError("planted")

    TARGETS["canary"] = t_canary


# ---- seed corpora ---------------------------------------------------------------------


def _hex_strings(x: Any) -> Iterator[bytes]:
    """Every value under a key ending in ``hex`` in a vectors file, as bytes."""
    if isinstance(x, dict):
        for k, v in x.items():
            if k.endswith("hex"):
                for s in v if isinstance(v, list) else [v]:
                    if isinstance(s, str):
                        with contextlib.suppress(ValueError):
                            yield bytes.fromhex(s)
            else:
                yield from _hex_strings(v)
    elif isinstance(x, list):
        for v in x:
            yield from _hex_strings(v)


def seeds(target: str) -> list[bytes]:
    """The seed inputs of ``target``: byte strings from tests/vectors, card JSON, the
    shipped configs, a real bundle's bytes where one can be made cheaply."""
    vec = ROOT / "tests" / "vectors"
    docs = [json.loads(p.read_text()) for p in sorted(vec.glob("*.json"))]
    out: list[bytes] = []
    if target == "config":
        out += [p.read_bytes() for p in sorted((ROOT / "configs").glob("*.toml"))]
        out.append(b'[node]\nname = "x"\n')
    elif target == "card-json":
        for d in docs:
            for case in d.get("json", []) if isinstance(d.get("json"), list) else []:
                out.append(json.dumps(case.get("json")).encode())
    elif target == "filter":
        out += [b"type=AirQualityObserved&since=1735689600000",
                b"bbox=170,-10,-170,10&subject=s1&limit=10", b"feed=air&origin=cn1x"]
    elif target == "request":
        from citynode.core.httpsig import sign_request
        from citynode.core.keys import SigningKey

        for i in range(3):
            h = sign_request(SigningKey(bytes([i + 1]) * 32), "POST", "/v1/push", b"",
                             NOW_MS, nonce=f"fuzz-seed-nonce-{i:04d}", target=_SEED_ORIGIN)
            out.append("\n".join(f"{k}: {v}" for k, v in h.items()).encode())
        return out  # header text only: the vectors' binary strings teach it nothing
    elif target == "keylog":
        from citynode.core.keylog import encode_log

        for log in json.loads((vec / "keylog.json").read_text())["logs"]:
            out.append(encode_log([bytes.fromhex(h) for h in log["events_hex"]]))
    elif target == "canary":
        return [b"CRASH"]
    elif target == "bundle":
        out.append(_seed_bundle())
    for d in docs:
        out.extend(_hex_strings(d))
    # Inputs that once crashed this target (kept as regression tests, tests/test_fuzz.py).
    out += [p.read_bytes() for p in sorted((ROOT / "tests" / "fuzz_regressions" / target)
                                          .glob("*.bin"))]
    # Distinct, and small enough for libFuzzer's default max_len to matter little.
    return sorted(set(s for s in out if len(s) <= 1 << 16))


def write_corpus(target: str, directory: Path) -> int:
    """Write the seeds of ``target`` into ``directory``; returns how many."""
    directory.mkdir(parents=True, exist_ok=True)
    items = seeds(target)
    for i, s in enumerate(items):
        (directory / f"seed-{i:05d}").write_bytes(s)
    return len(items)


def _main() -> None:
    import atheris  # type: ignore[import-untyped]  # ships no type hints

    name = sys.argv.pop(1)
    target = TARGETS[name]
    with atheris.instrument_imports(include=["citynode"]):
        import citynode.bundle
        import citynode.config
        import citynode.core.cards
        import citynode.core.chain
        import citynode.core.checkpoints
        import citynode.core.cosign
        import citynode.core.encoding
        import citynode.core.filters
        import citynode.core.httpsig
        import citynode.core.keylog
        import citynode.core.reconcile
        import citynode.core.records
        import citynode.core.sync
        import citynode.core.types  # noqa: F401
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    _main()
