"""The one training path: a LightningModule around any model of any task, and `fit`.

Training stages (train, QAT, prune-and-retrain, distillation) transform the model *before* calling
`fit`; anything scheduled during training (gradual pruning, freezing) is a Lightning callback.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgebuild.config import bounded

DEFAULT_OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 3e-3, "weight_decay": 1e-4}
DEFAULT_SCHEDULER = {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "_partial_": True}


@dataclass
class FitConfig:
    """Fields every training stage shares (embedded in their dataclasses)."""

    epochs: int = bounded(5, ge=0)
    optimizer: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_OPTIMIZER))
    scheduler: dict[str, Any] | None = field(default_factory=lambda: dict(DEFAULT_SCHEDULER))
    early_stopping_patience: int | None = bounded(None, ge=1)  # epochs without val improvement; null = off

    def check_optimizer(self, where: str) -> None:
        """Plan time: the optimizer is built on a dummy parameter, so torch's own argument checks (negative
        learning rate or weight decay, betas outside [0, 1), ...) stop the build before any work."""
        import torch

        from edgebuild.config import instantiate
        from edgebuild.errors import EdgebuildError

        lr = (self.optimizer or {}).get("lr")
        if isinstance(lr, (int, float)) and not lr > 0:
            raise EdgebuildError(f"{where}.optimizer.lr = {lr} is out of range: it must be > 0",
                                 f"set {where}.optimizer.lr to a positive learning rate (e.g. 1e-3)")
        try:
            instantiate(self.optimizer)([torch.nn.Parameter(torch.zeros(1))])
        except (ValueError, TypeError) as e:
            raise EdgebuildError(f"{where}.optimizer is invalid: {e}",
                                 f"fix the value named above under {where}.optimizer") from None


@dataclass
class Distillation:
    teacher: Any  # nn.Module, frozen
    temperature: float = 4.0
    alpha: float = 0.9


def kd_loss(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch-mean (Hinton et al.)."""
    import torch.nn.functional as F

    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


def _lightning_module(model: Any, task: Any, num_classes: int, fit_cfg: Any, distill: Distillation | None,
                      epochs: int) -> Any:
    import pytorch_lightning as pl
    import torch

    from edgebuild.config import instantiate

    class TaskModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.val_metric = task.val_metric(num_classes)
            self.teacher = distill.teacher if distill else None
            if self.teacher is not None:
                self.teacher.eval().requires_grad_(False)

        def forward(self, x: Any) -> Any:
            return self.model(x)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            out = self.model(x)
            loss = task.loss(out, y)
            if self.teacher is not None:
                with torch.no_grad():
                    t_out = self.teacher(x)
                kd = kd_loss(task.logits(out), task.logits(t_out), distill.temperature)
                self.log("train/kd_loss", kd, on_epoch=True, on_step=False)
                loss = distill.alpha * kd + (1 - distill.alpha) * loss
            self.log("train/loss", loss, on_epoch=True, on_step=False, prog_bar=True)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.val_metric.update(self.model(x), y)

        def on_validation_epoch_end(self) -> None:
            self.log(task.monitor, self.val_metric.compute(), prog_bar=True)
            self.val_metric.reset()

        def train(self, mode: bool = True) -> Any:
            super().train(mode)
            if self.teacher is not None:
                self.teacher.eval()
            return self

        def configure_optimizers(self) -> Any:
            params = [p for p in self.model.parameters() if p.requires_grad]
            opt = instantiate(fit_cfg.optimizer)(params)
            if not fit_cfg.scheduler:
                return opt
            sched_cfg = dict(fit_cfg.scheduler)
            if sched_cfg.get("_target_", "").endswith("CosineAnnealingLR") and "T_max" not in sched_cfg:
                sched_cfg["T_max"] = max(1, epochs)
            return {"optimizer": opt, "lr_scheduler": instantiate(sched_cfg)(opt)}

    return TaskModule()


def fit(model: Any, ctx: Any, fit_cfg: Any, *, callbacks: list[Any] | None = None,
        distill: Distillation | None = None, name: str = "fit",
        transform_best: Callable[[Any], Any] | None = None) -> tuple[Any, dict[str, float]]:
    """Train `model` (in place on a copy) on ctx's data; return the best-epoch model and metrics."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

    model = copy.deepcopy(model)
    model.train()
    epochs = int(fit_cfg.epochs)
    dm, task = ctx.data, ctx.task
    if epochs <= 0:
        return model.eval(), {}
    pl.seed_everything(ctx.seed, workers=True, verbose=False)
    module = _lightning_module(model, task, dm.num_classes, fit_cfg, distill, epochs)
    ckpt_dir = ctx.workdir / f".{name}-checkpoints"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, monitor=task.monitor, mode="max", save_top_k=1,
                                 save_weights_only=True, filename="best")
    cbs = [checkpoint, *(callbacks or [])]
    if fit_cfg.early_stopping_patience:
        cbs.append(EarlyStopping(monitor=task.monitor, mode="max", patience=fit_cfg.early_stopping_patience))
    tcfg = ctx.cfg.trainer
    kwargs = dict(accelerator=tcfg.accelerator, devices=tcfg.devices, strategy=tcfg.strategy,
                  precision=tcfg.precision, deterministic=tcfg.deterministic,
                  enable_progress_bar=tcfg.enable_progress_bar, enable_model_summary=tcfg.enable_model_summary,
                  log_every_n_steps=tcfg.log_every_n_steps, max_epochs=epochs, callbacks=cbs,
                  logger=ctx.logger(name) if ctx.logger else False, default_root_dir=str(ctx.workdir),
                  num_sanity_val_steps=0)
    for key in ("limit_train_batches", "limit_val_batches"):
        if getattr(tcfg, key) is not None:
            kwargs[key] = getattr(tcfg, key)
    kwargs.update(dict(tcfg.extra or {}))
    trainer = pl.Trainer(**kwargs)
    t0 = time.perf_counter()
    try:
        trainer.fit(module, train_dataloaders=dm.loader("train", train=True), val_dataloaders=dm.loader("val"))
    except SystemExit as e:  # Lightning turns Ctrl-C into sys.exit(1) after its own teardown
        if trainer.interrupted:
            raise KeyboardInterrupt from e
        raise
    if trainer.interrupted:
        raise KeyboardInterrupt
    seconds = time.perf_counter() - t0
    if checkpoint.best_model_path:
        state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    best = checkpoint.best_model_score
    for f in ckpt_dir.glob("*"):
        f.unlink()
    if ckpt_dir.exists():
        ckpt_dir.rmdir()
    metrics = {f"{name}/epochs": float(trainer.current_epoch), f"{name}/seconds": seconds}
    if best is not None:
        metrics[f"{name}/best_{task.monitor.replace('/', '_')}"] = float(best)
    model = module.model.eval()
    return (transform_best(model) if transform_best else model), metrics
