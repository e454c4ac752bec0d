"""MLflow tracking: the only module that imports mlflow.

One parent run per build, one nested run per stage (cache hits included, tagged as such), child runs
for a stage's sub-steps. Every run ends FINISHED, FAILED or KILLED (Ctrl-C), never RUNNING.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any, Iterator

from edgebuild.errors import EdgebuildError

log = logging.getLogger(__name__)
PARAM_MAX = 6000


def _status_for(exc: BaseException | None) -> str:
    if exc is None:
        return "FINISHED"
    if isinstance(exc, KeyboardInterrupt) or (isinstance(exc, SystemExit) and exc.code not in (0, None)):
        return "KILLED"
    return "FAILED"


def split_metrics(metrics: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """Numbers become MLflow metrics; anything else (precisions, proxy device) becomes a tag."""
    nums, tags = {}, {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            nums[k] = float(v)
        elif isinstance(v, (int, float)) and math.isfinite(v):
            nums[k] = float(v)
        elif v is not None:
            tags[k] = str(v)
    return nums, tags


class StageRun:
    def __init__(self, tracker: Tracker | None, run_id: str | None):
        self.tracker, self.run_id = tracker, run_id

    def logger(self, name: str) -> Any:
        """A Lightning logger writing training curves into this stage's run."""
        if self.tracker is None:
            return None
        from pytorch_lightning.loggers import MLFlowLogger

        return MLFlowLogger(tracking_uri=self.tracker.uri, run_id=self.run_id, experiment_name=self.tracker.experiment,
                            prefix=name if name not in ("train", "fit") else "")

    def record(self, metrics: dict[str, Any], params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None,
               files: dict[str, Path] | None = None, folders: dict[str, Path] | None = None) -> None:
        if self.tracker is None:
            return
        import mlflow

        nums, str_tags = split_metrics(metrics)
        client = mlflow.MlflowClient()
        if params:
            mlflow.log_params(_params(params), run_id=self.run_id)
        if nums:
            mlflow.log_metrics(nums, run_id=self.run_id)
        all_tags = {**str_tags, **{k: str(v) for k, v in (tags or {}).items()}}
        for k, v in all_tags.items():
            client.set_tag(self.run_id, k, v[:5000])
        for name, path in (files or {}).items():
            client.log_artifact(self.run_id, str(path), artifact_path=name)
        for name, path in (folders or {}).items():
            client.log_artifacts(self.run_id, str(path), artifact_path=name)

    @contextlib.contextmanager
    def child(self, name: str) -> Iterator[StageRun]:
        """A run nested under this stage's run (e.g. one step of a prune-to-floor search)."""
        if self.tracker is None:
            yield StageRun(None, None)
            return
        with self.tracker._run(name, nested=True, parent=self.run_id) as run_id:
            yield StageRun(self.tracker, run_id)


class Tracker:
    """Wraps the MLflow store of one build; `Tracker.disabled()` records nothing."""

    def __init__(self, cfg: Any, experiment: str):
        self.cfg, self.uri, self.experiment = cfg, cfg.uri, experiment
        self.parent_id: str | None = None

    def start(self) -> None:
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        try:
            exp = mlflow.get_experiment_by_name(self.experiment)
            if exp is None:
                location = None
                if "://" not in self.uri or self.uri.startswith(("sqlite:", "file:")):
                    location = Path(self.cfg.artifact_location).resolve().as_uri()
                try:
                    mlflow.create_experiment(self.experiment, artifact_location=location)
                except mlflow.exceptions.MlflowException:  # created meanwhile by a parallel job
                    pass
            mlflow.set_experiment(self.experiment)
        except Exception as e:  # connection errors come in many types; one clear message
            raise EdgebuildError(f"cannot reach the MLflow tracking store {self.uri}: {str(e).splitlines()[0][:200]}",
                                 "start the server / fix tracking.uri, or run with tracking=none") from None

    @contextlib.contextmanager
    def _run(self, name: str, nested: bool, parent: str | None = None, tags: dict[str, str] | None = None
             ) -> Iterator[str]:
        import mlflow

        client = mlflow.MlflowClient()
        exp_id = mlflow.get_experiment_by_name(self.experiment).experiment_id
        all_tags = {"mlflow.runName": name, **(tags or {})}
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        run = client.create_run(exp_id, tags=all_tags, run_name=name)
        run_id = run.info.run_id
        status = "FAILED"
        try:
            yield run_id
            status = "FINISHED"
        except BaseException as e:
            status = _status_for(e)
            with contextlib.suppress(Exception):
                client.set_tag(run_id, "error", f"{type(e).__name__}: {e}"[:5000])
            raise
        finally:
            client.set_terminated(run_id, status=status)

    @contextlib.contextmanager
    def build(self, name: str, params: dict[str, Any], tags: dict[str, Any]) -> Iterator[StageRun]:
        self.start()
        with self._run(name, nested=False, tags={k: str(v) for k, v in tags.items()}) as run_id:
            self.parent_id = run_id
            run = StageRun(self, run_id)
            run.record({}, params=params)
            yield run

    @contextlib.contextmanager
    def stage(self, name: str, tags: dict[str, Any]) -> Iterator[StageRun]:
        with self._run(name, nested=True, parent=self.parent_id, tags={k: str(v) for k, v in tags.items()}) as run_id:
            yield StageRun(self, run_id)

    def set_tags(self, tags: dict[str, Any]) -> None:
        import mlflow

        for k, v in tags.items():
            mlflow.MlflowClient().set_tag(self.parent_id, k, str(v))


class NullTracker:
    """tracking=none: same interface, records nothing."""

    parent_id = None
    experiment = None

    @contextlib.contextmanager
    def build(self, name: str, params: dict[str, Any], tags: dict[str, Any]) -> Iterator[StageRun]:
        yield StageRun(None, None)

    @contextlib.contextmanager
    def stage(self, name: str, tags: dict[str, Any]) -> Iterator[StageRun]:
        yield StageRun(None, None)

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass


def make_tracker(cfg: Any, experiment: str) -> Tracker | NullTracker:
    return Tracker(cfg, experiment) if cfg.enabled else NullTracker()


def _params(flat: dict[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in flat.items():
        s = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
        out[k[:250]] = s[:PARAM_MAX]
    return out


def write_temp_json(data: Any, name: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="edgebuild-"))
    path = folder / name
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def search_runs(uri: str, **kwargs: Any) -> Any:
    """Read recorded runs back (reports, paper tables)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(**kwargs)
