"""Sweeps: a multirun of N jobs with the joblib launcher, with the shared stage cache vs without; the
report generated for it; and the profile of a recipe's deployable (default: mobilenet_int8_vpu).

    python benchmarks/sweeps.py [--epochs 10] [--n-jobs 2] [--report-to docs/reports/sweeps]
                                [--optuna-trials 8] [--pareto-to docs/reports/pareto]
                                [--profile-recipe mobilenet_int8_vpu] [--profile-cache outputs/cache]

The sweep is the default recipe over stages.export.opset=14,15,16,17 x target.threads=1,2 (8 jobs
sharing their train stage): with the cache, the train stage is built by the first jobs and re-used
by the others; with cache.enabled=false every job trains. Then an Optuna (NSGA-II) search for the
Pareto front of accuracy vs deployable size over model width and epochs. Each sweep runs in a fresh temporary folder
(its own cache and MLflow store). The profile build uses --profile-cache (a cache holding the recipe's
stages makes it cheap) and tracking=none.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SWEEP = ["stages.export.opset=14,15,16,17", "target.threads=1,2"]


def edgebuild(cwd: Path, args: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "edgebuild", *args], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode not in (0, 1):
        sys.exit(f"edgebuild {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return time.perf_counter() - t0, out.stdout


def sweep(cwd: Path, epochs: int, n_jobs: int, extra: list[str]) -> dict:
    args = ["-m", "hydra/launcher=joblib", f"hydra.launcher.n_jobs={n_jobs}", f"stages.train.epochs={epochs}",
            *SWEEP, *extra]
    load = os.getloadavg()[0]
    seconds, stdout = edgebuild(cwd, args)
    summaries = [json.loads(p.read_text()) for p in cwd.glob("outputs/multirun/**/summary.json")]
    trained = sum(1 for s in summaries for st in s["stages"] if st["kind"] == "train" and not st["cache_hit"])
    return {"seconds": seconds, "jobs": len(summaries), "trained": trained, "load": load, "stdout": stdout,
            "top1": [s["stages"][-1]["metrics"]["acc/top1"] for s in summaries]}


def print_sweeps(results: dict) -> None:
    print(f"{'sweep':14} {'jobs':>4} {'trained':>7} {'wall s':>7} {'load':>5}  top-1 range")
    for name, r in results.items():
        print(f"{name:14} {r['jobs']:>4} {r['trained']:>7} {r['seconds']:>7.1f} {r['load']:>5.1f}  "
              f"{min(r['top1']):.4f}-{max(r['top1']):.4f}")
    speedup = results["no cache"]["seconds"] / results["shared cache"]["seconds"]
    print(f"speed-up of the shared cache: x{speedup:.2f}")
    if "report" in results["shared cache"]:
        print(f"report of the cached sweep: {results['shared cache']['report']}/report.md (and report.html)")
    pareto = [line for line in results["shared cache"]["stdout"].splitlines() if "Pareto" in line or "│" in line]
    print("\n".join(pareto[-12:]))


def optuna_search(args: argparse.Namespace) -> None:
    """Multi-objective search (accuracy vs deployable size) over width and epochs of the default recipe."""
    with tempfile.TemporaryDirectory() as tmp:
        load = os.getloadavg()[0]
        seconds, stdout = edgebuild(Path(tmp), [
            "-m", "hydra/sweeper=edgebuild_pareto", f"hydra.sweeper.n_trials={args.optuna_trials}",
            f"hydra.sweeper.n_jobs={args.n_jobs}", "hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.n_jobs}",
            "hydra.sweeper.direction=[maximize,minimize]", "sweep.objectives=[acc/top1:max,size/bytes:min]",
            "model.kwargs.width=choice(2,4,8,16,32)", "stages.train.epochs=choice(3,10,20)"])
        if args.pareto_to:
            dest = ROOT / args.pareto_to
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(next(Path(tmp).glob("outputs/multirun/*/*/report")), dest)
    print(f"\nOptuna NSGA-II, {args.optuna_trials} trials, acc/top1 (max) vs size/bytes (min): {seconds:.0f} s, "
          f"load {load:.1f}; report: {args.pareto_to}/report.md")
    print("\n".join(line for line in stdout.splitlines() if "│" in line or "Pareto" in line))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="train epochs of every job (the shared prefix)")
    parser.add_argument("--n-jobs", type=int, default=2, help="joblib workers")
    parser.add_argument("--report-to", default="docs/reports/sweeps", help="copy the sweep's report here ('' = no)")
    parser.add_argument("--profile-recipe", default="mobilenet_int8_vpu", help="'' to skip the profile")
    parser.add_argument("--profile-cache", default=str(ROOT / "outputs" / "cache"))
    parser.add_argument("--profile-overrides", nargs="*", default=[], help="extra overrides of the profiled build")
    parser.add_argument("--no-sweep", action="store_true", help="skip the cache/no-cache sweeps")
    parser.add_argument("--optuna-trials", type=int, default=8, help="Optuna Pareto search trials (0 = skip)")
    parser.add_argument("--pareto-to", default="docs/reports/pareto", help="copy the Optuna sweep's report here")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; sweep "
          f"{' '.join(SWEEP)} (8 jobs), default recipe, {args.epochs} epochs, joblib n_jobs={args.n_jobs}")
    results = {}
    for name, extra in () if args.no_sweep else (("shared cache", []), ("no cache", ["cache.enabled=false"])):
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = r = sweep(Path(tmp), args.epochs, args.n_jobs, extra)
            if name == "shared cache" and args.report_to:
                report = next(Path(tmp).glob("outputs/multirun/*/*/report"))
                dest = ROOT / args.report_to
                shutil.rmtree(dest, ignore_errors=True)
                shutil.copytree(report, dest)
                r["report"] = dest
    if results:
        print_sweeps(results)
    if args.optuna_trials:
        optuna_search(args)
    if args.profile_recipe:
        with tempfile.TemporaryDirectory() as tmp:
            seconds, stdout = edgebuild(Path(tmp), [f"recipe={args.profile_recipe}", "eval.profile.enabled=true",
                                                    "eval.profile.top=10", f"cache.dir={args.profile_cache}",
                                                    "tracking=none", *args.profile_overrides])
            run_dir = Path(next(Path(tmp).glob("outputs/runs/*/*/summary.json")).parent)
            summary = json.loads((run_dir / "summary.json").read_text())
            from edgebuild import profile

            print(f"\nprofile of {args.profile_recipe} ({seconds:.0f} s, load {os.getloadavg()[0]:.1f}), per stage:")
            for stage in summary["stages"]:
                data = profile.load(run_dir / "profile" / f"{stage['name']}.json")
                header, rows = profile.table(data, top=10)
                m = stage["metrics"]
                print(f"\n[{stage['name']}] ran in {m.get('runtime/precision')}, "
                      f"p50 {m.get('latency/p50_ms', 0):.3f} ms, "
                      f"preprocessing {m['profile/preprocess_share']:.0%} of image->output "
                      f"({data['preprocessing']['source']})")
                print(" | ".join(header))
                for r in rows:
                    print(" | ".join(r))


if __name__ == "__main__":
    main()
