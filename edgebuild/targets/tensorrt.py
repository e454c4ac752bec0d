"""TensorRT on NVIDIA GPUs (Jetson boards, data-centre GPUs): an engine built from the ONNX path.

- Deployable: the ONNX file (what TensorRT parses). Engines are specific to the GPU and TensorRT version,
  so the deploy folder ships the ONNX and the engine is built where it runs (`latency/load_ms` = parse +
  engine build, what a first start pays without an engine cache).
- FP16: `target.precision=fp16` (the default) lets the builder pick FP16 kernels; fp32 forbids them.
- INT8: a quantize stage writes a QDQ ONNX (ONNX Runtime's quantize_static over the calibration set, on
  the CPU); TensorRT builds INT8 kernels from its Q/DQ scales (explicit quantization, the path TensorRT
  10 recommends: implicit calibration with IInt8EntropyCalibrator2 is deprecated there and gone in 11).
- No NVIDIA GPU (or no `tensorrt` package): CPU numbers would mean nothing for a GPU, so there is no CPU
  proxy (`cpu_proxy = False`): the target is unmeasured (no latency or quality recorded, the summary says
  "unmeasured: no NVIDIA GPU"), and `target.require_device=true` makes it exit 2 before any work.
Heavy imports (tensorrt, torch's CUDA) inside methods.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgebuild.artifact import Artifact
from edgebuild.errors import EdgebuildError
from edgebuild.targets import base
from edgebuild.targets.base import Quantized, QuantizeRequest, Runtime, Session

ONNX_FILE = "model.onnx"
PACKAGE = "tensorrt"
PRECISIONS = ("fp16", "f16", "fp32", "f32")


def cuda_devices() -> int:
    """NVIDIA GPUs torch's CUDA sees (0 without a CUDA build or a driver); torch is imported only here."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def missing() -> str | None:
    """Why TensorRT cannot run here, or None."""
    if importlib.util.find_spec("tensorrt") is None:
        return f"no NVIDIA GPU (the Python package {PACKAGE} is not installed: pip install {PACKAGE})"
    if not cuda_devices():
        return "no NVIDIA GPU (torch.cuda sees no CUDA device)"
    return None


def qdq_fraction(path: Path) -> tuple[float, int]:
    """Fraction of the ONNX graph's compute nodes fed by a DequantizeLinear (what TensorRT runs INT8), and
    their number: read from the file, so it holds without a GPU."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    compute = [n for n in graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
    fed = sum(any(i in dequantized for i in n.input) for n in compute)
    return (fed / len(compute) if compute else 0.0), len(compute)


class TensorRTRuntime(Runtime):
    name = "tensorrt"
    format = "tensorrt"
    files = (ONNX_FILE,)
    suffixes = (".onnx", ".data")
    capabilities = frozenset({base.QUANTIZE, base.EXPORT})
    precisions = PRECISIONS  # INT8 comes from a quantize stage (QDQ ONNX)
    packages = ("tensorrt",)
    # INT8 scales come from ONNX Runtime's quantize_static (QDQ ONNX), so its calibration methods apply
    calibration_methods = ("minmax", "entropy", "percentile")
    export_by_default = False  # the export stage's ONNX is the same file; no second copy unasked
    cpu_proxy = False  # a GPU engine's latency is not measurable on the CPU

    def quantization_device(self) -> str:
        return "GPU"  # symmetric Q/DQ as TensorRT's GPU kernels take them

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        if str(cfg.precision) not in (*PRECISIONS, "auto"):
            raise EdgebuildError(f"target {cfg.name!r}: runtime tensorrt has no inference precision "
                                 f"{cfg.precision!r}",
                                 f"use target.precision= one of {', '.join(PRECISIONS)}; INT8 comes from a "
                                 "quantize stage (QDQ ONNX)")

    def available_devices(self) -> list[str]:
        return [] if missing() else ["GPU"] + [f"GPU.{i}" for i in range(cuda_devices())]

    def absent_device(self, device: str) -> str:
        return missing() or f"no {device}"

    def deployable(self, artifact: Artifact, folder: Path, output_names: list[str]) -> Artifact:
        from edgebuild.convert import artifact_to_onnx

        if artifact.kind in (self.format, "onnx"):  # the ONNX path: the file TensorRT parses, as is
            files = [f for f in artifact.files if f.endswith((".onnx", ".onnx.data"))]
            return Artifact(self.format, artifact.root, files, meta={**artifact.meta, "format": self.format})
        if artifact.kind != "torch":
            raise EdgebuildError(f"target {self.cfg.name!r} (TensorRT) builds engines from ONNX; this stage "
                                 f"produced {artifact.kind}", "feed it a torch or ONNX stage")
        artifact_to_onnx(artifact, folder, output_names)
        return Artifact(self.format, folder, [ONNX_FILE], meta={**artifact.meta, "format": self.format})

    def export(self, source: Artifact, folder: Path, output_names: list[str], dynamic_batch: bool,
               opset: int) -> list[str]:
        from edgebuild.convert import torch_to_onnx

        torch_to_onnx(source.load_torch(), source.meta["input_shape"], folder / ONNX_FILE, output_names,
                      dynamic_batch=dynamic_batch, opset=opset)  # the engine pins the batch at build time
        return [ONNX_FILE]

    def quantize(self, source: Artifact, request: QuantizeRequest, workdir: Path, scratch: Path) -> Quantized:
        """QDQ ONNX from ONNX Runtime's quantize_static (symmetric INT8, as TensorRT requires); TensorRT
        takes the Q/DQ scales. A graph in which no compute node is fed by a DequantizeLinear fails here."""
        from edgebuild.targets.onnxruntime import ONNXRuntime

        if source.kind == self.format:
            source = Artifact("onnx", source.root, source.files, source.meta, source.digest)
        request.symmetric = True  # TensorRT's Q/DQ: zero point 0 only
        q = ONNXRuntime(self.cfg).quantize(source, request, workdir, scratch)
        fraction, compute = qdq_fraction(q.artifact.main_file)
        if not fraction:
            raise EdgebuildError(f"TensorRT INT8: no compute node of the QDQ ONNX is quantized ({compute} compute "
                                 "nodes, none fed by DequantizeLinear): TensorRT would run it in float",
                                 "check ignored_names / ignored_patterns and that the model has convolutions or "
                                 "matmuls")
        meta = {**q.artifact.meta, "format": self.format}
        return Quantized(Artifact(self.format, workdir, q.artifact.files, meta),
                         Artifact(self.format, q.float_model.root, q.float_model.files, q.float_model.meta), q.steps,
                         {**q.scheme, "target_device": self.quantization_device()})

    # ------------------------------------------------------------------------ on a GPU
    def compile(self, artifact: Artifact, device: str, batch: int) -> TensorRTSession:
        """Parse the ONNX, build a serialized engine at a static `batch`, deserialize it on `device`."""
        reason = missing()
        if reason:
            raise EdgebuildError(f"target {self.cfg.name!r}: TensorRT cannot build an engine here ({reason})",
                                 "run on a machine with an NVIDIA GPU and the tensorrt package")
        import tensorrt as trt
        import torch

        index = int(device.split(".")[1]) if "." in device else 0
        torch.cuda.set_device(index)
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # the default (and deprecated) in 10
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(artifact.main_file)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise EdgebuildError(f"tensorrt cannot parse {artifact.main_file.name}: {'; '.join(errors)[:400]}",
                                 "replace the operator it names, or use another target")
        config = builder.create_builder_config()
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the inspector then reports precisions
        precision = str(self.cfg.precision)
        if precision in ("fp16", "f16", "auto") and hasattr(trt.BuilderFlag, "FP16"):
            config.set_flag(trt.BuilderFlag.FP16)
        if artifact.meta.get("precision") == "int8" and hasattr(trt.BuilderFlag, "INT8"):
            config.set_flag(trt.BuilderFlag.INT8)  # Q/DQ nodes carry the scales; no calibrator
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):  # the ONNX may have a dynamic batch: pin it
            tensor = network.get_input(i)
            shape = [batch, *list(tensor.shape)[1:]]
            profile.set_shape(tensor.name, shape, shape, shape)
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EdgebuildError(f"tensorrt could not build an engine from {artifact.main_file.name}",
                                 "run with a TensorRT logger at VERBOSE to see the failing layer")
        engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
        return TensorRTSession(engine, batch)


class TensorRTSession(Session):
    """Device buffers are torch CUDA tensors (no pycuda); inference is execute_async_v3 on torch's stream."""

    def __init__(self, engine: Any, batch: int):
        import tensorrt as trt
        import torch

        self.engine, self.batch = engine, batch
        self.context = engine.create_execution_context()
        self.stream = torch.cuda.current_stream()
        self.inputs, self.outputs = [], []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            shape = list(engine.get_tensor_shape(name))
            if is_input:
                shape = [batch, *shape[1:]]
                self.context.set_input_shape(name, shape)
            else:
                shape = list(self.context.get_tensor_shape(name))
            dtype = torch.from_numpy(np.zeros(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
            buf = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, buf.data_ptr())
            (self.inputs if is_input else self.outputs).append(buf)

    def _run(self) -> None:
        self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()

    def infer(self, x: np.ndarray) -> list[np.ndarray]:
        import torch

        self.inputs[0].copy_(torch.from_numpy(np.ascontiguousarray(x)).to(self.inputs[0].dtype))
        self._run()
        return [o.float().cpu().numpy() for o in self.outputs]

    def bind(self, x: np.ndarray) -> Callable[[], Any]:
        import torch

        self.inputs[0].copy_(torch.from_numpy(np.ascontiguousarray(x[:1].repeat(self.batch, 0))))
        return self._run  # the input stays on the GPU: the engine's execution, synchronized, is what is timed

    def _layers(self) -> list[dict[str, Any]]:
        import tensorrt as trt

        inspector = self.engine.create_engine_inspector()
        info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
        return [layer for layer in info.get("Layers", []) if isinstance(layer, dict)]

    def runtime_info(self) -> dict[str, Any]:
        """Precision per compute layer, read from the built engine (inspector JSON, DETAILED verbosity)."""
        compute = [layer for layer in self._layers()
                   if str(layer.get("LayerType", "")).lower() in ("convolution", "caskconvolution", "gemm",
                                                                  "caskgemm", "matrixmultiply", "fullyconnected")]
        precisions = [self._precision(layer) for layer in compute]
        counts = {p: precisions.count(p) for p in set(precisions)}
        top = max(counts, key=counts.get) if counts else "none"
        return {"runtime/precision": base.precision_label(top), "runtime/precision_raw": top,
                "int8/ops_fraction": counts.get("Int8", 0) / len(compute) if compute else 0.0,
                "runtime/compute_ops": len(compute)}

    @staticmethod
    def _precision(layer: dict[str, Any]) -> str:
        """The inspector's input format of a layer, e.g. "Int8 NC/32HW32" or "Half(...)": its data type."""
        inputs = layer.get("Inputs") or [{}]
        fmt = str(inputs[0].get("Format/Datatype", ""))
        for word, label in (("Int8", "Int8"), ("Half", "Half"), ("BFloat16", "BFloat16"), ("Float", "Float")):
            if word in fmt:
                return label
        return fmt or "unknown"

    def float_layers(self) -> list[str]:
        return [str(layer.get("Name")) for layer in self._layers() if self._precision(layer) != "Int8"
                and "onvolution" in str(layer.get("LayerType", ""))]

