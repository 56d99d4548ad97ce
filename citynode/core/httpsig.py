"""Signed requests between nodes, after HTTP Message Signatures (RFC 9421).

Every request one node sends another is signed with the sender's node key. The sender
adds three headers (docs/PROTOCOL.md, "Request signatures")::

    Content-Digest: sha-256=:<base64 SHA-256 of the body>:            (RFC 9530)
    Signature-Input: cn=("@method" "@path" "@query" "content-digest");created=<s>;\
keyid="cn1...";nonce="<base64url>";alg="ed25519";tag="cn1...<target node>"
    Signature: cn=:<base64 Ed25519 signature>:

The signature is over the RFC 9421 §2.5 signature base, e.g.::

    "@method": POST
    "@path": /v1/sync
    "@query": ?since=3
    "content-digest": sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:
    "@signature-params": ("@method" "@path" "@query" "content-digest");created=...;tag="cn1..."

(lines joined by LF, no LF after the last), with one departure from RFC 9421: what is
signed is ``DOMAIN_REQUEST || base``, the domain prefix every citynode signature carries,
so a request signature can never be taken for a record or card signature. A generic
RFC 9421 verifier therefore does not verify these signatures as they stand.

Rules: the covered components are exactly those four, in that order; the parameters
are exactly ``created`` (integer seconds), ``keyid`` (the sender's node id), ``nonce``
(16 to 64 base64url characters), ``alg`` (``"ed25519"``) and ``tag`` (the node id of
the node the request is for, RFC 9421 §2.3), in any order, each once. A request is
refused if its ``tag`` is not the receiving node's id (so a node cannot replay a
request it received to a third node), if ``created`` is more than ``max_age_ms`` in
the past or more than 60 s in the future, or if its (key, nonce) was already seen
(:class:`ReplayCache`).

This module proves who signed a request and for which node; whether the signer may do
what it asks is the caller's decision, which :func:`verify_request` takes as its
``authorize`` callback so that refused signers never reach the replay cache.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import heapq
import re
from collections.abc import Callable, Mapping
from typing import NamedTuple

import nacl.utils

from citynode.core.keys import DOMAIN_REQUEST, SigningKey, Verifier, canonical_id, parse_node_id
from citynode.errors import (
    AccessDenied,
    ClockSkew,
    InvalidNodeId,
    ReplayedRequest,
    SignatureError,
)

__all__ = [
    "ALG",
    "COMPONENTS",
    "DEFAULT_MAX_AGE_MS",
    "KEYLOG_HEADER",
    "LABEL",
    "MAX_FUTURE_SKEW_MS",
    "MAX_HEADER_LEN",
    "ReplayCache",
    "SignatureHeaders",
    "SplitReplayCache",
    "claimed_signer",
    "read_signature",
    "sign_request",
    "signature_base",
    "verify_request",
]

LABEL = "cn"
ALG = "ed25519"
COMPONENTS = ("@method", "@path", "@query", "content-digest")
DEFAULT_MAX_AGE_MS = 300_000
MAX_FUTURE_SKEW_MS = 60_000
MAX_HEADER_LEN = 4096
DEFAULT_REPLAY_ENTRIES = 100_000

# ``tag`` is required too, but checked apart so that a request without one (signed for
# no node in particular) is refused as signed for another node, saying why.
_PARAMS = frozenset({"created", "keyid", "nonce", "alg"})
_TAG = "tag"
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token (a method)
_TARGET_RE = re.compile(r"/[\x21-\x7e]*")  # origin-form, visible ASCII: no line breaks
_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")

# --------------------------------------------------------------------------------------
# The subset of Structured Field Values (RFC 8941) these headers use: dictionaries whose
# members are items or inner lists, with parameters. Decimals are not supported (none of
# our headers has one) and are reported as malformed.

_KEY_RE = re.compile(r"[a-z*][a-z0-9_.*-]*")
_INT_RE = re.compile(r"-?[0-9]{1,15}")
_STRING_RE = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')
_SFTOKEN_RE = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*")
_BINARY_RE = re.compile(r":([A-Za-z0-9+/]*={0,2}):")
_OWS_RE = re.compile(r"[ \t]*")
_SP_RE = re.compile(r" *")


class _Malformed(Exception):
    """A header is not valid structured-field syntax (internal; becomes AccessDenied)."""


class _Token(str):
    """An sf-token, kept apart from an sf-string (``alg=ed25519`` is not ``"ed25519"``)."""

    __slots__ = ()


_Bare = int | str | bytes | bool
_Params = dict[str, _Bare]
_Member = tuple[_Bare | list[tuple[_Bare, _Params]], _Params]


class _Parser:
    __slots__ = ("i", "s")

    def __init__(self, s: str) -> None:
        self.s = s
        self.i = 0

    def _match(self, rx: re.Pattern[str]) -> re.Match[str] | None:
        m = rx.match(self.s, self.i)
        if m:
            self.i = m.end()
        return m

    def _peek(self) -> str:
        return self.s[self.i : self.i + 1]

    def key(self) -> str:
        m = self._match(_KEY_RE)
        if not m:
            raise _Malformed(f"expected a key at position {self.i}")
        return m.group()

    def bare(self) -> _Bare:
        c = self._peek()
        if c == '"':
            m = self._match(_STRING_RE)
            if not m:
                raise _Malformed(f"bad string at position {self.i}")
            return re.sub(r"\\(.)", r"\1", m.group(1))
        if c == ":":
            m = self._match(_BINARY_RE)
            if not m:
                raise _Malformed(f"bad byte sequence at position {self.i}")
            b64 = m.group(1)
            try:
                # RFC 8941 asks parsers to accept missing "=" padding.
                return base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise _Malformed(f"bad base64 at position {self.i}") from exc
        if c == "?":
            v = self.s[self.i + 1 : self.i + 2]
            if v not in ("0", "1"):
                raise _Malformed(f"bad boolean at position {self.i}")
            self.i += 2
            return v == "1"
        if c == "-" or c.isdigit():
            m = self._match(_INT_RE)
            if not m or self._peek() in (".", *"0123456789"):
                raise _Malformed(f"bad or unsupported number at position {self.i}")
            return int(m.group())
        m = self._match(_SFTOKEN_RE)
        if not m:
            raise _Malformed(f"unexpected character at position {self.i}")
        return _Token(m.group())

    def params(self) -> _Params:
        out: _Params = {}
        while self._peek() == ";":
            self.i += 1
            self._match(_SP_RE)
            k = self.key()
            if k in out:
                raise _Malformed(f"parameter {k!r} appears twice")
            if self._peek() == "=":
                self.i += 1
                out[k] = self.bare()
            else:
                out[k] = True
        return out

    def member_value(self) -> _Member:
        if self._peek() != "(":
            return self.bare(), self.params()
        self.i += 1
        items: list[tuple[_Bare, _Params]] = []
        while True:
            self._match(_SP_RE)
            if self._peek() == ")":
                self.i += 1
                return items, self.params()
            items.append((self.bare(), self.params()))
            if self._peek() not in (" ", ")"):
                raise _Malformed(f"inner list items must be separated by spaces ({self.i})")

    def dictionary(self) -> dict[str, _Member]:
        self.s = self.s.strip(" ")
        out: dict[str, _Member] = {}
        while self.i < len(self.s):
            k = self.key()
            if k in out:
                raise _Malformed(f"member {k!r} appears twice")
            if self._peek() == "=":
                self.i += 1
                out[k] = self.member_value()
            else:
                out[k] = (True, self.params())
            self._match(_OWS_RE)
            if self.i == len(self.s):
                break
            if self._peek() != ",":
                raise _Malformed(f"expected ',' at position {self.i}")
            self.i += 1
            self._match(_OWS_RE)
            if self.i == len(self.s):
                raise _Malformed("trailing comma")
        if not out:
            raise _Malformed("empty")
        return out


def _sf_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _serialize_params(params: list[tuple[str, int | str]]) -> str:
    """The ``@signature-params`` value: our inner list of components, then params."""
    inner = "(" + " ".join(_sf_string(c) for c in COMPONENTS) + ")"
    return inner + "".join(
        f";{k}={v}" if type(v) is int else f";{k}={_sf_string(str(v))}" for k, v in params
    )


# --------------------------------------------------------------------------------------


def _content_digest(body: bytes) -> str:
    return "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode("ascii") + ":"


def _split_target(path_qs: str) -> tuple[str, str]:
    """``/p?q`` -> (``/p``, ``?q``); no query gives ``?`` (RFC 9421 §2.2.7)."""
    path, _, query = path_qs.partition("?")
    return path, "?" + query


def signature_base(method: str, path_qs: str, content_digest: str, sig_params: str) -> bytes:
    """The RFC 9421 §2.5 signature base for our four components (without the domain
    prefix, which :meth:`SigningKey.sign` and :meth:`Verifier.verify` add)."""
    path, query = _split_target(path_qs)
    return (
        f'"@method": {method}\n'
        f'"@path": {path}\n'
        f'"@query": {query}\n'
        f'"content-digest": {content_digest}\n'
        f'"@signature-params": {sig_params}'
    ).encode("ascii")


def _canonical_node_id(text: str, what: str) -> str:
    """``text`` as a canonical node id; :class:`ValueError` (a caller bug) if it is none."""
    try:
        return _canonical(text)
    except InvalidNodeId as exc:
        raise ValueError(f"{what} must be a node id (cn1...): {exc}") from exc


#: A signed read of a cn2 node MAY carry its key log (standard base64 of the wire bytes):
#: a receiver holding no log of the signer verifies the request by that log's key in
#: force (after the log verifies from the signer's id alone).
KEYLOG_HEADER = "Citynode-Key-Log"
MAX_KEYLOG_HEADER = 64 * 1024


@functools.lru_cache(maxsize=256)
def _canonical(text: str) -> str:
    # Cached: a node signs for, and is the target of, the same few ids on every request.
    return canonical_id(text)


def sign_request(
    key: SigningKey,
    method: str,
    path_qs: str,
    body: bytes,
    now_ms: int,
    nonce: str | None = None,
    *,
    target: str,
) -> dict[str, str]:
    """Return the headers that sign this request as ``key``'s node, created at ``now_ms``,
    for the node whose id is ``target``.

    ``method`` is upper-cased (as aiohttp sends it); ``path_qs`` is the request target
    exactly as it goes on the wire (path and query, percent-encoded, starting with ``/``).
    ``nonce`` defaults to 16 random bytes, base64url. ``target`` is the node id of the
    receiving node; it is signed as the ``tag`` parameter (in canonical form), and only
    that node accepts the request. Raises :class:`ValueError` if the method, target,
    time, nonce or ``target`` is malformed -- a bug in the caller, never input from
    another node.
    """
    target = _canonical_node_id(target, "the target of a signed request")
    method = method.upper()
    if not _TOKEN_RE.fullmatch(method):
        raise ValueError(f"HTTP method {method!r} is not a token")
    if not _TARGET_RE.fullmatch(path_qs):
        raise ValueError(f"request target {path_qs[:64]!r} must be visible ASCII from '/'")
    if type(now_ms) is not int or now_ms < 0:
        raise ValueError("now_ms must be a non-negative integer")
    if nonce is None:
        nonce = base64.urlsafe_b64encode(nacl.utils.random(16)).rstrip(b"=").decode("ascii")
    elif not _NONCE_RE.fullmatch(nonce):
        raise ValueError("nonce must be 16 to 64 base64url characters")
    digest = _content_digest(body)
    params = _serialize_params(
        [
            ("created", now_ms // 1000),
            ("keyid", key.node_id),
            ("nonce", nonce),
            ("alg", ALG),
            (_TAG, target),
        ]
    )
    sig = key.sign(DOMAIN_REQUEST, signature_base(method, path_qs, digest, params))
    return {
        "Content-Digest": digest,
        "Signature-Input": f"{LABEL}={params}",
        "Signature": f"{LABEL}=:{base64.b64encode(sig).decode('ascii')}:",
    }


_HEADERS = {"signature-input": "Signature-Input", "signature": "Signature",
            "content-digest": "Content-Digest"}


def _find_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Our three headers, looked up without regard to case; each at most once and
    at most :data:`MAX_HEADER_LEN` long, checked before any parsing."""
    found: dict[str, str] = {}
    for name, value in headers.items():
        # isinstance, not type(): multidict (aiohttp) keys are istr, a str subclass.
        if not isinstance(name, str) or not name.isascii():
            continue
        low = name.lower()
        if low not in _HEADERS:
            continue
        title = _HEADERS[low]
        if low in found:
            raise AccessDenied(f"the {title} header appears more than once")
        if not isinstance(value, str):
            raise AccessDenied(f"the {title} header is not text")
        if len(value) > MAX_HEADER_LEN:
            raise AccessDenied(f"the {title} header is over {MAX_HEADER_LEN} characters")
        found[low] = value
    missing = [title for low, title in _HEADERS.items() if low not in found]
    if missing:
        raise AccessDenied(
            f"request is not signed: missing {', '.join(missing)} header(s); every request "
            "between nodes must be signed with the sender's node key"
        )
    return found


def _parse(title: str, value: str) -> dict[str, _Member]:
    try:
        return _Parser(value).dictionary()
    except _Malformed as exc:
        raise AccessDenied(f"the {title} header is malformed: {exc}") from exc


class _SigInput(NamedTuple):
    text: str  # the canonical "@signature-params" value
    created: int
    keyid: str
    nonce: str
    alg: str
    tag: str | None  # None: the signature names no target node


# Fast paths for the exact forms sign_request writes (one member, no optional spaces,
# the parameters in its order, nothing to unescape). For those strings they give what
# the general parser gives (tests/core/test_httpsig.py compares the two); any other
# string, valid or not, goes to the general parser.
_FAST_SI_RE = re.compile(
    r'cn=(\("@method" "@path" "@query" "content-digest"\);created=(0|[1-9][0-9]{0,14})'
    r';keyid="([a-z0-9]{1,128})";nonce="([A-Za-z0-9_-]{16,64})";alg="(ed25519)"'
    r';tag="([a-z0-9]{1,128})")'
)
_FAST_SIG_RE = re.compile(r"cn=:([A-Za-z0-9+/]{86}==):")
_FAST_DIGEST_RE = re.compile(r"sha-256=:([A-Za-z0-9+/]{43}=):")


def _fast_signature_input(value: str) -> _SigInput | None:
    m = _FAST_SI_RE.fullmatch(value)
    if m is None:
        return None
    return _SigInput(m[1], int(m[2]), m[3], m[4], m[5], m[6])


def _fast_bytes(rx: re.Pattern[str], value: str) -> bytes | None:
    m = rx.fullmatch(value)
    return None if m is None else base64.b64decode(m[1], validate=True)


def _parse_signature_input(value: str) -> _SigInput:
    fast = _fast_signature_input(value)
    return fast if fast is not None else _parse_signature_input_in_full(value)


def _parse_signature_input_in_full(value: str) -> _SigInput:
    member = _parse("Signature-Input", value).get(LABEL)
    if member is None:
        raise AccessDenied(f"the Signature-Input header has no {LABEL!r} signature")
    inner, params = member
    if not isinstance(inner, list) or tuple(c for c, _ in inner) != COMPONENTS or any(
        type(c) is not str or p for c, p in inner
    ):
        raise AccessDenied(
            "the Signature-Input header must cover exactly "
            '("@method" "@path" "@query" "content-digest")'
        )
    if params.keys() - {_TAG} != _PARAMS:
        raise AccessDenied(
            "the Signature-Input header must have exactly the parameters "
            "created, keyid, nonce, alg and tag"
        )
    created = params["created"]
    if type(created) is not int or created < 0:
        raise AccessDenied("the Signature-Input created parameter must be an integer >= 0")
    strings: dict[str, str] = {}
    for name in ("keyid", "nonce", "alg", _TAG):
        if name not in params:  # only tag can be absent here
            continue
        v = params[name]
        if type(v) is not str:
            raise AccessDenied(f"the Signature-Input {name} parameter must be a quoted string")
        strings[name] = v
    # Re-serialized in the order received, as RFC 9421 §2.3 asks.
    text = _serialize_params([(k, created if k == "created" else strings[k]) for k in params])
    return _SigInput(
        text, created, strings["keyid"], strings["nonce"], strings["alg"], strings.get(_TAG)
    )


class SignatureHeaders(NamedTuple):
    """A request's three signature headers, found and their Signature-Input parsed
    (nothing verified): what :func:`read_signature` returns, so that a server that
    pre-checks a request (:func:`claimed_signer`) then verifies it
    (:func:`verify_request`) reads and parses them once."""

    found: dict[str, str]  # lower-case name -> value
    params: _SigInput


def read_signature(headers: Mapping[str, str] | SignatureHeaders) -> SignatureHeaders:
    """Find the signature headers of a request (see :func:`verify_request`) and parse
    its Signature-Input. Raises :class:`AccessDenied` if they are missing, repeated,
    too long or malformed."""
    if isinstance(headers, SignatureHeaders):
        return headers
    found = _find_headers(headers)
    return SignatureHeaders(found, _parse_signature_input(found["signature-input"]))


@functools.lru_cache(maxsize=1024)
def _key_of(keyid: str) -> bytes:
    """The public key of a keyid in canonical node-id form (cached: partners sign every
    request with the same few). Raises :class:`AccessDenied`."""
    try:
        public_key = parse_node_id(keyid)
    except InvalidNodeId as exc:
        raise AccessDenied(f"the signature keyid is not a node id: {exc}") from exc
    if keyid != canonical_id(keyid):
        raise AccessDenied("the signature keyid is not a node id in its canonical form")
    return public_key


def claimed_signer(
    headers: Mapping[str, str] | SignatureHeaders, *, now_ms: int,
    max_age_ms: int = DEFAULT_MAX_AGE_MS, max_future_ms: int = MAX_FUTURE_SKEW_MS,
) -> bytes:
    """The public key a request's Signature-Input *claims* signed it, if its creation
    time is within the window. Nothing is verified: a server uses this to refuse a
    stranger's or a stale request before reading its body, then calls
    :func:`verify_request` on the body (pass both the :func:`read_signature` of the
    headers to parse them once). Raises :class:`AccessDenied`."""
    si = read_signature(headers).params
    # Cached (parsing an id took ~20 us of every partner request); a keyid that is not
    # canonical is refused here rather than by verify_request after the body is read.
    key = _key_of(si.keyid)
    _check_created(si.keyid, si.created * 1000, now_ms, max_age_ms, max_future_ms)
    return key


def _check_created(keyid: str, created_ms: int, now_ms: int, max_age_ms: int,
                   max_future_ms: int) -> None:
    """Refuse (ClockSkew) a request created too long ago or too far in the future."""
    if now_ms - created_ms > max_age_ms:
        raise ClockSkew(
            f"request signature by {keyid[:64]} was created {(now_ms - created_ms) // 1000} s "
            f"ago, more than the {max_age_ms // 1000} s allowed: check the sender's clock",
            (created_ms - now_ms) // 1000)
    if created_ms - now_ms > max_future_ms:
        raise ClockSkew(
            f"request signature by {keyid[:64]} was created {(created_ms - now_ms) // 1000} s "
            f"in the future, more than the {max_future_ms // 1000} s allowed: check the "
            "sender's clock and this node's", (created_ms - now_ms) // 1000)


def verify_request(
    method: str,
    path_qs: str,
    headers: Mapping[str, str] | SignatureHeaders,
    body: bytes,
    *,
    now_ms: int,
    max_age_ms: int = DEFAULT_MAX_AGE_MS,
    replay: ReplayCache,
    verifier: Verifier,
    expected_target: str,
    authorize: Callable[[bytes], bool] | None = None,
    max_future_ms: int = MAX_FUTURE_SKEW_MS,
    key_of: Callable[[bytes], bytes] | None = None,
) -> bytes:
    """Check the signature of a received request; return the sender's public key (for a
    ``cn2`` keyid: its identity ``D``, the signature checked with ``key_of(D)``, the
    current key of the log held of it; without ``key_of``, the 32 bytes of the id).

    ``method`` and ``path_qs`` are as received (the raw, still percent-encoded target
    with its query string); ``headers`` is any mapping, looked up without regard to
    case, or what :func:`read_signature` made of them; ``expected_target`` is this (the
    receiving) node's id. Checks, cheapest
    first: the headers are present, short and well formed; the algorithm is ed25519;
    keyid is a node id; the ``tag`` is ``expected_target`` (a request signed for
    another node, or for none, is refused: this is what stops a node replaying a
    request it received to a third node); ``created`` is at most ``max_age_ms`` old and
    at most ``max_future_ms`` ahead of ``now_ms`` (else :class:`ClockSkew`); the body
    matches Content-Digest; the signature verifies; then ``authorize(public_key)``, when
    given, must return ``True`` (anything else refuses); and only then that the nonce is
    new, so neither unsigned junk nor signers ``authorize`` refuses ever enter
    ``replay``.

    Servers MUST pass ``authorize`` on partner endpoints (e.g. "is this key a partner"):
    without it any node can mint keys and fill the shared replay cache with valid
    signatures until every partner request is refused as "busy". An endpoint open to
    any signer (signed reads) should use a :class:`ReplayCache` of its own, so that
    filling it cannot block the partner endpoints.

    Raises :class:`AccessDenied` (:class:`ClockSkew` for the time) with what was wrong,
    and nothing else for any header
    values; :class:`ValueError` if ``max_age_ms`` exceeds the cache's (the cache would
    forget nonces this call still accepts) or ``expected_target`` is not a node id --
    both bugs in the caller. Whatever ``authorize`` raises propagates unchanged.
    """
    if max_age_ms > replay.max_age_ms:
        raise ValueError("max_age_ms is longer than the replay cache remembers nonces")
    expected_target = _canonical_node_id(expected_target, "expected_target")
    parsed = read_signature(headers)
    h, si = parsed.found, parsed.params
    if not _TOKEN_RE.fullmatch(method) or not _TARGET_RE.fullmatch(path_qs):
        raise AccessDenied("the request method or target is malformed")
    sig: object = _fast_bytes(_FAST_SIG_RE, h["signature"])
    if sig is None:
        sig_member = _parse("Signature", h["signature"]).get(LABEL)
        if sig_member is None:
            raise AccessDenied(f"the Signature header has no {LABEL!r} signature")
        sig = sig_member[0]
    if type(sig) is not bytes or len(sig) != 64:
        raise AccessDenied("the Signature header must hold a 64-byte Ed25519 signature")
    digest: object = _fast_bytes(_FAST_DIGEST_RE, h["content-digest"])
    if digest is None:
        digest_member = _parse("Content-Digest", h["content-digest"]).get("sha-256")
        if digest_member is None or type(digest_member[0]) is not bytes:
            raise AccessDenied("the Content-Digest header must have a sha-256 byte sequence")
        digest = digest_member[0]

    keyid, nonce = si.keyid, si.nonce
    if si.alg != ALG:
        raise AccessDenied(f"signature algorithm {si.alg[:32]!r} is not supported: use ed25519")
    public_key = _key_of(keyid)
    if not _NONCE_RE.fullmatch(nonce):
        raise AccessDenied("the signature nonce must be 16 to 64 base64url characters")
    if si.tag is None:
        raise AccessDenied(
            "request was signed for another node (its signature has no tag naming the "
            f"node it is for; this node is {expected_target}): the sender must sign with "
            'tag="<receiving node id>"'
        )
    if si.tag != expected_target:
        raise AccessDenied(
            f"request was signed for another node ({si.tag[:64]!r}, not this node "
            f"{expected_target}): a signed request is accepted only by the node it names"
        )

    created_ms = si.created * 1000
    _check_created(keyid, created_ms, now_ms, max_age_ms, max_future_ms)
    if digest != hashlib.sha256(body).digest():
        raise AccessDenied("the request body does not match its Content-Digest: altered or "
                           "truncated in transit")

    base = signature_base(method, path_qs, h["content-digest"].strip(" \t"), si.text)
    try:
        verifier.verify(public_key if key_of is None else key_of(public_key),
                        DOMAIN_REQUEST, base, sig)
    except SignatureError as exc:
        raise AccessDenied(
            f"request signature does not verify against the key of {keyid}: the request "
            "was altered, or not signed by that node"
        ) from exc
    # After the signature (the key is proven) and before the cache (a refused signer
    # must not be able to fill it): see the docstring.
    if authorize is not None and authorize(public_key) is not True:
        raise AccessDenied(f"request signed by a node that is not allowed here ({keyid})")
    replay.check_and_add(public_key, nonce, created_ms, now_ms)
    return public_key


class ReplayCache:
    """The (key, nonce) pairs of recently accepted requests, each kept until its
    signature is too old to be accepted anyway (``created + max_age_ms``).

    Pure (time is passed in) and bounded: at most ``max_entries`` pairs. Expired pairs
    are dropped lazily, oldest first, from a heap ordered by expiry.
    """

    __slots__ = ("_expiry", "_heap", "max_age_ms", "max_entries")

    def __init__(
        self, max_age_ms: int = DEFAULT_MAX_AGE_MS, max_entries: int = DEFAULT_REPLAY_ENTRIES
    ) -> None:
        if max_age_ms <= 0 or max_entries <= 0:
            raise ValueError("max_age_ms and max_entries must be positive")
        self.max_age_ms = max_age_ms
        self.max_entries = max_entries
        self._expiry: dict[tuple[bytes, str], int] = {}
        self._heap: list[tuple[int, tuple[bytes, str]]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def check_and_add(self, keyid: bytes, nonce: str, created_ms: int, now_ms: int) -> None:
        """Remember ``(keyid, nonce)`` until ``created_ms + max_age_ms``.

        Raises :class:`ReplayedRequest` (an :class:`AccessDenied`) if the pair is
        already remembered (a replay), :class:`AccessDenied` if
        ``created_ms`` is already too old to be remembered, or if the cache is full of
        unexpired pairs ("busy").
        """
        expires = created_ms + self.max_age_ms
        if expires < now_ms:
            raise AccessDenied("request signature is too old to be checked for replay")
        heap, expiry = self._heap, self._expiry
        while heap and heap[0][0] < now_ms:
            del expiry[heapq.heappop(heap)[1]]
        pair = (keyid, nonce)
        if pair in expiry:
            raise ReplayedRequest("request refused as a replay: its nonce was already used",
                                  keyid)
        if len(expiry) >= self.max_entries:
            # Full of pairs that have not expired. Forgetting one would let an attacker
            # who floods us replay a captured request once its pair is gone, so we fail
            # closed: refuse new requests until pairs expire (at most max_age_ms). Only
            # validly signed requests from signers the caller authorized get here, so on
            # a partner endpoint the flood comes from a partner's key.
            raise AccessDenied(
                "busy: too many recent signed requests to check for replays; retry shortly"
            )
        expiry[pair] = expires
        heapq.heappush(heap, (expires, pair))


class SplitReplayCache(ReplayCache):
    """A replay cache for requests any key may sign (signed reads): keys ``known`` says
    are known use this cache, each at most ``per_key_entries`` of it; all others share a
    smaller one of their own.

    Keys cost nothing to make, so strangers can fill a cache; when one is full it fails
    closed ("busy"). Split, a flood of strangers' signed requests refuses strangers
    only; and one known key that floods refuses itself, not the other known keys (unless
    more than max_entries / per_key_entries of them flood together). A pair is refused
    if either cache holds it: a key that turns known does not get its nonces back.
    """

    __slots__ = ("_per_key", "known", "per_key_entries", "strangers")

    def __init__(self, known: Callable[[bytes], bool], max_age_ms: int = DEFAULT_MAX_AGE_MS,
                 max_entries: int = DEFAULT_REPLAY_ENTRIES,
                 stranger_entries: int = DEFAULT_REPLAY_ENTRIES // 10,
                 per_key_entries: int = DEFAULT_REPLAY_ENTRIES // 20) -> None:
        super().__init__(max_age_ms, max_entries)
        self.known = known
        self.strangers = ReplayCache(max_age_ms, stranger_entries)
        self.per_key_entries = per_key_entries
        self._per_key: dict[bytes, int] = {}

    def check_and_add(self, keyid: bytes, nonce: str, created_ms: int, now_ms: int) -> None:
        """As :meth:`ReplayCache.check_and_add`, in the known keys' cache or the
        strangers'. Raises :class:`AccessDenied` as it does, and "busy" for a known key
        that holds its whole share."""
        pair = (keyid, nonce)
        if pair in self._expiry or pair in self.strangers._expiry:
            raise ReplayedRequest("request refused as a replay: its nonce was already used",
                                  keyid)
        if not self.known(keyid):
            self.strangers.check_and_add(keyid, nonce, created_ms, now_ms)
            return
        heap, expiry, counts = self._heap, self._expiry, self._per_key
        while heap and heap[0][0] < now_ms:  # expire here, to keep the counts right
            gone = heapq.heappop(heap)[1]
            del expiry[gone]
            left = counts[gone[0]] - 1
            if left:
                counts[gone[0]] = left
            else:
                del counts[gone[0]]
        if counts.get(keyid, 0) >= self.per_key_entries:
            raise AccessDenied(
                "busy: too many recent signed requests from this key to check for "
                "replays; retry shortly")
        super().check_and_add(keyid, nonce, created_ms, now_ms)
        counts[keyid] = counts.get(keyid, 0) + 1
