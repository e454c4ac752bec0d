"""prune: structured (channels physically removed, Torch-Pruning) or unstructured (zeroed weights,
torch.nn.utils.prune) pruning, then fine-tuning on the shared Lightning path.

Structured pruning changes the architecture: the whole module is saved, and a consistency check
proves the gain is real (the exported ONNX file is smaller and its MACs match the claimed ones).
`until: {max_acc_drop: 1.0}` raises the ratio step by step and keeps the last model within the floor.
"""

from __future__ import annotations

import copy
import functools
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from edgebuild.artifact import Artifact, write_json
from edgebuild.config import bounded
from edgebuild.errors import EdgebuildError
from edgebuild.finetune import DEFAULT_SCHEDULER, FitConfig, fit
from edgebuild.stage import Stage, StageResult, check_patterns
from edgebuild.stages import weights

MODES = ("structured", "unstructured")
IMPORTANCES = ("l1", "l2", "bn_scale", "activation")
MAX_CHANNEL_RATIO = 0.95  # a layer always keeps some channels: whole layers are never removed
SPARSE_NOTE = ("unstructured sparsity leaves the layer shapes as they are: dense CPU runtimes (OpenVINO, ONNX Runtime) "
               "still multiply by every zero, so latency does not improve; the gain is the zipped size "
               "(size/zip_bytes) and the MACs sparse hardware could skip (macs/effective)")


@dataclass
class Until:
    """Prune to an accuracy floor: raise the channel ratio by `step` until the validation drop of the
    task's primary metric exceeds the limit, keep the last model within. The limit is in points (x100):
    `max_acc_drop` (pp of top-1) or, for detectors, `max_map_drop` (points of mAP@[.5:.95]; wins when set)."""

    max_acc_drop: float = bounded(1.0, ge=0, le=100)
    max_map_drop: float | None = bounded(None, ge=0, le=100)
    step: float = bounded(0.1, gt=0, lt=1)
    max_ratio: float = bounded(0.9, gt=0, lt=1)

    @property
    def limit(self) -> float:
        return self.max_map_drop if self.max_map_drop is not None else self.max_acc_drop


@dataclass
class Prune(FitConfig, Stage):
    kind: ClassVar[str] = "prune"
    needs_float_input: ClassVar[bool] = True
    version: ClassVar[int] = 2  # 2: round_to rounds to the nearest block (cached round-down results are stale)
    uses: ClassVar[tuple[str, ...]] = ("data", "task", "trainer", "calibration")

    mode: str = "structured"
    # structured: fraction of channels removed per layer; unstructured: target sparsity
    ratio: float = bounded(0.5, gt=0, lt=1)
    # structured: keep this fraction of the MACs (instead of `ratio`)
    macs_target: float | None = bounded(None, gt=0, lt=1)
    importance: str = "l1"  # structured: l1 | l2 | bn_scale | activation
    # activation: channels non-zero for fewer inputs than this go first
    activation_threshold: float = bounded(0.05, ge=0, le=1)
    global_pruning: bool = False  # structured: rank channels across layers instead of the same ratio per layer
    # structured: keep channel counts multiples of this. CPU kernels work in SIMD blocks (8 floats on AVX2,
    # 16 on AVX-512), so 33 channels cost as much as 48; rounding made a 50 %-MACs MobileNetV2 x1.49 -> x2.00
    # faster on OpenVINO CPU (docs/benchmarks.md). Layers with no more channels than this are left whole.
    round_to: int | None = bounded(None, ge=1)
    iterative_steps: int = bounded(1, ge=1)  # structured: prune in N steps with fine-tuning after each
    scope: str = "global"  # unstructured: global | layer (one threshold per layer)
    # unstructured: depthwise convs hold 9 weights per channel, a tiny share of the model; under a global
    # threshold whole depthwise layers fall to zero (layer collapse: MobileNetV2 at 80 % lost six)
    prune_depthwise: bool = False
    schedule: str = "oneshot"  # unstructured: oneshot | agp (cubic ramp during fine-tuning)
    layers: list[str] = field(default_factory=list)  # regexes of layer names to prune; empty = all
    layer_types: list[str] = field(default_factory=lambda: ["Conv2d", "Linear"])
    ignore: list[str] = field(default_factory=list)  # regexes never pruned (the task's output layers always are)
    until: Until | None = None
    epochs: int = bounded(2, ge=0)  # fine-tuning epochs (per step when iterative or with `until`)
    optimizer: dict[str, Any] = field(default_factory=lambda: {"_target_": "torch.optim.AdamW", "_partial_": True,
                                                               "lr": 1e-3, "weight_decay": 1e-4})
    scheduler: dict[str, Any] | None = field(default_factory=lambda: dict(DEFAULT_SCHEDULER))

    def check(self, cfg: Any) -> None:
        def bad(what: str, fix: str) -> None:
            raise EdgebuildError(f"prune: {what}", fix)

        if self.mode not in MODES:
            bad(f"unknown mode {self.mode!r}", f"use one of {list(MODES)}")
        if not 0 < self.ratio < 1:
            bad(f"ratio {self.ratio} is outside (0, 1)", "give the fraction to remove, e.g. ratio: 0.5")
        if self.macs_target is not None and not 0 < self.macs_target < 1:
            bad(f"macs_target {self.macs_target} is outside (0, 1)", "give the fraction of MACs to keep, e.g. 0.5")
        if self.importance not in IMPORTANCES:
            bad(f"unknown importance {self.importance!r}", f"use one of {list(IMPORTANCES)}")
        if self.scope not in ("global", "layer") or self.schedule not in ("oneshot", "agp"):
            bad(f"scope {self.scope!r} / schedule {self.schedule!r}", "scope: global|layer, schedule: oneshot|agp")
        if self.round_to is not None and self.round_to < 1:
            bad(f"round_to {self.round_to} is below 1", "use a SIMD width such as 8 or 16, or null for no rounding")
        if self.iterative_steps < 1:
            bad("iterative_steps must be >= 1", "use 1 for one-shot pruning")
        if self.mode == "unstructured" and (self.macs_target is not None or self.until is not None
                                            or self.round_to is not None):
            bad("macs_target, round_to and until apply to structured pruning only",
                "use mode: structured, or give unstructured sparsity as `ratio`")
        if self.until is not None:
            u = self.until
            if not (0 < u.step < 1 and u.step <= u.max_ratio < 1 and u.limit >= 0):
                bad(f"until {u} is invalid", "use 0 < step <= max_ratio < 1 and max_acc_drop (max_map_drop) >= 0")
            if self.macs_target is not None:
                bad("until and macs_target exclude each other", "the floor loop raises the channel ratio itself")
        check_patterns(self, layers=self.layers, ignore=self.ignore)

    def run(self, ctx: Any) -> StageResult:
        model = weights.load_float_model(ctx, "prune")
        if self.mode == "unstructured":
            return self._unstructured(model, ctx)
        return self._structured(model, ctx)

    # ------------------------------------------------------------------------------ structured
    def _structured(self, model: Any, ctx: Any) -> StageResult:
        from edgebuild.evaluate import count_macs

        shape = ctx.input.meta["input_shape"]
        base_macs, base_params = count_macs(model, shape)
        pruner = ChannelPruner(self, model, ctx)
        metrics: dict[str, Any] = {}
        steps: list[dict[str, Any]] = []
        if self.until is not None:
            pruned, steps = self._to_floor(pruner, model, ctx, base_macs)
        else:
            pruned, n = model, self.iterative_steps
            for i in range(1, n + 1):
                if self.macs_target is not None:
                    pruned = pruner.to_macs(pruned, base_macs * (1 - (1 - self.macs_target) * i / n))
                else:
                    before, after = self.ratio * (i - 1) / n, self.ratio * i / n
                    pruned = pruner.by_ratio(pruned, 1 - (1 - after) / (1 - before))
                name = f"finetune{i}" if n > 1 else "finetune"
                metrics[f"{name}/val_before"] = weights.validate(pruned, ctx)
                pruned, fit_metrics = fit(pruned, ctx, self, name=name)
                metrics.update(fit_metrics)
                if n > 1:
                    step_macs, _ = count_macs(pruned, shape)
                    steps.append({"name": f"step{i}", "params": {"step": i},
                                  "metrics": {"macs": step_macs, "macs/fraction": step_macs / base_macs,
                                              ctx.task.primary_metric: weights.validate(pruned, ctx)}})
        macs, params = count_macs(pruned, shape)
        metrics.update({"prune/macs_fraction": macs / base_macs, "prune/params_fraction": params / base_params,
                        "prune/channels_fraction": pruner.channels(pruned) / pruner.channels(model),
                        "prune/dead_channels": pruner.dead_channels})
        metrics.update(check_gain(model, pruned, macs / base_macs, shape, ctx.task.output_names, ctx.workdir / ".gain"))
        notes = [f"structured pruning removed {1 - macs / base_macs:.0%} of the MACs and "
                 f"{1 - params / base_params:.0%} of the parameters; the exported file is "
                 f"{1 / metrics['prune/export_bytes_ratio']:.2f}x smaller"]
        meta = {**ctx.input.meta, "pruned": {"mode": "structured", "macs_fraction": macs / base_macs}}
        return StageResult(Artifact.save_torch(pruned, ctx.workdir, meta), metrics, steps=steps, notes=notes)

    def _to_floor(self, pruner: ChannelPruner, model: Any, ctx: Any, base_macs: int) -> tuple[Any, list[dict]]:
        from edgebuild.evaluate import count_macs

        u = self.until
        assert u is not None
        reference = weights.validate(model, ctx)
        ratios = [round(u.step * k, 6) for k in range(1, int(u.max_ratio / u.step + 1e-9) + 1)]

        def attempt(ratio: float, kept: tuple[float, Any] | None) -> tuple[Any, float, dict[str, Any]]:
            done, current = kept if kept else (0.0, model)
            candidate = pruner.by_ratio(current, 1 - (1 - ratio) / (1 - done))
            candidate, _ = fit(candidate, ctx, self, name=f"floor_{ratio:.2f}")
            value = weights.validate(candidate, ctx)
            macs, _ = count_macs(candidate, ctx.input.meta["input_shape"])
            drop = (reference - value) * 100.0
            return candidate, drop, {ctx.task.primary_metric: value, "val/drop": drop, "macs": macs,
                                     "macs/fraction": macs / base_macs}

        kept, steps = search_floor(ratios, attempt, u.limit)
        if kept is None:
            raise EdgebuildError(f"prune: even ratio {ratios[0]} drops {steps[0]['metrics']['val/drop']:.2f} points, "
                                 f"more than the floor's limit of {u.limit} points",
                                 "use a smaller until.step, more fine-tuning epochs, or a larger max_acc_drop")
        return kept[1], steps

    # ---------------------------------------------------------------------------- unstructured
    def _unstructured(self, model: Any, ctx: Any) -> StageResult:
        from torch.nn.utils import prune

        layers = list(weights.select_layers(model, ctx, self.layer_types, self.layers, self.ignore))
        if not self.prune_depthwise:
            modules = dict(model.named_modules())
            layers = [n for n in layers if not weights.is_depthwise(modules[n])]
        metrics: dict[str, Any] = {}
        callbacks = []
        if self.schedule == "oneshot":
            apply_sparsity(model, layers, self.ratio, self.scope)
            metrics["finetune/val_before"] = weights.validate(model, ctx)
        else:
            callbacks.append(agp_callback(layers, self.ratio, self.scope, ramp_epochs=max(1, self.epochs - 1)))
        model, fit_metrics = fit(model, ctx, self, callbacks=callbacks, name="finetune")
        metrics.update(fit_metrics)
        if self.schedule == "agp" and self.epochs <= 0:  # no training: the ramp collapses to its end point
            apply_sparsity(model, layers, self.ratio, self.scope)
        modules = dict(model.named_modules())
        for name in layers:  # masks become the weights: plain modules, zeros in the tensors
            if prune.is_pruned(modules[name]):
                prune.remove(modules[name], "weight")
        table = weights.sparsity_table(model)
        write_json(ctx.workdir / "sparsity.json", table)
        collapsed = weights.collapsed_layers(table, layers)
        notes = [SPARSE_NOTE]
        if collapsed:
            notes.append(f"layer collapse: {len(collapsed)} layer(s) lost every weight ({', '.join(collapsed[:4])}"
                         f"{', ...' if len(collapsed) > 4 else ''}); no fine-tuning brings them back: use "
                         "scope: layer, a lower ratio, or `ignore` them")
        metrics.update({"sparsity/collapsed_layers": len(collapsed),
                        "sparsity": weights.overall_sparsity(table, layers),
                        "sparsity/model": weights.overall_sparsity(table),
                        "macs/effective": weights.effective_macs(model, ctx.input.meta["input_shape"])})
        meta = {**ctx.input.meta, "pruned": {"mode": "unstructured", "sparsity": metrics["sparsity"]}}
        return StageResult(Artifact.save_torch(model, ctx.workdir, meta), metrics, files={"sparsity": "sparsity.json"},
                           notes=notes)


def search_floor(ratios: list[float], attempt: Callable, max_drop: float) -> tuple[Any, list[dict[str, Any]]]:
    """Try increasing ratios; keep the last candidate within `max_drop`, stop at the first beyond it.
    `attempt(ratio, kept)` -> (candidate, drop, metrics) prunes the kept (ratio, model) further."""
    kept, steps = None, []
    for ratio in ratios:
        candidate, drop, metrics = attempt(ratio, kept)
        steps.append({"name": f"ratio_{ratio:.2f}", "params": {"ratio": ratio}, "metrics": metrics})
        if drop > max_drop:
            break
        kept = (ratio, candidate)
    return kept, steps


# ---------------------------------------------------------------------------------- structured
class ChannelPruner:
    """Torch-Pruning's MetaPruner with the stage's importance and ignored layers, always on a copy."""

    def __init__(self, stage: Prune, model: Any, ctx: Any):
        import torch
        from torch import nn

        self.stage, self.ctx = stage, ctx
        self.example = torch.zeros([1, *list(ctx.input.meta["input_shape"])[1:]])
        types = tuple(weights._layer_type(t) for t in stage.layer_types)
        prunable = weights.select_layers(model, ctx, stage.layer_types, stage.layers, stage.ignore)
        # by name, so the same choice applies to every copy of the model
        self.ignored = {n for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
                        and (n not in prunable or not isinstance(m, types) or too_few(m, stage.round_to))}
        self.dead_channels = 0

    def importance(self, model: Any) -> Any:
        import torch_pruning as tp

        kind = self.stage.importance
        if kind == "activation":
            imp = ActivationUtilization(self.stage.activation_threshold)
            imp.collect(model, self.ctx.data.calibration())
            self.dead_channels = imp.dead
            return imp
        if kind == "bn_scale":
            return tp.importance.BNScaleImportance()
        return tp.importance.GroupMagnitudeImportance(p=1 if kind == "l1" else 2)

    def by_ratio(self, model: Any, ratio: float, importance: Any = None) -> Any:
        """A copy of `model` with `ratio` of the channels removed (per layer, or globally ranked)."""
        model = copy.deepcopy(model).eval()
        imp = importance or self.importance(model)
        if isinstance(imp, ActivationUtilization):
            imp.bind(model)
        ignored = [m for n, m in model.named_modules() if n in self.ignored]
        try:
            pruner = _rounding_pruner()(model, self.example, importance=imp, pruning_ratio=ratio,
                                              global_pruning=self.stage.global_pruning, ignored_layers=ignored,
                                              round_to=self.stage.round_to,
                                              max_pruning_ratio=MAX_CHANNEL_RATIO)
            pruner.step()
        except EdgebuildError:
            raise
        except Exception as e:  # Torch-Pruning raises many types while tracing unusual graphs
            raise EdgebuildError(f"Torch-Pruning cannot trace {type(model).__name__}: {str(e).splitlines()[0][:300]}",
                                 "add the layers it cannot handle to `ignore`, or use mode: unstructured") from None
        check_forward(model, self.example)
        return model

    def to_macs(self, model: Any, goal: float) -> Any:
        """The least-pruned copy of `model` whose MACs are at most `goal`: a coarse scan of the ratio,
        then bisection (Torch-Pruning skips layers that would lose every channel, so MACs are not
        monotonic in the ratio near its top)."""
        from edgebuild.evaluate import count_macs

        shape = self.ctx.input.meta["input_shape"]
        imp = self.importance(model)  # measured once on the unpruned model, reused for every trial
        start = count_macs(model, shape)[0]
        lowest, lo = start, 0.0
        for k in range(1, round(MAX_CHANNEL_RATIO / 0.05) + 1):
            hi = 0.05 * k
            best = self.by_ratio(model, hi, imp)
            macs = count_macs(best, shape)[0]
            lowest = min(lowest, macs)
            if macs <= goal:
                break
            lo = hi
        else:
            raise EdgebuildError(f"prune: macs_target cannot be reached without removing whole layers: with up to "
                                 f"{MAX_CHANNEL_RATIO:.0%} of every prunable layer's channels removed the model keeps "
                                 f"at least {lowest / start:.1%} of its MACs, the goal is {goal / start:.1%}",
                                 "raise macs_target, or take layers out of `ignore`")
        for _ in range(4):
            mid = (lo + hi) / 2
            trial = self.by_ratio(model, mid, imp)
            if count_macs(trial, shape)[0] <= goal:
                hi, best = mid, trial
            else:
                lo = mid
        return best

    @staticmethod
    def channels(model: Any) -> int:
        from torch import nn

        return sum(m.out_channels for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd))


@functools.cache
def _rounding_pruner() -> type:
    import torch_pruning as tp

    class RoundingPruner(tp.pruner.MetaPruner):
        """Kept channels rounded to the nearest multiple of round_to, as Torch-Pruning documents it;
        its code rounds down, so ratio 0.01 took 64 channels to 48 (and the MAC search overshot a 50 %
        target to 40 %), and a layer rounded to none was not pruned at all. At least one block stays."""

        def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
            blocks = (current_channels - n_pruned + round_to / 2) // round_to
            keep = min(current_channels, max(round_to, int(blocks) * round_to))
            return current_channels - keep

    return RoundingPruner


def too_few(layer: Any, round_to: int | None) -> bool:
    """A layer of at most `round_to` channels has no block to lose: it stays whole, out of the ranking."""
    channels = getattr(layer, "out_channels", None) or getattr(layer, "out_features", 0)
    return round_to is not None and channels <= round_to


class ActivationUtilization:
    """The Parsimonious Inference criterion: how often a channel is used. Utilization = fraction of
    calibration activations (inputs x positions) where the channel is non-zero (1 - APoZ), read at
    the inputs of the layers consuming it; channels below `threshold` rank lowest and go first; ties
    (e.g. channels without a ReLU in front, always non-zero) are broken by L1 weight magnitude."""

    def __init__(self, threshold: float):
        import torch_pruning as tp

        self.threshold = threshold
        self.magnitude = tp.importance.GroupMagnitudeImportance(p=1)
        self.by_name: dict[str, Any] = {}
        self.names: dict[int, str] = {}
        self.dead = 0

    def collect(self, model: Any, calibration: Any) -> None:
        import torch
        from torch import nn

        nonzero: dict[str, Any] = {}
        count: dict[str, int] = {}

        def hook(name: str) -> Callable:
            def fn(m: Any, inputs: Any, out: Any) -> None:
                x = inputs[0]
                used = (x != 0).float()
                used = used.mean(dim=(0, 2, 3)) if used.ndim == 4 else used.reshape(-1, used.shape[-1]).mean(0)
                nonzero[name] = nonzero.get(name, 0) + used * len(x)
                count[name] = count.get(name, 0) + len(x)
            return fn

        hooks = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
                 if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
        try:
            with torch.no_grad():
                for i in range(0, len(calibration), 64):
                    model.eval()(torch.from_numpy(calibration[i:i + 64]))
        finally:
            for h in hooks:
                h.remove()
        self.by_name = {n: nonzero[n] / count[n] for n in nonzero}
        self.dead = sum(int((u < self.threshold).sum()) for u in self.by_name.values())

    def bind(self, model: Any) -> None:
        self.names = {id(m): n for n, m in model.named_modules()}

    def __call__(self, group: Any) -> Any:
        import torch
        import torch_pruning as tp

        f = tp.function
        consumers = (f.prune_conv_in_channels, f.prune_linear_in_channels,
                     f.prune_depthwise_conv_in_channels, f.prune_depthwise_conv_out_channels)
        imps, roots = [], []
        for i, (dep, idxs) in enumerate(group):
            util = self.by_name.get(self.names.get(id(dep.layer), ""))
            if util is not None and dep.pruning_fn in consumers:
                imps.append(util[list(idxs)])
                roots.append(group[i].root_idxs)
        tie = self.magnitude(group)
        if not imps:
            return tie
        util = self.magnitude._reduce(imps, roots)  # mean over the group's consumers
        util = torch.where(util < self.threshold, torch.zeros_like(util), util)
        return util + 1e-3 * tie / (tie.max() + 1e-12) if tie is not None else util


def check_forward(model: Any, example: Any) -> None:
    """After pruning, the model must still run; if not, name the layer where it breaks (a reshape
    or slice with a fixed channel count that Torch-Pruning cannot see)."""
    import torch

    entered: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda m, i, n=n: entered.append(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(example)
    except Exception as e:
        layer = entered[-1] if entered else type(model).__name__
        raise EdgebuildError(f"after pruning, {type(model).__name__} fails after layer {layer!r} (the last one that "
                             f"ran): {str(e).splitlines()[0][:200]}; its forward uses a fixed channel count there, "
                             "which Torch-Pruning cannot trace",
                             f"add {layer!r} to the prune stage's `ignore` (regexes of layer names)") from None
    finally:
        for h in hooks:
            h.remove()


def onnx_macs(path: Path) -> int:
    """MACs of an exported ONNX graph (Conv, Gemm, MatMul with a weight), from its inferred shapes:
    what the deployable computes, independent of the torch model's claims."""
    import math

    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    g = model.graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*g.value_info, *g.output, *g.input]}
    dims = {i.name: list(i.dims) for i in g.initializer}
    dims.update({n.output[0]: list(n.attribute[0].t.dims) for n in g.node if n.op_type == "Constant" and n.attribute})
    total = 0
    for n in g.node:
        if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in dims and n.output[0] in shapes:
            out, w = shapes[n.output[0]], dims[n.input[1]]
            if n.op_type == "Conv":
                total += math.prod(out[1:]) * math.prod(w[1:])
            else:
                total += math.prod(out[:-1]) * math.prod(w)
    return int(total)


def check_gain(before: Any, after: Any, claimed: float, input_shape: list[int], output_names: list[str],
               scratch: Path) -> dict[str, float]:
    """The gain must be real: a model claiming `claimed` of its MACs must export to a smaller file whose
    own MAC count agrees. Otherwise the stage fails and says why."""
    from edgebuild.convert import torch_to_onnx

    scratch.mkdir(parents=True, exist_ok=True)
    try:
        a = torch_to_onnx(before, input_shape, scratch / "before.onnx", output_names, dynamic_batch=False)
        b = torch_to_onnx(after, input_shape, scratch / "after.onnx", output_names, dynamic_batch=False)
        size_ratio = b.stat().st_size / a.stat().st_size
        macs_ratio = onnx_macs(b) / max(1, onnx_macs(a))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if claimed < 0.99 and size_ratio >= 1.0:
        raise EdgebuildError(f"prune claims {claimed:.1%} of the MACs but the exported file is not smaller "
                             f"({size_ratio:.2f}x the input's): channels were zeroed (masks) instead of removed, or "
                             "the pruned layers could not be removed", "use mode: structured on a traceable model")
    if abs(macs_ratio - claimed) > 0.05:
        raise EdgebuildError(f"prune claims {claimed:.1%} of the MACs but the exported model computes {macs_ratio:.1%}",
                             "the pruned layers were not removed from the exported graph; report this model")
    return {"prune/export_bytes_ratio": size_ratio, "prune/export_macs_fraction": macs_ratio}


# -------------------------------------------------------------------------------- unstructured
def apply_sparsity(model: Any, layers: list[str], sparsity: float, scope: str) -> None:
    """Magnitude (L1) masks reaching `sparsity` of the selected weights, across all of them (global)
    or in each layer; existing masks are kept and extended (torch's PruningContainer)."""
    from torch.nn.utils import prune

    modules = dict(model.named_modules())
    params = [(modules[n], "weight") for n in layers]

    def extra(ms: list) -> int:
        total = sum(m.weight.numel() for m, _ in ms)
        done = sum(int((m.weight_mask == 0).sum()) for m, _ in ms if prune.is_pruned(m))
        return max(0, round(sparsity * total) - done)

    # Training runs channels_last and torch's pruning flattens scores with .view(-1): score contiguous copies.
    scores = {p: p[0].weight.detach().contiguous() for p in params}
    if scope == "global":
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=extra(params),
                                  importance_scores=scores)
    else:
        for p in params:
            prune.l1_unstructured(p[0], "weight", amount=extra([p]), importance_scores=scores[p])


def agp_callback(layers: list[str], final: float, scope: str, ramp_epochs: int) -> Any:
    """Gradual magnitude pruning (Zhu & Gupta's AGP): sparsity s_t = final * (1 - (1 - t/T)^3) over the
    first `ramp_epochs` epochs, in ten increments, then fine-tuning at the final sparsity."""
    import pytorch_lightning as pl
    import torch

    class GradualPruning(pl.Callback):
        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            total = ramp_epochs * trainer.num_training_batches
            t = trainer.global_step + 1
            every = max(1, total // 10)
            if t > total or (t % every and t != total):
                return
            target = final * (1 - (1 - min(t, total) / total) ** 3)
            apply_sparsity(module.model, layers, target, scope)
            if t == total:  # final sparsity: earlier epochs were less sparse and may not be kept as "best"
                ckpt = trainer.checkpoint_callback
                ckpt.best_k_models, ckpt.kth_best_model_path, ckpt.best_model_path = {}, "", ""
                ckpt.best_model_score = None
                ckpt.kth_value = torch.tensor(-torch.inf if ckpt.mode == "max" else torch.inf)

    return GradualPruning()
