"""Canonical msgpack: the one encoding of every signed byte in citynode.

Rules (docs/PROTOCOL.md, "Canonical msgpack"):

* map keys are strings, sorted by their UTF-8 bytes, with no duplicates;
* integers use their shortest msgpack encoding (what msgpack's packer emits);
* no ext types at all (the timestamp ext included);
* floats only as float64, never NaN or +-infinity;
* strings are valid UTF-8 (``str`` family), byte strings are ``bin``;
* nil, bool, array, map as usual.

:func:`decode` is strict: anything but the canonical encoding of a value within the
limits is an :class:`EncodingError`. Every limit is bounded before work proportional to
it is done.

Two decoders give the same verdict on every input (a property test holds them to it):

* the reference (:func:`_decode_reference`): msgpack's decoder, a walk over the value
  (types, key order, depth, counts), then re-encode and compare bytes. It alone produces
  rejection reasons.
* the fast path, tried first: ormsgpack decodes and re-encodes with sorted keys, in
  Rust. Equal bytes prove key order and type, no duplicate keys, shortest integers and
  lengths, float64 only, no ext, no trailing bytes. Two cheap scans of the raw bytes then
  bound what is left: no float64 NaN/infinity pattern, and at most ``max_depth``
  container header bytes (so the nesting cannot be deeper); a body no longer than
  ``max_items`` bytes cannot hold more items. When any of these does not prove the
  value valid, the reference decides. The fast path never rejects on grounds of its
  own: what it refuses, the reference (or the reference's own walk) refuses.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import msgpack
import ormsgpack

from citynode.errors import EncodingError

__all__ = ["DEFAULT_LIMITS", "Limits", "decode", "encode"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds applied to every decoded value. All counts are per value decoded."""

    max_bytes: int = 64 * 1024
    max_depth: int = 16
    max_items: int = 4096  # total of array elements + map entries, all levels

    def __post_init__(self) -> None:
        # The walk recurses once per level: keep it far from Python's recursion limit.
        if not self.max_depth <= MAX_DEPTH_LIMIT:
            raise ValueError(f"max_depth {self.max_depth} is over {MAX_DEPTH_LIMIT}")


#: The deepest nesting any :class:`Limits` may allow.
MAX_DEPTH_LIMIT = 256


DEFAULT_LIMITS = Limits()

# One packer, reused: pack() runs entirely in C under the GIL, so sharing it is safe.
_pack = msgpack.Packer(use_bin_type=True, use_single_float=False, autoreset=True).pack


def _sorted(value: Any, depth: int = 0) -> Any:
    """Return ``value`` with every map's keys sorted by UTF-8 bytes (recursively)."""
    if depth > 64:
        raise EncodingError("value nests too deeply to encode", "too_deep")
    if isinstance(value, dict):
        items = []
        for k, v in value.items():
            if not isinstance(k, str):
                raise EncodingError(f"map key {k!r} is not a string", "non_canonical")
            items.append((k.encode("utf-8"), k, _sorted(v, depth + 1)))
        items.sort(key=lambda t: t[0])
        return {k: v for _, k, v in items}
    if isinstance(value, (list, tuple)):
        if type(value) is msgpack.ExtType:  # a namedtuple: would pass as an array
            raise EncodingError("msgpack ext types are not allowed", "non_canonical")
        return [_sorted(v, depth + 1) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        raise EncodingError("NaN and infinity cannot be encoded", "non_canonical")
    if type(value) is msgpack.Timestamp:  # the packer would write ext -1
        raise EncodingError("msgpack timestamps are not allowed: use integer ms", "non_canonical")
    return value


def encode(value: Any) -> bytes:
    """Encode ``value`` canonically. Maps may be given in any key order.

    Raises :class:`EncodingError` if ``value`` holds something the canonical subset
    does not allow (non-string keys, NaN/infinity, sets, custom objects ...).
    """
    try:
        out: bytes = _pack(_sorted(value))
        return out
    except EncodingError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodingError(f"value cannot be encoded: {exc}", "non_canonical") from exc


_LEAF = frozenset({str, int, bool, bytes, type(None)})
_SCALAR = _LEAF | {float}
_INF = math.inf
_join = "".join


def _walk(v: dict[str, Any] | list[Any], depth: int, limits: Limits) -> int:
    """Check one decoded container against the canonical rules; return its item count
    (this container and everything below it).

    Hot path (every record received): a plain loop with exact type tests measured
    fastest; ``"".join`` checks all keys are str in C.
    """
    if type(v) is dict:
        keys = list(v)
        try:
            _join(keys)  # TypeError unless every key is a str
        except TypeError:
            raise EncodingError("map key is not a string", "non_canonical") from None
        # Code point order of str equals byte order of their UTF-8 encodings.
        if keys != sorted(keys):
            raise EncodingError("map keys are not sorted by their UTF-8 bytes", "non_canonical")
        vals: Any = v.values()
    else:
        vals = v
    n = len(vals)
    for x in vals:
        tx = type(x)
        if tx in _LEAF:
            continue
        if tx is float:
            if x != x or x == _INF or x == -_INF:
                raise EncodingError("NaN or infinity in a float", "non_canonical")
            continue
        if tx is dict or tx is list:
            if depth + 1 >= limits.max_depth:
                raise EncodingError(
                    f"value nests deeper than {limits.max_depth} levels", "too_deep"
                )
            n += _walk(x, depth + 1, limits)
            if n > limits.max_items:
                raise EncodingError(f"more than {limits.max_items} items", "too_many_items")
            continue
        # ExtType, Timestamp, ...
        raise EncodingError(f"msgpack {tx.__name__} values are not allowed", "non_canonical")
    return n


def _check(value: Any, limits: Limits) -> None:
    """The canonical rules a re-encoding cannot see: types, key order, depth, counts,
    NaN and infinity. Raises :class:`EncodingError`."""
    t = type(value)
    if t is dict or t is list:
        if limits.max_depth < 1:
            raise EncodingError("containers are not allowed here", "too_deep")
        if _walk(value, 0, limits) > limits.max_items:
            raise EncodingError(f"more than {limits.max_items} items", "too_many_items")
    elif t not in _SCALAR:
        raise EncodingError(f"msgpack {t.__name__} values are not allowed", "non_canonical")
    elif t is float and (value != value or value in (_INF, -_INF)):
        raise EncodingError("NaN or infinity in a float", "non_canonical")


_SORT_KEYS = ormsgpack.OPT_SORT_KEYS
_unpack_fast = ormsgpack.unpackb
_pack_sorted = ormsgpack.packb
# Every float64 NaN or infinity is encoded as cb 7f/ff f?/..: exponent bits all set.
_NAN_OR_INF = re.compile(rb"\xcb[\x7f\xff][\xf0-\xff]").search
# All bytes but container headers (fixmap, fixarray, array16/32, map16/32): deleting
# them leaves at most one byte per container header, so its length bounds the nesting.
_NOT_CONTAINER_HEADER = bytes(
    b for b in range(256) if not (0x80 <= b <= 0x9F or 0xDC <= b <= 0xDF)
)


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Strictly decode canonical msgpack bytes.

    Returns plain Python values (dict, list, str, bytes, int, float, bool, None).
    Raises :class:`EncodingError` with a specific ``reason`` when the bytes are too
    large (``too_large``), nest too deeply (``too_deep``), hold too many items
    (``too_many_items``), are malformed or truncated (``malformed``), or are valid
    msgpack but not the canonical encoding (``non_canonical``).
    """
    if type(data) is not bytes:
        data = bytes(data)
    if len(data) > limits.max_bytes:
        raise EncodingError(
            f"{len(data)} bytes is over the limit of {limits.max_bytes}", "too_large"
        )
    # The fast path (module docstring): what it cannot prove valid, the reference decides.
    try:
        value = _unpack_fast(data)
        same = _pack_sorted(value, option=_SORT_KEYS) == data
    except Exception:  # anything at all: the reference decides, with a reason
        same = False
    if not same or _NAN_OR_INF(data) is not None:
        return _decode_reference(data, limits)
    if len(data) > limits.max_items:
        _check(value, limits)
    elif _header_bound(data, value) > limits.max_depth and (
        not _nests_within(value, limits.max_depth - 1)
    ):
        _check(value, limits)  # raises too_deep, with the reference's message
    return value


def _header_bound(data: bytes, value: Any) -> int:
    """An upper bound on the number of containers in ``data`` (canonical bytes of
    ``value``): its container header bytes, less those inside the top-level map's
    byte strings (keys and public keys are random bytes: they would often push the
    count over the depth limit for nothing)."""
    n = len(data.translate(None, _NOT_CONTAINER_HEADER))
    if type(value) is dict:
        for x in value.values():
            if type(x) is bytes:
                n -= len(x.translate(None, _NOT_CONTAINER_HEADER))
    return n


def _nests_within(v: Any, levels: int) -> bool:
    """Whether containers nest at most ``levels`` further levels below ``v``.

    Only depth: on the fast path every other rule is already proven.
    """
    if type(v) is not dict and type(v) is not list:
        return True
    if levels < 0:
        return False
    for x in v.values() if type(v) is dict else v:
        if (type(x) is dict or type(x) is list) and (
            levels == 0 or not _nests_within(x, levels - 1)
        ):
            return False
    return True


def _decode_reference(data: bytes, limits: Limits) -> Any:
    """:func:`decode` the slow, obviously-correct way (see the module docstring);
    ``data`` is bytes within ``limits.max_bytes``."""
    try:
        # Defaults are strict (raw=False, strict_map_key=True) and bound every length
        # by len(data), which is already bounded; extra keywords cost measurable time.
        value = msgpack.unpackb(data)
    except EncodingError:
        raise
    except msgpack.ExtraData as exc:
        raise EncodingError("trailing bytes after the value", "malformed") from exc
    except UnicodeDecodeError as exc:
        raise EncodingError("a string is not valid UTF-8", "malformed") from exc
    except msgpack.StackError as exc:
        raise EncodingError("value nests too deeply", "too_deep") from exc
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # msgpack raises ValueError for truncated data, but also for input that is one
        # complete msgpack value it will not build: a non-string map key (strict_map_key,
        # kept: it stops hash flooding with crafted int keys), an ext of a reserved type
        # (-128..-2) or a timestamp (-1) of a length or content no timestamp has. Those
        # are valid msgpack, just not canonical: the structure alone decides.
        if _one_complete_value(data):
            raise EncodingError(
                f"valid msgpack but not canonical (ext or non-string map key): {exc}",
                "non_canonical",
            ) from exc
        raise EncodingError(f"not valid msgpack: {exc}", "malformed") from exc
    _check(value, limits)
    # The walk proved key order and types; re-encoding proves shortest integer and
    # length encodings, float64 only, no duplicate keys (a dict would have merged them).
    if _pack(value) != data:
        raise EncodingError(
            "not the canonical encoding (non-shortest integer or length, float32, "
            "duplicate key, or str/bin mix-up)",
            "non_canonical",
        )
    return value


# Header bytes c4..df: (size of the length field, or 0 for fixed; fixed payload size;
# what follows: "bin", "str", "ext", "array", "map" or "" for a scalar).
_HEADERS: dict[int, tuple[int, int, str]] = {
    0xC4: (1, 0, "bin"), 0xC5: (2, 0, "bin"), 0xC6: (4, 0, "bin"),
    0xC7: (1, 1, "ext"), 0xC8: (2, 1, "ext"), 0xC9: (4, 1, "ext"),
    0xCA: (0, 4, ""), 0xCB: (0, 8, ""),
    0xCC: (0, 1, ""), 0xCD: (0, 2, ""), 0xCE: (0, 4, ""), 0xCF: (0, 8, ""),
    0xD0: (0, 1, ""), 0xD1: (0, 2, ""), 0xD2: (0, 4, ""), 0xD3: (0, 8, ""),
    0xD4: (0, 2, ""), 0xD5: (0, 3, ""), 0xD6: (0, 5, ""), 0xD7: (0, 9, ""),
    0xD8: (0, 17, ""),
    0xD9: (1, 0, "str"), 0xDA: (2, 0, "str"), 0xDB: (4, 0, "str"),
    0xDC: (2, 0, "array"), 0xDD: (4, 0, "array"), 0xDE: (2, 0, "map"), 0xDF: (4, 0, "map"),
}


def _one_complete_value(data: bytes) -> bool:
    """Whether ``data`` is exactly one well-formed msgpack value: not truncated, no
    trailing bytes, no reserved byte ``c1``, every str valid UTF-8. Ext values of any
    type and length and map keys of any type are well formed (the canonical rules
    refuse them, as ``non_canonical``). Error path only; iterative, linear in
    ``len(data)``."""
    pos, end, pending = 0, len(data), 1  # pending: values still to read
    while pending:
        if pending > end - pos:  # every value takes at least one byte
            return False
        b = data[pos]
        pos += 1
        pending -= 1
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
            continue
        if b <= 0x8F:
            pending += 2 * (b & 0x0F)
            continue
        if b <= 0x9F:
            pending += b & 0x0F
            continue
        if b <= 0xBF:
            size, kind = b & 0x1F, "str"
        elif b == 0xC1:
            return False
        else:
            width, size, kind = _HEADERS[b]
            if width:
                if pos + width > end:
                    return False
                count = int.from_bytes(data[pos : pos + width], "big")
                pos += width
                if kind == "array":
                    pending += count
                    continue
                if kind == "map":
                    pending += 2 * count
                    continue
                size += count  # bin, str; ext: its type byte and its data
        if pos + size > end:
            return False
        if kind == "str":
            try:
                data[pos : pos + size].decode("utf-8")
            except UnicodeDecodeError:
                return False
        pos += size
    return pos == end
