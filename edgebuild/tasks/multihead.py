"""Several classification tasks on one backbone: `task=multihead`.

The data's labels are the first task's; every other head's labels are a mapping of them declared in
the recipe (`task.heads: [{name: parity, classes: [even, odd], map: [0, 1, 0, 1, ...]}]`: class i of
the data is class map[i] of that head). The model (`model=multihead_cnn`) runs its backbone once and
returns one logits tensor per head; training sums each head's cross-entropy times its
`task.loss_weights` entry; the deployable returns every head's logits, and each head's top-1 is
measured on it (`acc/top1` is the first head's, `acc/<head>/top1` each head's).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgebuild.errors import EdgebuildError
from edgebuild.tasks.classification import Classification


class MultiHead(Classification):
    name = "multihead"

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        heads = list(cfg.get("heads") or []) if cfg is not None else []
        if not heads:
            raise EdgebuildError("task=multihead needs at least one extra head under task.heads",
                                 "add task.heads: [{name: parity, classes: [even, odd], map: [0, 1, 0, 1, ...]}]")
        self.first = str(cfg.get("first_name") or "label")
        self.heads = [{"name": str(h["name"]), "classes": [str(c) for c in h["classes"]],
                       "map": [int(v) for v in h["map"]]} for h in heads]
        weights = list(cfg.get("loss_weights") or [])
        self.loss_weights = [float(w) for w in weights] or [1.0] * (1 + len(self.heads))
        if len(self.loss_weights) != 1 + len(self.heads):
            raise EdgebuildError(f"task.loss_weights has {len(self.loss_weights)} entries for {1 + len(self.heads)} "
                                 "heads", "give one weight per head, the data's own labels first")
        self.output_names = ["logits", *[h["name"] for h in self.heads]]

    def datamodule(self, data_cfg: Any, cache_dir: Any) -> Any:
        dm = super().datamodule(data_cfg, cache_dir)
        for h in self.heads:  # every head's labels must exist for every data class
            if len(h["map"]) != dm.num_classes or not all(0 <= v < len(h["classes"]) for v in h["map"]):
                raise EdgebuildError(f"task head {h['name']!r} has no label for some of the data's {dm.num_classes} "
                                     f"classes (its map has {len(h['map'])} entries into {len(h['classes'])} classes)",
                                     f"give task.heads.{h['name']}.map one entry per data class "
                                     f"({', '.join(dm.class_names[:5])}, ...), each an index into its classes")
        return dm

    def _targets(self, targets: Any) -> list[Any]:
        import torch

        out = [targets]
        for h in self.heads:
            table = torch.tensor(h["map"], device=targets.device)
            out.append(table[targets])
        return out

    def prepare_model(self, model: Any, dm: Any) -> Any:
        import torch

        model.eval()
        with torch.no_grad():
            out = model(torch.zeros(dm.input_shape))
        sizes = [dm.num_classes, *[len(h["classes"]) for h in self.heads]]
        got = [list(o.shape) for o in out] if isinstance(out, (tuple, list)) else None
        if got is None or [g[1] for g in got] != sizes:
            raise EdgebuildError(f"task=multihead needs a model returning logits of {sizes} classes per head; this one "
                                 f"returns {got or list(getattr(out, 'shape', []))}",
                                 "use model=multihead_cnn with model.kwargs.heads set to the extra heads' class counts")
        return model

    def output_layers(self, model: Any) -> list[Any]:
        heads = getattr(model, "heads", None)
        if heads is not None:
            return list(heads)
        return super().output_layers(model)

    def loss(self, outputs: Any, targets: Any) -> Any:
        import torch.nn.functional as F

        return sum(w * F.cross_entropy(o, t) for w, o, t in zip(self.loss_weights, outputs, self._targets(targets), strict=False))

    def logits(self, outputs: Any) -> Any:
        return outputs[0]

    def val_metric(self, num_classes: int) -> Any:
        from torchmetrics.classification import MulticlassAccuracy

        class FirstHead(MulticlassAccuracy):  # checkpoints on the first head's accuracy
            def update(self, preds: Any, target: Any) -> None:
                super().update(preds[0], target)

        return FirstHead(num_classes=num_classes, average="micro")

    def evaluator(self, class_names: list[str]) -> Any:
        return MultiHeadEval(self, class_names)

    def deploy_meta(self) -> dict[str, Any]:
        outputs = {"logits": "[N, classes] (the data's labels)"}
        outputs.update({h["name"]: f"[N, {len(h['classes'])}]: classes {h['classes']}" for h in self.heads})
        return {"task": self.name, "outputs": outputs, "heads": self.heads,
                "postprocess": "per output: softmax over its classes; top-1 = argmax"}


class MultiHeadEval:
    def __init__(self, task: MultiHead, class_names: list[str]):
        from edgebuild.tasks.classification import ClassificationEval

        self.task = task
        self.evals = [ClassificationEval(class_names), *[ClassificationEval(h["classes"]) for h in task.heads]]

    def update(self, outputs: list[np.ndarray], targets: Any) -> None:
        t = np.asarray(targets)
        labels = [t, *[np.asarray(h["map"])[t] for h in self.task.heads]]
        for ev, out, lab in zip(self.evals, outputs, labels, strict=False):
            ev.update([out], lab)

    def compute(self) -> tuple[dict[str, float], dict[str, Any]]:
        metrics, tables = self.evals[0].compute()
        metrics[f"acc/{self.task.first}/top1"] = metrics["acc/top1"]
        for h, ev in zip(self.task.heads, self.evals[1:], strict=False):
            m, t = ev.compute()
            metrics[f"acc/{h['name']}/top1"] = m["acc/top1"]
            tables[f"per_class_{h['name']}"] = t["per_class"]
        return metrics, tables


def build_model(cfg: Any, dm: Any, num_classes: int, in_channels: int, heads: Any = (2,), width: int = 16) -> Any:
    """The built-in CNN's backbone, run once, with one Linear head per task."""
    from edgebuild.models import small_cnn

    return _shared_class()(small_cnn(num_classes=num_classes, in_channels=in_channels, width=width),
                           [int(h) for h in heads])


def _shared_class() -> type:
    global SharedBackbone  # noqa: PLW0603 - module-level, so pickled models find the class
    if "SharedBackbone" in globals():
        return globals()["SharedBackbone"]
    from torch import nn

    class _SharedBackbone(nn.Module):
        def __init__(self, cnn: Any, extra: list[int]):
            super().__init__()
            layers = list(cnn.children())
            first = layers[-1]
            self.backbone = nn.Sequential(*layers[:-1])
            self.heads = nn.ModuleList([first, *[nn.Linear(first.in_features, k) for k in extra]])

        def forward(self, x: Any) -> Any:
            f = self.backbone(x)  # once per input, for every head
            return tuple(h(f) for h in self.heads)

    _SharedBackbone.__name__ = _SharedBackbone.__qualname__ = "SharedBackbone"
    _SharedBackbone.__module__ = __name__
    SharedBackbone = _SharedBackbone  # type: ignore[misc]
    return _SharedBackbone


def __getattr__(name: str) -> Any:
    if name == "SharedBackbone":
        return _shared_class()
    raise AttributeError(name)
