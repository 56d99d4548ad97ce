"""Payload types. PLACEHOLDER: being written (see tests/core/test_types.py)."""

from __future__ import annotations

from typing import Any

from citynode.errors import PayloadError

__all__ = ["validate_payload"]


def validate_payload(type_name: str, data: Any) -> None:
    """Raise :class:`PayloadError` if ``data`` does not satisfy ``type_name``."""
    if not isinstance(data, dict):
        raise PayloadError("payload must be a map")
