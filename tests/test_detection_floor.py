"""Prune a detector to an mAP floor: a tiny trained SSD on tiny generated shapes, `prune` with
`until: {max_map_drop: ...}` raising the channel ratio step by step. The steps are recorded (stage
result and MLflow child runs), the loop stops at the first step beyond the floor, and the kept model is
the last one within it, by its own re-measured mAP."""

import json
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import torch

from edgebuild import testing
from edgebuild.stages import weights
from edgebuild.tasks.detection import Detection

LIMIT = 5.0  # points of mAP@[.5:.95]; measured: ratio 0.3 drops about 0.6, ratio 0.6 about 10 (base mAP 0.25)
RATIOS = [0.3, 0.6, 0.9]  # 0.9 would leave about one channel per layer: far beyond any floor
OVERRIDES = ["data.num_samples=300", "data.image_size=96", "model.kwargs.width=8", "stages.train.epochs=24",
             "stages.train.optimizer.lr=0.01", "data.batch_size=16", "budget.min_map=null",
             "budget.max_map_drop=null", "stages.quantize=null",
             "+stages.floor={kind: prune, input: train, epochs: 1,"
             f" until: {{max_map_drop: {LIMIT}, step: 0.3, max_ratio: 0.9}}}}"]


def stage(summary, name):
    return next(s for s in summary["stages"] if s["name"] == name)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("floor")
    overrides = testing.shrink(tmp, tracking=True) + OVERRIDES
    return tmp, overrides, testing.build(overrides, tmp, recipe="ssd_int8")


@pytest.fixture(scope="module")
def steps(built):
    _, _, s = built
    return json.loads((Path(stage(s, "floor")["artifact"]).parent / "result.json").read_text())["steps"]


def test_floor_loop_records_each_step_as_a_child_run(built, steps):
    tmp, _, s = built
    assert [st["name"] for st in steps] == [f"ratio_{r:.2f}" for r in RATIOS][:len(steps)]
    assert [st["params"]["ratio"] for st in steps] == RATIOS[:len(steps)]
    fractions = [st["metrics"]["macs/fraction"] for st in steps]
    assert fractions == sorted(fractions, reverse=True) and fractions[0] < 0.75  # each step prunes further
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    runs = mlflow.search_runs(search_all_experiments=True)
    floor_run = runs[(runs["tags.mlflow.parentRunId"] == s["mlflow_run_id"]) & (runs["tags.mlflow.runName"] == "floor")]
    children = runs[runs["tags.mlflow.parentRunId"] == floor_run["run_id"].iloc[0]]
    assert sorted(children["tags.mlflow.runName"]) == [f"floor/{st['name']}" for st in steps]
    for st in steps:
        child = children[children["tags.mlflow.runName"] == f"floor/{st['name']}"].iloc[0]
        assert child["metrics.val/drop"] == pytest.approx(st["metrics"]["val/drop"])
        assert child["metrics.map/50_95"] == pytest.approx(st["metrics"]["map/50_95"])


def test_floor_loop_stops_at_the_first_step_beyond_the_floor_and_keeps_the_last_within(built, steps):
    _, _, s = built
    drops = [st["metrics"]["val/drop"] for st in steps]
    assert len(steps) >= 2 and all(d <= LIMIT for d in drops[:-1]) and drops[-1] > LIMIT, drops
    kept = steps[-2]
    floor = stage(s, "floor")["metrics"]
    assert floor["macs"] == kept["metrics"]["macs"] < stage(s, "train")["metrics"]["macs"]


def test_kept_models_remeasured_map_drop_is_within_the_floor(built, steps):
    """Not the loop's own bookkeeping: the kept artifact and the trained one, scored again on the
    validation split the loop used, give the recorded drop, within the limit."""
    tmp, overrides, s = built
    cfg = testing.compose(overrides, recipe="ssd_int8")
    task = Detection(cfg.task)
    ctx = SimpleNamespace(task=task, data=task.datamodule(cfg.data, Path(cfg.cache.dir)))

    def val_map(name):
        model = torch.load(Path(stage(s, name)["artifact"]) / "model.pt", weights_only=False)
        return weights.validate(model, ctx)

    reference, kept = val_map("train"), val_map("floor")
    assert reference > 0.1  # the base learned: a drop from nothing would prove nothing
    assert kept == pytest.approx(steps[-2]["metrics"]["map/50_95"], abs=1e-6)
    assert (reference - kept) * 100 == pytest.approx(steps[-2]["metrics"]["val/drop"], abs=1e-4)
    assert (reference - kept) * 100 <= LIMIT < steps[-1]["metrics"]["val/drop"]
