"""resolution: the model, the data, the measurement and model.json follow the new input size."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgebuild import testing
from edgebuild.data import DataModule, for_input
from edgebuild.errors import EdgebuildError
from edgebuild.pipeline import plan
from edgebuild.stages.resolution import check_runs_at
from edgebuild.tasks.classification import Classification
from tests.conftest import assert_accuracy_matches

QUICK = ["data=synthetic", "model.kwargs.width=8", "stages.train.epochs=2", "stages.res6.epochs=1",
         "stages.res4.epochs=1"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resolution")
    overrides = testing.shrink(tmp) + QUICK + ["budget.max_acc_drop=null"]
    return tmp, testing.build(overrides, tmp, recipe="lower_resolution")


def test_lower_resolution_shrunk(built):
    tmp, s = built
    by = {st["name"]: st["metrics"] for st in s["stages"]}
    train, res6, res4 = by["train"], by["res6"], by["res4"]
    assert res6["resolution/from"] == 16 and res6["resolution/to"] == 6
    assert res6["resolution/pixel_ratio"] == pytest.approx(36 / 256)
    assert res6["macs"] == pytest.approx(train["macs"] * res6["resolution/macs_ratio"], abs=1)
    assert res4["macs"] < res6["macs"] < train["macs"] * 0.25
    assert by["export"]["macs"] == res6["macs"]
    # the deployable says 6x6, and plain OpenVINO on the data resized to 6x6 gives the summary's accuracy
    import openvino as ov

    deploy = Path(s["deploy"])
    spec = json.loads((deploy / "model.json").read_text())
    assert spec["input_shape"] == [1, 1, 6, 6]
    dm = DataModule(testing.compose(testing.shrink(tmp) + ["data=synthetic"]).data, tmp / "cache")
    test = dm.resized(6).splits["test"]
    x = dm.normalize(test.images)
    compiled = ov.Core().compile_model(str(deploy / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert_accuracy_matches(compiled(x)[0], test.labels, by["export"]["acc/top1"])


def test_data_view_at_another_size(tmp_path):
    dm = DataModule(testing.compose(testing.shrink(tmp_path) + ["data=synthetic"]).data, tmp_path / "cache")
    assert for_input(dm, [1, 1, 16, 16]) is dm
    view = for_input(dm, [1, 1, 12, 12])
    assert view is dm.resized(12) and view.input_shape == [1, 1, 12, 12] and dm.input_shape == [1, 1, 16, 16]
    for split in ("train", "val", "test"):
        assert view.splits[split].images.shape[1:] == (1, 12, 12)
        np.testing.assert_array_equal(view.splits[split].labels, dm.splits[split].labels)
    assert next(iter(view.loader("train")))[0].shape[1:] == (1, 12, 12)
    assert view.calibration().shape[1:] == (1, 12, 12) and view.meta()["image_size"] == 12
    with pytest.raises(EdgebuildError, match="only square"):
        for_input(dm, [1, 1, 12, 10])


def test_a_resolution_the_model_cannot_take_names_the_layer():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 4))
    task = Classification(None)
    check_runs_at(model, [1, 1, 16, 16], task)  # its own size works
    with pytest.raises(EdgebuildError, match=r"layer '3' \(Linear, input \[1, 144\]\) fails"):
        check_runs_at(model, [1, 1, 12, 12], task)
    with pytest.raises(EdgebuildError, match=r"layer '0' \(Conv2d"):
        check_runs_at(nn.Sequential(nn.Conv2d(1, 4, 5), nn.Flatten()), [1, 1, 3, 3], task)
    assert torch.is_tensor(model(torch.zeros(1, 1, 16, 16)))  # hooks were removed


def test_size_and_task_checked_at_plan_time():
    with pytest.raises(EdgebuildError, match="image_size=0 is not a size"):
        plan(testing.compose(["stages.res6.image_size=0"], recipe="lower_resolution"))
    cfg = testing.compose([], recipe="lower_resolution")
    cfg.task.name = "detection"
    with pytest.raises(EdgebuildError, match="does not apply to task detection"):
        plan(cfg)
