"""`mypy --strict` (run by scripts/test) covers every module of the package.

``[tool.mypy] files`` in pyproject.toml lists what is checked. A module outside it, or
one whose errors an override silences, would never be type-checked, and nothing else
would say so: these tests do.
"""

from __future__ import annotations

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


def _silenced() -> list[str]:
    """Modules an override keeps from being reported (silent imports, ignored errors,
    no strictness)."""
    lax = {"follow_imports": "silent", "ignore_errors": True, "strict": False}
    return [m for o in _mypy().get("overrides", [])
            if any(o.get(k) == v for k, v in lax.items())
            for m in ([o["module"]] if isinstance(o["module"], str) else o["module"])]


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_every_module_is_checked() -> None:
    checked = _checked_files()
    unchecked = [_module(p) for p in sorted((ROOT / "citynode").rglob("*.py"))
                 if p not in checked]
    assert not unchecked, (
        f"not type-checked: {unchecked}; add them to [tool.mypy] files in pyproject.toml"
    )
    assert _mypy()["strict"] is True


def test_every_file_entry_matches_files() -> None:
    # A mistyped entry would check nothing, silently.
    empty = [e for e in _mypy()["files"] if not any(ROOT.glob(e))]
    assert not empty, f"[tool.mypy] files entries matching nothing: {empty}"


def test_no_module_of_ours_is_silenced() -> None:
    ours = [m for m in _silenced() if m == "citynode" or m.startswith("citynode.")]
    assert not ours, f"citynode modules whose mypy errors are silenced: {ours}"
