"""Canonical msgpack (citynode.core.encoding) against an independent reference encoder
written here from docs/PROTOCOL.md, and against every non-canonical alternative."""

from __future__ import annotations

import math
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from citynode.core import encoding
from citynode.core.encoding import Limits, decode, encode
from citynode.errors import EncodingError

# Generous limits for the property tests: the limits have their own tests below.
ROOMY = Limits(max_bytes=1 << 20, max_depth=64, max_items=1 << 16)

# --------------------------------------------------------------------------- reference
# A second, independent encoder: the rules of PROTOCOL.md, "Canonical msgpack", written
# out by hand. With ``deviate=(k, choice)`` it writes node number ``k`` (pre-order: a map
# counts, then each key and value) in a non-canonical way instead.


def _int_forms(n: int) -> list[bytes]:
    """Every msgpack encoding of ``n``, the canonical one first."""
    forms: list[bytes] = []
    if 0 <= n <= 0x7F:
        forms.append(bytes([n]))
    elif -32 <= n < 0:
        forms.append(struct.pack(">b", n))
    unsigned = [(0xCC, ">B", 0xFF), (0xCD, ">H", 0xFFFF), (0xCE, ">I", 2**32 - 1),
                (0xCF, ">Q", 2**64 - 1)]
    signed = [(0xD0, ">b", 7), (0xD1, ">h", 15), (0xD2, ">i", 31), (0xD3, ">q", 63)]
    wide_u = [bytes([t]) + struct.pack(f, n) for t, f, hi in unsigned if 0 <= n <= hi]
    wide_s = [bytes([t]) + struct.pack(f, n) for t, f, b in signed if -(2**b) <= n < 2**b]
    # Shortest first: non-negative values in unsigned forms, negative in signed forms.
    forms += wide_u + wide_s if n >= 0 else wide_s
    return forms


def _len_forms(n: int, fix: int | None, fix_max: int, tags: tuple[int, ...]) -> list[bytes]:
    """Every header for a str/bin/array/map of ``n`` units, the canonical one first."""
    forms = [bytes([fix | n])] if fix is not None and n <= fix_max else []
    for tag, size in zip(tags, (1, 2, 4), strict=False):
        if n < 256**size:
            forms.append(bytes([tag]) + n.to_bytes(size, "big"))
    return forms


def _str_headers(n: int) -> list[bytes]:
    return _len_forms(n, 0xA0, 31, (0xD9, 0xDA, 0xDB))


def _bin_headers(n: int) -> list[bytes]:
    return _len_forms(n, None, 0, (0xC4, 0xC5, 0xC6))


def _headers(kind: str, n: int) -> list[bytes]:
    fix, tag16, tag32 = {"array": (0x90, 0xDC, 0xDD), "map": (0x80, 0xDE, 0xDF)}[kind]
    forms = [bytes([fix | n])] if n <= 15 else []
    if n <= 0xFFFF:
        forms.append(bytes([tag16]) + n.to_bytes(2, "big"))
    forms.append(bytes([tag32]) + n.to_bytes(4, "big"))
    return forms


class _Ref:
    def __init__(self, deviate: tuple[int, int] | None = None) -> None:
        self.deviate = deviate
        self.count = 0  # nodes visited
        self.deviated = False

    def _pick(self, canonical: bytes, alternatives: list[bytes]) -> bytes:
        k = self.count
        self.count += 1
        if self.deviate is not None and self.deviate[0] == k and alternatives:
            self.deviated = True
            return alternatives[self.deviate[1] % len(alternatives)]
        return canonical

    def enc(self, v: Any) -> bytes:
        if v is None:
            return self._pick(b"\xc0", [])
        if v is True or v is False:
            return self._pick(b"\xc3" if v else b"\xc2", [])
        if type(v) is int:
            forms = _int_forms(v)
            return self._pick(forms[0], forms[1:])
        if type(v) is float:
            alts = []
            try:
                if struct.unpack(">f", struct.pack(">f", v))[0] == v:
                    alts.append(b"\xca" + struct.pack(">f", v))
            except OverflowError:
                pass
            return self._pick(b"\xcb" + struct.pack(">d", v), alts)
        if type(v) is str:
            raw = v.encode("utf-8")
            hs = _str_headers(len(raw))
            return self._pick(hs[0] + raw, [h + raw for h in hs[1:]])
        if type(v) is bytes:
            hs = _bin_headers(len(v))
            return self._pick(hs[0] + v, [h + v for h in hs[1:]])
        if type(v) is list:
            me = self.count
            self.count += 1
            items = [self.enc(x) for x in v]
            hs = _headers("array", len(v))
            if self._is_me(me):
                alts = [h + b"".join(items) for h in hs[1:]]
                if alts:
                    self.deviated = True
                    return alts[self.deviate[1] % len(alts)]  # type: ignore[index]
            return hs[0] + b"".join(items)
        if type(v) is dict:
            me = self.count
            self.count += 1
            pairs = []
            for k in sorted(v, key=lambda s: s.encode("utf-8")):
                pairs.append(self.enc(k) + self.enc(v[k]))
            body = b"".join(pairs)
            hs = _headers("map", len(v))
            if self._is_me(me):
                alts = [h + body for h in hs[1:]]
                if len(pairs) >= 2:
                    alts.append(hs[0] + b"".join(reversed(pairs)))  # keys out of order
                if pairs:  # the first entry twice, same value: lenient decoders merge it
                    alts.append(_headers("map", len(v) + 1)[0] + pairs[0] + body)
                if alts:
                    self.deviated = True
                    return alts[self.deviate[1] % len(alts)]  # type: ignore[index]
            return hs[0] + body
        raise TypeError(type(v))

    def _is_me(self, k: int) -> bool:
        return self.deviate is not None and self.deviate[0] == k


def ref_encode(v: Any) -> bytes:
    return _Ref().enc(v)


def count_nodes(v: Any) -> int:
    r = _Ref()
    r.enc(v)
    return r.count


# --------------------------------------------------------------------------- strategies

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.sampled_from([0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, -32, -33,
                       -128, -129, -(2**15), -(2**15) - 1, -(2**31), -(2**31) - 1])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | st.binary(max_size=40)
    | st.sampled_from(["x" * 31, "x" * 32, "é" * 16, b"\x00" * 255, b"\x00" * 256])
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6)
    | st.dictionaries(st.text(max_size=8), inner, max_size=6),
    max_leaves=15,
)
maps = st.dictionaries(st.text(max_size=8), values, min_size=1, max_size=4)

PROPS = settings(max_examples=100, deadline=None)


# --------------------------------------------------------------------------- properties


@PROPS
@given(values)
def test_encode_matches_the_reference_encoder(v: Any) -> None:
    assert encode(v) == ref_encode(v)


@PROPS
@given(values)
def test_round_trip(v: Any) -> None:
    data = encode(v)
    back = decode(data, ROOMY)
    assert back == v
    assert encode(back) == data


@settings(max_examples=40, deadline=None)
@given(maps)
def test_encoding_ignores_the_order_maps_are_given_in(m: dict[str, Any]) -> None:
    def reverse(v: Any) -> Any:
        if type(v) is dict:
            return {k: reverse(v[k]) for k in reversed(list(v))}
        if type(v) is list:
            return [reverse(x) for x in v]
        return v

    assert encode(reverse(m)) == encode(m)


@settings(max_examples=150, deadline=None)
@given(values, st.data())
def test_every_non_canonical_alternative_is_rejected(v: Any, data: st.DataObject) -> None:
    n = count_nodes(v)
    k = data.draw(st.integers(0, n - 1), label="node")
    choice = data.draw(st.integers(0, 7), label="alternative")
    r = _Ref(deviate=(k, choice))
    alt = r.enc(v)
    assume(r.deviated)
    assert alt != encode(v)
    # The same value, as any msgpack decoder reads it ...
    lenient = msgpack.unpackb(alt, strict_map_key=False, use_list=True)
    assert lenient == v
    # ... but not the one canonical encoding.
    with pytest.raises(EncodingError) as info:
        decode(alt, ROOMY)
    assert info.value.reason == "non_canonical"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_decode_of_arbitrary_bytes_raises_only_encoding_error(data: bytes) -> None:
    try:
        v = decode(data)
    except EncodingError:
        return
    assert encode(v) == data  # whatever is accepted is canonical


_PIECES = [
    b"\x80", b"\x81", b"\x8f", b"\x90", b"\x91", b"\x9f", b"\xa0", b"\xa1a", b"\xa1b",
    b"\xc0", b"\xc1", b"\xc2", b"\xc3", b"\xc4\x01", b"\xc4\xff", b"\xc5\xff\xff",
    b"\xc6\xff\xff\xff\xff", b"\xc7\x01\x05", b"\xca", b"\xcb", b"\xcc", b"\xcf",
    b"\xd0", b"\xd3", b"\xd4\xff", b"\xd6\xff", b"\xd7\xff", b"\xd9\x05", b"\xdb\xff\xff\xff\xff",
    b"\xdc\x00\x10", b"\xdd\xff\xff\xff\xff", b"\xde\x00\x02", b"\xdf\xff\xff\xff\xff",
    b"\xe0", b"\xff", b"\x00", b"\x7f", b"\xed\xa0\x80", b"\xff\xfe",
]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=12).map(b"".join))
def test_decode_of_msgpack_like_bytes_raises_only_encoding_error(data: bytes) -> None:
    try:
        v = decode(data)
    except EncodingError:
        return
    assert encode(v) == data


@settings(max_examples=80, deadline=None)
@given(values, st.data())
def test_decode_accepts_a_mutated_encoding_only_if_canonical(v: Any, data: st.DataObject
                                                              ) -> None:
    raw = bytearray(encode(v))
    i = data.draw(st.integers(0, len(raw) - 1), label="index")
    b = data.draw(st.integers(0, 255).filter(lambda x: x != raw[i]), label="byte")
    raw[i] = b
    try:
        w = decode(bytes(raw), ROOMY)
    except EncodingError:
        return
    assert encode(w) == bytes(raw)


# --------------------------------------------------------------------------- exact bytes


@pytest.mark.parametrize(
    ("value", "hex_"),
    [
        (None, "c0"), (False, "c2"), (True, "c3"),
        (0, "00"), (127, "7f"), (128, "cc80"), (255, "ccff"), (256, "cd0100"),
        (65535, "cdffff"), (65536, "ce00010000"), (2**32, "cf0000000100000000"),
        (2**64 - 1, "cfffffffffffffffff"),
        (-1, "ff"), (-32, "e0"), (-33, "d0df"), (-128, "d080"), (-129, "d1ff7f"),
        (-(2**63), "d38000000000000000"),
        (1.0, "cb3ff0000000000000"), (-0.0, "cb8000000000000000"), (21.5, "cb4035800000000000"),
        ("", "a0"), ("a", "a161"), ("x" * 31, "bf" + "78" * 31), ("x" * 32, "d920" + "78" * 32),
        ("é", "a2c3a9"), (b"", "c400"), (b"\x01", "c40101"),
        ([], "90"), ([1, [2]], "92019102"), ({}, "80"),
        ({"b": 1, "a": 2}, "82a16102a16201"),
        # UTF-8 byte order, not UTF-16 order: U+FB01 (ef ac 81) before U+1F600 (f0 9f 98 80)
        ({"\U0001f600": 1, "\ufb01": 2}, "82a3efac8102a4f09f988001"),
        ({"ab": 1, "a": 2, "b": 3}, "83a161 02a26162 01a162 03".replace(" ", "")),
        ((1, 2), "920102"),
    ],
)
def test_exact_encodings(value: Any, hex_: str) -> None:
    assert encode(value).hex() == hex_
    back = decode(bytes.fromhex(hex_))
    assert back == (list(value) if isinstance(value, tuple) else value)


@pytest.mark.parametrize(
    "value",
    [
        {1: "x"}, {b"k": 1}, {None: 1}, float("nan"), float("inf"), -math.inf,
        [1, float("nan")], {"a": {"b": float("inf")}}, {1, 2}, object(), 2**64, -(2**63) - 1,
        "\ud800", {"\udfff": 1}, msgpack.ExtType(1, b"x"), [msgpack.ExtType(1, b"x")],
        msgpack.Timestamp(1, 0), {"t": msgpack.Timestamp(1, 0)},
    ],
    ids=lambda v: "object" if type(v) is object else repr(v),
)
def test_encode_refuses_what_has_no_canonical_form(value: Any) -> None:
    with pytest.raises(EncodingError):
        encode(value)


@pytest.mark.parametrize(
    ("hex_", "reason"),
    [
        ("", "malformed"),
        ("c1", "malformed"),
        ("92 01", "malformed"),
        ("01 02", "malformed"),
        ("a2 ff fe", "malformed"),
        ("a3 ed a0 80", "malformed"),  # a UTF-8 encoded surrogate
        ("81 01 a1 78", "non_canonical"),  # int key
        ("81 c3 a1 78", "non_canonical"),  # bool key
        ("81 c4 01 6b a1 78", "non_canonical"),  # bin key
        ("81 81 a1 61 01 a1 78", "non_canonical"),  # map as key
        ("82 a1 62 01 a1 61 02", "non_canonical"),  # unsorted
        ("82 a1 61 01 a1 61 02", "non_canonical"),  # duplicate
        ("cc 01", "non_canonical"),
        ("d0 01", "non_canonical"),
        ("d1 ff ff", "non_canonical"),
        ("ca 3f 80 00 00", "non_canonical"),
        ("cb 7f f8 00 00 00 00 00 00", "non_canonical"),
        ("cb ff f0 00 00 00 00 00 00", "non_canonical"),
        ("91 cb 7f f0 00 00 00 00 00 00", "non_canonical"),
        ("d9 01 61", "non_canonical"),
        ("c5 00 01 61", "non_canonical"),
        ("dc 00 01 01", "non_canonical"),
        ("de 00 01 a1 61 01", "non_canonical"),
        ("d4 05 00", "non_canonical"),
        ("d6 ff 00 00 00 01", "non_canonical"),
        ("91 d6 ff 00 00 00 01", "non_canonical"),
        ("81 a1 61 d4 05 00", "non_canonical"),
        ("c7 00 05", "non_canonical"),
        # Every ext is non_canonical, whatever its type and length (issue 12, point 9):
        ("d4 fe 00", "non_canonical"),  # reserved type -2
        ("d4 80 00", "non_canonical"),  # reserved type -128
        ("d4 ff 00", "non_canonical"),  # timestamp ext of a length no timestamp has
        ("c7 00 ff", "non_canonical"),  # ... of length 0
        ("d7 ff ff ff ff fc 00 00 00 00", "non_canonical"),  # nanoseconds over 999999999
        ("81 a1 61 d4 fe 00", "non_canonical"),
        # ... but a fault of structure anywhere still makes the input malformed:
        ("92 d4 fe 00", "malformed"),  # truncated after it
        ("d4 fe 00 00", "malformed"),  # trailing byte
        ("92 d4 fe 00 a1 ff", "malformed"),  # invalid UTF-8 after it
        ("92 d4 fe 00 c1", "malformed"),  # reserved byte after it
        ("d4 fe", "malformed"),  # truncated inside it
        ("dd ff ff ff ff", "malformed"),  # a count no input can hold
    ],
)
def test_decode_reasons(hex_: str, reason: str) -> None:
    with pytest.raises(EncodingError) as info:
        decode(bytes.fromhex(hex_.replace(" ", "")))
    assert info.value.reason == reason


@settings(max_examples=150, deadline=None)
@given(values)
def test_structure_check_knows_a_complete_value_from_a_broken_one(v: Any) -> None:
    """The structural check behind malformed vs non_canonical: a complete value is
    well formed; every strict prefix, and the value with a byte after it, is not."""
    data = ref_encode(v)
    assert encoding._one_complete_value(data)
    assert not encoding._one_complete_value(data + b"\xc0")
    for cut in range(len(data)):
        assert not encoding._one_complete_value(data[:cut])


# --------------------------------------------------------------------------- limits


def _nested_lists(depth: int) -> bytes:
    return b"\x91" * (depth - 1) + b"\x90"


def _nested_maps(depth: int) -> bytes:
    return b"\x81\xa1k" * (depth - 1) + b"\x80"


def test_size_limit_is_inclusive() -> None:
    lim = Limits(max_bytes=100)
    ok = encode("x" * 98)
    assert len(ok) == 100
    assert decode(ok, lim) == "x" * 98
    with pytest.raises(EncodingError) as info:
        decode(encode("x" * 99), lim)
    assert info.value.reason == "too_large"
    with pytest.raises(EncodingError) as info:
        decode(b"\x00" * (encoding.DEFAULT_LIMITS.max_bytes + 1))
    assert info.value.reason == "too_large"


@pytest.mark.parametrize("nested", [_nested_lists, _nested_maps])
def test_depth_limit(nested: Any) -> None:
    assert encoding.DEFAULT_LIMITS.max_depth == 16
    decode(nested(16))
    with pytest.raises(EncodingError) as info:
        decode(nested(17))
    assert info.value.reason == "too_deep"
    decode(nested(3), Limits(max_depth=3))
    with pytest.raises(EncodingError):
        decode(nested(4), Limits(max_depth=3))


def test_depth_limit_with_a_scalar_beside_the_deepest_container() -> None:
    deep = b"\x92\x01" * 15 + b"\x90"  # 16 levels; each level also holds a scalar
    decode(deep)
    with pytest.raises(EncodingError) as info:
        decode(b"\x92\x01" * 16 + b"\x90")
    assert info.value.reason == "too_deep"


def test_very_deep_input_is_too_deep_not_a_crash() -> None:
    for depth in (100, 2000, 60000):
        with pytest.raises(EncodingError) as info:
            decode(_nested_lists(depth))
        assert info.value.reason == "too_deep"


def test_depth_zero_allows_only_scalars() -> None:
    assert decode(b"\x01", Limits(max_depth=0)) == 1
    with pytest.raises(EncodingError) as info:
        decode(b"\x90", Limits(max_depth=0))
    assert info.value.reason == "too_deep"


def test_item_limit_counts_elements_and_entries_at_all_levels() -> None:
    assert encoding.DEFAULT_LIMITS.max_items == 4096
    decode(encode([0] * 4096))
    with pytest.raises(EncodingError) as info:
        decode(encode([0] * 4097))
    assert info.value.reason == "too_many_items"
    # 1 outer entry + 1 entry + 4094 elements = 4096; one more element is over.
    decode(encode({"a": {"b": [0] * 4094}}))
    with pytest.raises(EncodingError) as info:
        decode(encode({"a": {"b": [0] * 4095}}))
    assert info.value.reason == "too_many_items"
    # Map entries count once per key/value pair.
    decode(encode({f"k{i}": i for i in range(4096)}))
    with pytest.raises(EncodingError):
        decode(encode({f"k{i}": i for i in range(4097)}))
    # Many small containers.
    decode(encode([[0]] * 2048))
    with pytest.raises(EncodingError):
        decode(encode([[0]] * 2049))


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = encode({"a": [1, 2.5, "x", b"y", None, True]})
    assert decode(bytearray(data)) == decode(memoryview(data)) == decode(data)


def test_decoded_values_are_plain_python_types() -> None:
    v = decode(encode({"a": [1, 2.5, "x", b"y", None, True, {}]}))
    assert type(v) is dict and type(v["a"]) is list
    assert [type(x) for x in v["a"]] == [int, float, str, bytes, type(None), bool, dict]


# --------------------------------------------------------------------------- fast path
# decode() first tries a fast path (ormsgpack decode + sorted re-encode + byte scans) and
# falls back to the reference decoder. It must give the reference's verdict on every input:
# the same value, or the same reason.

TIGHT = [encoding.DEFAULT_LIMITS, ROOMY, Limits(max_depth=2), Limits(max_depth=1),
         Limits(max_depth=0), Limits(max_items=5), Limits(max_items=40, max_depth=3)]


def _verdict(fn: Any, data: bytes, limits: Limits) -> tuple[Any, ...]:
    try:
        v = fn(data, limits)
    except EncodingError as exc:
        return ("rejected", exc.reason)
    return ("accepted", encode(v), type(v))


def _same_verdicts(data: bytes) -> None:
    for limits in TIGHT:
        assert _verdict(decode, data, limits) == _verdict(
            encoding._decode_reference, data, limits
        ), (data.hex(), limits)


@settings(max_examples=150, deadline=None)
@given(values)
def test_fast_path_agrees_on_canonical_encodings(v: Any) -> None:
    _same_verdicts(encode(v))


@settings(max_examples=150, deadline=None)
@given(values, st.data())
def test_fast_path_agrees_on_non_canonical_alternatives(v: Any, data: st.DataObject) -> None:
    n = count_nodes(v)
    r = _Ref(deviate=(data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, 7))))
    alt = r.enc(v)
    assume(r.deviated)
    _same_verdicts(alt)


@settings(max_examples=150, deadline=None)
@given(values, st.data())
def test_fast_path_agrees_on_mutated_encodings(v: Any, data: st.DataObject) -> None:
    raw = bytearray(encode(v))
    i = data.draw(st.integers(0, len(raw) - 1), label="index")
    raw[i] = data.draw(st.integers(0, 255), label="byte")
    _same_verdicts(bytes(raw))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=12).map(b"".join) | st.binary(max_size=48))
def test_fast_path_agrees_on_arbitrary_bytes(data: bytes) -> None:
    _same_verdicts(data)


@pytest.mark.parametrize(
    "data",
    [
        struct.pack(">Bd", 0xCB, math.nan),
        b"\x91" + struct.pack(">Bd", 0xCB, -math.inf),
        b"\x81\xa1a" + struct.pack(">Bd", 0xCB, math.inf),
        # a NaN pattern inside a string or bin: valid, only the scan is fooled
        b"\xa3\xcb\x7f\xf8", b"\xc4\x03\xcb\xff\xff",
        b"\x91" * 16 + b"\x01", b"\x91" * 17 + b"\x01", b"\x91" * 200 + b"\x01",
        # container-header bytes inside a top-level bin: depth bound must stay sound
        b"\x82\xa1a" + b"\x91" * 15 + b"\x01" + b"\xa1b\xc4\x20" + b"\x90" * 32,
        b"\x82\xa1a" + b"\x91" * 16 + b"\x01" + b"\xa1b\xc4\x20" + b"\x90" * 32,
        b"\x82\xa1a\xc4\x20" + b"\x90" * 32 + b"\xa1b" + b"\x91" * 16 + b"\x01",
        # the same key twice, trailing bytes, a float32, a bin key, an ext, a timestamp
        b"\x82\xa1a\x01\xa1a\x02", b"\x01\x02", b"\xca\x3f\x80\x00\x00", b"\x81\xc4\x01a\x01",
        b"\xd4\x05\x00", msgpack.packb(msgpack.Timestamp(1, 0)),
        # bodies longer than max_items bytes: counted, not assumed
        encode(list(range(3000))), encode(["x" * 10] * 4000), encode([0] * 4097),
    ],
)
def test_fast_path_agrees_on_traps(data: bytes) -> None:
    _same_verdicts(data)


def test_limits_refuse_a_depth_the_walk_cannot_reach() -> None:
    """Deep nesting within a huge depth limit would overflow Python's stack in the walk:
    such limits cannot be made."""
    with pytest.raises(ValueError):
        Limits(max_depth=encoding.MAX_DEPTH_LIMIT + 1)
    deep = Limits(max_depth=encoding.MAX_DEPTH_LIMIT, max_items=10**6)
    with pytest.raises(EncodingError) as info:
        decode(b"\x91" * 1000 + b"\x01", deep)
    assert info.value.reason == "too_deep"
    assert decode(b"\x91" * 255 + b"\x01", deep) is not None
