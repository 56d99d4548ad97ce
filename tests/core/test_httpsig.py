"""Request signatures (citynode.core.httpsig): round trip, every tampering, time window,
replays (also to another node), the authorize hook, the replay cache, header syntax, and
robustness against arbitrary headers."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterator, Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from citynode.core.httpsig import (
    DEFAULT_MAX_AGE_MS,
    MAX_FUTURE_SKEW_MS,
    ReplayCache,
    SplitReplayCache,
    claimed_signer,
    read_signature,
    sign_request,
    signature_base,
    verify_request,
)
from citynode.core.keys import DOMAIN_RECORD, DOMAIN_REQUEST, SigningKey, Verifier
from citynode.errors import AccessDenied

NOW = 1_732_780_000_123
KEY = SigningKey(bytes(range(32)))
OTHER = SigningKey(bytes(range(1, 33)))
HERE = SigningKey(bytes([7]) * 32).node_id  # the node the requests are signed for
ELSEWHERE = SigningKey(bytes([8]) * 32).node_id  # a third node
NONCE = "AAECAwQFBgcICQoLDA0ODw"
BODY = b'{"want": [1, 2, 3]}'
TARGET = "/v1/sync?since=3&feed=air"


def _sign(
    method: str = "POST", target: str = TARGET, body: bytes = BODY, now: int = NOW,
    nonce: str | None = NONCE, key: SigningKey = KEY, to: str = HERE,
) -> dict[str, str]:
    return sign_request(key, method, target, body, now, nonce, target=to)


def _verify(
    headers: Mapping[str, str], method: str = "POST", target: str = TARGET,
    body: bytes = BODY, now: int = NOW, replay: ReplayCache | None = None,
    max_age_ms: int = DEFAULT_MAX_AGE_MS, at: str = HERE,
    authorize: Callable[[bytes], bool] | None = None,
) -> bytes:
    return verify_request(
        method, target, headers, body, now_ms=now, max_age_ms=max_age_ms,
        replay=replay if replay is not None else ReplayCache(), verifier=Verifier(),
        expected_target=at, authorize=authorize,
    )


def _denied(headers: Mapping[str, str], match: str, **kw: object) -> None:
    with pytest.raises(AccessDenied, match=match):
        _verify(headers, **kw)  # type: ignore[arg-type]


def _resign_with(sig_params: str, method: str = "POST", target: str = TARGET,
                 body: bytes = BODY, key: SigningKey = KEY) -> dict[str, str]:
    """Headers for a hand-written ``@signature-params`` value, correctly signed."""
    digest = "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode() + ":"
    sig = key.sign(DOMAIN_REQUEST, signature_base(method, target, digest, sig_params))
    return {
        "Content-Digest": digest,
        "Signature-Input": f"cn={sig_params}",
        "Signature": f"cn=:{base64.b64encode(sig).decode()}:",
    }


PARAMS = (f'created={NOW // 1000};keyid="{KEY.node_id}";nonce="{NONCE}";alg="ed25519";'
          f'tag="{HERE}"')
COVERED = '("@method" "@path" "@query" "content-digest")'


# -- round trip and exact format ---------------------------------------------------------


def test_round_trip_returns_the_senders_public_key() -> None:
    assert _verify(_sign()) == KEY.public_key
    assert _verify(_sign(key=OTHER)) == OTHER.public_key


def test_exact_headers_and_signature_base() -> None:
    h = _sign()
    assert set(h) == {"Content-Digest", "Signature-Input", "Signature"}
    digest = base64.b64encode(hashlib.sha256(BODY).digest()).decode()
    assert h["Content-Digest"] == f"sha-256=:{digest}:"
    assert h["Signature-Input"] == f"cn={COVERED};{PARAMS}"
    assert h["Signature"].startswith("cn=:") and h["Signature"].endswith(":")
    base = signature_base("POST", TARGET, h["Content-Digest"], f"{COVERED};{PARAMS}")
    assert base == (
        '"@method": POST\n'
        '"@path": /v1/sync\n'
        '"@query": ?since=3&feed=air\n'
        f'"content-digest": sha-256=:{digest}:\n'
        f'"@signature-params": {COVERED};{PARAMS}'
    ).encode()
    sig = base64.b64decode(h["Signature"][4:-1])
    Verifier().verify(KEY.public_key, DOMAIN_REQUEST, base, sig)  # raises if not


def test_no_query_is_a_lone_question_mark() -> None:
    h = _sign(target="/v1/card")
    base = signature_base("POST", "/v1/card", h["Content-Digest"], "p")
    assert b'"@path": /v1/card\n"@query": ?\n' in base
    assert _verify(h, target="/v1/card") == KEY.public_key


def test_empty_query_and_absent_query_have_the_same_base() -> None:
    # RFC 9421 §2.2.7: both give "@query": ? -- the difference is not covered.
    assert signature_base("GET", "/a", "d", "p") == signature_base("GET", "/a?", "d", "p")


def test_default_nonce_is_random_base64url_of_16_bytes() -> None:
    n1 = _sign(nonce=None)["Signature-Input"].split('nonce="')[1].split('"')[0]
    n2 = _sign(nonce=None)["Signature-Input"].split('nonce="')[1].split('"')[0]
    assert n1 != n2
    assert len(base64.urlsafe_b64decode(n1 + "==")) == 16
    assert _verify(_sign(nonce=None)) == KEY.public_key


def test_method_is_upper_cased_when_signing_as_aiohttp_sends_it() -> None:
    assert _verify(_sign(method="post"), method="POST") == KEY.public_key


def test_empty_body() -> None:
    assert _verify(_sign(body=b""), body=b"") == KEY.public_key


# -- header lookup --------------------------------------------------------------------


class _LowerOnly(Mapping[str, str]):
    """A mapping that only answers lowercase keys, iterating as given."""

    def __init__(self, d: dict[str, str]) -> None:
        self._d = d

    def __getitem__(self, k: str) -> str:
        return self._d[k]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)


@pytest.mark.parametrize("case", [str.lower, str.upper, str.title, lambda s: s])
def test_header_names_are_case_insensitive(case: object) -> None:
    h = {case(k): v for k, v in _sign().items()}  # type: ignore[operator]
    h["X-Unrelated"] = "1"
    assert _verify(h) == KEY.public_key
    assert _verify(_LowerOnly(h)) == KEY.public_key


def test_cimultidict_as_aiohttp_gives_them() -> None:
    h = CIMultiDict(_sign())
    h.add("Accept", "application/msgpack")
    assert _verify(h) == KEY.public_key


def test_a_header_given_twice_is_refused() -> None:
    h = _sign()
    h["signature"] = h["Signature"]
    _denied(h, "Signature header appears more than once")
    m = CIMultiDict(_sign())
    m.add("Content-Digest", m["Content-Digest"])
    _denied(m, "Content-Digest header appears more than once")


@pytest.mark.parametrize("name", ["Signature-Input", "Signature", "Content-Digest"])
def test_missing_header(name: str) -> None:
    h = _sign()
    del h[name]
    _denied(h, f"not signed: missing {name} header")


def test_unsigned_request_names_all_missing_headers() -> None:
    _denied({}, "missing Signature-Input, Signature, Content-Digest header")


@pytest.mark.parametrize("name", ["Signature-Input", "Signature", "Content-Digest"])
def test_overlong_header_is_refused_before_parsing(name: str) -> None:
    h = _sign()
    h[name] = h[name] + " " * 4097
    _denied(h, f"{name} header is over 4096 characters")


def test_non_text_header_value() -> None:
    h: dict[str, object] = dict(_sign())
    h["Signature"] = b"cn=:AAAA:"
    _denied(h, "Signature header is not text")  # type: ignore[arg-type]


# -- every covered component, tampered ----------------------------------------------------


def test_tampered_method() -> None:
    _denied(_sign(), "does not verify against the key of cn1", method="PUT")


def test_tampered_path() -> None:
    _denied(_sign(), "does not verify", target="/v1/push?since=3&feed=air")


def test_tampered_query() -> None:
    _denied(_sign(), "does not verify", target="/v1/sync?since=4&feed=air")
    _denied(_sign(), "does not verify", target="/v1/sync")


def test_tampered_body() -> None:
    _denied(_sign(), "body does not match its Content-Digest", body=BODY + b" ")


def test_body_and_digest_both_replaced() -> None:
    h = _sign()
    evil = b'{"want": []}'
    h["Content-Digest"] = f"sha-256=:{base64.b64encode(hashlib.sha256(evil).digest()).decode()}:"
    _denied(h, "does not verify", body=evil)


def _edit_input(old: str, new: str) -> dict[str, str]:
    h = _sign()
    assert old in h["Signature-Input"]
    h["Signature-Input"] = h["Signature-Input"].replace(old, new)
    return h


def test_tampered_created() -> None:
    _denied(_edit_input(f"created={NOW // 1000}", f"created={NOW // 1000 - 1}"),
            "does not verify")


def test_tampered_keyid() -> None:
    _denied(_edit_input(KEY.node_id, OTHER.node_id), f"against the key of {OTHER.node_id}")


def test_tampered_nonce() -> None:
    _denied(_edit_input(NONCE, "B" + NONCE[1:]), "does not verify")


@pytest.mark.parametrize("i", [0, 31, 63])
def test_tampered_signature(i: int) -> None:
    h = _sign()
    sig = bytearray(base64.b64decode(h["Signature"][4:-1]))
    sig[i] ^= 1
    h["Signature"] = f"cn=:{base64.b64encode(bytes(sig)).decode()}:"
    _denied(h, "does not verify")


def test_signature_by_another_key_under_our_keyid() -> None:
    _denied(_resign_with(f"{COVERED};{PARAMS}", key=OTHER), "does not verify")


def test_signature_made_for_another_domain() -> None:
    h = _sign()
    base = signature_base("POST", TARGET, h["Content-Digest"], f"{COVERED};{PARAMS}")
    h["Signature"] = f"cn=:{base64.b64encode(KEY.sign(DOMAIN_RECORD, base)).decode()}:"
    _denied(h, "does not verify")


def test_wrong_alg() -> None:
    _denied(_edit_input('alg="ed25519"', 'alg="rsa-pss-sha512"'), "'rsa-pss-sha512' is not")


def test_keyid_not_a_node_id() -> None:
    _denied(_edit_input(KEY.node_id, KEY.node_id[:-1] + "a"), "keyid is not a node id")
    _denied(_edit_input(KEY.node_id, KEY.node_id.upper().replace("CN1", "cn1")),
            "canonical form")


# -- the target node (tag): no replay to another node --------------------------------------


def test_tag_is_the_canonical_target_node_id() -> None:
    assert f';tag="{HERE}"' in _sign()["Signature-Input"]
    # Spelled otherwise (upper-case body, surrounding space), it is signed canonically.
    sloppy = " cn1" + HERE[3:].upper() + " "
    assert _sign(to=sloppy)["Signature-Input"] == _sign()["Signature-Input"]
    assert _verify(_sign(), at=sloppy) == KEY.public_key


def test_request_replayed_to_another_node_is_refused() -> None:
    # A signs for B (HERE); B accepts it, then replays it to C (ELSEWHERE), whose
    # replay cache has never seen the nonce.
    h = _sign()
    assert _verify(h, replay=ReplayCache(), at=HERE) == KEY.public_key
    cache_c = ReplayCache()
    _denied(h, f"signed for another node \\('{HERE}', not this node {ELSEWHERE}\\)",
            replay=cache_c, at=ELSEWHERE)
    assert len(cache_c) == 0
    # Signed for C, the same request is accepted by C and refused by B.
    assert _verify(_sign(to=ELSEWHERE), at=ELSEWHERE) == KEY.public_key
    _denied(_sign(to=ELSEWHERE), "signed for another node", at=HERE)


def test_missing_tag_is_refused_even_when_correctly_signed() -> None:
    no_tag = PARAMS.replace(f';tag="{HERE}"', "")
    assert "tag" not in no_tag
    cache = ReplayCache()
    _denied(_resign_with(f"{COVERED};{no_tag}"), "signed for another node \\(its signature "
            f"has no tag naming the node it is for; this node is {HERE}\\)", replay=cache)
    assert len(cache) == 0
    _denied(_edit_input(f';tag="{HERE}"', ""), "signed for another node")


def test_tampered_tag() -> None:
    # B rewrites the tag to C's id to replay the request there: the signature breaks.
    _denied(_edit_input(HERE, ELSEWHERE), f"does not verify against the key of {KEY.node_id}",
            at=ELSEWHERE)
    # Any other edit names another node than this one.
    _denied(_edit_input(HERE, ELSEWHERE), "signed for another node", at=HERE)
    _denied(_edit_input(f'tag="{HERE}"', 'tag="x"'), "signed for another node \\('x'")
    # A correctly signed tag that is not even a node id is just another node's.
    _denied(_resign_with(f"{COVERED};{PARAMS.replace(HERE, HERE[:-1])}"),
            "signed for another node")


@pytest.mark.parametrize(("old", "new", "match"), [
    (f'tag="{HERE}"', "tag=1", "tag parameter must be a quoted string"),
    (f'tag="{HERE}"', "tag=?1", "tag parameter must be a quoted string"),
    (f'tag="{HERE}"', f'tag="{HERE}";tag="{HERE}"', "appears twice"),
    (f'tag="{HERE}"', f'tagx="{HERE}"', "exactly the parameters created, keyid, nonce, alg "
                                        "and tag"),
])
def test_malformed_tag(old: str, new: str, match: str) -> None:
    _denied(_edit_input(old, new), match)


@pytest.mark.parametrize("to", ["", "cn1", HERE[:-1] + "a", OTHER.node_id[3:], 42])
def test_sign_request_needs_a_node_id_as_target(to: object) -> None:
    with pytest.raises(ValueError, match="target of a signed request must be a node id"):
        _sign(to=to)  # type: ignore[arg-type]


def test_sign_request_target_is_required_and_keyword_only() -> None:
    with pytest.raises(TypeError):
        sign_request(KEY, "POST", TARGET, BODY, NOW, NONCE)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        sign_request(KEY, "POST", TARGET, BODY, NOW, NONCE, HERE)  # type: ignore[call-arg]


def test_expected_target_not_a_node_id_is_a_bug() -> None:
    with pytest.raises(ValueError, match="expected_target must be a node id"):
        _verify(_sign(), at=HERE[:-1])
    with pytest.raises(TypeError):
        verify_request("POST", TARGET, _sign(), BODY, now_ms=NOW,  # type: ignore[call-arg]
                       replay=ReplayCache(), verifier=Verifier())


# -- authorize: refused signers never reach the replay cache ------------------------------


def test_authorize_false_refuses_without_touching_the_cache() -> None:
    cache = ReplayCache()
    assert _verify(_sign(nonce="Z" * 22), replay=cache) == KEY.public_key
    seen: list[bytes] = []

    def nobody(key: bytes) -> bool:
        seen.append(key)
        return False

    h = _sign()
    _denied(h, f"request signed by a node that is not allowed here \\({KEY.node_id}\\)",
            replay=cache, authorize=nobody)
    assert seen == [KEY.public_key]
    assert len(cache) == 1
    # The nonce was not used up: once the signer is allowed, the same request passes,
    # and only then is it a replay.
    assert _verify(h, replay=cache, authorize=lambda k: True) == KEY.public_key
    assert len(cache) == 2
    _denied(h, "replay", replay=cache, authorize=lambda k: True)


def test_a_stranger_cannot_fill_the_cache_partners_need() -> None:
    cache = ReplayCache(max_entries=3)

    def partners(k: bytes) -> bool:
        return k == KEY.public_key

    for i in range(10):
        stranger = SigningKey(bytes([100 + i]) * 32)
        _denied(_sign(key=stranger), "not allowed here", replay=cache, authorize=partners)
    assert len(cache) == 0
    for i in range(3):
        assert _verify(_sign(nonce=f"{i}" * 22), replay=cache,
                       authorize=partners) == KEY.public_key
    assert len(cache) == 3


def test_authorize_true_accepts_and_is_given_the_signers_key() -> None:
    cache = ReplayCache()
    seen: list[bytes] = []

    def everyone(key: bytes) -> bool:
        seen.append(key)
        return True

    assert _verify(_sign(key=OTHER), replay=cache, authorize=everyone) == OTHER.public_key
    assert seen == [OTHER.public_key]
    assert len(cache) == 1


@pytest.mark.parametrize("answer", [None, 1, "yes", object()])
def test_authorize_anything_but_true_refuses(answer: object) -> None:
    cache = ReplayCache()
    _denied(_sign(), "not allowed here", replay=cache, authorize=lambda k: answer)
    assert len(cache) == 0


def test_authorize_is_not_asked_before_the_signature_verifies() -> None:
    asked: list[bytes] = []

    def spy(key: bytes) -> bool:
        asked.append(key)
        return True

    _denied(_sign(), "does not verify", method="GET", authorize=spy)
    _denied(_sign(), "signed for another node", at=ELSEWHERE, authorize=spy)
    _denied(_sign(), "ago, more than", now=NOW + DEFAULT_MAX_AGE_MS + 1000, authorize=spy)
    assert asked == []


def test_authorize_errors_propagate_and_leave_the_cache_alone() -> None:
    cache = ReplayCache()

    def broken(key: bytes) -> bool:
        raise RuntimeError("partner list unavailable")

    with pytest.raises(RuntimeError, match="partner list unavailable"):
        _verify(_sign(), replay=cache, authorize=broken)
    assert len(cache) == 0


# -- time window and replays ------------------------------------------------------------


def test_created_at_the_edge_of_max_age_is_accepted_one_ms_later_refused() -> None:
    created_ms = NOW // 1000 * 1000
    assert _verify(_sign(), now=created_ms + DEFAULT_MAX_AGE_MS) == KEY.public_key
    _denied(_sign(), "created 300 s ago, more than the 300 s allowed",
            now=created_ms + DEFAULT_MAX_AGE_MS + 1)
    _denied(_sign(), "created 10 s ago, more than the 5 s allowed",
            now=created_ms + 10_000, max_age_ms=5_000)


def test_future_skew() -> None:
    created_ms = NOW // 1000 * 1000
    assert _verify(_sign(), now=created_ms - MAX_FUTURE_SKEW_MS) == KEY.public_key
    _denied(_sign(), "in the future, more than the 60 s allowed",
            now=created_ms - MAX_FUTURE_SKEW_MS - 1)


def test_replayed_request_is_refused() -> None:
    cache = ReplayCache()
    h = _sign()
    assert _verify(h, replay=cache) == KEY.public_key
    _denied(h, "replay", replay=cache)
    _denied(h, "replay", replay=cache, now=NOW + 200_000)
    # A new nonce is a new request; the same nonce from another key is too.
    assert _verify(_sign(nonce="Z" * 22), replay=cache) == KEY.public_key
    assert _verify(_sign(key=OTHER), replay=cache) == OTHER.public_key
    assert len(cache) == 3


def test_replay_once_expired_is_refused_as_too_old() -> None:
    cache = ReplayCache()
    h = _sign()
    _verify(h, replay=cache)
    _denied(h, "ago, more than", replay=cache, now=NOW + DEFAULT_MAX_AGE_MS + 1000)


def test_forged_requests_never_enter_the_replay_cache() -> None:
    cache = ReplayCache()
    _denied(_sign(), "does not verify", method="GET", replay=cache)
    assert len(cache) == 0
    assert _verify(_sign(), replay=cache) == KEY.public_key


def test_max_age_longer_than_the_cache_remembers_is_a_bug() -> None:
    with pytest.raises(ValueError, match="replay cache"):
        _verify(_sign(), replay=ReplayCache(max_age_ms=1000), max_age_ms=2000)


# -- the replay cache alone -----------------------------------------------------------


def test_cache_forgets_pairs_after_expiry_and_not_before() -> None:
    c = ReplayCache(max_age_ms=1000, max_entries=10)
    c.check_and_add(b"k", "n", created_ms=0, now_ms=0)
    with pytest.raises(AccessDenied, match="replay"):
        c.check_and_add(b"k", "n", created_ms=0, now_ms=1000)  # expires at 1000, still held
    c.check_and_add(b"k", "n2", created_ms=1001, now_ms=1001)  # purges (k, n)
    assert len(c) == 1
    c.check_and_add(b"k", "n", created_ms=1001, now_ms=1001)  # accepted again
    assert len(c) == 2


def test_cache_refuses_pairs_already_expired() -> None:
    c = ReplayCache(max_age_ms=1000)
    with pytest.raises(AccessDenied, match="too old"):
        c.check_and_add(b"k", "n", created_ms=0, now_ms=1001)
    assert len(c) == 0


def test_cache_is_bounded_and_says_busy_rather_than_forgetting() -> None:
    c = ReplayCache(max_age_ms=1000, max_entries=3)
    for i in range(3):
        c.check_and_add(b"k", f"n{i}", created_ms=i * 100, now_ms=i * 100)
    with pytest.raises(AccessDenied, match="busy"):
        c.check_and_add(b"k", "n3", created_ms=300, now_ms=300)
    with pytest.raises(AccessDenied, match="replay"):  # still remembered, not forgotten
        c.check_and_add(b"k", "n0", created_ms=0, now_ms=300)
    assert len(c) == 3
    c.check_and_add(b"k", "n3", created_ms=1001, now_ms=1001)  # n0 expired at 1000
    assert len(c) == 3
    with pytest.raises(AccessDenied, match="busy"):
        c.check_and_add(b"k", "n4", created_ms=1001, now_ms=1001)
    c.check_and_add(b"k", "n4", created_ms=1201, now_ms=1201)  # n1, n2 gone
    assert len(c) == 2


def test_strangers_filling_their_cache_do_not_lock_known_keys_out() -> None:
    """Signed reads: any key may sign, and keys cost nothing to make. Strangers share a
    cache of their own; once it is full they are refused ("busy"), while known keys
    still get in, and replays are refused in both."""
    known = {b"partner"}
    c = SplitReplayCache(known.__contains__, max_age_ms=1000, max_entries=3,
                         stranger_entries=2)
    for i in range(2):
        c.check_and_add(b"stranger%d" % i, "n", created_ms=0, now_ms=0)
    with pytest.raises(AccessDenied, match="busy"):
        c.check_and_add(b"stranger9", "n", created_ms=0, now_ms=0)
    for i in range(3):
        c.check_and_add(b"partner", f"n{i}", created_ms=0, now_ms=0)
    with pytest.raises(AccessDenied, match="replay"):
        c.check_and_add(b"partner", "n0", created_ms=0, now_ms=0)
    with pytest.raises(AccessDenied, match="replay"):
        c.check_and_add(b"stranger0", "n", created_ms=0, now_ms=0)
    with pytest.raises(AccessDenied, match="busy"):  # the known keys' bound holds too
        c.check_and_add(b"partner", "n3", created_ms=0, now_ms=0)
    assert len(c) == 3
    c.check_and_add(b"stranger9", "n", created_ms=1001, now_ms=1001)  # theirs expired


def test_a_nonce_used_as_a_stranger_is_refused_once_the_key_is_known() -> None:
    """A key becomes known (its card arrives, it is added as a partner) within a
    signature's lifetime: the nonces it used as a stranger stay used."""
    known: set[bytes] = set()
    c = SplitReplayCache(known.__contains__, max_age_ms=1000)
    c.check_and_add(b"k", "n", created_ms=0, now_ms=0)
    known.add(b"k")
    with pytest.raises(AccessDenied, match="replay"):
        c.check_and_add(b"k", "n", created_ms=0, now_ms=10)
    c.check_and_add(b"k", "m", created_ms=0, now_ms=10)
    known.clear()  # and back: the known cache's nonces stay used too
    with pytest.raises(AccessDenied, match="replay"):
        c.check_and_add(b"k", "m", created_ms=0, now_ms=20)


def test_one_known_key_cannot_lock_the_other_known_keys_out() -> None:
    """Each known key holds at most its share of the known keys' cache: one that floods
    is refused ("busy") itself; the others still get in; its share frees as its pairs
    expire."""
    c = SplitReplayCache(lambda k: True, max_age_ms=1000, max_entries=10,
                         per_key_entries=3)
    for i in range(3):
        c.check_and_add(b"greedy", f"n{i}", created_ms=0, now_ms=0)
    with pytest.raises(AccessDenied, match="busy: too many recent signed requests from "
                                           "this key"):
        c.check_and_add(b"greedy", "n3", created_ms=0, now_ms=0)
    for i in range(3):
        c.check_and_add(b"other", f"n{i}", created_ms=0, now_ms=0)
    c.check_and_add(b"greedy", "n3", created_ms=1001, now_ms=1001)  # its first expired


def test_cache_expires_in_order_of_expiry_not_insertion() -> None:
    c = ReplayCache(max_age_ms=1000, max_entries=10)
    c.check_and_add(b"k", "late", created_ms=500, now_ms=500)
    c.check_and_add(b"k", "early", created_ms=0, now_ms=500)  # signed earlier, arrived later
    c.check_and_add(b"k", "x", created_ms=1200, now_ms=1200)  # "early" expired at 1000
    assert len(c) == 2
    with pytest.raises(AccessDenied, match="replay"):
        c.check_and_add(b"k", "late", created_ms=500, now_ms=1200)


@pytest.mark.parametrize("kw", [{"max_age_ms": 0}, {"max_entries": 0}])
def test_cache_parameters_must_be_positive(kw: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        ReplayCache(**kw)


# -- header syntax: what RFC 8941/9421 allow, and what we refuse -------------------------


def test_parameters_in_another_order_verify() -> None:
    params = (f'alg="ed25519";nonce="{NONCE}";tag="{HERE}";created={NOW // 1000};'
              f'keyid="{KEY.node_id}"')
    assert _verify(_resign_with(f"{COVERED};{params}")) == KEY.public_key


def test_other_signatures_and_optional_whitespace_are_tolerated() -> None:
    h = _sign()
    h["Signature-Input"] = f'  proxy=("@method");created=1,\t{h["Signature-Input"]}  '
    h["Signature"] = f'proxy=:AAAA:, {h["Signature"]}'
    h["Content-Digest"] = f'{h["Content-Digest"]}, sha-512=:AAAA:'
    # The covered content-digest value is the whole field, so it must be re-signed.
    sig_params = h["Signature-Input"].strip().split("cn=", 1)[1]
    base = signature_base("POST", TARGET, h["Content-Digest"], sig_params)
    h["Signature"] = (
        f"proxy=:AAAA:, cn=:{base64.b64encode(KEY.sign(DOMAIN_REQUEST, base)).decode()}:"
    )
    assert _verify(h) == KEY.public_key


def test_inner_list_whitespace_is_normalised_as_rfc_8941_serialises_it() -> None:
    h = _sign()
    h["Signature-Input"] = h["Signature-Input"].replace("(", "(  ").replace(")", "  )")
    h["Signature-Input"] = h["Signature-Input"].replace(";", "; ")
    assert _verify(h) == KEY.public_key


def test_unpadded_base64_signature_is_accepted() -> None:
    h = _sign()
    h["Signature"] = h["Signature"].replace("=:", ":").replace("cn:", "cn=:")
    assert "==" not in h["Signature"]
    assert _verify(h) == KEY.public_key


def _input(old: str, new: str, extra: str = "") -> str:
    """A Signature-Input value with one edit to our parameters."""
    assert old in PARAMS
    return f"cn={COVERED};{PARAMS.replace(old, new)}{extra}"


CREATED = f"created={NOW // 1000}"
ALG_Q = 'alg="ed25519"'


@pytest.mark.parametrize(
    ("header", "value", "match"),
    [
        ("Signature-Input", "cn", "must cover exactly"),
        ("Signature-Input", 'xx=("@method");created=1', "has no 'cn' signature"),
        ("Signature-Input", f'cn=("@method" "@path" "@query");{PARAMS}', "cover exactly"),
        ("Signature-Input",
         f'cn=("@method" "@query" "@path" "content-digest");{PARAMS}', "cover exactly"),
        ("Signature-Input",
         f'cn=("@method";x "@path" "@query" "content-digest");{PARAMS}', "cover exactly"),
        ("Signature-Input", f"cn=method;{PARAMS}", "cover exactly"),
        ("Signature-Input", f"cn=@method;{PARAMS}", "unexpected character"),
        ("Signature-Input", _input(CREATED, CREATED, ";expires=1"), "exactly the parameters"),
        ("Signature-Input", _input(CREATED, CREATED, f";{ALG_Q}"), "appears twice"),
        ("Signature-Input", _input(CREATED, "created=-5"), "integer >= 0"),
        ("Signature-Input", _input(CREATED, "created=1.5"), "unsupported number"),
        ("Signature-Input", _input(CREATED, "created=1234567890123456"), "unsupported number"),
        ("Signature-Input", _input(CREATED, "created=?1"), "integer >= 0"),
        ("Signature-Input", _input(CREATED, 'created="1"'), "integer >= 0"),
        ("Signature-Input", _input(ALG_Q, 'alg=ed25519"'), "malformed"),
        ("Signature-Input", _input(ALG_Q, "alg=ed25519"), "alg parameter must be a quoted"),
        ("Signature-Input", _input(ALG_Q, 'alg="a\\xb"'), "bad string"),
        ("Signature-Input", _input(ALG_Q, 'alg="a\\"b"'), "'a\"b' is not supported"),
        ("Signature-Input", _input(NONCE, "short"), "nonce must be 16 to 64"),
        ("Signature-Input", _input(NONCE, "x" * 65), "nonce must be 16 to 64"),
        ("Signature-Input", _input(CREATED, CREATED, ", "), "trailing comma"),
        ("Signature-Input", _input(CREATED, CREATED, f", cn={COVERED}"), "appears twice"),
        ("Signature-Input", _input(CREATED, CREATED, " x"), "expected ','"),
        ("Signature", "cn=:AAAA:", "64-byte"),
        ("Signature", 'cn="abc"', "64-byte"),
        ("Signature", "cn=:not base64!:", "malformed"),
        ("Signature", "cn=:A:", "bad base64"),
        ("Signature", "sig1=:AAAA:", "no 'cn' signature"),
        ("Content-Digest", "sha-512=:AAAA:", "sha-256 byte sequence"),
        ("Content-Digest", "sha-256=AAAA", "sha-256 byte sequence"),
        ("Content-Digest", "", "malformed: empty"),
        ("Content-Digest", "Sha-256=:AAAA:", "expected a key"),
    ],
)
def test_malformed_headers(header: str, value: str, match: str) -> None:
    h = _sign()
    h[header] = value
    _denied(h, match)


@pytest.mark.parametrize(("method", "target"), [("POST", "v1/sync"), ("POST", "/a b"),
                                                  ("POST", "/a\nb"), ("PO ST", "/a"),
                                                  ("POST", "/caf\u00e9")])
def test_malformed_method_or_target_received(method: str, target: str) -> None:
    _denied(_sign(), "method or target is malformed", method=method, target=target)


@pytest.mark.parametrize(
    "kw",
    [{"target": "v1"}, {"target": "/a\r\nX: y"}, {"method": "G T"}, {"nonce": "short"},
     {"nonce": "x" * 65}, {"nonce": "a+b/" * 5}, {"now": -1}],
)
def test_sign_request_refuses_what_could_never_verify(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _sign(**kw)  # type: ignore[arg-type]


# -- robustness ------------------------------------------------------------------------

_NAMES = ["Signature-Input", "signature-input", "Signature", "SIGNATURE", "Content-Digest",
          "content-digest"]
_SF_CHARS = st.sampled_from([*'"();=:, ?*-\\\t.0123456789abcn@AZ+/_', "é", "\x00"])
_VALID = _sign()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(_NAMES) | st.text(max_size=20),
                       st.text(max_size=200), max_size=6))
def test_arbitrary_headers_only_ever_raise_access_denied(headers: dict[str, str]) -> None:
    try:
        _verify(headers)
    except AccessDenied:
        return
    pytest.fail("arbitrary headers verified")


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(sorted(_VALID)),
    start=st.integers(0, 200),
    cut=st.integers(0, 8),
    insert=st.text(_SF_CHARS, max_size=8) | st.text(max_size=4),
)
def test_mutated_valid_headers_only_ever_raise_access_denied(
    name: str, start: int, cut: int, insert: str
) -> None:
    h = dict(_VALID)
    v = h[name]
    start = min(start, len(v))
    h[name] = v[:start] + insert + v[start + cut :]
    try:
        key = _verify(h)
    except AccessDenied:
        return
    # Only an edit that leaves the meaning unchanged may verify (e.g. whitespace).
    assert key == KEY.public_key


def test_claimed_signer_reads_keyid_and_window_without_the_body() -> None:
    h = _sign()
    assert claimed_signer(h, now_ms=NOW) == KEY.public_key
    with pytest.raises(AccessDenied):
        claimed_signer(h, now_ms=NOW + DEFAULT_MAX_AGE_MS + 2000)
    with pytest.raises(AccessDenied):
        claimed_signer(h, now_ms=NOW - MAX_FUTURE_SKEW_MS - 2000)
    with pytest.raises(AccessDenied):
        claimed_signer({}, now_ms=NOW)


def test_headers_read_once_serve_the_precheck_and_the_verification() -> None:
    """A server reads and parses the headers once (read_signature), pre-checks the
    claimed signer, then verifies: with the same verdicts as from the raw headers."""
    h = _sign()
    parsed = read_signature(CIMultiDict(h))
    assert claimed_signer(parsed, now_ms=NOW) == KEY.public_key
    assert _verify(parsed) == KEY.public_key  # type: ignore[arg-type]
    replay = ReplayCache()
    _verify(parsed, replay=replay)  # type: ignore[arg-type]
    _denied(parsed, "replay", replay=replay)  # type: ignore[arg-type]
    # Everything not in the parsed headers is still checked against the request.
    _denied(parsed, "Content-Digest", body=BODY + b" ")  # type: ignore[arg-type]
    _denied(parsed, "does not verify", target="/v1/sync?since=4&feed=air")  # type: ignore[arg-type]
    _denied(read_signature(_sign(to=ELSEWHERE)), "another node")  # type: ignore[arg-type]
    with pytest.raises(AccessDenied, match="missing"):
        read_signature({"Signature": h["Signature"]})
    with pytest.raises(AccessDenied, match="malformed"):
        read_signature(dict(h, **{"Signature-Input": "cn=(;"}))


@settings(max_examples=300, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32), to=st.binary(min_size=32, max_size=32),
       now=st.integers(0, 10**15), nonce=st.from_regex(r"[A-Za-z0-9_-]{16,64}", fullmatch=True),
       body=st.binary(max_size=64))
def test_fast_header_paths_read_what_the_full_parser_reads(
        seed: bytes, to: bytes, now: int, nonce: str, body: bytes) -> None:
    """The headers sign_request writes are read by a fast path: it must give exactly
    what the general RFC 8941 parser gives for them."""
    from citynode.core import httpsig as hs
    from citynode.core.keys import node_id

    h = sign_request(SigningKey(seed), "POST", TARGET, body, now, nonce, target=node_id(to))
    si = h["Signature-Input"]
    assert hs._fast_signature_input(si) == hs._parse_signature_input_in_full(si)
    assert hs._fast_bytes(hs._FAST_SIG_RE, h["Signature"]) == \
        hs._parse("Signature", h["Signature"])[hs.LABEL][0]
    assert hs._fast_bytes(hs._FAST_DIGEST_RE, h["Content-Digest"]) == \
        hs._parse("Content-Digest", h["Content-Digest"])["sha-256"][0]


@pytest.mark.parametrize("value", [
    ' cn=("@method" "@path" "@query" "content-digest");created=1;keyid="a";'
    'nonce="AAAAAAAAAAAAAAAA";alg="ed25519";tag="b"',  # a leading space: valid, not fast
    'cn=("@method" "@path" "@query" "content-digest");created=01;keyid="a";'
    'nonce="AAAAAAAAAAAAAAAA";alg="ed25519";tag="b"',  # a leading zero
    'cn=("@method" "@path" "@query" "content-digest");keyid="a";created=1;'
    'nonce="AAAAAAAAAAAAAAAA";alg="ed25519";tag="b"',  # another order
    'cn=("@method" "@path" "@query" "content-digest");created=1;keyid="a";'
    'nonce="AAAAAAAAAAAAAAAA";alg="ed25519";tag="b", x=1',  # another member
])
def test_other_forms_take_the_full_parser(value: str) -> None:
    from citynode.core import httpsig as hs

    assert hs._fast_signature_input(value) is None
