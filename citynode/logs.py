"""Structured logging: JSON lines when stderr is not a terminal, short text when it is.

Log calls pass facts as ``extra={"fields": {...}}``; the formatter puts them in the JSON
object. Nothing secret is ever passed (tokens, keys, passphrases) -- callers log node ids
and fingerprints only.
"""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["JsonFormatter", "fields", "setup_cli_logging", "setup_logging"]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, msg, and any ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            out.update(extra)
        if record.exc_info and record.exc_info[0] is not None:
            out["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} "
        base += f"{record.levelname.lower():7} {record.getMessage()}"
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict) and extra:
            base += "  " + " ".join(f"{k}={v}" for k, v in extra.items())
        return base


def fields(**kw: object) -> dict[str, dict[str, object]]:
    """``extra=`` argument for a log call carrying structured fields."""
    return {"fields": kw}


def setup_logging(level: str = "info", fmt: str = "auto") -> None:
    """Configure the root logger once for a ``citynode run`` process."""
    handler = logging.StreamHandler(sys.stderr)
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log is noisy and may include query strings; ours is enough.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class _CliFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = f"{record.levelname.lower()}: {record.getMessage()}"
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict) and extra:
            out += " (" + ", ".join(f"{k}={v}" for k, v in extra.items()) + ")"
        return out


def setup_cli_logging() -> None:
    """For the CLI's one-shot commands (not ``run``): warnings the library logs go to
    stderr as one ``warning: message (facts)`` line each (unconfigured, Python would
    print the bare message and drop the facts). Errors are left to the command, which
    reports its failure as its one ``Error:`` line: logged too, they would say it twice.
    Like ``logging.basicConfig``, it does nothing if logging is already set up (a host
    program, a test runner)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_CliFormatter())
    handler.addFilter(lambda record: record.levelno < logging.ERROR)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
