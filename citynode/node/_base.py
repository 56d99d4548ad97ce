"""What every role of the node shares: the worker-thread hop, the feed key and the task
spawner's signature. (The ids recently committed are the replica's: core/replica.py.)"""

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
