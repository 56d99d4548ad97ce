"""`citynode service systemd`: a hardened unit that systemd itself accepts."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from citynode.cli import main as cli_main
from citynode.errors import ConfigError
from citynode.service import systemd_unit
from tests.conftest import make_node_dir


def _verify(unit: Path) -> str:
    """systemd's own checker on a unit file: its complaints ('' when none)."""
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: .ci/run installs Debian's systemd package"
    out = subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True,
                         text=True, timeout=60)
    return (out.stdout + out.stderr).strip() + ("" if out.returncode == 0 else
                                                f" (exit {out.returncode})")


def _service(text: str) -> dict[str, str]:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(text)
    return dict(cp["Service"])


def test_the_unit_is_hardened_and_systemd_accepts_it(tmp_path: Path) -> None:
    d = make_node_dir(tmp_path, "Jakarta")
    out = CliRunner().invoke(cli_main, ["service", "systemd", "-d", str(d)])
    assert out.exit_code == 0, out.output
    unit = tmp_path / "citynode-jakarta.service"
    unit.write_text(out.output)
    assert _verify(unit) == ""
    s = _service(out.output)
    assert s["User"] == s["Group"] == "citynode"
    assert s["ExecStart"].endswith(f"citynode run -d {d.resolve()}")
    assert Path(s["ExecStart"].split()[0]).is_file()
    assert s["ProtectSystem"] == "strict" and s["ReadWritePaths"] == str(d.resolve())
    assert s["NoNewPrivileges"] == "yes"
    assert s["RestrictAddressFamilies"].split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert s["Restart"] == "on-failure" and s["KillSignal"] == "SIGTERM"
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"  # systemctl reload: SIGHUP
    assert s["CapabilityBoundingSet"] == ""  # port 1024 or above: no capability at all
    assert s["ProtectHome"] == "yes"  # the data dir is not under /home or /root
    # The install steps are in the comments: a dedicated user owning the data dir.
    assert f"useradd --system --home-dir {d.resolve()}" in out.output
    assert f"chown -R citynode:citynode {d.resolve()}" in out.output


def test_the_checker_is_not_blind(tmp_path: Path) -> None:
    """The check above means something: a misspelt hardening key is reported."""
    d = make_node_dir(tmp_path, "Seoul")
    text = systemd_unit(d).text.replace("ProtectSystem=", "ProtectSystm=")
    unit = tmp_path / "bad.service"
    unit.write_text(text)
    assert "ProtectSystm" in _verify(unit)


def test_a_low_port_gets_only_the_bind_capability(tmp_path: Path) -> None:
    d = make_node_dir(tmp_path, "Surabaya", port=443)
    s = _service(systemd_unit(d).text)
    assert s["CapabilityBoundingSet"] == s["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"


def test_a_data_dir_under_home_stays_reachable(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import citynode.service as service

    d = make_node_dir(tmp_path, "Lima")
    monkeypatch.setattr(service, "_HOMES", (tmp_path,))
    s = _service(systemd_unit(d).text)
    # ProtectHome=yes would hide it whatever ReadWritePaths says.
    assert s["ProtectHome"] == "read-only" and s["ReadWritePaths"] == str(d.resolve())


def test_bad_input_is_one_clear_line(tmp_path: Path) -> None:
    d = make_node_dir(tmp_path, "Quito")
    with pytest.raises(ConfigError, match="not a valid system user name"):
        systemd_unit(d, user="Root; rm -rf /")
    out = CliRunner().invoke(cli_main, ["service", "systemd", "-d", str(tmp_path / "nope")])
    assert out.exit_code != 0 and "not a citynode data dir" in out.output
    assert "Traceback" not in out.output
