"""`mypy --strict` (run by scripts/test) covers every module of the package.

``[tool.mypy] files`` in pyproject.toml lists what is checked; the modules still being
rewritten are named in the one override that makes their errors silent. A module in
neither would never be type-checked, and nothing else would say so: these tests do.
"""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _mypy() -> dict[str, Any]:
    section: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    return section


def _checked_files() -> set[Path]:
    out: set[Path] = set()
    for entry in _mypy()["files"]:
        for path in ROOT.glob(entry):
            out.update(path.rglob("*.py") if path.is_dir() else [path])
    return out


def _pending() -> list[str]:
    return [m for o in _mypy().get("overrides", []) if o.get("follow_imports") == "silent"
            for m in o["module"]]


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_every_module_is_checked_or_pending() -> None:
    checked = _checked_files()
    pending = _pending()
    unchecked = [
        _module(p) for p in sorted((ROOT / "citynode").rglob("*.py"))
        if p not in checked and not any(fnmatch.fnmatchcase(_module(p), m) for m in pending)
    ]
    assert not unchecked, (
        f"not type-checked: {unchecked}; add them to [tool.mypy] files in pyproject.toml"
    )


def test_every_file_entry_matches_files() -> None:
    # A mistyped entry would check nothing, silently.
    empty = [e for e in _mypy()["files"] if not any(ROOT.glob(e))]
    assert not empty, f"[tool.mypy] files entries matching nothing: {empty}"


def test_only_citynode_modules_are_silenced_and_none_twice() -> None:
    checked = {_module(p) for p in _checked_files()}
    pending = _pending()
    assert all(m == "citynode" or m.startswith("citynode.") for m in pending), pending
    both = [m for m in pending if any(fnmatch.fnmatchcase(c, m) for c in checked)]
    assert not both, f"in [tool.mypy] files and silenced as pending: {both}"
