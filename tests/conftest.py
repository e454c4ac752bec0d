import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
from edgebuild.openmp import limit_spinning  # noqa: E402

limit_spinning()  # before torch loads
ROOT = Path(__file__).resolve().parent.parent

# a small, fast build: the default recipe on generated data with a narrow CNN
FAST = ["data=synthetic", "model.kwargs.width=8", "stages.train.epochs=2"]


@pytest.fixture
def fast(tmp_path):
    from edgebuild import testing

    return testing.shrink(tmp_path) + FAST


def run_cli(args, cwd, timeout=600, env=None):
    """python -m edgebuild ARGS in `cwd` (outputs land there); returns CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgebuild", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


# ------------------------------------------------------------------ floating point across machines and runtimes
# Two runtimes (torch and OpenVINO), two batch sizes or two CPUs (AVX2 / AVX-512 kernels) compute the same
# network to within rounding, not bit for bit. Where a test compares them, the comparison accepts a difference
# only where rounding can explain it, and still fails on anything larger.

def ambiguous_argmax(logits, tol=1e-3):
    """Mask of the rows whose top-2 logits are within tol (relative to the logits' scale, at least 1): rows
    whose argmax another runtime's rounding may flip."""
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)
    top2 = np.sort(logits, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) <= tol * np.maximum(1.0, np.abs(top2[:, 1]))


def assert_accuracy_matches(logits, labels, reported, tol=1e-3):
    """The accuracy of `logits` equals `reported` (measured elsewhere, e.g. by another runtime) up to the rows
    whose argmax is ambiguous within tol: each of those may count either way, no other row may differ."""
    import numpy as np

    logits, labels = np.asarray(logits), np.asarray(labels)
    n = len(labels)
    correct = int((logits.argmax(1) == labels).sum())
    slack = int(ambiguous_argmax(logits, tol).sum())
    assert abs(correct - reported * n) <= slack + 1e-6, \
        f"accuracy {correct}/{n} here vs {reported * n:.1f}/{n} reported; only {slack} rows are within {tol} of a tie"


def _iou(box, boxes):
    import numpy as np

    w = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = w * h
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def nms_violations(det, boxes, scores, *, score_threshold=0.01, nms_iou=0.45, top_k=200, detections_per_image=100,
                   rtol=1e-5, atol=1e-6, box_atol=1e-3, iou_slack=1e-4):
    """What makes `det` ({"boxes", "scores", "labels"}, labels 0-based) NOT an outcome of SSD postprocessing
    (per class: score > threshold, top-k, greedy NMS; then the best detections_per_image) over the candidates
    `boxes` [A,4] (decoded, clipped) and `scores` [A,1+classes] (softmax, column 0 background), under SOME order
    of equal scores ([] when it is one). Scores within rtol/atol count as equal: torchvision's own tie order is
    unspecified (torch.topk and torch.sort are not stable) and two softmax implementations differ in the last bit.

    Greedy NMS over an order gives K exactly when no two kept boxes overlap and every dropped candidate overlaps a
    kept one that comes before it; with ties free to reorder (kept ones first), that is: every dropped candidate
    overlaps a kept box of at least its score, or ranks below the cut of detections_per_image."""
    import numpy as np

    boxes, scores = np.asarray(boxes, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    d_boxes = np.asarray(det["boxes"], dtype=np.float64).reshape(-1, 4)
    d_scores, d_labels = np.asarray(det["scores"], dtype=np.float64), np.asarray(det["labels"])
    problems = []

    def tol(s):
        return atol + rtol * abs(s)

    if len(d_scores) > detections_per_image:
        problems.append(f"{len(d_scores)} detections, more than {detections_per_image}")
    if np.any(np.diff(d_scores) > tol(d_scores.max(initial=0))):
        problems.append("detections are not in decreasing order of score")
    bad = [int(i) for i in np.flatnonzero((d_labels < 0) | (d_labels >= scores.shape[1] - 1))]
    problems += [f"detection {i} (label {d_labels[i]}) is no candidate: no such class" for i in bad]
    cut = d_scores.min() if len(d_scores) == detections_per_image else -np.inf
    for c in range(1, scores.shape[1]):
        s = scores[:, c]
        pool = np.flatnonzero(s > score_threshold)
        ranked = np.sort(s[pool])[::-1]
        kth = ranked[top_k - 1] if len(pool) > top_k else -np.inf
        allowed = pool[s[pool] >= kth - tol(kth)] if len(pool) > top_k else pool
        required = pool[s[pool] > kth + tol(kth)] if len(pool) > top_k else pool
        kept = []
        for i in np.flatnonzero(d_labels == c - 1):
            match = [a for a in allowed if a not in kept and abs(s[a] - d_scores[i]) <= tol(d_scores[i])
                     and np.allclose(boxes[a], d_boxes[i], rtol=0, atol=box_atol)]
            if not match:
                problems.append(f"detection {i} (label {c - 1}, score {d_scores[i]:.6g}, box "
                                f"{np.round(d_boxes[i], 2).tolist()}) is no candidate of that label and score")
            else:
                kept.append(match[0])
        kept = np.asarray(kept, dtype=np.int64)
        for j, k in enumerate(kept):
            over = kept[j + 1:][_iou(boxes[k], boxes[kept[j + 1:]]) > nms_iou + iou_slack]
            if len(over):
                problems.append(f"label {c - 1}: kept boxes {k} and {over.tolist()} overlap above IoU {nms_iou}")
        for a in required:
            if a in kept or s[a] <= cut + tol(cut if np.isfinite(cut) else 0):
                continue
            suppressors = kept[(_iou(boxes[a], boxes[kept]) > nms_iou - iou_slack) & (s[kept] >= s[a] - tol(s[a]))] \
                if len(kept) else kept
            if not len(suppressors):
                problems.append(f"label {c - 1}: candidate {a} (score {s[a]:.6g}, box {np.round(boxes[a], 2).tolist()})"
                                " was dropped but no kept box of at least its score overlaps it")
    return problems
