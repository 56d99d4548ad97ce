"""Sealed payloads (citynode.core.sealed): round trips, who can read, every tampering,
blobs moved to another place, the key commitment, the shape a relay checks, a committed
vector re-derived from the documented algorithm, and robustness against arbitrary input."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import msgpack
import nacl.bindings as nb
import nacl.public
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from citynode.core import encoding
from citynode.core.keys import SigningKey, node_id
from citynode.core.sealed import (
    ALG,
    MAX_RECIPIENTS,
    SEALED_KEY_BYTES,
    Inner,
    associated_data,
    check_sealed_shape,
    is_recipient,
    open_payload,
    recipients_of,
    seal_payload,
)
from citynode.errors import AccessDenied, InvalidRecord, PayloadError

A, B, C, OUT = (SigningKey(bytes([i]) * 32) for i in (1, 2, 3, 4))
FEED = "cert.alerts"
SEQ = 7
TYPE = "org.example.Notice"
DATA: dict[str, Any] = {"level": "high", "text": "patch now", "score": 9.5}
AIR: dict[str, Any] = {"dateObserved": "2025-01-01T00:00:00Z", "pm25": 3,
                       "location": {"type": "Point", "coordinates": [106.8, -6.2]}}
SUBJECT = "CVE-2025-0001"

# The documented prefixes, written out here so that a change in the code shows.
AD_PREFIX = b"citynode/sealed/v1\x00"
COMMIT_PREFIX = b"citynode/sealed-commit/v1\x00"
KEY_PREFIX = b"citynode/sealed-key/v1\x00"


def _rng(label: bytes) -> Callable[[int], bytes]:
    """Deterministic stand-in for nacl.utils.random: SHA-256 of label || counter."""
    counter = [0]

    def rng(n: int) -> bytes:
        counter[0] += 1
        out = hashlib.sha256(label + counter[0].to_bytes(4, "big")).digest()
        assert n <= 32
        return out[:n]

    return rng


def _seal(**kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "origin_key": A.public_key, "feed": FEED, "seq": SEQ, "type": TYPE, "data": DATA,
        "subject": SUBJECT, "dataschema": None, "recipients": [B.public_key, C.public_key],
    }
    args.update(kw)
    return seal_payload(**args)


def _open(sealed: Any, key: SigningKey = B, **kw: Any) -> Inner:
    args: dict[str, Any] = {"origin": A.public_key, "feed": FEED, "seq": SEQ, "key": key}
    args.update(kw)
    return open_payload(sealed, **args)


def _bad(sealed: Any, match: str, key: SigningKey = B, **kw: Any) -> None:
    with pytest.raises(InvalidRecord, match=match) as info:
        _open(sealed, key, **kw)
    assert info.value.reason == "bad_sealed"
    assert type(info.value) is InvalidRecord


def _copy(sealed: dict[str, Any]) -> dict[str, Any]:
    out = dict(sealed)
    out["to"] = [list(e) for e in sealed["to"]]
    return out


def _entry(sealed: dict[str, Any], key: SigningKey) -> int:
    return [e[0] for e in sealed["to"]].index(key.public_key)


def _x_secret(key: SigningKey) -> bytes:
    return key.x25519_secret()


# ------------------------------------------------- an independent reference (PROTOCOL.md)


def _ref_box(content_key: bytes, ed_pk: bytes, esk: bytes) -> bytes:
    """libsodium's crypto_box_seal with a chosen ephemeral secret, from the doc's steps."""
    pk = nb.crypto_sign_ed25519_pk_to_curve25519(ed_pk)
    epk = nb.crypto_scalarmult_base(esk)
    nonce = hashlib.blake2b(epk + pk, digest_size=24).digest()
    return epk + nb.crypto_box(content_key, nonce, pk, esk)


def _ref_seal(plaintext: bytes, *, content_keys: dict[bytes, bytes], content_key: bytes,
              nonce: bytes, esks: list[bytes], origin: bytes = A.public_key,
              feed: str = FEED, seq: int = SEQ) -> dict[str, Any]:
    """The sealing steps of PROTOCOL.md, written independently of the module; each
    recipient's box holds ``content_keys[recipient]`` (so a faulty origin can be played)."""
    ad = AD_PREFIX + origin + feed.encode() + seq.to_bytes(8, "big")
    aead_key = hashlib.sha256(KEY_PREFIX + content_key).digest()
    ct = nb.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce, aead_key)
    to = [[pk, _ref_box(content_keys[pk], pk, esk)]
          for pk, esk in zip(sorted(content_keys), esks, strict=True)]
    return {"alg": ALG, "commit": hashlib.sha256(COMMIT_PREFIX + content_key).digest(),
            "ct": ct, "nonce": nonce, "to": to}


def _ref_with_plaintext(plaintext: bytes) -> dict[str, Any]:
    ck = b"\x11" * 32
    keys = {A.public_key: ck, B.public_key: ck}
    return _ref_seal(plaintext, content_keys=keys, content_key=ck, nonce=b"\x22" * 24,
                     esks=[b"\x33" * 32, b"\x44" * 32])


# ------------------------------------------------------------------------- round trips


def test_every_recipient_reads_the_payload_and_the_origin_too() -> None:
    sealed = _seal(dataschema="https://example.org/notice.json")
    want = Inner(TYPE, DATA, SUBJECT, "https://example.org/notice.json")
    for key in (A, B, C):
        assert _open(sealed, key) == want


def test_a_built_in_type_round_trips() -> None:
    assert _open(_seal(type="AirQualityObserved", data=AIR), C).data == AIR


def test_optional_fields_stay_absent() -> None:
    sealed = _seal(subject=None)
    assert _open(sealed) == Inner(TYPE, DATA, None, None)


def test_the_sealed_value_survives_the_body_encoding() -> None:
    """The relay path: encode into a body, decode strictly, check the shape, open."""
    sealed = _seal()
    wire = encoding.encode({"sealed": sealed})
    back = encoding.decode(wire)["sealed"]
    assert back == sealed
    check_sealed_shape(back, origin=A.public_key)
    assert _open(back, C).data == DATA


def test_the_origin_is_always_a_recipient_and_duplicates_merge() -> None:
    assert recipients_of(_seal(recipients=[])) == (A.public_key,)
    assert recipients_of(_seal(recipients=iter([B.public_key]))) == tuple(
        sorted([A.public_key, B.public_key]))
    merged = _seal(recipients=[C.public_key, A.public_key, C.public_key, B.public_key])
    assert recipients_of(merged) == tuple(sorted([A.public_key, B.public_key, C.public_key]))
    assert _open(_seal(recipients=[]), A).type == TYPE


def test_recipients_are_sorted_and_each_sealed_key_has_its_fixed_size() -> None:
    sealed = _seal()
    keys = [e[0] for e in sealed["to"]]
    assert keys == sorted(keys) and len(set(keys)) == 3
    assert all(len(e[1]) == SEALED_KEY_BYTES == 80 for e in sealed["to"])
    assert len(sealed["nonce"]) == 24 and len(sealed["commit"]) == 32


def test_is_recipient() -> None:
    sealed = _seal()
    assert is_recipient(sealed, A.public_key) and is_recipient(sealed, C.public_key)
    assert not is_recipient(sealed, OUT.public_key)
    with pytest.raises(InvalidRecord) as info:
        is_recipient({"alg": ALG}, A.public_key)
    assert info.value.reason == "bad_sealed"


def test_a_non_recipient_is_denied() -> None:
    with pytest.raises(AccessDenied, match=r"^this node is not a recipient of the record$"):
        _open(_seal(), OUT)


def test_sealing_is_randomized_and_deterministic_only_with_rng() -> None:
    one, two = _seal(), _seal()
    assert one["nonce"] != two["nonce"] and one["commit"] != two["commit"]
    assert one["to"][0][1] != two["to"][0][1]
    fixed = [_seal(_rng=_rng(b"x")) for _ in range(2)]
    assert fixed[0] == fixed[1]
    assert fixed[0] != _seal(_rng=_rng(b"y"))


def test_sealed_keys_are_libsodium_sealed_boxes_of_the_committed_key() -> None:
    """Both the libsodium path and the deterministic one make standard sealed boxes."""
    for sealed in (_seal(), _seal(_rng=_rng(b"z"))):
        for key in (A, B, C):
            box = sealed["to"][_entry(sealed, key)][1]
            ck = nacl.public.SealedBox(nacl.public.PrivateKey(_x_secret(key))).decrypt(box)
            assert hashlib.sha256(COMMIT_PREFIX + ck).digest() == sealed["commit"]


def test_what_a_relay_sees_holds_no_plaintext_and_its_exact_length() -> None:
    sealed = _seal()
    wire = encoding.encode(sealed)
    for secret in (TYPE.encode(), SUBJECT.encode(), b"patch now", b"level"):
        assert secret not in wire
    inner = encoding.encode({"type": TYPE, "data": DATA, "subject": SUBJECT})
    assert len(sealed["ct"]) == len(inner) + 16  # the documented length leak, no more


# ----------------------------------------------------------------- sealing refuses


def test_an_invalid_payload_is_never_sealed() -> None:
    with pytest.raises(PayloadError) as info:
        _seal(type="AirQualityObserved", data={**AIR, "pm25": -1})
    assert info.value.reason == "bad_value"
    with pytest.raises(PayloadError) as info:
        _seal(type="Nope")
    assert info.value.reason == "unknown_type"


@pytest.mark.parametrize(("changes", "match"), [
    ({"subject": ""}, "subject must be a string of 1 to 512"),
    ({"subject": "s" * 513}, "subject must be a string of 1 to 512"),
    ({"dataschema": 5}, "dataschema must be a string"),
    ({"type": ""}, "type must be a non-empty string"),
    ({"data": [1]}, "data .the payload. must be a map"),
    ({"seq": 0}, "seq must be an integer from 1"),
    ({"seq": 2**63}, "seq must be an integer from 1"),
    ({"seq": True}, "seq must be an integer from 1"),
    ({"feed": ""}, "feed must be a non-empty string"),
    ({"origin_key": b"\x01" * 31}, "origin must be a 32-byte public key"),
])
def test_malformed_fields_are_refused(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidRecord, match=match) as info:
        _seal(**changes)
    assert info.value.reason == "bad_field"


def test_malformed_recipients_are_refused() -> None:
    with pytest.raises(InvalidRecord, match="a recipient is a 32-byte") as info:
        _seal(recipients=[B.public_key[:31]])
    assert info.value.reason == "bad_sealed"
    with pytest.raises(InvalidRecord, match="a recipient is a 32-byte"):
        _seal(recipients=[bytearray(B.public_key)])
    small_order = b"\x00" * 32  # the identity point: no X25519 key exists for it
    with pytest.raises(InvalidRecord, match=node_id(small_order)) as info:
        _seal(recipients=[small_order])
    assert info.value.reason == "bad_sealed"


def test_at_most_64_recipients_the_origin_included() -> None:
    others = [SigningKey(hashlib.sha256(bytes([i])).digest()).public_key for i in range(64)]
    sealed = _seal(recipients=others[:63])
    assert len(sealed["to"]) == MAX_RECIPIENTS == 64
    check_sealed_shape(sealed, origin=A.public_key)
    last = SigningKey(hashlib.sha256(bytes([62])).digest())
    assert _open(sealed, last).data == DATA
    with pytest.raises(InvalidRecord, match=r"65 recipients .* limit of 64: .* at most 63"):
        _seal(recipients=others)
    assert len(_seal(recipients=[*others[:63], A.public_key])["to"]) == 64


# ------------------------------------------------------------------------- tampering


def _flips(value: bytes) -> list[bytes]:
    """Every single-byte change of ``value``: each byte xor 01, and each byte xor 80."""
    out = []
    for i in range(len(value)):
        for bit in (0x01, 0x80):
            out.append(value[:i] + bytes([value[i] ^ bit]) + value[i + 1:])
    return out


def test_every_single_byte_tamper_of_nonce_commit_ct_or_sealed_key_fails() -> None:
    sealed = _seal()
    mine = _entry(sealed, B)
    cases = 0
    for name, match in (("nonce", "does not decrypt"), ("ct", "does not decrypt"),
                        ("commit", "does not match the commitment")):
        for changed in _flips(sealed[name]):
            _bad({**sealed, name: changed}, match)
            cases += 1
    for changed in _flips(sealed["to"][mine][1]):
        bad = _copy(sealed)
        bad["to"][mine][1] = changed
        _bad(bad, "sealed to this node does not open")
        cases += 1
    assert cases == 2 * (24 + len(sealed["ct"]) + 32 + 80)
    assert _open(sealed).data == DATA  # the untouched value still opens


def test_a_tampered_entry_only_hurts_its_own_recipient() -> None:
    sealed = _copy(_seal())
    mine = _entry(sealed, B)
    sealed["to"][mine][1] = bytes(80)
    _bad(sealed, "does not open")
    assert _open(sealed, C).data == DATA


def test_swapped_sealed_keys_fail() -> None:
    sealed = _copy(_seal())
    i, j = _entry(sealed, B), _entry(sealed, C)
    sealed["to"][i][1], sealed["to"][j][1] = sealed["to"][j][1], sealed["to"][i][1]
    _bad(sealed, "does not open", B)
    _bad(sealed, "does not open", C)


def test_cut_or_extended_ciphertext_fails() -> None:
    sealed = _seal()
    for ct in (sealed["ct"][:-1], sealed["ct"] + b"\x00", sealed["ct"][1:], b"\x00" * 16):
        _bad({**sealed, "ct": ct}, "does not decrypt")


def test_a_changed_recipient_key_means_no_access() -> None:
    sealed = _copy(_seal())
    mine = _entry(sealed, B)
    sealed["to"][mine][0] = OUT.public_key
    sealed["to"].sort()
    with pytest.raises(AccessDenied):
        _open(sealed, B)


# -------------------------------------------------- moved blobs (associated data)


def test_a_blob_moved_to_another_seq_feed_or_origin_does_not_decrypt() -> None:
    sealed = _seal()
    _bad(sealed, "moved from another record", seq=SEQ + 1)
    _bad(sealed, "moved from another record", seq=SEQ - 1)
    _bad(sealed, "moved from another record", feed="cert.alerts2")
    _bad(sealed, "moved from another record", feed="cert.alert")
    # B re-publishing A's blob as its own: B is a recipient, the place is not A's.
    _bad(sealed, "moved from another record", origin=B.public_key)
    assert _open(sealed).subject == SUBJECT


def test_a_blob_under_an_origin_that_is_not_a_recipient_is_malformed() -> None:
    _bad(_seal(), "the origin is not among the recipients", origin=OUT.public_key)


def test_associated_data_layout() -> None:
    ad = associated_data(A.public_key, "air", 258)
    assert ad == AD_PREFIX + A.public_key + b"air" + bytes([0, 0, 0, 0, 0, 0, 1, 2])
    assert AD_PREFIX.hex(" ") == "63 69 74 79 6e 6f 64 65 2f 73 65 61 6c 65 64 2f 76 31 00"
    for bad in ((A.public_key[:31], "air", 1), (A.public_key, "", 1),
                (A.public_key, "air", 0), (A.public_key, "\udc00", 1)):
        with pytest.raises(InvalidRecord) as info:
            associated_data(*bad)
        assert info.value.reason == "bad_field"


# ---------------------------------------------------------------- key commitment


def test_a_recipient_given_another_content_key_is_refused_by_the_commitment() -> None:
    """A faulty origin seals a different key to B: B fails on the commitment, before
    any decryption, so no two recipients can read two different payloads."""
    ck, other = b"\x11" * 32, b"\x12" * 32
    plaintext = encoding.encode({"type": TYPE, "data": DATA})
    # Encrypt under `other` too, so that without the commitment B would read it.
    sealed = _ref_seal(plaintext, content_keys={A.public_key: ck, B.public_key: other},
                       content_key=ck, nonce=b"\x22" * 24, esks=[b"\x33" * 32, b"\x44" * 32])
    assert _open(sealed, A).data == DATA
    _bad(sealed, "does not match the commitment", B)
    forged = _ref_seal(plaintext, content_keys={A.public_key: other, B.public_key: other},
                       content_key=other, nonce=b"\x22" * 24, esks=[b"\x33" * 32, b"\x44" * 32])
    _bad({**forged, "commit": sealed["commit"]}, "does not match the commitment", B)


# ------------------------------------------------------------ what decrypts, checked


@pytest.mark.parametrize(("plaintext", "match"), [
    (msgpack.packb({"type": TYPE, "data": {"b": 1, "a": 2}}), "not canonical msgpack"),
    (b"\xc1", "not canonical msgpack"),
    (encoding.encode([TYPE, DATA]), "not a map"),
    (encoding.encode({"data": DATA}), "lacks field.s.: type"),
    (encoding.encode({"type": TYPE, "data": DATA, "time": 1}), "unknown field.s.: time"),
    (encoding.encode({"type": "", "data": DATA}), "type must be a non-empty"),
    (encoding.encode({"type": TYPE, "data": 5}), "must be a map"),
    (encoding.encode({"type": TYPE, "data": DATA, "subject": ""}), "subject must be"),
])
def test_a_bad_plaintext_is_bad_sealed(plaintext: bytes, match: str) -> None:
    _bad(_ref_with_plaintext(plaintext), match)


def test_the_plaintext_is_decoded_within_the_limits() -> None:
    plaintext = encoding.encode({"type": TYPE, "data": {"k": [[[[1]]]]}})
    sealed = _ref_with_plaintext(plaintext)
    assert _open(sealed).data == {"k": [[[[1]]]]}
    _bad(sealed, "too deep|nests deeper", limits=encoding.Limits(max_depth=4))


def test_the_decrypted_payload_is_checked_against_its_type() -> None:
    data = {**AIR, "pm25": -1}
    sealed = _ref_with_plaintext(encoding.encode({"type": "AirQualityObserved", "data": data}))
    with pytest.raises(PayloadError) as info:
        _open(sealed)
    assert info.value.reason == "bad_value"
    assert _open(sealed, check_payload=False) == Inner("AirQualityObserved", data)


# ------------------------------------------------------------------------- shape


def _shape_err(sealed: Any, match: str, origin: bytes | None = None) -> None:
    with pytest.raises(InvalidRecord, match=match) as info:
        check_sealed_shape(sealed, origin=origin)
    assert info.value.reason == "bad_sealed"


def _with(**changes: Any) -> dict[str, Any]:
    out = _copy(_seal(_rng=_rng(b"shape")))
    out.update(changes)
    return out


def _entries(f: Callable[[list[list[Any]]], Any]) -> dict[str, Any]:
    out = _with()
    out["to"] = f(out["to"])
    return out


SHAPES: list[tuple[str, Any, str]] = [
    ("not a map", [1, 2], "must be a map"),
    ("none", None, "must be a map"),
    ("missing field", {k: v for k, v in _with().items() if k != "commit"},
     "missing: commit; unknown: -"),
    ("extra field", _with(pad=b""), "missing: -; unknown: pad"),
    ("alg unknown", _with(alg="aes256gcm"), "unknown algorithm 'aes256gcm'"),
    ("alg as bin", _with(alg=ALG.encode()), "unknown algorithm a non-string"),
    ("short nonce", _with(nonce=b"\x00" * 12), "nonce must be 24 bytes"),
    ("nonce as str", _with(nonce="0" * 24), "nonce must be 24 bytes"),
    ("long commit", _with(commit=b"\x00" * 33), "commit must be 32 bytes"),
    ("ct below a tag", _with(ct=b"\x00" * 15), "at least 16 bytes"),
    ("ct as list", _with(ct=[0] * 16), "at least 16 bytes"),
    ("to as map", _with(to={}), "1 to 64 recipients"),
    ("no recipients", _with(to=[]), "1 to 64 recipients"),
    ("65 recipients", _with(to=[[bytes([i]) * 32, b"\x00" * 80] for i in range(65)]),
     "1 to 64 recipients"),
    ("entry a tuple", _entries(lambda to: [tuple(e) for e in to]), r"to\[0\] must be a pair"),
    ("entry of 3", _entries(lambda to: [[*to[0], b""], *to[1:]]), r"to\[0\] must be a pair"),
    ("short key", _entries(lambda to: [[to[0][0][:31], to[0][1]], *to[1:]]),
     r"to\[0\] recipient key must be 32"),
    ("short box", _entries(lambda to: [to[0], [to[1][0], to[1][1][:79]], *to[2:]]),
     r"to\[1\] sealed key must be 80"),
    ("box as str", _entries(lambda to: [to[0], [to[1][0], "x" * 80], *to[2:]]),
     r"to\[1\] sealed key must be 80"),
    ("unsorted", _entries(lambda to: to[::-1]), "sorted by key, without duplicates"),
    ("duplicate", _entries(lambda to: [to[0], to[0], *to[1:]]), "without duplicates"),
]


@pytest.mark.parametrize(("value", "match"), [(v, m) for _, v, m in SHAPES],
                         ids=[name for name, _, _ in SHAPES])
def test_shape_rejects(value: Any, match: str) -> None:
    _shape_err(value, match)
    _bad(value, match)  # opening checks the shape first


def test_shape_requires_the_origin_when_given() -> None:
    sealed = _seal(recipients=[B.public_key])
    check_sealed_shape(sealed)
    check_sealed_shape(sealed, origin=B.public_key)
    _shape_err(sealed, "origin is not among the recipients", origin=C.public_key)


def test_shape_accepts_what_seal_makes_and_the_smallest_ciphertext() -> None:
    check_sealed_shape(_seal(), origin=A.public_key)
    check_sealed_shape(_with(ct=b"\x00" * 16))
    check_sealed_shape(_with(to=[[bytes([i]) * 32, b"\x00" * 80] for i in range(64)]))


# -------------------------------------------------------------------------- vector

# encoding.encode() of the sealed value of: origin A (seed 01*32), feed "cert.alerts",
# seq 3, type "org.example.Notice", data {"level": "high", "text": "patch now"}, subject
# "CVE-2025-0001", recipients B (02*32) and C (03*32), with _rng = _rng(VECTOR_LABEL).
VECTOR_LABEL = b"citynode/test/sealed-vector"
VECTOR_HEX = (
    "85a3616c67d922786368616368613230706f6c79313330352b7365616c656462"
    "6f782d783235353139a6636f6d6d6974c42001044d4c815dd7062f04e9b7e72e"
    "02d8ef246f69fc110a37605d740ad03a5161a26374c45ffdd602f509eccb6f8b"
    "b3944df80d266b95cc47b5497eb7e1de93a750eed409f81e5b9f4002efcff1c6"
    "465e5cc913e8555d1d0960b9e90a9ca84b6b344cde773a967e6c03f71977b632"
    "e90471ca7603400be8c96a0722f5e800857031c889b4a56e6f6e6365c41825e4"
    "5a73b2a17dee48167f38811364aee042be031c07f8c5a2746f9392c420813977"
    "0ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394c45060"
    "653cffe23b14c222f4890a99e875b279ae744a1c573e2e72dc2657565ad1451f"
    "9dc169fbcc581d09cab5b00dd452ce01f46d6f5b1ea22f82d3b8dd8e7e375d77"
    "f86115f0a1b5dc61cf21746c637a7392c4208a88e3dd7409f195fd52db2d3cba"
    "5d72ca6709bf1d94121bf3748801b40f6f5cc450931ddd5db6c62df51ac9b618"
    "0788c6395dd75158264e9efbcbd7b549cba12907f524ee6aad30d0fcfada1745"
    "8745f2d0d20eb714b0421949b8b2dcd6b985c624a7bb16d58bdf82e936a2719a"
    "2288d46192c420ed4928c628d1c2c6eae90338905995612959273a5c63f93636"
    "c14614ac8737d1c450349cdeb421f71e53173efce9309eacffafb6c4b5c661cb"
    "7a9d80d440c801f00af13f62e674b747f7e9055b236ca5e349edc804a78e9e8c"
    "7009142d68db30d424df0799d70a83943daf6192f86325c434"
)
VECTOR_INNER = {"type": "org.example.Notice", "data": {"level": "high", "text": "patch now"},
                "subject": "CVE-2025-0001"}


def _vector_seal() -> dict[str, Any]:
    return seal_payload(origin_key=A.public_key, feed=FEED, seq=3, type=VECTOR_INNER["type"],
                        data=VECTOR_INNER["data"], subject=VECTOR_INNER["subject"],
                        dataschema=None, recipients=[C.public_key, B.public_key],
                        _rng=_rng(VECTOR_LABEL))


def test_vector_is_reproduced_by_the_code_and_by_the_documented_algorithm() -> None:
    assert encoding.encode(_vector_seal()).hex() == VECTOR_HEX
    # The documented steps with the same random draws, in the documented order:
    # content key, nonce, then one ephemeral secret per recipient in key order.
    rng = _rng(VECTOR_LABEL)
    ck, nonce = rng(32), rng(24)
    keys = sorted([A.public_key, B.public_key, C.public_key])
    ref = _ref_seal(encoding.encode(VECTOR_INNER), content_keys=dict.fromkeys(keys, ck),
                    content_key=ck, nonce=nonce, esks=[rng(32) for _ in keys], seq=3)
    assert encoding.encode(ref).hex() == VECTOR_HEX


def test_vector_opens_for_each_recipient_by_hand_and_through_the_api() -> None:
    sealed = encoding.decode(bytes.fromhex(VECTOR_HEX))
    want = Inner(VECTOR_INNER["type"], VECTOR_INNER["data"], VECTOR_INNER["subject"])
    ad = AD_PREFIX + A.public_key + FEED.encode() + (3).to_bytes(8, "big")
    for key in (A, B, C):
        assert _open(sealed, key, seq=3) == want
        box = sealed["to"][_entry(sealed, key)][1]
        x_pk = nb.crypto_sign_ed25519_pk_to_curve25519(key.public_key)
        ck = nb.crypto_box_seal_open(box, x_pk, _x_secret(key))
        assert hashlib.sha256(COMMIT_PREFIX + ck).digest() == sealed["commit"]
        plain = nb.crypto_aead_xchacha20poly1305_ietf_decrypt(
            sealed["ct"], ad, sealed["nonce"], hashlib.sha256(KEY_PREFIX + ck).digest())
        assert plain == encoding.encode(VECTOR_INNER)
    with pytest.raises(AccessDenied):
        _open(sealed, OUT, seq=3)


# ---------------------------------------------------------------------- robustness

_leaves = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
           | st.text(max_size=40) | st.binary(max_size=90))
_values = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=5)
    | st.tuples(inner, inner).map(list)
    | st.dictionaries(st.sampled_from(["alg", "commit", "ct", "nonce", "to", "x"]) | st.text(
        max_size=5), inner, max_size=6),
    max_leaves=30,
)
_ROBUST = settings(max_examples=200, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow])
_BASE = _seal(_rng=_rng(b"robust"))


@_ROBUST
@given(_values)
def test_arbitrary_values_raise_only_our_errors(value: Any) -> None:
    with pytest.raises(InvalidRecord) as info:
        check_sealed_shape(value)
    assert info.value.reason == "bad_sealed"
    try:
        _open(value)
    except (InvalidRecord, AccessDenied):
        pass
    else:  # pragma: no cover - an arbitrary value never opens
        pytest.fail("an arbitrary value opened")


@_ROBUST
@given(st.sampled_from(sorted(_BASE)), _values, st.data())
def test_a_valid_blob_with_one_field_replaced_raises_only_our_errors(
    name: str, value: Any, data: st.DataObject
) -> None:
    bad = _copy(_BASE)
    if name == "to" and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(bad["to"]) - 1))
        bad["to"][i][data.draw(st.integers(0, 1))] = value
    else:
        bad[name] = value
    try:
        check_sealed_shape(bad)
        _open(bad, data.draw(st.sampled_from([A, B, C, OUT])))
    except AccessDenied:
        pass
    except InvalidRecord as exc:
        assert exc.reason == "bad_sealed"


@_ROBUST
@given(st.sampled_from(["nonce", "commit", "ct", "box"]), st.data())
def test_random_byte_changes_never_open(name: str, data: st.DataObject) -> None:
    bad = _copy(_BASE)
    mine = _entry(bad, C)
    old = bad["to"][mine][1] if name == "box" else bad[name]
    new = data.draw(st.binary(min_size=len(old), max_size=len(old)).filter(lambda b: b != old))
    if name == "box":
        bad["to"][mine][1] = new
    else:
        bad[name] = new
    with pytest.raises(InvalidRecord) as info:
        _open(bad, C)
    assert info.value.reason == "bad_sealed"
