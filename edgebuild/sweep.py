"""Sweeps: one id for every job of a `-m` invocation, the objectives a job returns to the sweeper,
the Pareto front over them, and the Hydra callback that records that front once all jobs ended."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from edgebuild.errors import EdgebuildError


def sweep_id(sweep_dir: str | Path) -> str:
    """The same id in every job of one multirun, also in joblib/submitit worker processes: Hydra
    resolves the sweep folder once (its `now` resolver is cached and copied into each job's config)."""
    return hashlib.sha1(str(Path(sweep_dir).resolve()).encode()).hexdigest()[:12]


def parse_objectives(specs: list[str]) -> list[tuple[str, str]]:
    """["acc/top1:max", "latency/p50_ms:min"] -> [("acc/top1", "max"), ("latency/p50_ms", "min")]."""
    out = []
    for spec in specs:
        metric, _, direction = str(spec).rpartition(":")
        if not metric or direction not in ("max", "min"):
            raise EdgebuildError(f"sweep objective {spec!r} is not METRIC:max or METRIC:min",
                                 "write e.g. sweep.objectives='[acc/top1:max,latency/p50_ms:min]'")
        out.append((metric, direction))
    return out


def objective_values(summary: dict[str, Any], specs: list[str]) -> list[float]:
    """The final stage's values of the objectives (what an Optuna trial reports)."""
    final = summary["stages"][-1]["metrics"]
    values = []
    for metric, _ in parse_objectives(specs):
        if metric not in final:
            numeric = sorted(k for k, v in final.items() if isinstance(v, (int, float)))
            raise EdgebuildError(f"sweep objective {metric!r} was not measured on the final stage",
                                 f"use one of: {', '.join(numeric)}")
        values.append(float(final[metric]))
    return values


def dominates(a: list[float], b: list[float], directions: list[str]) -> bool:
    better = [(x > y) if d == "max" else (x < y) for x, y, d in zip(a, b, directions, strict=True)]
    worse = [(x < y) if d == "max" else (x > y) for x, y, d in zip(a, b, directions, strict=True)]
    return any(better) and not any(worse)


def pareto_front(points: list[list[float]], directions: list[str]) -> list[int]:
    """Indices of the points no other point dominates (every objective at least as good, one better)."""
    return [i for i, p in enumerate(points)
            if not any(dominates(q, p, directions) for j, q in enumerate(points) if j != i)]


class SweepEnd(Callback):
    """Hydra callback (conf/config.yaml: hydra.callbacks): after the last job of a multirun, read the
    sweep's builds back from MLflow, record the Pareto front on a sweep-level run, write a report into
    the sweep folder and print the front."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from rich.console import Console

        from edgebuild import report, tracking

        if not config.tracking.enabled:
            return
        sid = sweep_id(str(config.hydra.sweep.dir))
        console = Console()
        try:
            builds = tracking.read_builds(config.tracking.uri, sweep=sid)
        except EdgebuildError as e:
            console.print(f"[yellow]sweep {sid}: no report ({e.what})[/yellow]")
            return
        folder = Path(str(config.hydra.sweep.dir))
        objectives = parse_objectives(list(config.sweep.objectives))
        rep = report.Report(builds, title=f"sweep {sid}", objectives=objectives)
        paths = rep.write(folder / "report")
        experiments = {b["experiment"] for b in builds}
        experiment = experiments.pop() if len(experiments) == 1 else "edgebuild/sweeps"
        front = rep.front_rows()
        metrics = {"sweep/jobs": len(builds), "sweep/pareto_size": len(front[1])}
        tracking.log_sweep_run(config.tracking, experiment, sid, metrics, paths)
        console.print(rep.front_table())
        console.print(f"sweep {sid}: {len(builds)} builds; Pareto front over "
                      f"{', '.join(f'{m} ({d})' for m, d in objectives)} recorded on run 'sweep-{sid}'; "
                      f"report: {paths['report_html']}")
