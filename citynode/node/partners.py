"""Partners: the links to the nodes this one exchanges records with, how each one is
doing (up or down, failures, invalid items sent), and the delivery of checkpoints and
proofs.

What is queued for a partner, what it holds and when to sync with it are the replica's
(core/replica.py); the gossip role carries out its actions over these links.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from citynode.config import Config
from citynode.core.cards import NodeCard
from citynode.core.keys import SigningKey, canonical_id, parse_node_id
from citynode.errors import PeerError, PeerRejected
from citynode.logs import fields
from citynode.metrics import Metrics
from citynode.node._base import Spawn, in_thread
from citynode.storage import PartnerRow, Storage
from citynode.transport.client import PeerClient

__all__ = ["PartnerLink", "Partners", "verdict_on_payload"]

log = logging.getLogger("citynode.node")

# A partner's clock this far from ours (s) is logged: time-based refusals are near.
CLOCK_WARN_S = 10


class PartnerLink:
    """A partner's connection and health while running."""

    def __init__(self, row: PartnerRow, client: PeerClient) -> None:
        self.row = row
        self.client = client
        self.key = row.public_key
        self.up = False
        self.failures = 0
        self.last_ok_ms: int | None = None
        self.last_error: str | None = None
        self.last_error_ms: int | None = None  # when last_error happened
        self.invalid: dict[str, int] = {}
        self.clock_warned: int | None = None  # the clock offset last logged

    def status(self, queued: int = 0) -> dict[str, Any]:
        return {
            "node_id": self.row.node_id,
            "name": self.row.name,
            "url": self.row.url,
            "up": self.up,
            "failures": self.failures,
            "last_ok_ms": self.last_ok_ms,
            "last_error": self.last_error,
            "last_error_ms": self.last_error_ms,
            "queue": queued,
            "invalid": dict(self.invalid),
            # The TLS certificates accepted from it (two during its renewal).
            "tls": sorted(fp.hex() for fp in self.client.pins.fingerprints)
            if self.client.pins is not None else [],
            # The partner's clock minus ours (s), from its latest answer: past
            # [limits] future_tolerance_seconds, records and requests are refused.
            "clock_offset_s": self.client.clock_offset_s,
        }


class Partners:
    """The partner links. ``on_change()`` is called when one is added or removed (the
    card and the trust policy depend on them)."""

    def __init__(self, *, config: Config, key: SigningKey, storage: Storage,
                 metrics: Metrics, clock: Callable[[], float], now_ms: Callable[[], int],
                 spawn: Spawn) -> None:
        self.config = config
        self.key = key
        self.storage = storage
        self.metrics = metrics
        self.clock = clock
        self.now_ms = now_ms
        self.spawn = spawn
        self.links: dict[bytes, PartnerLink] = {}
        self._keys: frozenset[bytes] = frozenset()
        self.on_change: Callable[[], None] = lambda: None
        # The gossip role: a link opened or closed, a round asked for, records queued.
        self.on_open: Callable[[PartnerLink], None] = lambda link: None
        self.on_close: Callable[[PartnerLink], None] = lambda link: None
        self.on_sync_now: Callable[[PartnerLink], None] = lambda link: None
        self.queued: Callable[[bytes], int] = lambda key: 0

    def keys(self) -> frozenset[bytes]:
        """The partners' public keys."""
        return self._keys

    def get(self, public_key: bytes) -> PartnerLink | None:
        return self.links.get(public_key)

    def status(self) -> list[dict[str, Any]]:
        return [link.status(self.queued(link.key)) for link in self.links.values()]

    def sync_all(self) -> int:
        """Ask every partner for a sync round now; returns how many there are."""
        for link in list(self.links.values()):
            self.on_sync_now(link)
        return len(self.links)

    # ------------------------------------------------------------------ links

    async def start(self) -> list[PartnerLink]:
        """Open a link to every stored partner."""
        return [self.open(row) for row in await in_thread(self.storage.partners)]

    def open(self, row: PartnerRow) -> PartnerLink:
        client = PeerClient(
            self.key,
            row.url,
            node_id=row.node_id,
            fingerprint=row.tls_fingerprint,
            timeout=self.config.limits.read_timeout_seconds,
            clock=self.clock,
            max_batch=self.config.limits.max_batch_records,
        )
        link = PartnerLink(row, client)
        self.links[row.public_key] = link
        self._changed()
        self.on_open(link)
        return link

    async def close(self, link: PartnerLink) -> None:
        self.on_close(link)
        await link.client.close()

    async def close_all(self) -> None:
        for link in list(self.links.values()):
            await self.close(link)

    def _changed(self) -> None:
        self._keys = frozenset(self.links)
        self.on_change()

    async def add(self, url: str, partner_id: str,
                  learn_card: Callable[[bytes, bytes], None]) -> PartnerRow:
        """Fetch and verify the card at ``url`` (must be signed by ``partner_id``), pin its
        TLS fingerprint, store the partner and start exchanging records.
        ``learn_card(card, key)`` learns the card and its key log, and raises
        (:class:`InvalidRecord` ``key_not_in_force``) if the card is signed by a key not
        in force in the log held of that node: nothing is pinned or stored then."""
        from citynode.transport.client import fetch_card

        pk = parse_node_id(partner_id)
        partner_id = canonical_id(partner_id)
        if pk == getattr(self.key, "identity", self.key.public_key):
            raise PeerError("that is this node's own id")
        card = await fetch_card(url, partner_id, now_ms=self.now_ms())
        row = PartnerRow(
            node_id=partner_id,
            public_key=pk,
            url=url.rstrip("/"),
            name=card.name,
            tls_fingerprint=card.tls,
            card=card.envelope,
            added_at=self.now_ms(),
        )
        # The card (and a cn2 partner's key log in it) before the partner can call: its
        # requests verify with the log's key in force.
        learn_card(card.envelope, pk)
        await asyncio.wrap_future(self.storage.put_partner(row))
        old = self.links.pop(pk, None)
        if old is not None:
            await self.close(old)
        self.open(row)
        return row

    def follow_card(self, card: NodeCard) -> None:
        """A newer card of ``card.node`` was kept: if it is a partner pinned by TLS
        fingerprint, pin what the card names from now on (during a renewal the
        certificate in force and the next one: ``citynode tls renew``), and keep the
        card and its certificate with the partner (what the link opens with after a
        restart). Only a card signed by the key in force in the key log held of the
        partner comes here (the policy judges it first, ``cards.judge_card_key``): a
        card signed by a key a rotation or a recovery retired -- a thief's, with the
        log of before the recovery -- never moves the pins. A card without a TLS
        fingerprint (a proxy with a CA-issued certificate) changes nothing here."""
        link = self.links.get(card.node)
        pins = link.client.pins if link is not None else None
        if link is None or pins is None or not card.tls_pins or \
                pins.fingerprints == card.tls_pins:
            return
        log.info("partner's TLS certificates pinned from its card", extra=fields(
            partner=link.row.name, tls=sorted(fp.hex() for fp in card.tls_pins)))
        pins.set(card.tls_pins)
        link.row = dataclasses.replace(link.row, tls_fingerprint=card.tls, card=card.envelope)
        self.storage.put_partner(link.row)

    async def reload(self) -> tuple[list[PartnerRow], list[PartnerRow]]:
        """Make the links match the stored partners (the table changed behind the node's
        back: a restored or edited database): open a link to each partner stored and not
        linked, or stored with another URL or certificate; close the others. Returns the
        partners (opened, closed)."""
        rows = {r.public_key: r for r in await in_thread(self.storage.partners)}
        opened: list[PartnerRow] = []
        closed: list[PartnerRow] = []
        for pk, link in list(self.links.items()):
            row = rows.get(pk)
            if row is None or (row.url, row.tls_fingerprint) != (link.row.url,
                                                                  link.row.tls_fingerprint):
                del self.links[pk]
                await self.close(link)
                closed.append(link.row)
        if closed:
            self._changed()
        for pk, row in rows.items():
            if pk not in self.links:
                self.open(row)
                opened.append(row)
        return opened, closed

    async def remove(self, partner_id: str) -> bool:
        pk = parse_node_id(partner_id)
        gone = await asyncio.wrap_future(self.storage.remove_partner(partner_id))
        link = self.links.pop(pk, None)
        if link is not None:
            await self.close(link)
        self._changed()
        return gone or link is not None

    # ------------------------------------------------------------------ health

    def mark(self, link: PartnerLink, ok: bool, err: str | None = None) -> None:
        if ok:
            link.up, link.failures, link.last_ok_ms = True, 0, self.now_ms()
        else:
            link.up, link.last_error, link.last_error_ms = False, err, self.now_ms()
            link.failures += 1
        self.metrics.partner_up.labels(link.row.name).set(1 if link.up else 0)
        self._check_clock(link)

    def _check_clock(self, link: PartnerLink) -> None:
        """Say it once (and again when it changes by as much) when this node's clock and
        a partner's differ by CLOCK_WARN_S or more: past the tolerance, records or
        requests are refused for their time, and the operator must know whose clock."""
        offset = link.client.clock_offset_s
        if offset is None or abs(offset) < CLOCK_WARN_S:
            link.clock_warned = None
            return
        if link.clock_warned is not None and abs(offset - link.clock_warned) < CLOCK_WARN_S:
            return
        link.clock_warned = offset
        tolerance = self.config.limits.future_tolerance_seconds
        log.warning(
            f"this node's clock is {abs(offset)} s {'behind' if offset > 0 else 'ahead of'} "
            f"partner {link.row.name}'s (records and requests are refused past "
            f"{tolerance} s ahead; run NTP on both)",
            extra=fields(partner=link.row.name, clock_offset_s=offset))

    # ------------------------------------------------------------------ delivery

    async def deliver(self, link: PartnerLink, path: str, payload: bytes,
                      refusals: int = 0) -> int | None:
        """POST a checkpoint or proof to a partner. Returns None when it is done with
        (taken, or refused for what it is: invalid, too large), else the refusal count
        to keep it with for after the next good round: unreachable or a 5xx (as it was),
        refused for the moment -- busy, clock skew, an origin it does not trust yet
        (one more)."""
        try:
            await link.client.request("POST", path, payload)
        except PeerRejected as exc:
            if exc.status >= 500:
                return refusals
            if not verdict_on_payload(exc):
                return refusals + 1
            return None
        except PeerError:
            return refusals
        return None

    def count_invalid(self, link: PartnerLink | None, reason: str, n: int = 1) -> str:
        """Count ``n`` items refused from ``link`` on its tally; returns its node id (or
        "local")."""
        if link is None:
            return "local"
        link.invalid[reason] = link.invalid.get(reason, 0) + n
        self.metrics.partner_invalid.labels(link.row.name, reason).inc(n)
        return link.row.node_id


# Refusals with these reason codes are about the moment, not the payload: an origin the
# partner does not trust yet (vouches travel with cards, which may come later).
_NOT_YET = frozenset({"untrusted_origin"})


def verdict_on_payload(exc: PeerRejected) -> bool:
    """Is a partner's refusal of a checkpoint or proof about the payload itself (invalid,
    too large), so that sending it again would get the same answer? Refusals about the
    moment -- busy, clock skew, a slow body, an origin it does not trust yet, a 5xx --
    are not: it is sent again. Decided on the status and the reason code the partner
    sent, never on its message text."""
    if exc.status in (413, 422):
        return True
    return exc.status == 400 and exc.reason not in _NOT_YET
