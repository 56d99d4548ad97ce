"""The key logs a node holds: at most one per identity, replaced only as
:func:`keylog.compare_logs` decides (docs/PROTOCOL.md, "Two logs of one identity").

A node asks this book three questions: the key state of an origin (to verify its
version 3 records, :func:`citynode.core.records.check_key`), the key that signs an
identity's cards, requests and checkpoints now (its current key; for a ``cn1`` id, the
id's own key), and how to print an identity (``cn2`` if a log is held, else ``cn1``).
It is the one place that knows which 32-byte values are identities: whoever prints
ids passes its book (:class:`Names`); nothing is remembered per process.

A ``cn1`` identity has no log: its 32 bytes are its key. A ``cn2`` identity ``D`` is a
hash, so nobody can sign under it as if it were a key: treating an identity whose log
is not held as a key is safe (its signatures simply never verify).

Pure: no I/O, no clock (``now_ms`` is a parameter).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from citynode.core import keylog
from citynode.core.keys import Verifier, node_id

__all__ = ["CN1_NAMES", "HeldLog", "KeyBook", "Names"]


class Names(Protocol):
    """How a caller prints 32-byte values it cannot tell apart itself: an identity
    (:meth:`name`) and the holder of a signing key (:meth:`holder_name`). A
    :class:`KeyBook` is one; :data:`CN1_NAMES` knows no identity."""

    def name(self, identity: bytes) -> str: ...

    def holder_name(self, key: bytes) -> str: ...


class _Cn1Names:
    """Names knowing no ``cn2`` identity: every value printed as a ``cn1`` id."""

    def name(self, identity: bytes) -> str:
        return node_id(identity)

    def holder_name(self, key: bytes) -> str:
        return node_id(key)


#: Names for a caller holding no key log.
CN1_NAMES: Names = _Cn1Names()


@dataclass(frozen=True, slots=True)
class HeldLog:
    """One identity's log as held: its folded state, its events, and the equivocation
    proof kept if the identity forked or died."""

    state: keylog.KeyState
    events: tuple[keylog.KeyEvent, ...]
    proof: keylog.EquivocationProof | None = None

    @property
    def wire(self) -> bytes:
        """The log's wire bytes (``keylog.encode_log``)."""
        return keylog.encode_log(self.events)


class KeyBook:
    """Identity -> :class:`HeldLog`. Not thread-safe: one owner (the node's event loop).

    Logs are *pinned* (partners', stored ones, any offered without ``transient``: kept
    until replaced) or *transient* (strangers', learnt from a signed read or an offer:
    at most ``max_transient``, the least recently used dropped first). A transient
    offer never displaces a pinned log, and a pinned offer of a transient identity pins
    it, so strangers cannot push partners or granted readers out."""

    __slots__ = ("_held", "_owner", "_transient", "max_transient")

    def __init__(self, max_transient: int = 10_000) -> None:
        self._held: dict[bytes, HeldLog] = {}
        self._owner: dict[bytes, bytes] = {}  # signing key -> identity, over every log
        self._transient: OrderedDict[bytes, None] = OrderedDict()  # LRU order
        self.max_transient = max_transient

    def _hold(self, identity: bytes, held: HeldLog) -> None:
        self._held[identity] = held
        for w in held.state.keys:
            self._owner[w.key] = identity

    def _forget(self, identity: bytes) -> None:
        held = self._held.pop(identity)
        for w in held.state.keys:
            if self._owner.get(w.key) == identity:
                del self._owner[w.key]

    def pinned(self, identity: bytes) -> bool:
        """Whether a log of ``identity`` is held and pinned (not transient)."""
        return identity in self._held and identity not in self._transient

    def owner(self, key: bytes) -> bytes:
        """The identity whose held log names ``key`` as a signing key, else ``key``
        itself (a cn1 node's key is its identity)."""
        return self._owner.get(key, key)

    def __contains__(self, identity: bytes) -> bool:
        return identity in self._held

    def __len__(self) -> int:
        return len(self._held)

    def identities(self) -> list[bytes]:
        """Every identity whose log is held."""
        return list(self._held)

    def held(self, identity: bytes) -> HeldLog | None:
        """The log held of ``identity``, or None."""
        return self._held.get(identity)

    def state(self, identity: bytes) -> keylog.KeyState | None:
        """The key state of ``identity`` (None: no log held). Fits
        :data:`citynode.core.records.KeyStates`."""
        h = self._held.get(identity)
        return None if h is None else h.state

    def current_key(self, identity: bytes) -> bytes:
        """The key that signs for ``identity`` now: its log's current key, or the
        identity itself when no log is held (a ``cn1`` id is its key). A transient log
        asked for is used: it is dropped last."""
        h = self._held.get(identity)
        if h is None:
            return identity
        if identity in self._transient:
            self._transient.move_to_end(identity)
        return h.state.key

    def name(self, identity: bytes) -> str:
        """The printable id: ``cn2`` when a log is held, else ``cn1``."""
        return keylog.identity_id(identity) if identity in self._held else node_id(identity)

    def holder_name(self, key: bytes) -> str:
        """The printable id of the node holding signing key ``key`` (a sealed record's
        recipient): the ``cn2`` id of the identity whose held log names it, else the
        ``cn1`` id of the key."""
        return self.name(self.owner(key))

    def offer(self, identity: bytes, log: bytes | Sequence[bytes], *, verifier: Verifier,
              now_ms: int | None = None, transient: bool = False) -> keylog.LogDecision:
        """Verify ``log`` from ``identity`` alone and decide it against the held log.

        Returns the :class:`keylog.LogDecision`; the book holds the received log when
        the decision ``accept``\\ s it (or when none was held), and keeps the proof and
        the dead state of a ``dead`` one. A refused log (``decision.error`` set) changes
        nothing, so it never stops records valid under the held log.
        ``transient``: a stranger's log (see the class): held in the bounded LRU unless
        the identity is pinned already. Without it, the identity is pinned.
        Raises :class:`InvalidRecord` (or a subclass) if the log does not verify.
        """
        state, events = keylog.verified_events(identity, log, verifier=verifier,
                                               now_ms=now_ms)
        held = self._held.get(identity)
        if not transient:
            self._transient.pop(identity, None)
        elif held is None or identity in self._transient:
            self._transient[identity] = None
            self._transient.move_to_end(identity)
        if held is None:
            self._hold(identity, HeldLog(state, tuple(events)))
            while len(self._transient) > self.max_transient:
                self._forget(self._transient.popitem(last=False)[0])
            return keylog.LogDecision("extends", state)
        decision = keylog.compare_logs(held.events, events, held_state=held.state,
                                       received_state=state)
        if decision.accept:
            self._hold(identity, HeldLog(decision.state, tuple(events), held.proof))
        elif decision.outcome == "dead":
            self._hold(identity, HeldLog(decision.state, held.events, decision.proof))
        elif decision.outcome == "key-fork" and held.proof is None:
            self._hold(identity, HeldLog(held.state, held.events, decision.proof))
        return decision

    def restore(self, identity: bytes, log: bytes, *, verifier: Verifier) -> None:
        """Hold ``log`` as stored by this node earlier (verified again, no clock),
        pinned. Raises :class:`InvalidRecord` if it does not verify."""
        state, events = keylog.verified_events(identity, log, verifier=verifier)
        self._transient.pop(identity, None)
        self._hold(identity, HeldLog(state, tuple(events)))

