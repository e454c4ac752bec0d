"""Profiling a deployable (opt-in: `eval.profile.enabled=true`): where inference time goes per layer
(OpenVINO performance counters), and preprocessing (decode + resize + normalize of images) against
inference — on small models the bottleneck is often not the model.

Written per stage as profile/<stage>.json, recorded on the stage's MLflow run (artifact `profile`)
and shown by `python -m edgebuild.report`.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np


def layer_times(deployable: Any, ctx: Any, iterations: int = 50) -> list[dict[str, Any]]:
    """Per executed layer: mean time per inference (ms), layer type, kernel and precision; slowest first."""
    from edgebuild.targets import base

    runtime = ctx.target.runtime
    if not runtime.supports(base.PROFILE):
        return []
    return runtime.profile(deployable, ctx.target.device, iterations)


def _sample_images(data: Any, count: int) -> tuple[list[bytes], str]:
    """Encoded images to time decoding on: the original files of an image folder, otherwise held-out
    images encoded as JPEG at a camera-like 224x224 (stated in the result)."""
    from PIL import Image

    cfg = data.cfg
    if cfg.name == "imagefolder" and cfg.root:
        from edgebuild.data import IMAGE_SUFFIXES, _folder_entries

        entries, _ = _folder_entries(Path(cfg.root).expanduser())
        files = [read() for rel, _, read in entries if Path(rel).suffix.lower() in IMAGE_SUFFIXES][:count]
        return files, f"{len(files)} original image files of {cfg.root}"
    images = data.splits["test"].images[:count]
    encoded = []
    for img in images:
        pil = Image.fromarray(img.transpose(1, 2, 0).squeeze()).convert("RGB").resize((224, 224))
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=90)
        encoded.append(buf.getvalue())
    return encoded, f"{len(encoded)} held-out images re-encoded as 224x224 JPEG (no image files in data={cfg.name})"


def preprocessing(deployable: Any, ctx: Any, count: int) -> dict[str, Any]:
    """Mean ms per image for decode, resize and normalize (PIL + numpy, what a deployment script using
    model.json does), and inference at batch 1 on the compiled deployable timed exactly as
    `latency/p50_ms` is (evaluate.latency: warmed up, bound input, median), so the two agree. Timing each
    image's single infer() instead measured cold first calls and per-call input/output copies (x5 on
    a small model)."""
    from PIL import Image

    from edgebuild.evaluate import latency, load

    data, meta = ctx.data, deployable.meta
    files, source = _sample_images(data, count)
    _, channels, height, width = meta["input_shape"]
    mean = np.asarray(meta["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(meta["std"], np.float32).reshape(1, -1, 1, 1)
    spent = {"decode": 0.0, "resize": 0.0, "normalize": 0.0}
    for raw in files:
        t0 = time.perf_counter()
        with Image.open(io.BytesIO(raw)) as im:
            img = im.convert("L" if channels == 1 else "RGB")
        t1 = time.perf_counter()
        img = img.resize((width, height), Image.BILINEAR)
        t2 = time.perf_counter()
        arr = np.asarray(img, np.float32).reshape(height, width, -1).transpose(2, 0, 1)[None]
        ((arr / float(meta.get("scale", 255.0)) - mean) / std).astype(np.float32)
        t3 = time.perf_counter()
        for k, a, b in (("decode", t0, t1), ("resize", t1, t2), ("normalize", t2, t3)):
            spent[k] += b - a
    n = max(1, len(files))
    ms = {k: v * 1000.0 / n for k, v in spent.items()}
    ms["inference"] = latency(load(deployable, ctx, 1), meta["input_shape"], ctx.cfg.eval.latency)["latency/p50_ms"]
    total = sum(ms.values())
    pre = ms["decode"] + ms["resize"] + ms["normalize"]
    return {"source": source, "images": len(files), "ms": ms, "preprocess_ms": pre, "inference_ms": ms["inference"],
            "preprocess_share": pre / total if total else 0.0}


def run(deployable: Any, ctx: Any, path: Path) -> tuple[Path, dict[str, float]]:
    """Profile one deployable; write the JSON table to `path`; return it and summary metrics."""
    cfg = ctx.cfg.eval.profile
    layers = layer_times(deployable, ctx)
    pre = preprocessing(deployable, ctx, int(cfg.images))
    result = {"layers": layers, "preprocessing": pre, "device": ctx.target.device}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    metrics = {"profile/preprocess_ms": pre["preprocess_ms"], "profile/inference_ms": pre["inference_ms"],
               "profile/preprocess_share": pre["preprocess_share"]}
    if layers:
        metrics["profile/layers_ms"] = sum(r["ms"] for r in layers)
    return path, metrics


def maybe_run(deployable: Any, ctx: Any, path: Path) -> tuple[Path | None, dict[str, float]]:
    """`run` when `eval.profile.enabled` (opt-in), else nothing."""
    if not ctx.cfg.eval.profile.enabled:
        return None, {}
    return run(deployable, ctx, path)


def load(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def table(profile: dict[str, Any], top: int = 10) -> tuple[list[str], list[list[str]]]:
    """Top-N layers by time, plus preprocessing vs inference rows."""
    layers = profile.get("layers", [])
    total = sum(r["ms"] for r in layers) or 1.0
    rows = [[r["name"][:60], r["type"], r["precision"], r["kernel"], f"{r['ms']:.4f}", f"{r['ms'] / total:.0%}"]
            for r in layers[:top]]
    pre = profile.get("preprocessing")
    if pre:  # what one image costs from file to output
        whole = pre["preprocess_ms"] + pre["inference_ms"] or 1.0
        rows += [[f"per image: {k}", "preprocess" if k != "inference" else "model", "", "", f"{v:.4f}",
                  f"{v / whole:.0%} of image→output"] for k, v in pre["ms"].items()]
    return ["layer", "type", "precision", "kernel", "ms", "share"], rows
