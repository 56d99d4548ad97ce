"""`citynode key rotate` names only heads this node signed and stored (review M3): a key
event fixes its heads for good, so a head that came from anywhere else (a stolen key's
record) would make a later recovery naming the true head impossible (heads_regress)."""

from __future__ import annotations

from pathlib import Path

import pytest

from citynode.core import keylog
from citynode.core.keys import Verifier
from citynode.core.records import sign_record
from citynode.errors import ConfigError
from citynode.node import Node
from tests.conftest import make_node_dir


async def test_rotate_refuses_a_head_its_database_does_not_hold(tmp_path: Path) -> None:
    d = make_node_dir(tmp_path, "Lima", next_key_on_disk=True)
    node = Node.load(d)
    await node.start(partners=False)
    try:
        ours = await node.publish("air", "org.example.Test", [{"n": 1}, {"n": 2}])
        me = node.public_key
        # A head at seq 3 signed with the node's key elsewhere, in memory only.
        forged = sign_record(node.keychanges.key, feed="air", seq=3, prev=ours[-1].id,
                             time_ms=ours[-1].time - 1000, type="org.example.Test",
                             data={"n": -3})
        node.replica.load({(me, "air"): (3, forged.id)})
        with pytest.raises(ConfigError) as err:
            await node.keychanges.rotate()
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith("not rotating: the head of own feed 'air'")
        assert "citynode key recover" in msg
        # Its own head: the rotation names it.
        node.replica.load({(me, "air"): (2, ours[-1].id)})
        out = await node.keychanges.rotate()
        st = keylog.verify_log(me, node.keychanges.key.log or b"", verifier=Verifier())
        assert out["seq"] == st.seq == 1
        assert st.established["air"] == keylog.Head(2, ours[-1].id)
    finally:
        await node.stop()
