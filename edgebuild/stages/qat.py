"""qat: quantization-aware training, NNCF's order: INT8 PTQ on the torch model (calibration subset
`data.calibration`), then fine-tuning through the shared Lightning path (`finetune.fit`, the task's
loss), then the runtime's INT8 deployable
(`Runtime.qat_prepare` / `qat_export`: NNCF for OpenVINO, with the target device's scheme, recorded as
`quantize/target_device`). Same metrics as `quantize`, so the two compare side by
side. NNCF's torch backend compiles a C++ extension on first use (about 40 s, once per machine)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from edgebuild.artifact import write_json
from edgebuild.config import bounded
from edgebuild.errors import EdgebuildError
from edgebuild.finetune import DEFAULT_OPTIMIZER, FitConfig, fit
from edgebuild.stage import Stage, StageResult
from edgebuild.stages.quantize import PRESETS, verify_int8
from edgebuild.targets import base, require


@dataclass
class QAT(FitConfig, Stage):
    kind: ClassVar[str] = "qat"
    output_precision: ClassVar[str | None] = "int8"
    needs_float_input: ClassVar[bool] = True
    version: ClassVar[int] = 2  # 2: quantizers follow the target device's scheme (nncf.TargetDevice)
    uses: ClassVar[tuple[str, ...]] = ("data", "task", "trainer", "calibration")

    epochs: int = bounded(2, ge=1)
    # fine-tuning a trained model through fake-quantizers: a small lr (OpenVINO's QAT guide: about 1e-4)
    optimizer: dict[str, Any] = field(default_factory=lambda: {**DEFAULT_OPTIMIZER, "lr": 1e-4})
    preset: str = "performance"  # performance = symmetric activations; mixed = asymmetric activations

    def check(self, cfg: Any) -> None:
        if self.preset not in PRESETS:
            raise EdgebuildError(f"qat: unknown preset {self.preset!r}", f"use one of: {', '.join(PRESETS)}")
        require(cfg.target, self.kind, base.QAT)

    def run(self, ctx: Any) -> StageResult:
        runtime = ctx.target.runtime
        source = ctx.input
        calibration = ctx.data.calibration()
        quantized = runtime.qat_prepare(source.load_torch(), calibration, symmetric=self.preset == "performance")
        quantized, metrics = fit(quantized, ctx, self, name="qat")
        meta = {**source.meta, "precision": "int8",
                "deploy_quantization": {"method": "qat", "preset": self.preset, "epochs": self.epochs}}
        artifact = runtime.qat_export(quantized, source.meta["input_shape"], ctx.workdir, meta)
        fp_layers = verify_int8(ctx, artifact, self.kind)
        write_json(ctx.workdir / "fp_layers.json", fp_layers)
        metrics.update({"quantize/fp_layers": len(fp_layers), "quantize/calibration_samples": int(len(calibration)),
                        "quantize/target_device": runtime.quantization_device()})
        return StageResult(artifact, metrics, files={"fp_layers": "fp_layers.json"})
