"""build(cfg): the one orchestrator. Validate everything, then for each stage: cache or run,
measure the same way, record, and finally package the deployable, check the budget, summarize."""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgebuild import __version__
from edgebuild.artifact import Artifact, write_json
from edgebuild.cache import Cache, Entry, cache_key
from edgebuild.errors import BudgetExceeded, EdgebuildError
from edgebuild.stage import Stage, build_stage

log = logging.getLogger(__name__)
SOURCE = "model"  # the name stages use to refer to the recipe's model before any stage ran


@dataclass
class Context:
    """What a stage may use. It writes only into `workdir`."""

    cfg: Any
    workdir: Path
    data: Any
    task: Any
    target: Any
    seed: int
    input: Artifact | None = None
    artifacts: dict[str, Artifact] = field(default_factory=dict)  # finished stages by name (+ "model")
    logger: Any = None  # callable(name) -> Lightning logger bound to this stage's MLflow run, or None

    def upstream(self, name: str) -> Artifact:
        return self.artifacts[name]


def plan(cfg: Any) -> list[tuple[str, Stage, str]]:
    """Validate the stage graph before any work: kinds, options, inputs and references, tasks."""
    from edgebuild.config import check_config
    from edgebuild.finetune import FitConfig, check_precision

    check_config(cfg)
    stages: list[tuple[str, Stage, str]] = []
    names: list[str] = []
    precision = {SOURCE: "fp32"}  # of each stage's output
    for name, node in (cfg.stages or {}).items():
        if node is None:  # `stages.export=null` switches a stage off
            continue
        stage = build_stage(name, node)
        source = stage.input or (names[-1] if names else SOURCE)
        for ref, role in [(source, "input"), *((r, "reference") for r in stage.references())]:
            if ref != SOURCE and ref not in names:
                later = ref in (cfg.stages or {})
                raise EdgebuildError(
                    f"stages.{name}: {role} {ref!r} " + ("comes later in the recipe" if later else "is not a stage"),
                    f"name an earlier stage ({', '.join([SOURCE, *names])})",
                )
        if cfg.task.name not in stage.tasks:
            raise EdgebuildError(f"stage {name!r} (kind {stage.kind}) does not apply to task {cfg.task.name}",
                                 f"remove it from the recipe; it supports: {', '.join(stage.tasks)}")
        if stage.needs_float_input and precision[source] != "fp32":
            raise EdgebuildError(f"stages.{name}: its input {source!r} is already quantized ({precision[source]}); "
                                 f"{stage.kind} needs an fp32 model",
                                 f"point stages.{name}.input to an fp32 stage, and quantize or compress last")
        precision[name] = stage.output_precision or precision[source]
        if isinstance(stage, FitConfig):
            stage.check_optimizer(f"stages.{name}")
            check_precision(cfg.trainer)
        stage.check(cfg)
        stages.append((name, stage, source))
        names.append(name)
    if not stages:
        raise EdgebuildError("the recipe has no stages", "add at least one stage under `stages:`")
    from edgebuild.targets import runtime_class

    runtime_class(cfg.target).check_plan(cfg.target, precision[names[-1]], names[-1])
    return stages


def _plain(node: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def git_info() -> dict[str, str]:
    from edgebuild.config import ROOT

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"git_sha": git("rev-parse", "HEAD") or "unknown", "git_dirty": str(bool(git("status", "--porcelain")))}


class Builder:
    def __init__(self, cfg: Any, run_dir: Path, recipe: str, tags: dict[str, Any] | None = None):
        from edgebuild.targets import make_target
        from edgebuild.tasks import make_task

        self.cfg, self.run_dir, self.recipe = cfg, Path(run_dir), recipe
        self.extra_tags = dict(tags or {})  # e.g. the sweep id of a multirun
        self.stages = plan(cfg)
        from edgebuild.tracking import check_store

        check_store(cfg.tracking)  # an unwritable MLflow store stops the build before any work
        self.task = make_task(cfg.task)
        self.target = make_target(cfg.target)
        self.target.check()
        self.cache = Cache(Path(cfg.cache.dir), enabled=cfg.cache.enabled, scratch=self.run_dir / "work")
        self.cache.check_writable()
        self.data = self.task.datamodule(cfg.data, Path(cfg.cache.dir))
        self.seconds: dict[str, dict[str, float]] = {}  # per stage: its own work, and measuring its deployable
        self.import_seconds = 0.0  # libraries a stage loads on first use (Lightning): the process's cost
        self.data_seconds = 0.0  # decoding the images (once per cache.dir): the data's cost, not a stage's
        self.artifacts: dict[str, Artifact] = {}
        self.measured: dict[str, dict[str, Any]] = {}
        self.measure_entries: dict[str, Entry] = {}
        self._targets: dict[str, Any] = {}  # the build's target on each runtime an artifact names (target_for)

    # ------------------------------------------------------------------------------- keys
    def _uses(self, section: str) -> Any:
        cfg = self.cfg
        return {
            "data": self.data.fingerprint,
            "task": {k: v for k, v in _plain(cfg.task).items() if v is not None},  # unset options leave keys alone
            # the batch size shapes what training learns, but is not part of the data's identity
            "trainer": {**{k: v for k, v in _plain(cfg.trainer).items() if k not in ("enable_progress_bar",)},
                        "batch_size": cfg.data.batch_size},
            "calibration": _plain(cfg.data.calibration),
            "target_format": self.target.format,
            "target": {k: v for k, v in _plain(cfg.target).items() if k not in ("budget", "require_device")},
            "budget": {"recipe": _plain(cfg.budget), "target": _plain(cfg.target.budget)},  # a stage choosing by it
        }[section]

    def stage_key(self, stage: Stage, inputs: list[Artifact]) -> str:
        extra = stage.cache_inputs(self.cfg)
        return cache_key({"kind": stage.kind, "version": stage.version, "params": stage.params(),
                          "inputs": [a.digest for a in inputs], "seed": self.cfg.seed,
                          "uses": {s: self._uses(s) for s in stage.uses},
                          **({"extra": extra} if extra else {})})  # absent when empty: other stages' keys unchanged

    def measure_key(self, artifact: Artifact) -> str:
        target = {k: v for k, v in _plain(self.cfg.target).items() if k not in ("budget", "require_device", "spec")}
        evalc = {k: v for k, v in _plain(self.cfg.eval).items() if k not in ("latency", "profile", "stream")}
        return cache_key({"measure": 1, "artifact": artifact.digest, "target": target, "device": self.target.device,
                          "eval": evalc, "data": self.data.fingerprint, "task": _plain(self.cfg.task),
                          **({"runtime": artifact.meta["runtime"]} if artifact.meta.get("runtime") else {})})

    # ---------------------------------------------------------------------------- source
    def source(self) -> Artifact:
        """The recipe's model as an artifact (cached like a stage, keyed by its description)."""
        from edgebuild.artifact import file_digest

        model_cfg = _plain(self.cfg.model)
        if model_cfg.get("bn_momentum") is None:  # unset: the key it had before the option, so caches stay valid
            model_cfg.pop("bn_momentum", None)
        weights = self.cfg.model.weights
        local = Path(weights).expanduser() if weights else None
        wdigest = file_digest(local) if local and local.exists() else weights
        key = cache_key({"source": model_cfg, "weights": wdigest, "seed": self.cfg.seed, "task": _plain(self.cfg.task),
                         "classes": self.data.num_classes, "input_shape": self.data.input_shape})

        def produce(folder: Path) -> dict[str, Any]:
            import torch

            from edgebuild.models import build_model

            torch.manual_seed(self.cfg.seed)
            model = build_model(self.cfg.model, self.data)
            model = self.task.prepare_model(model, self.data)
            meta = {**self.data.meta(), **self.task.deploy_meta(), "model": self.cfg.model.name}
            art = Artifact.save_torch(model, folder / "artifact", meta)
            art.digest = key  # identified by its description: pickles of equal models may differ
            return {"artifact": art.to_json(relative_to=folder)}

        entry = self.cache.get(key) or self.cache.put(key, produce, "the model source")
        return Artifact.from_json(entry.record["artifact"], relative_to=entry.path)

    # ----------------------------------------------------------------------------- stages
    def run_stage(self, name: str, stage: Stage, source: str, srun: Any) -> tuple[Entry, Entry]:
        inputs = [self.artifacts[source], *(self.artifacts[r] for r in stage.references())]
        key = self.stage_key(stage, inputs)

        def verify(path: Path, record: dict[str, Any]) -> bool:
            return Artifact.from_json(record["artifact"], relative_to=path).verify()

        def produce(folder: Path) -> dict[str, Any]:
            from edgebuild.data import for_input

            # a model whose input resolution changed is trained and calibrated at its own size
            data = for_input(self.data, self.artifacts[source].meta.get("input_shape"))
            ctx = Context(cfg=self.cfg, workdir=folder / "artifact", data=data, task=self.task, target=self.target,
                          seed=self.cfg.seed, input=self.artifacts[source], artifacts=dict(self.artifacts),
                          logger=srun.logger if srun.run_id else None)
            ctx.workdir.mkdir(parents=True)
            t_data = time.perf_counter()
            _ = self.data.splits  # decoded on first use: timed apart, so stage seconds compare with a plain loop
            self.data_seconds += time.perf_counter() - t_data
            if getattr(stage, "epochs", 0):  # a training stage: Lightning's import (3-5 s) is the process's, once
                t_import = time.perf_counter()
                import pytorch_lightning  # noqa: F401
                self.import_seconds += time.perf_counter() - t_import
            log.info("stage %s (%s): running", name, stage.kind)
            t0 = time.perf_counter()
            result = stage.run(ctx)
            return {"artifact": result.artifact.to_json(relative_to=folder), "metrics": result.metrics,
                    "files": result.files, "steps": result.steps, "notes": result.notes,
                    "seconds": time.perf_counter() - t0, "key": key, "kind": stage.kind, "version": stage.version}

        t0, data_before, import_before = time.perf_counter(), self.data_seconds, self.import_seconds
        entry = self.cache.get(key, verify) or self.cache.put(key, produce, f"stage {name!r} ({stage.kind})")
        t_measure = time.perf_counter()
        artifact = Artifact.from_json(entry.record["artifact"], relative_to=entry.path)
        measured = self.measure(artifact, name)
        # the stage's own work apart from measuring its deployable (compile, held-out accuracy, latency), so a
        # training stage's seconds compare with a training loop's; the data's decoding is neither
        self.seconds[name] = {"stage": t_measure - t0 - (self.data_seconds - data_before)
                              - (self.import_seconds - import_before),
                              "measure": time.perf_counter() - t_measure}
        self.artifacts[name] = artifact
        self.measure_entries[name] = measured
        return entry, measured

    def measure(self, artifact: Artifact, name: str) -> Entry:
        from edgebuild.evaluate import measure_static

        key = self.measure_key(artifact)

        def verify(path: Path, record: dict[str, Any]) -> bool:
            return Artifact.from_json(record["deployable"], relative_to=path).verify()

        def produce(folder: Path) -> dict[str, Any]:
            t0 = time.perf_counter()
            metrics, deployable, tables = measure_static(artifact, folder / "deploy", self._measure_ctx(artifact))
            if deployable.root != folder / "deploy":  # already in the target format: keep a copy beside
                (folder / "deploy").mkdir(parents=True, exist_ok=True)
                for f in deployable.files:
                    shutil.copy2(deployable.root / f, folder / "deploy" / f)
                deployable = Artifact(deployable.kind, folder / "deploy", deployable.files, deployable.meta)
            write_json(folder / "tables.json", tables)
            return {"deployable": deployable.to_json(relative_to=folder), "metrics": metrics,
                    "seconds": time.perf_counter() - t0}

        return self.cache.get(key, verify) or self.cache.put(key, produce, f"stage {name!r}'s deployable")

    def target_for(self, artifact: Artifact) -> Any:
        """The target an artifact is measured on: the build's, unless a stage chose the artifact's runtime
        (meta "runtime", e.g. a runtime shootout's pick): the same device and threads on that runtime."""
        name = artifact.meta.get("runtime") or self.target.cfg.runtime
        if name not in self._targets:  # one Target per runtime: its device lookup imports and queries the runtime
            self._targets[name] = self.target.for_runtime(name)
        return self._targets[name]

    def _measure_ctx(self, artifact: Artifact) -> Context:
        return Context(cfg=self.cfg, workdir=self.run_dir, data=self.data, task=self.task,
                       target=self.target_for(artifact), seed=self.cfg.seed)

    # ------------------------------------------------------------------------------ build
    def build(self) -> dict[str, Any]:
        """run -> measure -> record, per stage; then package, budget, summary."""
        from edgebuild import budget as budgets
        from edgebuild import summary as summaries
        from edgebuild.evaluate import Drops
        from edgebuild.tracking import make_tracker

        cfg = self.cfg
        t_build = time.perf_counter()
        tracker = make_tracker(cfg.tracking, cfg.tracking.experiment or f"edgebuild/{self.recipe}")
        tags = {"recipe": self.recipe, "edgebuild_version": __version__, "target": cfg.target.name,
                "task": cfg.task.name, "status": "running", **git_info(),
                "seed": cfg.seed, "data_fingerprint": self.data.fingerprint, **summaries.environment(),
                **self.extra_tags}
        summary = summaries.start(self.recipe, cfg, self.target, self.run_dir, tags)
        drops = Drops(self.task)
        with tracker.build(self.recipe, flatten(_plain(cfg)), tags) as parent:
            summary["mlflow_run_id"] = parent.run_id
            summary["mlflow_experiment"] = tracker.experiment
            dataset = self.dataset_info()
            try:
                parent.log_input(dataset, "build")
                self.artifacts["model"] = self.source()
                previous: dict[str, Any] = {}
                runs: dict[str, Any] = {}  # stage runs by name, for what is measured after the last stage
                for name, stage, source in self.stages:
                    t0, data_before = time.perf_counter(), self.data_seconds
                    with tracker.stage(name, {"kind": stage.kind, "stage_version": stage.version}) as srun:
                        srun.log_input(dataset, name)
                        entry, measured = self.run_stage(name, stage, source, srun)
                        deployable = Artifact.from_json(measured.record["deployable"], relative_to=measured.path)
                        metrics, reports = self.stage_metrics(name, entry, measured, deployable,
                                                                   self.measured.get(source, previous))
                        drops.add(metrics)
                        seconds = self.seconds[name]["stage"]
                        metrics["stage/seconds"] = seconds
                        metrics["stage/measure_seconds"] = self.seconds[name]["measure"]
                        metrics["stage/build_seconds"] = entry.record.get("seconds", 0.0)
                        self.record_stage(srun, name, stage, source, entry, measured, deployable, metrics,
                                          reports)
                        runs[name] = srun
                    self.measured[name] = previous = metrics
                    total = time.perf_counter() - t0 - (self.data_seconds - data_before)
                    summary["notes"] += [f"{name}: {n}" for n in entry.record.get("notes", [])]
                    summary["stages"].append(summaries.stage_row(name, stage, source, entry, deployable,
                                                                 {**self.seconds[name], "total": total}, metrics))
                    summary.update(summaries.pick(name, entry.record.get("steps", [])))
                self.remeasure(summary, runs)
                self.stream(summary, runs)
                deploy_dir = self.package(self.stages[-1][0])
                summary["deploy"] = str(deploy_dir)
                if self.target.unmeasured:
                    summary["notes"].append(f"unmeasured: {self.target.unmeasured}: target {cfg.target.name} records "
                                            "no latency or quality (no CPU numbers stand in for its device); "
                                            "latency/estimate_ms is the spec's roofline")
                elif self.target.is_proxy:
                    summary["notes"].append(f"target device {cfg.target.device} is not on this machine: latency was "
                                            f"measured on the CPU as a proxy (latency/proxy_device)")
                summary["data"] = self.data.split_origins()  # where each split came from
                summary["data_seconds"] = round(self.data_seconds, 3)
                summary["import_seconds"] = round(self.import_seconds, 3)
                final = summary["stages"][-1]["metrics"]
                summary["budget"] = budgets.check_pick(
                    budgets.check(final, [("recipe", cfg.budget), ("target", cfg.target.budget)]), summary.get("pick"))
                for c in summary["budget"]["checks"]:  # a limit nothing could measure is not met, and says why
                    if c["value"] is None and self.target.unmeasured:
                        c["value"] = f"unmeasured: {self.target.unmeasured}"
                # the final deployable's metrics on the parent too (the same keys as its stage run); then the
                # logged model, to which MLflow links the run's metrics
                parent.record({**final, "budget/ok": summary["budget"]["ok"]})
                if cfg.tracking.log_model:
                    summary["mlflow_model_uri"] = tracker.log_model(deploy_dir, dataset)
                summary["seconds"] = time.perf_counter() - t_build
                path = summaries.write(summary, self.run_dir)
                status = "ok" if summary["budget"]["ok"] else "budget_violated"
                tracker.set_tags({"status": status, "budget_ok": summary["budget"]["ok"]})
                parent.record({"build/seconds": summary["seconds"]},
                              files={"summary": path, "summary_md": path.with_suffix(".md")},
                              folders={"deploy": deploy_dir} if cfg.tracking.log_model else None)
            except BaseException as e:
                tracker.set_tags({"status": "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"})
                raise
        summaries.print_summary(summary, path)
        if not summary["budget"]["ok"]:
            raise BudgetExceeded(summary)
        return summary

    def stage_metrics(self, name: str, entry: Entry, measured: Entry, deployable: Artifact,
                      input_metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Path]]:
        """Cached measurement + the stage's own metrics + what is re-measured every build (latency, what
        ran, the opt-in profile)."""
        from edgebuild import profile
        from edgebuild.evaluate import inherit_counts, measure_runtime

        metrics: dict[str, Any] = dict(measured.record["metrics"])
        inherit_counts(metrics, input_metrics)
        metrics.update(entry.record["metrics"])
        ctx = self._measure_ctx(deployable)
        reports: dict[str, Path] = {}
        metrics.update(measure_runtime(deployable, ctx, metrics.get("macs"), self.run_dir / "targets" / name, reports))
        profile_file, profiled = profile.maybe_run(deployable, ctx, self.run_dir / "profile" / f"{name}.json")
        metrics.update(profiled)
        if profile_file:
            reports["profile"] = profile_file
        return metrics, reports

    def record_stage(self, srun: Any, name: str, stage: Stage, source: str, entry: Entry, measured: Entry,
                     deployable: Artifact, metrics: dict[str, Any], reports: dict[str, Path]) -> None:
        """The stage's run: metrics, params, cache tags, report files, the deployable; sub-steps as children."""
        params = flatten({"stage": {"name": name, "input": source, **stage.params()}})
        srun.record(metrics, params=params, tags={"cache_hit": str(entry.hit).lower(), "cache_key": entry.key},
                    files={"tables": measured.path / "tables.json",  # + the stage's report files
                           **{k: entry.path / "artifact" / v for k, v in entry.record.get("files", {}).items()}},
                    folders={"model": deployable.root} if self.cfg.tracking.log_model else None)
        if reports:  # the opt-in profile, the runtime's tables of what it compiled (e.g. Vela's per-operator CSV)
            srun.record({}, files=reports)
        for step in entry.record.get("steps", []):
            with srun.child(f"{name}/{step.get('name', 'step')}") as child:
                child.record(step.get("metrics", {}), params=step.get("params"))

    def remeasure(self, summary: dict[str, Any], runs: dict[str, Any]) -> None:
        """Per-stage ratios under one protocol: at the end of the build every stage's deployable (cached
        ones too: a compile and the timing, nothing else) is timed again, interleaved in rounds in one
        process. `latency/interleaved_ms` and `latency/speedup` (vs the first stage) go beside each stage's
        `latency/p50_ms` (timed when it finished, minutes apart; what budgets check) on its row and run."""
        from edgebuild.evaluate import interleaved_latency

        cfg = self.cfg.eval.latency
        if not (cfg.enabled and cfg.rounds):
            return
        names = [name for name, _, _ in self.stages]
        ctxs = {n: self._measure_ctx(self.deployable(n)) for n in names}
        names = [n for n in names if not ctxs[n].target.unmeasured]  # nothing of theirs runs here
        if not names:
            return
        deployables = [self.deployable(n) for n in names]
        results, medians = interleaved_latency(deployables, [ctxs[n] for n in names], int(cfg.rounds))
        for name, extra in zip(names, results, strict=True):
            self.measured[name].update(extra)  # the same dict as the stage's summary row
            runs[name].record(extra)
        summary["interleaved"] = {"rounds": int(cfg.rounds), "round_medians_ms": dict(zip(names, medians, strict=True))}

    def stream(self, summary: dict[str, Any], runs: dict[str, Any]) -> None:
        """`eval.stream.enabled`: the final deployable streams the generated video (edgebuild/stream): its
        stream/*, energy/* and battery/* metrics join the final stage's row, run and (with it) the parent run."""
        from edgebuild import stream

        name = self.stages[-1][0]
        deployable = self.deployable(name)
        metrics, notes = stream.maybe_run(deployable, self._measure_ctx(deployable))
        if metrics:
            self.measured[name].update(metrics)  # the same dict as the stage's summary row
            runs[name].record(metrics)
            summary["notes"] += [f"{name}: {n}" for n in notes]

    def deployable(self, name: str) -> Artifact:
        measured = self.measure_entries[name]
        return Artifact.from_json(measured.record["deployable"], relative_to=measured.path)

    def dataset_info(self) -> dict[str, Any]:
        """What tracking logs as the runs' dataset input: name, source, fingerprint."""
        root = self.cfg.data.get("root")
        return {"name": self.cfg.data.name, "root": str(Path(str(root)).expanduser()) if root else None,
                "signature": self.data.signature,
                "fingerprint": self.data.fingerprint}

    def package(self, name: str) -> Path:
        """The final deployable: model files plus model.json, runnable without edgebuild."""
        from edgebuild import package

        deployable = self.deployable(name)
        return package.write(deployable, self.measured[name], self.run_dir / "deploy", self.target_for(deployable),
                             self.recipe, name)


def build(cfg: Any, run_dir: Path, recipe: str, tags: dict[str, Any] | None = None) -> dict[str, Any]:
    from edgebuild.cache import DISK_FULL, disk_full_error

    try:
        return Builder(cfg, run_dir, recipe, tags).build()
    except OSError as e:  # outside the cache (the run folder, the MLflow store): the runs have ended FAILED
        if e.errno in DISK_FULL:
            raise disk_full_error(e.filename or run_dir, "the build's outputs", e) from None
        raise
