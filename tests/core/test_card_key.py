"""cards.judge_card_key: a cn2 node's card is judged by the key log the receiver holds,
not by the log the card carries (the vectors in keylog.json "cards" cover the main
cases; these cover the edges). No event loop, no clock."""

from __future__ import annotations

import pytest

from citynode.core import cards, keylog
from citynode.core.keybook import KeyBook
from citynode.core.keys import NodeKey, SigningKey, Verifier
from citynode.errors import InvalidRecord

T0 = 1_735_689_600_000
K = [SigningKey(bytes([0x20 + i]) * 32) for i in range(6)]
Q = [SigningKey(bytes([0x50 + i]) * 32) for i in range(3)]


def _card(key: SigningKey, time: int) -> cards.NodeCard:
    return cards.make_card(key, name="D", url="https://d.example", tls_fingerprint=None,
                           feeds=[], partners=[], software="citynode/0.1.0", now_ms=time)


def _logs() -> tuple[bytes, list[keylog.KeyEvent]]:
    inc = keylog.incept(K[0], K[1].public_key, Q[0].public_key, T0)
    ident = keylog.identity_of(inc.body)
    s0 = keylog.verify_log(ident, keylog.encode_log([inc]), verifier=Verifier())
    return ident, [inc, keylog.rotate(s0, K[1], K[2].public_key, T0 + 10, {})]


def test_a_cn1_card_and_a_card_with_no_log_held_are_current() -> None:
    assert cards.judge_card_key(_card(K[0], T0), None) == "current"
    ident, events = _logs()
    k1 = NodeKey(K[1].seed, ident, None, keylog.encode_log(events))
    card = _card(k1, T0 + 20)
    assert card.signer == K[1].public_key
    assert cards.judge_card_key(card, None) == "current"


def test_cards_of_a_dead_identity_are_refused() -> None:
    """Two recoveries by one recovery key: the identity is dead, and the key in force at
    the branch point signs no card any more."""
    ident, events = _logs()
    s1 = keylog.verify_log(ident, keylog.encode_log(events), verifier=Verifier())
    a = keylog.recover(s1, Q[0], K[3].public_key, K[4].public_key, Q[1].public_key,
                       T0 + 30, {})
    b = keylog.recover(s1, Q[0], K[5].public_key, K[4].public_key, Q[2].public_key,
                       T0 + 40, {})
    book = KeyBook()
    book.restore(ident, keylog.encode_log([*events, a]), verifier=Verifier())
    d = book.offer(ident, keylog.encode_log([*events, b]), verifier=Verifier())
    assert d.outcome == "dead"
    for key, log in ((K[1], events), (K[3], [*events, a])):
        card = _card(NodeKey(key.seed, ident, None, keylog.encode_log(log)), T0 + 50)
        with pytest.raises(InvalidRecord) as e:
            cards.judge_card_key(card, book.held(ident))
        assert e.value.reason == "key_not_in_force"


def test_judging_needs_a_verified_card_of_the_held_logs_node() -> None:
    ident, events = _logs()
    book = KeyBook()
    book.restore(ident, keylog.encode_log(events), verifier=Verifier())
    card = _card(NodeKey(K[1].seed, ident, None, keylog.encode_log(events)), T0 + 20)
    unverified = cards._parse_body(card.body)  # a body not verified: no signer
    with pytest.raises(ValueError):
        cards.judge_card_key(unverified, book.held(ident))
    other = KeyBook()
    inc = keylog.incept(K[3], K[4].public_key, Q[1].public_key, T0)
    other.restore(keylog.identity_of(inc.body), keylog.encode_log([inc]), verifier=Verifier())
    with pytest.raises(ValueError):
        cards.judge_card_key(card, other.held(keylog.identity_of(inc.body)))


def test_signer_retired_at_is_the_time_of_the_event_that_retired_the_key() -> None:
    """What the audit tells a refused card by: K0 retired by the rotation at T0 + 10, K1
    by the recovery at T0 + 30, K3 in force, a stranger's key in no window."""
    ident, events = _logs()
    s1 = keylog.verify_log(ident, keylog.encode_log(events), verifier=Verifier())
    rec = keylog.recover(s1, Q[0], K[3].public_key, K[4].public_key, Q[1].public_key,
                         T0 + 30, {})
    book = KeyBook()
    book.restore(ident, keylog.encode_log([*events, rec]), verifier=Verifier())
    held = book.held(ident)
    assert held is not None
    log0, log1, log2 = (keylog.encode_log(events[:1]), keylog.encode_log(events),
                        keylog.encode_log([*events, rec]))
    want = [(K[0], log0, T0 + 10), (K[1], log1, T0 + 30), (K[3], log2, None)]
    for key, log, at in want:
        card = _card(NodeKey(key.seed, ident, None, log), T0 + 5)
        assert cards.signer_retired_at(card, held) == at
    k0_late = _card(NodeKey(K[0].seed, ident, None, log0), T0 + 11)
    with pytest.raises(InvalidRecord):
        cards.judge_card_key(k0_late, held)
    assert cards.judge_card_key(_card(NodeKey(K[0].seed, ident, None, log0), T0 + 10),
                                held) == "past"
