"""OpenVINO runtime: IR deployables, compiled with an explicit inference precision and thread count."""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgebuild.artifact import IR_FILE, Artifact

COMPUTE_LAYERS = {"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul",
                  "GroupDeconvolution"}
PRECISION_HINTS = {"f32": "f32", "fp32": "f32", "bf16": "bf16", "f16": "f16", "fp16": "f16"}


class OpenVINORuntime:
    format = "openvino"

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def available_devices(self) -> list[str]:
        import openvino as ov

        return list(ov.Core().available_devices)

    def deployable(self, artifact: Artifact, folder: Path, output_names: list[str]) -> Artifact:
        from edgebuild.convert import artifact_to_onnx, onnx_to_openvino

        if artifact.kind == "openvino":  # keep the IR files only (an export may carry ONNX beside)
            files = [f for f in artifact.files if f.endswith((".xml", ".bin"))]
            return Artifact("openvino", artifact.root, files, meta=artifact.meta)
        folder.mkdir(parents=True, exist_ok=True)
        onnx = artifact_to_onnx(artifact, folder, output_names)
        onnx_to_openvino(onnx, folder / IR_FILE)
        if onnx.parent == folder:
            onnx.unlink()
        return Artifact("openvino", folder, [IR_FILE, "model.bin"], meta={**artifact.meta, "format": "openvino IR"})

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


class OpenVINOSession:
    def __init__(self, compiled: Any):
        self.compiled = compiled
        self.request = compiled.create_infer_request()

    def infer(self, x: np.ndarray) -> list[np.ndarray]:
        self.request.infer({0: x})
        return [self.request.get_output_tensor(i).data.copy() for i in range(len(self.compiled.outputs))]

    def bench(self, x: np.ndarray, warmup: int, iterations: int, min_seconds: float) -> np.ndarray:
        req = self.request
        req.set_input_tensor(0, __import__("openvino").Tensor(x))
        for _ in range(warmup):
            req.infer()
        times = []
        start = time.perf_counter()
        while len(times) < iterations or time.perf_counter() - start < min_seconds:
            t0 = time.perf_counter_ns()
            req.infer()
            times.append((time.perf_counter_ns() - t0) / 1e6)
        return np.asarray(times)

    def runtime_info(self) -> dict[str, Any]:
        """What really executed: precision of the compute layers, and the fraction in INT8."""
        counts: collections.Counter = collections.Counter()
        for op in self.compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            layer = info["layerType"].astype(str)
            if layer in COMPUTE_LAYERS:
                counts[info["runtimePrecision"].astype(str)] += 1
        total = sum(counts.values())
        int8 = counts["u8"] + counts["i8"]
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        return {
            "runtime/precision": counts.most_common(1)[0][0] if counts else "none",
            "runtime/inference_precision_hint": str(hint).split("'")[1] if "'" in str(hint) else str(hint),
            "int8/ops_fraction": int8 / total if total else 0.0,
            "runtime/compute_ops": total,
        }
