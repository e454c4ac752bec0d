"""Microcontroller target (`target=mcu`, e.g. a Cortex-M7): ESTIMATES ONLY — no MCU runtime runs here.

From the deployable's graph at batch 1, in execution (topological) order:
- `memory/flash_bytes` = every weight element at `bytes_per_weight` (INT8: 1 byte; scales and biases
  are counted the same way, a slight underestimate for int32 biases) + the stated `runtime_overhead_bytes`;
- `memory/peak_ram_bytes` = the largest set of simultaneously live activation tensors (INT8: 1 byte per
  element; a tensor lives from the op that writes it to the last op that reads it; an elementwise or
  reshaping op may overwrite its input in place when it is that input's last reader) + the input and
  output buffers, which the application owns;
- `latency/estimate_ms` = MACs / the spec's MAC rate (Target.estimate_ms).
Accuracy and `latency/p50_ms` come from a stand-in runtime (OpenVINO on the host CPU) and say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgebuild.artifact import Artifact
from edgebuild.errors import EdgebuildError
from edgebuild.targets.openvino import OpenVINORuntime, OpenVINOSession

MCU_OPTIONS = ("runtime_overhead_bytes", "bytes_per_weight", "bytes_per_activation")
# ops that can write their output over their (single activation) input: elementwise and reshapes
IN_PLACE = {"Relu", "Clamp", "Sigmoid", "Swish", "HSwish", "HSigmoid", "Tanh", "Elu", "Gelu", "Mish", "SoftPlus",
            "PRelu", "Add", "Multiply", "Subtract", "Divide", "FakeQuantize", "Convert", "Reshape", "Squeeze",
            "Unsqueeze", "Flatten"}
SKIP = {"Parameter", "Result", "Constant"}


@dataclass
class Node:
    """One executed op: the activation tensors it reads and writes (bytes per written tensor)."""

    name: str
    type: str
    inputs: list[str]
    outputs: dict[str, int]


def peak_memory(nodes: list[Node], graph_inputs: dict[str, int], graph_outputs: list[str]) -> dict[str, Any]:
    """Peak bytes of live activation buffers over the execution order, plus the I/O buffers.

    A buffer is live from the step that writes it to the last step that reads it (both included). An
    IN_PLACE op that is the last reader of its only activation input reuses that input's buffer.
    Graph inputs and outputs are the application's buffers: counted once each, beside the arena."""
    last_read: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for t in node.inputs:
            last_read[t] = i
    buffer_of: dict[str, str] = {}
    buffers: dict[str, dict[str, int]] = {}  # buffer -> size, start, end
    for i, node in enumerate(nodes):
        arena_inputs = [t for t in node.inputs if t not in graph_inputs]
        for t in node.inputs:
            if t in buffer_of:
                buffers[buffer_of[t]]["end"] = max(buffers[buffer_of[t]]["end"], i)
        for t, size in node.outputs.items():
            if t in graph_outputs:
                continue
            src = arena_inputs[0] if len(node.inputs) == 1 and len(arena_inputs) == 1 else None
            if node.type in IN_PLACE and src in buffer_of and last_read.get(src) == i and len(node.outputs) == 1:
                buffer_of[t] = buffer_of[src]
                buffers[buffer_of[t]]["size"] = max(buffers[buffer_of[t]]["size"], size)
            else:
                buffer_of[t] = t
                buffers[t] = {"size": size, "start": i, "end": i}
    peak, peak_step = 0, ""
    for i, node in enumerate(nodes):
        live = sum(b["size"] for b in buffers.values() if b["start"] <= i <= b["end"])
        if live > peak:
            peak, peak_step = live, node.name
    io_in = sum(graph_inputs.values())
    io_out = sum(size for n in nodes for t, size in n.outputs.items() if t in graph_outputs)
    return {"arena_bytes": peak, "input_bytes": io_in, "output_bytes": io_out, "peak_ram_bytes": peak + io_in + io_out,
            "peak_at": peak_step}


def graph_of(model: Any, bytes_per_activation: int) -> tuple[list[Node], dict[str, int], list[str], int, int]:
    """Execution-order nodes of an OpenVINO model with static shapes, its I/O tensors, weight elements
    and MACs. Ops computed only from constants (shape arithmetic, weight decompression) count as weights."""
    def tensor(output: Any) -> str:
        return f"{output.get_node().get_friendly_name()}:{output.get_index()}"

    constant: set[str] = set()
    nodes: list[Node] = []
    graph_inputs: dict[str, int] = {}
    weights = macs = 0
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        name = op.get_friendly_name()
        outs = list(op.outputs())
        for out in outs:
            if out.get_partial_shape().is_dynamic:
                raise EdgebuildError(
                    f"target mcu needs static shapes, but {kind} {name!r} has shape {out.get_partial_shape()} at "
                    f"batch 1", "export a model whose every tensor shape is fixed (no data-dependent ops such as "
                    "NonZero or NMS); MCU runtimes plan memory ahead of time")
        if kind == "Constant":
            if op.get_element_type().is_real() or op.get_element_type().get_type_name() in ("i8", "u8", "i4", "u4"):
                weights += _numel(op.get_output_shape(0))
            constant.add(tensor(outs[0]))
            continue
        ins = [tensor(i.get_source_output()) for i in op.inputs()]
        if kind == "ShapeOf" or (kind not in ("Parameter", "Result") and all(t in constant for t in ins)):
            constant.update(tensor(o) for o in outs)  # folded at conversion time on a real MCU toolchain
            continue
        if kind == "Parameter":
            graph_inputs[tensor(outs[0])] = _numel(outs[0].get_shape()) * bytes_per_activation
            continue
        if kind == "Result":
            continue
        act_in = [t for t in ins if t not in constant]
        nodes.append(Node(name, kind, act_in,
                          {tensor(o): _numel(o.get_shape()) * bytes_per_activation for o in outs}))
        macs += _macs(op)
    outputs = [tensor(r.input_value(0)) for r in model.get_results()]
    return nodes, graph_inputs, outputs, weights, macs


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _macs(op: Any) -> int:
    kind = op.get_type_name()
    if kind in ("Convolution", "GroupConvolution"):
        w = list(op.input_value(1).get_shape())  # [O, I, kh, kw] or [G, O/G, I/G, kh, kw]
        per_output = _numel(w[-3:]) if kind == "GroupConvolution" else _numel(w[1:])
        return _numel(op.get_output_shape(0)) * per_output
    if kind == "MatMul":
        a = list(op.input_value(0).get_shape())
        k = a[-2] if op.get_transpose_a() else a[-1]
        return _numel(op.get_output_shape(0)) * int(k)
    return 0


def estimate(xml_path: Any, input_shape: list[int], options: dict[str, Any]) -> dict[str, Any]:
    """Flash, peak RAM and MACs of an OpenVINO IR at batch 1 (see the module docstring)."""
    import openvino as ov

    if not input_shape or any(not isinstance(d, int) or d <= 0 for d in input_shape):
        raise EdgebuildError(f"target mcu needs a static input shape, the model has {input_shape}",
                             "set data.image_size / data.channels so the input is [1, C, H, W]")
    model = ov.Core().read_model(str(xml_path))
    if len(model.inputs) == 1:
        model.reshape([1, *list(input_shape)[1:]])
    nodes, inputs, outputs, weight_elements, macs = graph_of(model, int(options["bytes_per_activation"]))
    mem = peak_memory(nodes, inputs, outputs)
    flash = weight_elements * int(options["bytes_per_weight"]) + int(options["runtime_overhead_bytes"])
    return {"memory/flash_bytes": flash, "memory/weights_bytes": weight_elements * int(options["bytes_per_weight"]),
            "memory/peak_ram_bytes": mem["peak_ram_bytes"], "memory/arena_bytes": mem["arena_bytes"],
            "memory/io_bytes": mem["input_bytes"] + mem["output_bytes"], "memory/peak_at": mem["peak_at"],
            "mcu/macs": macs}


class MCURuntime(OpenVINORuntime):
    """Runs accuracy and latency on OpenVINO CPU as a stand-in; adds the MCU memory estimates. Its format
    and capabilities are OpenVINO's: what an OpenVINO target can build (quantize, qat, fp16), mcu can."""

    name = "mcu"

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.options = {"runtime_overhead_bytes": 65536, "bytes_per_weight": 1, "bytes_per_activation": 1,
                        **{k: v for k, v in dict(cfg.options or {}).items() if k in MCU_OPTIONS}}

    def available_devices(self) -> list[str]:
        return ["CPU"]  # the stand-in; the MCU named by target.device is never present

    def compile_config(self) -> dict[str, Any]:
        return {k: v for k, v in super().compile_config().items() if k not in MCU_OPTIONS}

    def compile(self, artifact: Artifact, device: str, batch: int) -> MCUSession:
        estimates = estimate(artifact.main_file, artifact.meta.get("input_shape"), self.options)
        return MCUSession(super().compile(artifact, device, batch).compiled, estimates, self.cfg)


class MCUSession(OpenVINOSession):
    def __init__(self, compiled: Any, estimates: dict[str, Any], cfg: Any):
        super().__init__(compiled)
        self.estimates, self.cfg = estimates, cfg

    def runtime_info(self) -> dict[str, Any]:
        return {**super().runtime_info(), **self.estimates,
                # evaluate adds latency/estimate_ms (MACs / the spec's rate): the budget's latency limit checks it
                "latency/device_metric": "latency/estimate_ms",
                "latency/device_source": f"estimate: MACs / the spec's MAC rate ({self.cfg.spec.name}), not measured",
                "mcu/estimated": f"flash, RAM and latency/estimate_ms are estimates for {self.cfg.spec.name}; "
                                 "accuracy and latency/p50_ms come from OpenVINO on the host CPU (stand-in)"}
