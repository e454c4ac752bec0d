"""TensorFlow Lite Micro (`target=mcu`): the full-integer INT8 `.tflite` (converted and quantized exactly as
the litert runtime does: litert-torch's PT2E quantizer) run by TFLite Micro's own interpreter and int8
kernels on the host (`tflite-micro`, Python bindings of the TFLM C++ library, AllOpsResolver).

What it records (Session.runtime_info), read from TFLM itself:
- `memory/arena_bytes`: the arena TFLM's planner allocated (RecordingMicroAllocator's "Arena allocation
  total"), and `memory/arena_search_bytes`, the smallest `arena_size` with which the interpreter still
  allocates and invokes, found by bisection. Host (x86-64) figures: a 32-bit MCU's structs are a little smaller.
- `memory/flash_bytes`: the flatbuffer + a stated runtime code size (the interpreter core + one kernel per
  op type the model uses; `options.runtime_code_bytes`, with its `source`, in conf/target/mcu.yaml).
- `memory/peak_ram_bytes`: the arena + the application's input and output buffers (TFLM's own input
  and output tensors live inside the arena; a sensor frame and a result copy live beside it).
- the previous release's graph-walk estimates under `memory/estimate_*` (flash, arena, peak RAM), computed
  by edgebuild/targets/mcu.py's walk over this .tflite's op graph, kept beside the real figures for a release.
- `latency/estimate_ms`: the MCU's latency, ESTIMATED as the MACs counted in the .tflite (`mcu/macs`) / the
  spec's MAC rate. `latency/p50_ms` is TFLM's reference kernels on the host, not the MCU, so the session names
  its device figure (`latency/device_metric` = "latency/estimate_ms", `latency/device_source` says how it was
  got): `max_latency_ms` budgets and the stream's duty-cycle energy read that figure instead of the host's.

The deployable is the same `.tflite` as litert's (format "litert"): a model quantized for target=litert
deploys here unchanged. A float `.tflite` runs on TFLM's float reference kernels (what a float stage of an
INT8 recipe is measured with); the build's final deployable must be INT8 (`check_plan`, at plan time).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgebuild.artifact import Artifact
from edgebuild.errors import EdgebuildError
from edgebuild.targets import torch_edge
from edgebuild.targets.base import Runtime, Session
from edgebuild.targets.litert import COMPUTE_OPS, INTEGER, LiteRTRuntime, graph, interpreter, ops

TFLM_PACKAGE = "tflite-micro==0.dev20261023182759"
TFLM_OPTIONS = ("runtime_code_bytes", "arena_search_max_bytes", "arena_margin_bytes", "bytes_per_weight",
                "bytes_per_activation",
                "runtime_overhead_bytes")
# builtin op name -> MicroMutableOpResolver method suffix, where plain CamelCase of the name is wrong
RESOLVER_NAMES = {"BATCH_MATMUL": "BatchMatMul", "LOGISTIC": "Logistic", "L2_NORMALIZATION": "L2Normalization",
                  "RESIZE_NEAREST_NEIGHBOR": "ResizeNearestNeighbor", "PRELU": "Prelu", "RELU6": "Relu6",
                  "RELU_N1_TO_1": "ReluN1To1", "MIRROR_PAD": "MirrorPad", "PADV2": "PadV2"}
ARENA_TOTAL = re.compile(r"Arena allocation total (\d+) bytes")
# the pinned tflite-micro segfaults (instead of failing to allocate) when given an arena of a few hundred bytes
# (measured: 400 B crashes, 600 B fails cleanly on the digits CNN): the arena search never asks for less
ARENA_FLOOR = 1024


def tflm() -> Any:
    return torch_edge.require("tflite_micro", TFLM_PACKAGE, "tflm")


@contextlib.contextmanager
def c_stderr() -> Iterator[list[str]]:
    """TFLM logs (allocations, kernel errors) to the C-level stderr: redirect fd 2 to a file while inside;
    the text is in the yielded list afterwards."""
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


def resolver_name(op: str) -> str:
    """CONV_2D -> Conv2D (MicroMutableOpResolver::AddConv2D)."""
    return RESOLVER_NAMES.get(op) or "".join(p.upper() if p[:1].isdigit() else p.capitalize() for p in op.split("_"))


def model_ops(path: Path) -> list[str]:
    """Op types of the .tflite, in first-use order (read from the flatbuffer)."""
    return list(dict.fromkeys(op for op, _ in ops(path)))


class Micro:
    """One TFLM interpreter of a .tflite, with its arena found: the planner's figure and the smallest that works."""

    def __init__(self, path: Path, search_max: int = 8 << 20):
        self.path = Path(path)
        self.data = self.path.read_bytes()
        self.search_max = int(search_max)
        runtime = tflm().runtime
        self._runtime = runtime
        with c_stderr() as log:
            ok, err = self._try(self.search_max)
        if not ok:
            raise self._error(err, log)
        self.it = ok
        self.arena_search_bytes = self._smallest()
        with c_stderr() as log:
            self.it.print_allocations()
        match = ARENA_TOTAL.search("".join(log))
        self.arena_bytes = int(match.group(1)) if match else self.arena_search_bytes
        self.input = self.it.get_input_details(0)
        self.output = self.it.get_output_details(0)

    def _try(self, arena: int) -> tuple[Any, str]:
        """(an interpreter that allocated and invoked once with `arena` bytes, or None, the error)."""
        try:
            it = self._runtime.Interpreter.from_bytes(self.data, arena_size=arena)
            d = it.get_input_details(0)
            it.set_input(np.zeros(tuple(d["shape"]), dtype=d["dtype"]), 0)
            it.invoke()
            return it, ""
        except (RuntimeError, ValueError) as e:
            return None, str(e)

    def _smallest(self) -> int:
        """Bisection over arena_size (16-byte steps): the smallest with which allocation and invoke succeed
        (ARENA_FLOOR when that already works)."""
        lo, hi = ARENA_FLOOR, self.search_max
        with c_stderr():
            if self._try(lo)[0] is not None:
                return lo
            while hi - lo > 16:
                mid = (lo + hi) // 2
                ok, _ = self._try(mid)
                lo, hi = (lo, mid) if ok else (mid, hi)
        return hi

    def _error(self, err: str, log: list[str]) -> EdgebuildError:
        text = "".join(log) + "\n" + err
        missing = re.search(r"Didn't find op for builtin opcode '(\w+)'", text) or \
            re.search(r"[Uu]nsupported (?:builtin )?op(?:erator)?[^A-Z_]*'?([A-Z_0-9]+)", text)
        if missing:
            op = missing.group(1)
            layers = [o for o in self._op_details() if o[0] == op]
            where = f" (layer {layers[0][1]!r})" if layers else ""
            return EdgebuildError(f"TFLite Micro has no kernel for operator {op}{where} in {self.path.name}",
                                  "rewrite that layer with ops TFLite Micro has (conv, depthwise conv, fully "
                                  "connected, pooling, add, reshape, softmax...) or use another target")
        if "Failed to allocate" in text or "arena" in text.lower():
            return EdgebuildError(f"TFLite Micro could not allocate {self.path.name} in an arena of "
                                  f"{self.search_max:,} bytes", "raise target.options.arena_search_max_bytes, "
                                  "or shrink the model's activations (width, input size)")
        first = [line for line in text.strip().splitlines() if line.strip()][-3:]
        return EdgebuildError(f"TFLite Micro failed to load {self.path.name}: {' | '.join(first)[:400]}",
                              "check that every operator of the model is one TFLite Micro has")

    def _op_details(self) -> list[tuple[str, str]]:
        return [(o["op_name"], o["output_names"][0] if o["output_names"] else "") for o in graph(self.path)]

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """One batch-1 float input -> the float (dequantized) output; int8 input quantized with its scale."""
        return [self.dequantize(self.raw(self.quantize(x)))]

    def quantize(self, x: np.ndarray) -> np.ndarray:
        d = self.input
        if np.dtype(d["dtype"]).kind not in "iu":
            return np.ascontiguousarray(x, dtype=d["dtype"])
        q = d["quantization_parameters"]
        scale, zero = float(q["scales"][0]), int(q["zero_points"][0])
        info = np.iinfo(d["dtype"])
        return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(d["dtype"])

    def raw(self, q: np.ndarray) -> np.ndarray:
        """The model's own output (int8 for an INT8 model) for its own input dtype."""
        self.it.set_input(q, 0)
        self.it.invoke()
        return np.array(self.it.get_output(0))

    def dequantize(self, y: np.ndarray) -> np.ndarray:
        d = self.output
        if np.dtype(d["dtype"]).kind not in "iu":
            return y.astype(np.float32)
        q = d["quantization_parameters"]
        return (y.astype(np.float32) - int(q["zero_points"][0])) * float(q["scales"][0])

    def io_quantization(self) -> dict[str, Any]:
        def one(d: dict[str, Any]) -> dict[str, Any]:
            q = d["quantization_parameters"]
            scales, zeros = list(q.get("scales", [])), list(q.get("zero_points", []))
            return {"dtype": np.dtype(d["dtype"]).name, "shape": [int(s) for s in d["shape"]],
                    "scale": float(scales[0]) if scales else 0.0, "zero_point": int(zeros[0]) if zeros else 0}

        return {"input": one(self.input), "output": one(self.output)}


def tflite_macs(path: Path) -> int:
    """MACs of one inference counted from the .tflite's own shapes: conv (kh*kw*in per output element),
    depthwise conv (kh*kw per output element), fully connected (in features per output element)."""
    it = interpreter(path)
    shape = {t["index"]: [int(d) for d in t["shape"]] for t in it.get_tensor_details()}
    macs = 0
    for o in graph(path):
        op, ins, outs = o["op_name"], o["inputs"], o["outputs"]
        if op not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED") or len(ins) < 2 or not outs:
            continue
        out, weights = int(np.prod(shape[outs[0]])), shape[ins[1]]
        per_output = {"CONV_2D": int(np.prod(weights[1:])), "DEPTHWISE_CONV_2D": int(np.prod(weights[1:3])),
                      "FULLY_CONNECTED": weights[-1]}[op]
        macs += out * per_output
    return macs


def io_bytes(micro: Micro) -> int:
    return sum(int(np.prod(d["shape"])) * np.dtype(d["dtype"]).itemsize for d in (micro.input, micro.output))


def code_bytes(op_types: list[str], table: dict[str, Any]) -> int:
    """The stated runtime code size: interpreter core + one kernel per op type used."""
    per_op = dict(table.get("per_op") or {})
    return int(table["core"]) + sum(int(per_op.get(op, table["default_op"])) for op in op_types)


def estimates(path: Path, options: dict[str, Any]) -> dict[str, Any]:
    """The previous release's MCU estimates (mcu.py's graph walk), here over the .tflite's own op graph:
    flash = weight elements x bytes_per_weight + runtime_overhead_bytes; arena = peak of live activations."""
    from edgebuild.targets.mcu import Node, peak_memory

    it = interpreter(path)
    details = {t["index"]: t for t in it.get_tensor_details()}
    op_list = graph(path)
    produced = {int(t) for o in op_list for t in o["outputs"]}
    graph_in = {int(d["index"]) for d in it.get_input_details()}
    graph_out = [str(int(d["index"])) for d in it.get_output_details()]
    per_act = int(options.get("bytes_per_activation", 1))

    def numel(i: int) -> int:
        return int(np.prod(details[i]["shape"])) if i in details else 0

    consts = {int(t) for o in op_list for t in o["inputs"] if int(t) >= 0 and int(t) not in produced | graph_in}
    nodes = [Node(f"{o['op_name']}_{o['index']}", o["op_name"],
                  [str(int(t)) for t in o["inputs"] if int(t) in produced | graph_in],
                  {str(int(t)): numel(int(t)) * per_act for t in o["outputs"]}) for o in op_list]
    mem = peak_memory(nodes, {str(i): numel(i) * per_act for i in graph_in}, graph_out)
    weights = sum(numel(i) for i in consts) * int(options.get("bytes_per_weight", 1))
    return {"memory/estimate_flash_bytes": weights + int(options.get("runtime_overhead_bytes", 65536)),
            "memory/estimate_arena_bytes": mem["arena_bytes"], "memory/estimate_peak_ram_bytes": mem["peak_ram_bytes"]}


class TFLMRuntime(LiteRTRuntime):
    """Deploys litert's .tflite (same conversion, same INT8 quantizer); runs it on TFLite Micro."""

    name = "tflm"
    format = "litert"  # the same .tflite file as the litert runtime's
    packages = ("litert-torch", "ai-edge-litert", "tflite-micro")
    int8_only = True  # the build's final deployable: an MCU runs the full-integer model

    precisions = ("int8",)  # the precision the MCU runs; float stages of a recipe still run (float kernels)

    def __init__(self, cfg: Any):
        Runtime.__init__(self, cfg)
        torch_edge.check_precision(cfg, self.name, ("int8", "auto"))
        opts = dict(cfg.options or {})
        self.options = {k: v for k, v in opts.items() if k in TFLM_OPTIONS}
        code = self.options.get("runtime_code_bytes")
        if code is None or "core" not in code or "default_op" not in code:
            raise EdgebuildError(f"target {cfg.name!r}: options.runtime_code_bytes needs core, default_op (and "
                                 "per_op, source): the stated code size that memory/flash_bytes adds",
                                 "see conf/target/mcu.yaml")

    @classmethod
    def check_plan(cls, target_cfg: Any, final_precision: str, final_stage: str) -> None:
        """Plan time: an int8-only target refuses a recipe whose last stage leaves the model float."""
        if cls.int8_only and final_precision != "int8":
            raise EdgebuildError(
                f"target {target_cfg.name!r} runs full-integer INT8 models only ({cls.name}), but the recipe's "
                f"last stage {final_stage!r} outputs a {final_precision} model",
                "end the recipe with a quantize stage (stages.quantize={kind: quantize}), or use a float target")

    def available_devices(self) -> list[str]:
        super().available_devices()
        tflm()
        return ["CPU"]

    def absent_device(self, device: str) -> str:
        return f"no {device} here: TFLite Micro's kernels run on the host CPU"

    def compile(self, artifact: Artifact, device: str, batch: int) -> TFLMSession:
        micro = Micro(artifact.main_file, int(self.options.get("arena_search_max_bytes", 8 << 20)))
        return TFLMSession(micro, artifact, self)

    def package(self, deployable: Artifact, out: Path, metrics: dict[str, Any]) -> dict[str, Any]:
        """Firmware-ready files beside the .tflite in deploy/ (edgebuild/targets/firmware.py); model.json's
        "firmware" entry."""
        from edgebuild.targets.firmware import write_firmware

        micro = Micro(deployable.main_file, int(self.options.get("arena_search_max_bytes", 8 << 20)))
        return write_firmware(deployable.main_file, out, model_ops(deployable.main_file), micro.arena_bytes,
                              micro.io_quantization(), int(self.options.get("arena_margin_bytes", 0)))


class TFLMSession(Session):
    """Not a LiteRT session: every inference runs in TFLM's interpreter (batch 1, row by row)."""

    def __init__(self, micro: Micro, artifact: Artifact, runtime: TFLMRuntime):
        self.micro, self.artifact, self.runtime = micro, artifact, runtime

    def infer(self, x: np.ndarray) -> list[np.ndarray]:
        return torch_edge.per_row(self.micro.run, x)

    def bind(self, x: np.ndarray) -> Callable[[], Any]:
        self.micro.it.set_input(self.micro.quantize(x[:1]), 0)
        return self.micro.it.invoke

    def float_layers(self) -> list[str]:
        return [f"{op}_{i}" for i, (op, dt) in enumerate(ops(self.artifact.main_file))
                if op in COMPUTE_OPS and dt not in INTEGER]

    def runtime_info(self) -> dict[str, Any]:
        path = self.artifact.main_file
        op_types = model_ops(path)
        compute = [dt for op, dt in ops(path) if op in COMPUTE_OPS]
        int8 = sum(dt in INTEGER for dt in compute)
        table = self.runtime.options["runtime_code_bytes"]
        code = code_bytes(op_types, table)
        flatbuffer = path.stat().st_size
        io = io_bytes(self.micro)
        return {"runtime/precision": "int8" if compute and int8 / len(compute) > 0.5 else "fp32",
                "int8/ops_fraction": int8 / len(compute) if compute else 0.0, "runtime/compute_ops": len(compute),
                "runtime/input_dtype": np.dtype(self.micro.input["dtype"]).name,
                "runtime/output_dtype": np.dtype(self.micro.output["dtype"]).name,
                "runtime/interpreter": "tflite-micro (TFLM kernels on the host)",
                "memory/arena_bytes": self.micro.arena_bytes,
                "memory/arena_search_bytes": self.micro.arena_search_bytes,
                "memory/flatbuffer_bytes": flatbuffer, "memory/runtime_code_bytes": code,
                "memory/runtime_code_source": str(table.get("source", "")),
                "memory/flash_bytes": flatbuffer + code, "memory/io_bytes": io,
                "memory/peak_ram_bytes": self.micro.arena_bytes + io,
                "mcu/ops": ",".join(op_types),
                **self.device_latency(int8 / len(compute) > 0.5 if compute else False),
                **estimates(path, self.runtime.options)}

    def device_latency(self, is_int8: bool) -> dict[str, Any]:
        """The MCU's latency: an estimate (MACs / the spec's MAC rate), named as the device's figure."""
        spec = self.runtime.cfg.spec
        rates = dict(spec.peak_macs_per_s or {})
        rate = rates.get("int8" if is_int8 else "fp32") or rates.get("fp32")
        macs = tflite_macs(self.artifact.main_file)
        if not rate or not macs:
            return {"mcu/macs": macs}
        return {"mcu/macs": macs, "latency/estimate_ms": macs / float(rate) * 1000.0,
                "latency/device_metric": "latency/estimate_ms",
                "latency/device_source": f"estimate: {macs:,} MACs / {float(rate):.3g} MAC/s ({spec.name}), "
                                         "not measured"}
