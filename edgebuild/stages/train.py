"""train: fit the input model on the build's data with the shared Lightning path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from edgebuild.artifact import Artifact
from edgebuild.config import bounded
from edgebuild.finetune import FitConfig, fit
from edgebuild.stage import Stage, StageResult


@dataclass
class Train(FitConfig, Stage):
    kind: ClassVar[str] = "train"
    version: ClassVar[int] = 1
    uses: ClassVar[tuple[str, ...]] = ("data", "task", "trainer")

    epochs: int = bounded(5, ge=1)  # a train stage that trains nothing is a mistake, not a no-op

    def run(self, ctx: Any) -> StageResult:
        model = ctx.input.load_torch()
        model, metrics = fit(model, ctx, self, name="train")
        return StageResult(Artifact.save_torch(model, ctx.workdir, ctx.input.meta), metrics)
