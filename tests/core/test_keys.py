"""Node ids, signing and verification, domain prefixes, sealed key files (core.keys)."""

from __future__ import annotations

import base64
import hashlib

import nacl.bindings
import nacl.pwhash
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from citynode.core import keys
from citynode.core.keys import (
    DOMAIN_CARD,
    DOMAIN_RECORD,
    NODE_ID_PREFIX,
    SigningKey,
    Verifier,
    node_id,
    parse_node_id,
    seal_secret_key,
    unseal_secret_key,
    verify,
)
from citynode.errors import InvalidNodeId, KeyFileError, SignatureError

KEY = SigningKey(bytes([1]) * 32)
ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
FAST = {"opslimit": nacl.pwhash.argon2id.OPSLIMIT_MIN,
        "memlimit": nacl.pwhash.argon2id.MEMLIMIT_MIN}

# --------------------------------------------------------------------------- node ids


def test_node_id_worked_example() -> None:
    pk = KEY.public_key
    assert pk.hex() == "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c"
    checksum = hashlib.sha256(b"citynode/node-id/v1" + pk).digest()[:3]
    assert checksum.hex() == "603cc8"
    expected = "cn1" + base64.b32encode(pk + checksum).decode().lower()
    assert expected == "cn1rkeohxlubhyzl7ks3mwtzos5olfgocn7dwkbeg7toseadnapn5ogapgi"
    assert node_id(pk) == KEY.node_id == expected


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=32, max_size=32))
def test_node_id_round_trip(pk: bytes) -> None:
    nid = node_id(pk)
    assert len(nid) == 59 and nid.startswith(NODE_ID_PREFIX)
    assert set(nid[3:]) <= set(ALPHABET)
    assert parse_node_id(nid) == pk
    # Tolerated copy-paste accidents: surrounding whitespace, upper-case base32.
    assert parse_node_id(f"  {nid}\n") == pk
    assert parse_node_id("cn1" + nid[3:].upper()) == pk


def _single_char_changes(nid: str) -> list[str]:
    out = []
    for i in range(len(nid)):
        for c in ALPHABET + "cn1089=-_ A":
            if c != nid[i] and not (i >= 3 and c.lower() == nid[i]):
                out.append(nid[:i] + c + nid[i + 1 :])
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_single_character_change_is_rejected(seed: int) -> None:
    nid = SigningKey(bytes([seed]) * 32).node_id
    changed = _single_char_changes(nid)
    assert len(changed) > 59 * 30
    for bad in changed:
        with pytest.raises(InvalidNodeId):
            parse_node_id(bad)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.data())
def test_random_typos_are_rejected(pk: bytes, data: st.DataObject) -> None:
    nid = node_id(pk)
    i = data.draw(st.integers(3, 58), label="index")
    c = data.draw(st.sampled_from(ALPHABET).filter(lambda x: x != nid[i]), label="char")
    with pytest.raises(InvalidNodeId):
        parse_node_id(nid[:i] + c + nid[i + 1 :])


@pytest.mark.parametrize(
    "text",
    [
        "", "cn1", KEY.node_id[:-1], KEY.node_id + "a", KEY.node_id[3:], "CN1" + KEY.node_id[3:],
        "cn2" + KEY.node_id[3:], KEY.node_id[:-4] + "====", "cn1" + "a" * 56,
        KEY.node_id[:10] + " " + KEY.node_id[11:],
    ],
    ids=repr,
)
def test_malformed_node_ids(text: str) -> None:
    with pytest.raises(InvalidNodeId):
        parse_node_id(text)


@pytest.mark.parametrize(
    ("old", "new"),
    [("i", "\u0131"), ("s", "\u017f"), ("k", "\u212a"), ("7", "\uff17")],
    ids=["dotless-i", "long-s", "kelvin-sign", "fullwidth-7"],
)
def test_non_ascii_look_alikes_are_refused_before_case_folding(old: str, new: str) -> None:
    """Each of these folds (upper() or NFKC) to the real id's character: an id that
    folded first would give one node two spellings."""
    nid = KEY.node_id
    assert old in nid[3:]
    text = nid[:3] + nid[3:].replace(old, new)
    assert text != nid and text.isascii() is False
    with pytest.raises(InvalidNodeId, match="non-ASCII"):
        parse_node_id(text)


@pytest.mark.parametrize("pad", ["\u00a0", "\u2003", "\u3000", "\x1c", "\x0b"])
def test_only_ascii_space_tab_cr_lf_are_tolerated_around_an_id(pad: str) -> None:
    with pytest.raises(InvalidNodeId):
        parse_node_id(pad + KEY.node_id + pad)
    assert parse_node_id(" \t\r\n" + KEY.node_id + "\r\n") == KEY.public_key


@pytest.mark.parametrize("value", [None, b"cn1", 5])
def test_parse_node_id_needs_a_string(value: object) -> None:
    with pytest.raises(InvalidNodeId):
        parse_node_id(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [0, 31, 33])
def test_node_id_needs_32_bytes(n: int) -> None:
    with pytest.raises(InvalidNodeId):
        node_id(b"\x00" * n)


def test_invalid_node_id_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_node_id("nope")


# --------------------------------------------------------------------------- domains


def test_domain_prefixes_are_exact_and_prefix_free() -> None:
    assert DOMAIN_RECORD == b"citynode/record/v1\x00"
    assert DOMAIN_CARD == b"citynode/card/v1\x00"
    assert keys.DOMAIN_REQUEST == b"citynode/request/v1\x00"
    assert keys.DOMAIN_CHECKPOINT == b"citynode/checkpoint/v1\x00"
    assert keys.DOMAIN_VOUCH == b"citynode/vouch/v1\x00"
    domains = [getattr(keys, n) for n in keys.__all__ if n.startswith("DOMAIN_")]
    assert len(set(domains)) == len(domains)
    for d in domains:
        assert d.isascii() and d.endswith(b"/v1\x00") and d.count(b"\x00") == 1
        for other in domains:
            assert d == other or not other.startswith(d)


# --------------------------------------------------------------------------- signing


def test_signing_is_deterministic_ed25519() -> None:
    sig = KEY.sign(DOMAIN_RECORD, b"hello")
    assert len(sig) == 64
    assert sig == KEY.sign(DOMAIN_RECORD, b"hello")
    # Plain Ed25519 over prefix || message: an independent implementation agrees.
    Ed25519PublicKey.from_public_bytes(KEY.public_key).verify(sig, DOMAIN_RECORD + b"hello")


def test_rfc8032_test_vector_1() -> None:
    key = SigningKey(bytes.fromhex(
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"))
    assert key.public_key.hex() == (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    assert key.sign(b"", b"").hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")


@pytest.mark.parametrize("check", ["function", "verifier"])
def test_verify_accepts_and_rejects(check: str) -> None:
    v = Verifier()

    def run(pk: bytes, domain: bytes, msg: bytes, sig: bytes) -> None:
        if check == "function":
            verify(pk, domain, msg, sig)
        else:
            v.verify(pk, domain, msg, sig)

    sig = KEY.sign(DOMAIN_RECORD, b"msg")
    run(KEY.public_key, DOMAIN_RECORD, b"msg", sig)
    bad = [
        (KEY.public_key, DOMAIN_CARD, b"msg", sig),  # other purpose
        (KEY.public_key, DOMAIN_RECORD, b"msg!", sig),
        (KEY.public_key, b"", DOMAIN_RECORD + b"msg", sig[:-1] + bytes([sig[-1] ^ 1])),
        (SigningKey(bytes([2]) * 32).public_key, DOMAIN_RECORD, b"msg", sig),
        (KEY.public_key[:31], DOMAIN_RECORD, b"msg", sig),
        (KEY.public_key, DOMAIN_RECORD, b"msg", sig[:63]),
        (KEY.public_key, DOMAIN_RECORD, b"msg", sig + b"\x00"),
        (bytes(32), DOMAIN_RECORD, b"msg", sig),  # a small-order public key
        (KEY.public_key, DOMAIN_RECORD, b"msg", bytes(64)),
    ]
    for args in bad:
        with pytest.raises(SignatureError) as info:
            run(*args)
        assert info.value.reason == "bad_signature"
    if check == "verifier":
        assert v.count == 1 + len(bad)


def test_domain_and_message_boundary_is_not_movable() -> None:
    # The NUL ends every prefix: "prefix || message" cannot be split another way that
    # names another purpose.
    sig = KEY.sign(DOMAIN_CARD, b"x")
    with pytest.raises(SignatureError):
        verify(KEY.public_key, DOMAIN_RECORD, b"x", sig)


def test_signing_key_seed_and_repr() -> None:
    assert KEY.seed == bytes([1]) * 32
    assert SigningKey(KEY.seed).public_key == KEY.public_key
    assert KEY.seed.hex() not in repr(KEY) and KEY.node_id in repr(KEY)
    a, b = SigningKey.generate(), SigningKey.generate()
    assert a.seed != b.seed and len(a.public_key) == 32


@pytest.mark.parametrize("n", [0, 31, 33, 64])
def test_signing_key_needs_a_32_byte_seed(n: int) -> None:
    with pytest.raises(KeyFileError):
        SigningKey(b"\x01" * n)


def test_x25519_secret_matches_the_converted_public_key() -> None:
    secret = KEY.x25519_secret()
    public = nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(KEY.public_key)
    assert nacl.bindings.crypto_scalarmult_base(secret) == public


# --------------------------------------------------------------------------- key files


def test_plain_key_file_round_trip() -> None:
    text = seal_secret_key(KEY.seed, None)
    assert text.startswith(b"citynode-secret-key-v1 plain ")
    assert unseal_secret_key(text, None) == KEY.seed
    assert unseal_secret_key(text, "ignored") == KEY.seed
    assert seal_secret_key(KEY.seed, "") == text  # an empty passphrase means none


def test_sealed_key_file_round_trip() -> None:
    text = seal_secret_key(KEY.seed, "correct horse", **FAST)
    assert text.startswith(b"citynode-secret-key-v1 argon2id ")
    assert KEY.seed.hex().encode() not in text
    assert base64.b64encode(KEY.seed) not in text
    assert unseal_secret_key(text, "correct horse") == KEY.seed
    # A fresh salt and nonce every time.
    assert seal_secret_key(KEY.seed, "correct horse", **FAST) != text


def test_sealed_key_file_with_unicode_passphrase() -> None:
    text = seal_secret_key(KEY.seed, "pässwörd 🔑", **FAST)
    assert unseal_secret_key(text, "pässwörd 🔑") == KEY.seed
    with pytest.raises(KeyFileError):
        unseal_secret_key(text, "passwort 🔑")


@pytest.mark.parametrize("passphrase", ["wrong", "correct hors", "Correct horse", None, ""])
def test_sealed_key_file_wrong_or_missing_passphrase(passphrase: str | None) -> None:
    text = seal_secret_key(KEY.seed, "correct horse", **FAST)
    with pytest.raises(KeyFileError):
        unseal_secret_key(text, passphrase)


def _sealed_parts() -> list[str]:
    return seal_secret_key(KEY.seed, "pw", **FAST).decode().split()


_S = _sealed_parts()


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xff\xfe", id="not-ascii"),
        pytest.param(b"hello world", id="not-a-key-file"),
        pytest.param(b"citynode-secret-key-v2 plain " + base64.b64encode(bytes(32)), id="v2"),
        pytest.param(b"citynode-secret-key-v1 plain", id="plain-no-seed"),
        pytest.param(b"citynode-secret-key-v1 plain not*base64", id="plain-bad-base64"),
        pytest.param(b"citynode-secret-key-v1 plain " + base64.b64encode(bytes(31)),
                     id="plain-31-bytes"),
        pytest.param(b"citynode-secret-key-v1 plain " + base64.b64encode(bytes(32)) + b" x",
                     id="plain-extra-field"),
        pytest.param(b"citynode-secret-key-v1 scrypt 1 2 3 4", id="unknown-kdf"),
        pytest.param(" ".join(_S[:5]).encode(), id="sealed-no-box"),
        pytest.param(" ".join([*_S[:2], "x", *_S[3:]]).encode(), id="opslimit-not-int"),
        pytest.param(" ".join([*_S[:2], "0", *_S[3:]]).encode(), id="opslimit-0"),
        pytest.param(" ".join([*_S[:2], "65", *_S[3:]]).encode(), id="opslimit-65"),
        pytest.param(" ".join([*_S[:3], "1024", *_S[4:]]).encode(), id="memlimit-1024"),
        pytest.param(" ".join([*_S[:4], "AAAA", _S[5]]).encode(), id="short-salt"),
        pytest.param(" ".join([*_S[:5], "AAAA"]).encode(), id="short-box"),
        pytest.param(" ".join([*_S[:5], "!!"]).encode(), id="box-bad-base64"),
    ],
)
def test_corrupt_key_files(text: bytes) -> None:
    with pytest.raises(KeyFileError):
        unseal_secret_key(text, "pw")


def test_sealed_box_tampering_is_detected() -> None:
    parts = _sealed_parts()
    box = bytearray(base64.b64decode(parts[5]))
    box[-1] ^= 1
    parts[5] = base64.b64encode(bytes(box)).decode()
    with pytest.raises(KeyFileError):
        unseal_secret_key(" ".join(parts).encode(), "pw")
