"""ExecuTorch: a `.pte` program lowered to the XNNPACK delegate, run by ExecuTorch's Python runtime.
FP32, and INT8 by PT2E with XNNPACKQuantizer calibrated on the calibration set."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgebuild.artifact import Artifact
from edgebuild.errors import EdgebuildError
from edgebuild.targets import base, torch_edge
from edgebuild.targets.base import Quantized, QuantizeRequest, Runtime, Session

PTE_FILE = "model.pte"
PACKAGE = "executorch==1.5.1"
# edge-dialect op names (get_delegation_info) and .pte operator names of compute layers
# (aten_convolution_default, aten.conv2d.default, aten::convolution.out: the three spellings met)
_COMPUTE = re.compile(r"aten(?:::|\.|_)(convolution|conv[123]d|conv_transpose[123]d|linear|addmm|mm|bmm|matmul)"
                      r"(?:[._].*)?")


def _is_compute(op: str) -> bool:
    return bool(_COMPUTE.fullmatch(op))


def _require() -> Any:
    return torch_edge.require("executorch.runtime", PACKAGE, "executorch")


def lower(model: Any, meta: dict[str, Any], path: Path, int8_ops: int | None = None) -> dict[str, Any]:
    """torch module (float or PT2E-converted) -> .pte with XNNPACK; returns what the lowering delegated.
    `int8_ops`: compute ops the quantizer gave int8 weights (None: a float model)."""
    import torch

    _require()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower

    try:
        exported = torch.export.export(model, (torch_edge.example_input(meta),))
        lowered = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
        program = lowered.to_executorch()
    except Exception as e:  # export/lowering raise many types; name the operator
        raise torch_edge.conversion_error(e, "executorch", model) from None
    table = get_delegation_info(lowered.exported_program().graph_module).get_operator_delegation_dataframe()
    rows = [r for r in table.to_dict("records") if r["op_type"] != "Total" and _is_compute(r["op_type"])]
    delegated = sum(int(r["occurrences_in_delegated_graphs"]) for r in rows)
    total = delegated + sum(int(r["occurrences_in_non_delegated_graphs"]) for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(program.buffer)
    # XNNPACK runs a conv in int8 only when the quantizer annotated it and the delegate took it
    int8 = min(int8_ops, delegated) if int8_ops is not None else 0
    return {"compute_ops": total, "delegated_compute_ops": delegated, "int8_compute_ops": int8,
            "precision": "int8" if total and int8 / total > 0.5 else "f32"}


def _int8_weighted(graph: Any) -> int:
    """Compute nodes of a PT2E-converted graph whose weight comes through a dequantize (int8 weights)."""
    n = 0
    for node in graph.graph.nodes:
        if node.op == "call_function" and _is_compute(str(node.target)) and len(node.args) > 1:
            w = node.args[1]
            n += bool(getattr(w, "op", None) == "call_function" and "dequantize" in str(w.target))
    return n


class ExecuTorchRuntime(Runtime):
    name = "executorch"
    format = "executorch"
    files = (PTE_FILE,)
    suffixes = (".pte",)
    export_by_default = False  # the export stage writes it only for this target or when named
    capabilities = frozenset({base.QUANTIZE, base.EXPORT})
    precisions = ("f32", "fp32")  # XNNPACK FP32; INT8 comes from quantize()

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        torch_edge.check_precision(cfg, self.name)

    def available_devices(self) -> list[str]:
        _require()  # a missing package fails at Target.check(), before any work
        return ["CPU"]

    def _from_torch(self, source: Artifact, folder: Path) -> Artifact:
        report = lower(source.load_torch(), source.meta, folder / PTE_FILE)
        return Artifact(self.format, folder, [PTE_FILE],
                        meta={**source.meta, "format": self.format, "executorch": report})

    def deployable(self, artifact: Artifact, folder: Path, output_names: list[str]) -> Artifact:
        if artifact.kind == self.format:
            return Artifact(self.format, artifact.root, [f for f in artifact.files if f.endswith(".pte")],
                            meta=artifact.meta)
        if artifact.kind != "torch":
            raise EdgebuildError(f"target {self.cfg.name!r} (ExecuTorch) lowers torch models; this stage produced "
                                 f"{artifact.kind}", "feed it a torch stage (train, prune, ...) or use a target for "
                                                     f"{artifact.kind}")
        return self._from_torch(artifact, folder)

    def export(self, source: Artifact, folder: Path, output_names: list[str], dynamic_batch: bool,
               opset: int) -> list[str]:
        self._from_torch(source, folder)  # batch 1, static shapes: dynamic_batch/opset do not apply
        return [PTE_FILE]

    def quantize(self, source: Artifact, request: QuantizeRequest, workdir: Path, scratch: Path) -> Quantized:
        """INT8: PT2E with XNNPACKQuantizer (symmetric int8 weights, per-channel if asked; activations
        per-tensor as XNNPACK takes them), calibrated on request.calibration, lowered to XNNPACK."""
        if source.kind == self.format:
            raise base.already_quantized(source) if source.meta.get("precision") == "int8" else EdgebuildError(
                "quantize for ExecuTorch needs the torch model; its input is already a .pte",
                "set the stage's input to a torch stage (train, prune, ...)")
        model = source.load_torch()
        quantized = quantize(model, request.calibration, source.meta, workdir / PTE_FILE, request.per_channel,
                             base.select_layers(torch_edge.module_names(model), request.ignored_names,
                                                request.ignored_patterns))
        float_model = self._from_torch(source, scratch)
        meta = {**request.meta, "format": self.format, "executorch": quantized}
        return Quantized(Artifact(self.format, workdir, [PTE_FILE], meta), float_model, [])

    def compile(self, artifact: Artifact, device: str, batch: int) -> ExecuTorchSession:
        rt = _require()
        from executorch.extension.pybindings import portable_lib

        if int(self.cfg.threads) > 0:  # process-wide XNNPACK threadpool (defaults to the core count)
            portable_lib._unsafe_reset_threadpool(int(self.cfg.threads))
        program = rt.Runtime.get().load_program(str(artifact.main_file))
        return ExecuTorchSession(program.load_method("forward"), artifact)


def quantize(model: Any, calibration: np.ndarray, meta: dict[str, Any], path: Path, per_channel: bool = True,
             ignored: list[str] | None = None) -> dict[str, Any]:
    """torch model + calibration inputs (float32 [N,C,H,W], preprocessed) -> INT8 .pte at `path`;
    returns the lowering report. Raises EdgebuildError when no compute op ends up int8."""
    _require()
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=per_channel))
    for name in ignored or []:
        quantizer.set_module_name(name, None)
    converted = torch_edge.pt2e_calibrated(model, quantizer, calibration, meta)
    report = lower(converted, meta, path, int8_ops=_int8_weighted(converted))
    if not report["int8_compute_ops"]:
        raise EdgebuildError(f"ExecuTorch INT8: no compute op of {type(model).__name__} runs int8 "
                             f"({report['compute_ops']} compute ops, {report['delegated_compute_ops']} delegated)",
                             "XNNPACKQuantizer quantizes conv and linear layers: check ignored layers and that the "
                             "model has convolutions or nn.Linear")
    return report


class ExecuTorchSession(Session):
    def __init__(self, method: Any, artifact: Artifact):
        self.method = method
        self.artifact = artifact

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        import torch

        return [o.numpy().copy() for o in self.method.execute([torch.from_numpy(np.ascontiguousarray(x))])]

    def infer(self, x: np.ndarray) -> list[np.ndarray]:
        return torch_edge.per_row(self._run, x)

    def bind(self, x: np.ndarray) -> Callable[[], Any]:
        import torch

        execute, inputs = self.method.execute, [torch.from_numpy(np.ascontiguousarray(x[:1]))]
        return lambda: execute(inputs)

    def _plan(self) -> Any:
        from executorch.exir._serialize._program import deserialize_pte_binary

        pte = deserialize_pte_binary(self.artifact.main_file.read_bytes())
        return getattr(pte, "program", pte).execution_plan[0]

    def runtime_info(self) -> dict[str, Any]:
        """The .pte's own plan (delegate calls and the kernels left outside them), with the lowering report
        for what happens inside the XNNPACK blob (opaque to the runtime)."""
        plan = self._plan()
        names = [op.name for op in plan.operators]
        outside = [names[i.instr_args.op_index] for i in plan.chains[0].instructions
                   if type(i.instr_args).__name__ == "KernelCall"]
        outside_compute = sum(_is_compute(n) for n in outside)
        report = self.artifact.meta.get("executorch") or {}
        total = int(report.get("compute_ops") or outside_compute)
        int8 = int(report.get("int8_compute_ops", 0))
        return {"runtime/precision": report.get("precision", "f32"),
                "int8/ops_fraction": int8 / total if total else 0.0,
                "runtime/delegated_fraction": (total - outside_compute) / total if total else 0.0,
                "runtime/compute_ops": total, "runtime/delegates": ",".join(d.id for d in plan.delegates),
                "runtime/non_delegated_ops": len(outside)}

    def float_layers(self) -> list[str]:
        report = self.artifact.meta.get("executorch") or {}
        n = int(report.get("compute_ops", 0)) - int(report.get("int8_compute_ops", 0))
        return [f"compute_op_{i}" for i in range(n)]  # the lowered program keeps no layer names
