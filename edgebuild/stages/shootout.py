"""shootout: one model through every installed runtime, FP32 and INT8 where the runtime quantizes, timed
with one protocol; the fastest candidate that meets the budget becomes the stage's artifact (and so the
build's deployable, measured and packaged on its own runtime).

- Candidates: one runtime per registered format (`targets.formats()`, the build's own runtime for its
  format), so a runtime added to `targets.RUNTIMES` joins without a change here. A runtime whose package
  is missing, or which cannot produce a candidate (an operator it cannot convert, INT8 that stays float),
  is skipped with a note naming why.
- Protocol: all candidates compiled at batch 1 in this process and timed by `evaluate.interleaved` in
  alternating rounds, so every runtime sees the same machine load. One process rather than one per
  runtime: the runtimes keep no busy-waiting threads between calls (ONNX Runtime's spinning, which slows
  other runtimes in the same process, is switched off at compile time), and a shared machine's load
  swings between processes minutes apart more than the gaps being compared.
- Quality: every candidate scored on the held-out split as the pipeline scores a deployable; drops are
  against the FP32 candidate of the build's runtime (what the build's first stage measured).
- The pick: fastest among the candidates meeting the recipe's and the target's budget (`budget.check`,
  latency = the interleaved median). None meets it: the most accurate is returned with a note, and the
  build fails (exit 1) with the table whatever the kept model's own check says (`budget.check_pick`:
  e.g. a latency limit every candidate missed interleaved, which the kept model alone may pass).
- Every candidate is a step (a nested MLflow run of the stage's run); the pick's step has "pick": true.
  The timings belong to the stage's cached result: a cached rebuild keeps its pick (the end-of-build
  interleaved pass still re-times the pick beside the other stages). The candidate set (runtime names and
  their packages' versions) is in the cache key: installing or upgrading a runtime reruns the shootout.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from edgebuild.artifact import Artifact, write_json
from edgebuild.config import bounded
from edgebuild.errors import EdgebuildError
from edgebuild.stage import Stage, StageResult

PRECISIONS = ("fp32", "int8")


@dataclass
class Shootout(Stage):
    kind: ClassVar[str] = "shootout"
    version: ClassVar[int] = 3  # 2: the rounds' spread (interleaved_min_ms / max_ms); 3: latency ties go to size
    # the budget decides the pick; the target's threads and device decide the timings
    uses: ClassVar[tuple[str, ...]] = ("data", "task", "calibration", "target", "budget")
    needs_float_input: ClassVar[bool] = True

    runtimes: list[str] = field(default_factory=list)  # empty: every registered runtime installed here
    precisions: list[str] = field(default_factory=lambda: list(PRECISIONS))
    rounds: int = bounded(5, ge=1)  # interleaved timing rounds (median of the per-round medians)
    # candidates within this fraction of the fastest are a tie, and the smallest of them is picked: a latency
    # gap inside the rounds' spread is noise, a 3x smaller file is flash and download on the device
    latency_tolerance: float = bounded(0.05, ge=0, le=1)

    def cache_inputs(self, cfg: Any) -> dict[str, Any]:
        """The candidate set: which runtimes would compete, at which package versions."""
        from edgebuild.targets import load_runtimes

        classes = load_runtimes()
        return {"candidates": {name: classes[name].versions() for name in candidate_names(cfg.target, self.runtimes)}}

    def check(self, cfg: Any) -> None:
        from edgebuild.targets import RUNTIMES

        unknown = [r for r in self.runtimes if r not in RUNTIMES]
        if unknown:
            raise EdgebuildError(f"shootout: unknown runtimes {unknown}", f"use some of: {', '.join(RUNTIMES)}")
        bad = [p for p in self.precisions if p not in PRECISIONS] or ([] if self.precisions else ["(none)"])
        if bad:
            raise EdgebuildError(f"shootout: precisions {bad} not supported", f"use some of: {', '.join(PRECISIONS)}")

    # ----------------------------------------------------------------------------------- build
    def run(self, ctx: Any) -> StageResult:
        from edgebuild import evaluate

        if ctx.input.kind != "torch":
            raise EdgebuildError(f"shootout needs a torch model; its input is {ctx.input.kind}",
                                 "point the stage's input to a torch stage (train, prune, ...)")
        notes: list[str] = []
        candidates = []  # (step name, context on the candidate's runtime, artifact, session at batch 1)
        for target in self._targets(ctx, notes):
            cctx = dataclasses.replace(ctx, target=target)
            for precision in self.precisions:
                name = f"{target.runtime.name}-{precision}"
                try:
                    artifact = self._produce(cctx, precision, ctx.workdir / name)
                    if artifact is None:
                        notes.append(f"{name}: skipped, the runtime has no post-training INT8")
                        continue
                    candidates.append((name, cctx, artifact, evaluate.load(artifact, cctx, 1)))
                except EdgebuildError as e:  # one runtime failing does not end the comparison
                    notes.append(f"{name}: skipped, {e.what}")
        if not candidates:
            raise EdgebuildError("shootout: no runtime produced a candidate (" + "; ".join(notes) + ")",
                                 "install a runtime's package (see README) or change stages.shootout.runtimes")
        rows = self._measure(ctx, candidates)
        pick, why = choose(rows, self.latency_tolerance)
        rows[pick]["pick"] = True
        for i, row in enumerate(rows):
            row["why"] = why[i]
            row["metrics"]["shootout/pick"] = float(i == pick)
        winner = rows[pick]
        notes.insert(0, f"pick: {winner['name']} ({winner['metrics']['latency/interleaved_ms']:.3f} ms interleaved, "
                        f"{len(rows)} candidates, {self.rounds} rounds in one process); "
                        + "; ".join(f"{r['name']}: {r['why']}" for r in rows if not r.get("pick")))
        write_json(ctx.workdir / "shootout.json", rows)
        metrics = {"shootout/candidates": len(rows), "shootout/met_budget": sum(r["budget_ok"] for r in rows),
                   "shootout/loadavg_1m": float(os.getloadavg()[0])}
        steps = [{"name": r["name"], "params": r["params"], "metrics": r["metrics"], "pick": bool(r.get("pick")),
                  "budget_ok": r["budget_ok"], "why": r["why"]} for r in rows]
        return StageResult(candidates[pick][2], metrics, files={"shootout": "shootout.json"}, steps=steps,
                           notes=notes)

    def _targets(self, ctx: Any, notes: list[str]) -> list[Any]:
        """The build's target on every candidate runtime that is installed and has the target's device."""
        out = []
        for name in candidate_names(ctx.target.cfg, self.runtimes):
            try:
                target = ctx.target.for_runtime(name)
                target.check()  # reads the devices: a missing package is an EdgebuildError/ImportError here
            except (EdgebuildError, ImportError) as e:
                notes.append(f"{name}: not a candidate, {getattr(e, 'what', e)}")
                continue
            if target.unmeasured:  # e.g. a GPU runtime without its GPU: no numbers to compare
                notes.append(f"{name}: not a candidate, unmeasured: {target.unmeasured}")
                continue
            out.append(target)
        return out

    def _produce(self, ctx: Any, precision: str, folder: Any) -> Artifact | None:
        """The candidate's deployable in `folder`: the input converted (fp32) or quantized (int8) by the
        candidate's runtime; None when the runtime cannot quantize."""
        from edgebuild.stages.quantize import verify_int8
        from edgebuild.targets import base

        runtime, source = ctx.target.runtime, ctx.input
        meta = {**source.meta, "runtime": runtime.name, "precision": precision,
                "deploy_runtime": runtime.name, "deploy_precision": precision}
        if precision == "fp32":
            artifact = runtime.deployable(source, folder, list(ctx.task.output_names))
            return Artifact(artifact.kind, artifact.root, artifact.files, meta)
        if not runtime.supports(base.QUANTIZE):
            return None
        folder.mkdir(parents=True)
        scratch = ctx.workdir / ".scratch" / folder.name
        scratch.mkdir(parents=True)
        request = base.QuantizeRequest(calibration=ctx.data.calibration(), output_names=list(ctx.task.output_names),
                                       meta=meta)
        try:
            artifact = runtime.quantize(source, request, folder, scratch).artifact
        finally:
            shutil.rmtree(ctx.workdir / ".scratch")
        verify_int8(ctx, artifact, f"shootout ({runtime.name} int8)")  # INT8 that stays float is no candidate
        return artifact

    def _measure(self, ctx: Any, candidates: list[tuple[str, Any, Artifact, Any]]) -> list[dict[str, Any]]:
        """Quality, size, load/first call and what ran per candidate; then all timed interleaved."""
        from edgebuild import budget, evaluate

        shape = ctx.input.meta["input_shape"]
        macs, params = evaluate.count_macs(ctx.input.load_torch(), shape)
        rows = []
        for name, cctx, artifact, session in candidates:
            quality, _ = evaluate.score(artifact, cctx)
            m: dict[str, Any] = {"macs": macs, "params": params, **quality,
                                 **evaluate.size_metrics(artifact.root, artifact.files), **session.runtime_info(),
                                 "latency/load_ms": session.load_ms,
                                 "latency/first_ms": evaluate.first_call_ms(session.bind(evaluate.sample_input(shape)))}
            rows.append({"name": name, "params": {"runtime": cctx.target.runtime.name,
                                                  "precision": artifact.meta["precision"], "format": artifact.kind},
                         "metrics": m})
        medians = evaluate.interleaved([c[3] for c in candidates], [shape] * len(candidates),
                                       ctx.cfg.eval.latency, self.rounds)
        primary, drop = ctx.task.primary_metric, ctx.task.drop_metric
        mine = (ctx.target.runtime.name, "fp32")  # the float model on the build's runtime: what drops are against
        own = [r for r in rows if (r["params"]["runtime"], r["params"]["precision"]) == mine]
        reference = (own or rows)[0]["metrics"].get(primary)
        for row, rounds in zip(rows, medians, strict=True):
            m = row["metrics"]
            m["latency/interleaved_ms"] = m["latency/p50_ms"] = float(np.median(rounds))
            m["latency/interleaved_min_ms"], m["latency/interleaved_max_ms"] = float(min(rounds)), float(max(rounds))
            if reference is not None and primary in m:
                m[drop] = (reference - m[primary]) * 100.0
            checked = budget.check(m, [("recipe", ctx.cfg.budget), ("target", ctx.cfg.target.budget)])
            row["budget_ok"] = checked["ok"]
            row["violations"] = [f"{c['metric']} {c['value'] if c['value'] is None else round(c['value'], 4)} "
                                 f"not {c['op']} {c['limit']}" for c in checked["checks"] if not c["ok"]]
        return rows


def candidate_names(target_cfg: Any, runtimes: list[str]) -> list[str]:
    """`runtimes` if given; else one runtime per registered format, the build's own runtime for its format
    (a stand-in sharing a format, like mcu, is not a candidate of its own)."""
    from edgebuild.targets import formats, runtime_class

    if runtimes:
        return list(runtimes)
    by_format = {f: cls.name for f, cls in formats().items()}
    own = runtime_class(target_cfg)
    by_format[own.format] = own.name
    return list(by_format.values())


def choose(rows: list[dict[str, Any]], tolerance: float = 0.0) -> tuple[int, list[str]]:
    """Index of the pick among rows meeting the budget: of those within `tolerance` of the fastest, the
    smallest on disk (else the most accurate: the build then fails its budget); and for every row why it
    was or was not picked."""
    ok = [i for i, r in enumerate(rows) if r["budget_ok"]]

    def ms(i: int) -> float:
        return rows[i]["metrics"]["latency/interleaved_ms"]

    def size(i: int) -> float:
        return rows[i]["metrics"].get("size/bytes", float("inf"))

    fastest = min(ok, key=ms) if ok else None
    tied = [i for i in ok if ms(i) <= ms(fastest) * (1 + tolerance)] if ok else []
    if ok:
        pick = min(tied, key=lambda i: (size(i), ms(i)))
    else:
        quality = [max((v for k, v in r["metrics"].items() if k.startswith(("acc/top1", "map/50_95"))), default=0.0)
                   for r in rows]
        pick = int(np.argmax(quality))
    why = []
    for i, r in enumerate(rows):
        if i == pick:
            if not ok:
                why.append("no candidate meets the budget; the most accurate")
            elif i == fastest or len(tied) == 1:
                why.append("fastest within the budget" + (", and the smallest of those within "
                                                           f"{tolerance:.0%} of it" if len(tied) > 1 else ""))
            else:
                why.append(f"within {tolerance:.0%} of the fastest (x{ms(i) / ms(fastest):.2f}) and the smallest: "
                           f"{size(i) / 1e6:.2f} MB vs {size(fastest) / 1e6:.2f} MB")
        elif not r["budget_ok"]:
            why.append("budget: " + ", ".join(r["violations"]))
        elif i in tied:
            why.append(f"a latency tie (x{ms(i) / ms(pick):.2f}), larger: {size(i) / 1e6:.2f} MB vs "
                       f"{size(pick) / 1e6:.2f} MB")
        else:
            why.append(f"slower: {ms(i):.3f} ms vs {ms(pick):.3f} ms (x{ms(i) / ms(pick):.2f})")
    return pick, why
