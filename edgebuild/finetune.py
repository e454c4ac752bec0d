"""The one training path: a LightningModule around any model of any task, and `fit`.

Training stages (train, QAT, prune-and-retrain, distillation) transform the model *before* calling
`fit`; anything scheduled during training (gradual pruning, freezing) is a Lightning callback.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgebuild.config import bounded

DEFAULT_OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 3e-3, "weight_decay": 1e-4}
DEFAULT_SCHEDULER = {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "_partial_": True}

log = logging.getLogger(__name__)

# named optimizer + schedule pairs: `stages.NAME.optimizer=PRESET` (the preset's schedule replaces `scheduler`).
# A scheduler with "interval": "step" is stepped per batch; OneCycleLR gets total_steps from Lightning.
PRESETS: dict[str, dict[str, Any]] = {
    "adamw_cosine": {"optimizer": dict(DEFAULT_OPTIMIZER), "scheduler": dict(DEFAULT_SCHEDULER)},
    "sgd_onecycle": {  # the hand-written CIFAR script of issue 19: SGD with Nesterov momentum, one cycle to 0.1
        "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1, "momentum": 0.9,
                      "nesterov": True, "weight_decay": 5e-4},
        "scheduler": {"_target_": "torch.optim.lr_scheduler.OneCycleLR", "_partial_": True, "max_lr": 0.1,
                      "interval": "step"},
    },
}
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true", "64")


def resolve_optimizer(fit_cfg: Any, where: str = "optimizer") -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(optimizer, scheduler) configs of a stage: its own, or those of a named preset."""
    from edgebuild.errors import EdgebuildError

    opt = fit_cfg.optimizer
    if isinstance(opt, str):
        if opt not in PRESETS:
            raise EdgebuildError(f"{where}.optimizer={opt!r} is not a known preset",
                                 f"use one of: {', '.join(sorted(PRESETS))}, or a _target_ config "
                                 "({_target_: torch.optim.AdamW, _partial_: true, lr: 0.003})")
        preset = PRESETS[opt]
        return dict(preset["optimizer"]), dict(preset["scheduler"]) if preset["scheduler"] else None
    return dict(opt or {}), (dict(fit_cfg.scheduler) if fit_cfg.scheduler else None)


def _cpu_supports(kind: str) -> bool:
    import torch

    check = {"bf16": "_is_mkldnn_bf16_supported", "16": "_is_mkldnn_fp16_supported"}[kind]
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):
        return False


def _cpu_has_amx_bf16() -> bool:
    """AMX tiles with bf16 (Intel Sapphire Rapids and later), from the kernel's CPU flags."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
        return False


def check_precision(tcfg: Any) -> str:
    """Plan time: the trainer's precision runs on this machine's accelerator; returns it. bf16 on a CPU
    without AVX-512 BF16 / AMX (torch's oneDNN check), or fp16 on a CPU without AVX-512 FP16, is refused.
    `auto` is bf16-mixed on a GPU with bf16 or a CPU with AMX-BF16, else 32-true (the summary says which
    trained): on a Zen 4 with AVX-512 BF16 but no AMX, bf16-mixed trained ×1.5 slower than f32
    (docs/benchmarks.md, issue 19), so bf16 support alone does not make it the faster choice."""
    import torch

    from edgebuild.errors import EdgebuildError

    precision = str(tcfg.precision)
    if precision not in PRECISIONS:
        raise EdgebuildError(f"trainer.precision={precision!r} is not a Lightning precision",
                             f"use one of: {', '.join(PRECISIONS)}")
    accel = str(tcfg.accelerator)
    on_gpu = accel in ("gpu", "cuda") or (accel == "auto" and torch.cuda.is_available())
    if precision == "auto":
        bf16 = ((torch.cuda.is_available() and torch.cuda.is_bf16_supported()) if on_gpu
                else _cpu_supports("bf16") and _cpu_has_amx_bf16())
        return "bf16-mixed" if bf16 else "32-true"
    kind = "bf16" if precision.startswith("bf16") else "16" if precision.startswith("16") else None
    if kind is None:
        return precision
    if on_gpu:
        if not torch.cuda.is_available():
            raise EdgebuildError(f"trainer.accelerator={accel} but no CUDA device is visible",
                                 "use trainer.accelerator=cpu")
        if kind == "bf16" and not torch.cuda.is_bf16_supported():
            raise EdgebuildError(f"trainer.precision={precision}: this GPU has no bf16",
                                 "use trainer.precision=16-mixed or 32-true")
        return precision
    if not _cpu_supports(kind):
        what = "AVX-512 BF16 / AMX-BF16" if kind == "bf16" else "AVX-512 FP16 / AMX-FP16"
        cap = torch.backends.cpu.get_cpu_capability()
        raise EdgebuildError(f"trainer.precision={precision} needs a CPU with {what}; this one ({cap}) has none, "
                             "so training would be emulated (slower than f32) or fail",
                             "use trainer.precision=32-true on this machine"
                             + (" (or bf16-mixed where lscpu lists avx512_bf16 / amx_bf16)" if kind == "16" else ""))
    return precision


@dataclass
class FitConfig:
    """Fields every training stage shares (embedded in their dataclasses)."""

    epochs: int = bounded(5, ge=0)
    # a _target_ config, or a preset name (PRESETS: adamw_cosine, sgd_onecycle) that also sets the schedule
    optimizer: Any = field(default_factory=lambda: dict(DEFAULT_OPTIMIZER))
    scheduler: dict[str, Any] | None = field(default_factory=lambda: dict(DEFAULT_SCHEDULER))
    early_stopping_patience: int | None = bounded(None, ge=1)  # epochs without val improvement; null = off

    def check_optimizer(self, where: str) -> None:
        """Plan time: the optimizer is built on a dummy parameter, so torch's own argument checks (negative
        learning rate or weight decay, betas outside [0, 1), ...) stop the build before any work."""
        import torch

        from edgebuild.config import instantiate
        from edgebuild.errors import EdgebuildError

        optimizer, _ = resolve_optimizer(self, where)
        lr = optimizer.get("lr")
        if isinstance(lr, (int, float)) and not lr > 0:
            raise EdgebuildError(f"{where}.optimizer.lr = {lr} is out of range: it must be > 0",
                                 f"set {where}.optimizer.lr to a positive learning rate (e.g. 1e-3)")
        try:
            instantiate(optimizer)([torch.nn.Parameter(torch.zeros(1))])
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
                      epochs: int, penalty: Callable[[Any], Any] | None = None, channels_last: bool = False) -> Any:
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

        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            x, *rest = batch
            if channels_last and isinstance(x, torch.Tensor) and x.dim() == 4:
                return (x.contiguous(memory_format=torch.channels_last), *rest)
            return batch

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            out = self.model(x)
            loss = task.loss(out, y)
            if self.teacher is not None:
                with torch.no_grad():
                    t_out = self.teacher(x)
                kd = kd_loss(task.logits(out), task.logits(t_out), distill.temperature)
                self.log("train/kd_loss", kd, on_epoch=True, on_step=False, sync_dist=True)
                loss = distill.alpha * kd + (1 - distill.alpha) * loss
            if penalty is not None:  # a stage's regularizer on the model (e.g. L1 on learned gates)
                extra = penalty(self.model)
                self.log("train/penalty", extra, on_epoch=True, on_step=False, sync_dist=True)
                loss = loss + extra
            self.log("train/loss", loss, on_epoch=True, on_step=False, prog_bar=True, sync_dist=True)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.val_metric.update(self.model(x), y)

        def on_validation_epoch_end(self) -> None:
            self.log(task.monitor, self.val_metric.compute(), prog_bar=True, sync_dist=True)
            self.val_metric.reset()

        def train(self, mode: bool = True) -> Any:
            super().train(mode)
            if self.teacher is not None:
                self.teacher.eval()
            return self

        def configure_optimizers(self) -> Any:
            params = [p for p in self.model.parameters() if p.requires_grad]
            opt_cfg, sched_cfg = resolve_optimizer(fit_cfg)
            opt = instantiate(opt_cfg)(params)
            if not sched_cfg:
                return opt
            interval = sched_cfg.pop("interval", "epoch")
            target = sched_cfg.get("_target_", "")
            if target.endswith("CosineAnnealingLR") and "T_max" not in sched_cfg:
                sched_cfg["T_max"] = max(1, epochs)
            if target.endswith("OneCycleLR") and "total_steps" not in sched_cfg:
                sched_cfg["total_steps"] = max(1, int(self.trainer.estimated_stepping_batches))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": instantiate(sched_cfg)(opt), "interval": interval}}

    return TaskModule()


def _batch_len(batch: Any) -> int:
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    return int(x.shape[0]) if hasattr(x, "shape") else len(x)


def _progress_callbacks(name: str, monitor: str, epochs: int, bar: bool, record: Path) -> list[Any]:
    """An epoch clock that logs one line per epoch (loss, val metric, seconds, images/s: what a log file
    shows) and writes the per-epoch series to `record`; in a terminal also a progress bar with images/s
    and ETA. Only rank 0 logs and writes: under DDP the ranks are forked processes, so a file is how the
    series (and the best score, which Lightning does not send back) reach the building process."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import TQDMProgressBar

    class EpochClock(pl.Callback):
        def __init__(self) -> None:
            self.series: dict[str, Any] = {"epoch_s": [], "images_per_s": [], "best": None, "epochs": 0}
            self.images = 0

        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            self.t0 = self.t_train = time.perf_counter()
            self.images = 0

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.images += _batch_len(batch) * trainer.world_size  # every rank trains on as many images
            self.t_train = time.perf_counter()

        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            if not trainer.is_global_zero:
                return
            seconds, train_s = time.perf_counter() - self.t0, max(self.t_train - self.t0, 1e-9)
            ips = self.images / train_s
            m = trainer.callback_metrics
            rec = self.series
            rec["epoch_s"].append(round(seconds, 3))
            rec["images_per_s"].append(round(ips, 1))
            rec["epochs"] = trainer.current_epoch + 1
            if monitor in m and (rec["best"] is None or float(m[monitor]) > rec["best"]):
                rec["best"] = float(m[monitor])
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(rec))
            parts = [f"{name} epoch {trainer.current_epoch + 1}/{epochs}:"]
            if "train/loss" in m:
                parts.append(f"loss {float(m['train/loss']):.4f},")
            if monitor in m:
                parts.append(f"{monitor} {float(m[monitor]):.4f},")
            parts.append(f"{seconds:.1f} s, {ips:.0f} img/s ({self.images} images)")
            log.info(" ".join(parts))

    clock = EpochClock()

    class ThroughputBar(TQDMProgressBar):
        def get_metrics(self, trainer: Any, module: Any) -> dict[str, Any]:
            metrics = dict(super().get_metrics(trainer, module))
            metrics.pop("v_num", None)
            elapsed = time.perf_counter() - getattr(clock, "t0", time.perf_counter())
            if clock.images and elapsed > 0:
                metrics["img/s"] = f"{clock.images / elapsed:.0f}"
            return metrics

    return [clock, ThroughputBar()] if bar else [clock]


def _has_conv2d(model: Any) -> bool:
    import torch

    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def _strategy(tcfg: Any) -> Any:
    """Lightning's `ddp` launcher re-executes the command line for every other rank, which would run the
    whole build (stages, measurement, MLflow runs, summary) once per rank. The fork launcher starts the
    ranks inside `fit` only, and hands the trained weights back to the building process."""
    return "ddp_fork" if str(tcfg.strategy) == "ddp" else tcfg.strategy


def fit(model: Any, ctx: Any, fit_cfg: Any, *, callbacks: list[Any] | None = None,
        distill: Distillation | None = None, name: str = "fit",
        transform_best: Callable[[Any], Any] | None = None,
        penalty: Callable[[Any], Any] | None = None, keep_last: bool = False) -> tuple[Any, dict[str, float]]:
    """Train `model` (in place on a copy) on ctx's data; return the best-epoch model and metrics.
    `penalty(model) -> scalar tensor` is added to every training step's loss (a stage's regularizer).
    `keep_last`: return the last epoch's model instead, for training whose goal is not the val metric
    alone (a sparsity term: the best-val epoch is the least sparse one, usually the first)."""
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
    tcfg = ctx.cfg.trainer
    # NHWC convolutions: x0.78 of NCHW's epoch time on the CPU (benchmarks/training.py --variants)
    channels_last = bool(tcfg.channels_last) and _has_conv2d(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        if distill is not None:
            distill.teacher.to(memory_format=torch.channels_last)
    module = _lightning_module(model, task, dm.num_classes, fit_cfg, distill, epochs, penalty, channels_last)
    ckpt_dir = ctx.workdir / f".{name}-checkpoints"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, monitor=task.monitor, mode="max", save_top_k=1,
                                 save_weights_only=True, filename="best")
    precision = check_precision(tcfg)
    bar = tcfg.enable_progress_bar if tcfg.enable_progress_bar is not None else sys.stderr.isatty()
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # left by an interrupted build: not this fit's record
    record = ckpt_dir / "epochs.json"
    cbs = [checkpoint, *_progress_callbacks(name, task.monitor, epochs, bool(bar), record), *(callbacks or [])]
    if fit_cfg.early_stopping_patience:
        cbs.append(EarlyStopping(monitor=task.monitor, mode="max", patience=fit_cfg.early_stopping_patience))
    kwargs = dict(accelerator=tcfg.accelerator, devices=tcfg.devices, strategy=_strategy(tcfg),
                  precision=precision, deterministic=tcfg.deterministic,
                  enable_progress_bar=bool(bar), enable_model_summary=tcfg.enable_model_summary,
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
    if checkpoint.best_model_path and not keep_last:
        state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    rec = json.loads(record.read_text()) if record.exists() else {"epoch_s": [], "best": None, "epochs": 0}
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    metrics: dict[str, Any] = {f"{name}/epochs": float(rec["epochs"]), f"{name}/seconds": seconds,
                               f"{name}/precision": precision}
    # per-epoch series (a list is recorded as one MLflow metric with a step per epoch)
    prefix = "" if name in ("train", "fit") else f"{name}/"
    if rec["epoch_s"]:
        metrics[f"{prefix}time/epoch_s"] = rec["epoch_s"]
        metrics[f"{prefix}throughput/train_images_per_s"] = rec["images_per_s"]
    if rec["best"] is not None:
        metrics[f"{name}/best_{task.monitor.replace('/', '_')}"] = rec["best"]
    model = module.model.eval()
    if channels_last:  # hand back the standard layout: exporters, NNCF and Torch-Pruning expect it
        model = model.to(memory_format=torch.contiguous_format)
        if distill is not None:
            distill.teacher.to(memory_format=torch.contiguous_format)
    metrics[f"{name}/channels_last"] = float(channels_last)
    return (transform_best(model) if transform_best else model), metrics
