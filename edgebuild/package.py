"""The deploy/ folder: the final deployable's files plus model.json, runnable without edgebuild."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from edgebuild import __version__


def model_json(deployable: Any, metrics: dict[str, Any], target: Any, recipe: str, stage: str) -> dict[str, Any]:
    """What a user needs to feed the model: format and files, input, preprocessing, outputs, and what ran."""
    meta = deployable.meta
    return {
        "format": deployable.kind, "files": deployable.files, "input_name": "input",
        "input_shape": meta["input_shape"], "layout": meta.get("layout", "NCHW"),
        "preprocess": {"scale": meta.get("scale", 255.0), "mean": meta.get("mean"), "std": meta.get("std"),
                       "formula": "x = (pixels / scale - mean) / std, per channel"},
        "class_names": meta.get("class_names"), "task": meta.get("task"), "outputs": meta.get("outputs"),
        "postprocess": meta.get("postprocess"), "runtime": target.runtime.name,
        "precision": metrics.get("runtime/precision"),
        "target": target.describe(), "recipe": recipe, "stage": stage, "edgebuild_version": __version__,
        **{k: v for k, v in meta.items() if k.startswith("deploy_")},  # stage-specific (quantization, cascade...)
    }


def write(deployable: Any, metrics: dict[str, Any], out: Path, target: Any, recipe: str, stage: str) -> Path:
    """Replace `out` with the deployable's files and its model.json."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for f in deployable.files:
        shutil.copy2(deployable.root / f, out / f)
    spec = model_json(deployable, metrics, target, recipe, stage)
    extra = target.runtime.package(deployable, out, metrics)  # e.g. firmware sources for an MCU target
    if extra:
        spec["firmware"] = extra
    (out / "model.json").write_text(json.dumps(spec, indent=2, default=str))
    copy_runner(out, spec)
    return out


def copy_runner(out: Path, spec: dict[str, Any]) -> None:
    """deploy/stream.py, the standalone stream runner (runtime + numpy + PyAV, no edgebuild), and for a detector
    deploy/postprocess.py, its decode + NMS in plain numpy."""
    here = Path(__file__).parent
    shutil.copy2(here / "stream" / "runner.py", out / "stream.py")
    if spec.get("task") == "detection":
        shutil.copy2(here / "detection" / "postprocess.py", out / "postprocess.py")
