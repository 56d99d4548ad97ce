"""A database copied back by hand, or restored, is marked: the node signs nothing on its
own feeds until a partner confirms its heads (issue 16: a stale copy re-signed seqs)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from citynode.errors import PublishRefused
from citynode.node import Node
from citynode.storage import Storage
from tests.conftest import make_node_dir


def test_reopening_the_same_file_is_not_a_restore(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    Storage.open(path).close()
    st = Storage.open(path)
    try:
        assert st.restored() is None
    finally:
        st.close()


@pytest.mark.parametrize("copy", [shutil.copyfile, shutil.copy2],
                         ids=["cp", "cp-a"])  # copy2 keeps xattrs and times, like cp -a
def test_a_file_copied_back_is_marked_restored_until_cleared(
        tmp_path: Path, copy: Callable[[Path, Path], object]) -> None:
    path, backup = tmp_path / "node.db", tmp_path / "copy.db"
    Storage.open(path).close()
    copy(path, backup)
    path.unlink()
    copy(backup, path)  # a new file where the old one was (its inode may be reused)
    st = Storage.open(path)
    try:
        assert "copied back" in (st.restored() or "")
        st.clear_restored().result()
        assert st.restored() is None
    finally:
        st.close()
    st = Storage.open(path)  # the copy is now the file of record
    try:
        assert st.restored() is None
        st.mark_restored("citynode restore from backup.cnbk").result()
        assert st.restored() == "citynode restore from backup.cnbk"
    finally:
        st.close()


async def _publish_refused(d: Path, **start: bool) -> bool:
    node = Node.load(d)
    await node.start(partners=False, **start)
    try:
        await node.publish("air", "org.example.Test", [{"n": 1}])
        return False
    except PublishRefused as exc:
        assert "restored" in str(exc)
        return True
    finally:
        await node.stop()


async def test_a_restored_node_refuses_to_sign_unless_the_operator_takes_the_risk(
        tmp_path: Path) -> None:
    d = make_node_dir(tmp_path, "Jakarta")
    st = Storage.open(d / "citynode.db")
    st.mark_restored("test").result()
    st.close()
    assert await _publish_refused(d)
    assert await _publish_refused(d)  # still marked: refusing is not confirming
    assert not await _publish_refused(d, accept_fork_risk=True)
    assert not await _publish_refused(d)  # the mark is gone for good


async def test_the_operator_marks_a_rolled_back_data_dir_restored_at_start(
        tmp_path: Path) -> None:
    """`citynode run --restored`: a data dir rolled back unnoticed (a machine snapshot,
    cp -a into the same inode) is marked restored by the operator, durably, so the node
    takes back its own records partners hold and signs nothing on its own feeds until
    they confirmed (review 12b: it refused them as forgeries and re-signed their seqs)."""
    d = make_node_dir(tmp_path, "Jakarta")
    assert not await _publish_refused(d)
    assert await _publish_refused(d, rolled_back=True)
    assert await _publish_refused(d)  # kept in the database until partners confirm
    st = Storage.open(d / "citynode.db")
    try:
        assert "--restored" in (st.restored() or "")
    finally:
        st.close()
    from click.testing import CliRunner

    from citynode.cli import main
    out = CliRunner().invoke(main, ["run", "-d", str(d), "--restored", "--accept-fork-risk"])
    assert out.exit_code == 2 and "opposite" in out.output, out.output


async def test_a_node_that_held_no_own_record_takes_them_back_until_caught_up_across_restarts(
        tmp_path: Path) -> None:
    """Review M3: only a node that may lack records of its own feeds takes them back from
    partners. One whose database held none at a start (new, or lost and made again)
    does, until it has caught up (CaughtUp), also after a restart meanwhile: the mark
    is durable. Once caught up, a restart does not take them back any more."""
    from citynode.core import replica as rp
    from citynode.node.gossip import CATCHING_UP

    d = make_node_dir(tmp_path, "Quito")
    node = Node.load(d)
    await node.start(partners=False)  # no round ever ends here: not caught up
    try:
        assert node.replica.adopting
        await node.publish("air", "org.example.Test", [{"n": 1}])
    finally:
        await node.stop()
    node = Node.load(d)
    await node.start(partners=False)
    try:
        assert node.replica.adopting  # it holds a record of its own now, yet not caught up
        await node.gossip.execute([rp.CaughtUp()])
        await asyncio.wrap_future(node.storage.barrier())
        assert node.storage.get_meta(CATCHING_UP) == b""
    finally:
        await node.stop()
    node = Node.load(d)
    await node.start(partners=False)
    try:
        assert not node.replica.adopting
    finally:
        await node.stop()
