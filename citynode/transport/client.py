"""The peer client: the only code that makes HTTP requests to other nodes.

Every request to a partner is signed with our node key (core/httpsig.py) and sent over
TLS pinned to the certificate fingerprint from the partner's signed node card. aiohttp
and ssl errors are translated into :class:`PeerError` here, so nothing above this module
sees a library exception.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import Any

import aiohttp
import msgpack
from yarl import URL

from citynode.core import cards, httpsig
from citynode.core.keys import SigningKey, Verifier
from citynode.errors import CitynodeError, PeerError, PeerRejected

__all__ = ["MSGPACK", "PeerClient", "fetch_card"]

MSGPACK = "application/msgpack"
_MAX_RESPONSE = 64 * 1024 * 1024


async def read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole response body, refusing more than ``limit`` bytes. (StreamReader.read(n)
    returns whatever is buffered, not everything up to n: a loop is needed.)"""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await resp.content.readany()
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise PeerError(f"{resp.url}: response larger than {limit} bytes")
        chunks.append(chunk)


def _ssl_for(url: str, fingerprint: bytes | None) -> Any:
    if not url.startswith("https://"):
        return None
    if fingerprint is None:
        return True  # normal CA validation (node behind a proxy with a CA certificate)
    return aiohttp.Fingerprint(fingerprint)


# NonHttpUrlClientError is aiohttp 3.10+; with 3.9 an address without a scheme is
# InvalidURL alone.
_NOT_AN_ADDRESS: tuple[type[BaseException], ...] = tuple(
    c for c in (aiohttp.InvalidURL, getattr(aiohttp, "NonHttpUrlClientError", None))
    if c is not None
)


def translate_error(exc: BaseException, url: str) -> PeerError:
    """Our one-line :class:`PeerError` for an aiohttp / TLS / socket error."""
    if isinstance(exc, aiohttp.ServerFingerprintMismatch):
        return PeerError(
            f"{url}: TLS certificate does not match the pinned fingerprint (the partner "
            "changed its certificate, or someone is in between): re-add the partner after "
            "checking with its operators"
        )
    if isinstance(exc, aiohttp.ServerDisconnectedError) and url.startswith("http://"):
        return PeerError(f"{url}: the node closed the connection: nodes serve HTTPS unless "
                         "configured otherwise, so try https://")
    if isinstance(exc, _NOT_AN_ADDRESS):
        return PeerError(f"{url}: not a node address: give its URL, "
                         "e.g. https://citynode.example:8443")
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return PeerError(f"{url}: timed out")
    if isinstance(exc, aiohttp.ClientConnectorError | ConnectionError):
        return PeerError(f"{url}: cannot connect ({exc.__class__.__name__})")
    if isinstance(exc, ssl.SSLError | aiohttp.ClientSSLError):
        return PeerError(f"{url}: TLS failed: {exc}")
    return PeerError(f"{url}: {exc.__class__.__name__}: {exc}")


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
        clock: Any = time.time,
    ) -> None:
        self.key = key
        self.node_id = node_id  # the partner's: every request is signed for it alone
        self.base_url = base_url.rstrip("/")
        self._ssl = _ssl_for(self.base_url, fingerprint)
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(10.0, timeout))
        self._session: aiohttp.ClientSession | None = None
        self._clock = clock

    async def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=8, ssl=self._ssl),
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self, method: str, path: str, body: bytes = b"", *, signed: bool = True
    ) -> bytes:
        """Send one request; return the response body. Raises :class:`PeerRejected` for an
        error status (with the server's reason) and :class:`PeerError` for anything else."""
        # Send exactly the target we signed: no re-encoding by aiohttp/yarl.
        url = URL(self.base_url + path, encoded=True)
        headers = {"Accept": MSGPACK, "Content-Type": MSGPACK}
        if signed:
            headers.update(
                httpsig.sign_request(self.key, method, path, body, int(self._clock() * 1000),
                                     target=self.node_id)
            )
        try:
            sess = await self._sess()
            async with sess.request(method, url, data=body, headers=headers,
                                    allow_redirects=False) as resp:
                data = await read_bounded(resp, _MAX_RESPONSE)
                if resp.status >= 400:
                    reason = data[:300].decode("utf-8", "replace").strip()
                    raise PeerRejected(f"{url}: HTTP {resp.status}: {reason}", resp.status)
                return data
        except CitynodeError:
            raise
        except (TimeoutError, aiohttp.ClientError, OSError, ssl.SSLError) as exc:
            raise translate_error(exc, url) from exc

    async def push(self, envelopes: list[bytes]) -> dict[str, Any]:
        """POST records; return the partner's summary (accepted, duplicates, rejected ...)."""
        out = await self.request("POST", "/v1/push", msgpack.packb(envelopes, use_bin_type=True))
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
    Raises :class:`PeerError` or :class:`SignatureError` (card signed by another key).
    """
    base = url.rstrip("/")
    t = aiohttp.ClientTimeout(total=timeout)
    try:
        async with aiohttp.ClientSession(timeout=t) as sess:
            ssl_first: Any = False if base.startswith("https://") else None
            async with sess.get(
                base + "/.well-known/citynode", headers={"Accept": MSGPACK}, ssl=ssl_first,
                allow_redirects=False,
            ) as resp:
                body = await read_bounded(resp, cards.CARD_LIMITS.max_bytes + 16)
                if resp.status != 200:
                    raise PeerError(f"{base}: no node card (HTTP {resp.status})")
            card = cards.open_card(
                body, expected_node_id=expected_node_id, verifier=Verifier(), now_ms=now_ms
            )
            if base.startswith("https://"):
                async with sess.get(base + "/healthz", ssl=_ssl_for(base, card.tls)) as resp:
                    await resp.read()
    except CitynodeError:
        raise
    except (TimeoutError, aiohttp.ClientError, OSError, ssl.SSLError) as exc:
        raise translate_error(exc, base) from exc
    return card
