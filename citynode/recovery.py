"""A recovery signed away from the node: the recovery secret never enters the node's
process nor crosses its API.

A node whose key was stolen may still be watched, and whoever captures the recovery key
can sign a second recovery: two uses of one recovery key kill the identity for good
(docs/PROTOCOL.md, "Key events and witnesses"). So a recovery takes three steps:

1. ``citynode key recover-prepare`` on the node: the node makes the new signing key and
   next key (kept in ``DIR/recovery.pending``) and writes a **request**: the node id,
   its key log (public), the last good head (seq, record id) of each feed named, the
   feeds dropped, the new public key and the commitment to the new next key.
2. ``citynode key recover-sign`` on any machine holding the recovery file (no data dir,
   no network): checks the request against the key log it carries and the recovery
   file's identity, shows what it is about to sign, and writes the signed recovery
   **event**, made with the very function the node would use
   (:func:`citynode.core.keylog.recover_committed`).
3. ``citynode key recover --event`` on the node: verifies the event against the log it
   holds and the keys it prepared, then applies it.

A recovery key signs ONE event. An event signed and not yet applied is in no key log, so
the log a request carries cannot show it; ``recover-sign`` therefore keeps a used-marker
beside the recovery file (``FILE.signed``, the event itself, on disk before the event is
given out) and signs nothing else with that file (:func:`signed_for`). A phrase on paper
carries no marker: whoever signs with it must sign once.

Both files are small JSON documents (``kind``, ``version`` 1); the event inside is the
key event of docs/PROTOCOL.md, byte for byte. This module holds their formats and the
signing step; it does no I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from citynode.core import keylog
from citynode.core.keylog import Head, KeyEvent, KeyState
from citynode.core.keys import SigningKey, Verifier
from citynode.core.records import MAX_SEQ, check_feed_name
from citynode.errors import CitynodeError, ConfigError, InvalidNodeId, InvalidRecord, KeyFileError

__all__ = [
    "EVENT_KIND",
    "MAX_FILE_BYTES",
    "REQUEST_KIND",
    "RecoveryRequest",
    "describe",
    "encode_event",
    "parse_event",
    "sign_request",
    "signed_for",
]

REQUEST_KIND = "citynode-recovery-request"
EVENT_KIND = "citynode-recovery-event"
FORMAT_VERSION = 1
#: A request carries a key log (at most keylog.MAX_LOG_BYTES) in base64, and heads.
MAX_FILE_BYTES = 4 * 1024 * 1024


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise KeyFileError(f"{what} is not base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFileError(f"{what} is not base64 text") from exc


def _hex32(value: object, what: str) -> bytes:
    try:
        out = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        out = b""
    if len(out) != 32:
        raise KeyFileError(f"{what} is not 64 hex digits")
    return out


def _load(data: bytes, kind: str, fields: set[str], what: str) -> dict[str, Any]:
    """The JSON object of a request or event file: its ``kind``, ``version`` 1 and
    exactly ``fields``. Raises :class:`KeyFileError`."""
    if len(data) > MAX_FILE_BYTES:
        raise KeyFileError(f"{what} is larger than {MAX_FILE_BYTES} bytes: not a {kind}")
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{what} is not JSON: not a {kind} file") from exc
    if not isinstance(obj, dict) or obj.get("kind") != kind:
        found = obj.get("kind") if isinstance(obj, dict) else None
        hint = (" (a recovery request: sign it first with `citynode key recover-sign`)"
                if found == REQUEST_KIND else " (a signed recovery event: give it to "
                "`citynode key recover --event` on the node)" if found == EVENT_KIND else "")
        raise KeyFileError(f"{what} is not a {kind} file{hint}")
    if obj.get("version") != FORMAT_VERSION or type(obj.get("version")) is not int:
        raise KeyFileError(f"{what}: version {obj.get('version')!r} is not known here "
                           f"(this citynode reads version {FORMAT_VERSION})")
    got = set(obj) - {"kind", "version"}
    if got != fields:
        diff = sorted(got ^ fields)
        raise KeyFileError(f"{what}: field(s) {', '.join(diff)} missing or unknown")
    return obj


@dataclass(frozen=True, slots=True)
class RecoveryRequest:
    """What the node asks the recovery key to sign (step 1 of the module docstring)."""

    identity: bytes
    log: bytes  # the node's key log, wire form (public)
    heads: dict[str, Head]  # feed -> last good record
    drop_feeds: tuple[str, ...]  # own feeds on which the old key keeps nothing
    key: bytes  # the new signing key (public)
    next: bytes  # commitment to the new next key
    made: int  # when the node made it (ms, the node's clock): shown only

    @property
    def node_id(self) -> str:
        return keylog.identity_id(self.identity)

    def encode(self) -> bytes:
        """The request file's bytes (JSON)."""
        return (json.dumps({
            "kind": REQUEST_KIND, "version": FORMAT_VERSION, "node_id": self.node_id,
            "keylog": _b64(self.log),
            "heads": {f: {"seq": h.seq, "id": h.id.hex()} for f, h in sorted(self.heads.items())},
            "drop_feeds": list(self.drop_feeds), "key": self.key.hex(),
            "next": self.next.hex(), "made": self.made,
        }, indent=1) + "\n").encode("utf-8")

    @classmethod
    def parse(cls, data: bytes, what: str = "the recovery request") -> RecoveryRequest:
        """A request file, every field checked for form (whether it fits the key log is
        :func:`sign_request`'s question). Raises :class:`KeyFileError`."""
        obj = _load(data, REQUEST_KIND, {"node_id", "keylog", "heads", "drop_feeds", "key",
                                         "next", "made"}, what)
        try:
            identity = keylog.parse_identity_id(obj["node_id"])
        except InvalidNodeId as exc:
            raise KeyFileError(f"{what}: node_id: {exc}") from exc
        log = _unb64(obj["keylog"], f"{what}: keylog")
        raw_heads, drops, made = obj["heads"], obj["drop_feeds"], obj["made"]
        if not isinstance(raw_heads, dict) or len(raw_heads) > keylog.MAX_HEAD_FEEDS:
            raise KeyFileError(f"{what}: heads is not an object of at most "
                               f"{keylog.MAX_HEAD_FEEDS} feeds")
        if (not isinstance(drops, list) or len(drops) > keylog.MAX_HEAD_FEEDS
                or not all(isinstance(f, str) for f in drops)):
            raise KeyFileError(f"{what}: drop_feeds is not a list of feed names")
        heads: dict[str, Head] = {}
        try:
            for feed in [*raw_heads, *drops]:
                check_feed_name(feed)
        except InvalidRecord as exc:
            raise KeyFileError(f"{what}: {exc}") from exc
        for feed, h in raw_heads.items():
            seq = h.get("seq") if isinstance(h, dict) else None
            if type(seq) is not int or not 1 <= seq <= MAX_SEQ or set(h) != {"seq", "id"}:
                raise KeyFileError(f"{what}: head of {feed!r} is not {{\"seq\": n >= 1, "
                                   "\"id\": hex}")
            heads[feed] = Head(seq, _hex32(h["id"], f"{what}: head of {feed!r}: id"))
        if type(made) is not int or made < 0:
            raise KeyFileError(f"{what}: made is not a time in ms")
        return cls(identity, log, heads, tuple(drops), _hex32(obj["key"], f"{what}: key"),
                   _hex32(obj["next"], f"{what}: next"), made)


def sign_request(req: RecoveryRequest, recovery_identity: bytes, recovery_seed: bytes,
                 next_recovery_key: bytes, now_ms: int) -> tuple[KeyEvent, KeyState]:
    """The recovery event for ``req``, signed with the recovery key ``recovery_seed``
    of ``recovery_identity`` (the identity its file names), committing to
    ``next_recovery_key``; and the state of the request's key log it follows. Checks
    first that the file recovers the request's node, that the log verifies from that
    identity alone, and that the log commits to this recovery key; dated ``now_ms``
    (or the log's last event, if later). Raises :class:`ConfigError` saying what does
    not fit."""
    if recovery_identity != req.identity:
        raise ConfigError(f"the recovery file recovers {keylog.identity_id(recovery_identity)}"
                          f", but the request is from {req.node_id}: give the recovery "
                          "file of that node")
    try:
        state = keylog.verify_log(req.identity, req.log, verifier=Verifier())
    except CitynodeError as exc:
        raise ConfigError(f"the request's key log does not verify from {req.node_id}: {exc}"
                          " (the request was altered, or is not from that node)") from exc
    if state.dead:
        raise ConfigError(f"{req.node_id} is dead (its recovery key was used twice): no "
                          "recovery can take it back")
    q = SigningKey(recovery_seed)
    if q.public_key in state.revealed:
        raise ConfigError("this recovery key was used already by a recovery in the "
                          "request's key log: use the recovery file that recovery made")
    if keylog.commit_key(q.public_key) != state.recovery:
        raise ConfigError(f"this recovery key is not the one the key log of {req.node_id} "
                          f"commits to (at key event {state.seq}): an older recovery file?")
    try:
        ev = keylog.recover_committed(state, q, req.key, req.next, next_recovery_key,
                                      max(now_ms, state.time), req.heads)
    except InvalidRecord as exc:
        raise ConfigError(f"the request cannot be signed: {exc} ({exc.reason})") from exc
    return ev, state


def describe(req: RecoveryRequest, state: KeyState, next_recovery: str) -> list[str]:
    """What signing ``req`` means, for the operator to read before it is signed."""
    lines = [f"node            {req.node_id}",
             f"key log         key event {state.seq}; key in force {state.key.hex()} "
             "(retired by this recovery)"]
    for feed, h in sorted(req.heads.items()):
        lines.append(f"keep            {feed} up to seq {h.seq} (record {h.id.hex()}); "
                     "anything the old key signed after it becomes invalid")
    for feed in req.drop_feeds:
        lines.append(f"drop            {feed}: nothing the old key signed there is kept")
    lines += ["other feeds     nothing the old key signed is kept",
              f"new key         {req.key.hex()}",
              f"next key        committed to (digest {req.next.hex()})",
              f"next recovery   {next_recovery}"]
    return lines


def encode_event(event: KeyEvent, identity: bytes) -> bytes:
    """The event file's bytes (JSON) for a signed recovery ``event`` of ``identity``."""
    return (json.dumps({"kind": EVENT_KIND, "version": FORMAT_VERSION,
                        "node_id": keylog.identity_id(identity), "seq": event.seq,
                        "event": _b64(event.envelope)}, indent=1) + "\n").encode("utf-8")


def parse_event(data: bytes, what: str = "the recovery event") -> tuple[bytes, bytes]:
    """``(identity, key event envelope)`` of an event file, checked for form only (the
    node verifies the event against the log it holds). Raises :class:`KeyFileError`."""
    obj = _load(data, EVENT_KIND, {"node_id", "seq", "event"}, what)
    try:
        identity = keylog.parse_identity_id(obj["node_id"])
    except InvalidNodeId as exc:
        raise KeyFileError(f"{what}: node_id: {exc}") from exc
    env = _unb64(obj["event"], f"{what}: event")
    if len(env) > keylog.MAX_EVENT_BYTES + 128:
        raise KeyFileError(f"{what}: the event is larger than a key event can be")
    return identity, env


def signed_for(req: RecoveryRequest, envelope: bytes) -> bool | None:
    """What the recovery event ``envelope`` (a used-marker's: the recovery key signed
    it already) is to ``req``: True when it is the event for this very request (the
    same identity, place in the key log, keys and heads: giving it out again is safe);
    None when the request's key log holds it already (applied: the key is used up,
    :func:`sign_request` says so); False when it is another event (signing ``req``
    would make a second one). Raises :class:`ConfigError` when the marker holds no
    key event or the request's log does not verify."""
    try:
        ev = keylog.open_event(envelope, verifier=Verifier())
        state = keylog.verify_log(req.identity, req.log, verifier=Verifier())
    except CitynodeError as exc:
        raise ConfigError(f"the used-marker or the request does not verify: {exc}") from exc
    if envelope in keylog.decode_log(req.log):
        return None
    return (ev.type == "recovery" and ev.identity == req.identity
            and ev.seq == state.seq + 1 and ev.prev == state.head_id
            and ev.key == req.key and ev.next == req.next and dict(ev.heads) == req.heads)
