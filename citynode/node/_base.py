"""What every role of the node shares: the worker-thread hop, the feed key, the task
spawner's signature, and the bounded cache of ids recently committed."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
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
    is still being asked costs no signature verification."""

    def __init__(self, size: int = 200_000) -> None:
        self._d: OrderedDict[bytes, None] = OrderedDict()
        self._size = size

    def add(self, rid: bytes) -> None:
        self._d[rid] = None
        if len(self._d) > self._size:
            self._d.popitem(last=False)

    def __contains__(self, rid: object) -> bool:
        return rid in self._d
