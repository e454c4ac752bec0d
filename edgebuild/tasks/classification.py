"""Image classification: logits out, cross-entropy in training, top-1 and per-class precision/recall."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgebuild.errors import EdgebuildError


class Classification:
    name = "classification"
    primary_metric = "acc/top1"  # fraction 0..1; drops are reported in percentage points
    drop_metric = "acc/drop"
    monitor = "val/acc"  # what training checkpoints on (higher is better)
    output_names = ["logits"]
    data_sources = ("digits", "synthetic", "imagefolder", "cifar10")

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def datamodule(self, data_cfg: Any, cache_dir: Path) -> Any:
        from edgebuild.data import DataModule

        if data_cfg.name not in self.data_sources:
            raise EdgebuildError(f"data={data_cfg.name} is not classification data",
                                 f"use one of {', '.join(self.data_sources)} or pick the task that fits the data")
        return DataModule(data_cfg, cache_dir)

    def prepare_model(self, model: Any, dm: Any) -> Any:
        """The model as the pipeline uses it, after checking its outputs fit the data."""
        import torch

        model.eval()
        with torch.no_grad():
            out = model(torch.zeros(dm.input_shape))
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            raise EdgebuildError("a classification model must return logits [N, classes]; "
                                 f"this one returns {_describe(out)}",
                                 "pick a classifier, or task=detection for a detector")
        if out.shape[1] != dm.num_classes:
            raise EdgebuildError(f"model outputs {out.shape[1]} classes, the data has {dm.num_classes}",
                                 "set model.num_classes to the data's class count (or leave it unset)")
        return model

    def output_layers(self, model: Any) -> list[Any]:
        """The modules producing the outputs (the final classifier: the last Linear, else the last
        conv of a fully convolutional classifier). Compression stages leave them alone by default:
        pruning them would remove classes."""
        from torch import nn

        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
        return (linears or convs)[-1:]

    # ------------------------------------------------------------------------------ training
    def loss(self, outputs: Any, targets: Any) -> Any:
        import torch.nn.functional as F

        return F.cross_entropy(outputs, targets)

    def logits(self, outputs: Any) -> Any:
        """The part of the outputs that distillation matches."""
        return outputs

    def val_metric(self, num_classes: int) -> Any:
        from torchmetrics.classification import MulticlassAccuracy

        return MulticlassAccuracy(num_classes=num_classes, average="micro")

    # ---------------------------------------------------------------------------- evaluation
    def evaluator(self, class_names: list[str]) -> ClassificationEval:
        return ClassificationEval(class_names)

    def deploy_meta(self) -> dict[str, Any]:
        return {"task": self.name, "outputs": {"logits": "[N, classes]"},
                "postprocess": "softmax over classes; top-1 = argmax(logits)"}


class ClassificationEval:
    """Accumulates raw logits from any runtime and computes the task's metrics."""

    def __init__(self, class_names: list[str]):
        self.class_names = class_names
        self.preds: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []

    def update(self, outputs: list[np.ndarray], targets: Any) -> None:
        self.preds.append(np.asarray(outputs[0]).argmax(axis=1))
        self.targets.append(np.asarray(targets))

    def compute(self) -> tuple[dict[str, float], dict[str, Any]]:
        import torch
        from torchmetrics.functional.classification import multiclass_accuracy, multiclass_precision, multiclass_recall

        p = torch.from_numpy(np.concatenate(self.preds)).long()
        t = torch.from_numpy(np.concatenate(self.targets)).long()
        k = len(self.class_names)
        prec = multiclass_precision(p, t, num_classes=k, average=None, zero_division=0)
        rec = multiclass_recall(p, t, num_classes=k, average=None, zero_division=0)
        metrics = {
            "acc/top1": float(multiclass_accuracy(p, t, num_classes=k, average="micro")),
            "acc/precision_macro": float(prec.mean()),
            "acc/recall_macro": float(rec.mean()),
            "eval/samples": int(len(t)),
        }
        per_class = {c: {"precision": float(prec[i]), "recall": float(rec[i]), "support": int((t == i).sum())}
                     for i, c in enumerate(self.class_names)}
        return metrics, {"per_class": per_class}


def _describe(out: Any) -> str:
    shape = getattr(out, "shape", None)
    return f"a tensor of shape {list(shape)}" if shape is not None else type(out).__name__
