"""What the torch.export-based runtimes (ExecuTorch, LiteRT) share: importing an optional package with a
clear error, naming the operator a converter rejected, PT2E calibration, and running a batch-1 program
on any batch. Light: torch and the runtimes are imported inside functions."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from edgebuild.errors import EdgebuildError

EXTRA = "runtimes"  # pyproject extra that installs ExecuTorch and LiteRT (dev includes it)
FLOAT_PRECISIONS = ("f32", "fp32", "auto")
# aten.cumprod.default, torch.ops.aten.median.dim, <EdgeOpOverload: aten.abs.default>
_ATEN_OP = re.compile(r"\baten\.([A-Za-z0-9_]+)(?:\.([A-Za-z0-9_]+))?")


def require(module: str, package: str, runtime: str) -> Any:
    """Import `module`; if it is missing, say which package (and edgebuild extra) provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EdgebuildError(f"runtime {runtime} needs the Python package {package}, which is not installed "
                             f"({e.msg if hasattr(e, 'msg') else e})",
                             f'pip install -e ".[{EXTRA}]" (or pip install {package})') from None


def check_precision(cfg: Any, runtime: str, allowed: tuple[str, ...] = FLOAT_PRECISIONS) -> None:
    if str(cfg.precision) not in allowed:
        raise EdgebuildError(f"target {cfg.name!r}: runtime {runtime} has no inference precision {cfg.precision!r}",
                             f"use target.precision= one of {', '.join(allowed)}; INT8 comes from a quantize stage"
                             + (", FP16 weights from an fp16 stage" if runtime == "litert" else ""))


def conversion_error(exc: BaseException, runtime: str, model: Any) -> EdgebuildError:
    """A converter's exception as a user error naming the operator (when the message has one) and runtime."""
    text = str(exc)
    match = _ATEN_OP.search(text)
    op = f"operator aten.{match.group(1)}" + (f".{match.group(2)}" if match.group(2) else "") if match else None
    first = text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
    what = (f"{runtime} cannot convert {op} of {type(model).__name__}" if op
            else f"{runtime} cannot convert {type(model).__name__}: {first}")
    return EdgebuildError(what, f"replace that operator in the model, or use a target whose runtime supports it "
                                f"(e.g. target=cpu, OpenVINO); converter said: {first}")


def example_input(meta: dict[str, Any]) -> Any:
    import torch

    return torch.zeros([1, *list(meta["input_shape"])[1:]])


def pt2e_calibrated(model: Any, quantizer: Any, calibration: np.ndarray, meta: dict[str, Any],
                    fold_quantize: bool = True) -> Any:
    """torchao PT2E: export, insert observers, run every calibration sample, convert to Q/DQ.
    fold_quantize=False keeps float weights behind quantize ops (litert-torch's converter needs that)."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    graph = torch.export.export(model.eval(), (example_input(meta),)).module()
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for x in calibration:  # the program is exported at batch 1
            prepared(torch.from_numpy(np.ascontiguousarray(x[None], dtype=np.float32)))
    return convert_pt2e(prepared, fold_quantize=fold_quantize)


def module_names(model: Any) -> list[str]:
    return [n for n, m in model.named_modules() if n and not list(m.children())]


def per_row(run: Callable[[np.ndarray], list[np.ndarray]], x: np.ndarray) -> list[np.ndarray]:
    """Programs are exported at batch 1 (static shapes): a larger batch runs row by row."""
    if len(x) == 1:
        return run(x)
    rows = [run(x[i:i + 1]) for i in range(len(x))]
    return [np.concatenate([r[k] for r in rows]) for k in range(len(rows[0]))]
