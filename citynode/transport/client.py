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
from citynode.core.encoding import Limits
from citynode.core.keys import SigningKey, Verifier
from citynode.core.reconcile import MAX_MESSAGE_BYTES
from citynode.errors import PeerError
from citynode.transport.http import (
    MAX_RESPONSE,
    MSGPACK,
    HttpClient,
    NoAuth,
    NodeSignature,
    Pins,
)

__all__ = ["PeerClient", "fetch_card"]

#: The largest envelope: a body at the protocol's limit, its signature and framing.
MAX_ENVELOPE = Limits().max_bytes + 128
#: A /v1/cards answer: the cards a node keeps of others, and its own.
MAX_CARDS_ANSWER = cards.MAX_CARDS_KEPT_BYTES + cards.CARD_LIMITS.max_bytes + 1024
#: A /v1/card-history answer: at most this many cards (a node keeps 64 of each origin).
MAX_HISTORY_CARDS = 64


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
        max_batch: int = 1000,
        local_addr: str | None = None,
    ) -> None:
        """``local_addr``: the IP address to connect from (default: the system's
        choice)."""
        self.key = key
        self.max_batch = max_batch  # envelopes accepted in one fetch answer
        self.node_id = node_id  # the partner's: every request is signed for it alone
        self.base_url = base_url.rstrip("/")
        #: The partner's TLS certificate fingerprints accepted (None: not pinned).
        self.pins = Pins([fingerprint]) if fingerprint is not None else None
        self._http = HttpClient(self.base_url, fingerprint=self.pins,
                                auth=NodeSignature(key, node_id, clock), timeout=timeout,
                                limit=8, clock=clock, local_addr=local_addr)

    @property
    def clock_offset_s(self) -> int | None:
        """The partner's clock minus ours, in whole seconds (its latest answer's Date)."""
        return self._http.clock_offset_s

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

    async def reconcile(self, message: bytes) -> bytes:
        """POST a reconciliation message (core/reconcile.py); return the partner's answer
        (unverified, at most one message's bound)."""
        return await self.request("POST", "/v1/reconcile", message,
                                  max_bytes=MAX_MESSAGE_BYTES)

    async def fetch(self, wants: bytes) -> list[bytes]:
        """POST encoded wants; return the envelopes the partner sent (unverified): at
        most ``max_batch`` of at most a record's size each, or PeerError."""
        out = await self.request("POST", "/v1/fetch", wants,
                                 max_bytes=self.max_batch * (MAX_ENVELOPE + 8) + 16)
        return _envelopes(out, self.base_url, self.max_batch, MAX_ENVELOPE)

    async def cards(self) -> list[bytes]:
        """The signed node cards the partner knows (unverified), bounded as a node keeps
        them: at most MAX_CARDS (+ its own) of at most a card's size."""
        out = await self.request("GET", "/v1/cards", max_bytes=MAX_CARDS_ANSWER)
        return _envelopes(out, self.base_url, cards.MAX_CARDS_KEPT + 1,
                          cards.CARD_LIMITS.max_bytes)

    async def key_log(self, origin_id: str) -> bytes:
        """The key log the partner holds of the ``cn2`` id ``origin_id`` (its wire bytes,
        unverified, at most a log's size). PeerRejected (404) if it holds none."""
        from citynode.core.keylog import MAX_LOG_BYTES

        return await self.request("GET", f"/v1/keylog?origin={origin_id}", signed=False,
                                  max_bytes=MAX_LOG_BYTES + 16)

    async def offer_key_log(self, origin_id: str, log: bytes) -> dict[str, Any]:
        """POST a key log of ``origin_id`` (ours, after a rotation or a recovery): the
        partner verifies it from the id alone. Returns its decision."""
        out = await self.request("POST", f"/v1/keylog?origin={origin_id}", log,
                                 signed=True)
        return _map(out, self.base_url)

    async def card_history(self, origin_id: str) -> list[bytes]:
        """The cards the partner holds of ``origin_id`` (its card history, oldest first),
        unverified: at most MAX_HISTORY_CARDS of at most a card's size each, and no more
        bytes in all than a /v1/cards answer. PeerRejected (404) if the partner holds
        nothing of that origin it lets us list; PeerError otherwise."""
        out = await self.request("GET", f"/v1/card-history?origin={origin_id}",
                                 max_bytes=MAX_CARDS_ANSWER)
        return _envelopes(out, self.base_url, MAX_HISTORY_CARDS, cards.CARD_LIMITS.max_bytes)


def _map(data: bytes, url: str) -> dict[str, Any]:
    try:
        v = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise PeerError(f"{url}: answer is not msgpack") from exc
    if not isinstance(v, dict):
        raise PeerError(f"{url}: answer is not a map")
    return v


def _envelopes(data: bytes, url: str, max_items: int, max_item_bytes: int) -> list[bytes]:
    """A msgpack array of at most ``max_items`` byte strings of at most ``max_item_bytes``
    each; PeerError otherwise. (A few MB of empty byte strings would otherwise be
    millions of items for the node to refuse one by one.)"""
    try:
        v = msgpack.unpackb(data, raw=False, max_array_len=max_items,
                            max_bin_len=max_item_bytes, max_map_len=0, max_str_len=0,
                            max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types, over a bound too
        raise PeerError(f"{url}: answer is not a msgpack array of at most {max_items} "
                        "envelopes") from exc
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
        pins = Pins(card.tls_pins) if card.tls_pins else None
        async with HttpClient(base, fingerprint=pins, timeout=timeout) as pinned:
            await pinned.request("GET", "/healthz", accept="application/json",
                                 max_bytes=64 * 1024)
    return card
