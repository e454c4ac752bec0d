"""OpenVINO runtime: IR deployables, compiled with an explicit inference precision and thread count.
Quantization is NNCF's (post-training, accuracy control, weight compression, QAT on torch)."""

from __future__ import annotations

import collections
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgebuild.artifact import Artifact
from edgebuild.targets import base
from edgebuild.targets.base import Quantized, QuantizeRequest, Runtime, Session

IR_FILE = "model.xml"
IR_FILES = [IR_FILE, "model.bin"]
COMPUTE_LAYERS = {"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul",
                  "GroupDeconvolution"}
PRECISION_HINTS = {"f32": "f32", "fp32": "f32", "bf16": "bf16", "f16": "f16", "fp16": "f16"}
INT8_ELEMENT_TYPES = {"i8", "u8", "i4", "u4", "nf4"}
# target.device -> nncf.TargetDevice: the device whose INT8 scheme NNCF applies (which layers get quantizers,
# which ranges and signedness its kernels take). VPU: Intel's VPU-class device is the NPU (conf/target/vpu.yaml)
NNCF_DEVICES = {"CPU": "CPU", "GPU": "GPU", "NPU": "NPU", "VPU": "NPU"}
# edgebuild's calibration method names -> NNCF's range estimator presets (RangeEstimatorParametersSet), for
# activations; the default first. percentile: the mean over samples of the 1e-4 / 1-1e-4 quantiles
RANGE_ESTIMATORS = {"minmax": "MINMAX", "mean_minmax": "MEAN_MINMAX", "percentile": "MEAN_QUANTILE"}


class OpenVINORuntime(Runtime):
    name = "openvino"
    format = "openvino"
    files = tuple(IR_FILES)
    suffixes = (".xml", ".bin")
    aliases = ("openvino IR",)  # the model.json format name of older deploy folders
    capabilities = frozenset({base.QUANTIZE, base.QUANTIZE_ACCURACY_CONTROL, base.QUANTIZE_BIAS_CORRECTION,
                              base.QUANTIZE_MODEL_TYPE, base.QUANTIZE_SMOOTH_QUANT, base.QUANTIZE_SENSITIVITY,
                              base.QAT, base.WEIGHTS_FP16, base.WEIGHTS_INT8, base.EXPORT, base.PROFILE, base.ASYNC})
    precisions = tuple(PRECISION_HINTS)
    packages = ("openvino", "nncf")
    calibration_methods = tuple(RANGE_ESTIMATORS)

    def quantization_device(self) -> str:
        """NNCF's target device for target.device (CPU for a device NNCF has no scheme for)."""
        return NNCF_DEVICES.get(str(self.cfg.device).upper().split(".")[0], "CPU")

    def available_devices(self) -> list[str]:
        import openvino as ov

        return list(ov.Core().available_devices)

    def deployable(self, artifact: Artifact, folder: Path, output_names: list[str]) -> Artifact:
        from edgebuild.convert import artifact_to_onnx, onnx_to_openvino

        if artifact.kind == self.format:  # keep the IR files only (an export may carry other formats beside)
            files = [f for f in artifact.files if f.endswith(self.suffixes)]
            return Artifact(self.format, artifact.root, files, meta=artifact.meta)
        folder.mkdir(parents=True, exist_ok=True)
        onnx = artifact_to_onnx(artifact, folder, output_names)
        onnx_to_openvino(onnx, folder / IR_FILE)
        if onnx.parent == folder:
            onnx.unlink()
        return Artifact(self.format, folder, IR_FILES, meta={**artifact.meta, "format": "openvino IR"})

    # ------------------------------------------------------------------ producing IRs
    def export(self, source: Artifact, folder: Path, output_names: list[str], dynamic_batch: bool,
               opset: int) -> list[str]:
        from edgebuild.convert import onnx_to_openvino, torch_to_onnx

        scratch = folder / ".openvino-export"  # the ONNX the IR is converted from: not part of this format
        scratch.mkdir(parents=True)
        onnx = torch_to_onnx(source.load_torch(), source.meta["input_shape"], scratch / "model.onnx", output_names,
                             dynamic_batch=dynamic_batch, opset=opset)
        onnx_to_openvino(onnx, folder / IR_FILE)
        shutil.rmtree(scratch)
        return list(IR_FILES)

    def model(self, source: Artifact, scratch: Path, output_names: list[str]) -> Any:
        """The input artifact (torch, ONNX or IR) as an in-memory OpenVINO model; never touches the input."""
        import openvino as ov

        from edgebuild.convert import torch_to_onnx

        if source.kind == self.format:
            return ov.Core().read_model(str(source.main_file))
        if source.kind == "torch":
            path = torch_to_onnx(source.load_torch(), source.meta["input_shape"], scratch / "source.onnx",
                                 output_names)
            model = ov.convert_model(str(path))
            path.unlink()
            return model
        return ov.convert_model(str(source.main_file))  # ONNX: OpenVINO reads it directly

    def quantize(self, source: Artifact, request: QuantizeRequest, workdir: Path, scratch: Path) -> Quantized:
        """nncf.quantize, or nncf.quantize_with_accuracy_control when max_drop is set."""
        import nncf
        import openvino as ov
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

        from edgebuild.convert import save_ir

        model = self.model(source, scratch, request.output_names)
        if is_quantized(model):
            raise base.already_quantized(source)
        save_ir(model, scratch / IR_FILE)
        float_model = Artifact(self.format, scratch, IR_FILES, source.meta)
        ignored = base.select_layers([op.get_friendly_name() for op in model.get_ops()], request.ignored_names,
                                     request.ignored_patterns)
        extra: dict[str, Any] = {}
        if request.calibration_method is not None:
            from nncf.quantization.range_estimator import RangeEstimatorParametersSet

            extra["activations_range_estimator_params"] = getattr(RangeEstimatorParametersSet,
                                                                  RANGE_ESTIMATORS[request.calibration_method])
        if request.smooth_quant_alpha is not None:  # NNCF's own default smooths MatMuls only (0.95), convs off
            from nncf.quantization.advanced_parameters import AdvancedSmoothQuantParameters

            alpha = request.smooth_quant_alpha
            extra["smooth_quant_alphas"] = AdvancedSmoothQuantParameters(convolution=alpha, matmul=alpha)
        advanced = AdvancedQuantizationParameters(
            disable_bias_correction=request.bias_correction == "none",
            weights_quantization_params=None if request.per_channel else QuantizationParameters(per_channel=False),
            **extra)
        device = self.quantization_device()
        common = dict(preset=nncf.QuantizationPreset(request.preset), subset_size=len(request.calibration),
                      target_device=nncf.TargetDevice(device),
                      fast_bias_correction=request.bias_correction != "full",
                      model_type=nncf.ModelType(request.model_type) if request.model_type else None,
                      ignored_scope=nncf.IgnoredScope(names=ignored) if ignored else None)
        dataset = nncf.Dataset([x[None] for x in request.calibration])
        steps = []
        if request.max_drop is None:
            quantized = nncf.quantize(model, dataset, advanced_parameters=advanced, **common)
        else:
            validation = request.validation

            def validate(compiled: Any, items: Any) -> float:  # NNCF's validation_fn over raw outputs
                return request.score(([np.asarray(compiled(x)[o]) for o in compiled.outputs], y) for x, y in items)

            quantized = nncf.quantize_with_accuracy_control(
                model, dataset, nncf.Dataset(validation, lambda item: item[0]), validate, max_drop=request.max_drop,
                drop_type=nncf.DropType.ABSOLUTE, advanced_quantization_parameters=advanced, **common)
            core = ov.Core()
            before, after = validate(core.compile_model(model, "CPU"), validation), \
                validate(core.compile_model(quantized, "CPU"), validation)
            steps.append({"name": "accuracy_control", "params": {"max_drop": request.max_drop, "split": "val"},
                          "metrics": {"val/float": before, "val/int8": after, "val/drop": (before - after) * 100}})
        save_ir(quantized, workdir / IR_FILE)
        meta = {**request.meta, "formats": [self.format]}
        scheme = {"target_device": device, "calibration_method": request.calibration_method or "nncf-default"}
        return Quantized(Artifact(self.format, workdir, IR_FILES, meta), float_model, steps, scheme)

    def compress_weights(self, source: Artifact, weights: str, folder: Path, output_names: list[str],
                         meta: dict[str, Any]) -> Artifact:
        """fp16: compress_to_fp16 on save; int8: nncf.compress_weights (INT8_ASYM, data-free)."""
        from edgebuild.convert import save_ir

        scratch = folder / ".source"
        scratch.mkdir(parents=True)
        model = self.model(source, scratch, output_names)
        shutil.rmtree(scratch)
        if is_quantized(model):
            raise base.already_quantized(source)
        if weights == "int8":
            import nncf

            model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        save_ir(model, folder / IR_FILE, compress_to_fp16=weights == "fp16")
        return Artifact(self.format, folder, IR_FILES, {**meta, "formats": [self.format]})

    def qat_prepare(self, model: Any, calibration: np.ndarray, symmetric: bool) -> Any:
        """NNCF's torch PTQ, whose fake-quantizers the stage then fine-tunes."""
        import nncf
        import torch

        # the first use compiles NNCF's C++ extension: minutes on a busy 2-core machine, beyond NNCF's
        # 60 s default; wait for it rather than fail (a user's own setting wins)
        os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
        if isinstance(model, torch.nn.Sequential):  # NNCF adds a hook submodule a Sequential would call
            model = _Root(model)
        dataset = nncf.Dataset([torch.from_numpy(x[None]) for x in calibration])
        preset = nncf.QuantizationPreset.PERFORMANCE if symmetric else nncf.QuantizationPreset.MIXED
        return nncf.quantize(model, dataset, preset=preset, subset_size=len(calibration),
                             target_device=nncf.TargetDevice(self.quantization_device()))

    def qat_export(self, model: Any, input_shape: list[int], folder: Path, meta: dict[str, Any]) -> Artifact:
        import openvino as ov
        import torch

        from edgebuild.convert import save_ir

        example = torch.zeros([1, *list(input_shape)[1:]])
        save_ir(ov.convert_model(model.eval(), example_input=example), folder / IR_FILE)
        return Artifact(self.format, folder, IR_FILES, {**meta, "formats": [self.format]})

    # ------------------------------------------------------------------ sensitivity
    def layers(self, artifact: Artifact) -> list[dict[str, str]]:
        """Compute ops of the IR (Convolution, MatMul...) by friendly name: what NNCF's ignored scope takes."""
        import openvino as ov

        model = ov.Core().read_model(str(artifact.main_file))
        return [{"name": op.get_friendly_name(), "type": op.get_type_name()} for op in model.get_ordered_ops()
                if op.get_type_name() in COMPUTE_LAYERS]

    def layer_outputs(self, artifact: Artifact, names: list[str], inputs: Iterable[np.ndarray]
                      ) -> Iterator[dict[str, np.ndarray]]:
        """The IR with the named ops' outputs added as model outputs, compiled once on the CPU in f32."""
        import openvino as ov

        from edgebuild.errors import EdgebuildError

        core = ov.Core()
        model = core.read_model(str(artifact.main_file))
        ops = {op.get_friendly_name(): op for op in model.get_ops()}
        missing = [n for n in names if n not in ops]
        if missing:
            raise EdgebuildError(f"quantize: layers {missing[:3]} are not in {artifact.main_file}",
                                 "the INT8 model must keep the float model's layer names")
        first = len(model.outputs)
        model.add_outputs([ops[n].output(0) for n in names])
        if len(model.inputs) == 1:
            model.reshape([1, *list(artifact.meta["input_shape"])[1:]])
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                     "INFERENCE_NUM_THREADS": int(self.cfg.threads)})
        request = compiled.create_infer_request()
        for x in inputs:
            request.infer({0: x})
            yield {n: request.get_output_tensor(first + i).data.copy() for i, n in enumerate(names)}

    def compile_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": int(self.cfg.threads)}
        if self.cfg.precision != "auto":
            config["INFERENCE_PRECISION_HINT"] = PRECISION_HINTS.get(self.cfg.precision, self.cfg.precision)
        config.update(dict(self.cfg.options or {}))
        return config

    def compile(self, artifact: Artifact, device: str, batch: int) -> OpenVINOSession:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(artifact.main_file))
        if len(model.inputs) == 1:
            shape = list(artifact.meta["input_shape"])
            model.reshape([batch, *shape[1:]])
        config = self.compile_config()
        if device != "CPU":
            config.pop("INFERENCE_NUM_THREADS", None)
        return OpenVINOSession(core.compile_model(model, device, config))

    def profile(self, artifact: Artifact, device: str, iterations: int) -> list[dict[str, Any]]:
        """Per executed layer at batch 1 (OpenVINO performance counters): mean ms per inference, layer
        type, kernel and the precision it ran in; slowest first."""
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(artifact.main_file))
        model.reshape([1, *list(artifact.meta["input_shape"])[1:]])
        config = {**self.compile_config(), "PERF_COUNT": True}
        if device != "CPU":
            config.pop("INFERENCE_NUM_THREADS", None)
        compiled = core.compile_model(model, device, config)
        precision = {op.get_friendly_name(): op.get_rt_info()["runtimePrecision"].astype(str)
                     for op in compiled.get_runtime_model().get_ops()}
        request = compiled.create_infer_request()
        x = np.zeros([1, *list(artifact.meta["input_shape"])[1:]], np.float32)
        layers: dict[str, dict[str, Any]] = {}
        for _ in range(iterations):  # the counters describe the last inference only: accumulate
            request.infer({0: x})
            for p in request.get_profiling_info():
                if p.status == p.Status.EXECUTED:
                    row = layers.setdefault(p.node_name, {"name": p.node_name, "type": p.node_type,
                                                          "kernel": p.exec_type,
                                                          "precision": precision.get(p.node_name, "?"), "ms": 0.0})
                    row["ms"] += p.real_time.total_seconds() * 1000.0 / iterations
        return sorted(layers.values(), key=lambda r: -r["ms"])


class OpenVINOSession(Session):
    def __init__(self, compiled: Any):
        self.compiled = compiled
        self.request = compiled.create_infer_request()

    def infer(self, x: np.ndarray) -> list[np.ndarray]:
        self.request.infer({0: x})
        return [self.request.get_output_tensor(i).data.copy() for i in range(len(self.compiled.outputs))]

    def bind(self, x: np.ndarray) -> Callable[[], Any]:
        import openvino as ov

        self.request.set_input_tensor(0, ov.Tensor(x))  # bound once: the timed call copies nothing
        return self.request.infer

    def _compute_ops(self) -> list[tuple[str, str]]:
        """(name, runtime precision) of the compute layers of the graph that really executes."""
        out = []
        for op in self.compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            if info["layerType"].astype(str) in COMPUTE_LAYERS:
                out.append((op.get_friendly_name(), info["runtimePrecision"].astype(str)))
        return out

    def runtime_info(self) -> dict[str, Any]:
        """What really executed: precision of the compute layers, and the fraction in INT8."""
        counts = collections.Counter(p for _, p in self._compute_ops())
        total = sum(counts.values())
        int8 = counts["u8"] + counts["i8"]
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        raw = counts.most_common(1)[0][0] if counts else "none"
        return {
            "runtime/precision": base.precision_label(raw), "runtime/precision_raw": raw,
            "runtime/inference_precision_hint": str(hint).split("'")[1] if "'" in str(hint) else str(hint),
            "int8/ops_fraction": int8 / total if total else 0.0,
            "runtime/compute_ops": total,
        }

    def float_layers(self) -> list[str]:
        return [name for name, p in self._compute_ops() if p not in ("u8", "i8")]

    def async_requests(self, n: int) -> OpenVINOAsync:
        return OpenVINOAsync(self.compiled, n)


class OpenVINOPending(base.Pending):
    def __init__(self) -> None:
        self.done = threading.Event()
        self.outputs: list[np.ndarray] = []
        self.error: BaseException | None = None

    def wait(self) -> list[np.ndarray]:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.outputs


class OpenVINOAsync(base.AsyncRequests):
    """OpenVINO's AsyncInferQueue: `n` infer requests; the completion callback (an OpenVINO thread) copies the
    outputs out before the request is reused."""

    def __init__(self, compiled: Any, n: int):
        import openvino as ov

        self.n, self.count = n, len(compiled.outputs)
        self.queue = ov.AsyncInferQueue(compiled, n)
        self.queue.set_callback(self._done)

    def _done(self, request: Any, job: OpenVINOPending) -> None:
        try:
            job.outputs = [request.get_output_tensor(i).data.copy() for i in range(self.count)]
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            job.error = e
        job.done.set()

    def start(self, x: np.ndarray) -> OpenVINOPending:
        job = OpenVINOPending()
        self.queue.start_async({0: x}, job)  # blocks while all n requests are busy; copies the input
        return job

    def close(self) -> None:
        self.queue.wait_all()


def is_quantized(model: Any) -> bool:
    """FakeQuantize/FakeConvert nodes or low-bit weight constants: NNCF already went over this model."""
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind in ("FakeQuantize", "FakeConvert"):
            return True
        if kind == "Constant" and op.get_output_element_type(0).get_type_name() in INT8_ELEMENT_TYPES:
            return True
    return False


def _Root(model: Any) -> Any:
    """`model` under a plain root module (NNCF's torch backend cannot hook a top-level Sequential)."""
    import torch

    class Root(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: Any) -> Any:
            return self.model(x)

    return Root()
