"""Reloading node.toml in a running node (SIGHUP, ``systemctl reload``): what changed,
what applies live, and what needs a restart.

Live: every ``[feeds.*]`` setting (access, readers, egress, terms, cadence, retention; a
feed added or removed), ``[log] level``, ``[federation] accept`` and ``vouch_hops`` (the
trust policy is rebuilt from them) and ``[checkpoints] interval_seconds``. Everything
else -- the listen address, TLS, the public URL and name, limits that size buffers and
queues, the replica's federation settings, bridges, sections added later -- needs a
restart: it is named in a warning and not applied, so the running node never holds a
half-applied config (:func:`live_config` is the one place that says what applies).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from citynode.config import Config

__all__ = ["Change", "ConfigDiff", "diff_config", "live_config", "shown"]

#: Keys applied live (exact keys, or prefixes ending in a dot).
LIVE_KEYS = ("feeds.", "log.level", "federation.accept", "federation.vouch_hops",
             "checkpoints.interval_seconds")


@dataclass(frozen=True, slots=True)
class Change:
    """One setting that differs: its dotted key (``feeds.air.access``), its old and new
    value (None: absent), and whether it applies without a restart."""

    key: str
    old: object
    new: object
    live: bool


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    """Every setting that differs between the running config and node.toml, by key."""

    changes: tuple[Change, ...]

    @property
    def live(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.live)

    @property
    def restart(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if not c.live)


def is_live(key: str) -> bool:
    """Does the setting ``key`` (dotted) apply without a restart?"""
    return any(key.startswith(k) if k.endswith(".") else key == k for k in LIVE_KEYS)


def diff_config(old: Config, new: Config) -> ConfigDiff:
    """What differs from ``old`` (running) to ``new`` (node.toml), in key order. A feed
    added or removed is one change keyed ``feeds.<name>`` whose new (added) or old
    (removed) value is every setting of its table, by key relative to it (the operator
    sees what now applies, e.g. to a feed published before it had a table); a changed
    feed is one change per setting."""
    a, b = _flat(old), _flat(new)
    added = set(new.feeds) - set(old.feeds)
    removed = set(old.feeds) - set(new.feeds)
    out: list[Change] = []
    for name in sorted(added | removed):
        settings = _settings(new.feeds[name] if name in added else old.feeds[name])
        out.append(Change(f"feeds.{name}", None if name in added else settings,
                          settings if name in added else None, True))
    whole = {f"feeds.{n}." for n in added | removed}
    for key in sorted(set(a) | set(b)):
        if any(key.startswith(p) for p in whole):
            continue
        if a.get(key) != b.get(key):
            out.append(Change(key, a.get(key), b.get(key), is_live(key)))
    return ConfigDiff(tuple(sorted(out, key=lambda c: c.key)))


def live_config(running: Config, new: Config) -> Config:
    """The config to run with after a reload: ``running`` with ``new``'s live settings
    (those :func:`is_live` names) and nothing else."""
    return dataclasses.replace(
        running,
        feeds=new.feeds,
        log=dataclasses.replace(running.log, level=new.log.level),
        federation=dataclasses.replace(running.federation, accept=new.federation.accept,
                                       vouch_hops=new.federation.vouch_hops),
        checkpoints=dataclasses.replace(
            running.checkpoints, interval_seconds=new.checkpoints.interval_seconds),
    )


def shown(value: object) -> object:
    """A setting's value as a log field: bytes in hex, sets sorted, tuples as lists,
    mappings (a feed's settings) as objects of shown values."""
    if isinstance(value, Mapping):
        return {str(k): shown(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, frozenset | set):
        return sorted(map(str, value))
    if isinstance(value, tuple):
        return [shown(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _settings(feed: object) -> dict[str, object]:
    """Every setting of one ``[feeds.<name>]`` table, by key relative to it (the name
    is the change's key already)."""
    return {k: v for k, v in _flat(feed).items() if k != "name"}


def _flat(value: object, prefix: str = "") -> dict[str, object]:
    """Every leaf setting of a config (nested dataclasses and mappings) by dotted key."""
    out: dict[str, object] = {}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            out.update(_flat(getattr(value, f.name), f"{prefix}{f.name}."))
    elif isinstance(value, Mapping):
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
    else:
        out[prefix.rstrip(".")] = value
    return out
