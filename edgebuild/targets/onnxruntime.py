"""ONNX Runtime (CPU execution provider): ONNX deployables, fixed thread count, spinning off.
Quantization is ORT's `quantize_static` to QDQ ONNX."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgebuild.artifact import Artifact
from edgebuild.errors import EdgebuildError
from edgebuild.targets import base
from edgebuild.targets.base import Quantized, QuantizeRequest, Runtime, Session

ONNX_FILE = "model.onnx"
QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                 "MatMulInteger", "DynamicQuantizeLinear")
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# edgebuild's calibration method names -> onnxruntime.quantization.CalibrationMethod; the default first
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


class ONNXRuntime(Runtime):
    name = "onnxruntime"
    format = "onnx"
    files = (ONNX_FILE,)
    suffixes = (".onnx", ".data")
    capabilities = frozenset({base.QUANTIZE, base.QUANTIZE_SENSITIVITY, base.EXPORT})
    precisions = ("fp32",)
    packages = ("onnxruntime", "onnx")
    calibration_methods = tuple(CALIBRATION_METHODS)

    def available_devices(self) -> list[str]:
        import onnxruntime as ort

        return ["CPU"] + (["GPU"] if "CUDAExecutionProvider" in ort.get_available_providers() else [])

    def deployable(self, artifact: Artifact, folder: Path, output_names: list[str]) -> Artifact:
        from edgebuild.convert import artifact_to_onnx

        if artifact.kind == self.format:
            files = [f for f in artifact.files if f.endswith((".onnx", ".onnx.data"))]
            return Artifact(self.format, artifact.root, files, meta=artifact.meta)
        if artifact.kind != "torch":
            raise EdgebuildError(f"target {self.cfg.name!r} runs ONNX models; this stage produced {artifact.kind}",
                                 "use a target whose runtime reads that format, or export to ONNX")
        artifact_to_onnx(artifact, folder, output_names)
        return Artifact(self.format, folder, [ONNX_FILE], meta={**artifact.meta, "format": "onnx"})

    def export(self, source: Artifact, folder: Path, output_names: list[str], dynamic_batch: bool,
               opset: int) -> list[str]:
        from edgebuild.convert import torch_to_onnx

        torch_to_onnx(source.load_torch(), source.meta["input_shape"], folder / ONNX_FILE, output_names,
                      dynamic_batch=dynamic_batch, opset=opset)
        return [ONNX_FILE]

    def quantize(self, source: Artifact, request: QuantizeRequest, workdir: Path, scratch: Path) -> Quantized:
        """QDQ ONNX from quantize_static over the calibration set."""
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quant_pre_process,
            quantize_static,
        )

        from edgebuild.convert import torch_to_onnx

        if source.kind == "torch":
            onnx_path = torch_to_onnx(source.load_torch(), source.meta["input_shape"], scratch / ONNX_FILE,
                                      request.output_names)
        elif source.kind == self.format:
            onnx_path = source.main_file
        else:
            raise EdgebuildError(f"quantize for target {self.cfg.name!r} (ONNX Runtime) needs a torch or ONNX "
                                 f"model; its input is an {source.kind} artifact",
                                 "set the stage's input to a torch stage (train, prune, ...) or an ONNX export")
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        if any(n.op_type in QUANTIZED_OPS for n in graph.node):
            raise base.already_quantized(source)
        if onnx_path.parent != scratch:
            shutil.copy2(onnx_path, scratch / ONNX_FILE)
        float_model = Artifact(self.format, scratch, [ONNX_FILE], source.meta)
        prepared = scratch / "prepared.onnx"
        quant_pre_process(str(scratch / ONNX_FILE), str(prepared))  # shape inference + graph cleanup, as ORT advises
        input_name = graph.input[0].name
        calibration = request.calibration

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.items = iter([{input_name: x[None]} for x in calibration])

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.items, None)

        activations = QuantType.QInt8 if request.symmetric else QuantType.QUInt8
        method = request.calibration_method or self.calibration_methods[0]
        ignored = base.select_layers([n.name for n in graph.node], request.ignored_names, request.ignored_patterns)
        quantize_static(str(prepared), str(workdir / ONNX_FILE), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=request.per_channel, activation_type=activations, weight_type=QuantType.QInt8,
                        nodes_to_exclude=ignored,
                        calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]),
                        extra_options={"ActivationSymmetric": request.symmetric, "WeightSymmetric": True})
        prepared.unlink()
        meta = {**request.meta, "formats": [self.format]}
        scheme = {"target_device": self.quantization_device(), "calibration_method": method}
        return Quantized(Artifact(self.format, workdir, [ONNX_FILE], meta), float_model, [], scheme)

    def layers(self, artifact: Artifact) -> list[dict[str, str]]:
        """Compute nodes (Conv, Gemm, MatMul...) by node name: what quantize_static's nodes_to_exclude takes."""
        import onnx

        graph = onnx.load(str(artifact.main_file), load_external_data=False).graph
        return [{"name": n.name, "type": n.op_type} for n in graph.node if n.op_type in COMPUTE_OPS]

    def layer_outputs(self, artifact: Artifact, names: list[str], inputs: Iterable[np.ndarray]
                      ) -> Iterator[dict[str, np.ndarray]]:
        """The model with the named nodes' first outputs added as graph outputs, on the CPU EP (QDQ models
        keep the float model's node names)."""
        import onnx
        import onnxruntime as ort

        model = onnx.load(str(artifact.main_file))
        nodes = {n.name: n for n in model.graph.node}
        missing = [n for n in names if n not in nodes]
        if missing:
            raise EdgebuildError(f"quantize: layers {missing[:3]} are not nodes of {artifact.main_file}",
                                 "the INT8 model must keep the float model's node names")
        tensors = [nodes[n].output[0] for n in names]
        present = {o.name for o in model.graph.output}
        model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in present)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(self.cfg.threads)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        feed = session.get_inputs()[0].name
        for x in inputs:
            values = session.run(tensors, {feed: x})
            yield dict(zip(names, values, strict=True))

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
        path = artifact.main_file
        return ONNXSession(ort.InferenceSession(str(path), opts, providers=providers), path)


class ONNXSession(Session):
    def __init__(self, session: Any, path: Path):
        self.session = session
        self.path = path  # what runtime_info reads: ORT has no public view of the graph it runs
        self.input_name = session.get_inputs()[0].name

    def infer(self, x: np.ndarray) -> list[np.ndarray]:
        return list(self.session.run(None, {self.input_name: x}))

    def bind(self, x: np.ndarray) -> Callable[[], Any]:
        run, feed = self.session.run, {self.input_name: x}
        return lambda: run(None, feed)

    def _graph(self) -> Any:
        import onnx

        return onnx.load(str(self.path), load_external_data=False).graph

    def runtime_info(self) -> dict[str, Any]:
        # QDQ / integer ops in the graph are what ORT's CPU EP fuses into INT8 kernels
        graph = self._graph()
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
        return {"runtime/precision": "int8" if frac > 0 else "fp32", "int8/ops_fraction": frac,
                "runtime/compute_ops": len(compute)}

    def float_layers(self) -> list[str]:
        """QDQ: compute nodes not fed by a DequantizeLinear."""
        graph = self._graph()
        dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        return [n.name for n in graph.node if n.op_type in COMPUTE_OPS and not any(i in dequantized for i in n.input)]
