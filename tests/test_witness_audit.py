"""Witness cosignatures in export bundles and the offline audit (issue 12, point 4):
``citynode audit --witness ID ... --quorum K``. No network, no event loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from citynode.audit import AuditReport, audit_bundle
from citynode.bundle import COSIGNATURE, KEY_LOG, BundleCounts, iter_bundle, write_bundle
from citynode.cli_audit import audit_cmd
from citynode.core import cosign as cs
from citynode.core import keylog
from citynode.core.checkpoints import open_checkpoint
from citynode.core.keys import SigningKey, Verifier
from citynode.errors import InvalidRecord
from tests.test_audit import KEY, NOW, T0, card_env, chain, cp_env, errors, warnings

W0, W1 = SigningKey(bytes([40]) * 32), SigningKey(bytes([41]) * 32)
# A cn2 witness: identity D from its inception, signing with K0, then K1 after a rotation.
K0, K1, K2, Q0 = (SigningKey(bytes([50 + i]) * 32) for i in range(4))
INCEPTION = keylog.incept(K0, K1.public_key, Q0.public_key, T0)
D = keylog.identity_of(INCEPTION.body)
ROTATION = keylog.rotate(keylog.verify_log(D, [INCEPTION.envelope], verifier=Verifier()),
                         K1, K2.public_key, T0 + 1000, {})
LOG_BEFORE = keylog.encode_log([INCEPTION])
LOG = keylog.encode_log([INCEPTION, ROTATION])
D_ID = keylog.identity_id(D)


def cp_of(env: bytes) -> Any:
    return open_checkpoint(env, verifier=Verifier())


def bundle(tmp_path: Path, cosigs: list[bytes], *, key_logs: list[bytes] | None = None,
           size: int = 6, extra_cps: list[bytes] | None = None,
           split: list[Any] | None = None) -> Path:
    recs = chain(0, "noise", 6)
    path = tmp_path / "w.bundle"
    write_bundle(path, origin=KEY.public_key, card=card_env(),
                 feeds={"noise": [r.envelope for r in recs]},
                 checkpoints=[cp_env(recs, 3), cp_env(recs, size), *(extra_cps or [])],
                 cosignatures=cosigs, key_logs=key_logs or [], split_views=split or [],
                 now_ms=NOW)
    return path


def sigs(env: bytes, *keys: tuple[SigningKey, bytes]) -> list[bytes]:
    cp = cp_of(env)
    return [cs.sign_cosignature(k, w, cp, NOW - 1000).envelope for k, w in keys]


def newest() -> bytes:
    return cp_env(chain(0, "noise", 6), 6)


def audit(path: Path, witnesses: list[str], quorum: int = 0, **kw: Any) -> AuditReport:
    return audit_bundle(path, KEY.node_id, now_ms=NOW, witnesses=witnesses, quorum=quorum,
                        **kw)


def test_a_quorum_of_cn1_and_cn2_witnesses_passes_and_is_reported(tmp_path: Path) -> None:
    env = newest()
    path = bundle(tmp_path, sigs(env, (W0, W0.public_key), (K1, D)), key_logs=[LOG])
    kinds = [i.kind for i in iter_bundle(path)]
    assert kinds.count(COSIGNATURE) == 2 and kinds.count(KEY_LOG) == 1
    end = list(iter_bundle(path))[-1].info
    assert isinstance(end, BundleCounts) and (end.cosignatures, end.key_logs) == (2, 1)
    rep = audit(path, [W0.node_id, D_ID], 2)
    assert rep.ok, rep.render_text()
    assert rep.witness is not None and rep.witness["quorum"] == 2
    by_size = {c["size"]: c for c in rep.witness["checkpoints"]}
    assert by_size[6]["ok"] and sorted(by_size[6]["witnesses"]) == sorted([W0.node_id, D_ID])
    assert not by_size[3]["ok"]  # older checkpoints are reported, only the newest must
    assert "checkpoint noise size 6: 2 of 2 cosignature(s) -- quorum met" in \
        rep.render_text()
    # Quorum 0 means all of them; a third witness named makes it 3, not met.
    assert audit(path, [W0.node_id, D_ID]).ok
    rep = audit(path, [W0.node_id, D_ID, W1.node_id])
    assert not rep.ok and errors(rep) == {"no_quorum"}
    # Without --witness nothing about witnesses is asked or said.
    plain = audit_bundle(path, KEY.node_id, now_ms=NOW)
    assert plain.ok and plain.witness is None


def test_a_cn2_witness_needs_its_key_log(tmp_path: Path) -> None:
    env = newest()
    path = bundle(tmp_path, sigs(env, (W0, W0.public_key), (K1, D)))  # no log carried
    rep = audit(path, [W0.node_id, D_ID], 2)
    assert not rep.ok and "no_quorum" in errors(rep)
    assert "cosignature_refused" in warnings(rep)  # wrong_key: D itself never signs
    # ... given out of band, it counts; a log that is not D's is simply not taken.
    other = keylog.encode_log([keylog.incept(W1, K2.public_key, Q0.public_key, T0)])
    assert audit(path, [W0.node_id, D_ID], 2, witness_key_logs=[other, LOG]).ok
    # Only the key in force now counts: a cosignature by the key the log has since
    # rotated away from is wrong_key (a leaked old key, whatever time it claims, mints
    # nothing; the witness cosigns its checkpoints again with its new key).
    old = sigs(env, (W0, W0.public_key), (K0, D))
    rep = audit(bundle(tmp_path, old, key_logs=[LOG]), [W0.node_id, D_ID], 2)
    assert not rep.ok and "no_quorum" in errors(rep)
    assert any(f.message.endswith("wrong_key") for f in rep.findings
               if f.kind == "cosignature_refused")
    assert cs.witness_keys(D, keylog.verify_log(D, LOG, verifier=Verifier())) == {
        K1.public_key}
    assert cs.witness_keys(W0.public_key, None) == {W0.public_key}
    # Before the rotation K0 was in force: then it counts.
    assert audit(bundle(tmp_path, old, key_logs=[LOG_BEFORE]), [W0.node_id, D_ID], 2).ok


def test_a_rotated_or_recovered_away_key_never_counts_again() -> None:
    """B1: K0, retired by a rotation, then a recovery: a thief holding K0 cosigns a
    checkpoint dated now (or backdated before the rotation): it does not count."""
    k3, k4, q1 = (SigningKey(bytes([60 + i]) * 32) for i in range(3))
    st = keylog.verify_log(D, LOG, verifier=Verifier())
    rec = keylog.recover(st, Q0, k3.public_key, k4.public_key, q1.public_key, T0 + 2000, {})
    st2 = keylog.verify_log(D, [INCEPTION.envelope, ROTATION.envelope, rec.envelope],
                            verifier=Verifier())
    keys = cs.witness_keys(D, st2)
    assert keys == {k3.public_key}
    cp = cp_of(newest())
    for key, time in ((K0, NOW), (K0, T0 + 1), (K1, NOW)):
        forged = cs.sign_cosignature(key, D, cp, time).envelope
        q = cs.check_quorum(cp, [forged], {D: keys}, 1, verifier=Verifier(), now_ms=NOW)
        assert not q.ok and q.rejected == ((0, "wrong_key"),)
    good = cs.sign_cosignature(k3, D, cp, NOW).envelope
    assert cs.check_quorum(cp, [good], {D: keys}, 1, verifier=Verifier(), now_ms=NOW).ok


def test_strangers_cannot_crowd_out_named_witnesses_and_one_key_counts_once() -> None:
    """S4: 64 cosignatures of witnesses not named, then the named ones: the cap applies
    after filtering, so the named ones count. One key named for two witnesses (the same
    key under two identities) counts once."""
    cp = cp_of(newest())
    strangers = [cs.sign_cosignature(s, s.public_key, cp, NOW).envelope
                 for s in (SigningKey(bytes([i]) * 32) for i in range(100, 170))]
    named = sigs(newest(), (W0, W0.public_key), (W1, W1.public_key))
    q = cs.check_quorum(cp, [*strangers, *named],
                        {W0.public_key: {W0.public_key}, W1.public_key: {W1.public_key}},
                        2, verifier=Verifier(), now_ms=NOW)
    assert q.ok and q.witnesses == {W0.public_key, W1.public_key}
    assert {r for _i, r in q.rejected} == {"not_witness"}
    # More than 64 of the named: the rest are too_many_items (not verified).
    many = {s.public_key: {s.public_key} for s in (SigningKey(bytes([i]) * 32)
                                                  for i in range(100, 170))}
    q = cs.check_quorum(cp, strangers, many, 1, verifier=Verifier(), now_ms=NOW)
    assert len(q.witnesses) == cs.MAX_COSIGNATURES
    assert [r for _i, r in q.rejected] == ["too_many_items"] * (70 - cs.MAX_COSIGNATURES)
    # One key, two identities named for it.
    twice = [cs.sign_cosignature(W0, W0.public_key, cp, NOW).envelope,
             cs.sign_cosignature(W0, W1.public_key, cp, NOW).envelope]
    q = cs.check_quorum(cp, twice, {W0.public_key: {W0.public_key},
                                    W1.public_key: {W0.public_key}}, 2,
                        verifier=Verifier(), now_ms=NOW)
    assert not q.ok and q.rejected == ((1, "duplicate"),)


def test_a_cosigned_checkpoint_encodes_at_most_64_chosen_deterministically() -> None:
    """S4: encode refuses what decode would; select_cosignatures keeps the preferred
    witnesses, then the others by witness bytes, whatever order they came in."""
    env = newest()
    cp = cp_of(env)
    signers = [SigningKey(bytes([i]) * 32) for i in range(100, 170)]
    envs = [cs.sign_cosignature(s, s.public_key, cp, NOW).envelope for s in signers]
    with pytest.raises(ValueError):
        cs.CosignedCheckpoint(env, tuple(envs)).encode()
    want = signers[-1].public_key
    a = cs.select_cosignatures(envs, {want})
    assert a == cs.select_cosignatures(list(reversed(envs)), {want})
    assert len(a) == cs.MAX_COSIGNATURES and cs.cosignature_fields(a[0]) == (
        want, want)
    decoded = cs.CosignedCheckpoint.decode(cs.CosignedCheckpoint(env, a).encode())
    assert decoded.cosignatures == a


def test_bad_cosignatures_do_not_count_and_say_why(tmp_path: Path) -> None:
    env = newest()
    good = sigs(env, (W0, W0.public_key))[0]
    flipped = bytearray(sigs(env, (W1, W1.public_key))[0])
    flipped[-1] ^= 1
    other_cp = cp_env(chain(0, "noise", 6), 6, root=b"\x01" * 32)
    cases = [
        good,
        bytes(flipped),  # bad_cosignature
        cs.sign_cosignature(W0, W0.public_key, cp_of(env), NOW + 3_600_000).envelope,
        cs.sign_cosignature(W1, W0.public_key, cp_of(env), NOW).envelope,  # wrong_key
        cs.sign_cosignature(W1, W1.public_key, cp_of(other_cp), NOW).envelope,
    ]
    rep = audit(bundle(tmp_path, cases), [W0.node_id, W1.node_id], 2)
    assert errors(rep) == {"no_quorum"}
    refused = [f.message for f in rep.findings if f.kind == "cosignature_refused"]
    for reason in ("bad_cosignature", "future_time", "wrong_key", "wrong_checkpoint"):
        assert any(m.endswith(reason) for m in refused), (reason, refused)
    assert rep.witness is not None
    assert [c["witnesses"] for c in rep.witness["checkpoints"] if c["size"] == 6] == [
        [W0.node_id]]
    assert "1 of 2 cosignature(s) -- NO QUORUM" in rep.render_text()


def test_a_split_view_in_the_bundle_fails_whatever_the_cosignatures(tmp_path: Path) -> None:
    """Two witnesses shown two roots of size 6: each cosigned its own. The bundle of
    one carries the split-view proof and its cosignatures: the audit fails."""
    from citynode.core.checkpoints import SplitViewProof

    env = newest()
    forged = cp_env(chain(0, "noise", 6), 6, root=b"\x07" * 32)
    c0 = sigs(env, (W0, W0.public_key))
    c1 = sigs(forged, (W1, W1.public_key))
    proof = cs.split_view(cs.CosignedCheckpoint(env, tuple(c0)),
                          cs.CosignedCheckpoint(forged, tuple(c1)), verifier=Verifier())
    assert isinstance(proof, SplitViewProof)
    rep = audit(bundle(tmp_path, c0 + c1, split=[proof]), [W0.node_id, W1.node_id], 1)
    assert "split_view" in errors(rep)
    # A witness that cosigned both roots is caught too.
    both = sigs(env, (W1, W1.public_key)) + c1
    rep = audit(bundle(tmp_path, both, extra_cps=[forged]), [W0.node_id, W1.node_id], 1)
    assert {"split_view", "witness_equivocation"} <= errors(rep)


def test_a_feed_without_a_checkpoint_has_no_quorum(tmp_path: Path) -> None:
    recs = chain(0, "noise", 3)
    path = tmp_path / "n.bundle"
    write_bundle(path, origin=KEY.public_key, card=card_env(),
                 feeds={"noise": [r.envelope for r in recs]}, now_ms=NOW)
    rep = audit(path, [W0.node_id], 1)
    assert errors(rep) == {"no_quorum"}


def test_a_quorum_larger_than_the_witnesses_is_refused(tmp_path: Path) -> None:
    path = bundle(tmp_path, [])
    with pytest.raises(ValueError):
        audit(path, [W0.node_id], 2)
    r = CliRunner().invoke(audit_cmd, [str(path), "--origin", KEY.node_id, "--witness",
                                       W0.node_id, "--quorum", "2"])
    assert r.exit_code == 2 and "--quorum" in r.output


def test_cli_audit_fails_without_a_quorum_and_passes_with_one(tmp_path: Path) -> None:
    env = newest()
    path = bundle(tmp_path, sigs(env, (W0, W0.public_key)))
    args = [str(path), "--origin", KEY.node_id, "--witness", W0.node_id, "--witness",
            W1.node_id, "--workers", "0"]
    r = CliRunner().invoke(audit_cmd, [*args, "--quorum", "2"])
    assert r.exit_code == 1, r.output
    assert "no_quorum" in r.output and "FAILED" in r.output
    r = CliRunner().invoke(audit_cmd, [*args, "--quorum", "1"])
    assert r.exit_code == 0, r.output
    assert "quorum met" in r.output
    # A cn2 witness's log given on the command line.
    log = tmp_path / "d.keylog"
    log.write_bytes(LOG)
    p2 = bundle(tmp_path, sigs(env, (K1, D)))
    r = CliRunner().invoke(audit_cmd, [str(p2), "--origin", KEY.node_id, "--witness", D_ID,
                                       "--witness-key-log", str(log), "--workers", "0"])
    assert r.exit_code == 0, r.output


def test_the_writer_bounds_key_logs_and_the_reader_counts_new_items(tmp_path: Path) -> None:
    from citynode import bundle as bundle_mod

    with pytest.raises(InvalidRecord):
        write_bundle(tmp_path / "x.bundle", origin=KEY.public_key, card=None, feeds={},
                     key_logs=[LOG] * (bundle_mod.MAX_KEY_LOG_ITEMS + 1), now_ms=NOW)
    # A bundle without cosignatures ends as before (no optional counts).
    path = bundle(tmp_path, [])
    end = [i for i in iter_bundle(path)][-1]
    import msgpack

    assert set(msgpack.unpackb(end.data)) == {"kind", "cards", "checkpoints", "forks",
                                              "records", "split_views"}


def test_export_carries_the_newest_checkpoints_cosignatures_past_10000_rows(
        tmp_path: Path) -> None:
    """B2: a feed holding more than 10,000 cosignature rows (here 259 older checkpoints
    with 40 each) still exports the cosignatures of its newest checkpoint, and the
    listing reads the checkpoints asked for, not the oldest rows."""
    from citynode.bundle import export_from_storage
    from citynode.storage import Storage

    n, strangers = 260, 40
    recs = chain(0, "noise", n)
    st = Storage.open(tmp_path / "c.db")
    pending: list[Any] = []
    try:
        st.append(list(recs), durable=True).result(30)
        for size in range(1, n + 1):
            env = cp_env(recs, size)
            cp = cp_of(env)
            st.put_checkpoint(cp.origin, cp.feed, size, cp.root, env).result(30)
            if size == 1:  # witnesses not named: signed once, stored under each size
                others = [cs.sign_cosignature(k, k.public_key, cp, NOW - 1000).envelope
                          for k in (SigningKey(bytes([100 + i]) * 32)
                                    for i in range(strangers))]
            if size < n:  # older ones: many rows (storage does not verify)
                for i, e in enumerate(others):
                    pending.append(st.put_cosignature(cp.origin, cp.feed, size, cp.root,
                                                      bytes([i]) * 32, NOW, e))
            else:
                for k in (W0, W1):
                    c = cs.sign_cosignature(k, k.public_key, cp, NOW - 1000)
                    pending.append(st.put_cosignature(cp.origin, cp.feed, size, cp.root,
                                                      k.public_key, c.time, c.envelope))
        for f in pending:
            f.result(60)
        rows = st.cosignatures(KEY.public_key, "noise", min_size=n)
        assert sorted(w for _s, _r, w, _e in rows) == sorted([W0.public_key,
                                                              W1.public_key])
        out = tmp_path / "b.bundle"
        later = NOW + n * 60_000  # the records are a minute apart
        export_from_storage(st, KEY.public_key, ["noise"], out, card=card_env(),
                            now_ms=later)
    finally:
        st.close()
    kinds = [i.kind for i in iter_bundle(out)]
    assert kinds.count(COSIGNATURE) == (n - 1) * strangers + 2 > 10_000
    rep = audit_bundle(out, KEY.node_id, now_ms=later,
                       witnesses=[W0.node_id, W1.node_id], quorum=2)
    assert rep.ok, rep.render_text()
    assert rep.witness is not None and rep.witness["checkpoints"][-1]["size"] == n
