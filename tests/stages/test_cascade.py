"""cascade: the metrics on fixed predictions, a shrunk cascade build, bad thresholds and tasks."""

import json
from pathlib import Path

import numpy as np
import pytest

from edgebuild import testing
from edgebuild.errors import EdgebuildError
from edgebuild.pipeline import plan
from edgebuild.stages.cascade import cascade_curve, operating_point

QUICK = ["data=synthetic", "model.kwargs.width=8", "stages.big.epochs=2", "stages.small.epochs=2",
         "stages.cascade.latency_rounds=1"]


def test_curve_on_fixed_predictions():
    # small: confidences 0.9 (right), 0.6 (wrong), 0.95 (wrong), 0.5 (right, argmax of a tie); big: always right
    small = np.log(np.array([[0.9, 0.1], [0.4, 0.6], [0.05, 0.95], [0.5, 0.5]]))
    big = np.log(np.array([[0.8, 0.2], [0.9, 0.1], [0.9, 0.1], [0.7, 0.3]]))
    labels = np.array([0, 0, 0, 0])
    curve = cascade_curve(small, big, labels, [1.0, 0.0, 0.7, 0.92], small_ms=1.0, big_ms=10.0)
    assert [c["threshold"] for c in curve] == [0.0, 0.7, 0.92, 1.0]
    assert [c["escalated"] for c in curve] == [0.0, 0.5, 0.75, 1.0]
    assert [c["accuracy"] for c in curve] == [0.5, 0.75, 0.75, 1.0]
    assert [c["expected_latency_ms"] for c in curve] == [1.0, 6.0, 8.5, 11.0]
    assert operating_point(curve, big_acc=1.0, max_drop_pp=30)["threshold"] == 0.7  # the fastest within 30 pp
    assert operating_point(curve, big_acc=1.0, max_drop_pp=0.5)["threshold"] == 1.0
    assert operating_point(curve[:3], big_acc=1.0, max_drop_pp=0.5)["threshold"] == 0.7  # none within: most accurate


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cascade")
    # max_drop_pp=100: the fastest (lowest) threshold operates, 0.32: about the median confidence of this barely
    # trained small model (0.26 to 0.41 over 4 classes), so some answers escalate and some do not
    operating = ["stages.cascade.max_drop_pp=100",
                 "stages.cascade.thresholds=[0.32,0.5,0.7,0.8,0.9,0.95,0.98,0.99,0.999]"]
    return tmp, testing.build(testing.shrink(tmp, tracking=True) + QUICK + operating, tmp, recipe="cascade")


def test_cascade_build_reports_curve_plot_and_bundle(built):
    tmp, s = built
    by = {st["name"]: st for st in s["stages"]}
    m = by["cascade"]["metrics"]
    # same counts; the build's metric passes through float32, the cascade's is float64: 1 / 2**24 apart at most
    assert m["cascade/big_acc"] == pytest.approx(by["big"]["metrics"]["acc/top1"], abs=1e-7)
    assert m["cascade/small_acc"] == pytest.approx(by["small"]["metrics"]["acc/top1"], abs=1e-7)
    assert m["acc/top1"] == pytest.approx(m["cascade/small_acc"], abs=1e-7)  # the bundle's main model is the small one
    assert m["cascade/expected_latency_ms"] == pytest.approx(
        m["cascade/small_latency_ms"] + m["cascade/escalated"] * m["cascade/big_latency_ms"])
    workdir = Path(by["cascade"]["artifact"])
    report = json.loads((workdir / "cascade.json").read_text())
    assert len(report["curve"]) == 9 and (workdir / "cascade.png").stat().st_size > 1000
    at_one = report["curve"][-1]  # threshold 0.999: nearly everything escalates, accuracy near the big model's
    assert at_one["escalated"] >= report["curve"][0]["escalated"]
    deploy = Path(s["deploy"])
    spec = json.loads((deploy / "model.json").read_text())
    assert spec["deploy_cascade"]["threshold"] == m["cascade/threshold"]
    assert (deploy / spec["deploy_cascade"]["big_model"]).exists() and (deploy / "model.xml").exists()


def test_curve_plot_and_steps_are_in_mlflow(built):
    import mlflow

    tmp, s = built
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    runs = mlflow.search_runs(search_all_experiments=True)
    stage = runs[(runs["tags.mlflow.parentRunId"] == s["mlflow_run_id"]) & (runs["tags.mlflow.runName"] == "cascade")]
    run_id = stage.iloc[0]["run_id"]
    files = {f.path for f in mlflow.MlflowClient().list_artifacts(run_id, "cascade_curve")}
    assert files == {"cascade_curve/cascade.png"}
    steps = runs[runs["tags.mlflow.parentRunId"] == run_id]
    assert len(steps) == 9 and "metrics.cascade/escalated" in steps


def test_logged_pyfunc_runs_the_cascade_as_deployed(built):
    """mlflow.pyfunc.load_model on the cascade build's logged model answers as model.json's cascade does
    (small model, softmax threshold, big model with its own preprocessing), not as the small model alone;
    its accuracy is the stage's operating point. Rows whose confidence lies within rounding of the threshold,
    or whose top-2 logits tie, may go either way between two runs of the same network (batch sizes, CPUs)."""
    import mlflow
    import openvino as ov

    from edgebuild.data import DataModule
    from edgebuild.stages.cascade import softmax
    from tests.conftest import ambiguous_argmax

    tmp, s = built
    m = next(st for st in s["stages"] if st["name"] == "cascade")["metrics"]
    deploy = Path(s["deploy"])
    spec = json.loads((deploy / "model.json").read_text())
    cascade = spec["deploy_cascade"]
    cfg = testing.compose(testing.shrink(tmp) + QUICK, recipe="cascade")
    raw = DataModule(cfg.data, tmp / "cache").splits[cfg.eval.split]

    def inputs(pre, size):
        assert size == list(raw.images.shape[2:])  # this recipe: both models at the data's size
        return ((raw.images.astype(np.float32) / np.float32(pre["scale"]) - np.reshape(pre["mean"], (1, -1, 1, 1))
                 ) / np.reshape(pre["std"], (1, -1, 1, 1))).astype(np.float32)

    core = ov.Core()
    x = inputs(spec["preprocess"], spec["input_shape"][2:])
    small = core.compile_model(str(deploy / spec["files"][0]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]
    big = core.compile_model(str(deploy / cascade["big_model"]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(
        inputs(cascade["big_preprocess"], cascade["big_input_shape"][2:]))[0]
    confidence = softmax(small.astype(np.float64)).max(1)
    escalate = confidence < cascade["threshold"]
    expected = np.where(escalate[:, None], big, small)

    got = mlflow.pyfunc.load_model(s["mlflow_model_uri"]).predict(x)
    assert got.shape == small.shape
    edge = np.abs(confidence - cascade["threshold"]) <= 1e-4  # the escalation decision is within rounding
    sure = ~edge
    np.testing.assert_allclose(got[sure], expected[sure], rtol=1e-4, atol=1e-4)
    assert all(np.allclose(g, small[i], 1e-4, 1e-4) or np.allclose(g, big[i], 1e-4, 1e-4)
               for i, g in enumerate(got))  # every row is one of the two models' answers
    # the cascade is applied: some rows are escalated and the big model's answer differs there
    changed = sure & escalate & (big.argmax(1) != small.argmax(1))
    assert changed.sum() >= 1 and (got.argmax(1)[changed] != small.argmax(1)[changed]).all()
    assert (sure & ~escalate).sum() >= 1, "the fixture's operating point should keep some of the small model's answers"
    # and it is what the stage measured at its operating point (up to rows rounding may flip)
    n, slack = len(x), int((edge | ambiguous_argmax(got)).sum())
    assert abs(int((got.argmax(1) == raw.labels).sum()) - m["cascade/acc"] * n) <= slack + 1e-6
    assert abs(int(escalate.sum()) - m["cascade/escalated"] * n) <= int(edge.sum()) + 1e-6


@pytest.mark.parametrize("override,message", [
    ("stages.cascade.thresholds=[0.5,1.5]", r"cascade.thresholds\[1\]=1.5 is out of range: it must be >= 0 and <= 1"),
    ("stages.cascade.thresholds=[]", "are not confidences"),
    ("stages.cascade.big=null", "cascade needs the big model"),
    ("stages.cascade.big=nosuch", "reference 'nosuch' is not a stage"),
    ("stages.cascade.big=/nonexistent/deploy", "has no model.json"),
])
def test_bad_cascade_config_fails_at_plan_time(override, message):
    with pytest.raises(EdgebuildError, match=message):
        plan(testing.compose([override], recipe="cascade"))


def test_cascade_is_classification_only():
    cfg = testing.compose([], recipe="cascade")
    cfg.task.name = "detection"
    with pytest.raises(EdgebuildError, match="stage 'cascade' .* does not apply to task detection"):
        plan(cfg)
