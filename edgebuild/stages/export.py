"""export: torch -> the runtimes' formats (FP32 weights). Every registered runtime with the EXPORT
capability writes its own format (`Runtime.export`); the default writes them all."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from edgebuild.artifact import Artifact
from edgebuild.config import bounded
from edgebuild.errors import EdgebuildError
from edgebuild.stage import Stage, StageResult


def exportable() -> dict[str, Any]:
    """{format: runtime class} of every registered runtime that can export from torch."""
    from edgebuild.targets import base, formats

    return {f: cls for f, cls in formats().items() if cls.supports(base.EXPORT)}


@dataclass
class Export(Stage):
    """Writes every requested format; the artifact's kind is the target runtime's format."""

    kind: ClassVar[str] = "export"
    version: ClassVar[int] = 1
    uses: ClassVar[tuple[str, ...]] = ("task", "target_format")

    formats: list[str] = field(default_factory=list)  # empty: the target's + every export_by_default format
    dynamic_batch: bool = True
    opset: int = bounded(17, ge=7, le=20)  # where the format has opsets (torch's TorchScript ONNX exporter: 7-20)

    def check(self, cfg: Any) -> None:
        known = exportable()
        unknown = [f for f in self.formats if f not in known]
        if unknown:
            raise EdgebuildError(f"export formats {unknown} not supported",
                                 f"use a subset of {list(known)} (or leave formats empty for all of them)")

    def run(self, ctx: Any) -> StageResult:
        source = ctx.input
        if source.kind != "torch":
            raise EdgebuildError(f"export needs a torch model; its input is already {source.kind}",
                                 "point the export stage's input to a torch stage (train, prune, ...)")
        known = exportable()
        # the target's format first: the artifact's kind is what the target deploys
        wanted = [ctx.target.format] if ctx.target.format in known else []
        # default: the formats runtimes export unasked (heavy converters, e.g. ExecuTorch and LiteRT, only
        # when they are the target or named in formats: they would slow every build and need an extra)
        default = [f for f, cls in known.items() if cls.export_by_default]
        formats = list(dict.fromkeys([*wanted, *(self.formats or default)]))
        files: list[str] = []
        for fmt in formats:
            files += known[fmt](ctx.target.cfg).export(source, ctx.workdir, ctx.task.output_names,
                                                       self.dynamic_batch, self.opset)
        meta = {**source.meta, "formats": formats, "precision": "fp32"}
        # formats sharing a file (TensorRT's engine source is the ONNX) list it once
        return StageResult(Artifact(formats[0], ctx.workdir, list(dict.fromkeys(files)), meta=meta))
