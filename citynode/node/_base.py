"""What every role of the node shares: the worker-thread hop, the feed key, the task
spawner's signature, and the bounded cache of ids recently committed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
FeedKey = tuple[bytes, str]
#: ``spawn(coro, name)``: start a background task owned by the node (see Node.spawn).
Spawn = Callable[[Coroutine[Any, Any, Any], str], "asyncio.Task[Any]"]


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking call (a storage read, a batch of signature checks) in a worker
    thread, so the event loop never waits on SQLite or PyNaCl."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


class RecentIds:
    """A bounded set of ids recently committed, so a duplicate arriving while the database
    is still being asked costs no signature verification.

    Two generations of plain sets, at most ``size`` ids in all: when the young one is
    full the old one is dropped whole. Half the memory of an ordered dict (no links, no
    values), O(1) per id, and an id stays for at least ``size // 2`` additions."""

    __slots__ = ("_half", "_old", "_young")

    def __init__(self, size: int = 200_000) -> None:
        self._young: set[bytes] = set()
        self._old: set[bytes] = set()
        self._half = max(1, size // 2)

    def add(self, rid: bytes) -> None:
        if len(self._young) >= self._half:
            self._old, self._young = self._young, set()
        self._young.add(rid)

    def __contains__(self, rid: object) -> bool:
        return rid in self._young or rid in self._old

    def __len__(self) -> int:
        return len(self._young) + len(self._old)
