"""Model sources: a built-in CNN, any torchvision model by name, or any `_target_` class; weights
from a local file (loaded with weights_only=True) or, for users with a network, torchvision's."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from edgebuild.errors import EdgebuildError


def small_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> Any:
    """A small, deterministic CNN for digits-sized inputs (the default recipe's model)."""
    from torch import nn

    def block(i: int, o: int, stride: int) -> list:
        return [nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

    w = width
    return nn.Sequential(
        *block(in_channels, w, 1), *block(w, 2 * w, 2), *block(2 * w, 4 * w, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes),
    )


BUILTIN = {"cnn": small_cnn}
# task-specific model names -> "module.function" (imported when used)
# or a callable(cfg, dm, num_classes, in_channels, **kw)
EXTRA_BUILDERS: dict[str, Any] = {name: "edgebuild.detection.models.build" for name in
                                  ("ssd_small", "ssdlite320_mobilenet_v3_large", "ssd300_vgg16")}
EXTRA_BUILDERS["multihead_cnn"] = "edgebuild.tasks.multihead.build_model"  # one backbone, a head per task


def build_model(cfg: Any, dm: Any) -> Any:
    from edgebuild.config import instantiate, resolve_target

    num_classes = cfg.num_classes or dm.num_classes
    in_channels = cfg.in_channels or dm.input_shape[1]
    kwargs = dict(cfg.kwargs or {})
    if cfg._target_:
        fn = resolve_target(cfg._target_, "model._target_")
        accepted = _accepted(fn)
        scored = num_classes + getattr(dm, "background_classes", 0)  # torchvision detectors count the background
        extra = {k: v for k, v in (("num_classes", scored), ("in_channels", in_channels)) if k in accepted}
        model = instantiate({"_target_": cfg._target_, **extra, **kwargs})
    elif cfg.name in BUILTIN:
        model = BUILTIN[cfg.name](num_classes=num_classes, in_channels=in_channels, **kwargs)
    elif cfg.name in EXTRA_BUILDERS:
        builder = EXTRA_BUILDERS[cfg.name]
        builder = resolve_target(builder) if isinstance(builder, str) else builder
        model = builder(cfg, dm, num_classes=num_classes, in_channels=in_channels, **kwargs)
    else:
        model = _torchvision(cfg, num_classes, in_channels, kwargs)
    if cfg.bn_momentum is not None:
        set_bn_momentum(model, cfg.bn_momentum, cfg.name)
    if cfg.weights and Path(cfg.weights).expanduser().exists():
        load_weights(model, Path(cfg.weights).expanduser(), strict=cfg.strict_weights)
    elif cfg.weights and ("/" in cfg.weights or cfg.weights.endswith((".pt", ".pth", ".ckpt", ".safetensors"))):
        raise EdgebuildError(f"weights file {cfg.weights} does not exist",
                             "point model.weights to a local state_dict file")
    return model


def set_bn_momentum(model: Any, momentum: float, name: str) -> None:
    from torch import nn

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise EdgebuildError(f"model.bn_momentum={momentum} but model {name!r} has no BatchNorm layer",
                             "remove model.bn_momentum (it only sets BatchNorm running-statistics momentum)")
    for m in norms:
        m.momentum = momentum


def _torchvision(cfg: Any, num_classes: int, in_channels: int, kwargs: dict) -> Any:
    import torchvision
    from torch import nn

    available = torchvision.models.list_models()
    if cfg.name not in available:
        raise EdgebuildError(
            f"unknown model {cfg.name!r}",
            f"use a built-in ({', '.join(sorted(BUILTIN) + sorted(EXTRA_BUILDERS))}), a torchvision model name "
            "(e.g. mobilenet_v2, resnet18), or model._target_=package.Class",
        )
    named_weights = cfg.weights if cfg.weights and not Path(cfg.weights).expanduser().exists() else None
    if named_weights:  # torchvision weights by name: downloads, for users with a network
        model = torchvision.models.get_model(cfg.name, weights=named_weights, **kwargs)
        _replace_head(model, num_classes)
    else:
        model = torchvision.models.get_model(cfg.name, weights=None, num_classes=num_classes, **kwargs)
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and first.in_channels != in_channels:
        _replace_module(model, first, nn.Conv2d(in_channels, first.out_channels, first.kernel_size, first.stride,
                                                first.padding, bias=first.bias is not None))
    if cfg.small_input:  # 32x32-class inputs: keep resolution in the stem, as CIFAR variants do
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        first.stride = (1, 1)
        if isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
            model.maxpool = nn.Identity()
    return model


def _replace_head(model: Any, num_classes: int) -> None:
    from torch import nn

    last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    if last[1].out_features != num_classes:
        _replace_module(model, last[1], nn.Linear(last[1].in_features, num_classes))


def _replace_module(model: Any, old: Any, new: Any) -> None:
    for _, m in model.named_modules():
        for child_name, child in m.named_children():
            if child is old:
                setattr(m, child_name, new)
                return


def load_weights(model: Any, path: Path, strict: bool = True) -> None:
    """Load a user's state_dict (or Lightning checkpoint) with weights_only=True."""
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise EdgebuildError(f"cannot load weights from {path}: {str(e).splitlines()[0]}",
                             "give a state_dict saved with torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = {k.removeprefix("model."): v for k, v in state["state_dict"].items()}
    if not isinstance(state, dict):
        raise EdgebuildError(f"{path} does not hold a state_dict", "save with torch.save(model.state_dict(), path)")
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if strict and (mismatched or missing or unexpected):
        details = "; ".join(f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                            for label, keys in (("shape mismatch", mismatched), ("missing", missing),
                                                ("unexpected", unexpected)) if keys)
        raise EdgebuildError(f"weights in {path} do not fit model ({details})",
                             "check model.name/num_classes, or set model.strict_weights=false to load only the "
                             "matching layers (e.g. pretrained backbone with a new classifier head)")
    model.load_state_dict({k: v for k, v in state.items() if k in own and k not in mismatched}, strict=False)


def _accepted(fn: Any) -> set[str]:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return set()
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return set(params) | {"num_classes", "in_channels"}
    return set(params)
