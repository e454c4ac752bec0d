"""Format conversion, in one place: torch -> ONNX -> OpenVINO IR."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgebuild.errors import EdgebuildError


def torch_to_onnx(model: Any, input_shape: Sequence[int], path: Path, output_names: Sequence[str],
                  dynamic_batch: bool = True, opset: int = 17) -> Path:
    import torch

    model = model.eval()
    example = torch.zeros(list(input_shape))
    axes = {n: {0: "batch"} for n in ["input", *output_names]} if dynamic_batch else None
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            # TorchScript-based exporter: ~40x faster than dynamo on small models and it exports
            # detection backbones+heads that the dynamo exporter rejects
            torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"],
                              output_names=list(output_names), dynamic_axes=axes, opset_version=opset)
    except Exception as e:  # exporters raise many types; name the model and the reason
        raise EdgebuildError(f"ONNX export of {type(model).__name__} failed: {str(e).splitlines()[0][:300]}",
                             "make the model's forward traceable (tensor in, tensors out)") from None
    return path


def onnx_to_openvino(onnx_path: Path, xml_path: Path, compress_to_fp16: bool = False) -> Path:
    import openvino as ov

    return save_ir(ov.convert_model(str(onnx_path)), xml_path, compress_to_fp16=compress_to_fp16)


# OpenVINO names the nodes it creates (folded constants, inserted converts, NNCF's constants) TYPE_ID, with
# ID a process-wide counter: the same conversion run twice, or after other work in the same process, writes
# Constant_1234 once and Constant_4938 the next time, so the IR's bytes (and its cache digest) change.
_AUTO_NAME = re.compile(r"^([A-Za-z][A-Za-z0-9]*)_(\d+)$")


def canonical_names(model: Any) -> Any:
    """Renumber OpenVINO's auto-generated node names (TYPE_ID, no tensor names of their own) in graph
    order, in place: TYPE_0, TYPE_1, ... per TYPE. Names that came from the source model (they carry
    tensor names, or do not look like TYPE_ID), the inputs and the outputs are left as they are."""
    ops = [op for op in model.get_ordered_ops() if op.get_type_name() not in ("Parameter", "Result")]
    auto = [op for op in ops if _AUTO_NAME.match(op.get_friendly_name())
            and not any(out.get_names() for out in op.outputs())]
    ids = {id(op) for op in auto}
    taken = {op.get_friendly_name() for op in ops if id(op) not in ids}
    counters: dict[str, int] = {}
    for op in auto:
        prefix = _AUTO_NAME.match(op.get_friendly_name()).group(1)
        while True:
            n = counters.get(prefix, 0)
            counters[prefix] = n + 1
            if f"{prefix}_{n}" not in taken:
                break
        op.set_friendly_name(f"{prefix}_{n}")
    return model


def save_ir(model: Any, xml_path: Path, compress_to_fp16: bool = False) -> Path:
    """Every IR edgebuild writes goes through here: the same model gives the same bytes in any process."""
    import openvino as ov

    xml_path.parent.mkdir(parents=True, exist_ok=True)
    # ov.save_model compresses weights to FP16 by default; an "FP32" IR must really hold FP32
    ov.save_model(canonical_names(model), str(xml_path), compress_to_fp16=compress_to_fp16)
    return xml_path


def artifact_to_onnx(artifact: Any, folder: Path, output_names: Sequence[str]) -> Path:
    """An ONNX file for a torch or ONNX artifact."""
    if artifact.kind == "onnx":
        return artifact.main_file
    if artifact.kind == "torch":
        return torch_to_onnx(artifact.load_torch(), artifact.meta["input_shape"], folder / "model.onnx", output_names)
    raise EdgebuildError(f"cannot turn an {artifact.kind} artifact into ONNX", "export to ONNX before converting to IR")
