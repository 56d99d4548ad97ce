"""Run a node as a service: a hardened systemd unit for one data dir.

The unit runs ``citynode run -d DIR`` as a dedicated system user that owns nothing but
the data dir: the rest of the file system is read-only to it (``ProtectSystem=strict``
with ``ReadWritePaths`` the data dir alone), it gains no privileges, may open only
IP and Unix sockets, and is restarted if it fails. ``systemctl stop`` sends SIGTERM,
which the node handles gracefully (acknowledged records are committed, live streams end
so subscribers resume by cursor). Logs are JSON lines on stdout and stderr, which
systemd hands to the journal: ``journalctl -u UNIT`` reads them and the journal
rotates them, so no log file needs rotating. ``systemctl reload`` sends SIGHUP: the node
re-reads node.toml and applies what can change live (citynode/reload.py).

Where things live matters to the sandbox. A normal install (``/usr/local``, ``/opt``, a
venv under either, a data dir under ``/var/lib``) gets ``ProtectHome=yes``: users' homes
are invisible to the service. When the data dir, the citynode command, its Python or its
venv is under a home (``/home``, ``/root``, ``/run/user``), homes are made read-only
instead of invisible (``ProtectHome=yes`` would hide the command, and the unit would
fail with status 203/EXEC), and the unit says why in a comment. Under a temporary dir
(``/tmp``, ``/var/tmp``, ``/dev/shm``) nothing is generated: the service's private
``/tmp`` hides it, and systemd-tmpfiles empties those dirs, a data dir with them.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from citynode.config import load_config
from citynode.errors import ConfigError

__all__ = ["SystemdUnit", "systemd_unit"]

_USER_RULE = re.compile(r"[a-z_][a-z0-9_-]{0,30}")
# Where users' homes live: ProtectHome=yes would hide a data dir there, so it is made
# read-only instead (and the data dir writable by ReadWritePaths).
_HOMES = (Path("/home"), Path("/root"), Path("/run/user"))
# Temporary dirs: PrivateTmp gives the service its own empty /tmp and /var/tmp, and
# systemd-tmpfiles ages their files out; /dev/shm is emptied at boot.
_TEMP = (Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"))
# Ports below this need CAP_NET_BIND_SERVICE, granted only then.
_PRIVILEGED_PORTS = 1024


@dataclass(frozen=True)
class SystemdUnit:
    """A unit's file name and text, and the shell commands that prepare its user."""

    name: str
    text: str
    setup: list[str]


def systemd_unit(data_dir: Path, *, user: str = "citynode",
                 executable: Path | None = None) -> SystemdUnit:
    """The hardened unit that runs the node of ``data_dir`` as ``user``. Raises
    ConfigError if the data dir has no valid node.toml, the user name is not a valid
    system user name, or the data dir or the installation is under a temporary dir."""
    data_dir = data_dir.resolve()
    cfg = load_config(data_dir / "node.toml")  # a data dir, and a valid one
    if not _USER_RULE.fullmatch(user):
        raise ConfigError(f"{user!r} is not a valid system user name (lower case letters, "
                          "digits, _ and -; at most 31 characters)")
    exe = (executable or _citynode_executable()).resolve()
    slug = re.sub(r"[^a-z0-9]+", "-", cfg.node.name.lower()).strip("-") or "node"
    install = _install_paths(exe)
    if executable is None:  # this installation: its code too (an editable install's)
        install.append(("the citynode package", Path(__file__).resolve().parent))
    in_temp = [f"{what} ({path})" for what, path in [("the data dir", data_dir), *install]
               if _under(path, _TEMP)]
    if in_temp:
        raise ConfigError(
            f"{', '.join(in_temp)} {'is' if len(in_temp) == 1 else 'are'} under a "
            "temporary dir, which a service cannot use: its private /tmp hides it, and "
            "systemd-tmpfiles empties it. Put the data dir under e.g. /var/lib/citynode, "
            "and install citynode outside /tmp, e.g. python3 -m venv /opt/citynode && "
            "/opt/citynode/bin/pip install citynode")
    in_home = [(what, path) for what, path in [("the data dir", data_dir), *install]
               if _under(path, _HOMES)]
    caps = ("CAP_NET_BIND_SERVICE" if cfg.node.listen_port < _PRIVILEGED_PORTS else "")
    q = shlex.quote
    lines = [
        "[Unit]",
        f"Description=citynode {cfg.node.name}: signed city data feeds",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=exec",
        f"User={user}",
        f"Group={user}",
        f"ExecStart={q(str(exe))} run -d {q(str(data_dir))}",
        # SIGHUP: node.toml's feeds, log level and trust settings again, and the
        # partner links from the database, without a restart (`systemctl reload`).
        "ExecReload=/bin/kill -HUP $MAINPID",
        # SIGTERM: the node commits what it acknowledged and ends its streams.
        "KillSignal=SIGTERM",
        "TimeoutStopSec=45",
        "Restart=on-failure",
        "RestartSec=5",
        "UMask=0077",
        f"ReadWritePaths={data_dir}",
        "ProtectSystem=strict",
        f"ProtectHome={'read-only' if in_home else 'yes'}",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "NoNewPrivileges=yes",
        f"CapabilityBoundingSet={caps}",
        f"AmbientCapabilities={caps}",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "SystemCallErrorNumber=EPERM",
        # Partners' and subscribers' connections, plus the database and its WAL.
        "LimitNOFILE=65536",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    setup = [
        f"useradd --system --home-dir {q(str(data_dir))} --no-create-home "
        f"--shell /usr/sbin/nologin {user}",
        f"chown -R {user}:{user} {q(str(data_dir))}",
    ]
    name = f"citynode-{slug}.service"
    head = [
        f"# {name}: citynode {cfg.node.name} as a hardened service. Install, as root:",
        *(f"#   {c}" for c in setup),
        f"#   citynode service systemd -d {q(str(data_dir))} > /etc/systemd/system/{name}",
        f"#   systemctl daemon-reload && systemctl enable --now {name}",
        f"# Logs (JSON lines, rotated by the journal): journalctl -u {name}",
        *(["# ProtectHome=read-only, not yes: the service must reach "
           + ", ".join(f"{what} ({path})" for what, path in in_home)
           + " under a home dir. Installing under /opt or /usr/local, with the data dir "
           "under /var/lib, hides every home from it."] if in_home else []),
    ]
    return SystemdUnit(name, "\n".join(head + lines) + "\n", setup)


def _under(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _install_paths(exe: Path) -> list[tuple[str, Path]]:
    """What the service must be able to read to start ``exe`` (a resolved path): the
    command, the venv it belongs to, and the interpreter of its ``#!`` line (as named,
    and where its symlinks lead). A missing or unreadable command adds nothing more
    (systemd-analyze reports it)."""
    out: list[tuple[str, Path]] = [("the citynode command", exe)]
    if (exe.parent.parent / "pyvenv.cfg").is_file():
        out.append(("its venv", exe.parent.parent))
    try:
        with open(exe, "rb") as f:
            first = f.readline(4096)
    except OSError:
        return out
    if first.startswith(b"#!"):
        words = first[2:].decode("utf-8", "replace").split()
        if words and words[0].startswith("/"):
            python = Path(words[0])
            out.append(("its Python", python))
            if python.resolve() != python:
                out.append(("its Python", python.resolve()))
    return out


def _citynode_executable() -> Path:
    """The ``citynode`` command of this installation (beside the running Python)."""
    import shutil
    import sys

    beside = Path(sys.executable).parent / "citynode"
    if beside.exists():
        return beside
    found = shutil.which("citynode")
    if found is None:
        raise ConfigError("cannot find the citynode command: give its path with --exec")
    return Path(found)
