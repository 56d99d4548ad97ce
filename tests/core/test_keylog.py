"""The key event log of a node identity (citynode.core.keylog): ids, events, folding,
forks of a log, key verdicts, and recovery material. No event loop, no clock."""

from __future__ import annotations

import hashlib

import nacl.pwhash
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from citynode.core import encoding, keylog
from citynode.core.keylog import (
    DOMAIN_KEY_EVENT,
    EquivocationProof,
    Head,
    KeyEvent,
    KeyState,
    commit_key,
    compare_logs,
    decode_log,
    encode_log,
    identity_id,
    identity_of,
    incept,
    open_event,
    parse_identity_id,
    parse_recovery_phrase,
    recover,
    recovery_phrase,
    rotate,
    seal_recovery,
    unseal_recovery,
    verified_events,
    verify_equivocation,
    verify_log,
)
from citynode.core.keys import SigningKey, Verifier
from citynode.core.records import encode_envelope
from citynode.errors import InvalidNodeId, InvalidProof, InvalidRecord, KeyFileError

T0 = 1_735_689_600_000
K = [SigningKey(bytes([0x10 + i]) * 32) for i in range(8)]  # signing keys K0, K1, ...
Q = [SigningKey(bytes([0x40 + i]) * 32) for i in range(4)]  # recovery keys Q0, Q1, ...
X = SigningKey(bytes([0x66]) * 32)  # an attacker's own key
V = Verifier()


def rid(n: int) -> bytes:
    """A stand-in record id."""
    return hashlib.sha256(b"record %d" % n).digest()


def reason(exc: pytest.ExceptionInfo[InvalidRecord]) -> str:
    return exc.value.reason


class History:
    """A log built step by step, with the state after each event."""

    def __init__(self) -> None:
        ev = incept(K[0], K[1].public_key, Q[0].public_key, T0)
        self.events: list[KeyEvent] = [ev]
        self.identity = identity_of(ev.body)
        self.states: list[KeyState] = [verify_log(self.identity, [ev.envelope], verifier=V)]

    @property
    def state(self) -> KeyState:
        return self.states[-1]

    def add(self, ev: KeyEvent) -> KeyEvent:
        self.states.append(keylog.apply_event(self.state, ev))
        self.events.append(ev)
        return ev

    def envelopes(self) -> list[bytes]:
        return [e.envelope for e in self.events]


def three_rotations() -> History:
    h = History()
    h.add(rotate(h.state, K[1], K[2].public_key, T0 + 1000, {"air": (10, rid(10))}))
    h.add(rotate(h.state, K[2], K[3].public_key, T0 + 2000,
                 {"air": (20, rid(20)), "water": (5, rid(105))}))
    return h


# --------------------------------------------------------------------------- ids


def test_cn2_id_round_trips_and_has_the_v1_shape() -> None:
    h = History()
    nid = identity_id(h.identity)
    assert nid.startswith("cn2") and len(nid) == 59 and nid == nid.lower()
    assert parse_identity_id(nid) == h.identity
    assert parse_identity_id(f" \t{nid.upper().replace('CN2', 'cn2')}\r\n") == h.identity
    assert h.state.node_id == nid


@pytest.mark.parametrize("mangle", [
    lambda s: s[:-1],  # truncated
    lambda s: s + "a",
    lambda s: "cn1" + s[3:],  # a v1 prefix
    lambda s: s[:10] + ("b" if s[10] != "b" else "c") + s[11:],  # a typo
    lambda s: s[:10] + "1" + s[11:],  # outside the alphabet
    lambda s: s.replace("i", "\u0131", 1) if "i" in s else s[:5] + "\u0131" + s[6:],
    lambda s: s.replace("s", "\u017f", 1) if "s" in s else s[:5] + "\u017f" + s[6:],
    lambda s: "\u00a0" + s,
])
def test_malformed_cn2_ids_are_refused(mangle: object) -> None:
    nid = identity_id(History().identity)
    with pytest.raises(InvalidNodeId):
        parse_identity_id(mangle(nid))  # type: ignore[operator]


def test_cn1_ids_do_not_parse_as_cn2() -> None:
    with pytest.raises(InvalidNodeId):
        parse_identity_id(K[0].node_id)


# --------------------------------------------------------------------------- valid histories


def test_inception_alone() -> None:
    h = History()
    s = h.state
    assert (s.seq, s.key, s.next, s.recovery) == (0, K[0].public_key,
                                                 commit_key(K[1].public_key),
                                                 commit_key(Q[0].public_key))
    assert s.key_verdict(K[0].public_key, "air", 1) == (True, "valid")
    assert s.key_verdict(K[1].public_key, "air", 1) == (False, "unknown_key")


def test_rotations_give_each_key_its_window() -> None:
    h = three_rotations()
    s = verify_log(identity_id(h.identity), encode_log(h.events), verifier=V)
    assert s == h.state and s.key == K[2].public_key and s.seq == 2
    v = s.key_verdict
    # K0 signed air 1..10, nothing on water.
    assert v(K[0].public_key, "air", 1).valid and v(K[0].public_key, "air", 10, rid(10)).valid
    assert v(K[0].public_key, "air", 10, rid(11)) == (False, "wrong_head")
    assert v(K[0].public_key, "air", 11) == (False, "beyond_last_good")
    assert v(K[0].public_key, "water", 1) == (False, "beyond_last_good")
    # K1 signed air 11..20 and water 1..5.
    assert v(K[1].public_key, "air", 10) == (False, "before_key")
    assert v(K[1].public_key, "air", 11).valid and v(K[1].public_key, "water", 5).valid
    assert v(K[1].public_key, "air", 21) == (False, "beyond_last_good")
    # K2 is current: anything after the established heads.
    assert v(K[2].public_key, "air", 20) == (False, "before_key")
    assert v(K[2].public_key, "air", 21).valid and v(K[2].public_key, "new", 1).valid
    assert [w.key for w in s.keys] == [K[0].public_key, K[1].public_key, K[2].public_key]


def test_recovery_after_stolen_keys_invalidates_backdated_records() -> None:
    """The thief holds K1 and K2 and rotated to K2; the owner recovers from seq 1 (the
    last good event) with Q0, keeping air up to 15. Records by K1 beyond 15 are invalid
    whatever time they claim (no time is even asked), and K2 is unknown."""
    h = History()
    h.add(rotate(h.state, K[1], K[2].public_key, T0 + 1000, {"air": (10, rid(10))}))
    good = h.state
    thief = keylog.apply_event(good, rotate(good, K[2], X.public_key, T0 + 2000,
                                            {"air": (30, rid(30))}))
    assert thief.key == K[2].public_key
    rec = recover(good, Q[0], K[4].public_key, K[5].public_key, Q[1].public_key, T0 + 3000,
                  {"air": (15, rid(15))})
    h.add(rec)
    s = h.state
    assert s.key == K[4].public_key and s.recovery == commit_key(Q[1].public_key)
    assert s.key_verdict(K[1].public_key, "air", 15, rid(15)).valid
    assert s.key_verdict(K[1].public_key, "air", 16) == (False, "beyond_last_good")
    assert s.key_verdict(K[1].public_key, "water", 1) == (False, "beyond_last_good")
    assert s.key_verdict(K[2].public_key, "air", 16) == (False, "unknown_key")
    assert s.key_verdict(K[0].public_key, "air", 5).valid  # old records stay valid
    assert s.key_verdict(K[4].public_key, "air", 16).valid
    # The recovery key rotated on use: Q0 cannot recover again.
    with pytest.raises(InvalidRecord) as e:
        recover(s, Q[0], K[6].public_key, K[7].public_key, Q[2].public_key, T0 + 4000, {})
    assert reason(e) == "bad_recovery"
    s2 = keylog.apply_event(s, recover(s, Q[1], K[6].public_key, K[7].public_key,
                                       Q[2].public_key, T0 + 4000, {}))
    # Unnamed feeds: the superseded key K4 keeps nothing beyond the established heads.
    assert s2.key_verdict(K[4].public_key, "air", 16) == (False, "beyond_last_good")


# --------------------------------------------------------------------------- refusals


def _resign(signer: SigningKey, ev: KeyEvent, **change: object) -> bytes:
    fields = encoding.decode(ev.body, encoding.Limits(max_bytes=1 << 20))
    fields.update(change)
    body = encoding.encode({k: v for k, v in fields.items() if v is not ...})
    return encode_envelope(body, signer.sign(DOMAIN_KEY_EVENT, body))


def _refused(h: History, env: bytes) -> str:
    with pytest.raises(InvalidRecord) as e:
        verify_log(h.identity, [*h.envelopes(), env], verifier=V)
    return reason(e)


def test_forged_rotation_by_a_stolen_current_key_is_refused() -> None:
    h = History()
    honest = rotate(h.state, K[1], K[2].public_key, T0 + 1000, {})
    # The thief holds K0: signing the rotation with it, or naming their own key.
    assert _refused(h, _resign(K[0], honest)) == "bad_signature"
    assert _refused(h, _resign(K[0], honest, key=K[0].public_key)) in ("not_precommitted",)
    assert _refused(h, _resign(X, honest, key=X.public_key)) == "not_precommitted"
    assert verify_log(h.identity, [*h.envelopes(), honest.envelope], verifier=V).seq == 1


def test_recovery_without_the_recovery_key_is_refused() -> None:
    h = History()
    rec = recover(h.state, Q[0], K[4].public_key, K[5].public_key, Q[1].public_key,
                  T0 + 1, {})
    assert _refused(h, _resign(X, rec, recovery_key=X.public_key)) == "bad_recovery"
    assert _refused(h, _resign(K[0], rec)) == "bad_signature"  # not signed by Q0


@pytest.mark.parametrize(("change", "code"), [
    ({"seq": 3}, "key_event_order"),
    ({"seq": 1}, "key_event_order"),
    ({"time": T0 - 1}, "key_event_order"),
    ({"prev": b"\x00" * 32}, "bad_prev"),
    ({"identity": b"\x00" * 32}, "wrong_identity"),
    ({"heads": {"air": [9, rid(9)]}}, "heads_regress"),
    ({"heads": {"air": [10, rid(11)]}}, "heads_regress"),
    ({"key": K[0].public_key}, "not_precommitted"),
    ({"type": "inception"}, "missing_field"),  # an inception has a recovery commitment
    ({"kind": "record"}, "bad_kind"),
    ({"version": 2}, "unknown_version"),
    ({"next": b"\x00" * 31}, "bad_field"),
    ({"heads": ...}, "missing_field"),
    ({"extra": 1}, "unknown_field"),
    ({"heads": {"Bad Feed": [1, rid(1)]}}, "bad_field"),
    ({"heads": {"air": [0, rid(1)]}}, "bad_field"),
])
def test_each_fault_of_an_event_has_its_reason(change: dict[str, object], code: str) -> None:
    h = History()
    h.add(rotate(h.state, K[1], K[2].public_key, T0 + 1000, {"air": (10, rid(10))}))
    nxt = rotate(h.state, K[2], K[3].public_key, T0 + 2000, {})
    # Signed by the key the changed body names, so only the one fault is left.
    signer = next((k for k in K if k.public_key == change.get("key")), K[2])
    assert _refused(h, _resign(signer, nxt, **change)) == code


def test_key_reuse_is_refused() -> None:
    h = History()
    with pytest.raises(InvalidRecord) as e:
        recover(h.state, Q[0], K[0].public_key, K[5].public_key, Q[1].public_key, T0, {})
    assert reason(e) == "key_reused"
    with pytest.raises(InvalidRecord) as e:  # the recovery key committed to again
        recover(h.state, Q[0], K[4].public_key, K[5].public_key, Q[0].public_key, T0, {})
    assert reason(e) == "key_reused"


def test_log_structure_faults() -> None:
    h = three_rotations()
    envs = h.envelopes()
    for log, code in [
        ([envs[1], envs[2]], "key_event_order"),  # no inception first
        ([envs[0], envs[2]], "key_event_order"),  # a gap
        ([envs[0], envs[1], envs[1]], "key_event_order"),  # an event replayed
        ([envs[0], envs[0]], "key_event_order"),  # a second inception
    ]:
        with pytest.raises(InvalidRecord) as e:
            verify_log(h.identity, log, verifier=V)
        assert reason(e) == code
    other = incept(K[3], K[4].public_key, Q[0].public_key, T0)
    with pytest.raises(InvalidRecord) as e:
        verify_log(h.identity, [other.envelope], verifier=V)
    assert reason(e) == "wrong_identity"
    with pytest.raises(InvalidRecord) as e:
        verify_log(h.identity, envs, verifier=V, now_ms=T0 - 16 * 60_000)
    assert reason(e) == "future_time"
    with pytest.raises(InvalidRecord) as e:
        decode_log(encoding.encode([]))
    assert reason(e) == "bad_field"
    with pytest.raises(InvalidRecord) as e:
        verify_log(h.identity, [envs[0]] * (keylog.MAX_LOG_EVENTS + 1), verifier=V)
    assert reason(e) == "too_many_items"
    assert decode_log(encode_log(envs)) == envs


def test_heads_are_bounded() -> None:
    h = History()
    heads = {f"f{i}": (1, rid(i)) for i in range(keylog.MAX_HEAD_FEEDS + 1)}
    with pytest.raises(InvalidRecord) as e:
        rotate(h.state, K[1], K[2].public_key, T0, heads)
    assert reason(e) in ("too_many_items", "too_large")
    del heads["f0"]
    ev = rotate(h.state, K[1], K[2].public_key, T0, heads)
    assert len(ev.envelope) <= keylog.MAX_EVENT_BYTES


# --------------------------------------------------------------------------- forks of a log


def _events(h: History) -> list[KeyEvent]:
    return verified_events(h.identity, h.envelopes(), verifier=V)[1]


def _compare(held: list[KeyEvent], got: list[KeyEvent]) -> keylog.LogDecision:
    ident = identity_of(held[0].body)
    hs = verify_log(ident, [e.envelope for e in held], verifier=V)
    rs = verify_log(ident, [e.envelope for e in got], verifier=V)
    return compare_logs(held, got, held_state=hs, received_state=rs)


def test_truncated_or_replayed_log_is_stale() -> None:
    evs = _events(three_rotations())
    d = _compare(evs, evs[:2])
    assert d.outcome == "stale" and not d.accept and d.error is not None
    assert d.error.reason == "stale_key_log" and d.state.seq == 2
    assert _compare(evs, evs).outcome == "same"
    d = _compare(evs[:2], evs)
    assert d.outcome == "extends" and d.accept and d.state.seq == 2


def test_recovery_beats_rotations_after_its_branch_point() -> None:
    h = History()
    h.add(rotate(h.state, K[1], K[2].public_key, T0 + 1000, {}))
    base = h.events[:2]
    thief = [*base, rotate(h.state, K[2], X.public_key, T0 + 2000, {"air": (99, rid(99))})]
    # The owner branches at seq 0 (K1 was stolen too).
    owner = [base[0], recover(h.states[0], Q[0], K[4].public_key, K[5].public_key,
                              Q[1].public_key, T0 + 3000, {})]
    d = _compare(thief, owner)
    assert d.outcome == "recovered" and d.accept and d.state.key == K[4].public_key
    d = _compare(owner, thief)
    assert d.outcome == "superseded" and not d.accept
    assert d.error is not None and d.error.reason == "superseded_key_log"


def test_two_rotations_at_one_seq_are_a_key_fork_with_a_portable_proof() -> None:
    h = History()
    a = [h.events[0], rotate(h.state, K[1], K[2].public_key, T0 + 1, {})]
    b = [h.events[0], rotate(h.state, K[1], X.public_key, T0 + 1, {"air": (5, rid(5))})]
    d = _compare(a, b)
    assert d.outcome == "key-fork" and not d.accept and d.proof is not None
    assert d.error is not None and d.error.reason == "key_fork"
    assert d.state.seq == 1 and d.state.head_id == a[1].id  # the first seen is kept
    proof = EquivocationProof.decode(d.proof.encode())
    assert verify_equivocation(identity_id(h.identity), proof, verifier=V).seq == 0
    assert _compare(b, a).proof == d.proof  # one proof, whichever side found it


def test_two_recoveries_by_one_recovery_key_kill_the_identity() -> None:
    h = History()
    s0 = h.state
    rot = rotate(s0, K[1], K[2].public_key, T0 + 1, {"air": (3, rid(3))})
    s1 = keylog.apply_event(s0, rot)
    a = [h.events[0], rot, recover(s1, Q[0], K[4].public_key, K[5].public_key,
                                   Q[1].public_key, T0 + 2, {})]
    b = [h.events[0], recover(s0, Q[0], K[6].public_key, K[7].public_key,
                              Q[2].public_key, T0 + 2, {})]
    d = _compare(a, b)
    assert d.outcome == "dead" and d.proof is not None and d.state.dead
    assert d.error is not None and d.error.reason == "recovery_equivocation"
    dead = verify_equivocation(h.identity, d.proof, verifier=V)
    assert dead.dead and dead == d.state
    for key in (K[0], K[4], K[6]):
        assert not dead.key_verdict(key.public_key, "air", 1).valid
    assert dead.key_verdict(K[0].public_key, "air", 1).reason == "identity_dead"
    with pytest.raises(InvalidRecord) as e:
        keylog.apply_event(dead, b[1])
    assert reason(e) == "identity_dead"


def test_equivocation_proofs_that_prove_nothing_are_refused() -> None:
    h = History()
    rot = rotate(h.state, K[1], K[2].public_key, T0 + 1, {})
    prefix = (h.events[0].envelope,)
    bad = [
        EquivocationProof("key-fork", prefix, (rot.envelope,), (rot.envelope,)),
        EquivocationProof("recovery-equivocation", prefix, (rot.envelope,),
                          (_resign(K[1], rot, time=T0 + 2),)),
        EquivocationProof("key-fork", prefix, (rot.envelope,), (_resign(X, rot),)),
        EquivocationProof("key-fork", (), (rot.envelope,), (rot.envelope,)),
    ]
    for p in bad:
        with pytest.raises(InvalidProof):
            verify_equivocation(h.identity, p, verifier=V)
    with pytest.raises(InvalidProof):
        EquivocationProof.decode(encoding.encode({"kind": "key-fork"}))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(["rotate", "recover"]), min_size=1, max_size=6),
       st.integers(min_value=0, max_value=5), st.data())
def test_any_history_verifies_and_every_truncation_is_stale(
        steps: list[str], branch: int, data: st.DataObject) -> None:
    """Random histories of rotations and recoveries fold to the state built step by
    step; every strict prefix is refused against the whole; every retired key stops at
    its heads."""
    h = History()
    ki, qi, seq = 1, 0, 0
    keys = [SigningKey(hashlib.sha256(b"k%d" % i).digest()) for i in range(20)]
    keys[1] = K[1]
    for i, step in enumerate(steps):
        seq += data.draw(st.integers(min_value=0, max_value=3))
        heads = {"air": (seq, rid(seq))} if seq else {}
        if step == "rotate":
            h.add(rotate(h.state, keys[ki], keys[ki + 1].public_key, T0 + i, heads))
            ki += 1
        else:
            h.add(recover(h.state, Q[qi], keys[ki + 1].public_key, keys[ki + 2].public_key,
                          Q[qi + 1].public_key if qi < 3 else keys[19].public_key, T0 + i,
                          heads))
            ki += 2
            qi += 1
            if qi > 3:
                break
    evs = _events(h)
    assert verify_log(h.identity, h.envelopes(), verifier=V) == h.state
    cut = min(branch, len(evs) - 1)  # keep events 0..cut
    d = _compare(evs, evs[:cut + 1])
    assert d.outcome == ("stale" if cut + 1 < len(evs) else "same")
    assert d.state == h.state
    for w in h.state.keys[:-1]:
        assert w.end is not None
        top = w.end.get("air", Head(0, b"")).seq
        assert not h.state.key_verdict(w.key, "air", top + 1).valid


# --------------------------------------------------------------------------- events


def test_open_event_exposes_the_fields() -> None:
    ev = incept(K[0], K[1].public_key, Q[0].public_key, T0)
    again = open_event(ev.envelope, verifier=V)
    assert again == ev and again.signer == K[0].public_key and again.identity is None
    assert ev.id == hashlib.sha256(ev.body).digest()
    with pytest.raises(InvalidRecord) as e:
        open_event(b"\x92" + ev.envelope[1:-1] + bytes([ev.envelope[-1] ^ 1]), verifier=V)
    assert reason(e) == "bad_signature"


# --------------------------------------------------------------------------- recovery material


def test_recovery_file_seals_and_unseals() -> None:
    ident = History().identity
    text = seal_recovery(Q[0].seed, ident, "correct horse",
                         opslimit=nacl.pwhash.argon2id.OPSLIMIT_MIN,
                         memlimit=nacl.pwhash.argon2id.MEMLIMIT_MIN)
    assert text.startswith(f"citynode-recovery-v1 {identity_id(ident)}\n".encode())
    assert unseal_recovery(text, "correct horse") == (ident, Q[0].seed)
    with pytest.raises(KeyFileError):
        unseal_recovery(text, "wrong")
    with pytest.raises(KeyFileError):
        seal_recovery(Q[0].seed, ident, "")
    with pytest.raises(KeyFileError):
        unseal_recovery(b"citynode-secret-key-v1 plain AAAA\n", "x")


def test_recovery_phrase_round_trips_and_catches_typos() -> None:
    phrase = recovery_phrase(Q[0].seed)
    assert phrase.startswith("crq1-") and len(phrase.split("-")) == 15
    assert parse_recovery_phrase(phrase) == Q[0].seed
    assert parse_recovery_phrase(" " + phrase.upper()
                                 .replace("-", " ") + "\n") == Q[0].seed
    typo = phrase[:-1] + ("a" if phrase[-1] != "a" else "b")
    for bad in (typo, phrase[:-4], phrase.replace("a", "\u0430", 1) + "a"):
        with pytest.raises(KeyFileError):
            parse_recovery_phrase(bad)


def test_a_hostile_log_is_refused_before_any_signature_is_checked() -> None:
    """Cheapest first: a log of many events whose inception does not hash to the id,
    or whose chain does not link, costs no signature verification."""
    h = History()
    for i in range(1, 6):
        h.add(rotate(h.state, K[i], K[i + 1].public_key, T0 + i, {}))
    envs = h.envelopes()
    other = identity_of(incept(X, K[1].public_key, Q[0].public_key, T0).body)
    v = Verifier()  # counts the signatures it checks
    with pytest.raises(InvalidRecord) as exc:
        verify_log(other, envs, verifier=v)
    assert reason(exc) == "wrong_identity" and v.count == 0
    broken = [*envs[:3], *envs[4:]]  # a gap: seq 4 after seq 2
    with pytest.raises(InvalidRecord) as exc:
        verify_log(h.identity, broken, verifier=v)
    assert reason(exc) == "key_event_order" and v.count == 0
    # The whole log verifies with one signature per event.
    verify_log(h.identity, envs, verifier=v)
    assert v.count == len(envs)
