"""export: torch -> ONNX and/or OpenVINO IR (FP32 weights unless fp16 is asked for)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from edgebuild.artifact import IR_FILE, ONNX_FILE, Artifact
from edgebuild.config import bounded
from edgebuild.errors import EdgebuildError
from edgebuild.stage import Stage, StageResult

FORMATS = ("openvino", "onnx")


@dataclass
class Export(Stage):
    """Writes every requested format; the artifact's kind is the target runtime's format."""

    kind: ClassVar[str] = "export"
    version: ClassVar[int] = 1
    uses: ClassVar[tuple[str, ...]] = ("task", "target_format")

    formats: list[str] = field(default_factory=lambda: ["openvino", "onnx"])
    dynamic_batch: bool = True
    opset: int = bounded(17, ge=7, le=20)  # torch's TorchScript ONNX exporter writes opsets 7-20

    def check(self, cfg: Any) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise EdgebuildError(f"export formats {unknown or self.formats} not supported",
                                 f"use a non-empty subset of {list(FORMATS)}")

    def run(self, ctx: Any) -> StageResult:
        from edgebuild.convert import onnx_to_openvino, torch_to_onnx

        source = ctx.input
        if source.kind != "torch":
            raise EdgebuildError(f"export needs a torch model; its input is already {source.kind}",
                                 "point the export stage's input to a torch stage (train, prune, ...)")
        formats = list(dict.fromkeys([ctx.target.format, *self.formats]))
        onnx = torch_to_onnx(source.load_torch(), source.meta["input_shape"], ctx.workdir / ONNX_FILE,
                             ctx.task.output_names, dynamic_batch=self.dynamic_batch, opset=self.opset)
        files = {"onnx": [ONNX_FILE]}
        if "openvino" in formats:
            onnx_to_openvino(onnx, ctx.workdir / IR_FILE)
            files["openvino"] = [IR_FILE, "model.bin"]
        if "onnx" not in formats:
            onnx.unlink()
            del files["onnx"]
        primary = ctx.target.format
        ordered = files[primary] + [f for k, v in files.items() if k != primary for f in v]
        meta = {**source.meta, "formats": [k for k in files], "precision": "fp32"}
        return StageResult(Artifact(primary, ctx.workdir, ordered, meta=meta))
