"""quantize: post-training INT8 from a representative calibration set (`data.calibration.size/seed`).

OpenVINO targets: NNCF on an OpenVINO model -> INT8 IR (`nncf.quantize`, or
`nncf.quantize_with_accuracy_control` when `max_drop` is set: the layers that hurt the task's
primary metric most on the validation split go back to floating point). `target=onnxruntime`:
ONNX Runtime's `quantize_static` -> QDQ ONNX from the same calibration subset.

Task-agnostic: any number of raw outputs; accuracy control scores them with the task's evaluator.
The result is compiled on the CPU and its runtime graph read: a model in which no compute layer runs
INT8 fails the stage, and the layers left in floating point are listed (`fp_layers.json`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgebuild.artifact import IR_FILE, ONNX_FILE, Artifact, write_json
from edgebuild.config import bounded
from edgebuild.errors import EdgebuildError
from edgebuild.stage import Stage, StageResult, check_patterns

log = logging.getLogger(__name__)

PRESETS = ("performance", "mixed")  # performance: symmetric activations; mixed: asymmetric activations
BIAS_CORRECTION = ("fast", "full", "none")
MODEL_TYPES = ("transformer",)
OPENVINO_ONLY = ("bias_correction", "model_type", "max_drop")
INT8_ELEMENT_TYPES = {"i8", "u8", "i4", "u4", "nf4"}
ONNX_QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                      "MatMulInteger", "DynamicQuantizeLinear")
ONNX_COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
SLOWER_THAN = 1.1  # an INT8 speed-up below this is reported as "not faster" (noise on a shared machine)


@dataclass
class Quantize(Stage):
    kind: ClassVar[str] = "quantize"
    output_precision: ClassVar[str | None] = "int8"
    needs_float_input: ClassVar[bool] = True
    version: ClassVar[int] = 1
    uses: ClassVar[tuple[str, ...]] = ("data", "task", "calibration", "target_format")

    preset: str = "performance"
    per_channel: bool = True  # one weight scale per output channel (false: per tensor)
    bias_correction: str | None = None  # fast | full | none; null = NNCF's default (fast). OpenVINO only
    ignored_names: list[str] = field(default_factory=list)  # layer names kept in floating point
    ignored_patterns: list[str] = field(default_factory=list)  # regexes over layer names, kept in floating point
    model_type: str | None = None  # "transformer": NNCF's transformer-aware scheme. OpenVINO only
    # accuracy control: max absolute drop of the task's primary metric
    max_drop: float | None = bounded(None, gt=0, lt=1)
    # (0.01 = 1 pp of top-1) on the validation split. OpenVINO only

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
        check_patterns(self, ignored_patterns=self.ignored_patterns)
        if cfg.target.runtime == "onnxruntime":
            asked = [f"{k}={getattr(self, k)}" for k in OPENVINO_ONLY if getattr(self, k) is not None]
            if asked:
                raise EdgebuildError(f"quantize: {', '.join(asked)} is an OpenVINO/NNCF option; target "
                                     f"{cfg.target.name!r} quantizes with ONNX Runtime",
                                     "drop the option, or use an OpenVINO target (target=cpu, gpu, vpu)")

    # ------------------------------------------------------------------------------- build
    def run(self, ctx: Any) -> StageResult:
        calibration = ctx.data.calibration()
        scratch = ctx.workdir / ".float"  # the float model as the runtime sees it; removed at the end
        scratch.mkdir()
        if ctx.target.format == "onnx":
            artifact, float_model, steps = self._onnxruntime(ctx, calibration, scratch)
        else:
            artifact, float_model, steps = self._openvino(ctx, calibration, scratch)
        fp_layers = verify_int8(ctx, artifact, self.kind)
        metrics: dict[str, Any] = {"quantize/fp_layers": len(fp_layers),
                                   "quantize/calibration_samples": int(len(calibration))}
        notes = []
        if self.max_drop is not None:
            notes.append(f"accuracy control kept {len(fp_layers)} layer(s) in floating point"
                         + (f": {', '.join(fp_layers[:8])}{' ...' if len(fp_layers) > 8 else ''}" if fp_layers else ""))
        speedup, load = interleaved_speedup(ctx, float_model, artifact, calibration[:1])
        metrics.update({"quantize/speedup_vs_float": speedup, "quantize/speedup_loadavg_1m": load})
        if speedup < SLOWER_THAN:
            notes.append(f"INT8 is not faster than the float model here (x{speedup:.2f}, interleaved on "
                         f"{ctx.target.device}, load {load:.1f}): at this input size dispatch and "
                         "quantize/dequantize overhead outweigh the INT8 arithmetic")
        shutil.rmtree(scratch)
        write_json(ctx.workdir / "fp_layers.json", fp_layers)
        return StageResult(artifact, metrics, files={"fp_layers": "fp_layers.json"}, steps=steps, notes=notes)

    def _meta(self, source: Artifact, fmt: str) -> dict[str, Any]:
        options = {k: v for k, v in self.params().items() if v not in (None, [])}
        return {**source.meta, "formats": [fmt], "precision": "int8", "deploy_quantization": options}

    # --------------------------------------------------------------------- OpenVINO + NNCF
    def _openvino(self, ctx: Any, calibration: np.ndarray, scratch: Path) -> tuple[Artifact, Artifact, list]:
        import nncf
        import openvino as ov
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

        from edgebuild.convert import save_ir

        model = openvino_model(ctx, scratch)
        if is_quantized_openvino(model):
            raise _already_int8(ctx.input)
        save_ir(model, scratch / IR_FILE)
        float_model = Artifact("openvino", scratch, [IR_FILE, "model.bin"], ctx.input.meta)
        names = [op.get_friendly_name() for op in model.get_ops()]
        ignored = self._ignored(names)
        advanced = AdvancedQuantizationParameters(
            disable_bias_correction=self.bias_correction == "none",
            weights_quantization_params=None if self.per_channel else QuantizationParameters(per_channel=False))
        common = dict(preset=nncf.QuantizationPreset(self.preset), subset_size=len(calibration),
                      fast_bias_correction=self.bias_correction != "full",
                      model_type=nncf.ModelType(self.model_type) if self.model_type else None,
                      ignored_scope=nncf.IgnoredScope(names=ignored) if ignored else None)
        dataset = nncf.Dataset([x[None] for x in calibration])
        steps = []
        if self.max_drop is None:
            quantized = nncf.quantize(model, dataset, advanced_parameters=advanced, **common)
        else:
            validation = [(x, y) for x, y in ctx.data.batches("val", 1)]
            validate = primary_metric_fn(ctx)
            quantized = nncf.quantize_with_accuracy_control(
                model, dataset, nncf.Dataset(validation, lambda item: item[0]), validate, max_drop=self.max_drop,
                drop_type=nncf.DropType.ABSOLUTE, advanced_quantization_parameters=advanced, **common)
            core = ov.Core()
            before, after = validate(core.compile_model(model, "CPU"), validation), \
                validate(core.compile_model(quantized, "CPU"), validation)
            steps.append({"name": "accuracy_control", "params": {"max_drop": self.max_drop, "split": "val"},
                          "metrics": {"val/float": before, "val/int8": after, "val/drop": (before - after) * 100}})
        save_ir(quantized, ctx.workdir / IR_FILE)
        artifact = Artifact("openvino", ctx.workdir, [IR_FILE, "model.bin"], self._meta(ctx.input, "openvino"))
        return artifact, float_model, steps

    # ------------------------------------------------------------------------ ONNX Runtime
    def _onnxruntime(self, ctx: Any, calibration: np.ndarray, scratch: Path) -> tuple[Artifact, Artifact, list]:
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quant_pre_process,
            quantize_static,
        )

        from edgebuild.convert import torch_to_onnx

        source = ctx.input
        if source.kind == "torch":
            onnx_path = torch_to_onnx(source.load_torch(), source.meta["input_shape"], scratch / ONNX_FILE,
                                      ctx.task.output_names)
        elif source.kind == "onnx":
            onnx_path = source.main_file
        else:
            raise EdgebuildError(f"quantize for target {ctx.target.cfg.name!r} (ONNX Runtime) needs a torch or ONNX "
                                 f"model; its input is an {source.kind} artifact",
                                 "set the stage's input to a torch stage (train, prune, ...) or an ONNX export")
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        if any(n.op_type in ONNX_QUANTIZED_OPS for n in graph.node):
            raise _already_int8(source)
        if onnx_path.parent != scratch:
            shutil.copy2(onnx_path, scratch / ONNX_FILE)
        float_model = Artifact("onnx", scratch, [ONNX_FILE], source.meta)
        prepared = scratch / "prepared.onnx"
        quant_pre_process(str(scratch / ONNX_FILE), str(prepared))  # shape inference + graph cleanup, as ORT advises
        input_name = graph.input[0].name

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.items = iter([{input_name: x[None]} for x in calibration])

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.items, None)

        symmetric = self.preset == "performance"
        activations = QuantType.QInt8 if symmetric else QuantType.QUInt8
        quantize_static(str(prepared), str(ctx.workdir / ONNX_FILE), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=self.per_channel, activation_type=activations, weight_type=QuantType.QInt8,
                        nodes_to_exclude=self._ignored([n.name for n in graph.node]),
                        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True})
        prepared.unlink()
        return Artifact("onnx", ctx.workdir, [ONNX_FILE], self._meta(source, "onnx")), float_model, []

    def _ignored(self, names: list[str]) -> list[str]:
        """ignored_names (must exist) plus every layer matching an ignored pattern."""
        missing = [n for n in self.ignored_names if n not in names]
        if missing:
            raise EdgebuildError(f"quantize: ignored_names {missing} are not layers of this model",
                                 f"use names from the model graph, e.g. {names[len(names) // 2]!r}, or a regex in "
                                 "ignored_patterns")
        matched = [n for n in names if any(re.search(p, n) for p in self.ignored_patterns)]
        if self.ignored_patterns and not matched:
            raise EdgebuildError(f"quantize: ignored_patterns {self.ignored_patterns} match no layer of this model",
                                 f"layer names look like {names[len(names) // 2]!r}")
        return list(dict.fromkeys([*self.ignored_names, *matched]))


# ---------------------------------------------------------------------------------- helpers
def openvino_model(ctx: Any, scratch: Path) -> Any:
    """The input artifact (torch, ONNX or IR) as an in-memory OpenVINO model; never touches the input."""
    import openvino as ov

    from edgebuild.convert import torch_to_onnx

    source = ctx.input
    if source.kind == "openvino":
        return ov.Core().read_model(str(source.main_file))
    if source.kind == "torch":
        path = torch_to_onnx(source.load_torch(), source.meta["input_shape"], scratch / "source.onnx",
                             ctx.task.output_names)
        model = ov.convert_model(str(path))
        path.unlink()
        return model
    return ov.convert_model(str(source.main_file))


def is_quantized_openvino(model: Any) -> bool:
    """FakeQuantize/FakeConvert nodes or low-bit weight constants: NNCF already went over this model."""
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind in ("FakeQuantize", "FakeConvert"):
            return True
        if kind == "Constant" and op.get_output_element_type(0).get_type_name() in INT8_ELEMENT_TYPES:
            return True
    return False


def _already_int8(source: Artifact) -> EdgebuildError:
    return EdgebuildError(f"quantize: its input ({source.kind}, {source.root.name}) is already quantized",
                          "quantize a floating-point model: set the stage's input to a train/prune/export stage")


def verify_int8(ctx: Any, artifact: Artifact, stage: str) -> list[str]:
    """Compile on the CPU, read what really runs: fail when no compute layer is INT8; return the
    layers that stayed in floating point."""
    session = ctx.target.runtime.compile(artifact, "CPU", 1)
    info = session.runtime_info()
    if not info.get("int8/ops_fraction"):
        raise EdgebuildError(
            f"{stage}: the quantized model runs no compute layer in INT8 on the CPU runtime "
            f"(runtime precision {info.get('runtime/precision')}, {info.get('runtime/compute_ops')} compute layers)",
            "check ignored_names / ignored_patterns (they may cover every layer) and that the model has "
            "convolutions or matmuls")
    return float_layers(session)


def float_layers(session: Any) -> list[str]:
    """Names of the compute layers that do not run in INT8, read from what the runtime executes."""
    if hasattr(session, "compiled"):  # OpenVINO: the compiled model's runtime graph
        from edgebuild.targets.openvino import COMPUTE_LAYERS

        out = []
        for op in session.compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            precision = info["runtimePrecision"].astype(str)
            if info["layerType"].astype(str) in COMPUTE_LAYERS and precision not in ("u8", "i8"):
                out.append(op.get_friendly_name())
        return out
    import onnx  # ONNX Runtime (QDQ): compute nodes not fed by a DequantizeLinear

    graph = onnx.load(session.session._model_path, load_external_data=False).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in graph.node if n.op_type in ONNX_COMPUTE_OPS and not any(i in dequantized for i in n.input)]


def primary_metric_fn(ctx: Any) -> Any:
    """validation_fn for NNCF's accuracy control: the task's primary metric from raw outputs."""
    task, class_names = ctx.task, ctx.data.class_names

    def validate(compiled: Any, items: Any) -> float:
        evaluator = task.evaluator(class_names)
        for x, y in items:
            result = compiled(x)
            evaluator.update([np.asarray(result[o]) for o in compiled.outputs], y)
        return float(evaluator.compute()[0][task.primary_metric])

    return validate


def interleaved_speedup(ctx: Any, float_model: Artifact, quantized: Artifact, x: np.ndarray,
                        rounds: int = 5) -> tuple[float, float]:
    """Float p50 / INT8 p50 on the target's device, measured in alternating rounds in one process
    (the only comparison that survives a shared machine's load swings)."""
    lat = ctx.cfg.eval.latency
    runtime, device = ctx.target.runtime, ctx.target.device
    sessions = [runtime.compile(a, device, 1) for a in (float_model, quantized)]
    medians: list[list[float]] = [[], []]
    for _ in range(rounds):
        for i, s in enumerate(sessions):
            medians[i].append(float(np.median(s.bench(x, lat.warmup, max(10, lat.iterations // rounds), 0.0))))
    return float(np.median(medians[0]) / np.median(medians[1])), float(os.getloadavg()[0])
