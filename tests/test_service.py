"""`citynode service systemd`: a hardened unit that systemd itself accepts."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path
from typing import Any

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


class Root:
    """A stand-in for ``/`` under the test's tmp dir: ``opt/``, ``usr/local/``,
    ``var/lib/`` and ``home/`` as on a server. The service module's rules are pointed at
    its ``home/`` and ``tmp/`` (the real tmp dir holding it all is not a temporary dir
    of the machine the unit is for)."""

    def __init__(self, base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        import citynode.service as service

        self.base = base
        monkeypatch.setattr(service, "_HOMES", (base / "home",))
        monkeypatch.setattr(service, "_TEMP", (base / "tmp",))
        python = base / "usr" / "bin" / "python3.11"
        python.parent.mkdir(parents=True)
        python.write_text("")
        self.python = python

    def data_dir(self, name: str, under: str = "var/lib", **kw: Any) -> Path:
        where = self.base / under
        where.mkdir(parents=True, exist_ok=True)
        return make_node_dir(where, name, **kw)

    def venv(self, where: str, python: Path | None = None) -> Path:
        """A venv as ``python3 -m venv`` lays it out, with pip's ``citynode`` script."""
        root = self.base / where
        (root / "bin").mkdir(parents=True)
        (root / "pyvenv.cfg").write_text(f"home = {self.python.parent}\n")
        (root / "bin" / "python").symlink_to(python or self.python)
        exe = root / "bin" / "citynode"
        exe.write_text(f"#!{root / 'bin' / 'python'}\n"
                       "from citynode.cli import main\nmain()\n")
        exe.chmod(0o755)
        return exe


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Root:
    return Root(tmp_path, monkeypatch)


def test_the_unit_is_hardened_and_systemd_accepts_it(root: Root, tmp_path: Path) -> None:
    d = root.data_dir("Jakarta")
    exe = root.venv("opt/citynode")
    out = CliRunner().invoke(cli_main, ["service", "systemd", "-d", str(d),
                                        "--exec", str(exe)])
    assert out.exit_code == 0, out.output
    unit = tmp_path / "citynode-jakarta.service"
    unit.write_text(out.output)
    assert _verify(unit) == ""
    s = _service(out.output)
    assert s["User"] == s["Group"] == "citynode"
    assert s["ExecStart"] == f"{exe} run -d {d.resolve()}"
    assert s["ProtectSystem"] == "strict" and s["ReadWritePaths"] == str(d.resolve())
    assert s["NoNewPrivileges"] == "yes"
    assert s["RestrictAddressFamilies"].split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert s["Restart"] == "on-failure" and s["KillSignal"] == "SIGTERM"
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"  # systemctl reload: SIGHUP
    assert s["CapabilityBoundingSet"] == ""  # port 1024 or above: no capability at all
    # Installed under /opt with the data dir under /var/lib: homes are invisible.
    assert s["ProtectHome"] == "yes" and "ProtectHome=read-only" not in out.output
    # The install steps are in the comments: a dedicated user owning the data dir.
    assert f"useradd --system --home-dir {d.resolve()}" in out.output
    assert f"chown -R citynode:citynode {d.resolve()}" in out.output


@pytest.mark.parametrize("install", ["usr/local", "opt/citynode", "srv/venvs/citynode"])
def test_normal_installs_verify_cleanly(root: Root, tmp_path: Path, install: str) -> None:
    """pip's script in /usr/local/bin, a venv under /opt or elsewhere outside homes: no
    warning from systemd's checker, and homes stay hidden."""
    d = root.data_dir("Seoul")
    exe = root.venv(install)
    text = systemd_unit(d, executable=exe).text
    unit = tmp_path / "citynode-seoul.service"
    unit.write_text(text)
    assert _verify(unit) == ""
    assert _service(text)["ProtectHome"] == "yes"


@pytest.mark.parametrize("case", ["venv", "python", "data"])
def test_an_install_under_home_gets_read_only_homes(root: Root, tmp_path: Path,
                                                    case: str) -> None:
    """A venv in a user's home, a venv whose Python is a pyenv build in a home, or a
    data dir in a home: ProtectHome=yes would hide it (status 203/EXEC, or a data dir
    that is not there), so homes are read-only instead, the unit says why, and systemd's
    checker is still silent."""
    pyenv = root.base / "home" / "ops" / ".pyenv" / "versions" / "3.11" / "bin" / "python3"
    pyenv.parent.mkdir(parents=True)
    pyenv.write_text("")
    d = root.data_dir("Lima", under="home/ops" if case == "data" else "var/lib")
    exe = {"venv": lambda: root.venv("home/ops/venv"),
           "python": lambda: root.venv("opt/citynode", python=pyenv),
           "data": lambda: root.venv("opt/citynode")}[case]()
    text = systemd_unit(d, executable=exe).text
    unit = tmp_path / "citynode-lima.service"
    unit.write_text(text)
    assert _verify(unit) == ""
    s = _service(text)
    assert s["ProtectHome"] == "read-only"
    # Still only the data dir is writable: read-only homes are not writable ones.
    assert s["ProtectSystem"] == "strict" and s["ReadWritePaths"] == str(d.resolve())
    why = {"venv": f"its venv ({exe.parent.parent})", "python": f"its Python ({pyenv})",
           "data": f"the data dir ({d.resolve()})"}[case]
    [comment] = [line for line in text.splitlines() if line.startswith("# ProtectHome=")]
    assert comment.startswith("#") and why in comment, comment


@pytest.mark.parametrize("what", ["data", "exe"])
def test_a_data_dir_or_install_under_tmp_is_refused(tmp_path: Path, what: str) -> None:
    """The service's private /tmp would hide it, and systemd-tmpfiles empties /tmp: one
    clear line naming it, no unit. The real /tmp, nothing redirected."""
    import tempfile

    real_tmp = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        d = make_node_dir(real_tmp if what == "data" else tmp_path, "Quito")
        if what == "exe":
            exe = real_tmp / "venv" / "bin" / "citynode"
            exe.parent.mkdir(parents=True)
            exe.write_text("#!/usr/bin/python3\n")
            exe.chmod(0o755)
            where = str(exe)
        else:
            exe = Path("/usr/bin/true")
            where = str(d.resolve())
        with pytest.raises(ConfigError, match="under a temporary dir") as e:
            systemd_unit(d, executable=exe)
        assert where in str(e.value) and "/var/lib/citynode" in str(e.value)
        out = CliRunner().invoke(cli_main, ["service", "systemd", "-d", str(d),
                                            "--exec", str(exe)])
        assert out.exit_code != 0 and "under a temporary dir" in out.output
        assert "[Service]" not in out.output and "Traceback" not in out.output
    finally:
        shutil.rmtree(real_tmp)


def test_the_checker_is_not_blind(root: Root, tmp_path: Path) -> None:
    """The check above means something: a misspelt hardening key is reported, and so
    is a command that is not there."""
    d = root.data_dir("Seoul")
    exe = root.venv("opt/citynode")
    text = systemd_unit(d, executable=exe).text.replace("ProtectSystem=", "ProtectSystm=")
    unit = tmp_path / "bad.service"
    unit.write_text(text)
    assert "ProtectSystm" in _verify(unit)
    exe.unlink()
    unit.write_text(systemd_unit(d, executable=exe).text)
    assert "is not executable" in _verify(unit)


def test_a_low_port_gets_only_the_bind_capability(root: Root) -> None:
    d = root.data_dir("Surabaya", port=443)
    s = _service(systemd_unit(d, executable=root.venv("opt/citynode")).text)
    assert s["CapabilityBoundingSet"] == s["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"


def test_bad_input_is_one_clear_line(tmp_path: Path) -> None:
    d = make_node_dir(tmp_path, "Quito")
    with pytest.raises(ConfigError, match="not a valid system user name"):
        systemd_unit(d, user="Root; rm -rf /")
    out = CliRunner().invoke(cli_main, ["service", "systemd", "-d", str(tmp_path / "nope")])
    assert out.exit_code != 0 and "not a citynode data dir" in out.output
    assert "Traceback" not in out.output
