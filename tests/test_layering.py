"""citynode/core/ is pure: no I/O, no clock, no event loop, no logging, no upward imports.

Every module under citynode/core/ is parsed (never imported) and checked for:

* imports of I/O, clock, concurrency or logging modules, in any form: ``import x``,
  ``import x.y``, ``from x import y``, ``from x.y import z``, ``__import__`` and importlib;
* imports of citynode modules outside the core (the core may use only
  ``citynode.core.*`` and ``citynode.errors``), relative imports included;
* reading the clock through datetime (``datetime.now``/``utcnow``/``today``,
  ``date.today``, under any alias), and the I/O builtins ``open``, ``input``, ``print``,
  plus ``eval``/``exec`` (which could hide any of the above).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "citynode" / "core"

FORBIDDEN_MODULES = frozenset({
    # from the architecture rules
    "asyncio", "aiohttp", "sqlite3", "sqlite_utils", "socket", "ssl", "time", "os",
    "pathlib", "io", "threading", "subprocess", "select", "selectors", "shutil",
    "tempfile", "urllib", "http", "requests", "signal", "multiprocessing", "concurrent",
    "logging",
    # the same spirit: dynamic imports, files, processes, networks, native code
    "importlib", "builtins", "glob", "gzip", "bz2", "lzma", "zipfile", "tarfile", "mmap",
    "fcntl", "ctypes", "sys", "socketserver", "smtplib", "ftplib", "webbrowser",
    "_thread", "sched", "queue", "click", "rich", "prometheus_client", "psycopg",
    "psycopg_pool",
})
FORBIDDEN_CALLS = frozenset({"open", "input", "print", "eval", "exec", "__import__"})
CLOCK_METHODS = frozenset({"now", "utcnow", "today"})
ALLOWED_CITYNODE = ("citynode.core", "citynode.errors")


def _resolve(module: str | None, level: int, package: str) -> str:
    """Absolute name of ``from <level dots><module> import ...`` inside ``package``."""
    if level == 0:
        return module or ""
    parts = package.split(".")
    base = parts[: len(parts) - level + 1]
    return ".".join(base + ([module] if module else []))


def _forbidden_module(name: str) -> bool:
    return name.split(".")[0] in FORBIDDEN_MODULES


def _outside_core(name: str) -> bool:
    if name != "citynode" and not name.startswith("citynode."):
        return False
    return not any(name == a or name.startswith(a + ".") for a in ALLOWED_CITYNODE)


def violations(source: str, filename: str = "<core>", package: str = "citynode.core"
               ) -> list[str]:
    """Every purity violation in ``source`` (a module of ``package``), as readable lines."""
    tree = ast.parse(source, filename)
    found: list[str] = []
    datetime_modules: set[str] = set()  # names bound to the datetime module
    datetime_classes: set[str] = set()  # names bound to datetime.datetime / datetime.date

    def bad(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{getattr(node, 'lineno', '?')}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _forbidden_module(alias.name):
                    bad(node, f"imports {alias.name}")
                if _outside_core(alias.name):
                    bad(node, f"imports {alias.name}, outside the core")
                if alias.name == "datetime":
                    datetime_modules.add(alias.asname or "datetime")
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(node.module, node.level, package)
            if _forbidden_module(mod):
                bad(node, f"imports from {mod}")
            if mod == "citynode":  # from citynode import errors / storage ...
                for alias in node.names:
                    if _outside_core(f"citynode.{alias.name}"):
                        bad(node, f"imports citynode.{alias.name}, outside the core")
            elif _outside_core(mod):
                bad(node, f"imports from {mod}, outside the core")
            if mod == "datetime":
                for alias in node.names:
                    if alias.name in ("datetime", "date"):
                        datetime_classes.add(alias.asname or alias.name)

    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == "__import__":
            bad(node, "uses __import__")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in FORBIDDEN_CALLS:
                bad(node, f"calls {node.func.id}()")
        elif isinstance(node, ast.Attribute) and node.attr in CLOCK_METHODS:
            recv = node.value
            is_class = isinstance(recv, ast.Name) and recv.id in datetime_classes
            is_module_class = (
                isinstance(recv, ast.Attribute)
                and recv.attr in ("datetime", "date")
                and isinstance(recv.value, ast.Name)
                and recv.value.id in datetime_modules
            )
            if is_class or is_module_class:
                bad(node, f"reads the clock ({ast.unparse(node)})")
    return found


def _core_modules() -> list[Path]:
    return sorted(CORE.rglob("*.py"))


def _package_of(path: Path) -> str:
    """``citynode/core/keys.py`` and ``citynode/core/__init__.py`` -> ``citynode.core``."""
    return ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])


def test_core_modules_exist() -> None:
    names = {p.name for p in _core_modules()}
    assert {"__init__.py", "encoding.py", "keys.py", "records.py", "chain.py",
            "types.py"} <= names


@pytest.mark.parametrize("path", _core_modules(), ids=lambda p: str(p.relative_to(CORE)))
def test_core_module_is_pure(path: Path) -> None:
    found = violations(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)),
                       _package_of(path))
    assert not found, "citynode/core must stay pure:\n" + "\n".join(found)


# --------------------------------------------------------------------------- the checker


@pytest.mark.parametrize(
    "source",
    [
        "import os",
        "import os.path",
        "import asyncio as aio",
        "import hashlib, socket",
        "from os import path",
        "from os.path import join",
        "from concurrent.futures import ThreadPoolExecutor",
        "from urllib.parse import quote",
        "import http.client",
        "import logging",
        "import sqlite3",
        "import sqlite_utils",
        "import time",
        "from time import monotonic",
        "import importlib\nimportlib.import_module('os')",
        "from importlib import import_module",
        "m = __import__('os')",
        "f = __import__",
        "open('x')",
        "with open('x') as f:\n    pass",
        "import builtins\nbuiltins.open('x')",
        "from builtins import open as o",
        "print('hi')",
        "eval('1')",
        "exec('import os')",
        "import datetime\ndatetime.datetime.now()",
        "import datetime as dt\nx = dt.datetime.utcnow()",
        "import datetime\ndatetime.date.today()",
        "from datetime import datetime\ndatetime.now(tz=None)",
        "from datetime import datetime as D\nD.today()",
        "from datetime import date\ndate.today()",
        "from datetime import datetime\nclock = datetime.now",
        "def f():\n    import threading\n    return threading",
        "if False:\n    import subprocess",
        "try:\n    import ssl\nexcept ImportError:\n    pass",
        "import citynode.storage",
        "from citynode import storage",
        "from citynode.transport import client",
        "from .. import node",
        "from ..storage import Storage",
        "from citynode.node import Node",
        "import sys",
    ],
)
def test_checker_catches(source: str) -> None:
    assert violations(source), f"not caught: {source!r}"


@pytest.mark.parametrize(
    "source",
    [
        "import hashlib\nimport re\nimport math",
        "from __future__ import annotations",
        "import msgpack\nimport nacl.signing",
        "from datetime import datetime, timezone\n"
        "x = datetime.fromtimestamp(0, timezone.utc)",
        "import datetime\ny = datetime.timedelta(seconds=1)",
        "from citynode.errors import EncodingError",
        "from citynode import errors",
        "from citynode.core import encoding",
        "from citynode.core.keys import SigningKey",
        "from . import encoding",
        "from .keys import SigningKey",
        "from .. import errors",
        "class Window:\n    def now(self):\n        return 1\nWindow().now()",
        "def f(opener):\n    return opener.open()",
    ],
)
def test_checker_allows(source: str) -> None:
    assert violations(source, package="citynode.core") == []


def test_checker_reports_file_and_line() -> None:
    found = violations("import hashlib\n\nimport socket\n", "citynode/core/x.py")
    assert found == ["citynode/core/x.py:3: imports socket"]


def test_relative_imports_resolve_against_the_package() -> None:
    assert _resolve("keys", 1, "citynode.core") == "citynode.core.keys"
    assert _resolve(None, 1, "citynode.core") == "citynode.core"
    assert _resolve(None, 2, "citynode.core") == "citynode"
    assert _resolve("storage", 2, "citynode.core") == "citynode.storage"
    assert _package_of(CORE / "keys.py") == "citynode.core"
    assert _package_of(CORE / "__init__.py") == "citynode.core"
