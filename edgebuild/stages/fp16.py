"""fp16: smaller OpenVINO IRs without calibration data. `weights: fp16` stores half-precision weights
(OpenVINO's compress_to_fp16); `weights: int8` stores INT8 weights with per-channel scales
(`nncf.compress_weights`, data-free), activations stay floating point. Accuracy is measured as for
every stage; on a CPU the gain is size, not speed."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any, ClassVar

from edgebuild.artifact import IR_FILE, Artifact
from edgebuild.errors import EdgebuildError
from edgebuild.stage import Stage, StageResult

WEIGHTS = ("fp16", "int8")


@dataclass
class FP16(Stage):
    kind: ClassVar[str] = "fp16"
    output_precision: ClassVar[str | None] = "fp16"
    needs_float_input: ClassVar[bool] = True
    version: ClassVar[int] = 2
    uses: ClassVar[tuple[str, ...]] = ("task", "target_format")

    weights: str = "fp16"  # fp16: half-precision weights; int8: INT8 weight-only (nncf.compress_weights)

    def check(self, cfg: Any) -> None:
        if self.weights not in WEIGHTS:
            raise EdgebuildError(f"fp16: unknown weights {self.weights!r}", f"use one of: {', '.join(WEIGHTS)}")
        if cfg.target.runtime != "openvino":
            raise EdgebuildError(f"fp16 writes OpenVINO IRs; target {cfg.target.name!r} runs {cfg.target.runtime}",
                                 "use an OpenVINO target (target=cpu, gpu, vpu) or remove the fp16 stage")

    def run(self, ctx: Any) -> StageResult:
        from edgebuild.convert import save_ir
        from edgebuild.stages.quantize import _already_int8, is_quantized_openvino, openvino_model

        scratch = ctx.workdir / ".source"
        scratch.mkdir()
        model = openvino_model(ctx, scratch)
        shutil.rmtree(scratch)
        if is_quantized_openvino(model):
            raise _already_int8(ctx.input)
        if self.weights == "int8":
            import nncf

            model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        save_ir(model, ctx.workdir / IR_FILE, compress_to_fp16=self.weights == "fp16")
        meta = {**ctx.input.meta, "formats": ["openvino"], "precision": f"{self.weights} weights",
                "deploy_weights_precision": self.weights}
        notes = [f"{self.weights} weights on {ctx.target.device}: the gain is file size, not speed (the float "
                 "layers compute as before; runtime/precision records what ran)"] if ctx.target.device == "CPU" else []
        return StageResult(Artifact("openvino", ctx.workdir, [IR_FILE, "model.bin"], meta), notes=notes)
