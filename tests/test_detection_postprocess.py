"""The numpy SSD postprocess under ties (issue 14 §1), on hand-made inputs: no training, the same on any machine.

"Equals torchvision" means: the same greedy class-wise NMS outcome up to the order of equally-scored
candidates. torchvision leaves that order unspecified (torch.topk and the unstable torch.sort in its nms
kernel), so edgebuild fixes its own: among equal scores the lower anchor index comes first, and across classes
the lower class. tests/conftest.py:nms_violations checks "an outcome under some tie order"."""

import numpy as np
import pytest
import torch

from edgebuild.detection import postprocess as pp
from tests.conftest import nms_violations

SIZE = (100, 100)


def inputs(boxes, logits):
    """Raw outputs whose decode is exactly `boxes`: the boxes are the anchors, the offsets zero."""
    anchors = np.asarray(boxes, dtype=np.float32)
    return np.zeros_like(anchors), np.asarray(logits, dtype=np.float32), anchors


def run(boxes, logits, **kw):
    return pp.postprocess(*inputs(boxes, logits), image_size=SIZE, **kw)


def candidates(boxes, logits):
    return np.asarray(boxes, dtype=np.float64), pp.softmax(np.asarray(logits, dtype=np.float32))


def greedy_in_index_order(boxes, iou=0.45):
    """Reference: greedy NMS over equal scores, taking boxes in index order."""
    keep = []
    for i, b in enumerate(boxes):
        if all(_iou(b, boxes[k]) <= iou for k in keep):
            keep.append(i)
    return keep


def _iou(a, b):
    w, h = max(0, min(a[2], b[2]) - max(a[0], b[0])), max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


TIED = [[0.0, 3.0]] * 2  # one class, the same score for both anchors


def test_tied_overlapping_boxes_keep_the_lower_anchor_index():
    a, b = [10, 10, 50, 50], [12, 12, 52, 52]  # IoU 0.82
    assert run([a, b], TIED)["boxes"].tolist() == [a]
    assert run([b, a], TIED)["boxes"].tolist() == [b]  # the same boxes, the other index order


def test_many_tied_boxes_follow_index_order():
    """150 boxes on two score levels, interleaved: an unstable sort (numpy's default quicksort) would
    reorder each level and keep another subset."""
    rng = np.random.default_rng(0)
    boxes = [[x, y, x + 30, y + 30] for x, y in rng.integers(0, 60, size=(150, 2)).tolist()]
    logits = [[0.0, 2.0 if i % 3 else 1.0] for i in range(150)]
    det = run(boxes, logits)
    order = [i for i in range(150) if i % 3] + [i for i in range(150) if not i % 3]
    expected = [order[i] for i in greedy_in_index_order([boxes[i] for i in order])]
    assert len(expected) > 5
    assert det["boxes"].tolist() == [boxes[i] for i in expected]
    assert nms_violations(det, *candidates(boxes, logits)) == []


def test_top_k_and_detections_per_image_cut_ties_by_index():
    boxes = [[10 * i, 0, 10 * i + 8, 8] for i in range(6)]  # disjoint
    assert run(boxes, [[0.0, 1.0]] * 6, top_k=3)["boxes"].tolist() == boxes[:3]
    assert run(boxes, [[0.0, 1.0]] * 6, detections_per_image=4)["boxes"].tolist() == boxes[:4]


def test_classes_tied_on_score_come_in_class_order_and_do_not_suppress_each_other():
    box = [20, 20, 60, 60]
    det = run([box, box], [[0.0, 3.0, -9.0], [0.0, -9.0, 3.0]])
    assert det["labels"].tolist() == [0, 1] and det["boxes"].tolist() == [box, box]
    assert det["scores"][0] == det["scores"][1]


def test_saturated_softmax_ties_exactly():
    """Logits x4 saturate: different logits give the very same float32 score, hence real ties."""
    scores = pp.softmax(np.array([[0.0, 60.0], [0.0, 80.0]], dtype=np.float32))
    assert scores[0, 1] == scores[1, 1] == 1.0


def torchvision_postprocess(reg, logits, anchors, **kw):
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.ssd import SSD

    tv = SSD(torch.nn.Identity(), DefaultBoxGenerator([[2]]), SIZE, 4, head=torch.nn.Identity(),
             score_thresh=0.01, nms_thresh=0.45, detections_per_img=kw.get("detections_per_image", 100),
             topk_candidates=kw.get("top_k", 200))
    e = tv.postprocess_detections({"bbox_regression": torch.from_numpy(reg)[None], "cls_logits":
                                   torch.from_numpy(logits)[None]}, [torch.from_numpy(anchors)], [SIZE])[0]
    return {"boxes": e["boxes"].numpy(), "scores": e["scores"].numpy(), "labels": (e["labels"] - 1).numpy()}


def test_torchvision_and_edgebuild_are_both_nms_outcomes_on_tied_input():
    rng = np.random.default_rng(1)
    boxes = [[x, y, x + 25, y + 25] for x, y in rng.integers(0, 70, size=(300, 2)).tolist()]
    logits = np.repeat(np.array([[0.0, 4.0, 4.0]], dtype=np.float32), 300, axis=0)
    logits[::3, 2] = 1.0  # class 1 ties on 200 anchors, class 0 on all 300 (above top_k)
    raw = inputs(boxes, logits)
    for det in (pp.postprocess(*raw, image_size=SIZE), torchvision_postprocess(*raw)):
        assert nms_violations(det, *candidates(boxes, logits)) == []


def test_edgebuild_equals_torchvision_exactly_without_ties():
    rng = np.random.default_rng(2)
    anchors = np.concatenate([rng.uniform(0, 60, (80, 2)), np.zeros((80, 2))], axis=1).astype(np.float32)
    anchors[:, 2:] = anchors[:, :2] + rng.uniform(10, 40, (80, 2))
    reg = rng.normal(0, 1, (80, 4)).astype(np.float32)
    logits = rng.normal(0, 2, (80, 4)).astype(np.float32)
    got, expected = pp.postprocess(reg, logits, anchors, image_size=SIZE), torchvision_postprocess(reg, logits, anchors)
    assert got["labels"].tolist() == expected["labels"].tolist() and len(got["labels"]) > 10
    np.testing.assert_allclose(got["scores"], expected["scores"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["boxes"], expected["boxes"], rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------------ the comparison still catches real errors
BOXES = [[10, 10, 50, 50], [12, 12, 52, 52], [70, 70, 95, 95], [60, 10, 90, 40]]
LOGITS = [[0.0, 3.0, -5.0], [0.0, 3.0, -5.0], [0.0, 2.0, -5.0], [0.0, 1.0, -5.0]]  # class 1: below threshold


def good():
    return run(BOXES, LOGITS)


def test_the_other_tied_box_is_accepted():
    det = good()
    assert det["boxes"][0].tolist() == BOXES[0]
    det["boxes"][0] = BOXES[1]  # what another tie order keeps
    assert nms_violations(det, *candidates(BOXES, LOGITS)) == []


@pytest.mark.parametrize("damage, message", [
    (lambda d: d["boxes"].__setitem__((1, 0), d["boxes"][1, 0] + 1.6), "is no candidate"),  # a box moved 1.6 px
    (lambda d: d["scores"].__setitem__(1, d["scores"][1] * 0.99), "is no candidate"),  # a wrong score
    (lambda d: d["labels"].__setitem__(1, 1), "is no candidate"),  # a wrong label
    (lambda d: {k: v[[0, 2]] for k, v in d.items()}, "was dropped"),  # a detection missing
    (lambda d: {"boxes": np.concatenate([d["boxes"][:1], [BOXES[1]], d["boxes"][1:]]),
                "scores": np.concatenate([d["scores"][:1], d["scores"][:1], d["scores"][1:]]),
                "labels": np.concatenate([d["labels"][:1], d["labels"][:1], d["labels"][1:]])}, "overlap above"),
])
def test_a_really_wrong_detection_fails(damage, message):
    det = good()
    assert nms_violations(det, *candidates(BOXES, LOGITS)) == []
    out = damage(det)
    det = out if isinstance(out, dict) else det
    problems = nms_violations(det, *candidates(BOXES, LOGITS))
    assert any(message in p for p in problems), problems
