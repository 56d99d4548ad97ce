"""Who may read a record, and to whom a node may pass it on. Pure decisions.

Each feed has an access level, set by its origin (in its config, announced in its
signed node card):

* ``public``: anyone may read it; any node may relay it.
* ``partners``: only the origin and the origin's partners (its card's partner list) may
  read it, and a node passes it only to them -- such records never travel beyond the
  origin's partners.
* ``restricted``: the payload is sealed to named readers (core/sealed.py). Only those
  readers (and the origin) may read records through the read API; the ciphertext may be
  relayed to any partner, since a relay can verify but not read it -- so a reader that
  is reachable only through a third city still gets them. A record of a restricted feed
  that is *not* sealed (signed before its origin restricted the feed) carries its
  payload in clear: it is held to the ``partners`` rule (:func:`for_record`).

A node's card lists every feed configured in its node.toml (and every feed it has
published); a feed it does not list is unconfigured, and unconfigured feeds are public by
the origin's own default. A node that has no card of the origin at all treats its feeds
as ``partners``: unknown never means public.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PARTNERS", "PUBLIC", "RESTRICTED", "FeedPolicy", "for_record", "may_read",
           "may_relay"]

PUBLIC = "public"
PARTNERS = "partners"
RESTRICTED = "restricted"


@dataclass(frozen=True, slots=True)
class FeedPolicy:
    """The access level of one (origin, feed) as this node knows it.

    ``origin_partners``: the origin's partners (from its card, or ours for our own feeds).
    ``readers``: for restricted feeds, the nodes the payload is sealed to.
    """

    access: str
    origin_partners: frozenset[bytes] = frozenset()
    readers: frozenset[bytes] = frozenset()


def for_record(policy: FeedPolicy, readers: frozenset[bytes] | None) -> FeedPolicy:
    """The policy that governs one record of a feed, given the recipients its payload is
    sealed to (None: not sealed).

    Only a sealed payload may go where a restricted feed's records go: a record in clear
    in a restricted feed (signed while the feed was ``partners`` or ``public``; an
    operator may change the level at any time) is held to the ``partners`` rule, or its
    plaintext would be relayed to every partner of every relay. A sealed record is
    readable by its own recipients (they alone can open it), whatever the feed's
    current list of readers says.
    """
    if policy.access != RESTRICTED:
        return policy
    if readers is None:
        return FeedPolicy(PARTNERS, policy.origin_partners)
    return FeedPolicy(RESTRICTED, policy.origin_partners, readers)


def may_read(policy: FeedPolicy, origin: bytes, caller: bytes | None) -> bool:
    """May ``caller`` (an authenticated node key, or None when anonymous) read records
    of this feed through the read API (get, query, stream, export)?"""
    if policy.access == PUBLIC:
        return True
    if caller is None:
        return False
    if caller == origin:
        return True
    if policy.access == PARTNERS:
        return caller in policy.origin_partners
    if policy.access == RESTRICTED:
        return caller in policy.readers
    return False


def may_relay(policy: FeedPolicy, origin: bytes, to: bytes) -> bool:
    """May a node push or serve records of this feed to partner ``to``?"""
    if policy.access == PARTNERS:
        return to == origin or to in policy.origin_partners
    return policy.access in (PUBLIC, RESTRICTED)
