"""Coverage-guided fuzzing of every decoder that takes outside bytes (scripts/fuzz).

Runs each target of scripts/fuzz_targets.py under atheris (libFuzzer for Python) in its
own process, seeded from tests/vectors, for ``--runs`` inputs (default 1,000,000 each),
then prints per target: inputs tried, seconds, inputs/s, coverage reached, crashes.
A crash (an exception that is not a citynode refusal, or two decoders disagreeing) is
saved as ``crash-*`` in the work directory with the input that caused it, and makes the
exit status 1. The last line is one JSON object with the same figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fuzz_targets

_DONE = re.compile(r"Done (\d+) runs in (\d+) second")
_COV = re.compile(r"#\d+\s+\w+\s+cov: (\d+)")


def run_target(name: str, runs: int, seed: int, work: Path, max_len: int,
               timeout_s: float) -> dict[str, object]:
    """Fuzz one target in a child process; return its figures."""
    corpus = work / name / "corpus"
    seeds = fuzz_targets.write_corpus(name, corpus)
    artifacts = work / name
    cmd = [sys.executable, str(Path(fuzz_targets.__file__)), name, f"-runs={runs}",
           f"-seed={seed}", f"-max_len={max_len}", "-print_final_stats=1",
           f"-artifact_prefix={artifacts}/", "-timeout=20", "-rss_limit_mb=2048",
           # Keep what the run learned out of the seed corpus directory's twin only.
           str(corpus)]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "PYTHONHASHSEED": "0"})
        out, code, timed_out = proc.stderr + proc.stdout, proc.returncode, False
    except subprocess.TimeoutExpired as exc:
        raw = exc.stderr or b""
        out = raw.decode() if isinstance(raw, bytes) else raw
        code, timed_out = -1, True
    secs = time.monotonic() - start
    done = _DONE.findall(out)
    tried = int(done[-1][0]) if done else 0
    if not done:  # killed by the time limit: take the last status line's count
        counts = re.findall(r"#(\d+)\s", out)
        tried = int(counts[-1]) if counts else 0
    cov = _COV.findall(out)
    crashes = sorted(p.name for p in artifacts.glob("crash-*"))
    crashes += sorted(p.name for p in artifacts.glob("timeout-*"))
    crashes += sorted(p.name for p in artifacts.glob("oom-*"))
    failed = bool(crashes) or (code not in (0, -1) and not timed_out)
    if failed:
        tail = "\n".join(out.strip().splitlines()[-25:])
        print(f"--- {name}: exit {code}\n{tail}\n---", file=sys.stderr)
    return {"target": name, "inputs": tried, "seconds": round(secs, 1),
            "per_s": round(tried / secs) if secs else 0, "coverage": int(cov[-1]) if cov else 0,
            "seeds": seeds, "crashes": len(crashes) or (1 if failed else 0),
            "timed_out": timed_out, "artifacts": crashes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=1_000_000, help="inputs per target")
    ap.add_argument("--target", action="append", choices=sorted(fuzz_targets.TARGETS),
                    help="fuzz only these (repeatable); default: all")
    ap.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed")
    ap.add_argument("--max-len", type=int, default=4096, help="longest input tried")
    ap.add_argument("--time-limit", type=float, default=3600.0,
                    help="seconds per target before it is stopped (figures still count)")
    ap.add_argument("--work", type=Path, help="keep corpora and crashes here")
    a = ap.parse_args()
    names = a.target or list(fuzz_targets.TARGETS)
    work = a.work or Path(tempfile.mkdtemp(prefix="citynode-fuzz-"))
    print(f"fuzzing {len(names)} targets, {a.runs:,} inputs each, seed {a.seed}; work dir {work}")
    results = []
    for name in names:
        r = run_target(name, a.runs, a.seed, work, a.max_len, a.time_limit)
        results.append(r)
        print(f"  {name:<11} {r['inputs']:>10,} inputs  {r['seconds']:>7}s  "
              f"{r['per_s']:>6,}/s  cov {r['coverage']:>5}  seeds {r['seeds']:>4}  "
              f"crashes {r['crashes']}" + ("  (time limit)" if r["timed_out"] else ""))
    total = sum(int(r["inputs"]) for r in results)  # type: ignore[call-overload]
    crashes = sum(int(r["crashes"]) for r in results)  # type: ignore[call-overload]
    print(f"total {total:,} inputs, {crashes} crashes")
    if a.work is None and not crashes:
        shutil.rmtree(work, ignore_errors=True)  # kept when it holds crashes to look at
    print(json.dumps({"bench": "fuzz", "inputs": total, "crashes": crashes,
                      "targets": {str(r["target"]): {k: r[k] for k in
                                                     ("inputs", "per_s", "coverage", "crashes")}
                                  for r in results}, "ok": crashes == 0}))
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
