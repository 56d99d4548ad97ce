"""A publish whose feed's head moved while its records were signed (another process's
records, heard from a database shared with it, during a takeover) is answered "retry"
(503 ``no_leader``), never as a client error: nothing was stored, and a retry signs
after the new head (a fresh-check under load saw a 400 ``bad_chain`` there)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from citynode.errors import NoLeader
from tests.conftest import InProc

Make = Callable[..., Awaitable[InProc]]


async def test_a_head_moved_while_signing_is_a_retry_not_a_bad_chain(
        inproc: Make) -> None:
    a = await inproc("Jakarta")
    node = a.node
    (first,) = await node.publish("air", "org.example.Test", [{"n": 1}])
    publisher = node.publisher
    sign = publisher._sign_batch

    def sign_then_move(*args: Any, **kwargs: Any) -> Any:
        recs = sign(*args, **kwargs)
        # What another process's commit, heard meanwhile, does to the head here.
        node.replica._set_head((node.replica.me, "air"), 2, b"\x07" * 32)
        return recs

    publisher._sign_batch = sign_then_move  # type: ignore[method-assign]
    with pytest.raises(NoLeader, match="retry"):
        await node.publish("air", "org.example.Test", [{"n": 2}])
    publisher._sign_batch = sign  # type: ignore[method-assign]
    assert first.seq == 1
    # Nothing of that publish was stored (NoLeader: a PublishRefused the HTTP layer
    # answers 503 no_leader with Retry-After).
    assert node.storage.heads()[(node.replica.me, "air")][0] == 1
