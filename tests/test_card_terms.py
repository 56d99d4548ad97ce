"""Issue 13, terms bound to the data: a node signs a new card only when what it states
changes (not at every start), and its card history never loses the card in force for a
record it holds."""

from __future__ import annotations

from pathlib import Path

from citynode.node import Node
from tests.conftest import make_node_dir


def _write(d: Path, extra: str) -> None:
    text = (d / "node.toml").read_text()
    (d / "node.toml").write_text(text + extra)


async def _card_after_start(d: Path) -> tuple[bytes, int]:
    """Start the node in ``d``, and return its card envelope and how many cards of its
    own its card history holds."""
    node = Node.load(d)
    await node.start(partners=False)
    try:
        env = node.policy.card().envelope
        node.policy.partners_changed()  # a partner round-trip that changes nothing
        assert node.policy.card().envelope == env
        # One writer, in order: once this is written, the card history write is too.
        node.storage.set_meta("test:barrier", b"").result(10)
        return env, len(node.storage.card_history(node.policy.public_key))
    finally:
        await node.stop()


async def test_a_restart_reuses_the_card_and_a_change_signs_a_new_one(tmp_path: Path
                                                                      ) -> None:
    d = make_node_dir(tmp_path, "Jakarta")
    _write(d, '\n[feeds.air]\naccess = "public"\nlicense = "CC-BY-4.0"\n')
    first, n = await _card_after_start(d)
    assert n == 1
    for _ in range(3):
        assert await _card_after_start(d) == (first, 1)
    text = (d / "node.toml").read_text()
    (d / "node.toml").write_text(text.replace("CC-BY-4.0", "ODbL-1.0"))
    second, n = await _card_after_start(d)
    assert second != first and n == 2
    assert await _card_after_start(d) == (second, 2)
