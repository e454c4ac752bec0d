"""decompose: feed the model frequency sub-bands instead of the image (input-data transformation).

A fixed 2x2 Haar wavelet split becomes the model's first layer: each input channel gives four
sub-images at half the resolution (LL: the low-pass band, LH / HL / HH: the high-pass details),
which together hold exactly the image's information (the split is orthonormal and invertible).
The stem convolution is rebuilt to read the 4 x C sub-bands at half resolution with half its
stride, so with a stride-1 stem every later feature map is half the size (about 1/4 of the MACs,
like `resolution` to half the size, but without discarding the high frequencies); its LL weights
start from the trained stem's, the detail bands' from zero, and the model is fine-tuned.

The transform is inside the deployable (a fixed stride-2 convolution), so the deployed artifact still
takes the raw image at the original size; model.json says so under `input_transform`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from edgebuild.artifact import Artifact
from edgebuild.config import bounded
from edgebuild.errors import EdgebuildError
from edgebuild.finetune import FitConfig, fit
from edgebuild.stage import Stage, StageResult

METHODS = ("haar",)


def _haar_class() -> type:
    global HaarSplit  # noqa: PLW0603 - a module-level name, so pickled models find the class
    if "HaarSplit" in globals():
        return globals()["HaarSplit"]
    import torch
    from torch import nn

    class _HaarSplit(nn.Module):
        """[N, C, H, W] -> [N, 4C, H/2, W/2]: per channel the LL, LH, HL, HH Haar sub-bands (orthonormal)."""

        def __init__(self, channels: int):
            super().__init__()
            ll = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
            lh = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
            hl = torch.tensor([[1.0, -1.0], [1.0, -1.0]])
            hh = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
            bank = torch.stack([ll, lh, hl, hh]) / 2.0  # [4, 2, 2]
            self.channels = channels
            self.register_buffer("weight", bank.repeat(channels, 1, 1).unsqueeze(1))  # [4C, 1, 2, 2]

        def forward(self, x: Any) -> Any:
            return nn.functional.conv2d(x, self.weight, stride=2, groups=self.channels)

    _HaarSplit.__name__ = _HaarSplit.__qualname__ = "HaarSplit"
    _HaarSplit.__module__ = __name__
    HaarSplit = _HaarSplit  # type: ignore[misc]
    return _HaarSplit


def __getattr__(name: str) -> Any:
    if name == "HaarSplit":
        return _haar_class()
    raise AttributeError(name)


@dataclass
class Decompose(FitConfig, Stage):
    kind: ClassVar[str] = "decompose"
    needs_float_input: ClassVar[bool] = True
    version: ClassVar[int] = 1
    uses: ClassVar[tuple[str, ...]] = ("data", "task", "trainer")
    tasks: ClassVar[tuple[str, ...]] = ("classification", "multihead")

    method: str = "haar"  # 2x2 Haar wavelet: LL + LH + HL + HH at half resolution
    epochs: int = bounded(5, ge=0)  # fine-tuning with the sub-band stem; 0 = none

    def check(self, cfg: Any) -> None:
        if self.method not in METHODS:
            raise EdgebuildError(f"decompose: unknown method {self.method!r}", f"use one of {list(METHODS)}")

    def run(self, ctx: Any) -> StageResult:
        from edgebuild.evaluate import count_macs
        from edgebuild.stages import weights

        model = weights.load_float_model(ctx, "decompose")
        shape = list(ctx.input.meta["input_shape"])
        adapted = decompose(model, shape)
        tuned, metrics = fit(adapted, ctx, self, name="decompose")
        macs_old, macs_new = count_macs(model, shape)[0], count_macs(tuned, shape)[0]
        metrics.update({"decompose/macs_ratio": macs_new / macs_old, "decompose/bands": 4 * shape[1],
                        "decompose/band_size": shape[2] // 2})
        notes = [f"Haar decomposition: the model reads {4 * shape[1]} sub-bands of {shape[2] // 2}x{shape[3] // 2} "
                 f"instead of the {shape[2]}x{shape[3]} image; MACs {macs_old:,} -> {macs_new:,} "
                 f"({macs_new / macs_old:.2f}x); the deployable still takes the raw image (the split is its first layer)"]
        meta = {**ctx.input.meta, "deploy_input_transform": {
            "kind": "haar2x2", "inside_model": True, "bands": ["LL", "LH", "HL", "HH"],
            "note": "applied by the model's first layer (fixed stride-2 convolution); feed the raw image as usual"}}
        return StageResult(Artifact.save_torch(tuned, ctx.workdir, meta), metrics, notes=notes)


def find_stem(model: Any, shape: list[int]) -> tuple[str, Any]:
    """The first conv the input reaches, checked to take the sub-bands; else the layer and why."""
    import torch
    from torch import nn

    seen: list[tuple[str, Any, Any]] = []
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.append((n, m, a[0])))
             for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros([1, *shape[1:]]))
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        raise EdgebuildError("decompose: the model has no convolution to read the sub-bands",
                             "use a convolutional model")
    name, conv, x = seen[0]
    why = None
    if not isinstance(conv, nn.Conv2d):
        why = f"it is a {type(conv).__name__}, not a Conv2d"
    elif list(x.shape[1:]) != list(shape[1:]):
        why = f"it does not read the raw input (its input is {list(x.shape)}, the image is {[1, *shape[1:]]})"
    elif conv.groups != 1:
        why = f"it is a grouped conv (groups={conv.groups})"
    elif conv.stride[0] != conv.stride[1] or conv.stride[0] not in (1, 2):
        why = f"its stride {tuple(conv.stride)} is not 1 or 2"
    elif shape[2] % 2 or shape[3] % 2:
        why = f"the input {shape[2]}x{shape[3]} is not even"
    if why:
        raise EdgebuildError(f"decompose: the stem layer {name!r} cannot take Haar sub-bands: {why}",
                             "use a model whose first layer is a plain Conv2d with stride 1 or 2 on an even-sized image")
    return name, conv


def decompose(model: Any, shape: list[int]) -> Any:
    """A copy of `model` with the Haar split in front and its stem conv rebuilt for 4C sub-bands at half size."""
    import copy

    import torch
    from torch import nn

    model = copy.deepcopy(model)
    name, conv = find_stem(model, shape)
    c = conv.in_channels
    stride = max(1, conv.stride[0] // 2)
    k = conv.kernel_size[0]
    new = nn.Conv2d(4 * c, conv.out_channels, conv.kernel_size, stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode)
    with torch.no_grad():
        new.weight.zero_()
        # LL = 2 x the 2x2 mean: a pixel of the half-size image; the trained filter over the half-size
        # image approximates the original, scaled so LL's doubling is undone
        new.weight[:, 0::4] = conv.weight / 2.0 if k > 1 else conv.weight / 2.0
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)
    return nn.Sequential(_haar_class()(c), model)
