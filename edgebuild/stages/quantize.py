"""quantize: post-training INT8 from a representative calibration set (`data.calibration.size/seed`).

The target's runtime quantizes (`Runtime.quantize`, targets/base.py): NNCF for OpenVINO IRs
(`max_drop` = accuracy control: the layers that hurt the task's primary metric most on the validation
split go back to floating point), ONNX Runtime's `quantize_static` (QDQ ONNX), and so on. Options only
some runtimes have are capabilities, refused at plan time elsewhere.

Task-agnostic: any number of raw outputs; accuracy control scores them with the task's evaluator.
The result is compiled on the target's device and its runtime graph read: a model in which no compute
layer runs INT8 fails the stage, and the layers left in floating point are listed (`fp_layers.json`).

The runtime quantizes with the target device's own scheme (NNCF: nncf.TargetDevice CPU, GPU or NPU from
target.device), recorded as `quantize/target_device`. `calibration.method` picks how activation ranges are
estimated (the runtime's `calibration_methods`), `calibration.samples` how many calibration images are used.
`sensitivity: true` adds the per-layer INT8 report (stages/sensitivity.py: sensitivity.json/.csv/.md/.png);
`float_layers: auto` with `max_drop` keeps the fewest layers in float, chosen from it, that bring the drop of
the primary metric within max_drop (on any runtime with QUANTIZE_SENSITIVITY; without float_layers, max_drop
is NNCF's accuracy control).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from edgebuild.artifact import Artifact, write_json
from edgebuild.config import bounded
from edgebuild.errors import EdgebuildError
from edgebuild.stage import Stage, StageResult, check_patterns
from edgebuild.targets import base, require

log = logging.getLogger(__name__)

PRESETS = ("performance", "mixed")  # performance: symmetric activations; mixed: asymmetric activations
BIAS_CORRECTION = ("fast", "full", "none")
MODEL_TYPES = ("transformer",)
# options only some runtimes implement: option -> the capability it needs
OPTIONAL = {"bias_correction": base.QUANTIZE_BIAS_CORRECTION, "model_type": base.QUANTIZE_MODEL_TYPE,
            "max_drop": base.QUANTIZE_ACCURACY_CONTROL, "smooth_quant_alpha": base.QUANTIZE_SMOOTH_QUANT}
CALIBRATION_KEYS = ("method", "samples")
# every calibration method some runtime has (edgebuild's names; each runtime maps them to its tool's)
CALIBRATION_METHODS = ("minmax", "mean_minmax", "percentile", "entropy")
SLOWER_THAN = 1.1  # an INT8 speed-up below this is reported as "not faster" (noise on a shared machine)


@dataclass
class Quantize(Stage):
    kind: ClassVar[str] = "quantize"
    output_precision: ClassVar[str | None] = "int8"
    needs_float_input: ClassVar[bool] = True
    # 2: the target device's scheme (nncf.TargetDevice), calibration, sensitivity; 3: float_layers=auto weighs
    # each layer's profiled latency cost, the quantization device enters the cache key, calibrate_seconds
    version: ClassVar[int] = 3
    uses: ClassVar[tuple[str, ...]] = ("data", "task", "calibration", "target_format")

    preset: str = "performance"
    per_channel: bool = True  # one weight scale per output channel (false: per tensor)
    bias_correction: str | None = None  # fast | full | none; null = the tool's default (fast)
    ignored_names: list[str] = field(default_factory=list)  # layer names kept in floating point
    ignored_patterns: list[str] = field(default_factory=list)  # regexes over layer names, kept in floating point
    model_type: str | None = None  # "transformer": a transformer-aware scheme
    # SmoothQuant (activation outliers moved into the weights) on MatMul and Convolution layers: 0 moves
    # nothing, 1 all; NNCF 3.4 runs it only in its transformer scheme, so it needs model_type=transformer
    smooth_quant_alpha: float | None = bounded(None, ge=0, le=1)
    # accuracy control: max absolute drop of the task's primary metric
    max_drop: float | None = bounded(None, gt=0, lt=1)
    # (0.01 = 1 pp of top-1) on the validation split
    # calibration: {method: null | minmax | mean_minmax | percentile | entropy (the runtime's list),
    #               samples: null (= data.calibration.size) | N (the first N of that subset)}
    calibration: dict[str, Any] = field(default_factory=lambda: {"method": None, "samples": None})
    sensitivity: bool = False  # per-layer INT8 report: sensitivity.json/.csv/.md/.png
    sensitivity_top: int = bounded(5, ge=1)  # layers (lowest SQNR first) whose metric is checked in float
    float_layers: str | None = None  # "auto": keep in float the fewest layers that bring the drop within max_drop

    # ---------------------------------------------------------------------------- plan time
    def check(self, cfg: Any) -> None:
        choices = {"preset": (self.preset, PRESETS), "bias_correction": (self.bias_correction, BIAS_CORRECTION),
                   "model_type": (self.model_type, MODEL_TYPES)}
        for name, (value, allowed) in choices.items():
            if value is not None and value not in allowed:
                raise EdgebuildError(f"quantize: unknown {name} {value!r}", f"use one of: {', '.join(allowed)}")
        if self.max_drop is not None and not 0 < self.max_drop < 1:
            raise EdgebuildError(f"quantize: max_drop={self.max_drop} is not a fraction of the metric",
                                 "use e.g. max_drop=0.01 for at most 1 pp of top-1 (or 0.01 mAP)")
        if self.smooth_quant_alpha is not None and self.model_type != "transformer":
            raise EdgebuildError(f"quantize: smooth_quant_alpha={self.smooth_quant_alpha} needs "
                                 "model_type=transformer (NNCF runs SmoothQuant only in its transformer scheme)",
                                 "add model_type=transformer to the stage, or remove smooth_quant_alpha")
        check_patterns(self, ignored_patterns=self.ignored_patterns)
        auto = self.float_layers is not None
        if auto and self.float_layers != "auto":
            raise EdgebuildError(f"quantize: float_layers={self.float_layers!r} is not a choice",
                                 "use float_layers=auto (with max_drop), or list layers in ignored_names")
        if auto and self.max_drop is None:
            raise EdgebuildError("quantize: float_layers=auto needs max_drop (the drop it must reach)",
                                 "add e.g. max_drop=0.01 (at most 1 pp of the primary metric)")
        asked = {f"{k}={getattr(self, k)}": cap for k, cap in OPTIONAL.items() if getattr(self, k) is not None
                 and not (k == "max_drop" and auto)}  # with float_layers=auto, max_drop is ours, not NNCF's
        if self.sensitivity or auto:
            asked["sensitivity=true" if self.sensitivity else "float_layers=auto"] = base.QUANTIZE_SENSITIVITY
        require(cfg.target, self.kind, base.QUANTIZE, asked)
        self._check_calibration(cfg)

    def _check_calibration(self, cfg: Any) -> None:
        from edgebuild.targets import runtime_class

        unknown = sorted(set(self.calibration) - set(CALIBRATION_KEYS))
        if unknown:
            raise EdgebuildError(f"quantize: unknown calibration option(s) {unknown}",
                                 f"calibration takes: {', '.join(CALIBRATION_KEYS)}")
        samples = self.calibration.get("samples")
        if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
            raise EdgebuildError(f"quantize: calibration.samples={samples} is not a number of images",
                                 "use an integer >= 1, or null for data.calibration.size")
        method = self.calibration.get("method")
        if method is None:
            return
        runtime = runtime_class(cfg.target)
        if method not in runtime.calibration_methods:
            from edgebuild.targets import load_runtimes

            others = [n for n, c in load_runtimes().items() if method in c.calibration_methods]
            has = ", ".join(runtime.calibration_methods) or "none (only its default: calibration.method=null)"
            raise EdgebuildError(
                f"quantize: calibration.method={method!r} is not a method of target {cfg.target.name!r} "
                f"(runtime {cfg.target.runtime})",
                f"use one of: {has}" + (f"; {method!r} is in: {', '.join(others)}" if others else
                                        f"; edgebuild's methods are {', '.join(CALIBRATION_METHODS)}"))

    def cache_inputs(self, cfg: Any) -> dict[str, Any]:
        """The device whose scheme is applied (CPU, GPU, NPU): target=vpu after target=cpu must requantize."""
        from edgebuild.targets import runtime_class

        return {"quantization_device": runtime_class(cfg.target)(cfg.target).quantization_device()}

    # ------------------------------------------------------------------------------- build
    def run(self, ctx: Any) -> StageResult:
        calibration = ctx.data.calibration()
        samples = self.calibration.get("samples")
        if samples is not None and samples < len(calibration):
            calibration = calibration[:samples]  # the subset is already a seeded random draw
        scratch = ctx.workdir / ".float"  # the float model as the runtime sees it; removed at the end
        scratch.mkdir()
        auto = self.float_layers == "auto"
        request = base.QuantizeRequest(
            calibration=calibration, output_names=list(ctx.task.output_names), meta=self._meta(ctx.input),
            symmetric=self.preset == "performance", per_channel=self.per_channel,
            ignored_names=list(self.ignored_names), ignored_patterns=list(self.ignored_patterns), preset=self.preset,
            bias_correction=self.bias_correction,
            model_type=self.model_type, smooth_quant_alpha=self.smooth_quant_alpha,
            max_drop=None if auto else self.max_drop,
            calibration_method=self.calibration.get("method"))
        files: dict[str, str] = {}
        notes: list[str] = []
        diagnosis = None
        if self.sensitivity or auto:
            from edgebuild.stages import sensitivity

            diagnosis = sensitivity.diagnose(ctx, request, self.sensitivity_top, self.max_drop, auto)
            precision = sensitivity.precision_statement(ctx.target)
            files.update(sensitivity.write(diagnosis, ctx.workdir, ctx.task.primary_metric, precision))
            if auto:
                request = dataclasses.replace(request, ignored_names=[*request.ignored_names, *diagnosis.chosen])
        if request.max_drop is not None:
            request.validation = [(x, y) for x, y in ctx.data.batches("val", 1)]
            request.score = primary_metric_fn(ctx)
        started = time.perf_counter()
        result = ctx.target.runtime.quantize(ctx.input, request, ctx.workdir, scratch)
        artifact = result.artifact
        metrics: dict[str, Any] = {"quantize/calibrate_seconds": time.perf_counter() - started,
                                   "quantize/calibration_samples": int(len(calibration)),
                                   "quantize/weight_scales": "per_channel" if self.per_channel else "per_tensor",
                                   "quantize/target_device": result.scheme.get("target_device", "unknown"),
                                   "quantize/calibration_method": result.scheme.get("calibration_method", "default")}
        if diagnosis is not None:
            metrics.update({"quantize/sensitivity_seconds": diagnosis.seconds,
                            "quantize/sensitivity_quantizations": diagnosis.quantizations,
                            "quantize/sensitivity_evaluations": diagnosis.evaluations,
                            "quantize/sensitivity_layers": len(diagnosis.rows),
                            "quantize/float_precision": sensitivity.float_precision(ctx.target),
                            "quantize/val_float": diagnosis.float_metric, "quantize/val_int8": diagnosis.int8_metric})
            notes.append(f"sensitivity: {len(diagnosis.rows)} layers, worst SQNR "
                         f"{diagnosis.rows[0]['layer']} ({diagnosis.rows[0]['sqnr_db']:.1f} dB); cost "
                         f"{diagnosis.seconds:.1f} s, {diagnosis.quantizations} quantizations, "
                         f"{diagnosis.evaluations} validation evaluations" if diagnosis.rows else
                         "sensitivity: no quantizable layer left to rank")
            if auto:
                metrics.update({"quantize/float_layers_auto": len(diagnosis.chosen),
                                "quantize/val_mixed": diagnosis.chosen_metric,
                                "quantize/float_layers_cost_source": diagnosis.cost_source})
                cost = sensitivity.chosen_cost_ms(diagnosis)
                if cost is not None:
                    metrics["quantize/float_layers_cost_ms"] = cost
                notes.append(f"float_layers=auto kept {len(diagnosis.chosen)} layer(s) in {precision}"
                             + (f": {', '.join(diagnosis.chosen[:8])}" if diagnosis.chosen else "")
                             + ("" if diagnosis.within else f"; max_drop={self.max_drop} NOT reached even so"))
        if ctx.target.unmeasured:  # nothing runs here: the runtime checked its INT8 graph in quantize()
            shutil.rmtree(scratch)
            return StageResult(artifact, metrics, files=files,
                               notes=[*notes, f"unmeasured: {ctx.target.unmeasured}; INT8 checked in "
                                      "the graph only, no speed-up timed"])
        fp_layers = verify_int8(ctx, artifact, self.kind)
        metrics["quantize/fp_layers"] = len(fp_layers)
        if request.max_drop is not None:
            notes.append(f"accuracy control kept {len(fp_layers)} layer(s) in floating point"
                         + (f": {', '.join(fp_layers[:8])}{' ...' if len(fp_layers) > 8 else ''}" if fp_layers else ""))
        speedup, load = interleaved_speedup(ctx, result.float_model, artifact)
        metrics.update({"quantize/speedup_vs_float": speedup, "quantize/speedup_loadavg_1m": load})
        if speedup < SLOWER_THAN:
            notes.append(f"INT8 is not faster than the float model here (x{speedup:.2f}, interleaved on "
                         f"{ctx.target.device}, load {load:.1f}): at this input size dispatch and "
                         "quantize/dequantize overhead outweigh the INT8 arithmetic")
        shutil.rmtree(scratch)
        write_json(ctx.workdir / "fp_layers.json", fp_layers)
        return StageResult(artifact, metrics, files={"fp_layers": "fp_layers.json", **files}, steps=result.steps,
                           notes=notes)

    def _meta(self, source: Artifact) -> dict[str, Any]:
        options = {k: v for k, v in self.params().items() if v not in (None, [])}
        return {**source.meta, "precision": "int8", "deploy_quantization": options}


# ---------------------------------------------------------------------------------- helpers
def verify_int8(ctx: Any, artifact: Artifact, stage: str) -> list[str]:
    """Compile on the target's device, read what really runs: fail when no compute layer is INT8;
    return the layers that stayed in floating point."""
    from edgebuild.evaluate import load

    session = load(artifact, ctx, 1)
    info = session.runtime_info()
    if not info.get("int8/ops_fraction"):
        raise EdgebuildError(
            f"{stage}: the quantized model runs no compute layer in INT8 on {ctx.target.device} "
            f"(runtime precision {info.get('runtime/precision')}, {info.get('runtime/compute_ops')} compute layers)",
            "check ignored_names / ignored_patterns (they may cover every layer) and that the model has "
            "convolutions or matmuls")
    return session.float_layers()


def primary_metric_fn(ctx: Any) -> Any:
    """QuantizeRequest.score for accuracy control: the task's primary metric from raw outputs."""
    task, class_names = ctx.task, ctx.data.class_names

    def score(pairs: Any) -> float:
        evaluator = task.evaluator(class_names)
        for outputs, y in pairs:
            evaluator.update(outputs, y)
        return float(evaluator.compute()[0][task.primary_metric])

    return score


def interleaved_speedup(ctx: Any, float_model: Artifact, quantized: Artifact, rounds: int = 5) -> tuple[float, float]:
    """Float p50 / INT8 p50 on the target's device, timed in alternating rounds in one process."""
    import os

    from edgebuild.evaluate import interleaved, load

    sessions = [load(a, ctx, 1) for a in (float_model, quantized)]
    shape = quantized.meta["input_shape"]
    medians = interleaved(sessions, [shape, shape], ctx.cfg.eval.latency, rounds)
    return float(np.median(medians[0]) / np.median(medians[1])), float(os.getloadavg()[0])
