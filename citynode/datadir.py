"""Creating a node's data directory (``citynode init``)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from urllib.parse import urlsplit

from citynode.config import Config, parse_config, render_config, split_listen
from citynode.errors import ConfigError
from citynode.identity import Identity, create_identity

__all__ = ["default_public_url", "init_data_dir"]


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def default_public_url(listen: str) -> str:
    """``https://HOST:PORT`` for a listen address; a wildcard address has no such URL."""
    host, port = split_listen(listen)
    if _is_wildcard(host):
        raise ConfigError(
            f"listening on {listen} (all addresses): give --public-url, the URL partners "
            "use to reach this node"
        )
    shown = f"[{host}]" if ":" in host else host
    return f"https://{shown}:{port}"


def init_data_dir(
    data_dir: Path,
    *,
    name: str,
    listen: str,
    public_url: str | None = None,
    hosts: tuple[str, ...] | list[str] = (),
    passphrase: str | None = None,
    recovery_passphrase: str | None = None,
    next_key_on_disk: bool = False,
    next_passphrase: str | None = None,
    **kdf: int,
) -> tuple[Identity, Config]:
    """Create a node in ``data_dir``: key, TLS certificate, operator token, node.toml.

    Everything is validated before anything is written, so a bad argument leaves no
    half-made node. The next key is sealed with ``next_passphrase`` (a random one,
    returned in the identity, if None), or like node.key with ``next_key_on_disk``
    (see :func:`citynode.identity.create_identity`). Raises
    :class:`ConfigError` (bad arguments, or a node already there) or
    :class:`KeyFileError`.
    """
    if (data_dir / "node.toml").exists() or (data_dir / "node.key").exists():
        raise ConfigError(f"{data_dir} already holds a node: choose another directory")
    try:
        host, _port = split_listen(listen)
    except ValueError as exc:
        raise ConfigError(f"--listen: {exc}") from exc
    url = public_url or default_public_url(listen)
    url_host = urlsplit(url).hostname or ""
    names = ["localhost", "127.0.0.1", host, url_host, *hosts]
    all_hosts = [h for h in dict.fromkeys(names) if h and not _is_wildcard(h)]
    text = render_config(name=name, listen=listen, public_url=url, hosts=all_hosts)
    config = parse_config(text, str(data_dir / "node.toml"))
    ident = create_identity(data_dir, name=name, hosts=all_hosts, passphrase=passphrase,
                            recovery_passphrase=recovery_passphrase,
                            next_key_on_disk=next_key_on_disk,
                            next_passphrase=next_passphrase, **kdf)
    path = data_dir / "node.toml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return ident, config
