"""Default build: cold vs cached wall time, and what tracking costs per build.

    python benchmarks/foundation.py [--rounds 3] [extra overrides...]

Runs `python -m edgebuild` in a fresh temporary folder (its own cache and MLflow store): one cold
build, then cached rebuilds with MLflow tracking and with tracking=none. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(cwd: Path, extra: list[str]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "edgebuild", *extra], cwd=cwd, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - t0
    newest = max(cwd.glob("outputs/runs/**/summary.json"), key=lambda p: p.stat().st_mtime)
    return seconds, json.loads(newest.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        load = os.getloadavg()[0]
        cold, summary = build(cwd, args.overrides)
        assert not any(s["cache_hit"] for s in summary["stages"])
        cached, untracked = [], []
        for _ in range(args.rounds):
            seconds, s = build(cwd, args.overrides)
            assert all(x["cache_hit"] for x in s["stages"])
            cached.append(seconds)
            untracked.append(build(cwd, [*args.overrides, "tracking=none"])[0])
        stages = len(summary["stages"])
    c, u = statistics.median(cached), statistics.median(untracked)
    rows = [
        ("cold build (tracked)", f"{cold:.1f} s", ""),
        ("cached rebuild (tracked)", f"{c:.1f} s", f"{c / cold:.0%} of cold"),
        ("cached rebuild (tracking=none)", f"{u:.1f} s", f"{u / cold:.0%} of cold"),
        ("tracking overhead per stage", f"{(c - u) / stages:.2f} s", f"{stages} stages + parent run"),
    ]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load avg {load:.2f} "
          f"at start, {os.getloadavg()[0]:.2f} at end; medians of {args.rounds} rebuilds")
    print(f"{'measure':34} {'value':>10}  note")
    for name, value, note in rows:
        print(f"{name:34} {value:>10}  {note}")
    print(f"final top-1 {summary['stages'][-1]['metrics']['acc/top1']:.4f}")


if __name__ == "__main__":
    main()
