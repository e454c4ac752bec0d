"""What the weight-compression stages (prune, cluster) share: which layers they touch, what they
refuse, how sparse a model is, the MACs that remain once zero weights are skipped, and the task's
quality of a torch model on the validation split."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from edgebuild.errors import EdgebuildError


def load_float_model(ctx: Any, stage_kind: str) -> Any:
    """The input as a float torch model; exported or quantized inputs are refused with the reason."""
    art = ctx.input
    if art.kind != "torch":
        raise EdgebuildError(f"{stage_kind} needs a float torch model; its input is already an exported {art.kind} "
                             "model", f"point {stage_kind}'s `input:` to a torch stage (train, prune, ...)")
    model = art.load_torch()
    quantized = [n for n, m in model.named_modules()
                 if type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized", "nncf"))
                 or "FakeQuantize" in type(m).__name__ or "Quantizer" in type(m).__name__]
    if quantized or str(art.meta.get("precision", "fp32")).lower() in ("int8", "int4", "uint8"):
        where = f" (quantized layers: {', '.join(quantized[:3])})" if quantized else ""
        raise EdgebuildError(f"{stage_kind}: the input model is already quantized{where}",
                             f"run {stage_kind} on the float model and quantize afterwards")
    return model


def select_layers(model: Any, ctx: Any, types: list[str], include: list[str], ignore: list[str]) -> dict[str, Any]:
    """Layers by type and name regex, minus the task's output layers and the `ignore` regexes.
    A regex that matches no layer is an error (a typo would silently compress nothing)."""
    from torch import nn

    classes = tuple(_layer_type(t) for t in types)
    named = {n: m for n, m in model.named_modules() if n}
    for option, patterns in (("layers", include), ("ignore", ignore)):
        for p in patterns:
            if not any(re.fullmatch(p, n) or re.search(p, n) for n in named):
                raise EdgebuildError(f"{option} regex {p!r} matches no layer of the model",
                                     f"use a layer name or regex; layers are e.g. {', '.join(list(named)[:6])}, ...")
    outputs = {id(m) for m in ctx.task.output_layers(model)}
    chosen = {n: m for n, m in named.items()
              if isinstance(m, classes) and isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
              and (not include or any(re.search(p, n) for p in include))
              and not any(re.search(p, n) for p in ignore) and id(m) not in outputs}
    if not chosen:
        raise EdgebuildError(f"no layer left to compress (types {types}, layers {include}, ignore {ignore})",
                             "widen `layers`/`layer_types` or narrow `ignore`")
    return chosen


def ignored_modules(model: Any, ctx: Any, ignore: list[str]) -> list[Any]:
    """The task's output layers plus every module whose name matches an `ignore` regex."""
    select_layers(model, ctx, ["Conv2d", "Linear"], [], ignore)  # validates the regexes
    named = [m for n, m in model.named_modules() if n and any(re.search(p, n) for p in ignore)]
    return [*ctx.task.output_layers(model), *named]


def _layer_type(name: str) -> type:
    from torch import nn

    cls = getattr(nn, name, None)
    if not isinstance(cls, type):
        raise EdgebuildError(f"unknown layer type {name!r}", "use torch.nn class names such as Conv2d, Linear")
    return cls


def is_depthwise(module: Any) -> bool:
    from torch import nn

    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.in_channels


def collapsed_layers(table: dict[str, dict[str, float]], layers: list[str]) -> list[str]:
    """Selected layers whose every weight is zero: they pass nothing on (a dead path)."""
    return [n for n in layers if table[n]["zeros"] == table[n]["weights"]]


def sparsity_table(model: Any) -> dict[str, dict[str, float]]:
    """Per conv/linear layer: weights, zeros, sparsity and distinct values."""
    import torch
    from torch import nn

    table = {}
    for n, m in model.named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            w = m.weight.detach()
            zeros = int((w == 0).sum())
            table[n] = {"weights": int(w.numel()), "zeros": zeros, "sparsity": zeros / w.numel(),
                        "unique_values": int(torch.unique(w).numel())}
    return table


def overall_sparsity(table: dict[str, dict[str, float]], layers: list[str] | None = None) -> float:
    rows = [r for n, r in table.items() if layers is None or n in layers]
    return sum(r["zeros"] for r in rows) / max(1, sum(r["weights"] for r in rows))


def effective_macs(model: Any, input_shape: list[int]) -> int:
    """MACs at batch 1 when multiplications by zero weights are skipped (what sparse hardware could
    gain; dense CPU runtimes still do every multiplication)."""
    from edgebuild.evaluate import layer_macs

    return int(sum(macs * float((m.weight != 0).float().mean()) for m, macs in layer_macs(model, input_shape).values()))


def validate(model: Any, ctx: Any, limit: int | None = None) -> float:
    """The task's primary metric of a torch model on the validation split, from its raw outputs
    through the task's own evaluator (the same code that scores deployables)."""
    import torch

    evaluator = ctx.task.evaluator(ctx.data.class_names)
    model.eval()
    with torch.no_grad():
        for x, y in ctx.data.batches("val", 64, limit):
            out = model(torch.from_numpy(x))
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            evaluator.update([np.asarray(o.detach().numpy()) for o in outs], y)
    metrics, _ = evaluator.compute()
    return float(metrics[ctx.task.primary_metric])
