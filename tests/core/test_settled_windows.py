"""A key event settles a retired key's window (docs/PROTOCOL.md, "Settled windows"): the
chain that ends at the head it names is the identity's history there, so two records at
one seq, or two checkpoints of one size, signed by the retired key (a thief holding it,
before or after the recovery) prove no fork or split view of the identity. No event
loop, no clock."""

from __future__ import annotations

import pytest

from citynode.core import checkpoints, keylog
from citynode.core.chain import ForkProof, verify_fork_proof
from citynode.core.keys import NodeKey, SigningKey, Verifier
from citynode.core.records import KeyStates, Record, sign_record
from citynode.errors import InvalidProof

T = 1_735_689_600_000
K0, K1, Q0, NEW, NXT, Q1 = (SigningKey(bytes([i]) * 32) for i in (1, 2, 0x40, 5, 6, 7))
V = Verifier()


class World:
    """Identity D (K0 in force, K1 next, Q0 recovery) with feed 'test' seqs 1..6."""

    def __init__(self) -> None:
        inc = keylog.incept(K0, K1.public_key, Q0.public_key, T)
        self.inc = inc
        self.D = keylog.identity_of(inc.body)
        self.k0 = NodeKey(K0.seed, self.D, keylog.identity_id(self.D), keylog.encode_log([inc]))
        self.recs: list[Record] = []
        prev = None
        for s in range(1, 7):
            r = self.sign(self.k0, s, prev, {"n": s})
            self.recs.append(r)
            prev = r.id
        self.before = keylog.verify_log(self.D, [inc.envelope], verifier=V)

    def sign(self, key: NodeKey, seq: int, prev: bytes | None, data: dict[str, int]) -> Record:
        return sign_record(key, feed="test", seq=seq, prev=prev, time_ms=T + seq,
                           type="org.example.Test", data=data)

    def recovered(self, last_good: int = 6) -> keylog.KeyState:
        ev = keylog.recover(self.before, Q0, NEW.public_key, NXT.public_key, Q1.public_key,
                            T + 100, {"test": (last_good, self.recs[last_good - 1].id)})
        return keylog.verify_log(self.D, [self.inc.envelope, ev.envelope], verifier=V)

    def rotated(self) -> keylog.KeyState:
        ev = keylog.rotate(self.before, K1, NXT.public_key, T + 100,
                           {"test": (6, self.recs[5].id)})
        return keylog.verify_log(self.D, [self.inc.envelope, ev.envelope], verifier=V)

    def states(self, st: keylog.KeyState) -> KeyStates:
        return lambda o: st if o == self.D else None


def test_settled_names_the_head_of_a_closed_window_only() -> None:
    w = World()
    st = w.recovered()
    assert st.settled(K0.public_key, "test", 1) == keylog.Head(6, w.recs[5].id)
    assert st.settled(K0.public_key, "test", 6) == keylog.Head(6, w.recs[5].id)
    assert st.settled(K0.public_key, "test", 7) is None  # beyond: refused anyway
    assert st.settled(K0.public_key, "other", 1) is None  # a feed not named
    assert st.settled(NEW.public_key, "test", 7) is None  # the key in force
    assert st.settled(X := SigningKey(b"\x66" * 32).public_key, "test", 3) is None
    assert X not in (K0.public_key, NEW.public_key)
    assert w.before.settled(K0.public_key, "test", 3) is None  # not retired yet


@pytest.mark.parametrize("retire", ["recovered", "rotated"])
def test_a_fork_by_the_retired_key_inside_its_window_proves_nothing(retire: str) -> None:
    w = World()
    alt3 = w.sign(w.k0, 3, w.recs[1].id, {"n": 333})  # the thief's, off the named chain
    proof = ForkProof(w.recs[2].envelope, alt3.envelope)
    # Before the key event the fork stands (nobody can tell which is honest) ...
    verify_fork_proof(proof, V, key_states=w.states(w.before))
    # ... after it, the named chain decides: no fork of the identity.
    st = getattr(w, retire)()
    with pytest.raises(InvalidProof) as exc:
        verify_fork_proof(proof, V, key_states=w.states(st))
    assert exc.value.reason == "settled_by_key_event"
    # A prev-mismatch pair inside the window too.
    alt4 = w.sign(w.k0, 4, b"\x99" * 32, {"n": 444})
    with pytest.raises(InvalidProof) as exc:
        verify_fork_proof(ForkProof(w.recs[2].envelope, alt4.envelope), V,
                          key_states=w.states(st))
    assert exc.value.reason == "settled_by_key_event"


def test_a_fork_by_the_key_in_force_still_holds_after_a_recovery() -> None:
    w = World()
    st = w.recovered()
    new = NodeKey(NEW.seed, w.D, keylog.identity_id(w.D), b"")
    a = w.sign(new, 7, w.recs[5].id, {"n": 7})
    b = w.sign(new, 7, w.recs[5].id, {"n": 77})
    got = verify_fork_proof(ForkProof(a.envelope, b.envelope), V,
                            key_states=w.states(st))
    assert {r.id for r in got} == {a.id, b.id}
    # The new key's record that does not link to the named head: its own fork.
    c = w.sign(new, 7, b"\x42" * 32, {"n": 7})
    verify_fork_proof(ForkProof(w.recs[5].envelope, c.envelope), V,
                      key_states=w.states(st))


def test_a_split_view_by_the_retired_key_inside_its_window_proves_nothing() -> None:
    w = World()
    cp_a = checkpoints.sign_checkpoint(w.k0, "test", 6, b"\xaa" * 32, T + 10**9)
    cp_b = checkpoints.sign_checkpoint(w.k0, "test", 6, b"\xbb" * 32, T + 10**9)
    proof = checkpoints.SplitViewProof(cp_a.envelope, cp_b.envelope)
    checkpoints.verify_split_view(proof, V, w.states(w.before))
    st = w.recovered()
    with pytest.raises(InvalidProof) as exc:
        checkpoints.verify_split_view(proof, V, w.states(st))
    assert exc.value.reason == "settled_by_key_event"
    # One side by the key in force (vouching for older records) and one by the retired
    # key: the retired key's word does not count against the identity either.
    new = NodeKey(NEW.seed, w.D, keylog.identity_id(w.D), b"")
    cp_n = checkpoints.sign_checkpoint(new, "test", 6, b"\xcc" * 32, T + 10**9)
    with pytest.raises(InvalidProof) as exc:
        checkpoints.verify_split_view(checkpoints.SplitViewProof(cp_a.envelope, cp_n.envelope),
                                      V, w.states(st))
    assert exc.value.reason == "settled_by_key_event"
    # Two by the key in force: a split view it answers for.
    cp_m = checkpoints.sign_checkpoint(new, "test", 6, b"\xdd" * 32, T + 10**9)
    checkpoints.verify_split_view(checkpoints.SplitViewProof(cp_m.envelope, cp_n.envelope),
                                  V, w.states(st))
