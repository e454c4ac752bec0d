"""distill: knowledge distillation on the shared Lightning path (finetune.fit with a Distillation).

loss = alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * task loss, matched on
`task.logits(outputs)` so the stage stays task-agnostic. The teacher is an earlier stage (`teacher:`,
validated at plan time, its digest in the cache key), or a model config (`teacher_model:`, e.g. a
torchvision name) with a checkpoint (`teacher_weights:`, loaded with weights_only=True); frozen, in eval
mode. The student is the input artifact, or a fresh model from `student_model:` (another family).
With `compare_baseline: true` the same student is also trained without a teacher for the same epochs
and both are measured the way the pipeline measures (deployed on the target, held-out split).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from edgebuild.artifact import Artifact, file_digest
from edgebuild.config import bounded
from edgebuild.errors import EdgebuildError
from edgebuild.finetune import Distillation, FitConfig, fit
from edgebuild.stage import Stage, StageResult


@dataclass
class Distill(FitConfig, Stage):
    kind: ClassVar[str] = "distill"
    version: ClassVar[int] = 1
    uses: ClassVar[tuple[str, ...]] = ("data", "task", "trainer", "target")  # target: the measured comparison

    teacher: str | None = None  # an earlier stage's name
    teacher_model: dict[str, Any] = field(default_factory=dict)  # or a model config (`model:` fields); {} = none
    teacher_weights: str | None = None  # checkpoint for teacher_model (default architecture: the recipe's model)
    student_model: dict[str, Any] = field(default_factory=dict)  # a fresh student from a model config; {} = the input
    temperature: float = bounded(4.0, gt=0)
    # weight of the distillation term; 1 - alpha goes to the task loss on labels
    alpha: float = bounded(0.9, ge=0, le=1)
    compare_baseline: bool = False  # also train the student without a teacher, same epochs; report both

    def references(self) -> list[str]:
        return [self.teacher] if self.teacher else []

    def check(self, cfg: Any) -> None:
        given = [k for k in ("teacher", "teacher_model", "teacher_weights") if getattr(self, k)]
        if not given or (self.teacher and len(given) > 1):
            raise EdgebuildError("distill needs exactly one teacher: an earlier stage (teacher: NAME), or a model "
                                 f"config and/or a checkpoint (teacher_model / teacher_weights); got {given or 'none'}",
                                 "set stages.<distill>.teacher to an earlier stage's name, e.g. teacher: train")
        if not 0.0 <= self.alpha <= 1.0 or self.temperature <= 0:
            raise EdgebuildError(f"distill alpha={self.alpha}, temperature={self.temperature} out of range",
                                 "use 0 <= alpha <= 1 and temperature > 0")
        if self.teacher_weights and not Path(self.teacher_weights).expanduser().is_file():
            raise EdgebuildError(f"teacher_weights file {self.teacher_weights} does not exist",
                                 "point teacher_weights to a state_dict saved with torch.save(model.state_dict())")
        teacher_cfg = model_conf(self.teacher_model or cfg.model)
        student_cfg = model_conf(self.student_model or cfg.model)
        if self.teacher_model or self.student_model:
            t, s = teacher_cfg.num_classes, student_cfg.num_classes
            if t and s and t != s:
                raise EdgebuildError(f"distill: the teacher predicts {t} classes, the student {s}",
                                     "teacher and student must share the data's classes")

    def params(self) -> dict[str, Any]:
        p = super().params()
        if self.teacher_weights:  # the file's content, not only its name, decides the output
            p["teacher_weights_sha256"] = file_digest(Path(self.teacher_weights).expanduser())
        return p

    def run(self, ctx: Any) -> StageResult:
        import torch

        student = self._student(ctx)
        teacher, teacher_shape = self._teacher(ctx)
        x = torch.zeros(ctx.data.input_shape)
        with torch.no_grad():
            s_out, t_out = ctx.task.logits(student.eval()(x)), ctx.task.logits(teacher(resize_to(x, teacher_shape)))
        if s_out.shape[1:] != t_out.shape[1:]:
            raise EdgebuildError(f"distill: the teacher outputs {list(t_out.shape)}, the student {list(s_out.shape)} "
                                 "(different class counts)", "teacher and student must share the data's classes")
        kd = Distillation(with_input_size(teacher, teacher_shape, ctx.data.input_shape), self.temperature, self.alpha)
        model, metrics = fit(student, ctx, self, distill=kd, name="distill")
        meta = {**ctx.input.meta, "input_shape": list(ctx.data.input_shape), "distilled_from": self.teacher or "config"}
        if self.student_model:
            meta["model"] = model_conf(self.student_model).name
        artifact = Artifact.save_torch(model, ctx.workdir, meta)
        notes = []
        if self.compare_baseline:
            baseline, _ = fit(student, ctx, self, name="baseline")
            metrics["distill/teacher_acc"] = measure_quality(teacher, teacher_shape, ctx, "teacher")
            metrics["distill/baseline_acc"] = measure_quality(baseline, ctx.data.input_shape, ctx, "baseline")
            metrics["distill/student_acc"] = measure_quality(model, ctx.data.input_shape, ctx, "student")
            gain = (metrics["distill/student_acc"] - metrics["distill/baseline_acc"]) * 100
            metrics["distill/gain_pp"] = gain
            notes.append(f"the distilled student is {gain:+.2f} pp vs the same student trained without a teacher "
                         f"for {self.epochs} epochs (teacher {metrics['distill/teacher_acc']:.4f})")
        return StageResult(artifact, metrics, notes=notes)

    def _student(self, ctx: Any) -> Any:
        import torch

        if not self.student_model:
            return ctx.input.load_torch()
        from edgebuild.models import build_model

        torch.manual_seed(ctx.seed)
        model = build_model(model_conf(self.student_model), ctx.data)
        return ctx.task.prepare_model(model, ctx.data)

    def _teacher(self, ctx: Any) -> tuple[Any, list[int]]:
        """(frozen teacher in eval mode, the input shape it takes)."""
        if self.teacher:
            art = ctx.artifacts[self.teacher]
            return art.load_torch().eval().requires_grad_(False), art.meta["input_shape"]
        from edgebuild.models import build_model, load_weights

        cfg = model_conf(self.teacher_model or ctx.cfg.model)
        cfg.weights = None  # teacher_weights is the checkpoint
        model = build_model(cfg, ctx.data)
        if self.teacher_weights:
            load_weights(model, Path(self.teacher_weights).expanduser(), strict=cfg.strict_weights)
        model = ctx.task.prepare_model(model, ctx.data)
        return model.eval().requires_grad_(False), list(ctx.data.input_shape)


def model_conf(node: Any) -> Any:
    """A `model:` config (typed by ModelConf) from a dict or the recipe's own model node."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from edgebuild.config import ModelConf

    try:
        return OmegaConf.merge(OmegaConf.structured(ModelConf), node)
    except OmegaConfBaseException as e:
        raise EdgebuildError(f"distill: bad model config {node}: {e}",
                             "use the fields of `model:` (name, _target_, kwargs, small_input, num_classes, ...)",
                             ) from None


def resize_to(x: Any, shape: list[int]) -> Any:
    import torch.nn.functional as F

    return x if list(x.shape[2:]) == list(shape[2:]) else F.interpolate(x, size=list(shape[2:]), mode="bilinear",
                                                                         antialias=True, align_corners=False)


def with_input_size(teacher: Any, teacher_shape: list[int], data_shape: list[int]) -> Any:
    """A teacher trained at another resolution sees the student's batches resized to its own size."""
    from torch import nn

    if list(teacher_shape[2:]) == list(data_shape[2:]):
        return teacher

    class Resized(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = teacher

        def forward(self, x: Any) -> Any:
            return self.model(resize_to(x, teacher_shape))

    return Resized().eval()


def measure_quality(model: Any, input_shape: list[int], ctx: Any, name: str) -> float:
    """The task's primary metric of `model`, measured as the pipeline does: deployed on the target,
    compiled, on the held-out split (the files are scratch and removed)."""
    from edgebuild.evaluate import deploy, score

    scratch = ctx.workdir / f".measure-{name}"
    try:
        art = Artifact.save_torch(model, scratch / "torch", {**ctx.input.meta, "input_shape": list(input_shape)})
        metrics, _ = score(deploy(art, scratch / "deploy", ctx), ctx)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return float(metrics[ctx.task.primary_metric])
