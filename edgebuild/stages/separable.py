"""separable: rewrite standard convolutions as depthwise kxk + pointwise 1x1 (MobileNet's block).

A kxk conv with C_in inputs and C_out filters costs H*W*C_in*C_out*k*k MACs; its separable form
H*W*C_in*k*k + H*W*C_in*C_out. The new layers start from the best such factorisation of the
original kernel: for every input channel, the [C_out, k*k] slice of the weight is replaced by its
rank-1 SVD approximation (depthwise kernel = right singular vector, pointwise column = sigma * left),
so the rewritten model starts close to the original and a `distill` stage recovers the rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from edgebuild.artifact import Artifact
from edgebuild.config import bounded
from edgebuild.errors import EdgebuildError
from edgebuild.stage import Stage, StageResult, check_patterns

ACTIVATIONS = ("relu", "relu6")


@dataclass
class Separable(Stage):
    kind: ClassVar[str] = "separable"
    needs_float_input: ClassVar[bool] = True
    version: ClassVar[int] = 1
    uses: ClassVar[tuple[str, ...]] = ()  # a pure function of the input model and the options

    layers: list[str] = field(default_factory=list)  # module names or regexes (full match); empty = all eligible
    min_macs: int = bounded(0, ge=0)  # only layers costing at least this many MACs at the model's input shape
    batchnorm: bool = False  # BatchNorm between depthwise and pointwise (starts as identity)
    activation: str | None = None  # relu | relu6 between them (after the BatchNorm); null = linear

    def check(self, cfg: Any) -> None:
        check_patterns(self, layers=self.layers)
        if self.activation not in (None, *ACTIVATIONS):
            raise EdgebuildError(f"separable activation {self.activation!r} is not supported",
                                 f"use one of {list(ACTIVATIONS)} or null")

    def run(self, ctx: Any) -> StageResult:
        model = ctx.input.load_torch()
        shape = ctx.input.meta["input_shape"]
        costs = conv_macs(model, shape)
        eligible = {n: m for n, m in model.named_modules() if is_eligible(m)}
        chosen = [n for n in eligible if (not self.layers or any(re.fullmatch(p, n) for p in self.layers))
                  and costs.get(n, 0) >= self.min_macs]
        if not chosen:
            raise EdgebuildError(
                f"separable: no layer matches (layers={self.layers}, min_macs={self.min_macs}); eligible convs "
                "(kernel > 1, groups = 1) with MACs: "
                f"{', '.join(f'{n} {costs.get(n, 0):,}' for n in eligible) or 'none'}",
                "pick names or regexes from that list, or lower min_macs")
        errors = {}
        for name in chosen:
            block, errors[name] = separable_block(eligible[name], self.batchnorm, self.activation)
            set_module(model, name, block)
        after = conv_macs(model, shape)
        before_macs = sum(costs[n] for n in chosen)
        after_macs = sum(v for n, v in after.items() if n.rpartition(".")[0] in chosen)  # the blocks' convs
        metrics = {"separable/layers": len(chosen), "separable/layer_macs_before": before_macs,
                   "separable/layer_macs_after": after_macs, "separable/layer_macs_ratio": before_macs / after_macs,
                   "separable/init_rel_error": max(errors.values())}
        notes = [f"rewrote {len(chosen)} conv(s) {', '.join(chosen)}: {before_macs:,} -> {after_macs:,} MACs in those "
                 f"layers (x{before_macs / after_macs:.1f}); worst relative error of the initial factorisation "
                 f"{max(errors.values()):.2f} — fine-tune or distill next"]
        meta = {**ctx.input.meta, "separable_layers": chosen}
        return StageResult(Artifact.save_torch(model, ctx.workdir, meta), metrics, notes=notes)


def is_eligible(m: Any) -> bool:
    from torch import nn

    return isinstance(m, nn.Conv2d) and m.groups == 1 and max(m.kernel_size) > 1


def conv_macs(model: Any, input_shape: list[int]) -> dict[str, int]:
    """MACs of every Conv2d at batch 1 (textbook formula from the traced output shape)."""
    from torch import nn

    from edgebuild.evaluate import layer_macs

    return {name: macs for name, (m, macs) in layer_macs(model, input_shape).items() if isinstance(m, nn.Conv2d)}


def separable_block(conv: Any, batchnorm: bool, activation: str | None) -> tuple[Any, float]:
    """(depthwise -> [BN] -> [act] -> pointwise, relative error of the rank-1 factorisation)."""
    import torch
    from torch import nn

    c_in, c_out = conv.in_channels, conv.out_channels
    depthwise = nn.Conv2d(c_in, c_in, conv.kernel_size, conv.stride, conv.padding, conv.dilation, groups=c_in,
                          bias=False, padding_mode=conv.padding_mode)
    pointwise = nn.Conv2d(c_in, c_out, 1, bias=conv.bias is not None)
    w = conv.weight.detach().permute(1, 0, 2, 3).reshape(c_in, c_out, -1)  # [C_in, C_out, k*k]
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    with torch.no_grad():
        depthwise.weight.copy_(vh[:, 0, :].reshape(depthwise.weight.shape))
        pointwise.weight.copy_((u[:, :, 0] * s[:, :1]).t().reshape(pointwise.weight.shape))
        if conv.bias is not None:
            pointwise.bias.copy_(conv.bias.detach())
    rank1 = u[:, :, :1] * s[:, None, :1] * vh[:, :1, :]
    error = float(torch.linalg.norm(w - rank1) / torch.linalg.norm(w).clamp_min(1e-12))
    between = [nn.BatchNorm2d(c_in)] if batchnorm else []  # fresh BN: identity in eval mode
    between += {None: [], "relu": [nn.ReLU()], "relu6": [nn.ReLU6()]}[activation]
    return nn.Sequential(depthwise, *between, pointwise), error


def set_module(model: Any, name: str, new: Any) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
