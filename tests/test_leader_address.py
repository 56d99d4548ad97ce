"""The address a leading process writes for the others follows its TLS certificate."""
from __future__ import annotations

from pathlib import Path

from citynode.node.leader import Leader
from citynode.storage import Storage


async def _nothing() -> None:
    return None


async def test_a_tls_switch_rewrites_the_leaders_address_with_the_new_fingerprint(
        tmp_path: Path) -> None:
    st = Storage.open(tmp_path / "node.db")
    try:
        leader = Leader(storage=st, gained=_nothing, lost=lambda: None,
                        address=("https://127.0.0.1:8443", b"\x01" * 32))
        await leader._announce()
        assert await leader.leader_address() == ("https://127.0.0.1:8443", b"\x01" * 32)
        leader.readdress(b"\x02" * 32)
        await leader._announce()  # what the next check of Leader.run does
        assert await leader.leader_address() == ("https://127.0.0.1:8443", b"\x02" * 32)
    finally:
        st.close()


def test_a_process_alone_has_no_address_to_rewrite(tmp_path: Path) -> None:
    st = Storage.open(tmp_path / "node.db")
    try:
        leader = Leader(storage=st, gained=_nothing, lost=lambda: None)
        leader.readdress(b"\x02" * 32)
        assert leader._address is None
    finally:
        st.close()
