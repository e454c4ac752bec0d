"""MLflow tracking: the only module that imports mlflow.

One parent run per build, one nested run per stage (cache hits included, tagged as such), child runs
for a stage's sub-steps. Every run ends FINISHED, FAILED or KILLED (Ctrl-C), never RUNNING.
The parent run also carries the final stage's metrics, the data as its dataset input (digest = the
data fingerprint, on every stage run too) and the final deployable as an MLflow logged model: a pyfunc
with a plain-Python loader module (edgebuild/tracking/edgebuild_pyfunc.py, nothing pickled), optionally
registered (`tracking.register`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgebuild.errors import EdgebuildError

log = logging.getLogger(__name__)
PARAM_MAX = 6000


def _status_for(exc: BaseException | None) -> str:
    if exc is None:
        return "FINISHED"
    if isinstance(exc, KeyboardInterrupt) or (isinstance(exc, SystemExit) and exc.code not in (0, None)):
        return "KILLED"
    return "FAILED"


def is_series(v: Any) -> bool:
    """A list of numbers in a stage's metrics is a per-epoch (per-step) series."""
    return isinstance(v, (list, tuple)) and bool(v) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def split_metrics(metrics: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """Numbers become MLflow metrics; anything else (precisions, proxy device) becomes a tag. A series
    (list of numbers) is left to `record`, which logs it with one step per element."""
    nums, tags = {}, {}
    for k, v in metrics.items():
        if is_series(v):
            continue
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

    def log_input(self, dataset: dict[str, Any] | None, context: str) -> None:
        """The data as this run's dataset input (MLflow's Dataset column): name, source, digest."""
        if self.tracker is None or not dataset:
            return
        import mlflow
        from mlflow.entities import DatasetInput, InputTag

        tags = [InputTag("mlflow.data.context", context), InputTag("fingerprint", dataset["fingerprint"])]
        entity = _dataset(dataset)._to_mlflow_entity()
        mlflow.MlflowClient().log_inputs(self.run_id, datasets=[DatasetInput(entity, tags)])

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
        from mlflow.entities import Metric

        nums, str_tags = split_metrics(metrics)
        client = mlflow.MlflowClient()
        if params:
            mlflow.log_params(_params(params), run_id=self.run_id)
        if nums:
            mlflow.log_metrics(nums, run_id=self.run_id)
        for k, series in metrics.items():  # per-epoch series: step 1..n, so MLflow charts them per epoch
            if is_series(series):
                ts = int(time.time() * 1000)
                client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, i + 1) for i, v in enumerate(series)
                                                       if math.isfinite(v)])
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

        check_reachable(self.uri)
        check_store(self.cfg)
        mlflow.set_tracking_uri(self.uri)
        try:
            with _store_lock(self.uri):
                self._open_experiment()
        except OSError as e:
            raise EdgebuildError(f"cannot write the MLflow store {self.uri}: {e.filename or ''} {e.strerror or e}",
                                 "set tracking.uri to a writable path, or run with tracking=none") from None

    def _open_experiment(self) -> None:
        import mlflow

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

    def log_model(self, deploy_dir: Path, dataset: dict[str, Any] | None = None) -> str | None:
        """The final deployable as an MLflow logged model of the parent run (a pyfunc whose loader module
        runs it with its runtime). The parent's metrics (record them first) are linked to it, and
        `tracking.register=NAME` registers it. Returns the model URI."""
        import mlflow
        from mlflow.models import Model, ModelSignature
        from mlflow.types import Schema, TensorSpec

        spec = json.loads((Path(deploy_dir) / "model.json").read_text())
        runtime = {"openvino": "openvino", "onnx": "onnxruntime"}.get(spec["format"])
        if runtime is None:
            log.warning("no MLflow model for a %s deployable", spec["format"])
            return None
        import numpy as np

        shape = (-1, *[int(d) for d in spec["input_shape"][1:]])
        signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), shape, name="input")]))
        register = self.cfg.get("register") or None
        tags = {"recipe": spec.get("recipe"), "stage": spec.get("stage"), "format": spec["format"],
                "precision": spec.get("precision"), "data_fingerprint": (dataset or {}).get("fingerprint")}
        import warnings

        requirements = _requirements(runtime, spec)
        with warnings.catch_warnings(), _known_distributions(requirements):
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")  # the signature says
            info = Model.log(artifact_path=None, name="model", flavor=mlflow.pyfunc, run_id=self.parent_id,
                             loader_module=PYFUNC_CODE.stem, code_paths=[str(PYFUNC_CODE)],
                             data_path=str(deploy_dir), signature=signature,
                             pip_requirements=requirements, registered_model_name=register,
                             tags={k: str(v) for k, v in tags.items() if v is not None},
                             model_type="edgebuild-deployable")
        return info.model_uri


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

    def log_model(self, deploy_dir: Path, dataset: dict[str, Any] | None = None) -> str | None:
        return None


def make_tracker(cfg: Any, experiment: str) -> Tracker | NullTracker:
    return Tracker(cfg, experiment) if cfg.enabled else NullTracker()


PYFUNC_CODE = Path(__file__).with_name("edgebuild_pyfunc.py")  # imported by MLflow only, never by edgebuild


@contextlib.contextmanager
def _known_distributions(requirements: list[str]) -> Iterator[None]:
    """MLflow checks a logged model's pins against the environment through a map of every installed
    distribution's modules, built by reading every distribution's file list: 4-7 s of each build here.
    Our pins were just read from those distributions' metadata, so the map needs only them (a module name
    equal to the distribution name); MLflow's own scan returns if its private map ever moves."""
    from mlflow.utils import requirements_utils as ru

    if getattr(ru, "_MODULES_TO_PACKAGES", ...) is not None:  # already built (or renamed): nothing to save
        yield
        return
    names = [r.split("==")[0] for r in requirements]
    ru._MODULES_TO_PACKAGES = {n: [n] for n in names}
    try:
        yield
    finally:
        ru._MODULES_TO_PACKAGES = ru._PACKAGES_TO_MODULES = None


def _requirements(runtime: str, spec: dict[str, Any]) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    cascade = spec.get("deploy_cascade") or {}
    resizes = bool(cascade) and list(cascade["big_input_shape"][2:]) != list(spec["input_shape"][2:])
    out = []
    for name in ("mlflow", "numpy", runtime, *(["torch"] if resizes else [])):  # torch: the pyfunc's resize
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


def _dataset(info: dict[str, Any]) -> Any:
    """An MLflow dataset naming edgebuild's data: a folder source when it has a root, else the code
    source with the data's signature. Its digest is the data fingerprint, cut to the length MLflow allows:
    log_inputs rejects longer digests (mlflow.utils.validation.MAX_DATASET_DIGEST_SIZE, 36 in MLflow 3.17;
    the SQL store's datasets.digest is VARCHAR(36)). The input's `fingerprint` tag has all of it."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.utils.validation import MAX_DATASET_DIGEST_SIZE

    root = info.get("root")
    if root:
        import warnings

        with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the local source
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(Path(str(root)).expanduser().resolve()))
    else:
        source = CodeDatasetSource({"edgebuild.data": str(info["name"]), "signature": str(info.get("signature"))})
    return MetaDataset(source, name=str(info["name"]), digest=str(info["fingerprint"])[:MAX_DATASET_DIGEST_SIZE])


def check_store(conf: Any) -> None:
    """A local MLflow store (SQLite or file) and artifact location must be writable: checked right
    after planning, before any stage work, so an unwritable store is one message (exit 2), not a
    traceback after the first stage, and no run is left RUNNING."""
    if not conf.enabled:
        return
    uri = str(conf.uri)
    folders: list[tuple[str, Path, str]] = []
    if uri.startswith("sqlite:///"):
        folders.append((f"the MLflow store {uri}", Path(uri[len("sqlite:///"):]).parent, "tracking.uri"))
    elif uri.startswith("file:") or "://" not in uri:
        folders.append((f"the MLflow store {uri}", Path(uri[len("file://"):] if uri.startswith("file://")
                                                        else uri[len("file:"):] if uri.startswith("file:") else uri),
                        "tracking.uri"))
    else:
        return  # a server: check_reachable() at the build's start
    location = str(conf.artifact_location)
    if "://" not in location or location.startswith("file:"):
        folders.append((f"the MLflow artifact location {location}", Path(location.removeprefix("file://")),
                        "tracking.artifact_location"))
    for what, folder, key in folders:
        problem = _unwritable(folder.expanduser())
        if problem:
            raise EdgebuildError(f"cannot write {what}: {problem}",
                                 f"set {key} to a writable path (e.g. tracking.uri=sqlite:///outputs/mlflow.db "
                                 f"tracking.artifact_location=outputs/mlartifacts), or run with tracking=none")


def _unwritable(folder: Path) -> str | None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".edgebuild-write-check-"):
            pass
    except OSError as e:
        return f"{e.filename or folder}: {e.strerror or e}"
    return None


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


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Parallel sweep jobs opening a new SQLite store would both run MLflow's schema migrations and
    collide ("duplicate column"): one process at a time creates the store and the experiment."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """A tracking server that does not answer fails the build at its start, in seconds (MLflow's own
    client would retry with backoff for minutes), before any stage ran."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:  # it answered (e.g. 401 behind a proxy): reachable, MLflow takes over
        return
    except (urllib.error.URLError, OSError) as e:
        raise EdgebuildError(f"cannot reach the MLflow tracking server {uri}: {getattr(e, 'reason', e)}",
                             "start it (mlflow server --host HOST --port PORT), fix tracking.uri, or run with "
                             "tracking=none") from None


# ------------------------------------------------------------------------------ reading runs back
SWEEP_RUN_TAG = "sweep_level"  # marks the run holding a sweep's Pareto front (not a build)


def _client(uri: str) -> Any:
    import mlflow

    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(uri)


def _as_dict(run: Any, experiment: str) -> dict[str, Any]:
    return {"run_id": run.info.run_id, "name": run.info.run_name, "experiment": experiment,
            "status": run.info.status, "start_time": run.info.start_time, "end_time": run.info.end_time,
            "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
            "parent": run.data.tags.get("mlflow.parentRunId"),
            "params": dict(run.data.params), "metrics": dict(run.data.metrics)}


def read_builds(uri: str, experiments: list[str] | None = None, sweep: str | None = None,
                run_ids: list[str] | None = None) -> list[dict[str, Any]]:
    """Recorded builds (parent runs) with their stage runs in execution order, oldest build first.
    Select by experiment names, a sweep id, or parent run ids; nothing selected = every build."""
    client = _client(uri)
    exps = {e.experiment_id: e.name for e in client.search_experiments()}
    if experiments:
        unknown = [n for n in experiments if n not in exps.values()]
        if unknown:
            raise EdgebuildError(f"no MLflow experiment named {', '.join(unknown)} in {uri}",
                                 f"use one of: {', '.join(sorted(exps.values())) or '(none recorded yet)'}")
        exps = {i: n for i, n in exps.items() if n in experiments}
    if run_ids:
        from mlflow.exceptions import MlflowException

        found = []
        for rid in run_ids:
            try:
                found.append(client.get_run(rid))
            except MlflowException:
                raise EdgebuildError(f"no MLflow run {rid} in {uri}",
                                     "copy run ids from summary.json (mlflow_run_id) or the MLflow UI") from None
        exps = {r.info.experiment_id: exps.get(r.info.experiment_id, "?") for r in found}
    runs = [_as_dict(r, exps[r.info.experiment_id])
            for r in client.search_runs(list(exps), max_results=50000)] if exps else []
    parents = [r for r in runs if r["parent"] is None and SWEEP_RUN_TAG not in r["tags"]]
    if sweep:
        parents = [r for r in parents if r["tags"].get("sweep_id") == sweep]
    if run_ids:
        parents = [r for r in parents if r["run_id"] in run_ids]
    if not parents:
        what = f"sweep {sweep}" if sweep else "those runs" if run_ids else "the selected experiments"
        raise EdgebuildError(f"no recorded builds for {what} in {uri}",
                             "check --uri and the sweep id / experiment / run ids (the MLflow UI lists them)")
    for build in parents:
        build["stages"] = sorted((r for r in runs if r["parent"] == build["run_id"]), key=lambda r: r["start_time"])
    return sorted(parents, key=lambda r: r["start_time"])


def download(uri: str, run_id: str, path: str, into: Path) -> Path | None:
    """One artifact file or folder of a run, copied into `into`; None when the run has none there."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        if not client.list_artifacts(run_id, path):
            return None
        return Path(client.download_artifacts(run_id, path, str(into)))
    except (MlflowException, OSError):
        return None


def log_sweep_run(cfg: Any, experiment: str, sweep: str, metrics: dict[str, float], files: dict[str, Path]) -> str:
    """The sweep-level run: the Pareto front (plot, table) and the sweep's report, tagged with its id."""
    tracker = Tracker(cfg, experiment)
    tracker.start()
    with tracker._run(f"sweep-{sweep}", nested=False, tags={"sweep_id": sweep, SWEEP_RUN_TAG: "true"}) as run_id:
        StageRun(tracker, run_id).record(metrics, files={name: path for name, path in files.items() if path.exists()})
    return run_id
