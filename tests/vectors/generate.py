#!/usr/bin/env python3
"""Deterministic generator of citynode's protocol test vectors (docs/PROTOCOL.md).

``python tests/vectors/generate.py`` rewrites, byte for byte identically on every run:

* ``records.json``  envelopes to verify: valid ones, and invalid ones with the reason code;
* ``chain.json``    where records fit a feed chain, and fork proofs (valid and not);
* ``keys.json``     node ids derived from fixed seeds, and malformed node ids;
* ``sync.json``     reconciliation item hashes, fingerprints, first messages, refusals;
* ``cards.json``  a node card to open (for its id, another id, a malformed id) and
  its JSON form, exact and with lookalike values (``true`` or ``1.0`` for ``1``);
* ``checkpoints.json``  Merkle roots, inclusion and consistency proofs (RFC 9162, by
  a naive recursion written here), signed checkpoints (valid and not) and a split view.

Everything is fixed: the keys are ``SigningKey(bytes([1]) * 32)`` (origin A) and
``SigningKey(bytes([2]) * 32)`` (B), times are constants, and Ed25519 signatures are
deterministic. The expected verdicts are written out here by hand, never computed by the
code under test; ``tests/core/test_vectors.py`` checks the code against them.

Invalid bodies are signed correctly (the raw bytes, with ``DOMAIN_RECORD``) so that each
is rejected for its one fault, whatever order a verifier checks things in; the
``payload-order/*`` ones hold several payload faults on purpose (the spec fixes their
order), and the ``signature/*`` edge cases are signed by hand, with curve arithmetic
written here (``equation_holds`` says whether the plain RFC 8032 equation holds).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import struct
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from citynode.core import encoding
from citynode.core.cards import CardFeed, card_to_json, make_card
from citynode.core.keys import (
    DOMAIN_CARD,
    DOMAIN_CHECKPOINT,
    DOMAIN_RECORD,
    NodeKey,
    SigningKey,
    node_id,
)

HERE = Path(__file__).resolve().parent

KEY_A = SigningKey(bytes([1]) * 32)
KEY_B = SigningKey(bytes([2]) * 32)
KEY_C = SigningKey(bytes(range(32)))

T0 = 1_735_689_600_000  # 2025-01-01T00:00:00Z, in ms: every record is dated from here
NOW = T0 + 3_600_000  # every vector is verified at 2025-01-01T01:00:00Z
TOLERANCE_MS = 15 * 60 * 1000
CUSTOM = "org.example.Test"

Case = dict[str, Any]


# --------------------------------------------------------------------------- raw msgpack


def enc(value: Any) -> bytes:
    """Canonical msgpack of ``value``."""
    return encoding.encode(value)


def map_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x80 | n])
    if n < 0x10000:
        return b"\xde" + n.to_bytes(2, "big")
    return b"\xdf" + n.to_bytes(4, "big")


def raw_map(entries: list[tuple[bytes, bytes]], header: bytes | None = None) -> bytes:
    """A msgpack map from already encoded ``(key, value)`` pairs, in the order given."""
    head = map_header(len(entries)) if header is None else header
    return head + b"".join(k + v for k, v in entries)


def bin_(data: bytes) -> bytes:
    """Shortest msgpack bin of ``data``."""
    n = len(data)
    if n < 0x100:
        return b"\xc4" + bytes([n]) + data
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big") + data
    return b"\xc6" + n.to_bytes(4, "big") + data


_AUTO: Any = object()
#: Record body -> its payload bytes, for every body :func:`detach` made.
_PAYLOADS: dict[bytes, bytes] = {}


def envelope(body: bytes, sig: bytes, payload: bytes | None = _AUTO) -> bytes:
    """The record envelope layout, written out: 0x93, bin(body), c4 40, signature, then
    bin(payload) or c0 (nil: a tombstone). The payload defaults to the one
    :func:`detach` took out of ``body``, else nil."""
    assert len(sig) == 64
    if payload is _AUTO:
        payload = _PAYLOADS.get(body)
    return b"\x93" + bin_(body) + b"\xc4\x40" + sig + (b"\xc0" if payload is None
                                                      else bin_(payload))


def signed_envelope(body: bytes, sig: bytes) -> bytes:
    """The two-element envelope of cards and checkpoints: 0x92, bin(body), c4 40, sig."""
    assert len(sig) == 64
    return b"\x92" + bin_(body) + b"\xc4\x40" + sig


def _skip(b: bytes, i: int) -> int:
    """The index after the msgpack value at ``b[i]`` (raw: no checks of content)."""
    t = b[i]
    if t <= 0x7F or t >= 0xE0 or t in (0xC0, 0xC2, 0xC3):
        return i + 1
    if 0x80 <= t <= 0x9F:
        n = (t & 0x0F) * (2 if t < 0x90 else 1)
        i += 1
        for _ in range(n):
            i = _skip(b, i)
        return i
    if 0xA0 <= t <= 0xBF:
        return i + 1 + (t & 0x1F)
    fixed = {0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9, 0xD0: 2, 0xD1: 3,
             0xD2: 5, 0xD3: 9, 0xD4: 3, 0xD5: 4, 0xD6: 6, 0xD7: 10, 0xD8: 18}
    if t in fixed:
        return i + fixed[t]
    width = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4, 0xC7: 1, 0xC8: 2,
             0xC9: 4}
    if t in width:
        w = width[t]
        n = int.from_bytes(b[i + 1:i + 1 + w], "big")
        return i + 1 + w + n + (1 if t in (0xC7, 0xC8, 0xC9) else 0)
    w = 2 if t in (0xDC, 0xDE) else 4
    n = int.from_bytes(b[i + 1:i + 1 + w], "big") * (2 if t in (0xDE, 0xDF) else 1)
    i += 1 + w
    for _ in range(n):
        i = _skip(b, i)
    return i


_PAYLOAD_KEYS = {enc("data"): enc("data_digest"), enc("sealed"): enc("sealed_digest")}


def vector_salt(raw: bytes) -> bytes:
    """The fixed salt of a vector's payload: 16 bytes derived from the record map as
    written (so two records differing anywhere, seq included, get different salts; a
    real node draws them at random)."""
    return hashlib.sha256(b"citynode/test/payload-salt" + raw).digest()[:16]


def salted(data_raw: bytes, salt: bytes,
           moved: list[tuple[bytes, bytes]] | None = None) -> bytes:
    """A plain record's payload: the map ``{"data": <data_raw as written>, "salt":
    bin(salt)}`` plus the ``moved`` entries (``subject``, ``dataschema``, as written),
    in canonical key order (data, dataschema, salt, subject)."""
    ents = [(enc("data"), data_raw), (enc("salt"), bin_(salt)), *(moved or [])]
    ents.sort(key=lambda e: encoding.decode(e[0]).encode())
    return map_header(len(ents)) + b"".join(k + v for k, v in ents)


_MOVED = (enc("dataschema"), enc("subject"))


def detach(raw: bytes) -> bytes:
    """A format-2 body from a record map written with its payload inline (``data`` or
    ``sealed``, as the fields below are written): that entry's value bytes, exactly as
    written (faults included), become the payload (``data`` is wrapped, with
    ``subject`` and ``dataschema`` moved out of the body and a fixed salt, by
    :func:`salted`), and the entry becomes the payload's digest under ``data_digest`` /
    ``sealed_digest`` (same place in key order). Returns the body; :func:`envelope`
    finds the payload. A value that is not such a map is returned unchanged."""
    try:
        t = raw[0]
        if 0x80 <= t <= 0x8F:
            n, i = t & 0x0F, 1
        elif t == 0xDE:
            n, i = int.from_bytes(raw[1:3], "big"), 3
        else:
            return raw
        ents = []
        for _ in range(n):
            k_end = _skip(raw, i)
            v_end = _skip(raw, k_end)
            ents.append((raw[i:k_end], raw[k_end:v_end]))
            i = v_end
        if i > len(raw):
            return raw
        keys = [k for k, _v in ents]
        if enc("data") not in keys and enc("sealed") not in keys:
            return raw
        plain = enc("data") in keys
        moved = [(k, v) for k, v in ents if plain and k in _MOVED]
        kept = [(k, v) for k, v in ents if not (plain and k in _MOVED)]
        out = b""
        payload = None
        for key, value in kept:
            if payload is None and key in _PAYLOAD_KEYS:
                payload = value
                if key == enc("data"):
                    payload = salted(payload, vector_salt(raw), moved)
                out += _PAYLOAD_KEYS[key] + bin_(hashlib.sha256(payload).digest())
            else:
                out += key + value
        head = (bytes([0x80 | len(kept)]) if t != 0xDE
                else b"\xde" + len(kept).to_bytes(2, "big"))
        body = head + out + raw[i:]
    except IndexError:
        return raw
    assert payload is not None
    _PAYLOADS[body] = payload
    return body


# --------------------------------------------------------------------------- bodies


def fields(
    key: SigningKey = KEY_A,
    *,
    feed: str = "test",
    seq: int = 1,
    prev: bytes | None = None,
    time: Any = T0,
    type_: str = CUSTOM,
    data: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    """The fields of a record body; ``extra`` adds some; a field given as ``...`` is left out."""
    f: dict[str, Any] = {
        "version": 2,
        "origin": key.public_key,
        "feed": feed,
        "seq": seq,
        "time": time,
        "type": type_,
        "data": {"reading": 42} if data is None else data,
    }
    if prev is not None:
        f["prev"] = prev
    f.update(extra)
    return {k: v for k, v in f.items() if v is not ...}


def entries(f: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    """Canonical ``(key, value)`` encodings of ``f``, in canonical (sorted) order."""
    return [(enc(k), enc(f[k])) for k in sorted(f, key=lambda k: k.encode())]


def replace_value(f: dict[str, Any], name: str, raw: bytes) -> bytes:
    """The body of ``f`` with field ``name``'s value encoded as ``raw`` bytes."""
    return raw_map([(k, raw if k == enc(name) else v) for k, v in entries(f)])


def rid(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()


# --------------------------------------------------------------------------- cases


def case(
    name: str,
    description: str,
    body: bytes,
    *,
    signer: SigningKey = KEY_A,
    origin: SigningKey = KEY_A,
    sig: bytes | None = None,
    env: bytes | None = None,
    expect: str | dict[str, str] = "valid",
    split: bool = True,
    now_ms: int = NOW,
    payload: bytes | None = _AUTO,
) -> Case:
    """One vector. ``body`` may hold its payload inline (:func:`detach` takes it out);
    ``payload`` overrides the payload (None: a tombstone). ``env`` overrides the envelope
    (for broken layouts); ``split=False`` says that the envelope itself must be
    rejected, so there is no body/sig/payload to show."""
    if payload is _AUTO:
        body = detach(body)
    if sig is None:
        sig = signer.sign(DOMAIN_RECORD, body)
    if env is None:
        env = envelope(body, sig, payload)
    valid = expect == "valid"
    return {
        "name": name,
        "description": description,
        "now_ms": now_ms,
        "public_key_hex": origin.public_key.hex(),
        "node_id": node_id(origin.public_key),
        "envelope_hex": env.hex(),
        "body_hex": body.hex() if split else None,
        "sig_hex": sig.hex() if split else None,
        "payload_hex": (_payload_hex(body, payload) if split else None),
        "id_hex": rid(body).hex() if valid else None,
        "expect": expect,
    }


def _payload_hex(body: bytes, payload: bytes | None) -> str | None:
    p = _PAYLOADS.get(body) if payload is _AUTO else payload
    return None if p is None else p.hex()


def err(reason: str) -> dict[str, str]:
    return {"error": reason}


def point(lon: float, lat: float) -> dict[str, Any]:
    return {"type": "Point", "coordinates": [lon, lat]}


BUILTIN_PAYLOADS: list[tuple[str, str, dict[str, Any], str]] = [
    (
        "AirQualityObserved",
        "air-quality",
        {
            "dateObserved": "2025-01-01T00:00:00Z",
            "location": point(8.5417, 47.3769),
            "stationName": "Zürich Stampfenbachstrasse",
            "stationCode": "ZH-STA",
            "pm25": 12.5,
            "pm10": {"value": 20.1, "unitCode": "GQ"},
            "no2": 31,
            "o3": 48.2,
            "co": 0.4,
            "airQualityIndex": 42,
            "temperature": -3.5,
            "relativeHumidity": 0.81,
            "reliability": 0.9,
        },
        "station-zh-sta",
    ),
    (
        "TrafficFlowObserved",
        "traffic",
        {
            "dateObservedFrom": "2024-12-31T23:45:00Z",
            "dateObservedTo": "2025-01-01T00:00:00Z",
            "location": {
                "type": "LineString",
                "coordinates": [[8.5381, 47.3781], [8.5403, 47.3797]],
            },
            "laneId": 1,
            "laneDirection": "forward",
            "intensity": 312,
            "averageVehicleSpeed": 43.7,
            "occupancy": 0.12,
            "congested": False,
        },
        "segment-limmatquai-1",
    ),
    (
        "WeatherObserved",
        "weather",
        {
            "dateObserved": "2025-01-01T00:50:00+01:00",
            "location": {"type": "Point", "coordinates": [8.5650, 47.3779, 556]},
            "stationName": "Fluntern",
            "temperature": -2.4,
            "dewPoint": -4.1,
            "relativeHumidity": {"value": 87, "unitCode": "P1"},
            "atmosphericPressure": 1012.3,
            "windSpeed": {"value": 3.2, "unitCode": "MTS"},
            "windDirection": 225,
            "precipitation": 0,
            "weatherType": "fog",
        },
        "station-fluntern",
    ),
    (
        "WaterQualityObserved",
        "water",
        {
            "dateObserved": "2025-01-01T00:00:00Z",
            "location": point(8.5434, 47.3663),
            "name": "Zürichsee, Bellevue",
            "temperature": 6.1,
            "pH": 7.4,
            "conductivity": 0.0451,
            "O2": 10.8,
            "turbidity": 1.9,
        },
        "lake-bellevue",
    ),
    (
        "WasteContainer",
        "waste",
        {
            "location": point(8.5312, 47.3726),
            "serialNumber": "WC-00417",
            "wasteType": "glass",
            "fillingLevel": 0.65,
            "status": "ok",
            "dateLastEmptying": "2024-12-30T06:12:00Z",
            "dateObserved": "2025-01-01T00:00:00Z",
        },
        "container-wc-00417",
    ),
    (
        "CyberSecurityNotice",
        "security",
        {
            "dateIssued": "2025-01-01T00:00:00Z",
            "severity": "high",
            "tlp": "TLP:GREEN",
            "affectedSystem": "VPN gateways (PAN-OS GlobalProtect)",
            "title": "Exploited command injection in VPN gateways",
            "description": "Unauthenticated command injection is exploited in the wild; "
            "partner cities running the affected firmware should patch now.",
            "cve": ["CVE-2024-3400"],
            "indicators": [
                {"type": "ipv4", "value": "203.0.113.7"},
                {"type": "domain", "value": "update.example.org"},
                {"type": "sha256", "value": "ab" * 32},
            ],
            "mitigation": "Upgrade to a fixed release; rotate VPN credentials.",
            "references": ["https://security.example.org/advisories/2024-3400"],
        },
        "CVE-2024-3400",
    ),
]


def valid_cases() -> list[Case]:
    out: list[Case] = []
    s1 = enc(fields(data={"reading": 42, "unit": "dB"}))
    out.append(case(
        "valid/custom-seq1",
        f"First record (seq 1, no prev) of feed 'test' of a custom type {CUSTOM}; the "
        "envelope of docs/PROTOCOL.md's worked example.",
        s1,
    ))
    s2 = enc(fields(
        seq=2, prev=rid(s1), time=T0 + 60_000,
        data={"reading": 43, "unit": "dB"},
        subject="sensor-7", dataschema="https://example.org/schemas/test.json",
    ))
    out.append(case(
        "valid/custom-seq2",
        "seq 2 of the same feed: prev is the id of valid/custom-seq1; has subject and "
        "dataschema.",
        s2,
    ))
    out.append(case(
        "valid/same-data-other-salt",
        "seq 3 of the same feed with exactly the data of valid/custom-seq1 ({reading: "
        "42, unit: dB}): the payloads differ in their salt only, so the two data_digest "
        "values differ, and neither can be recomputed from the data alone.",
        enc(fields(seq=3, prev=b"\x33" * 32, time=T0 + 120_000,
                   data={"reading": 42, "unit": "dB"})),
    ))
    for type_, feed, data, subject in BUILTIN_PAYLOADS:
        body = enc(fields(feed=feed, type_=type_, data=data, subject=subject))
        out.append(case(f"valid/{type_}", f"A realistic {type_} payload.", body))
    out.append(case(
        "valid/unicode",
        "Non-ASCII strings (2-, 3- and 4-byte UTF-8) and keys whose UTF-8 byte order "
        "differs from UTF-16 order: U+FB01 sorts before U+1F600 (bytes ef.. < f0..), "
        "while UTF-16 would put the surrogate pair d83d.. first.",
        enc(fields(data={
            "a": "Zürich – Genève",
            "Z": "東京都",
            "ä": "😀 smog 🌫",
            "é": "مرحبا",
            "ﬁ": "ligature key",
            "😀": "emoji key",
            "日本": "e\u0301 (combining accent, not normalized)",
            "z": "",
        })),
    ))
    out.append(case(
        "valid/floats",
        "Floats are always float64 (0xcb), also when integral (1.0) or negative zero.",
        enc(fields(data={
            "tenth": 0.1, "negzero": -0.0, "one": 1.0, "max": 1.7976931348623157e308,
            "tiny": 5e-324, "half": -21.5, "pi": 3.141592653589793,
        })),
    ))
    out.append(case(
        "valid/integers",
        "Integers at every width boundary, negative and positive, in their shortest "
        "encodings (positive values are always unsigned forms).",
        enc(fields(data={
            "neg": [-1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1,
                    -(2**63)],
            "pos": [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1],
        })),
    ))
    out.append(case(
        "valid/nested",
        "Nested maps and arrays, empty containers, nil, booleans and bin.",
        enc(fields(data={
            "station": {"id": "s-1", "tags": ["urban", "traffic"], "meta": {}},
            "series": [[1, 2.5], [2, None], [3, True, False]],
            "raw": b"\x00\x01\xfe\xff",
            "empty": [],
            "deep": {"a": {"b": {"c": [{"d": None}]}}},
        })),
    ))
    out.append(case(
        "valid/length-boundaries",
        "str/bin/array/map lengths at their header boundaries: fixstr 31 vs str8 32, "
        "str8 255 vs str16 256, bin8 255 vs bin16 256, fixarray 15 vs array16 16, "
        "fixmap 15 vs map16 16.",
        enc(fields(data={
            "s31": "x" * 31, "s32": "x" * 32, "s255": "y" * 255, "s256": "y" * 256,
            "b255": b"\x07" * 255, "b256": b"\x07" * 256,
            "a15": list(range(15)), "a16": list(range(16)),
            "m15": {f"k{i:02}": i for i in range(15)},
            "m16": {f"k{i:02}": i for i in range(16)},
        })),
    ))
    aq = dict(BUILTIN_PAYLOADS[0][2], location={
        "type": "Point", "coordinates": [8.5417, 47.3769],
        "bbox": [8.5, 47.3, 8.6, 47.4], "crs": "any value: foreign members are unchecked",
    })
    out.append(case(
        "valid/geometry-foreign-members",
        "A Point with a bbox and a foreign member 'crs' (RFC 7946 sections 5 and 6): "
        "members other than type and coordinates are allowed and not checked.",
        enc(fields(feed="air-quality", type_="AirQualityObserved", data=aq)),
    ))
    ring = {"type": "Polygon", "coordinates": [[[8, 47], [8.5, 47.0], [8.5, 47.5],
                                                 [8.0, 47.0]]]}
    out.append(case(
        "valid/polygon-ring-closed-as-numbers",
        "A Polygon ring that starts at [8, 47] (integers) and ends at [8.0, 47.0] "
        "(floats): closed, since positions compare as numbers.",
        enc(fields(feed="air-quality", type_="AirQualityObserved",
                   data=dict(aq, location=ring))),
    ))
    notice = dict(BUILTIN_PAYLOADS[-1][2], indicators=[
        {"type": "domain", "value": "xn--mnchen-3ya.example."},
        {"type": "domain", "value": "a-1.b2.example"},
        {"type": "url", "value": "https://example.org/\u00e4\u00a0x"},
        {"type": "email", "value": "\u00fc@example.org"},
        {"type": "sha256", "value": "9F86D081884C7D659A2FEAA0C55AD015"
                                    "a3bf4f1b2b0b822cd15d6c15b0f00a08"},
        {"type": "cve", "value": "CVE-2024-" + "1" * 19},
    ])
    out.append(case(
        "valid/indicator-edge-forms",
        "Indicators at the edge of their rules: a punycode domain with a final dot, "
        "labels with hyphens and digits; a url and an email holding non-ASCII "
        "characters, U+00A0 included (only the six ASCII whitespace characters are "
        "whitespace for these rules); a sha256 in mixed case; a CVE number of 19 "
        "digits.",
        enc(fields(feed="security", type_="CyberSecurityNotice", data=notice)),
    ))
    ips = dict(BUILTIN_PAYLOADS[-1][2], indicators=[
        {"type": "ipv4", "value": "203.0.113.7/24"},
        {"type": "ipv4", "value": "0.0.0.0/0"},
        {"type": "ipv6", "value": "::ffff:192.0.2.1"},
        {"type": "ipv6", "value": "2001:DB8::1/128"},
        {"type": "ipv6", "value": "1:2:3:4:5:6:7::"},
    ])
    out.append(case(
        "valid/indicator-ip-forms",
        "ipv4 and ipv6 indicators at the edge of their rules: bits set after the prefix, "
        "prefix 0, an ipv4 address in the last 32 bits, upper-case hex with a prefix of "
        "128, '::' standing for a single zero group.",
        enc(fields(feed="security", type_="CyberSecurityNotice", data=ips)),
    ))
    flow = dict(BUILTIN_PAYLOADS[1][2], dateObservedFrom="2016-12-31T23:59:60Z",
                dateObservedTo="2017-01-01T00:00:00Z")
    out.append(case(
        "valid/leap-second-interval",
        "dateObservedFrom 2016-12-31T23:59:60Z and dateObservedTo 2017-01-01T00:00:00Z: "
        "second 60 orders as second 0 of the next minute, so the two are the same "
        "instant, in order.",
        enc(fields(feed="traffic", type_="TrafficFlowObserved", data=flow)),
    ))
    out.append(case(
        "valid/max-seq",
        "seq at its maximum, 2^63-1 (a lone record verifies; the chain is a separate check).",
        enc(fields(seq=2**63 - 1, prev=b"\x11" * 32)),
    ))
    out.append(case(
        "valid/time-at-tolerance",
        "Dated exactly 15 minutes after now_ms: still accepted (the bound is inclusive).",
        enc(fields(time=NOW + TOLERANCE_MS)),
    ))
    out.append(case(
        "valid/time-epoch",
        "time 0 (1970-01-01) is valid: time is never checked against the past.",
        enc(fields(time=0)),
    ))
    out.append(case(
        "valid/feed-name-64",
        "A feed name of the maximum 64 characters, using every allowed character class.",
        enc(fields(feed="0city-node_feed.name" + "x" * 44)),
    ))
    out.append(case(
        "valid/payload-64KiB",
        "A payload of exactly 65536 bytes (the default limit, inclusive); its bin header "
        "in the envelope is therefore bin32 (c6 00 01 00 00).",
        sized_record(65536),
    ))
    out.append(case(
        "valid/depth-16",
        "16 nested containers in the payload (the payload map is level 1, the data map "
        "level 2): the maximum depth.",
        enc(fields(data=nest(15))),
    ))
    out.append(case(
        "valid/items-4096",
        "4096 items in the payload (2 payload map entries, data and salt, + 1 data "
        "entry + 4093 array elements): the maximum.",
        enc(fields(data={"values": [0] * 4093})),
    ))
    plain = detach(enc(fields(data={"reading": 42, "unit": "dB"})))
    out.append(case(
        "valid/tombstone",
        "valid/custom-seq1 with its payload removed (nil): body, signature and id are "
        "whole, so the record verifies on its own. Whether a node takes it is decided "
        "by payloads.json (an erasure request or retention must be behind it).",
        plain, payload=None,
    ))
    return out


def nest(levels: int) -> Any:
    """A map nested ``levels`` deep: ``nest(1) == {"n": 0}``, ``nest(2) == {"n": {"n": 0}}``."""
    v: Any = 0
    for _ in range(levels):
        v = {"n": v}
    return v


def raw_entries(body: bytes) -> list[tuple[bytes, bytes]]:
    """The ``(key, value)`` encodings of a map of at most 15 entries, as written."""
    assert 0x80 <= body[0] <= 0x8F
    out, i = [], 1
    for _ in range(body[0] & 0x0F):
        k_end = _skip(body, i)
        v_end = _skip(body, k_end)
        out.append((body[i:k_end], body[k_end:v_end]))
        i = v_end
    return out


def sized_pad(size: int) -> bytes:
    """A record map whose body (once its payload is detached) is exactly ``size`` bytes:
    an extra field ``pad`` (a bin; an unknown field, but the size is refused first)."""
    for header in (2, 3, 5):  # bin8, bin16, bin32 header sizes
        probe = detach(enc(fields(pad=b"")))
        n = size - len(probe) - header + 2
        raw = enc(fields(pad=b"\x00" * n))
        if n >= 0 and len(detach(raw)) == size:
            return raw
    raise AssertionError(f"cannot build a body of {size} bytes")


def sized_record(size: int) -> bytes:
    """A valid record map whose payload is exactly ``size`` bytes (a ``blob`` string
    in ``data`` pads it; the salted map around ``data`` is counted)."""
    size -= len(salted(b"", bytes(16)))
    pad = size - len(enc({"blob": ""}))
    for header in (1, 2, 3, 5):  # fixstr, str8, str16, str32 header sizes
        data = {"blob": "x" * (pad - header + 1)}
        if len(enc(data)) == size:
            return enc(fields(data=data))
    raise AssertionError(f"cannot build a payload of {size} bytes")


def invalid_cases() -> list[Case]:
    out: list[Case] = []
    base = fields(data={"reading": 42, "unit": "dB"})
    good = detach(enc(base))
    good_payload = _PAYLOADS[good]
    good_sig = KEY_A.sign(DOMAIN_RECORD, good)

    # --- signature
    bad_sig = good_sig[:-1] + bytes([good_sig[-1] ^ 0x01])
    out.append(case(
        "signature/bad-signature",
        "valid/custom-seq1 with the last signature byte changed (xor 0x01).",
        good, sig=bad_sig, expect=err("bad_signature"),
    ))
    out.append(case(
        "signature/other-key",
        "The body claims origin A but was signed by key B.",
        good, signer=KEY_B, expect=err("bad_signature"),
    ))
    flipped = good.replace(b"\xa4test", b"\xa4tesu")
    assert flipped != good and len(flipped) == len(good)
    out.append(case(
        "signature/flipped-body-byte",
        "valid/custom-seq1 with one body byte changed (feed 'test' -> 'tesu'): the body "
        "is still canonical and well formed, but the signature no longer matches.",
        flipped, sig=good_sig, payload=good_payload, expect=err("bad_signature"),
    ))

    # --- the payload beside the body
    pm = err("payload_mismatch")
    out.append(case(
        "payload/flipped-byte",
        "valid/custom-seq1 with one payload byte changed ('dB' -> 'dC'): signature and "
        "body are whole, but the payload is not the one whose digest was signed.",
        good, sig=good_sig, payload=good_payload.replace(b"\xa2dB", b"\xa2dC"), expect=pm,
    ))
    out.append(case(
        "payload/other-records-payload",
        "valid/custom-seq1's body and signature with the payload of "
        "valid/same-data-other-salt: the same data under another salt, so not the "
        "payload whose digest was signed.",
        good, sig=good_sig, payload=bytes.fromhex(
            next(c for c in valid_cases() if c["name"] == "valid/same-data-other-salt"
                 )["payload_hex"]), expect=pm,
    ))
    out.append(case(
        "payload/digest-31-bytes",
        "data_digest of 31 bytes: a digest is a 32-byte SHA-256.",
        raw_map([(k, bin_(hashlib.sha256(good_payload).digest()[:31]))
                 if k == enc("data_digest") else (k, v) for k, v in raw_entries(good)]),
        payload=good_payload, expect=err("bad_field"),
    ))

    # --- canonical msgpack: every body here decodes with a lenient msgpack decoder
    nc = err("non_canonical")
    ents = entries(base)
    out.append(case(
        "non-canonical/unsorted-keys",
        "The body map's entries in insertion order (version first), not sorted.",
        raw_map(ents[-1:] + ents[:-1]), expect=nc,
    ))
    ents_s = entries(base)
    i = [k for k, _ in ents_s].index(enc("feed"))
    out.append(case(
        "non-canonical/duplicate-key",
        "'feed' appears twice ('test' then 'tesu'); lenient decoders keep one or the "
        "other.",
        raw_map([*ents_s[: i + 1], (enc("feed"), enc("tesu")), *ents_s[i + 1 :]]), expect=nc,
    ))
    out.append(case(
        "non-canonical/non-shortest-int",
        "seq 1 encoded as uint8 (cc 01) instead of positive fixint (01).",
        replace_value(base, "seq", b"\xcc\x01"), expect=nc,
    ))
    out.append(case(
        "non-canonical/signed-form-positive-int",
        "version 2 encoded as int8 (d0 02): positive values use the unsigned forms.",
        replace_value(base, "version", b"\xd0\x02"), expect=nc,
    ))
    out.append(case(
        "non-canonical/float32",
        "A float given as float32 (ca 41 ac 00 00 = 21.5); floats are float64 only.",
        replace_value(base, "data", raw_map([
            (enc("reading"), b"\xca" + struct.pack(">f", 21.5)),
        ])), expect=nc,
    ))
    out.append(case(
        "non-canonical/str8-for-fixstr",
        "The key 'feed' as str8 (d9 04 feed) where fixstr (a4 feed) fits.",
        raw_map([(b"\xd9\x04feed" if k == enc("feed") else k, v) for k, v in ents]),
        expect=nc,
    ))
    out.append(case(
        "non-canonical/map16-for-fixmap",
        "The data map with a map16 header (de 00 02) where fixmap (82) fits.",
        replace_value(base, "data", b"\xde\x00\x02" + enc(base["data"])[1:]), expect=nc,
    ))
    out.append(case(
        "non-canonical/ext-type",
        "An ext value (fixext1, type 5: d4 05 00) in the payload.",
        replace_value(base, "data", raw_map([(enc("reading"), b"\xd4\x05\x00")])),
        expect=nc,
    ))
    out.append(case(
        "non-canonical/timestamp-ext",
        "A msgpack timestamp (ext type -1, timestamp32: d6 ff + seconds) in the payload; "
        "time is an integer of milliseconds instead.",
        replace_value(base, "data", raw_map([
            (enc("reading"), b"\xd6\xff" + struct.pack(">I", T0 // 1000)),
        ])), expect=nc,
    ))
    out.append(case(
        "non-canonical/ext-reserved-type",
        "An ext of the reserved type -2 (fixext1: d4 fe 00) in the payload: every ext is "
        "non_canonical, whatever its type.",
        replace_value(base, "data", raw_map([(enc("reading"), b"\xd4\xfe\x00")])),
        expect=nc,
    ))
    out.append(case(
        "non-canonical/timestamp-ext-bad-length",
        "An ext -1 of 1 byte (d4 ff 00), a length no msgpack timestamp has: still just an "
        "ext, so non_canonical (not malformed).",
        replace_value(base, "data", raw_map([(enc("reading"), b"\xd4\xff\x00")])),
        expect=nc,
    ))
    out.append(case(
        "non-canonical/nan",
        "A NaN float64 (cb 7f f8 00 ..) in the payload.",
        replace_value(base, "data", raw_map([
            (enc("reading"), b"\xcb" + struct.pack(">d", float("nan"))),
        ])), expect=nc,
    ))
    out.append(case(
        "non-canonical/infinity",
        "+infinity as float64 (cb 7f f0 00 ..) in the payload.",
        replace_value(base, "data", raw_map([
            (enc("reading"), b"\xcb" + struct.pack(">d", float("inf"))),
        ])), expect=nc,
    ))
    out.append(case(
        "non-canonical/int-key",
        "A payload map with an integer key (01).",
        replace_value(base, "data", raw_map([(b"\x01", enc("one"))])), expect=nc,
    ))
    out.append(case(
        "non-canonical/bin-key",
        "A payload map with a bin key (c4 01 6b); keys are strings.",
        replace_value(base, "data", raw_map([(b"\xc4\x01k", enc("one"))])), expect=nc,
    ))

    # --- not msgpack at all
    mal = err("malformed")
    out.append(case(
        "malformed/invalid-utf8",
        "A string (a2 ff fe) that is not valid UTF-8.",
        replace_value(base, "data", raw_map([(enc("unit"), b"\xa2\xff\xfe")])), expect=mal,
    ))
    # A fault of structure anywhere makes the input malformed, whatever else it holds:
    # an ext or a non-string key beside it does not make it non_canonical.
    out.append(case(
        "malformed/ext-then-invalid-utf8",
        "An ext of the reserved type -2 (d4 fe 00), then a string (a2 ff fe) that is not "
        "valid UTF-8: malformed, not non_canonical.",
        replace_value(base, "data", raw_map([(enc("a"), b"\xd4\xfe\x00"),
                                             (enc("unit"), b"\xa2\xff\xfe")])),
        expect=mal,
    ))
    out.append(case(
        "malformed/int-key-then-invalid-utf8",
        "A map with an integer key (01), then a string (a2 ff fe) that is not valid UTF-8: "
        "malformed, not non_canonical.",
        replace_value(base, "data", raw_map([(b"\x01", enc("one")),
                                             (enc("unit"), b"\xa2\xff\xfe")])),
        expect=mal,
    ))
    out.append(case(
        "malformed/truncated-body",
        "valid/custom-seq1's body without its last byte (signed as is).",
        good[:-1], payload=good_payload, expect=mal,
    ))
    out.append(case(
        "malformed/trailing-bytes-body",
        "valid/custom-seq1's body followed by one extra byte c0 (signed as is).",
        good + b"\xc0", payload=good_payload, expect=mal,
    ))
    bad_payload = good_payload + b"\xc0"
    out.append(case(
        "malformed/trailing-bytes-payload",
        "A payload followed by one extra byte c0, and a body whose digest is of those "
        "bytes (so the digest matches): the payload is not one msgpack value.",
        raw_map([(k, bin_(hashlib.sha256(bad_payload).digest()))
                 if k == enc("data_digest") else (k, v) for k, v in raw_entries(good)]),
        payload=bad_payload, expect=mal,
    ))

    # --- limits
    out.append(case(
        "limits/payload-too-large",
        "A payload of 65537 bytes, one over the default limit; rejected from the "
        "envelope's payload header, before the payload is read.",
        sized_record(65537), expect=err("too_large"), split=False,
    ))
    out.append(case(
        "limits/body-too-large",
        "A body of 65537 bytes (an extra field pads it), one over the default limit; "
        "rejected from the envelope header, before the body is read.",
        sized_pad(65537), expect=err("too_large"), split=False,
    ))
    out.append(case(
        "limits/too-deep",
        "17 nested containers in the payload (the payload map is level 1, the data map "
        "level 2), one over the limit of 16.",
        enc(fields(data=nest(16))), expect=err("too_deep"),
    ))
    out.append(case(
        "limits/too-many-items",
        "4097 items in the payload (2 payload map entries + 1 data entry + 4094 array "
        "elements), one over the limit of 4096.",
        enc(fields(data={"values": [0] * 4094})), expect=err("too_many_items"),
    ))

    # --- body fields
    out.append(case(
        "fields/unknown-version",
        "version 4: a verifier of versions 2 and 3 cannot know what version 4 means.",
        enc(fields(version=4)), expect=err("unknown_version"),
    ))
    out.append(case(
        "fields/version-3-without-key",
        "A body of version 3 (a cn2 origin) without its 'key' field: missing_field.",
        enc(fields(version=3)), expect=err("missing_field"),
    ))
    out.append(case(
        "fields/version-2-with-key",
        "A body of version 2 (a cn1 origin, its own key) with a 'key' field: unknown_field.",
        enc({**fields(), "key": KEY_A.public_key}), expect=err("unknown_field"),
    ))
    v1 = enc(fields(version=1, data={"reading": 42, "unit": "dB"}))
    out.append(case(
        "fields/version-1",
        "A body of format 1 (never deployed: the payload inside the body as 'data'), "
        "in a format-2 envelope with no payload: unknown_version.",
        v1, payload=None, env=envelope(v1, KEY_A.sign(DOMAIN_RECORD, v1), None),
        expect=err("unknown_version"),
    ))
    out.append(case(
        "fields/missing-field",
        "No 'time' field.",
        enc(fields(time=...)), expect=err("missing_field"),
    ))
    out.append(case(
        "fields/missing-version",
        "No 'version' field: reported as an unknown version (version is checked first).",
        enc(fields(version=...)), expect=err("unknown_version"),
    ))
    out.append(case(
        "fields/unknown-field",
        "An extra top-level field 'source' (payload attributes belong in data).",
        enc(fields(source="https://example.org")), expect=err("unknown_field"),
    ))
    out.append(case(
        "fields/seq-0", "seq 0: seq starts at 1.",
        enc(fields(seq=0)), expect=err("bad_field"),
    ))
    out.append(case(
        "fields/seq-true", "seq given as the boolean true, not the integer 1.",
        enc(fields(seq=True)), expect=err("bad_field"),
    ))
    out.append(case(
        "fields/seq1-with-prev", "seq 1 carrying a prev.",
        enc(fields(seq=1, prev=b"\x22" * 32)), expect=err("bad_prev"),
    ))
    out.append(case(
        "fields/seq1-with-nil-prev",
        "seq 1 carrying prev = nil: prev is absent at seq 1, not nil.",
        enc(fields(seq=1, prev=None) | {"prev": None}), expect=err("bad_prev"),
    ))
    out.append(case(
        "fields/seq2-without-prev", "seq 2 without prev.",
        enc(fields(seq=2)), expect=err("bad_prev"),
    ))
    out.append(case(
        "fields/prev-31-bytes", "seq 2 with a prev of 31 bytes.",
        enc(fields(seq=2, prev=b"\x22" * 31)), expect=err("bad_prev"),
    ))
    out.append(case(
        "fields/origin-31-bytes", "origin is 31 bytes, not a 32-byte public key.",
        enc(fields(origin=KEY_A.public_key[:31])), expect=err("bad_field"),
    ))
    out.append(case(
        "fields/origin-as-str", "origin as a str of 32 ASCII characters instead of bin.",
        enc(fields(origin="x" * 32)), expect=err("bad_field"),
    ))
    out.append(case(
        "fields/bad-feed-name", "Feed name 'Air Quality' (upper case and a space).",
        enc(fields(feed="Air Quality")), expect=err("bad_field"),
    ))
    out.append(case(
        "fields/feed-name-65", "Feed name of 65 characters, one over the maximum.",
        enc(fields(feed="f" * 65)), expect=err("bad_field"),
    ))
    out.append(case(
        "fields/negative-time", "time -1.",
        enc(fields(time=-1)), expect=err("bad_field"),
    ))
    out.append(case(
        "fields/float-time", "time as a float64 (milliseconds are an integer).",
        enc(fields(time=float(T0))), expect=err("bad_field"),
    ))
    out.append(case(
        "fields/empty-subject", "subject (in the payload) present but empty.",
        enc(fields(subject="")), expect=err("bad_field"),
    ))
    for name in ("subject", "dataschema"):
        clear = detach(enc(fields()))
        out.append(case(
            f"fields/{name}-in-body",
            f"{name} in the signed body (where format 2 had it before it moved into the "
            "payload): an unknown body field, so it could not survive an erasure.",
            raw_map(sorted([*raw_entries(clear), (enc(name), enc("sensor-7"))],
                           key=lambda e: encoding.decode(e[0]).encode())),
            payload=_PAYLOADS[clear], expect=err("unknown_field"),
        ))
    out.append(case(
        "fields/data-not-a-map", "The payload is an array, not a map.",
        enc(fields(data=[1, 2, 3])), expect=err("bad_field"),
    ))
    out.append(case(
        "fields/data-inline", "The payload inside the body as 'data' (format 1's place), "
        "besides data_digest: an unknown field.",
        raw_map([(enc("data"), good_payload), *raw_entries(good)]),
        payload=good_payload, expect=err("unknown_field"),
    ))
    out.append(case(
        "fields/body-not-a-map", "The body is an array, not a map.",
        enc([1, KEY_A.public_key, "test", 1]), expect=err("bad_field"),
    ))

    # --- time
    out.append(case(
        "time/future",
        "Dated 15 minutes and 1 ms after now_ms: beyond the tolerance.",
        enc(fields(time=NOW + TOLERANCE_MS + 1)), expect=err("future_time"),
    ))

    # --- payload (reason codes from citynode/core/types.py)
    aq = dict(BUILTIN_PAYLOADS[0][2])
    del aq["dateObserved"]
    out.append(case(
        "payload/missing-attribute",
        "AirQualityObserved without its required dateObserved.",
        enc(fields(feed="air-quality", type_="AirQualityObserved", data=aq)),
        expect=err("missing_field"),
    ))
    aq = dict(BUILTIN_PAYLOADS[0][2], location=point(47.3769, 98.5417))
    out.append(case(
        "payload/latitude-out-of-range",
        "AirQualityObserved whose location has latitude 98.5417 (lon/lat swapped and "
        "out of range).",
        enc(fields(feed="air-quality", type_="AirQualityObserved", data=aq)),
        expect=err("bad_value"),
    ))
    aq = dict(BUILTIN_PAYLOADS[0][2], pm25={"value": 12.5, "unitCode": "KGM"})
    out.append(case(
        "payload/bad-unit",
        "AirQualityObserved with pm25 in kilograms (unitCode KGM).",
        enc(fields(feed="air-quality", type_="AirQualityObserved", data=aq)),
        expect=err("bad_unit"),
    ))
    aq = dict(BUILTIN_PAYLOADS[0][2], **{"x" * 65: 1})
    out.append(case(
        "payload/bad-key",
        "AirQualityObserved with an extra attribute whose name has 65 characters.",
        enc(fields(feed="air-quality", type_="AirQualityObserved", data=aq)),
        expect=err("bad_key"),
    ))
    def payload(name: str, description: str, base_index: int, reason: str,
                **attrs: Any) -> None:
        type_, feed, data, _subject = BUILTIN_PAYLOADS[base_index]
        d = dict(data, **attrs)
        for k in [k for k, v in d.items() if v is ...]:
            del d[k]
        out.append(case(name, description,
                        enc(fields(feed=feed, type_=type_, data=d)), expect=err(reason)))

    payload("payload/normalized-without-value",
            "pm25 as {unitCode: GQ}: a normalized value without 'value' is bad_value.",
            0, "bad_value", pm25={"unitCode": "GQ"})
    payload("payload/unit-code-not-a-string",
            "pm25 as {value: 12.5, unitCode: 5}: any unitCode not accepted, whatever "
            "its type, is bad_unit.", 0, "bad_unit", pm25={"value": 12.5, "unitCode": 5})
    payload("payload/leap-second-after-to",
            "dateObservedFrom 2016-12-31T23:59:60.5Z is 2017-01-01T00:00:00.5Z, after "
            "dateObservedTo 2017-01-01T00:00:00.25Z.", 1, "bad_value",
            dateObservedFrom="2016-12-31T23:59:60.5Z", dateObservedTo="2017-01-01T00:00:00.25Z")
    payload("payload/polygon-ring-open-by-altitude",
            "A Polygon ring from [8, 47] to [8, 47, 0]: a position with an altitude is not "
            "one without, so the ring is not closed.", 0, "bad_value",
            location={"type": "Polygon", "coordinates": [[[8, 47], [8.5, 47], [8.5, 47.5],
                                                          [8, 47, 0]]]})
    for name, kind, value, why in (
        ("domain-one-label", "domain", "localhost", "a domain has two labels or more"),
        ("domain-hyphen-start", "domain", "-bad.example.org", "a label never starts "
         "with a hyphen"),
        ("domain-digit-tld", "domain", "example.123", "the last label starts with a "
         "letter"),
        ("domain-non-ascii", "domain", "m\u00fcnchen.example", "a domain is ASCII "
         "(punycode for IDNs)"),
        ("url-with-tab", "url", "https://example.org/a\tb", "a url holds no ASCII "
         "whitespace"),
        ("email-with-space", "email", "a b@example.org", "an email holds no ASCII "
         "whitespace"),
        ("ipv4-netmask", "ipv4", "192.0.2.0/255.255.255.0", "a prefix length is a "
         "number, not a netmask"),
        ("ipv4-prefix-leading-zero", "ipv4", "192.0.2.0/024", "a prefix length has no "
         "leading zero"),
        ("ipv4-leading-zero", "ipv4", "010.1.1.1", "no number of an ipv4 address has a "
         "leading zero"),
        ("ipv6-zone-index", "ipv6", "fe80::1%eth0", "an ipv6 indicator has no zone index"),
        ("ipv6-two-runs", "ipv6", "1::2::3", "'::' stands once at most"),
        ("cve-20-digits", "cve", "CVE-2024-" + "1" * 20, "a CVE number has 4 to 19 "
         "digits"),
    ):
        payload(f"payload/{name}", f"An indicator of type {kind} {value!r}: {why}.", -1,
                "bad_value", indicators=[{"type": kind, "value": value}])

    # Several faults in one payload: the order of docs/PROTOCOL.md ('Payload types',
    # which fault is reported) decides the reason; every one is signed correctly.
    payload("payload-order/required-first",
            "No location (missing_field) and pm25 in kg (bad_unit): required attributes "
            "are checked first.", 0, "missing_field", location=...,
            pm25={"value": 1, "unitCode": "KGM"})
    payload("payload-order/key-order-1",
            "co = -1 (bad_value) and pm25 in kg (bad_unit): attributes in key order, "
            "co before pm25.", 0, "bad_value", co=-1, pm25={"value": 1, "unitCode": "KGM"})
    payload("payload-order/key-order-2",
            "co in kg (bad_unit) and pm25 = -1 (bad_value): attributes in key order, "
            "co before pm25.", 0, "bad_unit", co={"value": 1, "unitCode": "KGM"}, pm25=-1)
    payload("payload-order/unit-before-value",
            "pm25 as {value: 'x', unitCode: KGM}: within a normalized value, unitCode "
            "before value.", 0, "bad_unit", pm25={"value": "x", "unitCode": "KGM"})
    payload("payload-order/attributes-before-measurements",
            "No measurement (missing_field) and an attribute name of 65 characters "
            "(bad_key): attributes before the at-least-one-measurement rule.", 0,
            "bad_key", **{"x" * 65: 1, **{m: ... for m in ("pm25", "pm10", "no2", "o3",
                                                            "co")}})
    payload("payload-order/measurements-before-interval",
            "No measurement (missing_field) and dateObservedTo before dateObservedFrom "
            "(bad_value): the interval is checked last.", 1, "missing_field",
            dateObservedFrom="2025-01-01T00:00:00Z", dateObservedTo="2024-12-31T23:45:00Z",
            **{m: ... for m in ("intensity", "averageVehicleSpeed", "occupancy",
                                "congested")})
    out.append(case(
        "payload/unknown-type",
        "type 'Test': neither built in nor a namespaced custom type (org.example.Test).",
        enc(fields(type_="Test")), expect=err("unknown_type"),
    ))

    # --- envelope layout
    env_good = envelope(good, good_sig)
    be = err("bad_envelope")
    tail = bin_(good_payload)
    out.append(case(
        "envelope/four-elements",
        "The array has a fourth element (nil): 94 .. c0.",
        good, env=b"\x94" + env_good[1:] + b"\xc0", expect=be, split=False,
    ))
    out.append(case(
        "envelope/format-1-layout",
        "The envelope of format 1: [body, signature], no payload element (92 ..).",
        good, env=signed_envelope(good, good_sig), expect=be, split=False,
    ))
    out.append(case(
        "envelope/signature-63-bytes",
        "The signature is 63 bytes (c4 3f ..).",
        good, env=b"\x93" + bin_(good) + b"\xc4\x3f" + good_sig[:63] + tail, expect=be,
        split=False,
    ))
    out.append(case(
        "envelope/signature-as-str",
        "The signature is a str8 (d9 40 ..), not bin.",
        good, env=b"\x93" + bin_(good) + b"\xd9\x40" + good_sig + tail, expect=be,
        split=False,
    ))
    out.append(case(
        "envelope/body-as-str",
        "The body is a str8 (d9 ..), not bin.",
        good, env=b"\x93\xd9" + bytes([len(good)]) + good + b"\xc4\x40" + good_sig + tail,
        expect=be, split=False,
    ))
    out.append(case(
        "envelope/payload-as-str",
        "The payload is a str8 (d9 ..), not bin nor nil.",
        good, env=b"\x93" + bin_(good) + b"\xc4\x40" + good_sig + b"\xd9"
        + bytes([len(good_payload)]) + good_payload, expect=be, split=False,
    ))
    out.append(case(
        "envelope/payload-as-map",
        "The payload embedded as a msgpack map instead of bin: it must stay the exact "
        "bytes its digest was made of.",
        good, env=b"\x93" + bin_(good) + b"\xc4\x40" + good_sig + good_payload, expect=be,
        split=False,
    ))
    out.append(case(
        "envelope/non-shortest-bin-header",
        "The body's length as bin16 (c5 00 LL) where bin8 (c4 LL) fits.",
        good, env=b"\x93\xc5" + len(good).to_bytes(2, "big") + good + b"\xc4\x40" + good_sig
        + tail, expect=nc, split=False,
    ))
    out.append(case(
        "envelope/non-shortest-payload-header",
        "The payload's length as bin16 (c5 00 LL) where bin8 (c4 LL) fits.",
        good, env=b"\x93" + bin_(good) + b"\xc4\x40" + good_sig + b"\xc5"
        + len(good_payload).to_bytes(2, "big") + good_payload, expect=nc, split=False,
    ))
    out.append(case(
        "envelope/truncated",
        "valid/custom-seq1's envelope without its last byte.",
        good, env=env_good[:-1], expect=be, split=False,
    ))
    out.append(case(
        "envelope/trailing-bytes",
        "valid/custom-seq1's envelope followed by one extra byte 00.",
        good, env=env_good + b"\x00", expect=be, split=False,
    ))
    return out


# --------------------------------------------------------------------------- Ed25519 edges
# Signatures on the edge of the strict Ed25519 rules (docs/PROTOCOL.md, 'Signature'),
# made by hand with the curve arithmetic below (affine twisted Edwards, RFC 8032 5.1),
# never by the code under test. Each one either satisfies the plain RFC 8032 equation
# encode([S]B - [h]A) == R (so a lax verifier such as OpenSSL's accepts it and only the
# strict rules refuse it), or is said not to.

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
Point = tuple[int, int]
_O: Point = (0, 1)


def _inv(x: int) -> int:
    return pow(x, _P - 2, _P)


def _add(p: Point, q: Point) -> Point:
    (x1, y1), (x2, y2) = p, q
    t = _D * x1 * x2 * y1 * y2 % _P
    return ((x1 * y2 + x2 * y1) * _inv(1 + t) % _P, (y1 * y2 + x1 * x2) * _inv(1 - t) % _P)


def _mul(k: int, p: Point) -> Point:
    acc = _O
    while k:
        if k & 1:
            acc = _add(acc, p)
        p, k = _add(p, p), k >> 1
    return acc


def _neg(p: Point) -> Point:
    return (-p[0] % _P, p[1])


def _x_of(y: int, sign: int) -> int | None:
    """The x with this sign bit on the curve at y (mod p), or None if there is none."""
    x2 = (y * y - 1) * _inv(_D * y * y + 1) % _P
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P:
        return None
    return x if x % 2 == sign else -x % _P


def _decode(enc_: bytes) -> Point:
    """Decode leniently, as a lax verifier does: y taken mod p, x = 0 with sign 1 let be."""
    n = int.from_bytes(enc_, "little")
    y = (n & (2**255 - 1)) % _P
    x = _x_of(y, n >> 255)
    assert x is not None, enc_.hex()
    return (x, y)


def _encode(p: Point) -> bytes:
    return (p[1] | (p[0] & 1) << 255).to_bytes(32, "little")


_B: Point = (_x_of(4 * _inv(5) % _P, 0) or 0, 4 * _inv(5) % _P)

# The y coordinates (little-endian, bit 255 clear) that libsodium refuses for A and R,
# with either sign bit: 14 encodings of the 8 points of order 1, 2, 4 and 8.
SMALL_ORDER_Y = [
    ("order-4-y0", "00" * 32),
    ("order-1-y1", "01" + "00" * 31),
    ("order-8-a", "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
    ("order-8-b", "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
    ("order-2-y-1", "ec" + "ff" * 30 + "7f"),
    ("order-4-y-p", "ed" + "ff" * 30 + "7f"),
    ("order-1-y-p+1", "ee" + "ff" * 30 + "7f"),
]


def _small_order_encodings() -> list[tuple[str, bytes]]:
    out = []
    for name, y in SMALL_ORDER_Y:
        for sign in (0, 1):
            e = bytearray(bytes.fromhex(y))
            e[31] |= sign << 7
            out.append((f"{name}-sign{sign}", bytes(e)))
    return out


def _order(p: Point) -> int:
    return next(n for n in (1, 2, 4, 8) if _mul(n, p) == _O)


def _scalar(seed: bytes) -> int:
    """RFC 8032 5.1.5: the secret scalar of a seed."""
    a = int.from_bytes(hashlib.sha512(seed).digest()[:32], "little")
    return (a & ((1 << 254) - 8)) | (1 << 254)


def _h(r: bytes, a: bytes, body: bytes) -> int:
    return int.from_bytes(hashlib.sha512(r + a + DOMAIN_RECORD + body).digest(), "little") % _L


def _nonce(label: str) -> int:
    return int.from_bytes(hashlib.sha512(b"citynode vector nonce " + label.encode()).digest(),
                          "little") % _L


def _s(n: int) -> bytes:
    return n.to_bytes(32, "little")


def sig_case(name: str, description: str, body: bytes, public_key: bytes, sig: bytes,
             *, holds: bool, expect: str | dict[str, str] = "valid") -> Case:
    """A record vector with a raw origin key and signature; ``holds`` says whether the
    plain RFC 8032 equation encode([S]B - [h]A) == R holds (S as an integer)."""
    return {
        "name": name,
        "description": description,
        "now_ms": NOW,
        "public_key_hex": public_key.hex(),
        "node_id": node_id(public_key),
        "envelope_hex": envelope(body, sig).hex(),
        "body_hex": body.hex(),
        "sig_hex": sig.hex(),
        "payload_hex": _payload_hex(body, _AUTO),
        "id_hex": rid(body).hex() if expect == "valid" else None,
        "expect": expect,
        "equation_holds": holds,
    }


def _ground(public_key: bytes, r: bytes, ok: Any) -> bytes:
    """The first body of origin ``public_key`` (data.try = 0, 1, ..) whose h satisfies
    ``ok(h)``: h depends on the whole body, so a few tries meet any condition mod 8."""
    for t in range(256):
        body = detach(enc(fields(origin=public_key, data={"reading": 42, "try": t})))
        if ok(_h(r, public_key, body)):
            return body
    raise AssertionError("no body found")


def signature_edge_cases() -> list[Case]:
    out: list[Case] = []
    bs = err("bad_signature")
    a = _scalar(KEY_A.seed)
    pub_a = KEY_A.public_key
    assert _encode(_mul(a, _B)) == pub_a
    small = _small_order_encodings()

    # A small-order key: [h]A is the identity whenever h is a multiple of A's order,
    # so S = k, R = [k]B "verifies" for a lax verifier, for any message: a forgery.
    for label, key in small:
        order = _order(_decode(key))
        k = _nonce(label)
        r = _encode(_mul(k, _B))
        body = _ground(key, r, lambda h, n=order: h % n == 0)
        out.append(sig_case(
            f"signature/small-order-key/{label}",
            f"origin {key.hex()}: a point of order {order} (one of libsodium's 14 "
            "blocked encodings). R = [k]B, S = k and h is a multiple of the order, so "
            "the plain equation holds for anyone: a forgery, refused.",
            body, key, r + _s(k), holds=True, expect=bs,
        ))

    # A small-order R. R = identity with key A: S = h*a gives [S]B - [h]A = identity.
    # Any other small-order R = T needs a key with a torsion part: A' = [a]B - T and
    # h = 1 mod the order of T, then [S]B - [h]A' = [h]T = T with S = h*a.
    for label, r in small:
        t = _decode(r)
        n = _order(t)
        key = pub_a if n == 1 else _encode(_add(_mul(a, _B), _neg(t)))
        body = _ground(key, r, lambda h, n=n: n == 1 or h % n == 1)
        holds = _encode(t) == r  # a lax verifier compares R's bytes with a canonical encoding
        out.append(sig_case(
            f"signature/small-order-r/{label}",
            f"R = {r.hex()}: a point of order {n} (blocked); "
            + ("the plain equation holds, refused for R alone." if holds else
               "not the canonical encoding of its point either, so even a lax verifier "
               "refuses it."),
            body, key, r + _s(_h(r, key, body) * a % _L), holds=holds, expect=bs,
        ))

    # Non-canonical encodings (y >= p) of points that are not small-order: nobody knows
    # their discrete log, so no signature can satisfy the equation; refused either way.
    y3 = (_P + 3).to_bytes(32, "little")
    assert _x_of(3, 0) is not None and _x_of(2, 0) is None
    body = detach(enc(fields(origin=y3)))
    k = _nonce("non-canonical-key")
    out.append(sig_case(
        "signature/non-canonical-key",
        "origin encodes y = p + 3 (y >= p: the point y = 3 written non-canonically).",
        body, y3, _encode(_mul(k, _B)) + _s(k), holds=False, expect=bs,
    ))
    y2 = (2).to_bytes(32, "little")
    body = detach(enc(fields(origin=y2)))
    out.append(sig_case(
        "signature/key-not-a-point",
        "origin encodes y = 2, for which no x exists: not a curve point.",
        body, y2, _encode(_mul(k, _B)) + _s(k), holds=False, expect=bs,
    ))
    good = detach(enc(fields(data={"reading": 42, "unit": "dB"})))
    honest = KEY_A.sign(DOMAIN_RECORD, good)
    s_honest = int.from_bytes(honest[32:], "little")
    out.append(sig_case(
        "signature/non-canonical-r",
        "valid/custom-seq1's S with R = y = p + 3 (non-canonical): refused.",
        good, pub_a, y3 + honest[32:], holds=False, expect=bs,
    ))

    # S out of range. S + L satisfies the equation (it is S mod L) but S >= L is refused.
    for label, s, holds, note in (
        ("s-plus-l", s_honest + _L, True,
         "valid/custom-seq1's signature with S + L: the equation holds mod L, but S >= L."),
        ("s-equals-l", _L, False, "S = L exactly (the smallest S out of range)."),
        ("s-max", 2**256 - 1, False, "S = 2^256 - 1."),
        ("s-l-minus-1", _L - 1, False,
         "S = L - 1, the largest S in range: it passes the range check and fails the "
         "equation. (No valid signature with a chosen S can be made: S follows from R, A "
         "and the message through SHA-512.)"),
    ):
        out.append(sig_case(f"signature/{label}", note, good, pub_a,
                            honest[:32] + _s(s), holds=holds, expect=bs))

    # A key with a torsion part (order 8L) is NOT refused: no subgroup check, and the
    # equation is the cofactorless one. With h a multiple of 8, S = k + h*a verifies.
    t8 = _decode(bytes.fromhex(SMALL_ORDER_Y[2][1]))
    mixed = _encode(_add(_mul(a, _B), t8))
    k = _nonce("mixed-order-key")
    r = _encode(_mul(k, _B))
    body = _ground(mixed, r, lambda h: h % 8 == 0)
    out.append(sig_case(
        "signature/mixed-order-key-valid",
        "origin = A + T, T of order 8: not a blocked encoding, so accepted; h is a "
        "multiple of 8 so [S]B - [h](A + T) = R. Verifiers MUST NOT add a subgroup check.",
        body, mixed, r + _s((k + _h(r, mixed, body) * a) % _L), holds=True,
    ))
    assert s_honest < _L
    return out


def records_file() -> dict[str, Any]:
    return {
        "about": (
            "citynode record vectors (docs/PROTOCOL.md). For each case: split "
            "envelope_hex by the envelope layout; if body_hex is null the envelope "
            "itself must be rejected with expect.error; otherwise the split must give "
            "body_hex and sig_hex, and full verification of the record at now_ms must "
            "give expect: 'valid' (with record id id_hex = SHA-256(body)) or "
            "{'error': reason code}. public_key_hex is the origin the body claims. "
            "Cases made by hand on the edge of the strict Ed25519 rules also carry "
            "equation_holds: whether the plain RFC 8032 equation encode([S]B - [h]A) "
            "== R holds (S as an integer), i.e. whether only the strict rules refuse it."
        ),
        "generator": "tests/vectors/generate.py",
        "domain_record_hex": DOMAIN_RECORD.hex(),
        "future_tolerance_ms": TOLERANCE_MS,
        "limits": {"max_body_bytes": 65536, "max_depth": 16, "max_items": 4096},
        "cases": valid_cases() + invalid_cases() + signature_edge_cases(),
    }


# --------------------------------------------------------------------------- chains


def fork_proof(a: bytes, b: bytes) -> bytes:
    """The fork proof layout, written out: map {a: bin, b: bin, kind: "fork"}."""
    return b"\x83" + b"\xa1a" + bin_(a) + b"\xa1b" + bin_(b) + b"\xa4kind\xa4fork"


def _padded_proof(a: bytes, b: bytes, size: int) -> bytes:
    """A proof map of a, b, kind and a 'pad' bin (sorted between 'kind' and nothing
    else) making it exactly ``size`` bytes."""
    base = fork_proof(a, b)
    for header in (2, 3, 5):  # bin8, bin16, bin32 header sizes
        pad = size - len(base) - 4 - header  # a3 'pad' key is 4 bytes
        raw = b"\x84" + base[1:] + b"\xa3pad" + bin_(b"\x00" * pad)
        if pad >= 0 and len(raw) == size:
            return raw
    raise AssertionError(f"cannot build a proof of {size} bytes")


def chain_file() -> dict[str, Any]:
    def signed(key: SigningKey, **kw: Any) -> tuple[bytes, bytes]:
        body = detach(enc(fields(key, **kw)))
        return body, envelope(body, key.sign(DOMAIN_RECORD, body))

    recs: dict[str, tuple[bytes, bytes]] = {}
    notes: dict[str, str] = {}

    def add(name: str, note: str, key: SigningKey = KEY_A, **kw: Any) -> bytes:
        recs[name] = signed(key, **kw)
        notes[name] = note
        return rid(recs[name][0])

    # Times deliberately out of order: seq orders a feed, time never does.
    r1 = add("r1", "A, feed 'chain', seq 1", feed="chain", seq=1, time=T0 + 2000,
             data={"n": 1})
    r2 = add("r2", "A, feed 'chain', seq 2, prev r1 (dated before r1: time never orders)",
             feed="chain", seq=2, prev=r1, time=T0 + 1000, data={"n": 2})
    add("r3", "A, feed 'chain', seq 3, prev r2", feed="chain", seq=3, prev=r2,
        time=T0 + 3000, data={"n": 3})
    r2b = add("r2b", "A, feed 'chain', seq 2, prev r1: a second, different seq 2",
              feed="chain", seq=2, prev=r1, time=T0 + 1000, data={"n": 20})
    add("r3b", "A, feed 'chain', seq 3, prev r2b: extends the other branch",
        feed="chain", seq=3, prev=r2b, time=T0 + 3000, data={"n": 30})
    add("r2x", "A, feed 'chain', seq 2 whose prev is no record of A (ee * 32)",
        feed="chain", seq=2, prev=b"\xee" * 32, time=T0 + 1000, data={"n": 2})
    add("r1-other-feed", "A, feed 'chain-other', seq 1", feed="chain-other", seq=1,
        time=T0 + 2000, data={"n": 1})
    add("r1-key-b", "B, feed 'chain', seq 1", KEY_B, feed="chain", seq=1, time=T0 + 2000,
        data={"n": 1})

    def head(name: str | None, seq: int = 0) -> dict[str, Any] | None:
        return None if name is None else {"seq": seq, "id_hex": rid(recs[name][0]).hex()}

    def held(name: str | None) -> str | None:
        return None if name is None else rid(recs[name][0]).hex()

    def verdict(v: str, missing: list[int] | None = None, conflict: int | None = None
                ) -> dict[str, Any]:
        return {"verdict": v, "missing": missing, "conflicts_with_seq": conflict}

    classify = [
        ("seq1-on-empty", "r1 arrives; nothing of the feed is held", "r1", None, None,
         verdict("extends")),
        ("seq2-extends", "r2 on head r1", "r2", head("r1", 1), None, verdict("extends")),
        ("seq3-extends", "r3 on head r2 (r2 is dated before r1: time never orders)", "r3",
         head("r2", 2), None, verdict("extends")),
        ("duplicate", "r2 again, head r3, r2 held at seq 2", "r2", head("r3", 3),
         held("r2"), verdict("duplicate")),
        ("duplicate-seq1", "r1 again, head r3", "r1", head("r3", 3), held("r1"),
         verdict("duplicate")),
        ("ahead-on-empty", "r3 arrives first: seqs 1..2 are missing", "r3", None, None,
         verdict("ahead", [1, 2])),
        ("ahead", "r3 on head r1: seq 2 is missing", "r3", head("r1", 1), None,
         verdict("ahead", [2, 2])),
        ("wrong-prev", "r2x on head r1: seq 2 whose prev is not r1's id", "r2x",
         head("r1", 1), None, verdict("equivocation", conflict=1)),
        ("same-seq", "r2b with r2 held at seq 2 (head r3)", "r2b", head("r3", 3),
         held("r2"), verdict("equivocation", conflict=2)),
        ("same-seq-at-head", "r2b on head r2", "r2b", head("r2", 2), held("r2"),
         verdict("equivocation", conflict=2)),
        ("first-copy-wins", "r2 after r2b was stored first: r2 is now the rival", "r2",
         head("r2b", 2), held("r2b"), verdict("equivocation", conflict=2)),
        ("prev-mismatch", "r3b on head r2: seq 3 whose prev is r2b, not r2", "r3b",
         head("r2", 2), None, verdict("equivocation", conflict=2)),
    ]

    def proof(a: str, b: str) -> bytes:
        return fork_proof(recs[a][1], recs[b][1])

    tampered = bytearray(recs["r2b"][1])
    tampered[-1] ^= 0x01
    unsorted = (b"\x83" + b"\xa4kind\xa4fork" + b"\xa1a" + bin_(recs["r2"][1])
                + b"\xa1b" + bin_(recs["r2b"][1]))
    wrong_kind = enc({"kind": "split-view", "a": recs["r2"][1], "b": recs["r2b"][1]})
    extra_key = enc({"kind": "fork", "a": recs["r2"][1], "b": recs["r2b"][1], "note": "x"})
    proofs: list[tuple[str, str, bytes, str]] = [
        ("same-seq", "r2 and r2b: two different records at seq 2", proof("r2", "r2b"),
         "valid"),
        ("prev-mismatch", "r2 and r3b: r3b is at seq 3 and its prev is not r2's id",
         proof("r2", "r3b"), "valid"),
        ("prev-mismatch-reversed", "r3b and r2: the order of a and b does not matter",
         proof("r3b", "r2"), "valid"),
        ("wrong-prev", "r1 and r2x: r2x's prev is not r1's id", proof("r1", "r2x"), "valid"),
        ("same-record-twice", "r2 and r2: one record is no fork", proof("r2", "r2"),
         "invalid"),
        ("different-feeds", "r1 and r1-other-feed: both seq 1, but of different feeds",
         proof("r1", "r1-other-feed"), "invalid"),
        ("different-origins", "r1 and r1-key-b: both seq 1, but of different origins",
         proof("r1", "r1-key-b"), "invalid"),
        ("consistent-pair", "r1 and r2: r2 extends r1", proof("r1", "r2"), "invalid"),
        ("seq-gap", "r1 and r3b: seq 1 and 3 can belong to one chain (via r2b)",
         proof("r1", "r3b"), "invalid"),
        ("tampered-record", "r2 and r2b with r2b's last signature byte changed",
         fork_proof(recs["r2"][1], bytes(tampered)), "invalid"),
        ("unsorted-keys", "the same-seq proof with its keys not sorted", unsorted, "invalid"),
        ("wrong-kind", "kind is 'split-view', not 'fork'", wrong_kind, "invalid"),
        ("extra-key", "an extra key 'note'", extra_key, "invalid"),
        ("too-large", "143361 bytes, one over the size limit: r2 and r2b, then a "
         "padding key", _padded_proof(recs["r2"][1], recs["r2b"][1], 140 * 1024 + 1),
         "invalid"),
        ("too-deep", "a and b as arrays of one bin: depth 2, over the limit of 1",
         enc({"kind": "fork", "a": [recs["r2"][1]], "b": [recs["r2b"][1]]}), "invalid"),
        ("too-many-items", "a fourth entry: 4 items, over the limit of 3 (an extra key "
         "as well)", enc({"kind": "fork", "a": recs["r2"][1], "b": recs["r2b"][1], "c": 0}),
         "invalid"),
    ]

    # The one form nodes store and send (docs/PROTOCOL.md, 'Fork proofs'), written out:
    # the records without their payloads; same seq: the envelopes in byte order, listed
    # at that seq; prev mismatch: the lower seq first, listed at the higher.
    # The records in it as tombstones (payload nil): a proof needs no payload.
    def tomb(name: str) -> bytes:
        body = recs[name][0]
        return envelope(body, KEY_A.sign(DOMAIN_RECORD, body), None)

    canonical = {
        "same-seq": (fork_proof(*sorted((tomb("r2"), tomb("r2b")))), 2),
        "prev-mismatch": (fork_proof(tomb("r2"), tomb("r3b")), 3),
        "prev-mismatch-reversed": (fork_proof(tomb("r2"), tomb("r3b")), 3),
        "wrong-prev": (fork_proof(tomb("r1"), tomb("r2x")), 2),
    }
    return {
        "about": (
            "citynode feed chain vectors (docs/PROTOCOL.md, 'Feed chains' and 'Fork "
            "proofs'). 'records' are valid envelopes by key A (or B). 'classify': given "
            "the held contiguous head ({seq, id_hex} or null) and the id held at the "
            "record's seq (held_id_at_seq_hex, or null when none is needed), where the "
            "record fits. 'fork_proofs': proof bytes, to be checked offline "
            "(no future-time check): 'valid' or 'invalid'; a valid proof also gives "
            "the one form nodes store and send (canonical_hex) and the seq it is "
            "listed at."
        ),
        "generator": "tests/vectors/generate.py",
        "records": {
            name: {
                "description": notes[name],
                "envelope_hex": env.hex(),
                "id_hex": rid(body).hex(),
            }
            for name, (body, env) in recs.items()
        },
        "classify": [
            {
                "name": n,
                "description": d,
                "record": r,
                "head": h,
                "held_id_at_seq_hex": hid,
                "expect": e,
            }
            for n, d, r, h, hid, e in classify
        ],
        "fork_proofs": [
            {"name": n, "description": d, "proof_hex": p.hex(), "expect": e}
            | ({"canonical_hex": canonical[n][0].hex(), "listed_at_seq": canonical[n][1]}
               if e == "valid" else {})
            for n, d, p, e in proofs
        ],
    }


# --------------------------------------------------------------------------- payloads

DAY = 86_400_000
ERASURE_FEED = "citynode.erasures"
ERASURE_TYPE = "citynode.Erasure"


def _sealed_vector() -> dict[str, Any]:
    """The sealed value of tests/core/test_sealed.py's VECTOR_HEX (same inputs and
    random draws: SHA-256 of label || counter)."""
    from citynode.core.sealed import seal_payload

    counter = [0]

    def rng(n: int) -> bytes:
        counter[0] += 1
        return hashlib.sha256(b"citynode/test/sealed-vector"
                              + counter[0].to_bytes(4, "big")).digest()[:n]

    return seal_payload(origin_key=KEY_A.public_key, feed="cert.alerts", seq=3,
                        type="org.example.Notice",
                        data={"level": "high", "text": "patch now"},
                        subject="CVE-2025-0001", dataschema=None,
                        recipients=[SigningKey(bytes([3]) * 32).public_key,
                                    KEY_B.public_key], _rng=rng)


def payloads_file() -> dict[str, Any]:
    recs: dict[str, tuple[bytes, bytes, bytes | None, str]] = {}

    def add(name: str, note: str, raw: bytes, key: SigningKey = KEY_A,
            tombstone: bool = False) -> bytes:
        body = detach(raw)
        recs[name] = (body, key.sign(DOMAIN_RECORD, body),
                      None if tombstone else _PAYLOADS[body], note)
        return rid(body)

    plain = add("plain", "A, feed 'test', seq 1: a payload with a name in it, published "
                "by mistake", enc(fields(data={"reading": 42, "unit": "dB",
                                              "reported_by": "J. Doe"})))
    add("plain-tombstone", "'plain' with its payload removed (nil)",
        enc(fields(data={"reading": 42, "unit": "dB", "reported_by": "J. Doe"})),
        tombstone=True)
    sealed_raw = enc(fields(feed="cert.alerts", seq=3, prev=b"\x33" * 32, type_=...,
                            data=..., sealed=_sealed_vector()))
    add("sealed", "A, feed 'cert.alerts', seq 3: a sealed record (the sealed value of "
        "tests/core/test_sealed.py's vector) whose body holds sealed_digest", sealed_raw)
    add("sealed-tombstone", "'sealed' with its payload removed", sealed_raw, tombstone=True)

    def erasure(entries: list[tuple[str, int, bytes]], reason: str, *, seq: int = 1,
                prev: bytes | None = None, key: SigningKey = KEY_A) -> bytes:
        return enc(fields(key, feed=ERASURE_FEED, seq=seq, prev=prev, type_=ERASURE_TYPE,
                          time=T0 + DAY, data={
                              "erase": [{"feed": f, "seq": q, "id": i} for f, q, i in entries],
                              "reason": reason}))

    er = add("erasure", "A's erasure request (feed citynode.erasures, seq 1) naming "
             "'plain' at (test, 1)", erasure([("test", 1, plain)],
                                              "personal data published by mistake"))
    add("erasure-wrong-id", "A's erasure request (seq 2) naming (test, 1) with an id "
        "that is not the record held there (44 * 32)",
        erasure([("test", 1, b"\x44" * 32)], "wrong id", seq=2, prev=er))
    add("erasure-by-b", "B's erasure request naming (test, 1) with the id of A's "
        "'plain': an entry names a position of the signer's own feeds, so this names "
        "B's (test, 1), never A's record",
        erasure([("test", 1, plain)], "not mine", key=KEY_B), key=KEY_B)
    add("erasure-tombstone", "'erasure' with its payload removed",
        erasure([("test", 1, plain)], "personal data published by mistake"),
        tombstone=True)

    invalid: list[tuple[str, str, bytes, str]] = []
    body, sig, _payload, _n = recs["plain"]
    invalid.append(("payload-mismatch", "'plain' with the payload of another record "
                    "({data: {reading: 42, unit: dB}, salt: 16 bytes 00}): the digest in "
                    "the body does not match",
                    envelope(body, sig, salted(enc({"reading": 42, "unit": "dB"}),
                                               bytes(16))),
                    "payload_mismatch"))
    for name, note, raw in (
        ("erasure-names-erasure-feed", "An erasure request naming a position of "
         "citynode.erasures: an erasure request is never erased",
         erasure([(ERASURE_FEED, 1, b"\x55" * 32)], "x")),
        ("erasure-no-entries", "An erasure request naming nothing",
         erasure([], "x")),
        ("erasure-same-position-twice", "An erasure request naming (test, 1) twice",
         erasure([("test", 1, plain), ("test", 1, b"\x44" * 32)], "x")),
        ("erasure-empty-reason", "An erasure request whose reason is empty",
         erasure([("test", 1, plain)], "")),
        ("erasure-in-other-feed", "type citynode.Erasure in feed 'test'",
         enc(fields(type_=ERASURE_TYPE, data={"erase": [{"feed": "test", "seq": 1,
                                                          "id": plain}], "reason": "x"}))),
        ("other-type-in-erasure-feed", "A record of type org.example.Test in feed "
         "citynode.erasures", enc(fields(feed=ERASURE_FEED))),
    ):
        b = detach(raw)
        invalid.append((name, note, envelope(b, KEY_A.sign(DOMAIN_RECORD, b)), "bad_erasure"))

    def ingest(name: str, note: str, record: str, expect: str | dict[str, str], *,
               held: list[str] | None = None, batch: list[str] | None = None,
               cards: list[tuple[int, int | None]] | None = None,
               now: int = NOW) -> dict[str, Any]:
        return {"name": name, "description": note, "record": record,
                "erasures_held": held or [], "same_batch": batch or [],
                "cards": [{"time_ms": t, "retention_days": d} for t, d in cards or []],
                "now_ms": now, "expect": expect}

    missing = err("payload_missing")
    before = T0 - DAY  # a card signed before the records
    cases = [
        ingest("full-record", "'plain' with its payload, nothing else held", "plain",
               "stored"),
        ingest("tombstone-alone", "a tombstone with no request behind it, no retention",
               "plain-tombstone", missing),
        ingest("tombstone-erasure-held", "the tombstone, with A's erasure request held",
               "plain-tombstone", "erased", held=["erasure"]),
        ingest("tombstone-erasure-same-batch", "the tombstone, A's erasure request "
               "arriving in the same batch", "plain-tombstone", "erased", batch=["erasure"]),
        ingest("tombstone-erasure-by-other", "the tombstone, with B's erasure request "
               "naming A's id held: not the origin's request", "plain-tombstone", missing,
               held=["erasure-by-b"]),
        ingest("tombstone-erasure-wrong-id", "the tombstone, with an erasure request "
               "naming its position under another id", "plain-tombstone", missing,
               held=["erasure-wrong-id"]),
        ingest("tombstone-past-retention", "retention 30 days, now 31 days after the "
               "record's time", "plain-tombstone", "pruned", cards=[(before, 30)],
               now=T0 + 31 * DAY),
        ingest("tombstone-within-retention", "retention 30 days, now 29 days after the "
               "record's time", "plain-tombstone", missing, cards=[(before, 30)],
               now=T0 + 29 * DAY),
        ingest("tombstone-pruned-then-retention-raised", "signed under a card keeping "
               "payloads 1 day, pruned; a later card raised the retention to 30 days: "
               "the card in force when it was signed decides, not the newest",
               "plain-tombstone", "pruned", cards=[(before, 1), (T0 + 2 * DAY, 30)],
               now=T0 + 3 * DAY),
        ingest("tombstone-retention-lowered-later", "signed under a card keeping "
               "payloads 30 days; a later card lowered it to 1 day: still within the "
               "30 days it was signed under", "plain-tombstone", missing,
               cards=[(before, 30), (T0 + 2 * DAY, 1)], now=T0 + 3 * DAY),
        ingest("tombstone-no-card-in-force", "the only card held is dated after the "
               "record (its retention is not the record's): never past retention",
               "plain-tombstone", missing, cards=[(T0 + DAY, 1)], now=T0 + 400 * DAY),
        ingest("sealed-tombstone-alone", "a sealed record's tombstone, nothing behind it",
               "sealed-tombstone", missing),
        ingest("erasure-tombstone-past-retention", "an erasure request without its "
               "payload, far past the feed's retention: never erased nor pruned",
               "erasure-tombstone", missing, cards=[(before, 1)], now=T0 + 400 * DAY),
        ingest("full-record-erasure-held", "'plain' with its payload arriving after A's "
               "erasure request: stored as a tombstone (the payload dropped at ingest, "
               "after verification)", "plain", "erased", held=["erasure"]),
    ]
    applying = [
        {"name": "erasure-drops-payload", "description": "A's erasure request arrives at a "
         "node holding 'plain' with its payload", "held": ["plain"], "erasure": "erasure",
         "expect": {"dropped": ["plain"], "ignored": []}},
        {"name": "erasure-wrong-id", "description": "an erasure request naming (test, 1) "
         "under another id: that entry is ignored and counted", "held": ["plain"],
         "erasure": "erasure-wrong-id",
         "expect": {"dropped": [], "ignored": [{"feed": "test", "seq": 1,
                                                "reason": "erasure_mismatch"}]}},
        {"name": "erasure-by-other-origin", "description": "B's erasure request naming A's "
         "record's id (at B's (test, 1), not held): a record of another origin, which only "
         "its origin can erase; that entry is refused and counted, A's record stays whole",
         "held": ["plain"], "erasure": "erasure-by-b",
         "expect": {"dropped": [], "ignored": [{"feed": "test", "seq": 1,
                                                "reason": "erasure_not_origin"}]}},
        {"name": "erasure-by-other-origin-not-held", "description": "B's erasure request "
         "naming A's record's id at a node holding nothing: it waits at B's (test, 1) "
         "(refused as erasure_not_origin when A's record arrives; it never erases it)",
         "held": [], "erasure": "erasure-by-b",
         "expect": {"dropped": [], "ignored": []}},
    ]
    return {
        "about": (
            "citynode payload vectors (docs/PROTOCOL.md, 'Payloads, retention and "
            "erasure'). 'records': envelopes valid on their own (a null payload_hex is a "
            "tombstone), with their ids. 'invalid': envelopes refused with expect.error. "
            "'ingest': whether a node takes 'record' (verified) given the erasure "
            "requests it holds, those arriving in the same batch, the origin's cards "
            "('cards': each card's time_ms and the retention_days it declares for the "
            "record's feed, or null; the card with the greatest time_ms at most the "
            "record's time is in force, not the newest) and now_ms: 'stored' (with its "
            "payload), 'erased' or 'pruned' (stored as a tombstone), or {'error': "
            "reason} (nothing stored). 'erasures': an erasure request arriving at a node "
            "holding 'held' (with payloads): which payloads it drops, which entries it "
            "refuses (reason erasure_mismatch or erasure_not_origin)."
        ),
        "generator": "tests/vectors/generate.py",
        "records": {
            name: {"description": note, "envelope_hex": envelope(b, sg, pl).hex(),
                   "body_hex": b.hex(), "sig_hex": sg.hex(),
                   "payload_hex": None if pl is None else pl.hex(), "id_hex": rid(b).hex()}
            for name, (b, sg, pl, note) in recs.items()
        },
        "invalid": [{"name": n, "description": d, "envelope_hex": e.hex(),
                     "now_ms": NOW + DAY, "expect": err(r)} for n, d, e, r in invalid],
        "ingest": cases,
        "erasures": applying,
    }


# --------------------------------------------------------------------------- keys


def keys_file() -> dict[str, Any]:
    out = []
    for key, seed_note in (
        (KEY_A, "01 * 32"),
        (KEY_B, "02 * 32"),
        (KEY_C, "00 01 02 .. 1f"),
    ):
        pk = key.public_key
        out.append({
            "seed_hex": key.seed.hex(),
            "seed": seed_note,
            "public_key_hex": pk.hex(),
            "checksum_hex": hashlib.sha256(b"citynode/node-id/v1" + pk).digest()[:3].hex(),
            "node_id": node_id(pk),
        })
    nid = node_id(KEY_A.public_key)
    body = nid[3:]
    typo = "b" if body[10] != "b" else "c"
    j = next(i for i in range(20, 55) if body[i] != body[i + 1])
    swapped = body[:j] + body[j + 1] + body[j] + body[j + 2 :]
    invalid = [
        ("one-character-typo", "cn1" + body[:10] + typo + body[11:]),
        ("adjacent-swap", "cn1" + swapped),
        ("wrong-prefix", "cn2" + body),
        ("no-prefix", body),
        ("truncated", nid[:-1]),
        ("one-character-too-many", nid + "a"),
        ("outside-alphabet", "cn1" + body[:20] + "1" + body[21:]),
        ("checksum-of-other-key", nid[:-5] + node_id(KEY_B.public_key)[-5:]),
        ("empty", ""),
        # Non-ASCII look-alikes that Unicode case mapping or stripping would turn into
        # this very id: refused before any folding, so one node has one spelling.
        ("dotless-i", nid.replace("i", "\u0131")),
        ("long-s", "cn1" + body.replace("s", "\u017f")),
        ("no-break-space-around", "\u00a0" + nid + "\u00a0"),
        ("fullwidth-digit", nid.replace("7", "\uff17", 1)),
    ]
    # A cn2 id (version 2 identity) follows the same reading rules: any 32 bytes stand
    # for the identity D here, the checksum is under 'citynode/node-id/v2'.
    ident = hashlib.sha256(b"citynode vector identity").digest()
    raw2 = ident + hashlib.sha256(b"citynode/node-id/v2" + ident).digest()[:3]
    nid2 = "cn2" + base64.b32encode(raw2).decode("ascii").lower()
    invalid2 = [
        ("dotless-i", nid2[:3] + nid2[3:].replace("i", "\u0131")),
        ("long-s", nid2[:3] + nid2[3:].replace("s", "\u017f")),
        ("no-break-space-around", "\u00a0" + nid2 + "\u00a0"),
        ("fullwidth-digit", nid2[:3] + nid2[3:].replace("7", "\uff17", 1)),
        ("checksum-of-cn1-domain", "cn2" + base64.b32encode(
            ident + hashlib.sha256(b"citynode/node-id/v1" + ident).digest()[:3]
        ).decode("ascii").lower()),
    ]
    # Each look-alike is this very id after Unicode case mapping or stripping.
    assert all(not t.isascii() for _, t in invalid2[:4]) and invalid2[4][1] != nid2
    return {
        "about": (
            "citynode node id vectors (docs/PROTOCOL.md, 'Node identity'): node_id = "
            "'cn1' + lowercase base32 (RFC 4648, no padding) of public_key || "
            "checksum, checksum = SHA-256('citynode/node-id/v1' || public_key)[:3]. "
            "Every string in 'invalid' must be rejected. 'cn2_ids': an id of a version 2 "
            "identity D ('cn2' + base32 of D || SHA-256('citynode/node-id/v2' || D)[:3]); "
            "every string in 'invalid_cn2' must be rejected (the same reading rules: "
            "ASCII only, before any case folding)."
        ),
        "generator": "tests/vectors/generate.py",
        "node_ids": out,
        "invalid": [{"name": n, "text": t} for n, t in invalid],
        "cn2_ids": [{"identity_hex": ident.hex(), "checksum_hex": raw2[32:].hex(),
                     "node_id": nid2}],
        "invalid_cn2": [{"name": n, "text": t} for n, t in invalid2],
    }


# --------------------------------------------------------------------------- cards


# The egress policy of the example's "air" feed, as settings (core/egress.py
# EgressPolicy.settings: sorted lists, unset rules left out), and its digest computed
# here from the spec's definition: SHA-256("citynode/egress-policy/v1" || 00 || msgpack).
POLICY_SETTINGS: dict[str, Any] = {"deny": ["operatorPhone"], "location_decimals": 3,
                                   "types": ["AirQualityObserved"]}
POLICY_DIGEST = hashlib.sha256(b"citynode/egress-policy/v1\x00" + enc(POLICY_SETTINGS)).digest()
TERMS_DOC = b"Terms of use of the cert feed of Example City, version 2.\n"


def _signed_card(feeds: list[dict[str, Any]]) -> bytes:
    """A card envelope of A with these raw feed maps, signed as is (checked or not)."""
    body = enc({"feeds": feeds, "kind": "card", "name": "Example City",
                "node": KEY_A.public_key, "partners": [], "software": "citynode/0.1.0",
                "time": T0, "url": "https://node.example.org", "version": 2})
    return signed_envelope(body, KEY_A.sign(DOMAIN_CARD, body))


def _identity_vectors() -> ModuleType:
    """generate_keylog.py, for the version 2 identity D of its worked example (K0 = A's
    key, seed 01 * 32) and its events: the inception, R1 (K0 -> K1, K1 = B's key, air
    head 10) and the recovery REC after R1 (K1 retired at air head 15, K4 in force)."""
    spec = importlib.util.spec_from_file_location("citynode_keylog_vectors",
                                                  HERE / "generate_keylog.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _log(*events: Any) -> bytes:
    """A key log's wire bytes: the canonical array of the event envelopes."""
    return enc([e.env for e in events])


def _cn2_card(signer: SigningKey, node: bytes, **over: Any) -> bytes:
    """A card envelope naming ``node`` (a cn2 identity D, unless told otherwise), with
    the fields in ``over`` (``keylog`` among them; a value None leaves the field out),
    signed as is by ``signer``."""
    f: dict[str, Any] = {"feeds": [{"access": "public", "name": "air"}], "kind": "card",
                         "name": "Example City", "node": node,
                         "partners": [KEY_C.public_key], "software": "citynode/0.1.0",
                         "time": T0, "tls": bytes(range(32)),
                         "url": "https://node.example.org", "version": 2, **over}
    body = enc({k: v for k, v in f.items() if v is not None})
    return signed_envelope(body, signer.sign(DOMAIN_CARD, body))


def cn2_card_cases(kv: ModuleType) -> tuple[list[tuple[str, str, bytes, str | None, Any]],
                                             list[tuple[str, str, dict[str, Any], str, Any]]]:
    """Cards of a cn2 node (docs/PROTOCOL.md, "Card body", "Verifying a card"): ``node``
    is the identity D, ``keylog`` its key log, and the card is signed by the key in
    force at the end of that log. Returns the open cases and the JSON cases."""
    d, k = kv.D, kv.K
    did = kv.cn2(d)
    log1 = _log(kv.INC, kv.R1)  # K0 -> K1: K1 in force
    # An event dated after now_ms + 900 s: the log is refused with the card.
    late = kv.rotation(kv.INC, k[1], k[1], k[2], NOW + TOLERANCE_MS + 1, {})
    other = kv.Ev(KEY_C, {"type": "inception", "seq": 0, "time": T0,
                          "key": KEY_C.public_key, "next": kv.commit(k[2]),
                          "recovery": kv.commit(kv.Q[0])})
    good = _cn2_card(k[1], d, keylog=log1)
    cn1_a = node_id(KEY_A.public_key)
    open_cases: list[tuple[str, str, bytes, str | None, Any]] = [
        ("cn2/valid", "A card of identity D (keylog.json 'example'): node = D, keylog = "
         "[inception, R1], signed by K1, the key in force at the log's end; opened for "
         "D's cn2 id.", good, did, "valid"),
        ("cn2/valid-no-id", "The same card with no expected id.", good, None, "valid"),
        ("cn2/signed-by-retired-key", "Signed by K0 (A's key), which R1 retired: the "
         "embedded log does not name it as the key in force.",
         _cn2_card(k[0], d, keylog=log1), did, err("bad_signature")),
        ("cn2/signed-by-a-key-the-log-never-names", "Signed by a thief's key X, with D's "
         "valid log.", _cn2_card(kv.X, d, keylog=log1), did, err("bad_signature")),
        ("cn2/inception-alone", "Signed by K0 with the log [inception] alone: valid on "
         "its own (K0 is in force at that log's end). A node that holds a longer log of "
         "D judges the card by that log ('Using cards').",
         _cn2_card(k[0], d, keylog=_log(kv.INC)), did, "valid"),
        ("cn2/no-keylog", "node = D without a keylog, signed by K1: without a log the "
         "card is checked against node as a key, and D is no key.",
         _cn2_card(k[1], d), did, err("bad_signature")),
        ("cn2/wrong-node", "The valid cn2 card, fetched for A's cn1 id.", good, cn1_a,
         err("wrong_node")),
        ("cn2/expected-id-of-another-type", "The valid cn2 card, fetched for the cn1 id "
         "of D's 32 bytes: the same bytes under the other prefix name no node (a cn1 id "
         "names a key), so the id's type is compared too.", good, node_id(d), err("wrong_node")),
        ("cn2/keylog-not-bin", "keylog as a string.", _cn2_card(k[1], d, keylog="log"),
         did, err("bad_card")),
        ("cn2/keylog-empty", "keylog as an empty bin.", _cn2_card(k[1], d, keylog=b""),
         did, err("bad_card")),
        ("cn2/keylog-not-a-log", "keylog the bytes 01: not an array of event envelopes.",
         _cn2_card(k[1], d, keylog=b"\x01"), did, err("bad_field")),
        ("cn2/keylog-of-another-identity", "A log whose inception does not hash to D.",
         _cn2_card(KEY_C, d, keylog=_log(other)), did, err("wrong_identity")),
        ("cn2/keylog-event-from-the-future", "A log whose rotation is dated 1 ms beyond "
         "now_ms + 900 s (the card itself is dated T0).",
         _cn2_card(k[1], d, keylog=_log(kv.INC, late)), did, err("future_time")),
        ("cn2/keylog-on-a-key", "node = A's key (a cn1 card) with D's log: the log "
         "does not fold from that node.", _cn2_card(k[1], KEY_A.public_key, keylog=log1),
         None, err("wrong_identity")),
        ("cn2/unknown-field", "The unknown-field rule holds for cn2 cards too: a field "
         "outside the table.", _cn2_card(k[1], d, keylog=log1, keys=b"x"), did,
         err("unknown_field")),
    ]
    card = make_card(NodeKey(k[1].seed, d, did, log1), name="Example City",
                     url="https://node.example.org", tls_fingerprint=bytes(range(32)),
                     feeds=[("air", "public")], partners=[KEY_C.public_key],
                     software="citynode/0.1.0", now_ms=T0)
    assert card.envelope == good  # make_card writes the body built here by hand
    j = card_to_json(card)
    bad_card = err("bad_card")
    json_cases: list[tuple[str, str, dict[str, Any], str, Any]] = [
        ("cn2/valid", "The JSON form of the cn2 card: node is D's cn2 id, keylog the "
         "log's bytes in standard base64.", j, did, "valid"),
        ("cn2/node-as-cn1", "node written as the cn1 form of D's 32 bytes.",
         {**j, "node": node_id(d)}, did, bad_card),
        ("cn2/keylog-left-out", "The readable form without its keylog member.",
         {x: v for x, v in j.items() if x != "keylog"}, did, bad_card),
        ("cn2/keylog-differs", "A keylog member that is not the signed log (the "
         "inception alone).", {**j, "keylog": base64.b64encode(_log(kv.INC)).decode()},
         did, bad_card),
    ]
    return open_cases, json_cases


def cards_file() -> dict[str, Any]:
    card = make_card(KEY_A, name="Example City", url="https://node.example.org",
                     tls_fingerprint=bytes(range(32)),
                     feeds=[CardFeed("air", "public", license="CC-BY-4.0",
                                     attribution="Example City air network",
                                     policy=POLICY_DIGEST, cadence_s=300),
                            CardFeed("cert", "restricted",
                                     terms_url="https://node.example.org/terms/cert-v2",
                                     terms_digest=hashlib.sha256(TERMS_DOC).digest())],
                     partners=[KEY_B.public_key], software="citynode/0.1.0", now_ms=T0)
    j = card_to_json(card)
    bad_card = err("bad_card")
    json_cases: list[tuple[str, str, dict[str, Any], Any]] = [
        ("valid", "The JSON form of the card, as card_to_json writes it.", j, "valid"),
        ("version-2.0", "version 2.0: a JSON number with a fraction is not the integer 2.",
         {**j, "version": 2.0}, bad_card),
        ("cadence-float", "A feed's cadence_s as 300.0: not the integer signed.",
         {**j, "feeds": [{**j["feeds"][0], "cadence_s": 300.0}, j["feeds"][1]]}, bad_card),
        ("license-differs", "A feed's readable license that is not the signed one.",
         {**j, "feeds": [{**j["feeds"][0], "license": "CC0-1.0"}, j["feeds"][1]]},
         bad_card),
        ("terms-left-out", "A feed's readable form without its signed terms.",
         {**j, "feeds": [{"name": "air", "access": "public"}, j["feeds"][1]]}, bad_card),
        ("time-float", "time as a number with a fraction (.0): not the integer signed.",
         {**j, "time": float(T0)}, bad_card),
        ("name-differs", "A readable field that is not the signed one.",
         {**j, "name": "Other City"}, bad_card),
        ("extra-member", "A member the JSON form does not have.", {**j, "note": "x"},
         bad_card),
    ]
    # A card whose signed cadence is 1: true (and 1.0) equal 1 under a lax comparison.
    one = card_to_json(make_card(KEY_A, name="Example City", url="https://node.example.org",
                                 tls_fingerprint=None,
                                 feeds=[CardFeed("air", "public", cadence_s=1)],
                                 partners=[], software="citynode/0.1.0", now_ms=T0))
    json_cases += [
        ("cadence-1-valid", "Another card of A, its air feed's cadence_s the integer 1.", one,
         "valid"),
        ("cadence-true", "That card with cadence_s true: a JSON boolean is not the integer "
         "1 signed (Python's True == 1 would pass it).",
         {**one, "feeds": [{**one["feeds"][0], "cadence_s": True}]}, bad_card),
        ("cadence-1.0", "That card with cadence_s 1.0.",
         {**one, "feeds": [{**one["feeds"][0], "cadence_s": 1.0}]}, bad_card),
    ]
    json_cases.append(("version-true", "version true: a JSON boolean is not the integer "
                       "2 signed.", {**j, "version": True}, bad_card))
    nid = node_id(KEY_A.public_key)
    bad_id = nid[:-1] + ("a" if nid[-1] != "a" else "b")
    open_cases: list[tuple[str, str, bytes, str | None, Any]] = [
        ("valid", "The card, for the id of its own key.", card.envelope, nid, "valid"),
        ("valid-no-id", "The card, with no expected id (cards learned from partners).",
         card.envelope, None, "valid"),
        ("wrong-node", "A valid card, fetched for B's id.", card.envelope,
         node_id(KEY_B.public_key), err("wrong_node")),
        ("bad-id-before-bad-envelope", "A malformed expected id (checksum) and an "
         "envelope that is not one: the id is checked first (step 1).", b"\x00" * 10,
         bad_id, {"error_class": "InvalidNodeId"}),
        ("bad-id-before-good-card", "A malformed expected id with a valid card.",
         card.envelope, bad_id, {"error_class": "InvalidNodeId"}),
        ("bad-envelope", "An envelope that is not one, with a good id.", b"\x00" * 10,
         nid, err("bad_envelope")),
        # The body's size is decided from its bin32 header alone (CARD_LIMITS: 1047552
        # bytes), before the bytes are there: 70 bytes stand for the whole envelope.
        ("body-over-the-limit", "An envelope whose body header (c6) claims 1047553 "
         "bytes, one over the card limit: too_large from the header alone.",
         (b"\x92\xc6" + (1047553).to_bytes(4, "big")).ljust(70, b"\x00"), nid,
         err("too_large")),
        ("body-at-the-limit-truncated", "An envelope whose body header claims 1047552 "
         "bytes, exactly the limit, and that ends there: not too large, but truncated.",
         (b"\x92\xc6" + (1047552).to_bytes(4, "big")).ljust(70, b"\x00"), nid,
         err("bad_envelope")),
    ]
    air = {"access": "public", "name": "air"}
    bad_terms: list[tuple[str, str, dict[str, Any]]] = [
        ("license-expression", "An SPDX expression, not one identifier.",
         {**air, "license": "MIT OR Apache-2.0"}),
        ("license-space", "A licence name with spaces.", {**air, "license": "CC BY 4.0"}),
        ("license-empty-ref", "LicenseRef- with no idstring.", {**air, "license": "LicenseRef-"}),
        ("license-too-long", "65 characters.", {**air, "license": "x" * 65}),
        ("terms-url-without-digest", "terms_url alone.",
         {**air, "terms_url": "https://node.example.org/terms"}),
        ("terms-digest-without-url", "terms_digest alone.", {**air, "terms_digest": bytes(32)}),
        ("terms-url-http", "A terms URL that is not https.",
         {**air, "terms_url": "http://node.example.org/terms", "terms_digest": bytes(32)}),
        ("terms-digest-31-bytes", "A terms digest of 31 bytes.",
         {**air, "terms_url": "https://node.example.org/terms", "terms_digest": bytes(31)}),
        ("attribution-control", "Attribution with a control character.",
         {**air, "attribution": "Example\nCity"}),
        ("policy-31-bytes", "A policy digest of 31 bytes.", {**air, "policy": bytes(31)}),
        ("cadence-zero", "cadence_s 0.", {**air, "cadence_s": 0}),
        ("cadence-over-a-week", "cadence_s 604801.", {**air, "cadence_s": 604801}),
        ("cadence-bool", "cadence_s true (msgpack c3).", {**air, "cadence_s": True}),
        ("cadence-float", "cadence_s 60.0 (float64).", {**air, "cadence_s": 60.0}),
        ("feed-unknown-field", "A feed field outside the table.", {**air, "terms": "CC0"}),
    ]
    open_cases += [(f"terms/{n}", d, _signed_card([f]), None, bad_card)
                   for n, d, f in bad_terms]
    open_cases.append(("terms/every-field-at-its-bound", "A feed with every optional field: "
                       "a 64-character LicenseRef, a 512-character terms URL and "
                       "attribution, cadence 604800.",
                       _signed_card([{**air, "license": "LicenseRef-" + "a" * 53,
                                      "terms_url": "https://e.org/" + "t" * 498,
                                      "terms_digest": bytes(32), "attribution": "\u00e9" * 512,
                                      "policy": bytes(32), "cadence_s": 604800}]),
                       None, "valid"))
    cn2_open, cn2_json = cn2_card_cases(_identity_vectors())
    open_cases += cn2_open
    return {
        "about": (
            "citynode node card vectors (docs/PROTOCOL.md, 'Node cards'). 'open': verify "
            "envelope_hex with expected_node_id (null: none) at now_ms; expect 'valid', "
            "{'error': reason code} or {'error_class': 'InvalidNodeId'} (the expected id "
            "is checked before anything else). 'json': verify the JSON form (the same "
            "steps, then the whole object must equal the card's JSON form with exact "
            "JSON types: true is not 1, 1.0 is not 1). 'terms/*' open cases are cards "
            "whose feed terms break a rule (bad_card) or sit on every bound (valid). "
            "'policy_digest': the egress policy settings of the example's air feed and "
            "its digest. 'terms_documents': documents checked against the cert feed's "
            "terms_digest. 'cn2/*' cases are cards of a version 2 identity D (the one of "
            "keylog.json 'example'): node = D, keylog = its key log, signed by the key in "
            "force at the log's end."
        ),
        "generator": "tests/vectors/generate.py",
        "now_ms": NOW,
        "policy_digest": {"settings": POLICY_SETTINGS,
                          "settings_msgpack_hex": enc(POLICY_SETTINGS).hex(),
                          "digest_hex": POLICY_DIGEST.hex()},
        "terms_documents": [
            {"name": "matches", "document_hex": TERMS_DOC.hex(), "expect": "valid"},
            {"name": "one-byte-more", "document_hex": (TERMS_DOC + b" ").hex(),
             "expect": err("terms_mismatch")},
        ],
        "open": [
            {"name": n, "description": d, "envelope_hex": e.hex(), "expected_node_id": i,
             "expect": x}
            for n, d, e, i, x in open_cases
        ],
        "json": [
            *({"name": n, "description": d, "json": v, "expected_node_id": nid,
               "expect": x} for n, d, v, x in json_cases),
            *({"name": n, "description": d, "json": v, "expected_node_id": i, "expect": x}
              for n, d, v, i, x in cn2_json),
        ],
    }


# --------------------------------------------------------------------------- checkpoints


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _k(n: int) -> int:
    """The largest power of two smaller than ``n`` (n > 1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def _mth(d: list[bytes]) -> bytes:
    """RFC 9162 2.1.1, as written there: MTH({}) = SHA-256(), leaves 0x00 || id, nodes
    0x01 || left || right, split at the largest power of two below n."""
    if not d:
        return _sha(b"")
    if len(d) == 1:
        return _sha(b"\x00" + d[0])
    k = _k(len(d))
    return _sha(b"\x01" + _mth(d[:k]) + _mth(d[k:]))


def _path(m: int, d: list[bytes]) -> list[bytes]:
    """RFC 9162 2.1.3.1 PATH(m, D[n])."""
    if len(d) == 1:
        return []
    k = _k(len(d))
    if m < k:
        return [*_path(m, d[:k]), _mth(d[k:])]
    return [*_path(m - k, d[k:]), _mth(d[:k])]


def _subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    """RFC 9162 2.1.4.1 SUBPROOF(m, D[n], b); PROOF(m, D[n]) = SUBPROOF(m, D[n], true)."""
    if m == len(d):
        return [] if b else [_mth(d)]
    k = _k(len(d))
    if m <= k:
        return [*_subproof(m, d[:k], b), _mth(d[k:])]
    return [*_subproof(m - k, d[k:], False), _mth(d[:k])]


def _checkpoint(key: SigningKey, feed: str, size: int, root: bytes, time: int,
                **over: Any) -> bytes:
    """A checkpoint envelope: the canonical body map, signed with DOMAIN_CHECKPOINT."""
    f: dict[str, Any] = {"kind": "checkpoint", "version": 1, "origin": key.public_key,
                         "feed": feed, "size": size, "root": root, "time": time, **over}
    body = enc(f)
    return signed_envelope(body, key.sign(DOMAIN_CHECKPOINT, body))


def liveness_cases(root7: bytes) -> list[dict[str, Any]]:
    """A node holds ``held`` (the newest liveness statement of A's feed) and is offered
    ``offered`` at ``now_ms``: "new" (newer: kept and forwarded), "known" (the one held),
    "stale" (signed earlier, of no more records: an honest statement arriving late,
    changing nothing) or refused with its reason, changing nothing."""
    root8 = _sha(b"root of 8")

    def cp(size: int, root: bytes, time: int) -> str:
        return _checkpoint(KEY_A, "air-quality", size, root, time).hex()

    held = cp(7, root7, T0 + 60_000)
    return [
        {"name": "heartbeat", "description": "Same size and root, signed later: new.",
         "held_hex": held, "offered_hex": cp(7, root7, T0 + 120_000), "now_ms": NOW,
         "expect": "new"},
        {"name": "grown", "description": "More records, signed later: new.",
         "held_hex": held, "offered_hex": cp(8, root8, T0 + 120_000), "now_ms": NOW,
         "expect": "new"},
        {"name": "same", "description": "The statement held, again.", "held_hex": held,
         "offered_hex": held, "now_ms": NOW, "expect": "known"},
        {"name": "older-time", "description": "Signed before the one held (same size "
         "and root): an earlier heartbeat arriving late, stale (not refused).",
         "held_hex": held, "offered_hex": cp(7, root7, T0 + 59_999), "now_ms": NOW,
         "expect": "stale"},
        {"name": "older-time-smaller", "description": "Fewer records, signed before the "
         "one held: an earlier statement arriving late, stale (not refused).",
         "held_hex": held, "offered_hex": cp(6, _sha(b"root of 6"), T0), "now_ms": NOW,
         "expect": "stale"},
        {"name": "older-time-larger", "description": "A larger size signed before the "
         "one held: no honest origin signs both.", "held_hex": held,
         "offered_hex": cp(8, root8, T0), "now_ms": NOW, "expect": err("checkpoint_older")},
        {"name": "same-time-smaller", "description": "Fewer records, signed at the same "
         "time as the one held.", "held_hex": held,
         "offered_hex": cp(6, _sha(b"root of 6"), T0 + 60_000), "now_ms": NOW,
         "expect": err("checkpoint_smaller")},
        {"name": "smaller-size", "description": "Fewer records, signed later.",
         "held_hex": held, "offered_hex": cp(6, _sha(b"root of 6"), T0 + 120_000),
         "now_ms": NOW, "expect": err("checkpoint_smaller")},
        {"name": "from-the-future", "description": "Signed more than 900 s after now_ms.",
         "held_hex": held, "offered_hex": cp(8, root8, NOW + TOLERANCE_MS + 1),
         "now_ms": NOW, "expect": err("future_time")},
        {"name": "future-within-tolerance", "description": "Signed exactly 900 s after "
         "now_ms: accepted.", "held_hex": held,
         "offered_hex": cp(8, root8, NOW + TOLERANCE_MS), "now_ms": NOW, "expect": "new"},
    ]


def cn2_checkpoint_cases(kv: ModuleType, leaves: list[bytes]) -> list[dict[str, Any]]:
    """Checkpoints of the version 2 identity D (feed air), each with the key log of D
    the verifier holds (``log_hex``; null: none): a checkpoint names its signing key in
    ``key``, verified by that key, whose key verdict at (air, size) in the held log must
    be valid or before_key (docs/PROTOCOL.md, "Verifying a checkpoint")."""
    d, k = kv.D, kv.K
    log1 = _log(kv.INC, kv.R1)  # K0 -> K1 at air head 10
    log_rec = _log(kv.INC, kv.R1, kv.REC)  # K1 retired at air head 15, K4 in force

    def cp(signer: SigningKey, size: int, **over: Any) -> bytes:
        f = {"feed": "air", "key": signer.public_key, "kind": "checkpoint", "origin": d,
             "root": _mth(leaves[:size]) if size <= len(leaves) else _sha(b"%d" % size),
             "size": size, "time": T0 + 60_000, "version": 1, **over}
        body = enc({n: v for n, v in f.items() if v is not None})
        return signed_envelope(body, signer.sign(DOMAIN_CHECKPOINT, body))

    def ok(signer: SigningKey, size: int) -> dict[str, Any]:
        return {"origin": kv.cn2(d), "key_hex": signer.public_key.hex(), "feed": "air",
                "size": size, "root_hex": _mth(leaves[:size]).hex(), "time": T0 + 60_000}

    cases: list[tuple[str, str, bytes, bytes | None, Any]] = [
        ("cn2/key-in-force", "Signed by K1, in force in the held log [inception, R1] "
         "(its window on air starts above 10): size 12.", cp(k[1], 12), log1,
         ok(k[1], 12)),
        ("cn2/new-key-vouches-for-older-records", "Signed by K1 at size 7, below the head "
         "10 its window starts at: before_key, accepted.", cp(k[1], 7), log1, ok(k[1], 7)),
        ("cn2/retired-key-at-its-head", "Signed by K0 at size 10: inside the window R1 "
         "closed at air 10.", cp(k[0], 10), log1, ok(k[0], 10)),
        ("cn2/retired-key-beyond-its-head", "Signed by K0 at size 11, beyond the head R1 "
         "named.", cp(k[0], 11), log1, err("beyond_last_good")),
        ("cn2/retired-key-on-a-feed-its-event-did-not-name", "Signed by K0 on feed water, "
         "which R1 does not name: K0 signed nothing valid there.",
         cp(k[0], 3, feed="water"), log1, err("beyond_last_good")),
        ("cn2/stolen-key-after-recovery", "Signed by K1 at size 16, with the held log "
         "[inception, R1, recovery]: the recovery kept K1's air records up to 15 only, "
         "whatever time the checkpoint claims.", cp(k[1], 16, time=T0 + 1), log_rec,
         err("beyond_last_good")),
        ("cn2/key-in-force-after-recovery", "Signed by K4, in force after the recovery, "
         "at size 13 (before_key: K4's window starts above 15).", cp(k[4], 13), log_rec,
         ok(k[4], 13)),
        ("cn2/key-the-log-does-not-name", "Signed by a thief's key X.", cp(kv.X, 12),
         log1, err("unknown_key")),
        ("cn2/no-log-held", "Signed by K1, but the verifier holds no log of D.",
         cp(k[1], 12), None, err("unknown_key")),
        ("cn2/signed-by-another-key-than-key", "key = K1, signed by K0: the signature is "
         "checked by key, before any verdict.", cp(k[0], 12, key=k[1].public_key), log1,
         err("bad_signature")),
        ("cn2/no-key-field", "origin = D without key, signed by K1: checked against D as "
         "a key, which it is not.", cp(k[1], 12, key=None), log1, err("bad_signature")),
        ("cn2/key-31-bytes", "key of 31 bytes.", cp(k[1], 12, key=bytes(31)), log1,
         err("bad_field")),
        ("cn1-with-key-field", "A checkpoint of A's cn1 origin (its key) that names A's "
         "key as key, signed by it: only a held log lets a key sign, and a cn1 origin has "
         "none.", cp(KEY_A, 12, origin=KEY_A.public_key), None, err("unknown_key")),
    ]
    return [{"name": n, "description": desc, "envelope_hex": e.hex(), "now_ms": NOW,
             "log_hex": None if log is None else log.hex(), "expect": x}
            for n, desc, e, log, x in cases]


def checkpoints_file() -> dict[str, Any]:
    leaves = [_sha(b"citynode vector leaf %d" % i) for i in range(13)]
    trees = [{"size": n, "root_hex": _mth(leaves[:n]).hex()} for n in range(14)]
    inclusion = [{"index": m, "size": n, "path_hex": [h.hex() for h in _path(m, leaves[:n])]}
                 for m, n in ((0, 1), (0, 2), (1, 2), (0, 7), (3, 7), (6, 7), (5, 8),
                              (12, 13), (8, 13))]
    consistency = [{"old_size": m, "new_size": n,
                    "path_hex": [h.hex() for h in _subproof(m, leaves[:n], True)]}
                   for m, n in ((1, 1), (1, 2), (1, 7), (3, 7), (4, 8), (6, 8), (7, 13),
                                (8, 13), (12, 13), (13, 13))]
    root7 = _mth(leaves[:7])
    other7 = _mth([*leaves[:6], _sha(b"another seventh record")])
    good = _checkpoint(KEY_A, "air-quality", 7, root7, T0 + 60_000)
    split = _checkpoint(KEY_A, "air-quality", 7, other7, T0 + 120_000)
    flipped = bytearray(good)
    flipped[-1] ^= 0x01
    a, b = sorted([good, split])
    split_proof = b"\x83" + b"\xa1a" + bin_(a) + b"\xa1b" + bin_(b) + b"\xa4kind\xaasplit-view"
    return {
        "about": (
            "citynode checkpoint vectors (docs/PROTOCOL.md, 'Checkpoints'). 'leaves_hex' "
            "are the record ids of a feed in seq order (leaf i is seq i+1); 'trees' give "
            "the Merkle tree hash of the first 'size' leaves, 'inclusion' PATH(index, "
            "D[size]) and 'consistency' PROOF(old_size, D[new_size]) of RFC 9162 (hashes "
            "in proof order). 'checkpoints' are envelopes signed with the checkpoint "
            "domain prefix by node A, verified at now_ms (the 'cn2/*' ones by a key of the "
            "version 2 identity D of keylog.json 'example', with 'log_hex' the key log of "
            "the origin the verifier holds, null: none); 'split_views' proofs hold two "
            "valid checkpoints of one feed and size with different roots, in byte order. "
            "'liveness': a held statement, one offered, and the verdict (docs/PROTOCOL.md, "
            "'Liveness')."
        ),
        "generator": "tests/vectors/generate.py",
        "leaves_hex": [x.hex() for x in leaves],
        "trees": trees,
        "inclusion": inclusion,
        "consistency": consistency,
        "checkpoints": [
            {"name": "valid", "envelope_hex": good.hex(), "now_ms": NOW,
             "expect": {"origin": node_id(KEY_A.public_key), "feed": "air-quality",
                        "size": 7, "root_hex": root7.hex(), "time": T0 + 60_000}},
            {"name": "bad-signature", "envelope_hex": bytes(flipped).hex(), "now_ms": NOW,
             "expect": err("bad_signature")},
            {"name": "future-dated", "now_ms": NOW, "expect": err("future_time"),
             "envelope_hex": _checkpoint(KEY_A, "air-quality", 7, root7,
                                         NOW + TOLERANCE_MS + 1).hex()},
            {"name": "wrong-kind", "now_ms": NOW, "expect": err("bad_kind"),
             "envelope_hex": _checkpoint(KEY_A, "air-quality", 7, root7, T0,
                                         kind="record").hex()},
            {"name": "root-not-32-bytes", "now_ms": NOW, "expect": err("bad_field"),
             "envelope_hex": _checkpoint(KEY_A, "air-quality", 7, root7[:31], T0).hex()},
            *cn2_checkpoint_cases(_identity_vectors(), leaves),
        ],
        "liveness": liveness_cases(root7),
        "split_views": [
            {"name": "two-roots-of-size-7", "proof_hex": split_proof.hex(),
             "expect": "valid"},
            {"name": "same-checkpoint-twice", "expect": "invalid",
             "proof_hex": (b"\x83" + b"\xa1a" + bin_(good) + b"\xa1b" + bin_(good)
                           + b"\xa4kind\xaasplit-view").hex()},
        ],
    }


# --------------------------------------------------------------------------- sync


def _item_hash(origin: bytes, feed: str, seq: int, head: bytes) -> int:
    key = origin + feed.encode()
    h = hashlib.sha256(b"citynode-sync-item-v1\0" + bytes([len(key)]) + key
                       + seq.to_bytes(8, "big") + head).digest()
    return int.from_bytes(h[:16], "big")


def _fp(items: list[tuple[bytes, str, int, bytes]]) -> bytes:
    total = sum(_item_hash(*it) for it in items) % (1 << 128)
    data = b"citynode-sync-fp-v1\0" + len(items).to_bytes(8, "big") + total.to_bytes(16, "big")
    return hashlib.sha256(data).digest()[:16]


def sync_file() -> dict[str, Any]:
    """Reconciliation (docs/PROTOCOL.md, "Reconciliation"): item hashes, fingerprints,
    first messages of a session, and messages a decoder must refuse."""
    a, b = KEY_A.public_key, KEY_B.public_key
    items = [(a if i % 2 else b, f"feed-{i:02d}", i + 1, hashlib.sha256(bytes([i])).digest())
             for i in range(20)]
    items.sort(key=lambda it: it[0] + it[1].encode())

    def item(it: tuple[bytes, str, int, bytes]) -> dict[str, Any]:
        return {"origin": it[0].hex(), "feed": it[1], "seq": it[2], "head": it[3].hex()}

    few = items[:2]
    h = b"\x02" * 32
    bad = [
        ("not_an_array", {}),
        ("range_not_triple", [[None, 1]]),
        ("empty_bound", [[b"", 0, None]]),
        ("bounds_not_increasing", [[b"b", 0, None], [b"a", 0, None]]),
        ("nil_bound_not_last", [[None, 0, None], [b"a", 0, None]]),
        ("unknown_mode", [[None, 9, None]]),
        ("short_fingerprint", [[None, 1, b"short"]]),
        ("entry_seq_zero", [[None, 2, [[a, "f", 0, h]]]]),
        ("entries_out_of_order", [[None, 2, [[a, "g", 1, h], [a, "f", 1, h]]]]),
        ("entry_outside_range", [[b"\x01", 2, [[b"\x01" * 32, "f", 1, h]]]]),
    ]
    return {
        "description": "Range reconciliation of chain heads. item_hash: 128-bit integer "
                       "as 32 hex digits; fingerprint: of the items listed; initial: the "
                       "first message of a session from a node holding the items; invalid: "
                       "messages refused with reason bad_reconcile.",
        "item_hashes": [dict(item(it), hash=f"{_item_hash(*it):032x}") for it in items[:4]],
        "fingerprints": [
            {"items": [], "fingerprint": _fp([]).hex()},
            {"items": [item(it) for it in items], "fingerprint": _fp(items).hex()},
        ],
        "initial": [
            {"name": "many_chains_one_fingerprint", "items": [item(it) for it in items],
             "message_hex": enc([[None, 1, _fp(items)]]).hex()},
            {"name": "few_chains_sent_whole", "items": [item(it) for it in few],
             "message_hex": enc([[None, 2, [list(it) for it in few]]]).hex()},
        ],
        "invalid": [{"name": n, "message_hex": enc(v).hex(), "reason": "bad_reconcile"}
                    for n, v in bad],
    }


# --------------------------------------------------------------------------- output


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=True) + "\n"


def build() -> dict[str, str]:
    """File name -> exact file text. Pure: calling it twice gives equal results."""
    return {
        "records.json": dumps(records_file()),
        "chain.json": dumps(chain_file()),
        "keys.json": dumps(keys_file()),
        "checkpoints.json": dumps(checkpoints_file()),
        "sync.json": dumps(sync_file()),
        "cards.json": dumps(cards_file()),
        "payloads.json": dumps(payloads_file()),
    }


def main() -> int:
    for name, text in build().items():
        (HERE / name).write_text(text, encoding="utf-8", newline="\n")
        print(f"wrote {HERE / name} ({len(text)} characters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
