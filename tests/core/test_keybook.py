"""Records of a cn2 origin (body version 3) verified against the key logs a node holds
(citynode.core.keybook): the key valid for a position signs it, a retired key's
records beyond its heads are refused whatever time they claim, an unknown log is
``unknown_key``, and a refused log never replaces the held one. No event loop."""

from __future__ import annotations

import pytest

from citynode.core import keylog
from citynode.core.keybook import KeyBook
from citynode.core.keylog import Head, identity_of, incept, recover, rotate
from citynode.core.keys import SigningKey, Verifier, parse_node_id
from citynode.core.records import IDENTITY_FORMAT_VERSION, open_record, open_records, sign_record
from citynode.core.sealed import open_payload
from citynode.errors import InvalidRecord

T0 = 1_735_689_600_000
K = [SigningKey(bytes([0x10 + i]) * 32) for i in range(6)]
Q = [SigningKey(bytes([0x40 + i]) * 32) for i in range(3)]
THIEF = SigningKey(bytes([0x66]) * 32)
V = Verifier()
NOW = T0 + 10**9


def _rec(key: SigningKey, ident: bytes, seq: int, prev: bytes | None, t: int = T0,
         readers: list[bytes] | None = None):
    return sign_record(key, feed="air", seq=seq, prev=prev, time_ms=t, type="org.example.T",
                       data={"n": seq}, identity=ident, readers=readers)


def _open(rec, book: KeyBook):
    return open_record(rec.body, rec.sig, rec.payload, now_ms=NOW, verifier=V,
                       key_states=book.state)


def _chain(key: SigningKey, ident: bytes, n: int, start: int = 1, prev: bytes | None = None,
           t: int = T0):
    out = []
    for s in range(start, start + n):
        r = _rec(key, ident, s, prev, t)
        out.append(r)
        prev = r.id
    return out


def test_v3_record_verifies_under_held_log_and_is_unknown_key_without() -> None:
    inc = incept(K[0], K[1].public_key, Q[0].public_key, T0)
    ident = identity_of(inc.body)
    assert parse_node_id(keylog.identity_id(ident)) == ident
    rec = _rec(K[0], ident, 1, None)
    assert rec.origin == ident and rec.key == K[0].public_key and rec.signer == K[0].public_key
    assert rec.fields()["version"] == IDENTITY_FORMAT_VERSION
    book = KeyBook()
    with pytest.raises(InvalidRecord) as exc:
        _open(rec, book)
    assert exc.value.reason == "unknown_key"
    assert book.offer(ident, keylog.encode_log([inc]), verifier=V).outcome == "extends"
    assert _open(rec, book).id == rec.id
    assert book.current_key(ident) == K[0].public_key
    assert book.name(ident).startswith("cn2")
    # a cn1 identity has no log: it is its own key
    assert book.current_key(K[3].public_key) == K[3].public_key
    assert book.name(K[3].public_key).startswith("cn1")


def test_rotation_then_theft_and_recovery() -> None:
    inc = incept(K[0], K[1].public_key, Q[0].public_key, T0)
    ident = identity_of(inc.body)
    s0 = keylog.verify_log(ident, [inc.envelope], verifier=V)
    old = _chain(K[0], ident, 3)
    rot = rotate(s0, K[1], K[2].public_key, T0 + 10, {"air": Head(3, old[-1].id)})
    s1 = keylog.apply_event(s0, rot)
    new = _chain(K[1], ident, 2, start=4, prev=old[-1].id, t=T0 + 20)
    book = KeyBook()
    book.offer(ident, keylog.encode_log([inc]), verifier=V)
    # the new key is unknown until the rotation is held: fetch the log, then retry
    res = open_records([(r.body, r.sig, r.payload, None) for r in new], now_ms=NOW,
                       verifier=V, key_states=book.state)
    assert [getattr(x, "reason", None) for x in res] == ["unknown_key", "unknown_key"]
    assert book.offer(ident, keylog.encode_log([inc, rot]), verifier=V).outcome == "extends"
    for r in old + new:
        assert _open(r, book).id == r.id  # every record under the key valid for it
    # K0, retired at seq 3, signs seq 4 dated before the rotation: refused anyway
    late = _rec(K[0], ident, 4, old[-1].id, T0 - 5)
    with pytest.raises(InvalidRecord) as exc:
        _open(late, book)
    assert exc.value.reason == "beyond_last_good"
    # K1 is stolen; the thief writes seqs 6.. dated early; the owner recovers at head 5
    forged = _chain(K[1], ident, 2, start=6, prev=new[-1].id, t=T0 + 1)
    rec_ev = recover(s1, Q[0], K[3].public_key, K[4].public_key, Q[1].public_key, T0 + 30,
                     {"air": Head(5, new[-1].id)})
    assert _open(forged[0], book).id == forged[0].id  # valid until the recovery is held
    d = book.offer(ident, keylog.encode_log([inc, rot, rec_ev]), verifier=V)
    assert d.outcome == "extends"
    for r in forged:
        with pytest.raises(InvalidRecord) as exc:
            _open(r, book)
        assert exc.value.reason == "beyond_last_good"
    for r in old + new:
        assert _open(r, book).id == r.id
    assert book.current_key(ident) == K[3].public_key
    # a stale log (the rotation only) is refused and changes nothing
    d = book.offer(ident, keylog.encode_log([inc, rot]), verifier=V)
    assert d.outcome == "stale" and d.error is not None and d.error.reason == "stale_key_log"
    assert book.current_key(ident) == K[3].public_key
    # a thief's key is unknown_key
    fake = _rec(THIEF, ident, 6, new[-1].id)
    with pytest.raises(InvalidRecord) as exc:
        _open(fake, book)
    assert exc.value.reason == "unknown_key"


def test_sealed_v3_record_opens_for_reader_and_binds_origin() -> None:
    inc = incept(K[0], K[1].public_key, Q[0].public_key, T0)
    ident = identity_of(inc.body)
    book = KeyBook()
    book.offer(ident, [inc.envelope], verifier=V)
    reader = K[5]
    rec = _rec(K[0], ident, 1, None, readers=[reader.public_key])
    got = _open(rec, book)
    inner = open_payload(got.sealed, origin=got.origin, signer=got.signer, feed=got.feed,
                         seq=got.seq, key=reader)
    assert inner.data == {"n": 1}
    with pytest.raises(InvalidRecord):  # the associated data binds the identity D
        open_payload(got.sealed, origin=K[0].public_key, signer=got.signer, feed=got.feed,
                     seq=got.seq, key=reader)


def test_v2_body_with_key_and_v3_without_are_refused() -> None:
    from citynode.core import encoding
    from citynode.core.keys import DOMAIN_RECORD

    rec = sign_record(K[0], feed="air", seq=1, prev=None, time_ms=T0, type="org.example.T",
                      data={"n": 1})
    f = rec.fields()
    for version, extra, reason in ((2, {"key": K[0].public_key}, "unknown_field"),
                                   (3, {}, "missing_field")):
        body = encoding.encode({**f, "version": version, **extra})
        with pytest.raises(InvalidRecord) as exc:
            open_record(body, K[0].sign(DOMAIN_RECORD, body), rec.payload, now_ms=NOW,
                        verifier=V, key_states=KeyBook().state)
        assert exc.value.reason == reason


def test_how_an_id_prints_depends_on_the_book_asked_not_on_what_was_verified_before() -> None:
    from citynode.core.keybook import CN1_NAMES
    from citynode.core.keylog import identity_id, origin_id
    from citynode.core.keys import node_id

    inc = incept(K[0], K[1].public_key, Q[0].public_key, T0)
    d = identity_of(inc.body)
    book, other = KeyBook(), KeyBook()
    book.offer(d, [inc.envelope], verifier=V)
    keylog.verify_log(d, [inc.envelope], verifier=V)  # verified again, elsewhere
    # The book that holds the log names D (and the holder of its key) cn2; another book,
    # the bare function and the names that know no log say what the 32 bytes are alone.
    assert book.name(d) == identity_id(d) and book.holder_name(K[0].public_key) == \
        identity_id(d)
    assert other.name(d) == node_id(d) == CN1_NAMES.name(d)
    assert node_id(d).startswith("cn1") and other.holder_name(K[0].public_key) == \
        node_id(K[0].public_key)
    # A record names its kind itself: version 3 (a signing key named) is a cn2 origin.
    rec = _rec(K[0], d, 1, None)
    assert origin_id(rec.origin, rec.key) == identity_id(d)
    assert origin_id(K[0].public_key, None) == node_id(K[0].public_key)


def test_the_core_keeps_no_table_of_identities() -> None:
    """No module of keys, key logs or key books holds a mutable table (what printed ids
    used to depend on), apart from keylog's constant field sets per event type."""
    import citynode.core.keybook as kb
    import citynode.core.keylog as kl
    import citynode.core.keys as ks

    tables = {(mod.__name__, name) for mod in (ks, kl, kb)
              for name, value in vars(mod).items()
              if isinstance(value, set | dict | list) and not name.startswith("__")}
    assert tables == {("citynode.core.keylog", "_FIELDS")}
    assert all(isinstance(v, frozenset) for v in kl._FIELDS.values())


def _identity(n: int) -> tuple[bytes, bytes]:
    """A one-event log of a fresh identity: (identity, wire)."""
    k = SigningKey(bytes([0x20 + n]) * 32)
    ev = incept(k, SigningKey(bytes([0x60 + n]) * 32).public_key, SigningKey(b"\x7f" * 32)
                .public_key, T0)
    return identity_of(ev.body), keylog.encode_log([ev])


def test_strangers_logs_are_a_bounded_lru_that_never_drops_a_pinned_log() -> None:
    """S7: partners' (pinned) logs stay; strangers' (transient) ones are at most
    max_transient, the least recently used dropped first; a stranger's offer does not
    unpin, and a pinned offer of a stranger pins it."""
    book = KeyBook(max_transient=2)
    v = Verifier()
    (p, pw), (a, aw), (b, bw), (c, cw), (d, dw) = (_identity(i) for i in range(5))
    book.offer(p, pw, verifier=v)  # a partner's
    book.offer(p, pw, verifier=v, transient=True)  # offered again by a stranger: stays
    for ident, wire in ((a, aw), (b, bw)):
        book.offer(ident, wire, verifier=v, transient=True)
    assert book.pinned(p) and not book.pinned(a) and a in book and b in book
    book.current_key(a)  # a is used: b is now the least recently used
    book.offer(c, cw, verifier=v, transient=True)
    assert b not in book and a in book and c in book and p in book
    assert book.owner(SigningKey(bytes([0x22]) * 32).public_key) != b  # keys forgotten
    book.offer(c, cw, verifier=v)  # c becomes a partner: pinned
    book.offer(d, dw, verifier=v, transient=True)
    book.offer(b, bw, verifier=v, transient=True)
    assert book.pinned(c) and book.pinned(p) and len(book) == 4
    assert a not in book and {d, b} <= set(book.identities())
