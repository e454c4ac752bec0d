"""Detection end to end: a shrunk ssd_int8 build (mAP by the deployed artifact = the torch model's; the
deployable runs without edgebuild), decode + NMS = torchvision's own postprocessing, task mismatches."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import openvino as ov
import pytest
import torch

from edgebuild import testing
from edgebuild.detection import postprocess as pp
from edgebuild.errors import EdgebuildError
from edgebuild.stage import Stage
from edgebuild.tasks.detection import Detection, DetectionEval
from tests.conftest import run_cli

SMALL = ["data.num_samples=300", "data.image_size=96", "model.kwargs.width=8", "stages.train.epochs=24",
         "stages.train.optimizer.lr=0.01", "data.batch_size=16", "budget.min_map=null", "budget.max_map_drop=null"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("det")
    overrides = testing.shrink(tmp) + SMALL
    return tmp, overrides, testing.build(overrides, tmp, recipe="ssd_int8")


@pytest.fixture(scope="module")
def pruned(built):
    """ssd_prune_int8 on the same cache: the trained model is reused, pruning + 1 epoch of fine-tuning + INT8."""
    tmp, overrides, _ = built
    return testing.build(overrides + ["stages.prune.epochs=1"], tmp, recipe="ssd_prune_int8", run_name="pruned")


def task_and_data(tmp, overrides):
    cfg = testing.compose(overrides, recipe="ssd_int8")
    task = Detection(cfg.task)
    return task, task.datamodule(cfg.data, Path(cfg.cache.dir))


def stage(summary, name):
    return next(s for s in summary["stages"] if s["name"] == name)


def test_every_detection_stage_reports_map_and_postprocess_time(built):
    _, _, s = built
    for st in s["stages"]:
        m = st["metrics"]
        for key in ("map/50", "map/50_95", "map/drop", "latency/p50_ms", "latency/postprocess_ms", "macs"):
            assert key in m, (st["name"], key)
    train = stage(s, "train")["metrics"]
    assert train["map/50"] > 0.2  # it learned: a broken loss, decode or box format stays near 0


def test_int8_stage_runs_int8_kernels_and_keeps_map(built):
    _, _, s = built
    fp32, int8 = stage(s, "train")["metrics"], stage(s, "quantize")["metrics"]
    assert fp32["int8/ops_fraction"] == 0 and int8["int8/ops_fraction"] > 0.9
    assert int8["size/bytes"] < fp32["size/bytes"] / 2.5
    assert abs(int8["map/drop"]) < 5  # points of mAP@[.5:.95]; the tiny model is far from converged


def test_prune_int8_chain_removes_channels_but_not_the_head_outputs(built, pruned):
    _, _, s = built
    train, prune = stage(pruned, "train"), stage(pruned, "prune")
    # the recipe: 25 % of the channels in blocks of 8; at width 8 the 8- and 16-channel layers stay whole
    assert train["cache_hit"] and prune["metrics"]["macs"] < 0.8 * train["metrics"]["macs"]
    assert stage(pruned, "quantize")["metrics"]["int8/ops_fraction"] > 0.9
    model = torch.load(Path(prune["artifact"]) / "model.pt", weights_only=False)
    head = model.head
    assert [m.out_channels for m in head.classification_head.module_list] == [4 * a for a in (4, 6, 6, 4)]
    assert [m.out_channels for m in head.regression_head.module_list] == [4 * a for a in (4, 6, 6, 4)]
    original = torch.load(Path(train["artifact"]) / "model.pt", weights_only=False)

    def widths(m):
        return [c.out_channels for c in m.backbone.modules() if isinstance(c, torch.nn.Conv2d)]

    assert sum(widths(model)) < sum(widths(original))  # the backbone did lose channels
    assert all(w % 8 == 0 for w in widths(model))  # the recipe's round_to: 8
    assert prune["metrics"]["map/50"] > 0.1


def test_deployed_map_equals_the_torch_models(built):
    tmp, overrides, s = built
    task, dm = task_and_data(tmp, overrides)
    model = torch.load(Path(stage(s, "train")["artifact"]) / "model.pt", weights_only=False).eval()
    ev = DetectionEval(dm.class_names, task)
    with torch.no_grad():
        for x, y in dm.batches("test", 32):
            ev.update([o.numpy() for o in model(torch.from_numpy(x))], y)
    torch_map = ev.compute()[0]["map/50_95"]
    assert torch_map == pytest.approx(stage(s, "train")["metrics"]["map/50_95"], abs=0.01)


def is_nms_outcome(det, reg, logits, anchors, spec):
    """det is what SSD postprocessing may give from one image's raw outputs, under some order of scores equal
    within rounding (tests/conftest.py nms_violations over the decoded, clipped candidates)."""
    from tests.conftest import nms_violations

    h, w = spec["input_shape"][2:]
    boxes = pp.decode(reg, anchors, tuple(spec["deploy_box_coder_weights"]))
    boxes[:, 0::2], boxes[:, 1::2] = boxes[:, 0::2].clip(0, w), boxes[:, 1::2].clip(0, h)
    opts = pp.options(spec)
    return nms_violations(det, boxes, pp.softmax(logits), score_threshold=opts["score_threshold"],
                          nms_iou=opts["nms_iou"], top_k=opts["top_k"],
                          detections_per_image=opts["detections_per_image"], rtol=1e-4, atol=1e-5, box_atol=1e-2)


def same_detections(a, b):
    return a["labels"].tolist() == b["labels"].tolist() and np.allclose(a["scores"], b["scores"], 1e-5, 1e-6) \
        and np.allclose(a["boxes"], b["boxes"], 1e-4, 1e-3)


def test_deployable_runs_without_edgebuild(built):
    """model.json + the numpy postprocess give the summary's mAP from the IR with plain OpenVINO. Here batch 1,
    in the build the eval batch: the raw outputs agree to rounding, not bit for bit, so an image's detections
    may differ only where scores equal within rounding let NMS keep another box: they must still be an NMS
    outcome of the build's own candidates (nms_violations). Where no image differs, the mAP is the summary's."""
    from torchmetrics.detection import MeanAveragePrecision

    from edgebuild.artifact import Artifact
    from edgebuild.targets import make_target

    tmp, overrides, s = built
    deploy = Path(s["deploy"])
    spec = json.loads((deploy / "model.json").read_text())
    assert spec["task"] == "detection" and spec["deploy_box_coder_weights"] == [10.0, 10.0, 5.0, 5.0]
    assert set(spec["outputs"]) == {"bbox_regression", "cls_logits", "anchors"}
    task, dm = task_and_data(tmp, overrides)
    cfg = testing.compose(overrides, recipe="ssd_int8")
    raw = dm.splits[cfg.eval.split]
    n = min(len(raw.labels), cfg.eval.limit or len(raw.labels))
    # the build's measurement, reproduced: edgebuild's session on the target at the eval batch (padded)
    target, batch = make_target(cfg.target), cfg.eval.batch_size
    session = target.runtime.compile(Artifact("openvino", deploy, spec["files"], meta=spec), target.device, batch)
    built_outputs, evaluator = [], task.evaluator(dm.class_names)
    for x, y in dm.batches(cfg.eval.split, batch, cfg.eval.limit):
        k = len(x)
        x = np.concatenate([x, np.zeros((batch - k, *x.shape[1:]), dtype=x.dtype)]) if k < batch else x
        outs = [np.asarray(o[:k], dtype=np.float32) for o in session.infer(x)]
        evaluator.update(outs, y)
        built_outputs += list(zip(*outs, strict=True))
    assert evaluator.compute()[0]["map/50_95"] == pytest.approx(s["stages"][-1]["metrics"]["map/50_95"], abs=1e-9)

    pre, opts = spec["preprocess"], pp.options(spec)
    x = (raw.images[:n] / pre["scale"] - np.reshape(pre["mean"], (1, -1, 1, 1))) / np.reshape(pre["std"], (1, -1, 1, 1))
    hint = {"INFERENCE_PRECISION_HINT": spec["target"]["precision_hint"]}
    compiled = ov.Core().compile_model(str(deploy / "model.xml"), "CPU", hint)
    metric, differ = MeanAveragePrecision(backend="pycocotools"), 0
    for i in range(n):
        reg, logits, anchors = (o[0] for o in compiled(x[i:i + 1].astype(np.float32)).values())
        det = pp.postprocess(reg, logits, anchors, **opts)
        if not same_detections(det, pp.postprocess(*built_outputs[i], **opts)):
            differ += 1
            assert is_nms_outcome(det, *built_outputs[i], spec) == [], f"image {i}: not explained by rounding"
        metric.update([{k: torch.as_tensor(v) for k, v in det.items()}],
                      [{k: torch.as_tensor(v) for k, v in raw.labels[i].items()}])
    if not differ:
        assert float(metric.compute()["map"]) == pytest.approx(s["stages"][-1]["metrics"]["map/50_95"], abs=1e-6)


def test_pyfunc_of_a_detector_returns_the_deployables_raw_heads(built, tmp_path):
    """The detection deployable logged as an MLflow model (as a tracked build logs it): load_model gives
    {output name: array} equal to the IR's outputs, which the numpy postprocess decodes to the same boxes."""
    import mlflow

    from edgebuild.tracking import Tracker

    tmp, overrides, s = built
    deploy = Path(s["deploy"])
    spec = json.loads((deploy / "model.json").read_text())
    _, dm = task_and_data(tmp, overrides)
    x, _ = next(dm.batches("test", 4))
    hint = {"INFERENCE_PRECISION_HINT": spec["target"]["precision_hint"]}
    compiled = ov.Core().compile_model(str(deploy / "model.xml"), "CPU", hint)
    expected = {o.get_any_name(): np.asarray(v) for o, v in compiled(x).items()}
    previous = mlflow.get_tracking_uri()  # the tracker points MLflow at this test's store; other tests keep theirs
    try:
        tracker = Tracker(testing.compose(testing.shrink(tmp_path, tracking=True)).tracking, "edgebuild/detection")
        with tracker.build("detector", {}, {}):
            uri = tracker.log_model(deploy)
        got = mlflow.pyfunc.load_model(uri).predict(x)
    finally:
        mlflow.set_tracking_uri(previous)
    assert set(got) == set(expected) == set(spec["outputs"])
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-4, err_msg=name)
    opts, heads = pp.options(spec), ("bbox_regression", "cls_logits", "anchors")
    for i in range(len(x)):
        det = pp.postprocess(*(got[k][i] for k in heads), **opts)
        if not same_detections(det, pp.postprocess(*(expected[k][i] for k in heads), **opts)):
            assert is_nms_outcome(det, *(expected[k][i] for k in heads), spec) == [], f"image {i}"


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_numpy_postprocess_equals_torchvision(built, scale):
    """The shipped decode + NMS against torchvision's SSD.postprocess_detections on the same raw outputs:
    the trained model's (scale 1) and sharpened ones with many overlapping candidates (scale 4), whose
    saturated softmax ties many anchors. Both must be the same NMS outcome up to the order of equal scores
    (torchvision's is unspecified; see postprocess.py), judged on torchvision's own decoded candidates; where
    no tie decides, they must be identical."""
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.ssd import SSD
    from torchvision.ops import boxes as box_ops

    from tests.conftest import nms_violations

    tmp, overrides, s = built
    _, dm = task_and_data(tmp, overrides)
    model = torch.load(Path(stage(s, "train")["artifact"]) / "model.pt", weights_only=False).eval()
    x, _ = next(dm.batches("test", 8))
    with torch.no_grad():
        reg, logits, anchors = model(torch.from_numpy(x))
    logits = logits * scale
    tv = SSD(torch.nn.Identity(), DefaultBoxGenerator([[2]]), (96, 96), 4, head=torch.nn.Identity(),
             score_thresh=0.01, nms_thresh=0.45, detections_per_img=100, topk_candidates=200)
    expected = tv.postprocess_detections({"bbox_regression": reg, "cls_logits": logits}, list(anchors), [(96, 96)] * 8)
    total = 0
    for i, e in enumerate(expected):
        got = pp.postprocess(reg[i].numpy(), logits[i].numpy(), anchors[i].numpy(), image_size=(96, 96))
        boxes = box_ops.clip_boxes_to_image(tv.box_coder.decode_single(reg[i], anchors[i]), (96, 96)).numpy()
        scores = torch.nn.functional.softmax(logits[i], dim=-1).numpy()
        e = {"boxes": e["boxes"].numpy(), "scores": e["scores"].numpy(), "labels": (e["labels"] - 1).numpy()}
        assert nms_violations(e, boxes, scores) == []  # the check accepts torchvision's own answer
        assert nms_violations(got, boxes, scores) == [], f"image {i}"
        same = got["labels"].tolist() == e["labels"].tolist() and np.allclose(got["scores"], e["scores"], 1e-5, 1e-6) \
            and np.allclose(got["boxes"], e["boxes"], 1e-4, 1e-3)
        if not same:  # a tie decided: some kept box has an overlapping candidate of the same label and score
            assert _tie_decides(got, boxes, scores), f"image {i}: differs from torchvision with no tie to explain it"
        total += len(got["labels"])
    assert total > 8


def _tie_decides(det, boxes, scores, tol=1e-5, iou=0.45):
    from tests.conftest import _iou

    for box, score, label in zip(det["boxes"], det["scores"], det["labels"], strict=True):
        s = scores[:, label + 1]
        tied = np.flatnonzero(np.abs(s - score) <= 1e-6 + tol * score)
        if (_iou(box, boxes[tied]) > iou - 1e-4).sum() > 1:  # itself and another
            return True
    return False


def test_detector_with_classification_task_and_the_reverse_fail_cleanly(tmp_path):
    with pytest.raises(EdgebuildError, match="a detection model must return"):
        testing.build(testing.shrink(tmp_path) + ["model=cnn", "data.num_samples=40", "data.image_size=32"],
                      tmp_path, recipe="ssd_int8")
    with pytest.raises(EdgebuildError, match="a classification model must return logits"):
        testing.build(testing.shrink(tmp_path) + ["model=ssd_small", "data=synthetic", "data.channels=3",
                                                  "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]"], tmp_path)
    with pytest.raises(EdgebuildError, match="is not detection data"):
        testing.build(testing.shrink(tmp_path) + ["data=synthetic"], tmp_path, recipe="ssd_int8")
    with pytest.raises(EdgebuildError, match="is not classification data"):
        testing.build(testing.shrink(tmp_path) + ["data=shapes"], tmp_path)


@dataclass
class ClassificationOnly(Stage):
    kind: ClassVar[str] = "classification_only"
    tasks: ClassVar[tuple[str, ...]] = ("classification",)


def test_classification_only_stage_in_a_detection_recipe_fails_at_plan_time(tmp_path, monkeypatch):
    from edgebuild import stage as stages
    from edgebuild.pipeline import plan

    monkeypatch.setitem(stages.REGISTRY, "classification_only", "tests.test_detection:ClassificationOnly")
    cfg = testing.compose(testing.shrink(tmp_path) + ["+stages.odd={kind: classification_only}"], recipe="ssd_int8")
    with pytest.raises(EdgebuildError, match="does not apply to task detection"):
        plan(cfg)


def test_bad_yolo_label_exits_2_naming_the_file_before_any_work(tmp_path):
    root = tmp_path / "bad"
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (96, 96)).save(root / "images" / "train" / "a.jpg")
    (root / "labels" / "train" / "a.txt").write_text("7 0.5 0.5 1.8 0.2\n")
    r = run_cli(["recipe=ssd_int8", "data=yolo", f"data.root={root}", *testing.shrink(tmp_path)], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "a.txt:1" in r.stderr + r.stdout
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("record.json"))


def test_accuracy_controlled_ptq_fp16_and_qat_work_on_a_detector(built):
    """The task-agnostic compression stages on the trained SSD: mAP measured, INT8 where claimed."""
    tmp, overrides, _ = built
    extra = ["stages.quantize=null", "+stages.acq={kind: quantize, input: train, max_drop: 0.01}",
             "+stages.half={kind: fp16, input: train}", "+stages.qat={kind: qat, input: train, epochs: 1}"]
    s = testing.build(overrides + extra, tmp, recipe="ssd_int8", run_name="compressed")
    assert stage(s, "train")["cache_hit"]
    train = stage(s, "train")["metrics"]
    for name in ("acq", "qat"):
        m = stage(s, name)["metrics"]
        assert m["int8/ops_fraction"] > 0.9 and m["size/bytes"] < train["size/bytes"] / 2.5
        assert m["map/50"] > 0.1 and "latency/postprocess_ms" in m
    assert stage(s, "acq")["metrics"]["quantize/fp_layers"] >= 0
    half = stage(s, "half")["metrics"]
    assert half["size/bytes"] < 0.6 * train["size/bytes"] and abs(half["map/50_95"] - train["map/50_95"]) < 0.01
