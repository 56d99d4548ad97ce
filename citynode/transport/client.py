"""The peer client: requests from this node to its partners, over the one HTTP stack.

Every request to a partner is signed with our node key (core/httpsig.py) and sent over
TLS pinned to the certificate fingerprint from the partner's signed node card; both, and
the translation of every error into :class:`PeerError` / :class:`PeerRejected` (with the
partner's reason code), are transport/http.py's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgpack

from citynode.core import cards
from citynode.core.keys import SigningKey, Verifier
from citynode.errors import PeerError
from citynode.transport.http import (
    MAX_RESPONSE,
    MSGPACK,
    HttpClient,
    NoAuth,
    NodeSignature,
)

__all__ = [
]


class PeerClient:
    """Signed, pinned requests to one partner node."""

    def __init__(
        self,
        key: SigningKey,
        base_url: str,
        *,
        node_id: str,
        fingerprint: bytes | None,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key = key
        self.node_id = node_id  # the partner's: every request is signed for it alone
        self.base_url = base_url.rstrip("/")
        self._http = HttpClient(self.base_url, fingerprint=fingerprint,
                                auth=NodeSignature(key, node_id, clock), timeout=timeout,
                                limit=8)

    async def close(self) -> None:
        await self._http.close()

    async def request(
        self, method: str, path: str, body: bytes = b"", *, signed: bool = True,
        max_bytes: int = MAX_RESPONSE,
    ) -> bytes:
        """Send one request; return the response body (at most ``max_bytes``). Raises
        :class:`PeerRejected` for an error status (with the partner's ``status`` and
        ``reason``) and :class:`PeerError` for anything else."""
        resp = await self._http.request(method, path, body, content_type=MSGPACK,
                                        auth=None if signed else NoAuth(),
                                        max_bytes=max_bytes)
        return resp.body

    async def push(self, envelopes: list[bytes]) -> dict[str, Any]:
        """POST records; return the partner's summary (accepted, duplicates, rejected ...)."""
        out = await self.request("POST", "/v1/push", msgpack.packb(envelopes, use_bin_type=True),
                                 max_bytes=4 * 1024 * 1024)
        return _map(out, self.base_url)

    async def sync(self, frontier: bytes) -> bytes:
        """POST our frontier; return the partner's encoded frontier."""
        return await self.request("POST", "/v1/sync", frontier)

    async def fetch(self, wants: bytes) -> list[bytes]:
        """POST encoded wants; return the envelopes the partner sent (unverified)."""
        out = await self.request("POST", "/v1/fetch", wants)
        return _envelopes(out, self.base_url)

    async def cards(self) -> list[bytes]:
        """The signed node cards the partner knows (unverified)."""
        out = await self.request("GET", "/v1/cards")
        return _envelopes(out, self.base_url)


def _map(data: bytes, url: str) -> dict[str, Any]:
    try:
        v = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise PeerError(f"{url}: answer is not msgpack") from exc
    if not isinstance(v, dict):
        raise PeerError(f"{url}: answer is not a map")
    return v


def _envelopes(data: bytes, url: str) -> list[bytes]:
    try:
        v = msgpack.unpackb(data, raw=False)
    except Exception as exc:
        raise PeerError(f"{url}: answer is not msgpack") from exc
    if not isinstance(v, list) or not all(type(x) is bytes for x in v):
        raise PeerError(f"{url}: answer is not a list of envelopes")
    return v


async def fetch_card(
    url: str, expected_node_id: str, *, now_ms: int, timeout: float = 15.0
) -> cards.NodeCard:
    """Fetch and verify a node's card from ``url`` knowing only its node id.

    The first request cannot be pinned (we do not know the certificate yet), so the card
    is trusted only because it is signed by ``expected_node_id``. A second request, pinned
    to the fingerprint the card names, proves the server really holds that certificate.
    Raises :class:`PeerError` (:class:`PeerRejected` for an error status) or
    :class:`SignatureError` (card signed by another key).
    """
    base = url.rstrip("/")
    async with HttpClient(base, verify=False, timeout=timeout) as first:
        resp = await first.request("GET", "/.well-known/citynode",
                                   max_bytes=cards.CARD_LIMITS.max_bytes + 16)
    card = cards.open_card(
        resp.body, expected_node_id=expected_node_id, verifier=Verifier(), now_ms=now_ms
    )
    if base.startswith("https://"):
        async with HttpClient(base, fingerprint=card.tls, timeout=timeout) as pinned:
            await pinned.request("GET", "/healthz", accept="application/json",
                                 max_bytes=64 * 1024)
    return card
