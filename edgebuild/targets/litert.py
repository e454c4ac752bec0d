"""LiteRT: a `.tflite` converted by litert-torch (no TensorFlow), run by ai-edge-litert's Interpreter
(XNNPACK delegate by default). FP32; FP16 weights (ai-edge-quantizer's fp16 recipe); full-integer INT8
by PT2E with litert-torch's quantizer, calibrated on the calibration set. INT8 models take int8 input
and give int8 output: the session quantizes inputs and dequantizes outputs with the scale and zero point
the model carries, and `io_quantization` exposes them for model.json."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgebuild.artifact import Artifact
from edgebuild.errors import EdgebuildError
from edgebuild.targets import base, torch_edge
from edgebuild.targets.base import Quantized, QuantizeRequest, Runtime, Session

TFLITE_FILE = "model.tflite"
PACKAGES = {"litert_torch": "litert-torch==0.10.0", "ai_edge_litert.interpreter": "ai-edge-litert==2.3.0",
            "ai_edge_litert.schema_py_generated": "ai-edge-litert==2.3.0"}
COMPUTE_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "CONV_3D", "TRANSPOSE_CONV", "FULLY_CONNECTED", "BATCH_MATMUL")
INTEGER = ("int8", "uint8", "int16")


def _require(module: str) -> Any:
    return torch_edge.require(module, PACKAGES[module], "litert")


def convert(model: Any, meta: dict[str, Any], path: Path, quant_config: Any = None) -> Path:
    """torch module (float or PT2E-converted) -> .tflite at `path`, batch 1."""
    litert_torch = _require("litert_torch")
    try:
        edge = litert_torch.convert(model, (torch_edge.example_input(meta),), quant_config=quant_config)
    except Exception as e:  # lowering raises RuntimeError/AssertionError/...: name the operator
        raise torch_edge.conversion_error(e, "litert", model) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    edge.export(str(path))
    return path


def interpreter(path: Path, threads: int = 0) -> Any:
    lite = _require("ai_edge_litert.interpreter")
    it = lite.Interpreter(model_path=str(path), num_threads=threads or None)
    it.allocate_tensors()
    return it


def graph(path: Path) -> list[dict[str, Any]]:
    """The ops of the .tflite as written (before any delegation), read from the flatbuffer with the schema
    LiteRT publishes (`schema_py_generated`), not the interpreter's private op listing: per op its index,
    op_name, inputs and outputs (tensor indices), operand_types and output_names."""
    schema = _require("ai_edge_litert.schema_py_generated")
    model = schema.Model.GetRootAs(Path(path).read_bytes(), 0)  # lazy accessors: weights are not unpacked
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    sub = model.Subgraphs(0)
    rows = []
    for index in range(sub.OperatorsLength()):
        op = sub.Operators(index)
        code = model.OperatorCodes(op.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())  # codes >= 127 live in BuiltinCode only
        name = op_names.get(builtin, str(builtin))
        if name == "CUSTOM" and code.CustomCode():
            name = code.CustomCode().decode()
        inputs = [int(op.Inputs(i)) for i in range(op.InputsLength())]
        outputs = [int(op.Outputs(i)) for i in range(op.OutputsLength())]
        rows.append({"index": index, "op_name": name, "inputs": inputs, "outputs": outputs,
                     "operand_types": [type_names.get(sub.Tensors(i).Type(), "") for i in inputs if i >= 0],
                     "output_names": [(sub.Tensors(i).Name() or b"").decode() for i in outputs if i >= 0]})
    return rows


def ops(path: Path) -> list[tuple[str, str]]:
    """(op name, dtype of its first operand) per op of the model as written."""
    return [(o["op_name"], o["operand_types"][0] if o["operand_types"] else "") for o in graph(path)]


def io_quantization(it: Any) -> dict[str, Any]:
    """Input and output dtypes with scale and zero point (real = scale * (q - zero_point)); float
    tensors carry scale 0."""
    def one(d: dict[str, Any]) -> dict[str, Any]:
        scale, zero = d["quantization"]
        return {"name": d["name"], "dtype": np.dtype(d["dtype"]).name, "scale": float(scale), "zero_point": int(zero)}

    return {"inputs": [one(d) for d in it.get_input_details()], "outputs": [one(d) for d in it.get_output_details()]}


def quantize(model: Any, calibration: np.ndarray, meta: dict[str, Any], path: Path, per_channel: bool = True,
             ignored: list[str] | None = None) -> dict[str, Any]:
    """Full-integer INT8: torch model + calibration inputs (float32 [N,C,H,W], preprocessed) -> .tflite at
    `path` with int8 input/output; returns io_quantization. EdgebuildError when it stays float."""
    _require("litert_torch")
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig

    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=per_channel))
    for name in ignored or []:
        quantizer.set_module_name(name, None)
    converted = torch_edge.pt2e_calibrated(model, quantizer, calibration, meta, fold_quantize=False)
    convert(converted, meta, path, QuantConfig(pt2e_quantizer=quantizer))
    it = interpreter(path)
    compute = [dt for op, dt in ops(path) if op in COMPUTE_OPS]
    if not any(dt in INTEGER for dt in compute):  # a known litert-torch failure: "INT8" that is all float
        raise EdgebuildError(
            f"LiteRT INT8: the converted {type(model).__name__} runs no compute op in int8 "
            f"({len(compute)} compute ops, dtypes {sorted(set(compute))})",
            "litert-torch's PT2E quantizer knows conv2d, linear, add, max_pool2d and adaptive_avg_pool2d: write "
            "matmuls as nn.Linear and global pooling as nn.AdaptiveAvgPool2d, or use another target for INT8")
    return io_quantization(it)


class LiteRTRuntime(Runtime):
    name = "litert"
    format = "litert"
    files = (TFLITE_FILE,)
    suffixes = (".tflite",)
    export_by_default = False  # the export stage writes it only for this target or when named
    capabilities = frozenset({base.QUANTIZE, base.WEIGHTS_FP16, base.EXPORT})
    precisions = ("f32", "fp32")  # FP16 weights: compress_weights; INT8: quantize
    packages = ("litert-torch", "ai-edge-litert")

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        torch_edge.check_precision(cfg, self.name)

    def available_devices(self) -> list[str]:
        for module in PACKAGES:  # a missing package fails at Target.check(), before any work
            _require(module)
        return ["CPU"]

    def _from_torch(self, source: Artifact, folder: Path) -> Artifact:
        convert(source.load_torch(), source.meta, folder / TFLITE_FILE)
        return Artifact(self.format, folder, [TFLITE_FILE], meta={**source.meta, "format": self.format})

    def _torch_source(self, source: Artifact, what: str) -> Any:
        if source.kind == "torch":
            return source.load_torch()
        if source.kind == self.format and source.meta.get("precision") == "int8":
            raise base.already_quantized(source)
        raise EdgebuildError(f"{what} for LiteRT needs the torch model; its input is a {source.kind} artifact",
                             "set the stage's input to a torch stage (train, prune, ...)")

    def deployable(self, artifact: Artifact, folder: Path, output_names: list[str]) -> Artifact:
        if artifact.kind == self.format:
            return Artifact(self.format, artifact.root, [f for f in artifact.files if f.endswith(".tflite")],
                            meta=artifact.meta)
        if artifact.kind != "torch":
            raise EdgebuildError(f"target {self.cfg.name!r} (LiteRT) converts torch models; this stage produced "
                                 f"{artifact.kind}", f"feed it a torch stage or use a target for {artifact.kind}")
        return self._from_torch(artifact, folder)

    def export(self, source: Artifact, folder: Path, output_names: list[str], dynamic_batch: bool,
               opset: int) -> list[str]:
        self._from_torch(source, folder)  # batch 1, static shapes: dynamic_batch/opset do not apply
        return [TFLITE_FILE]

    def quantize(self, source: Artifact, request: QuantizeRequest, workdir: Path, scratch: Path) -> Quantized:
        model = self._torch_source(source, "quantize")
        io = quantize(model, request.calibration, source.meta, workdir / TFLITE_FILE, request.per_channel,
                      base.select_layers(torch_edge.module_names(model), request.ignored_names,
                                         request.ignored_patterns))
        # deploy_* meta goes into model.json: a user feeding the int8 model needs scale and zero point
        meta = {**request.meta, "format": self.format, "deploy_io_quantization": io}
        scheme = {"target_device": self.quantization_device(), "calibration_method": "pt2e-default"}
        return Quantized(Artifact(self.format, workdir, [TFLITE_FILE], meta), self._from_torch(source, scratch), [],
                         scheme)

    def compress_weights(self, source: Artifact, weights: str, folder: Path, output_names: list[str],
                         meta: dict[str, Any]) -> Artifact:
        """FP16 weights (ai-edge-quantizer's fp16 recipe); the XNNPACK delegate computes in FP32."""
        if weights != "fp16":
            raise EdgebuildError(f"LiteRT has no data-free {weights!r} weight compression here",
                                 "use weights=fp16, or a quantize stage for INT8")
        model = self._torch_source(source, "fp16 weights")
        _require("litert_torch")
        from litert_torch.generative.quantize import quant_recipes

        convert(model, source.meta, folder / TFLITE_FILE, quant_recipes.full_fp16_recipe())
        return Artifact(self.format, folder, [TFLITE_FILE], meta={**meta, "format": self.format})

    def compile(self, artifact: Artifact, device: str, batch: int) -> LiteRTSession:
        return LiteRTSession(interpreter(artifact.main_file, int(self.cfg.threads)), artifact.main_file)


class LiteRTSession(Session):
    def __init__(self, it: Any, path: Path):
        self.it, self.path = it, path
        self.input = it.get_input_details()[0]
        self.outputs = it.get_output_details()

    def _quantized_input(self, x: np.ndarray) -> np.ndarray:
        d = self.input
        if np.dtype(d["dtype"]).kind not in "iu":
            return np.ascontiguousarray(x, dtype=d["dtype"])
        scale, zero = d["quantization"]
        info = np.iinfo(d["dtype"])
        return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(d["dtype"])

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        self.it.set_tensor(self.input["index"], self._quantized_input(x))
        self.it.invoke()
        out = []
        for d in self.outputs:
            y = self.it.get_tensor(d["index"])
            scale, zero = d["quantization"]
            out.append((y.astype(np.float32) - zero) * scale if np.dtype(d["dtype"]).kind in "iu" else y.copy())
        return out

    def infer(self, x: np.ndarray) -> list[np.ndarray]:
        return torch_edge.per_row(self._run, x)

    def bind(self, x: np.ndarray) -> Callable[[], Any]:
        self.it.set_tensor(self.input["index"], self._quantized_input(x[:1]))  # set once: time invoke() only
        return self.it.invoke

    def io_quantization(self) -> dict[str, Any]:
        return io_quantization(self.it)

    def runtime_info(self) -> dict[str, Any]:
        """Dtypes read from the interpreter: operands of each compute op, model input/output, weights."""
        compute = [dt for op, dt in ops(self.path) if op in COMPUTE_OPS]
        int8 = sum(dt in INTEGER for dt in compute)
        dtypes = sorted({np.dtype(t["dtype"]).name for t in self.it.get_tensor_details()})
        info = {"runtime/precision": "int8" if compute and int8 / len(compute) > 0.5 else "fp32",
                "int8/ops_fraction": int8 / len(compute) if compute else 0.0, "runtime/compute_ops": len(compute),
                "runtime/tensor_dtypes": ",".join(dtypes),
                "runtime/input_dtype": np.dtype(self.input["dtype"]).name,
                "runtime/output_dtype": np.dtype(self.outputs[0]["dtype"]).name}
        if "float16" in dtypes:  # FP16 weights are dequantized to FP32 before XNNPACK computes
            info["runtime/weights_dtype"] = "float16"
        return info

    def float_layers(self) -> list[str]:
        return [f"{op}_{i}" for i, (op, dt) in enumerate(ops(self.path)) if op in COMPUTE_OPS and dt not in INTEGER]
