"""The stream's accuracy, measured against the generated video's exact boxes: COCO mAP (torchmetrics with the
pycocotools backend, as the build's detection evaluator) over the processed frames the stream kept (the last
`keep_records`; `stream/quality_frames` says how many), each scored with the result the stream produced for it (a
reused result included: that is frame reuse's accuracy cost). A classifier streamed over labelled frames (a build's
held-out images) gets its top-1 accuracy the same way."""

from __future__ import annotations

from typing import Any

import numpy as np


def detection_map(preds: list[dict[str, np.ndarray]], truths: list[dict[str, np.ndarray]]) -> dict[str, float]:
    import torch
    from torchmetrics.detection import MeanAveragePrecision

    m = MeanAveragePrecision(iou_type="bbox", backend="pycocotools")
    m.update([{"boxes": torch.as_tensor(np.asarray(p["boxes"], np.float32)).reshape(-1, 4),
               "scores": torch.as_tensor(np.asarray(p["scores"], np.float32)),
               "labels": torch.as_tensor(np.asarray(p["labels"], np.int64))} for p in preds],
             [{"boxes": torch.as_tensor(t["boxes"]).reshape(-1, 4), "labels": torch.as_tensor(t["labels"])}
              for t in truths])
    r = m.compute()
    return {"map/50_95": max(float(r["map"]), 0.0), "map/50": max(float(r["map_50"]), 0.0),
            "map/recall_100": max(float(r["mar_100"]), 0.0)}


def stream_quality(result: Any, model: Any, source: Any) -> dict[str, float]:
    """stream/map_50, stream/map_50_95, stream/recall_100 of the processed frames. With frame reuse, also the mAP had
    every processed frame been inferred (the skipped frames are drawn again, bit for bit, and inferred offline,
    untimed) and the difference in points: `stream/reuse_map_cost` (x100 of mAP@[.5:.95], positive = worse)."""
    records = [r for r in result.records if r.truth is not None]
    if records and "label" in records[0].truth:  # a classifier on labelled frames: top-1 accuracy
        return {"stream/acc_top1": float(np.mean([r.result["label"] == int(r.truth["label"]) for r in records])),
                "stream/quality_frames": len(records)}
    if not model.is_detection or not records:
        return {}
    q = detection_map([r.result for r in records], [r.truth for r in records])
    out = {"stream/map_50_95": q["map/50_95"], "stream/map_50": q["map/50"], "stream/recall_100": q["map/recall_100"],
           "stream/quality_frames": len(records)}
    reused = [r for r in records if r.reused]
    if reused and hasattr(source, "frame"):
        fresh = []
        for r in records:
            if r.reused:
                pixels = source.frame(r.index).pixels
                fresh.append(model.postprocess(model.infer(model.preprocess(pixels)), r.size))
            else:
                fresh.append(r.result)
        every = detection_map(fresh, [r.truth for r in records])
        out["stream/map_50_95_every_frame"] = every["map/50_95"]
        out["stream/map_50_every_frame"] = every["map/50"]
        out["stream/reuse_map_cost"] = (every["map/50_95"] - q["map/50_95"]) * 100.0
    return out
