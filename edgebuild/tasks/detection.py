"""Object detection (SSD family): raw box offsets + class logits + anchors out of the network, SSD's
matching loss in training, decode + NMS outside the network, COCO mAP by torchmetrics.

The deployable is the network only (it converts to ONNX / OpenVINO; a whole torchvision detector
does not); its postprocessing settings travel in model.json (`deploy_*` keys) with the numpy decode +
NMS in edgebuild/detection/postprocess.py, and its time is measured apart (`latency/postprocess_ms`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from edgebuild.detection.postprocess import BOX_CODER_WEIGHTS, postprocess
from edgebuild.errors import EdgebuildError


class Detection:
    name = "detection"
    primary_metric = "map/50_95"  # COCO mAP@[.5:.95], fraction 0..1; drops are reported in points (x100)
    drop_metric = "map/drop"
    monitor = "val/map"  # mAP@[.5:.95] on the val split: what training checkpoints on
    output_names = ["bbox_regression", "cls_logits", "anchors"]
    data_sources = ("shapes", "yolo", "coco", "voc")

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.image_size: tuple[int, int] | None = None  # the data's input size (boxes are clipped to it)

    def postprocess_options(self) -> dict[str, Any]:
        c = self.cfg
        if self.image_size is None:
            raise RuntimeError("Detection.datamodule() sets the input size; call it before decoding")
        return {"image_size": self.image_size, "box_coder_weights": BOX_CODER_WEIGHTS,
                "score_threshold": c.score_threshold, "nms_iou": c.nms_iou, "top_k": c.top_k,
                "detections_per_image": c.detections_per_image}

    def datamodule(self, data_cfg: Any, cache_dir: Path) -> Any:
        from edgebuild.detection.data import DetectionDataModule

        if data_cfg.name not in self.data_sources:
            raise EdgebuildError(f"data={data_cfg.name} is not detection data (no boxes)",
                                 f"use one of {', '.join(self.data_sources)}, or task=classification for class labels")
        self.image_size = (data_cfg.image_size, data_cfg.image_size)
        return DetectionDataModule(data_cfg, cache_dir)

    def prepare_model(self, model: Any, dm: Any) -> Any:
        """The model returning raw outputs (a torchvision SSD, e.g. from a `_target_`, is wrapped into
        backbone + head + fixed anchors), after checking they fit the data."""
        import torch

        from edgebuild.detection.models import as_raw_detector

        model = as_raw_detector(model, list(dm.input_shape))
        model.eval()
        with torch.no_grad():
            out = model(torch.zeros(dm.input_shape))
        shapes = [list(o.shape) for o in out] if isinstance(out, (tuple, list)) else None
        if not shapes or len(shapes) != 3 or any(len(s) != 3 for s in shapes) or shapes[0][2] != 4:
            got = f"a tensor of shape {list(out.shape)}" if isinstance(out, torch.Tensor) else \
                f"{type(out).__name__} {shapes or ''}"
            raise EdgebuildError(f"a detection model must return (bbox_regression [N,A,4], cls_logits "
                                 f"[N,A,1+classes], anchors [N,A,4]); this one returns {got}",
                                 "use a detector (model=ssd_small, ssdlite, ssd300_vgg16), or task=classification "
                                 "for a classifier")
        if shapes[1][2] != dm.num_classes + 1:
            raise EdgebuildError(f"the detector scores {shapes[1][2] - 1} classes (+ background), "
                                 f"the data has {dm.num_classes}",
                                 "set model.num_classes to the data's class count (or leave it unset)")
        return model

    def output_layers(self, model: Any) -> list[Any]:
        """The head's output convolutions: a channel pruner must keep them whole."""
        from edgebuild.detection.models import output_layers

        return output_layers(model)

    # ------------------------------------------------------------------------------ training
    def loss(self, outputs: Any, targets: list[dict[str, Any]]) -> Any:
        """torchvision's SSD loss (its own matcher, box coder and hard-negative mining, 3:1): smooth-L1
        on the matched anchors' offsets + cross-entropy over positives and the hardest negatives."""
        import torch
        from torchvision.models.detection import _utils as det_utils
        from torchvision.models.detection.ssd import SSD
        from torchvision.ops import box_iou

        bbox_regression, cls_logits, anchors = outputs
        matcher = det_utils.SSDMatcher(0.5)
        matched, shifted = [], []
        for t, a in zip(targets, anchors, strict=True):
            shifted.append({"boxes": t["boxes"], "labels": t["labels"] + 1})  # class 0 is the background
            matched.append(matcher(box_iou(t["boxes"], a)) if len(t["boxes"]) else
                           torch.full((a.shape[0],), -1, dtype=torch.int64))
        ssd = _SSDLoss(det_utils.BoxCoder(weights=BOX_CODER_WEIGHTS))
        losses = SSD.compute_loss(ssd, shifted, {"bbox_regression": bbox_regression, "cls_logits": cls_logits},
                                  list(anchors), matched)
        return losses["bbox_regression"] + losses["classification"]

    def logits(self, outputs: Any) -> Any:
        """The part of the outputs that distillation matches: the class logits per anchor."""
        return outputs[1].flatten(0, 1)

    def val_metric(self, num_classes: int) -> Any:
        return _ValMap(self)

    # ---------------------------------------------------------------------------- evaluation
    def evaluator(self, class_names: list[str]) -> DetectionEval:
        return DetectionEval(class_names, self)

    def deploy_meta(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "task": self.name,
            "outputs": {"bbox_regression": "[N, A, 4] box offsets per anchor (dx dy dw dh x box-coder weights)",
                        "cls_logits": "[N, A, 1 + classes] logits per anchor; column 0 is the background",
                        "anchors": "[N, A, 4] anchors (default boxes), x1 y1 x2 y2 in input pixels"},
            "postprocess": "per image: boxes = decode(bbox_regression, anchors, box-coder weights), clipped to the "
                           "image; "
                           "scores = softmax(cls_logits); per class keep scores > score_threshold, the top_k best; "
                           "class-wise NMS at nms_iou; keep detections_per_image. numpy code: "
                           "edgebuild/detection/postprocess.py (runs without edgebuild)",
            "deploy_box_coder_weights": list(BOX_CODER_WEIGHTS), "deploy_score_threshold": c.score_threshold,
            "deploy_nms_iou": c.nms_iou, "deploy_top_k": c.top_k, "deploy_detections_per_image": c.detections_per_image,
            "deploy_anchors": "network output 'anchors' (fixed for the input size)",
        }

    def runtime_metrics(self, session: Any, data: Any, eval_cfg: Any) -> dict[str, float]:
        """Decode + NMS timed apart from the network (the field's lesson: the bottleneck is often outside
        it), on the compiled batch-1 session's outputs for real held-out images."""
        x, _ = next(data.batches(eval_cfg.split, 16))
        outputs = [session.infer(x[i:i + 1]) for i in range(len(x))]
        options = self.postprocess_options()
        times = []
        for _ in range(3):
            for out in outputs:
                t0 = time.perf_counter_ns()
                postprocess(out[0][0], out[1][0], out[2][0], **options)
                times.append((time.perf_counter_ns() - t0) / 1e6)
        return {"latency/postprocess_ms": float(np.median(times))}


class _SSDLoss:
    """The attributes torchvision's SSD.compute_loss reads from its model."""

    def __init__(self, box_coder: Any):
        self.box_coder, self.neg_to_pos_ratio = box_coder, 3


class DetectionEval:
    """Accumulates raw outputs from any runtime, decodes them as a deployable's user would, and computes
    COCO mAP with torchmetrics' MeanAveragePrecision (pycocotools backend)."""

    def __init__(self, class_names: list[str] | None, task: Detection):
        self.class_names, self.task = class_names, task
        self.preds: list[dict[str, Any]] = []
        self.targets: list[dict[str, Any]] = []

    def update(self, outputs: list[Any], targets: Any) -> None:
        import torch

        reg, logits, anchors = (np.asarray(o, dtype=np.float32) for o in outputs)
        options = self.task.postprocess_options()
        for i, t in enumerate(targets):
            det = postprocess(reg[i], logits[i], anchors[i], **options)
            self.preds.append({k: torch.as_tensor(v) for k, v in det.items()})
            self.targets.append({"boxes": torch.as_tensor(np.asarray(t["boxes"], np.float32)).reshape(-1, 4),
                                 "labels": torch.as_tensor(np.asarray(t["labels"], np.int64))})

    def compute(self) -> tuple[dict[str, float], dict[str, Any]]:
        from torchmetrics.detection import MeanAveragePrecision

        per_class = self.class_names is not None
        m = MeanAveragePrecision(iou_type="bbox", class_metrics=per_class, backend="pycocotools")
        m.update(self.preds, self.targets)
        r = m.compute()
        metrics = {"map/50_95": float(r["map"]), "map/50": float(r["map_50"]), "map/75": float(r["map_75"]),
                   "map/recall_100": float(r["mar_100"]), "eval/samples": len(self.targets),
                   "eval/detections_per_image": float(np.mean([len(p["scores"]) for p in self.preds] or [0]))}
        tables: dict[str, Any] = {}
        if per_class:
            ap = r["map_per_class"].reshape(-1).tolist()
            classes = r["classes"].reshape(-1).tolist()
            tables["per_class"] = {self.class_names[int(c)]: {"ap_50_95": float(a)}
                                   for c, a in zip(classes, ap, strict=True)}
        return {k: max(v, 0.0) if k.startswith("map/") else v for k, v in metrics.items()}, tables


class _ValMap:
    """Training's validation metric (torchmetrics-like: update/compute/reset): mAP@[.5:.95] of the decoded
    outputs, the same decode + NMS as the deployable."""

    def __init__(self, task: Detection):
        self.task = task
        self.reset()

    def reset(self) -> None:
        self.eval = DetectionEval(None, self.task)

    def update(self, outputs: Any, targets: list[dict[str, Any]]) -> None:
        self.eval.update([o.detach().cpu().numpy() for o in outputs],
                         [{k: v.cpu().numpy() for k, v in t.items()} for t in targets])

    def compute(self) -> Any:
        import torch

        return torch.tensor(self.eval.compute()[0]["map/50_95"])
