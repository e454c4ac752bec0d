"""ExecuTorch: a `.pte` program lowered to the XNNPACK delegate, run by ExecuTorch's Python runtime.
FP32, and INT8 by PT2E with XNNPACKQuantizer calibrated on the calibration set."""

from __future__ import annotations

import collections
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
# compute kernels as the .pte names them outside a delegate (and as torch.export names them)
# (aten_convolution_default, aten.conv2d.default, aten::convolution.out: the three spellings met)
_COMPUTE = re.compile(r"aten(?:::|\.|_)(convolution|conv[123]d|conv_transpose[123]d|linear|addmm|mm|bmm|matmul)"
                      r"(?:[._].*)?")


def _is_compute(op: str) -> bool:
    return bool(_COMPUTE.fullmatch(op))


def _require() -> Any:
    return torch_edge.require("executorch.runtime", PACKAGE, "executorch")


def lower(model: Any, meta: dict[str, Any], path: Path) -> Path:
    """torch module (float or PT2E-converted) -> .pte at `path`, compute lowered to XNNPACK where it can."""
    import torch

    _require()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    try:
        exported = torch.export.export(model, (torch_edge.example_input(meta),))
        program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch()
    except Exception as e:  # export/lowering raise many types; name the operator
        raise torch_edge.conversion_error(e, "executorch", model) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(program.buffer)
    return path


XNN_COMPUTE = ("XNNConv2d", "XNNDepthwiseConv2d", "XNNConvTranspose2d", "XNNFullyConnected",
               "XNNBatchMatrixMultiply")
XNN_INT8 = ("xnn_datatype_qint8", "xnn_datatype_quint8", "xnn_datatype_qdint8", "xnn_datatype_qpint8")


def _xnnpack_graph(blob: bytes) -> dict[str, Any]:
    """An XNNPACK delegate payload (XNNHeader + flatbuffer + constants) as JSON, by the schema it ships."""
    import importlib.resources
    import json
    import tempfile

    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader
    from executorch.exir._serialize._flatbuffer import _flatc_decompile

    header = XNNHeader.from_bytes(blob[:XNNHeader.EXPECTED_LENGTH])
    graph = blob[header.flatbuffer_offset:header.flatbuffer_offset + header.flatbuffer_size]
    schema = importlib.resources.files("executorch.backends.xnnpack.serialization") / "schema.fbs"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "graph.bin").write_bytes(graph)
        _flatc_decompile(tmp, str(schema), str(Path(tmp) / "graph.bin"), ["--raw-binary"])
        text = (Path(tmp) / "graph.json").read_text()
    return json.loads(re.sub(r"(?<=: )-?(inf|nan)\b", "null", text))  # flatc writes clamp bounds as inf


def program_report(path: Path) -> dict[str, Any]:
    """What the .pte runs, read from the file: its delegates, the kernels left outside them, and inside each
    XNNPACK graph the compute nodes with the datatype of their input (qint8: an int8 kernel)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte = deserialize_pte_binary(path.read_bytes())
    program = getattr(pte, "program", pte)
    plan = program.execution_plan[0]
    names = [op.name for op in plan.operators]
    outside = [names[i.instr_args.op_index] for i in plan.chains[0].instructions
               if type(i.instr_args).__name__ == "KernelCall"]
    inputs: list[str] = []  # datatype of each delegated compute node's input
    for delegate in plan.delegates:
        if delegate.id != "XnnpackBackend" or delegate.processed.location.name != "INLINE":
            continue
        graph = _xnnpack_graph(program.backend_delegate_data[delegate.processed.index].data)
        dtype = {}
        for v in graph["xvalues"]:
            t = v["xvalue_union"].get("tensor_value", v["xvalue_union"])
            dtype[t.get("id_out")] = t.get("datatype")
        inputs += [dtype.get(n["xnode_union"].get("input1_id")) for n in graph["xnodes"]
                   if n["xnode_union_type"] in XNN_COMPUTE]
    return {"delegates": [d.id for d in plan.delegates], "outside": outside, "delegated_inputs": inputs,
            "outside_compute": sum(_is_compute(n) for n in outside)}


class ExecuTorchRuntime(Runtime):
    name = "executorch"
    format = "executorch"
    files = (PTE_FILE,)
    suffixes = (".pte",)
    export_by_default = False  # the export stage writes it only for this target or when named
    capabilities = frozenset({base.QUANTIZE, base.EXPORT})
    precisions = ("f32", "fp32")  # XNNPACK FP32; INT8 comes from quantize()
    packages = ("executorch",)

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        torch_edge.check_precision(cfg, self.name)

    def available_devices(self) -> list[str]:
        _require()  # a missing package fails at Target.check(), before any work
        return ["CPU"]

    def _from_torch(self, source: Artifact, folder: Path) -> Artifact:
        lower(source.load_torch(), source.meta, folder / PTE_FILE)
        return Artifact(self.format, folder, [PTE_FILE], meta={**source.meta, "format": self.format})

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
        quantize(model, request.calibration, source.meta, workdir / PTE_FILE, request.per_channel,
                             base.select_layers(torch_edge.module_names(model), request.ignored_names,
                                                request.ignored_patterns))
        float_model = self._from_torch(source, scratch)
        meta = {**request.meta, "format": self.format}
        scheme = {"target_device": self.quantization_device(), "calibration_method": "pt2e-default"}
        return Quantized(Artifact(self.format, workdir, [PTE_FILE], meta), float_model, [], scheme)

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
    report = program_report(lower(converted, meta, path))
    int8 = sum(d in XNN_INT8 for d in report["delegated_inputs"])
    if not int8:
        raise EdgebuildError(f"ExecuTorch INT8: no compute op of {type(model).__name__} runs int8 "
                             f"({len(report['delegated_inputs'])} delegated to XNNPACK taking "
                             f"{sorted(set(map(str, report['delegated_inputs'])))}, "
                             f"{report['outside_compute']} outside)",
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

    def runtime_info(self) -> dict[str, Any]:
        """Read from the .pte: delegated compute (XNNPACK graph nodes) vs kernels outside any delegate,
        and the datatype each delegated compute node takes."""
        r = program_report(self.artifact.main_file)
        inputs = r["delegated_inputs"]
        total = len(inputs) + r["outside_compute"]
        int8 = sum(d in XNN_INT8 for d in inputs)
        floats = collections.Counter(str(d).removeprefix("xnn_datatype_") for d in inputs if d not in XNN_INT8)
        # non-delegated compute runs ExecuTorch's portable float kernels
        floats["fp32"] += r["outside_compute"]
        precision = "int8" if total and int8 / total > 0.5 else base.precision_label(floats.most_common(1)[0][0])
        return {"runtime/precision": precision, "int8/ops_fraction": int8 / total if total else 0.0,
                "runtime/delegated_fraction": len(inputs) / total if total else 0.0, "runtime/compute_ops": total,
                "runtime/delegates": ",".join(r["delegates"]), "runtime/non_delegated_ops": len(r["outside"])}

    def float_layers(self) -> list[str]:
        """Compute nodes not running int8 (the lowered program keeps no layer names: node kind and position)."""
        r = program_report(self.artifact.main_file)
        return ([f"xnnpack_compute_{i}" for i, d in enumerate(r["delegated_inputs"]) if d not in XNN_INT8]
                + [n for n in r["outside"] if _is_compute(n)])
