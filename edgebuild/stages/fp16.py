"""fp16: smaller deployables without calibration data (the runtime's `compress_weights`).
`weights: fp16` stores half-precision weights; `weights: int8` stores INT8 weights with per-channel
scales (data-free), activations stay floating point. Accuracy is measured as for
every stage; on a CPU the gain is size, not speed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from edgebuild.errors import EdgebuildError
from edgebuild.stage import Stage, StageResult
from edgebuild.targets import base, require

WEIGHTS = {"fp16": base.WEIGHTS_FP16, "int8": base.WEIGHTS_INT8}


@dataclass
class FP16(Stage):
    kind: ClassVar[str] = "fp16"
    output_precision: ClassVar[str | None] = "fp16"
    needs_float_input: ClassVar[bool] = True
    version: ClassVar[int] = 2
    uses: ClassVar[tuple[str, ...]] = ("task", "target_format")

    weights: str = "fp16"  # fp16: half-precision weights; int8: INT8 weight-only, per-channel scales

    def check(self, cfg: Any) -> None:
        if self.weights not in WEIGHTS:
            raise EdgebuildError(f"fp16: unknown weights {self.weights!r}", f"use one of: {', '.join(WEIGHTS)}")
        require(cfg.target, self.kind, WEIGHTS[self.weights])

    def run(self, ctx: Any) -> StageResult:
        meta = {**ctx.input.meta, "precision": f"{self.weights} weights", "deploy_weights_precision": self.weights}
        runtime = ctx.target.runtime
        artifact = runtime.compress_weights(ctx.input, self.weights, ctx.workdir, ctx.task.output_names, meta)
        notes = [f"{self.weights} weights on {ctx.target.device}: the gain is file size, not speed (the float "
                 "layers compute as before; runtime/precision records what ran)"] if ctx.target.device == "CPU" else []
        return StageResult(artifact, notes=notes)
