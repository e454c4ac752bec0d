"""gate: Parsimonious Inference's learned kernel-activation gates (LKAM), static or per input.

A gate module is placed on each selected convolution (on its BatchNorm's output when one follows,
so normalization cannot undo it): `y = BN(conv(x)) * g`, one coefficient per kernel (output channel).
The network is retrained on the shared Lightning path with a sparsity term on the gates, so the gates
learn which kernels are redundant, and the last epoch is kept (the best-val epoch is the least sparse,
usually the first). The term is Hoyer's (sum g)^2 / (C sum g^2) per layer (`penalty`): an L1 term on
the gate values, as first shipped, is met by shrinking a layer's gates alike (the next BatchNorm undoes
the scale), so on the digits CNN it either left all 168 kernels above 5 % (weight 0.2) or put every gate
near 0.05 with the information still in them (weight 2: removal left chance accuracy). Per-kernel
utilization (the mean gate value over the validation split) is returned as a table (utilization.csv)
and a histogram (utilization.png).

- `mode: static`: the gate is a learned constant per kernel (sigmoid of a logit). Kernels whose
  utilization is under `threshold` are removed with Torch-Pruning; the others are multiplied by their
  coefficients (folded into the BN's weight and bias, or the conv's), the gate modules are removed,
  the model is fine-tuned. The exported network is smaller: prune's gain check applies.
- `mode: dynamic`: the gate is computed per input from the conv's input (global average pool -> one
  linear layer -> sigmoid), and a kernel whose gate is under `threshold` is switched off (multiplied by
  0) for that input. The gates stay in the exported network. `macs/effective_mean` / `_p90` are the
  MACs left over the held-out split when switched-off kernels are skipped (only the gated convolutions'
  own output channels are counted as skipped: a conservative figure). Dense runtimes compute every
  kernel anyway, so latency does not improve; an accelerator with conditional execution would gain
  the difference between `macs` and `macs/effective_mean`.

The task's output layers (the classifier, detection heads' output convs) are never gated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, ClassVar

from edgebuild.artifact import Artifact
from edgebuild.config import bounded
from edgebuild.errors import EdgebuildError
from edgebuild.finetune import FitConfig, fit
from edgebuild.stage import Stage, StageResult, check_patterns
from edgebuild.stages import weights

MODES = ("static", "dynamic")
# gates are sigmoid(GAIN * p): Adam moves p by ~lr per step, so the logit moves GAIN x lr (a gate lr multiplier)
GAIN = 20.0
DENSE_NOTE = ("dynamic gates switch kernels off per input, but dense CPU runtimes (OpenVINO, ONNX Runtime) still "
              "compute every kernel and multiply it by 0: latency does not improve (the gate heads even add a "
              "little); an accelerator with conditional execution could skip the switched-off kernels and run "
              "macs/effective_mean instead of macs")

def _modules() -> tuple[type, type]:
    """(KernelGate, Gated), defined once at first use: stage modules are imported at plan time, and torch
    is imported only when a stage runs (or a pickled gated model is loaded: see __getattr__)."""
    global KernelGate, Gated  # noqa: PLW0603 - module-level names, so pickled models find the classes
    if "KernelGate" in globals():
        return globals()["KernelGate"], globals()["Gated"]
    import torch
    from torch import nn

    class _KernelGate(nn.Module):
        """One coefficient per kernel: static sigmoid(GAIN * logit), or dynamic sigmoid(GAIN * (W mean(x) + b))."""

        def __init__(self, in_channels: int, out_channels: int, dynamic: bool, threshold: float, init: float):
            super().__init__()
            self.dynamic, self.threshold = dynamic, float(threshold)
            if dynamic:
                self.head = nn.Linear(in_channels, out_channels)
                nn.init.normal_(self.head.weight, std=0.01)
                nn.init.constant_(self.head.bias, init / GAIN)
            else:
                self.logit = nn.Parameter(torch.full((out_channels,), float(init) / GAIN))
            self._last: Any = None  # the training step's gate values, read (and cleared) by the penalty

        def forward(self, x: Any) -> Any:  # -> [N, C_out] (dynamic) or [1, C_out] (static)
            if self.dynamic:
                g = torch.sigmoid(GAIN * self.head(x.mean(dim=(2, 3))))
                if not self.training:  # a kernel under the threshold is off for this input
                    g = g * (g >= self.threshold).to(g.dtype)
            else:
                g = torch.sigmoid(GAIN * self.logit).unsqueeze(0)
            if self.training:
                self._last = g
            return g

    class _Gated(nn.Module):
        """conv (+ the BatchNorm that follows it) with its output multiplied by the kernel gate."""

        def __init__(self, conv: Any, bn: Any, gate: Any):
            super().__init__()
            self.conv, self.bn, self.gate = conv, bn, gate

        def forward(self, x: Any) -> Any:
            y = self.conv(x)
            if self.bn is not None:
                y = self.bn(y)
            return y * self.gate(x)[:, :, None, None]

    _KernelGate.__name__ = _KernelGate.__qualname__ = "KernelGate"
    _Gated.__name__ = _Gated.__qualname__ = "Gated"
    _KernelGate.__module__ = _Gated.__module__ = __name__
    KernelGate, Gated = _KernelGate, _Gated  # type: ignore[misc]
    return _KernelGate, _Gated


def __getattr__(name: str) -> Any:  # unpickling a dynamic-gated model asks for the classes by name
    if name in ("KernelGate", "Gated"):
        return dict(zip(("KernelGate", "Gated"), _modules(), strict=False))[name]
    raise AttributeError(name)


@dataclass
class Gate(FitConfig, Stage):
    kind: ClassVar[str] = "gate"
    needs_float_input: ClassVar[bool] = True
    version: ClassVar[int] = 3  # 2: kernels matched to their utilization by name; 3: Hoyer term, last epoch kept
    uses: ClassVar[tuple[str, ...]] = ("data", "task", "trainer")

    mode: str = "static"  # static: remove kernels under the threshold | dynamic: gates stay, per input
    threshold: float = 0.05  # utilization (static) / gate value per input (dynamic) under which a kernel is off
    sparsity: float = bounded(5.0, ge=0)  # weight of the Hoyer term (penalty), added to the loss
    init: float = 2.0  # initial gate logit: gate = sigmoid(init) (0.88 at 2)
    layers: list[str] = field(default_factory=list)  # regexes of conv names to gate; empty = every conv
    ignore: list[str] = field(default_factory=list)  # regexes never gated (the task's output layers never are)
    epochs: int = bounded(10, ge=1)  # retraining with the gates and the sparsity term
    finetune_epochs: int = bounded(5, ge=0)  # static: fine-tuning after the kernels are removed
    optimizer: dict[str, Any] = field(default_factory=lambda: {"_target_": "torch.optim.AdamW", "_partial_": True,
                                                               "lr": 3e-3, "weight_decay": 1e-4})

    def check(self, cfg: Any) -> None:
        if self.mode not in MODES:
            raise EdgebuildError(f"gate: unknown mode {self.mode!r}", f"use one of {list(MODES)}")
        if not 0 < self.threshold < 1:
            raise EdgebuildError(f"gate: threshold {self.threshold} is outside (0, 1)",
                                 "give the utilization under which a kernel is off, e.g. threshold: 0.05")
        check_patterns(self, layers=self.layers, ignore=self.ignore)

    # ---------------------------------------------------------------------------------- run
    def run(self, ctx: Any) -> StageResult:
        import numpy as np

        model = weights.load_float_model(ctx, "gate")
        shape = list(ctx.input.meta["input_shape"])
        gated = self.insert(model, ctx)
        trained, metrics = fit(gated, ctx, self, name="gate", penalty=self.penalty, keep_last=True)
        util = utilization(trained, ctx)
        files = write_report(util, self.threshold, ctx.workdir)
        values = np.concatenate([u for u in util.values()]) if util else np.zeros(0)
        metrics.update({"gate/kernels": int(values.size), "gate/utilization_mean": float(values.mean()),
                        "gate/under_threshold": int((values < self.threshold).sum()),
                        "gate/layers": len(util)})
        notes: list[str] = []
        if self.mode == "static":
            out = self._static(trained, util, ctx, shape, metrics, notes)
        else:
            out = self._dynamic(trained, ctx, shape, metrics, notes)
        meta = {**ctx.input.meta, "gated": {"mode": self.mode, "threshold": self.threshold}}
        return StageResult(Artifact.save_torch(out, ctx.workdir, meta), metrics, files=files, notes=notes)

    def insert(self, model: Any, ctx: Any) -> Any:
        """A copy of `model` with a gate on every selected conv (conv + the BatchNorm right after it)."""
        import copy

        from torch import nn

        _, Gated = _modules()
        model = copy.deepcopy(model)
        chosen = weights.select_layers(model, ctx, ["Conv2d"], self.layers, self.ignore)
        count = 0
        for parent in list(model.modules()):
            children = list(parent.named_children())
            for i, (name, child) in enumerate(children):
                if not any(child is m for m in chosen.values()):
                    continue
                nxt = children[i + 1] if i + 1 < len(children) else None
                bn = nxt[1] if nxt and isinstance(nxt[1], nn.BatchNorm2d) and nxt[1].num_features == \
                    child.out_channels else None
                gate = KernelGate(child.in_channels, child.out_channels, self.mode == "dynamic", self.threshold,
                                  self.init)
                setattr(parent, name, Gated(child, bn, gate))
                if bn is not None:
                    setattr(parent, nxt[0], nn.Identity())
                count += 1
        if not count:
            raise EdgebuildError("gate: no convolution to gate", "widen `layers` or narrow `ignore`")
        return model

    def penalty(self, model: Any) -> Any:
        """sparsity x the mean over gated layers of the Hoyer measure (sum g)^2 / (C sum g^2) of their gates
        (per input for dynamic gates): the fraction of kernels in effect on, 1 when all gates are equal, 1/C
        when one is on (DeepHoyer, Yang et al. 2020). It is scale-invariant on purpose: an L1 term on the
        gate values is met by shrinking every gate of a layer alike, at no cost to the loss, because the
        next BatchNorm (or conv) scales them back up; then no gate says which kernel is redundant."""
        gates = [m for m in model.modules() if type(m).__name__ == "KernelGate" and m._last is not None]
        total = 0
        for m in gates:
            g = m._last  # [N or 1, C]
            total = total + (g.sum(1) ** 2 / (g.shape[1] * (g ** 2).sum(1) + 1e-12)).mean()
            m._last = None
        return self.sparsity * total / max(1, len(gates))

    def _static(self, model: Any, util: dict[str, Any], ctx: Any, shape: list[int], metrics: dict, notes: list) -> Any:
        import torch

        from edgebuild.evaluate import count_macs
        from edgebuild.stages.prune import check_forward, check_gain

        before_macs, before_params = count_macs(ctx.input.load_torch(), shape)
        folded, convs = unwrap(model)  # coefficients folded in, gate modules removed
        removed = remove_kernels(folded, convs, util, self.threshold, shape)
        check_forward(folded, torch.zeros([1, *shape[1:]]))
        metrics["gate/kernels_removed"] = removed
        metrics["gate/val_before_finetune"] = weights.validate(folded, ctx)
        finetune = SimpleNamespace(epochs=self.finetune_epochs, optimizer=self.optimizer, scheduler=self.scheduler,
                                   early_stopping_patience=self.early_stopping_patience)
        tuned, fit_metrics = fit(folded, ctx, finetune, name="gate_finetune")
        metrics.update(fit_metrics)
        macs, params = count_macs(tuned, shape)
        metrics.update({"gate/macs_fraction": macs / before_macs, "gate/params_fraction": params / before_params})
        metrics.update(check_gain(ctx.input.load_torch(), tuned, macs / before_macs, shape, ctx.task.output_names,
                                  ctx.workdir / ".gain"))
        notes.append(f"learned gates: {removed} of {metrics['gate/kernels']} kernels had utilization under "
                     f"{self.threshold:.0%} and were removed; MACs {before_macs:,} -> {macs:,} "
                     f"({1 - macs / before_macs:.0%} fewer)")
        return tuned

    def _dynamic(self, model: Any, ctx: Any, shape: list[int], metrics: dict, notes: list) -> Any:
        import numpy as np

        from edgebuild.evaluate import count_macs

        per_input, active = effective_macs(model, ctx, shape)
        macs, _ = count_macs(model, shape)
        metrics.update({"macs/effective_mean": float(np.mean(per_input)),
                        "macs/effective_p90": float(np.percentile(per_input, 90)),
                        "macs/effective_fraction": float(np.mean(per_input)) / macs,
                        "gate/active_fraction_mean": float(np.mean(active))})
        notes.append(f"dynamic gates: {np.mean(active):.0%} of the gated kernels are on per input on average; "
                     f"effective MACs {np.mean(per_input):,.0f} (p90 {np.percentile(per_input, 90):,.0f}) of "
                     f"{macs:,} dense")
        notes.append(DENSE_NOTE)
        return model


def _gated(model: Any) -> dict[str, Any]:
    return {n: m for n, m in model.named_modules() if type(m).__name__ == "Gated"}


def utilization(model: Any, ctx: Any) -> dict[str, Any]:
    """Per gated conv: each kernel's mean applied gate value over the validation split (numpy [C])."""
    import numpy as np
    import torch

    sums: dict[str, Any] = {}
    count = 0
    def hook(name: str) -> Any:
        def fn(mod: Any, inputs: Any, g: Any) -> None:  # g: [N, C] (dynamic) or [1, C] (static)
            sums[name] = sums.get(name, 0) + g.expand(len(inputs[0]), -1).sum(0)
        return fn

    hooks = [m.gate.register_forward_hook(hook(n)) for n, m in _gated(model).items()]
    try:
        model.eval()
        with torch.no_grad():
            for x, _ in ctx.data.batches("val", 64, None):
                model(torch.from_numpy(x))
                count += len(x)
    finally:
        for h in hooks:
            h.remove()
    return {n: np.asarray(s.detach().numpy(), dtype=np.float64) / max(1, count) for n, s in sums.items()}


def effective_macs(model: Any, ctx: Any, shape: list[int]) -> tuple[list[float], list[float]]:
    """Per held-out input: the MACs left when kernels whose gate is 0 are skipped, and the fraction of
    gated kernels that are on."""
    import numpy as np
    import torch

    from edgebuild.evaluate import count_macs, layer_macs

    total, _ = count_macs(model, shape)
    per_conv = {n: macs for n, (m, macs) in layer_macs(model, shape).items()}
    gated = _gated(model)
    masks: dict[str, Any] = {}
    hooks = [m.gate.register_forward_hook(lambda mod, i, g, n=n: masks.__setitem__(n, (g > 0).float()))
             for n, m in gated.items()]
    per_input: list[float] = []
    active: list[float] = []
    try:
        model.eval()
        with torch.no_grad():
            for x, _ in ctx.data.batches("test", 64, None):
                model(torch.from_numpy(x))
                skipped = np.zeros(len(x))
                on = np.zeros(len(x))
                kernels = 0
                for n in gated:
                    mask = masks[n].numpy()  # [N, C]
                    skipped += per_conv[f"{n}.conv"] * (1 - mask.mean(1))
                    on += mask.sum(1)
                    kernels += mask.shape[1]
                per_input.extend((total - skipped).tolist())
                active.extend((on / max(1, kernels)).tolist())
    finally:
        for h in hooks:
            h.remove()
    return per_input, active


def unwrap(model: Any) -> tuple[Any, dict[str, Any]]:
    """Fold each static gate's coefficients into its BN (weight, bias) or conv, and put the conv and BN
    back where they were (the Identity left in the BN's place is replaced by it). Returns the model
    and {gated module's name: its conv}, the names `utilization` keys its table by (matched by name:
    a parent's own gated children and its containers' interleave differently from named_modules' order)."""
    import torch
    from torch import nn

    names = {id(m): n for n, m in _gated(model).items()}
    convs = {}
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for i, (name, child) in enumerate(children):
            if type(child).__name__ != "Gated":
                continue
            with torch.no_grad():
                c = torch.sigmoid(GAIN * child.gate.logit)
                if child.bn is not None:
                    child.bn.weight.mul_(c)
                    child.bn.bias.mul_(c)
                else:
                    child.conv.weight.mul_(c[:, None, None, None])
                    if child.conv.bias is not None:
                        child.conv.bias.mul_(c)
            setattr(parent, name, child.conv)
            if child.bn is not None:
                nxt = children[i + 1]
                assert isinstance(nxt[1], nn.Identity)
                setattr(parent, nxt[0], child.bn)
            convs[names[id(child)]] = child.conv
    return model, convs


def remove_kernels(model: Any, convs: dict[str, Any], util: dict[str, Any], threshold: float,
                   shape: list[int]) -> int:
    """Remove, with Torch-Pruning, each conv's kernels whose utilization is under `threshold` (every
    layer keeps its most used kernel). Returns how many kernels went."""
    import torch
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros([1, *shape[1:]]))
    removed = 0
    for name, conv in convs.items():
        u = util[name]
        idxs = [int(i) for i in (u < threshold).nonzero()[0]]
        if len(idxs) >= conv.out_channels:
            keep = int(u.argmax())
            idxs = [i for i in idxs if i != keep]
        idxs = [i for i in idxs if i < conv.out_channels]
        if not idxs:
            continue
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=idxs)
        if graph.check_pruning_group(group):
            group.prune()
            removed += len(idxs)
    return removed


def write_report(util: dict[str, Any], threshold: float, workdir: Any) -> dict[str, str]:
    """utilization.csv (layer, kernel, utilization, off) and utilization.png (histogram)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lines = ["layer,kernel,utilization,under_threshold"]
    for n, u in util.items():
        lines += [f"{n},{k},{v:.6f},{int(v < threshold)}" for k, v in enumerate(u)]
    (workdir / "utilization.csv").write_text("\n".join(lines) + "\n")
    values = np.concatenate(list(util.values())) if util else np.zeros(0)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(values, bins=np.linspace(0, 1, 41))
    ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold}")
    ax.set_xlabel("kernel utilization (mean gate value, validation split)")
    ax.set_ylabel("kernels")
    ax.legend()
    fig.tight_layout()
    fig.savefig(workdir / "utilization.png", dpi=100)
    plt.close(fig)
    return {"utilization": "utilization.csv", "utilization_histogram": "utilization.png"}
