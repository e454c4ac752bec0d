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


class CascadeOutputs(list):
    """The answering model's outputs, with what the cascade did for this frame."""

    escalated: bool = False
    confidence: float = 0.0  # the small model's top-1 softmax probability
    small_s: float = 0.0
    big_s: float = 0.0  # the big model's preprocessing + inference (0 when the small one answered)


class CascadeTally:
    """A cascade stream's measured escalation rate (of the frames inferred: reused ones ran no model) and where the
    time went: e2e latency of the frames the small model answered vs those the big one did. Bounded memory: counts,
    sums and two latency histograms (stats.Quantiles)."""

    def __init__(self, threshold: float):
        from edgebuild.stream.stats import Quantiles

        self.threshold = threshold
        self.inferred = self.up = 0
        self.small_ms = self.big_ms = 0.0
        self.e2e = {True: Quantiles(), False: Quantiles()}  # escalated or not

    def add(self, r: Any) -> None:
        if r.reused:
            return
        up = bool(r.result["escalated"])
        self.inferred += 1
        self.up += up
        self.small_ms += r.result["small_ms"]
        self.big_ms += r.result["big_ms"] if up else 0.0
        self.e2e[up].add((r.t_done - r.t_capture) * 1000.0)

    def metrics(self) -> dict[str, Any]:
        up, stay = self.e2e[True], self.e2e[False]
        return {"stream/cascade_threshold": self.threshold,
                "stream/cascade_escalated": self.up / self.inferred if self.inferred else 0.0,
                "stream/cascade_escalated_frames": self.up,
                "stream/cascade_small_ms": self.small_ms / self.inferred if self.inferred else float("nan"),
                "stream/cascade_big_ms": self.big_ms / self.up if self.up else float("nan"),
                "stream/cascade_e2e_p50_small_ms": stay.percentile(50),
                "stream/cascade_e2e_p90_small_ms": stay.percentile(90),
                "stream/cascade_e2e_p50_escalated_ms": up.percentile(50),
                "stream/cascade_e2e_p90_escalated_ms": up.percentile(90)}


class CascadeModel:
    """A cascade deployable (model.json `deploy_cascade`) in the stream: the small model on every frame, the big one
    when the small one's top-1 softmax confidence is below the threshold (edgebuild.stages.cascade's rule,
    `escalates`). The big model preprocesses the frame's pixels itself (its own input size and normalization), only
    on escalation, so a frame's inference time is small + (big's preprocess + inference when escalated). Synchronous
    only: the two models run in sequence on one frame."""

    is_detection = False
    async_capable = False

    def __init__(self, small: StreamModel, big: StreamModel, threshold: float):
        self.small, self.big, self.threshold = small, big, float(threshold)
        self.meta, self.session, self.task = small.meta, small.session, small.task
        self.channels, self.height, self.width = small.channels, small.height, small.width
        self.class_names, self.options = small.class_names, None
        self.load_ms = small.load_ms + big.load_ms
        self.describe = (f"cascade ({small.describe}, big model on escalation) at threshold {self.threshold:g}")

    @property
    def resized(self) -> tuple[int, int] | None:
        return self.small.resized

    def preprocess(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.small.preprocess(pixels), pixels

    def infer(self, x: tuple[np.ndarray, np.ndarray]) -> CascadeOutputs:
        from edgebuild.stages.cascade import escalates

        small_x, pixels = x
        t0 = time.perf_counter()
        outputs = self.small.infer(small_x)
        t1 = time.perf_counter()
        escalate, confidence = escalates(np.asarray(outputs[0])[:1], self.threshold)
        out = CascadeOutputs(outputs)
        if escalate[0]:
            out = CascadeOutputs(self.big.infer(self.big.preprocess(pixels)))
            out.big_s = time.perf_counter() - t1
        out.escalated, out.confidence, out.small_s = bool(escalate[0]), float(confidence[0]), t1 - t0
        return out

    def stream_tally(self) -> CascadeTally:
        """Counted as the frames are processed (pipeline.run): the escalation rate over the whole stream."""
        return CascadeTally(self.threshold)

    def stream_metrics(self, records: list[Any]) -> dict[str, Any]:
        """The same metrics from a list of records."""
        tally = self.stream_tally()
        for r in records:
            tally.add(r)
        return tally.metrics()

    def postprocess(self, outputs: CascadeOutputs, frame_size: tuple[int, int]) -> dict[str, Any]:
        result = self.small.postprocess(outputs, frame_size)  # softmax top-1 of the answering model's logits
        return {**result, "escalated": outputs.escalated, "small_confidence": outputs.confidence,
                "small_ms": outputs.small_s * 1000.0, "big_ms": outputs.big_s * 1000.0}


def cascade_models(artifact: Any, compile_: Any, describe: str, threshold: float | None = None) -> CascadeModel:
    """A cascade deployable (the small model's files, then the big one's as `big_*` beside them) as a CascadeModel;
    `compile_(artifact) -> session` compiles one model at batch 1 (with `session.load_ms`); `threshold` overrides
    the one the cascade stage chose."""
    from edgebuild.artifact import Artifact

    c = artifact.meta["deploy_cascade"]
    pre = c.get("big_preprocess") or {}
    big_files = [c["big_model"], *(f for f in artifact.files if f.startswith("big_") and f != c["big_model"])]
    small_files = [f for f in artifact.files if not f.startswith("big_")]
    meta = {k: v for k, v in artifact.meta.items() if k != "deploy_cascade"}
    big_meta = {**meta, "input_shape": list(c["big_input_shape"]), **{k: pre[k] for k in ("scale", "mean", "std")
                                                                         if pre.get(k) is not None}}
    models = []
    for role, files, m in (("small", small_files, meta), ("big", big_files, big_meta)):
        session = compile_(Artifact(artifact.kind, artifact.root, files, meta=m))
        models.append(StreamModel(m, session, session.load_ms, None, f"{role}: {describe}"))
    return CascadeModel(*models, c["threshold"] if threshold is None else threshold)


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


def from_deploy_dir(path: str | Path, cascade_threshold: float | None = None) -> tuple[Any, Any]:
    """(model compiled at batch 1, its Target) for a deploy/ folder (a cascade's: a CascadeModel, at
    `cascade_threshold` when given); bad folders are EdgebuildError (exit 2)."""
    from edgebuild.artifact import read_deploy_folder
    from edgebuild.targets import make_target

    root = Path(path).expanduser()
    if not root.is_dir():
        raise EdgebuildError(f"deploy folder {root} does not exist",
                             "give the deploy/ folder a build wrote (outputs/runs/DATE/TIME_RECIPE/deploy)")
    artifact = read_deploy_folder(root)
    spec = json.loads((root / "model.json").read_text())
    target = make_target(_target_cfg(spec))
    if spec.get("deploy_cascade"):
        artifact.meta["deploy_cascade"] = spec["deploy_cascade"]
        model = cascade_models(artifact, lambda a: target.runtime.load(a, target.device, 1),
                               f"{spec['format']} on {target.runtime.name} {target.device}", cascade_threshold)
        return model, target
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


def for_build(deployable: Any, ctx: Any) -> Any:
    """The build's final deployable compiled on its target (evaluate.load: the pipeline's own compile)."""
    from edgebuild.evaluate import load

    if deployable.meta.get("deploy_cascade"):
        return cascade_models(deployable, lambda a: load(a, ctx, 1),
                              f"{deployable.kind} on {ctx.target.runtime.name} {ctx.target.device}")
    session = load(deployable, ctx, 1)
    options = ctx.task.postprocess_options() if deployable.meta.get("task") == "detection" else None
    return StreamModel(deployable.meta, session, session.load_ms, options,
                       f"{deployable.kind} on {ctx.target.runtime.name} {ctx.target.device}",
                       ctx.target.runtime.supports(ASYNC))
