"""The deployable as the stream runs it: preprocessing from model.json, one compiled batch-1 session of the target
runtime, and the task's own postprocessing.

`from_deploy_dir` reads a build's deploy/ folder (model.json + model files, checked like every user folder:
`artifact.read_deploy_folder`) and compiles it on the runtime and device model.json records; a build passes its
own deployable and session instead (`StreamModel(deployable.meta, session, ...)`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgebuild.errors import EdgebuildError
from edgebuild.targets.base import ASYNC


class StreamModel:
    def __init__(self, meta: dict[str, Any], session: Any, load_ms: float, postprocess_options: dict[str, Any] | None,
                 describe: str, async_capable: bool = False):
        self.meta, self.session, self.load_ms, self.describe = meta, session, load_ms, describe
        self.async_capable = async_capable  # the runtime offers asynchronous requests (targets.base.ASYNC)
        _, self.channels, self.height, self.width = meta["input_shape"]
        scale = float(meta.get("scale") or 255.0)
        mean = np.asarray(meta.get("mean") or [0.0], np.float32).reshape(-1, 1, 1)
        std = np.asarray(meta.get("std") or [1.0], np.float32).reshape(-1, 1, 1)
        # x = (pixels / scale - mean) / std  ==  pixels * a + b: one multiply-add per pixel
        self._a, self._b = (1.0 / (scale * std)).astype(np.float32), (-mean / std).astype(np.float32)
        self.task = meta.get("task") or "classification"
        self.options = postprocess_options
        self.class_names = meta.get("class_names")
        self.resized: tuple[int, int] | None = None  # (w, h) of the frames, when they differ from the input

    @property
    def is_detection(self) -> bool:
        return self.task == "detection"

    def preprocess(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 RGB [H, W, 3] -> float32 [1, C, h, w] as model.json says: resized (PIL bilinear) to the model's
        input when the frame differs, grey (ITU-R 601 weights, as edgebuild's data) for a 1-channel model."""
        h, w = pixels.shape[:2]
        if (h, w) != (self.height, self.width) or self.channels == 1:
            from PIL import Image

            img = Image.fromarray(pixels)
            if self.channels == 1:
                img = img.convert("L")
            if (h, w) != (self.height, self.width):
                self.resized = (w, h)
                img = img.resize((self.width, self.height), Image.BILINEAR)
            pixels = np.asarray(img).reshape(self.height, self.width, -1)
        chw = pixels.transpose(2, 0, 1).astype(np.float32)
        return (chw * self._a + self._b)[None]

    def infer(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.infer(x)

    def postprocess(self, outputs: list[np.ndarray], frame_size: tuple[int, int]) -> dict[str, Any]:
        """Detection: decode + NMS (edgebuild/detection/postprocess.py, what the deployable ships), boxes scaled to
        the frame's pixels. Classification: softmax, the top class and its probability."""
        if self.is_detection:
            from edgebuild.detection.postprocess import postprocess

            det = postprocess(outputs[0][0], outputs[1][0], outputs[2][0], **self.options)
            fw, fh = frame_size
            if (fw, fh) != (self.width, self.height):
                det["boxes"] = det["boxes"] * np.asarray([fw / self.width, fh / self.height] * 2, np.float32)
            return det
        z = np.asarray(outputs[0][0], np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        k = int(p.argmax())
        return {"label": k, "score": float(p[k])}


def _target_cfg(spec: dict[str, Any]) -> Any:
    """The target a deployable was built for: conf/target/NAME.yaml (its spec: power, peak rates) with model.json's
    runtime, device, precision hint and threads on top."""
    from omegaconf import OmegaConf

    from edgebuild.config import CONF_DIR, TargetConf

    recorded = spec.get("target") or {}
    cfg = OmegaConf.structured(TargetConf)
    name = recorded.get("target")
    base = CONF_DIR / "target" / f"{name}.yaml"
    if name and base.is_file():
        cfg = OmegaConf.merge(cfg, OmegaConf.load(base))
    over = {"runtime": spec.get("runtime") or recorded.get("runtime"), "device": recorded.get("device"),
            "precision": recorded.get("precision_hint"), "threads": recorded.get("threads")}
    return OmegaConf.merge(cfg, {k: v for k, v in over.items() if v is not None})


def from_deploy_dir(path: str | Path) -> tuple[StreamModel, Any]:
    """(model compiled at batch 1, its Target) for a deploy/ folder; bad folders are EdgebuildError (exit 2)."""
    from edgebuild.artifact import read_deploy_folder
    from edgebuild.targets import make_target

    root = Path(path).expanduser()
    if not root.is_dir():
        raise EdgebuildError(f"deploy folder {root} does not exist",
                             "give the deploy/ folder a build wrote (outputs/runs/DATE/TIME_RECIPE/deploy)")
    artifact = read_deploy_folder(root)
    spec = json.loads((root / "model.json").read_text())
    if spec.get("deploy_cascade"):
        raise EdgebuildError(f"deploy folder {root} holds a cascade; the stream runs single-model deployables",
                             "stream the cascade's small or big deploy folder")
    target = make_target(_target_cfg(spec))
    options = None
    if artifact.meta.get("task") == "detection":
        from edgebuild.detection.postprocess import options as pp_options

        try:
            options = pp_options(spec)
        except KeyError as e:
            raise EdgebuildError(f"deploy folder {root}: model.json of a detector has no {e.args[0]}",
                                 "give the deploy/ folder of an edgebuild detection build (it records decode + NMS "
                                 "settings as deploy_* keys)") from None
    t0 = time.perf_counter()
    session = target.runtime.load(artifact, target.device, 1)
    load_ms = (time.perf_counter() - t0) * 1000.0
    return StreamModel(artifact.meta, session, load_ms, options, f"{spec['format']} on {target.runtime.name} "
                       f"{target.device}", target.runtime.supports(ASYNC)), target


def for_build(deployable: Any, ctx: Any) -> StreamModel:
    """The build's final deployable compiled on its target (evaluate.load: the pipeline's own compile)."""
    from edgebuild.evaluate import load

    session = load(deployable, ctx, 1)
    options = ctx.task.postprocess_options() if deployable.meta.get("task") == "detection" else None
    return StreamModel(deployable.meta, session, session.load_ms, options,
                       f"{deployable.kind} on {ctx.target.runtime.name} {ctx.target.device}",
                       ctx.target.runtime.supports(ASYNC))
