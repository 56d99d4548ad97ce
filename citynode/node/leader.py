"""Leadership among several ``citynode run`` processes sharing one database.

All of them serve reads, streams and partner pushes; one at a time -- the leader, which
holds the database's leadership lock (:meth:`Storage.lead`) -- runs the singleton work:
signing own records, the replica's timer (sync planning), checkpoints, retention,
bridges, sinks, alerts. The others follow: when the leader dies (its database session ends
with it), one of them takes the lock within :data:`INTERVAL_S` or so, brings its chain
heads up to what the database holds, and starts that work.

Never two signers: a process signs only while it leads, and what it signs is stored
only if it extends the chain the database holds (re-checked in the write transaction,
under the writers' lock, then the UNIQUE index on (chain, seq)). A leader cut off from
the database cannot store what it signs, so nothing it signed then leaves the process.

With SQLite there is one process; it always leads.

A client may publish (or erase, or change the key) through any process: a follower
hands the request on to the leader (:meth:`Leader.forward`), whose address the leader
writes in the database when it takes over (its own ``[node] listen`` address and TLS
certificate fingerprint, under meta key :data:`ADDRESS_KEY`). The leader's answer goes
back to the client as it is. A request already handed on is never handed on again (no
loop while the leadership moves); that, and a leader that cannot be reached, is a 503
``no_leader`` to retry (transport/api_operator.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp

from citynode.config import Config
from citynode.errors import CitynodeError, NoLeader, StorageError
from citynode.node._base import in_thread
from citynode.storage import Storage

__all__ = ["ADDRESS_KEY", "FORWARDED_HEADER", "INTERVAL_S", "Forwarded", "Leader",
           "own_address"]

log = logging.getLogger("citynode.node")

#: How often a follower tries to take the leadership, and the leader checks it holds it.
INTERVAL_S = 0.5
#: The meta row where the leader writes how the other processes reach it.
ADDRESS_KEY = "leader-address"
#: Set on a request a follower hands on to the leader: never handed on again.
FORWARDED_HEADER = "Citynode-Forwarded"
#: How long a follower waits for the leader's answer to a request it handed on (a
#: publish of 100,000 items takes a while on a loaded leader).
FORWARD_TIMEOUT_S = 120.0
#: The request headers handed on (the operator's token, the body's type, an NGSI
#: notification's context and format).
_HANDED_ON = ("Authorization", "Content-Type", "Accept", "Link", "Ngsiv2-AttrsFormat")


@dataclass(frozen=True, slots=True)
class Forwarded:
    """The leader's answer to a request a follower handed on."""

    status: int
    body: bytes
    content_type: str


def own_address(config: Config) -> str:
    """The URL at which the other processes reach this one: its ``[node] listen``
    address (``https`` unless ``[tls] enabled = false``); a wildcard host (0.0.0.0,
    ::) is this machine's name. Not ``public_url``: behind a load balancer every
    process has the same one."""
    host, port = config.node.listen_host, config.node.listen_port
    if host in ("", "0.0.0.0", "::"):
        host = socket.getfqdn()
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if config.tls.enabled else "http"
    return f"{scheme}://{host}:{port}"


class Leader:
    """Holds (or waits for) the leadership; starts and stops the singleton work."""

    def __init__(self, *, storage: Storage, gained: Callable[[], Awaitable[None]],
                 lost: Callable[[], None], address: tuple[str, bytes] | None = None
                 ) -> None:
        """``address``: this process's URL and TLS certificate fingerprint, written for
        the others while it leads (None: it is alone, SQLite)."""
        self.storage = storage
        self._gained = gained
        self._lost = lost
        self._address = address
        self._announced = False
        #: True once the takeover is done (heads read from the database): only then
        #: does this process sign.
        self.leading = False
        #: True while this process, holding the lock, brings itself up to the
        #: database: writes sent to it then are answered 503 (retry), not signed.
        self.taking_over = False
        self._session: aiohttp.ClientSession | None = None

    def readdress(self, fingerprint: bytes) -> None:
        """This process now serves another TLS certificate (``citynode tls renew
        --switch``): the address written for the others names it from the next check on
        (else a follower's hand-on, pinned to the old fingerprint, would fail)."""
        if self._address is not None and self._address[1] != fingerprint:
            self._address = (self._address[0], fingerprint)
            self._announced = False

    async def _announce(self) -> None:
        """Write where the other processes reach this one, the leader; retried at the
        next check while the database refuses (never raises)."""
        if self._address is None or self._announced:
            return
        url, fingerprint = self._address
        value = json.dumps({"url": url, "cert_sha256": fingerprint.hex()}).encode()
        try:
            await asyncio.wrap_future(self.storage.set_meta(ADDRESS_KEY, value,
                                                           durable=True))
        except StorageError as exc:
            log.warning("cannot write the leader's address yet: %s", exc)
            return
        self._announced = True

    async def leader_address(self) -> tuple[str, bytes | None]:
        """The leader's URL and TLS certificate fingerprint, as it wrote them. Raises
        :class:`NoLeader` if none did."""
        raw = await in_thread(self.storage.get_meta, ADDRESS_KEY)
        try:
            got = json.loads(raw or b"")
            url = str(got["url"])
            fp = bytes.fromhex(str(got["cert_sha256"])) if got.get("cert_sha256") else None
        except (ValueError, KeyError, TypeError):
            raise NoLeader("no process leads the processes sharing the database yet "
                           "(none has written its address): retry in a few seconds") from None
        return url, fp

    async def forward(self, method: str, path_qs: str, headers: Mapping[str, str],
                      body: bytes) -> Forwarded:
        """Hand a request this process cannot serve (it does not lead) on to the leader,
        and return its answer. Raises :class:`NoLeader` when the leader cannot be
        reached or does not answer in time (the request may or may not have been
        carried out: a publish is retried by the client, as after any lost answer)."""
        url, fp = await self.leader_address()
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_S))
        wanted = {h.lower() for h in _HANDED_ON}
        sent = {k: v for k, v in headers.items() if k.lower() in wanted}
        sent[FORWARDED_HEADER] = "1"
        try:
            # Pinned: the processes of one node serve one certificate (its data dir's).
            ssl: aiohttp.Fingerprint | bool = aiohttp.Fingerprint(fp) if fp else True
            async with self._session.request(method, url + path_qs, data=body,
                                             headers=sent, ssl=ssl) as r:
                return Forwarded(r.status, await r.read(),
                                 r.headers.get("Content-Type", "application/json"))
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            why = str(exc) or type(exc).__name__
            raise NoLeader(f"the leading process at {url} did not answer ({why}): retry "
                           "in a few seconds (if it just went down, another takes over)"
                           ) from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _take_over(self, *, at_start: bool) -> None:
        """Bring this process up to the database, then lead: ``leading`` (which lets
        this process sign, and makes the others hand writes on to it once its address
        is written) is set only when :meth:`_gained` is done, so nothing is signed
        against heads the takeover is still reading. A takeover that fails (the
        database went away again) is retried at the next check."""
        self.taking_over = True
        try:
            await self._gained()
        except CitynodeError as exc:
            self._lost()
            if at_start:
                raise  # the node does not start (as before: the caller says why)
            log.warning("taking over failed; retrying: %s", exc)
            return
        finally:
            self.taking_over = False
        self.leading = True
        log.info("took over the leadership of the processes that share the database"
                 if not at_start else "leading the processes that share the database")
        await self._announce()

    async def try_once(self) -> bool:
        """Take the leadership if it is free (at start, before anything is served)."""
        if not self.leading and await in_thread(self.storage.lead):
            await self._take_over(at_start=True)
        return self.leading

    async def run(self) -> None:
        """Keep the leadership, or wait for it, for ever (a task of the node)."""
        while True:
            held = await in_thread(self.storage.lead)
            if held and not self.leading:
                await self._take_over(at_start=False)
            elif held:
                await self._announce()
            elif not held and self.leading:
                self.leading = False
                self._announced = False
                log.error("leadership lost: signing and the other singleton work stop "
                          "here (another process takes over)")
                self._lost()
            await asyncio.sleep(INTERVAL_S)
