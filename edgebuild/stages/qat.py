"""qat: quantization-aware training, NNCF's order: INT8 PTQ on the torch model (calibration subset
`data.calibration`), then fine-tuning through the shared Lightning path (`finetune.fit`, the task's
loss), then conversion to an INT8 OpenVINO IR. Same metrics as `quantize`, so the two compare side by
side. NNCF's torch backend compiles a C++ extension on first use (about 40 s, once per machine)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from edgebuild.artifact import IR_FILE, Artifact, write_json
from edgebuild.config import bounded
from edgebuild.errors import EdgebuildError
from edgebuild.finetune import DEFAULT_OPTIMIZER, FitConfig, fit
from edgebuild.stage import Stage, StageResult
from edgebuild.stages.quantize import PRESETS, verify_int8


@dataclass
class QAT(FitConfig, Stage):
    kind: ClassVar[str] = "qat"
    output_precision: ClassVar[str | None] = "int8"
    needs_float_input: ClassVar[bool] = True
    version: ClassVar[int] = 1
    uses: ClassVar[tuple[str, ...]] = ("data", "task", "trainer", "calibration")

    epochs: int = bounded(2, ge=1)
    # fine-tuning a trained model through fake-quantizers: a small lr (OpenVINO's QAT guide: about 1e-4)
    optimizer: dict[str, Any] = field(default_factory=lambda: {**DEFAULT_OPTIMIZER, "lr": 1e-4})
    preset: str = "performance"  # performance = symmetric activations; mixed = asymmetric activations

    def check(self, cfg: Any) -> None:
        if self.preset not in PRESETS:
            raise EdgebuildError(f"qat: unknown preset {self.preset!r}", f"use one of: {', '.join(PRESETS)}")
        if cfg.target.runtime != "openvino":
            raise EdgebuildError(f"qat exports an INT8 OpenVINO IR; target {cfg.target.name!r} runs "
                                 f"{cfg.target.runtime}",
                                 "use an OpenVINO target, or the quantize stage for ONNX Runtime (QDQ ONNX)")

    def run(self, ctx: Any) -> StageResult:
        import nncf
        import openvino as ov
        import torch

        from edgebuild.convert import save_ir

        # the first use compiles NNCF's C++ extension: minutes on a busy 2-core machine, beyond NNCF's
        # 60 s default; wait for it rather than fail (a user's own setting wins)
        os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")
        source = ctx.input
        model = source.load_torch()  # a clear error when the input is not a torch model
        if isinstance(model, torch.nn.Sequential):  # NNCF adds a hook submodule a Sequential would call
            model = _Root(model)
        calibration = ctx.data.calibration()
        dataset = nncf.Dataset([torch.from_numpy(x[None]) for x in calibration])
        quantized = nncf.quantize(model, dataset, preset=nncf.QuantizationPreset(self.preset),
                                  subset_size=len(calibration))
        quantized, metrics = fit(quantized, ctx, self, name="qat")
        example = torch.zeros([1, *list(source.meta["input_shape"])[1:]])
        ir = ov.convert_model(quantized.eval(), example_input=example)
        save_ir(ir, ctx.workdir / IR_FILE)
        meta = {**source.meta, "formats": ["openvino"], "precision": "int8",
                "deploy_quantization": {"method": "qat", "preset": self.preset, "epochs": self.epochs}}
        artifact = Artifact("openvino", ctx.workdir, [IR_FILE, "model.bin"], meta)
        fp_layers = verify_int8(ctx, artifact, self.kind)
        write_json(ctx.workdir / "fp_layers.json", fp_layers)
        metrics.update({"quantize/fp_layers": len(fp_layers), "quantize/calibration_samples": int(len(calibration))})
        return StageResult(artifact, metrics, files={"fp_layers": "fp_layers.json"})


def _Root(model: Any) -> Any:
    """`model` under a plain root module (NNCF's torch backend cannot hook a top-level Sequential)."""
    import torch

    class Root(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: Any) -> Any:
            return self.model(x)

    return Root()
