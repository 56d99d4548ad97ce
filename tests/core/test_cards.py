"""Node cards (citynode.core.cards): make, open (msgpack and JSON), pinning the signer,
tampering, every field rule, and the size of the largest card allowed."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from citynode.core import encoding
from citynode.core.cards import (
    CARD_LIMITS,
    MAX_FEEDS,
    MAX_PARTNERS,
    CardFeed,
    NodeCard,
    card_from_json,
    card_to_json,
    check_terms_document,
    make_card,
    open_card,
    terms_in_force,
)
from citynode.core.keys import DOMAIN_CARD, DOMAIN_RECORD, SigningKey, Verifier, node_id
from citynode.core.records import encode_envelope
from citynode.errors import EncodingError, InvalidNodeId, InvalidRecord, SignatureError

NOW = 1_732_780_000_000
KEY = SigningKey(bytes(range(32)))
OTHER = SigningKey(bytes(range(1, 33)))
P1, P2 = SigningKey(b"\x01" * 32).public_key, SigningKey(b"\x02" * 32).public_key
FPR = hashlib.sha256(b"a DER certificate").digest()
V = Verifier()


def _card(key: SigningKey = KEY, **kw: Any) -> NodeCard:
    args: dict[str, Any] = {
        "name": "Ciudad Ejemplo",
        "url": "https://node.example.org:8443",
        "tls_fingerprint": FPR,
        "feeds": [("traffic", "partners"), ("air-quality", "public"), ("cert.alerts",
                                                                       "restricted")],
        "partners": [P2, P1],
        "software": "citynode/0.1.0",
        "now_ms": NOW,
    }
    args.update(kw)
    return make_card(key, **args)


def _fields(**changes: Any) -> dict[str, Any]:
    """The body fields of a valid card, with changes (a value of None removes a key)."""
    f: dict[str, Any] = {
        "kind": "card",
        "version": 2,
        "node": KEY.public_key,
        "name": "Ciudad Ejemplo",
        "url": "https://node.example.org",
        "tls": FPR,
        "feeds": [{"name": "air", "access": "public"}, {"name": "water", "access": "partners"}],
        "partners": sorted([P1, P2]),
        "software": "citynode/0.1.0",
        "time": NOW,
    }
    for k, v in changes.items():
        if v is None:
            del f[k]
        else:
            f[k] = v
    return f


def _signed(fields: dict[str, Any], key: SigningKey = KEY, domain: bytes = DOMAIN_CARD) -> bytes:
    body = encoding.encode(fields)
    return encode_envelope(body, key.sign(domain, body))


# -- round trips -----------------------------------------------------------------------


def test_make_and_open_round_trip() -> None:
    card = _card()
    opened = open_card(card.envelope, expected_node_id=KEY.node_id, verifier=V, now_ms=NOW)
    assert opened == card
    assert opened.node == KEY.public_key and opened.node_id == KEY.node_id
    assert opened.name == "Ciudad Ejemplo"
    assert opened.url == "https://node.example.org:8443"
    assert opened.tls == FPR
    assert opened.feeds == (CardFeed("air-quality", "public"), CardFeed("cert.alerts",
                                                                        "restricted"),
                            CardFeed("traffic", "partners"))
    assert opened.partners == tuple(sorted([P1, P2]))
    assert opened.software == "citynode/0.1.0"
    assert opened.time == NOW
    assert len(opened.sig) == 64
    V.verify(KEY.public_key, DOMAIN_CARD, opened.body, opened.sig)


def test_body_is_the_documented_canonical_map() -> None:
    card = _card()
    assert encoding.decode(card.body, CARD_LIMITS) == {
        "feeds": [{"access": "public", "name": "air-quality"},
                  {"access": "restricted", "name": "cert.alerts"},
                  {"access": "partners", "name": "traffic"}],
        "kind": "card",
        "name": "Ciudad Ejemplo",
        "node": KEY.public_key,
        "partners": sorted([P1, P2]),
        "software": "citynode/0.1.0",
        "time": NOW,
        "tls": FPR,
        "url": "https://node.example.org:8443",
        "version": 2,
    }
    assert card.envelope == encoding.encode([card.body, card.sig])


def test_open_without_expected_id_or_clock() -> None:
    card = _card()
    assert open_card(card.envelope, expected_node_id=None, verifier=V) == card


def test_card_without_tls_fingerprint() -> None:
    card = _card(tls_fingerprint=None)
    assert "tls" not in encoding.decode(card.body, CARD_LIMITS)
    assert open_card(card.envelope, expected_node_id=KEY.node_id, verifier=V).tls is None
    j = card_to_json(card)
    assert j["tls"] is None
    assert card_from_json(j, expected_node_id=KEY.node_id, verifier=V) == card


def test_plain_http_url_without_tls() -> None:
    card = _card(url="http://10.0.0.5:8080/citynode", tls_fingerprint=None)
    assert open_card(card.envelope, expected_node_id=None, verifier=V).url.startswith("http:")


def test_json_round_trip_through_real_json() -> None:
    card = _card()
    j = json.loads(json.dumps(card_to_json(card)))
    assert j["node"] == KEY.node_id
    assert j["tls"] == FPR.hex()
    assert j["partners"] == [node_id(pk) for pk in sorted([P1, P2])]
    assert j["feeds"][0] == {"name": "air-quality", "access": "public"}
    assert card_from_json(j, expected_node_id=KEY.node_id, verifier=V, now_ms=NOW) == card


def test_vouches_for() -> None:
    card = _card()
    assert card.vouches_for(P1) and card.vouches_for(P2)
    assert not card.vouches_for(OTHER.public_key)
    assert not card.vouches_for(b"\xff" * 32)
    assert not _card(partners=[]).vouches_for(P1)


# -- the expected signer ----------------------------------------------------------------


def test_card_of_another_node_than_the_id_given() -> None:
    env = _card(key=OTHER).envelope
    with pytest.raises(SignatureError) as info:
        open_card(env, expected_node_id=KEY.node_id, verifier=V)
    assert info.value.reason == "wrong_node"
    msg = str(info.value)
    assert f"signed by {OTHER.node_id}, not by the id you gave ({KEY.node_id})" in msg
    assert "check the id with that city's operators" in msg
    with pytest.raises(SignatureError, match="not by the id you gave"):
        card_from_json(card_to_json(_card(key=OTHER)), expected_node_id=KEY.node_id,
                       verifier=V)


def test_malformed_expected_id() -> None:
    with pytest.raises(InvalidNodeId):
        open_card(_card().envelope, expected_node_id=KEY.node_id[:-1] + "a", verifier=V)


@pytest.mark.parametrize(
    "env", [b"", b"\x92", b"\x00" * 100, b"\x92\xc4\x01a\xc4\x40" + b"\0" * 64]
)
def test_expected_id_is_checked_before_the_envelope_is_decoded(env: bytes) -> None:
    """Step 1 first: the caller's malformed id is reported, not the partner's bytes."""
    bad_id = KEY.node_id[:-1] + "a"
    with pytest.raises(InvalidNodeId):
        open_card(env, expected_node_id=bad_id, verifier=V)
    with pytest.raises(InvalidNodeId):
        card_from_json({"body": "!!"}, expected_node_id=bad_id, verifier=V)
    with pytest.raises(InvalidRecord):  # and the envelope alone is refused
        open_card(env, expected_node_id=KEY.node_id, verifier=V)


# -- tampering -------------------------------------------------------------------------


def test_tampered_signature() -> None:
    card = _card()
    sig = bytearray(card.sig)
    sig[10] ^= 1
    with pytest.raises(SignatureError) as info:
        open_card(encode_envelope(card.body, bytes(sig)), expected_node_id=None, verifier=V)
    assert info.value.reason == "bad_signature"


def test_tampered_body_keeping_the_signature() -> None:
    card = _card()
    body = encoding.encode({**encoding.decode(card.body, CARD_LIMITS), "url": "https://evil.example"})
    with pytest.raises(SignatureError):
        open_card(encode_envelope(body, card.sig), expected_node_id=KEY.node_id, verifier=V)


def test_card_claiming_another_nodes_key() -> None:
    # Signed by OTHER but naming KEY as its node: the signature does not verify.
    with pytest.raises(SignatureError) as info:
        open_card(_signed(_fields(), key=OTHER), expected_node_id=KEY.node_id, verifier=V)
    assert info.value.reason == "bad_signature"


def test_signature_for_another_purpose_is_not_a_card_signature() -> None:
    with pytest.raises(SignatureError):
        open_card(_signed(_fields(), domain=DOMAIN_RECORD), expected_node_id=None, verifier=V)


def test_json_readable_field_disagreeing_with_the_body() -> None:
    j = card_to_json(_card())
    for field, value in [("name", "Other City"), ("url", "https://evil.example"),
                         ("tls", "00" * 32), ("partners", []), ("time", NOW + 1),
                         ("node", OTHER.node_id)]:
        bad = {**j, field: value}
        with pytest.raises(InvalidRecord, match="do not match its signed body"):
            card_from_json(bad, expected_node_id=None, verifier=V)
    with pytest.raises(InvalidRecord, match="do not match"):
        card_from_json({**j, "extra": 1}, expected_node_id=None, verifier=V)


@pytest.mark.parametrize(
    ("field", "value"),
    [("version", 2.0), ("time", float(NOW))],
    ids=["version-2.0", "time-float"],
)
def test_json_fields_must_equal_with_exact_types(field: str, value: Any) -> None:
    """Python's == holds True == 1 == 1.0: the comparison is type-exact instead."""
    card = _card()
    j = card_to_json(card)
    assert j[field] == value  # equal for Python, yet another JSON value
    with pytest.raises(InvalidRecord, match="do not match its signed body") as info:
        card_from_json({**j, field: value}, expected_node_id=None, verifier=V)
    assert info.value.reason == "bad_card"
    assert card_from_json(json.loads(json.dumps(j)), expected_node_id=None, verifier=V) == card


def test_json_body_or_sig_tampered_or_malformed() -> None:
    card = _card()
    j = card_to_json(card)
    other_body = card_to_json(_card(name="Other"))["body"]
    with pytest.raises(SignatureError):
        card_from_json({**j, "body": other_body}, expected_node_id=None, verifier=V)
    for bad in [{**j, "sig": "!!"}, {**j, "body": 5}, {k: v for k, v in j.items() if k != "sig"},
                {**j, "sig": "A" * 10_000_000}]:
        with pytest.raises(InvalidRecord, match="base64"):
            card_from_json(bad, expected_node_id=None, verifier=V)
    with pytest.raises(EncodingError, match="not 64"):
        card_from_json({**j, "sig": "AAAA"}, expected_node_id=None, verifier=V)
    with pytest.raises(InvalidRecord, match="object"):
        card_from_json([j], expected_node_id=None, verifier=V)  # type: ignore[arg-type]


@pytest.mark.parametrize("env", [b"", b"\x92", b"\x91\xc4\x01a", b"\x00" * 100])
def test_garbage_envelopes(env: bytes) -> None:
    with pytest.raises(EncodingError):
        open_card(env, expected_node_id=None, verifier=V)


def test_non_canonical_body() -> None:
    body = encoding.encode(_fields())
    t = body.index(b"\xa4time") + 5
    assert body[t] == 0xCF  # NOW is over 2**32: packed as uint64
    bad = body[:t] + b"\xd3" + body[t + 1 :]  # the same value as int64: not canonical
    with pytest.raises(EncodingError):
        open_card(encode_envelope(bad, KEY.sign(DOMAIN_CARD, bad)), expected_node_id=None,
                  verifier=V)


# -- time ---------------------------------------------------------------------------------


def test_future_dated_card() -> None:
    tolerance = 15 * 60 * 1000
    card = _card(now_ms=NOW + tolerance)
    assert open_card(card.envelope, expected_node_id=None, verifier=V, now_ms=NOW) == card
    late = _card(now_ms=NOW + tolerance + 1)
    with pytest.raises(InvalidRecord) as info:
        open_card(late.envelope, expected_node_id=None, verifier=V, now_ms=NOW)
    assert info.value.reason == "future_time"
    assert "900 s in the future" in str(info.value)
    with pytest.raises(InvalidRecord, match="in the future"):
        card_from_json(card_to_json(late), expected_node_id=None, verifier=V, now_ms=NOW)
    # Old cards are not refused here: which card is newest is the caller's decision.
    assert open_card(card.envelope, expected_node_id=None, verifier=V, now_ms=NOW * 2) == card


# -- field rules: open_card refuses, make_card refuses to sign ------------------------------

BAD_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"kind": "record"}, "not a node card"),
    ({"kind": None}, "not a node card"),
    ({"version": 1}, "version 1"),
    ({"version": 3}, "version 3"),
    ({"version": True}, "version True"),
    ({"name": None}, "lacks required field"),
    ({"extra": 1}, "unknown field"),
    ({"node": b"\x01" * 31}, "node must be a 32-byte"),
    ({"name": ""}, "name must be a string of 1 to 128"),
    ({"name": "x" * 129}, "name must be a string of 1 to 128"),
    ({"name": "a\nb"}, "control characters"),
    ({"name": "a\x85b"}, "control characters"),
    ({"url": "ftp://x.example"}, "url must be"),
    ({"url": "https://"}, "url must be"),
    ({"url": "https://a b.example"}, "url must be"),
    ({"url": "https://user:pw@x.example"}, "url must be"),
    ({"url": "https://x.example/caf\u00e9"}, "url must be"),
    ({"url": "https://x.example/" + "a" * 495}, "url must be"),  # 513 characters
    ({"url": b"https://x.example"}, "url must be"),
    ({"tls": b"\x00" * 31}, "tls must be the 32-byte"),
    ({"url": "http://x.example"}, "TLS fingerprint but an http:// url"),
    ({"feeds": {}}, "feeds must be an array"),
    ({"feeds": [{"name": "a", "access": "public"}] * 2}, "not sorted by name without dup"),
    ({"feeds": [{"name": "b", "access": "public"}, {"name": "a", "access": "public"}]},
     "not sorted"),
    ({"feeds": [{"name": "a", "access": "everyone"}]}, "access 'everyone'"),
    ({"feeds": [{"name": "A!", "access": "public"}]}, "feed name 'A!' is invalid"),
    ({"feeds": [{"name": "a"}]}, "map with name and access"),
    ({"feeds": [{"name": "a", "access": "public", "x": 1}]}, "unknown field.*: x"),
    ({"feeds": [[]]}, "map with name and access"),
    ({"partners": [P1, P1]}, "not sorted without duplicates"),
    ({"partners": sorted([P1, P2], reverse=True)}, "not sorted"),
    ({"partners": [KEY.public_key]}, "does not list itself"),
    ({"partners": [b"\x00" * 33]}, "32-byte public key"),
    ({"partners": ["cn1abc"]}, "32-byte public key"),
    ({"partners": None}, "lacks required field"),
    ({"software": ""}, "software must be"),
    ({"software": 1}, "software must be"),
    ({"time": -1}, "time must be a non-negative integer"),
    ({"time": 1.5}, "time must be"),
    ({"time": False}, "time must be"),
]


@pytest.mark.parametrize(("changes", "match"), BAD_FIELDS)
def test_open_card_refuses_bad_fields(changes: dict[str, Any], match: str) -> None:
    env = _signed(_fields(**changes))
    with pytest.raises(InvalidRecord, match=match):
        open_card(env, expected_node_id=KEY.node_id, verifier=V)


def test_a_card_body_must_be_a_map() -> None:
    body = encoding.encode([1, 2])
    with pytest.raises(EncodingError, match="a card body is a map"):
        open_card(encode_envelope(body, KEY.sign(DOMAIN_CARD, body)), expected_node_id=None,
                  verifier=V)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"name": ""}, "name"),
        ({"url": "node.example.org"}, "url must be"),
        ({"url": "http://node.example.org"}, "http:// url"),
        ({"tls_fingerprint": b"short"}, "tls"),
        ({"feeds": [("a", "public"), ("a", "partners")]}, "not sorted by name without dup"),
        ({"feeds": [("a", "secret")]}, "access 'secret'"),
        ({"feeds": [("a", "public"), (None, "public")]}, "pairs"),
        ({"feeds": [("a", "public", "x")]}, "pairs"),
        ({"partners": [P1, P1]}, "duplicates"),
        ({"partners": [KEY.public_key]}, "itself"),
        ({"partners": [P1, "x"]}, "pairs"),
        ({"now_ms": -5}, "time"),
        ({"software": "x" * 129}, "software"),
    ],
)
def test_make_card_refuses_to_sign_what_partners_would_refuse(
    kw: dict[str, Any], match: str
) -> None:
    with pytest.raises(InvalidRecord, match=match):
        _card(**kw)


def test_feeds_from_a_mapping_and_partners_in_any_order() -> None:
    card = _card(feeds={"b": "public", "a": "restricted"}.items(), partners=iter([P2, P1]))
    assert card.feeds == (CardFeed("a", "restricted"), CardFeed("b", "public"))
    assert card.partners == tuple(sorted([P1, P2]))


# -- size -------------------------------------------------------------------------------


def test_largest_card_allowed_opens_and_one_more_partner_does_not() -> None:
    partners = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(MAX_PARTNERS)]
    feeds = [(f"{i:04d}" + "f" * 60, "restricted") for i in range(MAX_FEEDS)]
    card = _card(name="\U0001f3d9" * 128, url="https://x.example/" + "p" * 494,
                 software="s" * 128, feeds=feeds, partners=partners)
    assert len(card.body) > 400_000
    opened = open_card(card.envelope, expected_node_id=KEY.node_id, verifier=V, now_ms=NOW)
    assert len(opened.partners) == MAX_PARTNERS and len(opened.feeds) == MAX_FEEDS
    assert opened.vouches_for(partners[1234])
    assert card_from_json(card_to_json(card), expected_node_id=None, verifier=V) == card

    one_more = hashlib.sha256(b"one more").digest()
    with pytest.raises(InvalidRecord, match="at most 10000"):
        open_card(_signed(_fields(partners=sorted([*partners, one_more]))),
                  expected_node_id=None, verifier=V)
    many_feeds = [{"name": f"{i:05d}", "access": "public"} for i in range(MAX_FEEDS + 1)]
    with pytest.raises(InvalidRecord, match="at most 1000"):
        open_card(_signed(_fields(feeds=many_feeds)), expected_node_id=None, verifier=V)


def test_oversized_envelope_is_refused_before_decoding() -> None:
    body = b"\x00" * (CARD_LIMITS.max_bytes + 1)
    with pytest.raises(EncodingError) as info:
        open_card(encode_envelope(body, b"\x00" * 64), expected_node_id=None, verifier=V)
    assert info.value.reason == "too_large"


def test_nesting_deeper_than_a_card_needs_is_refused() -> None:
    env = _signed(_fields(feeds=[{"name": "a", "access": ["public"]}]))
    with pytest.raises(EncodingError) as info:
        open_card(env, expected_node_id=None, verifier=V)
    assert info.value.reason == "too_deep"


# -- feed terms and cadence ----------------------------------------------------------------

TERMS_DOC = b"Terms of use of the air-quality feed of Ciudad Ejemplo.\n"
TERMS = CardFeed("air", "public", license="CC-BY-4.0", attribution="\u00a9 Ciudad Ejemplo",
                 policy=hashlib.sha256(b"policy").digest(), cadence_s=300)
DOC_TERMS = CardFeed("water", "partners", terms_url="https://example.org/terms/v2",
                     terms_digest=hashlib.sha256(TERMS_DOC).digest())


def test_feed_terms_are_signed_and_read_back() -> None:
    card = _card(feeds=[DOC_TERMS, TERMS, ("zz", "public")])
    opened = open_card(card.envelope, expected_node_id=KEY.node_id, verifier=V, now_ms=NOW)
    assert opened.feeds == (TERMS, DOC_TERMS, CardFeed("zz", "public"))
    body = encoding.decode(card.body, CARD_LIMITS)
    assert body["feeds"][0] == {"name": "air", "access": "public", "license": "CC-BY-4.0",
                                "attribution": "\u00a9 Ciudad Ejemplo", "policy": TERMS.policy,
                                "cadence_s": 300}
    assert body["feeds"][2] == {"name": "zz", "access": "public"}  # nothing unset is written
    j = card_to_json(card)
    assert j["feeds"][1] == {"name": "water", "access": "partners",
                             "terms_url": "https://example.org/terms/v2",
                             "terms_digest": hashlib.sha256(TERMS_DOC).hexdigest()}
    assert card_from_json(json.loads(json.dumps(j)), expected_node_id=None, verifier=V) == card
    assert TERMS.terms() == {"license": "CC-BY-4.0", "terms_url": None, "terms_digest": None,
                             "attribution": "\u00a9 Ciudad Ejemplo",
                             "policy": hashlib.sha256(b"policy").hexdigest()}


@pytest.mark.parametrize(("field", "value"), [("cadence_s", True), ("cadence_s", 1.0)])
def test_json_feed_fields_must_equal_with_exact_types(field: str, value: Any) -> None:
    card = _card(feeds=[CardFeed("air", "public", cadence_s=1)])
    j = json.loads(json.dumps(card_to_json(card)))
    assert j["feeds"][0][field] == value  # equal for Python, yet another JSON value
    j["feeds"][0][field] = value
    with pytest.raises(InvalidRecord, match="do not match its signed body"):
        card_from_json(j, expected_node_id=None, verifier=V)


def _feed(**kw: Any) -> list[dict[str, Any]]:
    return [{"name": "air", "access": "public", **kw}]


BAD_TERMS: list[tuple[dict[str, Any], str]] = [
    ({"license": ""}, "one SPDX license identifier"),
    ({"license": "MIT OR Apache-2.0"}, "one SPDX"),
    ({"license": "CC BY 4.0"}, "one SPDX"),
    ({"license": "LicenseRef-"}, "one SPDX"),
    ({"license": "LicenseRef-x+"}, "one SPDX"),
    ({"license": "DocumentRef-a:LicenseRef-b"}, "one SPDX"),
    ({"license": "CC-BY-4.0\n"}, "one SPDX"),
    ({"license": "Licen\u0455e"}, "one SPDX"),  # a Cyrillic look-alike
    ({"license": "x" * 65}, "at most 64"),
    ({"license": b"MIT"}, "one SPDX"),
    ({"terms_url": "https://example.org/t"}, "both terms_url and terms_digest"),
    ({"terms_digest": bytes(32)}, "both terms_url and terms_digest"),
    ({"terms_url": "http://example.org/t", "terms_digest": bytes(32)}, "https:// URL"),
    ({"terms_url": "https://example.org/" + "t" * 493, "terms_digest": bytes(32)}, "https://"),
    ({"terms_url": "https://example.org/t", "terms_digest": bytes(31)}, "32 bytes"),
    ({"terms_url": "https://example.org/t", "terms_digest": "00" * 32}, "32 bytes"),
    ({"attribution": ""}, "attribution must be a string of 1 to 512"),
    ({"attribution": "a" * 513}, "1 to 512"),
    ({"attribution": "a\x00b"}, "control characters"),
    ({"policy": bytes(33)}, "policy must be 32 bytes"),
    ({"cadence_s": 0}, "cadence_s must be an integer of 1 to 604800"),
    ({"cadence_s": 604801}, "cadence_s"),
    ({"cadence_s": True}, "cadence_s"),
    ({"cadence_s": 60.0}, "cadence_s"),
    ({"cadence_s": "60"}, "cadence_s"),
    ({"terms": "CC0"}, "unknown field.*: terms"),
]


@pytest.mark.parametrize(("kw", "match"), BAD_TERMS)
def test_bad_terms_are_refused_and_never_signed(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidRecord, match=match) as info:
        open_card(_signed(_fields(feeds=_feed(**kw))), expected_node_id=None, verifier=V)
    assert info.value.reason == "bad_card"
    if kw.keys() <= set(CardFeed._fields):
        with pytest.raises(InvalidRecord, match=match):
            _card(feeds=[CardFeed("air", "public", **kw)])


@pytest.mark.parametrize("lic", ["CC-BY-4.0", "ODbL-1.0", "CC0-1.0", "GPL-2.0+",
                                 "LicenseRef-city-terms.v2", "x" * 64])
def test_valid_spdx_ids(lic: str) -> None:
    card = open_card(_signed(_fields(feeds=_feed(license=lic))), expected_node_id=None,
                     verifier=V)
    assert card.feeds[0].license == lic


def test_a_card_with_every_field_at_its_item_maximum_opens() -> None:
    partners = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(MAX_PARTNERS)]
    feeds = [CardFeed(f"{i:04d}", "public", retention_days=36500, license="MIT",
                      terms_url="https://t.example/", terms_digest=bytes(32),
                      attribution="a", policy=bytes(32), cadence_s=60)
             for i in range(MAX_FEEDS)]
    card = _card(feeds=feeds, partners=partners)
    opened = open_card(card.envelope, expected_node_id=None, verifier=V)
    assert opened.feeds[-1] == feeds[-1]
    # The body limit bounds the bytes: 1000 feeds of 512-character attributions do not
    # fit, and are not signed.
    big = [f._replace(attribution="a" * 512, terms_url="https://t.example/" + "u" * 494)
           for f in feeds]
    with pytest.raises(EncodingError) as info:
        _card(feeds=big, partners=partners)
    assert info.value.reason == "too_large"


def test_terms_in_force_is_the_newest_card_not_after_the_time() -> None:
    old = _card(feeds=[CardFeed("air", "public", license="CC0-1.0")], now_ms=NOW)
    new = _card(feeds=[CardFeed("air", "public", license="CC-BY-4.0")], now_ms=NOW + 1000)
    gone = _card(feeds=[("water", "public")], now_ms=NOW + 2000)
    history = [gone, new, old]  # any order
    assert terms_in_force(history, "air", NOW - 1) is None  # before any card
    assert terms_in_force(history, "air", NOW) == old.feeds[0]
    assert terms_in_force(history, "air", NOW + 999) == old.feeds[0]
    assert terms_in_force(history, "air", NOW + 1000) == new.feeds[0]
    assert terms_in_force(history, "air", NOW + 5000) is None  # no longer listed: unknown
    assert terms_in_force([], "air", NOW) is None


def test_terms_document_must_match_its_digest() -> None:
    check_terms_document(DOC_TERMS, TERMS_DOC)
    with pytest.raises(InvalidRecord, match=r"not the .* its card signed") as info:
        check_terms_document(DOC_TERMS, TERMS_DOC + b" ")
    assert info.value.reason == "terms_mismatch"
    with pytest.raises(InvalidRecord) as info:
        check_terms_document(TERMS, TERMS_DOC)
    assert info.value.reason == "no_terms"


def test_a_renewal_card_names_both_certificates_and_round_trips() -> None:
    nxt = hashlib.sha256(b"the next DER certificate").digest()
    card = _card(tls_next=nxt)
    assert card.tls_pins == {FPR, nxt}
    opened = open_card(card.envelope, expected_node_id=KEY.node_id, verifier=V)
    assert (opened.tls, opened.tls_next) == (FPR, nxt)
    j = card_to_json(card)
    assert j["tls_next"] == nxt.hex()
    assert card_from_json(j, expected_node_id=KEY.node_id, verifier=V).tls_next == nxt
    assert "tls_next" not in card_to_json(_card())
    assert _card().tls_pins == {FPR}
    assert _card(tls_fingerprint=None, url="http://node.example.org").tls_pins == frozenset()


@pytest.mark.parametrize("kw", [
    {"tls_next": FPR},  # the one in force again
    {"tls_next": b"\x01" * 31},
    {"tls_next": b"\x01" * 32, "tls_fingerprint": None, "url": "http://node.example.org"},
])
def test_a_bad_next_certificate_is_refused(kw: dict[str, Any]) -> None:
    with pytest.raises(InvalidRecord, match="tls_next") as exc:
        _card(**kw)
    assert exc.value.reason == "bad_card"


def test_json_card_may_not_add_a_next_certificate_it_did_not_sign() -> None:
    j = card_to_json(_card())
    j["tls_next"] = "00" * 32
    with pytest.raises(InvalidRecord, match="do not match"):
        card_from_json(j, expected_node_id=KEY.node_id, verifier=V)
