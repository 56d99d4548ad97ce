"""The fuzz suite (scripts/fuzz) runs in CI in a short version: every target, a few
thousand generated inputs each, no crash. The full run (1,000,000 inputs per target) is
documented in scripts/fuzz and its figures are in the closing notes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import fuzz_targets  # noqa: E402

RUNS = 1000


def _fuzz(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, object]]:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "fuzz.py"), *args],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_decoder_survives_generated_inputs(tmp_path: Path) -> None:
    code, result = _fuzz("--runs", str(RUNS), "--work", str(tmp_path))
    targets = result["targets"]
    assert isinstance(targets, dict)
    assert set(targets) == set(fuzz_targets.TARGETS)
    for name, figures in targets.items():
        assert figures["crashes"] == 0, (name, sorted(tmp_path.glob(f"{name}/crash-*")))
        # libFuzzer counts the seed inputs it runs first among its runs, so a target
        # with a large seed corpus may run more than asked; never fewer.
        assert figures["inputs"] >= RUNS, (name, figures)
        assert figures["coverage"] > 50, (name, figures)  # the target reached its decoder
    assert result["ok"] is True and code == 0


def test_a_crash_is_reported(tmp_path: Path) -> None:
    """The driver is not blind: a target with a planted bug fails the run."""
    code, result = _fuzz("--runs", "200", "--target", "canary", "--work", str(tmp_path),
                         env={"CITYNODE_FUZZ_CANARY": "1"})
    assert code == 1 and result["ok"] is False and result["crashes"] == 1
    assert list(tmp_path.glob("canary/crash-*"))


def test_seed_corpora_come_from_the_vectors() -> None:
    for name in fuzz_targets.TARGETS:
        assert fuzz_targets.seeds(name), name
    envelope_seeds = set(fuzz_targets.seeds("envelope"))
    chain = json.loads((ROOT / "tests/vectors/chain.json").read_text())["records"]
    assert bytes.fromhex(chain["r1"]["envelope_hex"]) in envelope_seeds


REGRESSIONS = sorted((ROOT / "tests" / "fuzz_regressions").glob("*/*.bin"))


@pytest.mark.parametrize("path", REGRESSIONS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_inputs_that_once_crashed_a_decoder_are_refused_cleanly(path: Path) -> None:
    """Each input the fuzzer found a crash with (tests/fuzz_regressions/TARGET/) stays
    fixed: its target raises nothing but a citynode refusal. They also seed the corpus."""
    fuzz_targets.TARGETS[path.parent.name](path.read_bytes())
    assert path.read_bytes() in fuzz_targets.seeds(path.parent.name)
