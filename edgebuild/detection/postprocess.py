"""Decode + NMS for an SSD deployable, in plain numpy: copy this file to run a deployable without edgebuild.

A detection deployable's network returns raw outputs, one row per anchor (A anchors):
  bbox_regression [N, A, 4]          box offsets, encoded against the anchors with the box-coder weights
  cls_logits      [N, A, 1 + classes] column 0 is the background
  anchors         [N, A, 4]          the anchors (default boxes), x1 y1 x2 y2 in input pixels
and its model.json holds the postprocessing settings (keys `deploy_*`). For one image:

    spec = json.load(open("deploy/model.json"))
    reg, logits, anchors = (out[0] for out in compiled(x))       # x preprocessed as model.json says
    det = postprocess(reg, logits, anchors, **options(spec))
    det["boxes"], det["scores"], det["labels"]                     # labels index spec["class_names"]

Step for step this is torchvision's `SSD.postprocess_detections` (edgebuild's tests check that both
give the same detections on the same raw outputs): decode, clip to the image, softmax, per class keep
scores above the threshold and the top-k, class-wise NMS, keep the best `detections_per_image`.

Ties. Scores tie often: a confident model's softmax saturates (float32 1.0 for every anchor on an object), and
then which of the overlapping equal-score anchors NMS keeps decides the box. torchvision leaves that order
unspecified (`Tensor.topk` and the unstable `scores.sort` in its nms kernel; it differs with the data and the
sort's path), so "the same as torchvision" means the same greedy NMS outcome up to the order of equal scores.
This file fixes its own order, on every machine: among equal scores the lower anchor index comes first (in the
top-k cut, in NMS and in the `detections_per_image` cut), and across classes the lower class.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # torchvision's SSD box coder
_DW_CLIP = math.log(1000.0 / 16)  # torchvision's limit on exp() of the size offsets


def options(spec: dict[str, Any]) -> dict[str, Any]:
    """postprocess() keyword arguments from a deployable's model.json."""
    return {"image_size": tuple(spec["input_shape"][2:]), "box_coder_weights": spec["deploy_box_coder_weights"],
            "score_threshold": spec["deploy_score_threshold"], "nms_iou": spec["deploy_nms_iou"],
            "top_k": spec["deploy_top_k"], "detections_per_image": spec["deploy_detections_per_image"]}


def decode(rel_codes: np.ndarray, anchors: np.ndarray, weights: tuple = BOX_CODER_WEIGHTS) -> np.ndarray:
    """Box offsets [A,4] against anchors [A,4] (x1 y1 x2 y2) -> boxes [A,4] (x1 y1 x2 y2)."""
    widths, heights = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ctr_x, ctr_y = anchors[:, 0] + 0.5 * widths, anchors[:, 1] + 0.5 * heights
    wx, wy, ww, wh = (np.float32(w) for w in weights)
    dx, dy = rel_codes[:, 0] / wx, rel_codes[:, 1] / wy
    dw = np.minimum(rel_codes[:, 2] / ww, _DW_CLIP)
    dh = np.minimum(rel_codes[:, 3] / wh, _DW_CLIP)
    cx, cy = dx * widths + ctr_x, dy * heights + ctr_y
    half_w, half_h = np.float32(0.5) * np.exp(dw) * widths, np.float32(0.5) * np.exp(dh) * heights
    return np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS: indices of the kept boxes, highest score first (a box overlapping a kept one by
    IoU > iou_threshold is dropped), as torchvision.ops.nms; equal scores in index order (stable sort)."""
    order = np.argsort(-scores, kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.clip(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]), 0, None)
        h = np.clip(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]), 0, None)
        inter = w * h
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[~(iou > iou_threshold)]
    return np.asarray(keep, dtype=np.int64)


def postprocess(bbox_regression: np.ndarray, cls_logits: np.ndarray, anchors: np.ndarray, *,
                image_size: tuple[int, int], box_coder_weights: tuple = BOX_CODER_WEIGHTS,
                score_threshold: float = 0.01, nms_iou: float = 0.45, top_k: int = 200,
                detections_per_image: int = 100) -> dict[str, np.ndarray]:
    """Raw outputs of ONE image ([A,4], [A,1+classes], [A,4]) -> {"boxes" [D,4] x1 y1 x2 y2 in input
    pixels, "scores" [D], "labels" [D] (0-based class index; the background is not a class)}."""
    height, width = image_size
    boxes = decode(bbox_regression, anchors, tuple(box_coder_weights))
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    scores = softmax(cls_logits)
    kept_boxes, kept_scores, kept_labels = [], [], []
    for label in range(1, scores.shape[1]):
        idx = np.flatnonzero(scores[:, label] > score_threshold)
        idx = idx[np.argsort(-scores[idx, label], kind="stable")[:top_k]]
        kept_boxes.append(boxes[idx])
        kept_scores.append(scores[idx, label])
        kept_labels.append(np.full(len(idx), label - 1, dtype=np.int64))
    boxes, scores, labels = np.concatenate(kept_boxes), np.concatenate(kept_scores), np.concatenate(kept_labels)
    keep = np.concatenate([np.flatnonzero(labels == c)[nms(boxes[labels == c], scores[labels == c], nms_iou)]
                           for c in np.unique(labels)]) if len(labels) else np.zeros(0, dtype=np.int64)
    keep = keep[np.argsort(-scores[keep], kind="stable")][:detections_per_image]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
