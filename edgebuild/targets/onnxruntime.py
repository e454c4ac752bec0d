"""ONNX Runtime (CPU execution provider): ONNX deployables, fixed thread count, spinning off."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from edgebuild.artifact import ONNX_FILE, Artifact
from edgebuild.errors import EdgebuildError


class ONNXRuntime:
    format = "onnx"

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def available_devices(self) -> list[str]:
        import onnxruntime as ort

        return ["CPU"] + (["GPU"] if "CUDAExecutionProvider" in ort.get_available_providers() else [])

    def deployable(self, artifact: Artifact, folder: Path, output_names: list[str]) -> Artifact:
        from edgebuild.convert import artifact_to_onnx

        if artifact.kind == "onnx":
            files = [f for f in artifact.files if f.endswith((".onnx", ".onnx.data"))]
            return Artifact("onnx", artifact.root, files, meta=artifact.meta)
        if artifact.kind != "torch":
            raise EdgebuildError(f"target {self.cfg.name!r} runs ONNX models; this stage produced {artifact.kind}",
                                 "use an OpenVINO target for OpenVINO IRs, or export to ONNX")
        artifact_to_onnx(artifact, folder, output_names)
        return Artifact("onnx", folder, [ONNX_FILE], meta={**artifact.meta, "format": "onnx"})

    def compile(self, artifact: Artifact, device: str, batch: int) -> ONNXSession:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(self.cfg.threads)
        opts.inter_op_num_threads = 1
        # ORT's spinning thread pool slows everything else in the process (other runtimes, Python)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for k, v in dict(self.cfg.options or {}).items():
            opts.add_session_config_entry(str(k), str(v))
        providers = ["CUDAExecutionProvider"] if device == "GPU" else ["CPUExecutionProvider"]
        return ONNXSession(ort.InferenceSession(str(artifact.main_file), opts, providers=providers))


class ONNXSession:
    def __init__(self, session: Any):
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def infer(self, x: np.ndarray) -> list[np.ndarray]:
        return list(self.session.run(None, {self.input_name: x}))

    def bench(self, x: np.ndarray, warmup: int, iterations: int, min_seconds: float) -> np.ndarray:
        feed = {self.input_name: x}
        for _ in range(warmup):
            self.session.run(None, feed)
        times = []
        start = time.perf_counter()
        while len(times) < iterations or time.perf_counter() - start < min_seconds:
            t0 = time.perf_counter_ns()
            self.session.run(None, feed)
            times.append((time.perf_counter_ns() - t0) / 1e6)
        return np.asarray(times)

    def runtime_info(self) -> dict[str, Any]:
        import onnx

        # QDQ / integer ops in the graph are what ORT's CPU EP fuses into INT8 kernels
        path = getattr(self.session, "_model_path", None)
        graph = onnx.load(path, load_external_data=False).graph if path else None
        if graph is None:
            return {"runtime/precision": "f32", "int8/ops_fraction": 0.0}
        ops = [n.op_type for n in graph.node]
        compute = [o for o in ops if o in ("Conv", "Gemm", "MatMul", "QLinearConv", "QLinearMatMul", "ConvInteger",
                                           "MatMulInteger")]
        int8 = [o for o in compute if o.startswith(("QLinear",)) or o.endswith("Integer")]
        qdq = ops.count("DequantizeLinear")
        frac = len(int8) / len(compute) if compute else 0.0
        if not int8 and qdq and compute:  # QDQ format: each quantized Conv/MatMul is fed by DequantizeLinear
            fed = sum(1 for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")
                      and any(i.endswith(("_DequantizeLinear_Output", "_dequantized")) for i in n.input))
            frac = min(1.0, fed / len(compute))
        return {"runtime/precision": "int8" if frac > 0 else "f32", "int8/ops_fraction": frac,
                "runtime/compute_ops": len(compute)}
