"""task=multihead: the backbone runs once per input and every head answers, in torch and in the deployed IR
(one backbone in the graph, one output per head, each head's top-1 measured on it); heads that do not fit the
data's labels stop the build with one message."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgebuild import testing
from edgebuild.tasks.multihead import build_model
from tests.conftest import assert_accuracy_matches, run_cli


def test_backbone_runs_once_for_every_head():
    model = build_model(None, None, num_classes=10, in_channels=1, heads=[2, 3], width=8).eval()
    calls = []
    model.backbone.register_forward_hook(lambda m, i, y: calls.append(len(i[0])))
    with torch.no_grad():
        out = model(torch.rand(5, 1, 8, 8))
    assert calls == [5]
    assert [tuple(o.shape) for o in out] == [(5, 10), (5, 2), (5, 3)]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihead")
    overrides = testing.shrink(tmp) + ["stages.train.epochs=3", "budget.max_acc_drop=null"]
    return tmp, testing.build(overrides, tmp, recipe="multitask_shared")


def test_deployable_has_one_backbone_and_every_head(shared):
    import openvino as ov

    from edgebuild.data import DataModule

    tmp, s = shared
    by = {st["name"]: st for st in s["stages"]}
    for name in ("train", "export", "int8"):
        m = by[name]["metrics"]
        assert m["acc/digit/top1"] == m["acc/top1"] and "acc/size/top1" in m, name
    trained = torch.load(Path(by["train"]["artifact"]) / "model.pt", weights_only=False)
    backbone_convs = sum(isinstance(m, nn.Conv2d) for m in trained.backbone.modules())
    assert backbone_convs == 3 and not any(isinstance(m, nn.Conv2d) for m in trained.heads.modules())
    core = ov.Core()
    ir = core.read_model(str(Path(by["export"]["deployable"]) / "model.xml"))
    convs = [op for op in ir.get_ordered_ops() if op.get_type_name() == "Convolution"]
    assert len(convs) == backbone_convs  # the backbone once, not once per head
    assert len(ir.outputs) == 2 and "logits" in ir.outputs[0].get_names() and "size" in ir.outputs[1].get_names()
    # the packaged deployable (INT8) answers for both heads, and its accuracies are the summary's
    deploy = Path(s["deploy"])
    spec = json.loads((deploy / "model.json").read_text())
    assert set(spec["outputs"]) == {"logits", "size"}
    cfg = testing.compose(testing.shrink(tmp), recipe="multitask_shared")
    dm = DataModule(cfg.data, tmp / "cache")
    test = dm.splits["test"]
    compiled = core.compile_model(str(deploy / "model.xml"), "CPU")
    out = compiled(dm.normalize(test.images))
    digit, size = out[compiled.outputs[0]], out[compiled.outputs[1]]
    assert digit.shape == (len(test.labels), 10) and size.shape == (len(test.labels), 2)
    n = len(test.labels)
    final = {k: round(v * n) / n for k, v in by["int8"]["metrics"].items() if k.endswith("top1")}  # float32-stored
    assert_accuracy_matches(digit, test.labels, final["acc/digit/top1"])
    size_labels = np.asarray([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])[test.labels]
    assert_accuracy_matches(size, size_labels, final["acc/size/top1"])


def test_a_head_map_that_does_not_fit_the_labels_exits_2(tmp_path):
    bad = "task.heads=[{name: size, classes: [small, large], map: [0, 0, 1, 1, 1]}]"
    r = run_cli(["recipe=multitask_shared", bad, *testing.shrink(tmp_path)], tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("edgebuild: error:") == 1 and "Traceback" not in r.stdout + r.stderr
    assert "task head 'size' has no label for some of the data's 10 classes" in r.stderr
    assert "map has 5 entries" in r.stderr
    out_of_range = "task.heads=[{name: size, classes: [small, large], map: [0, 0, 0, 0, 0, 1, 1, 1, 1, 2]}]"
    r = run_cli(["recipe=multitask_shared", out_of_range, *testing.shrink(tmp_path)], tmp_path)
    assert r.returncode == 2 and r.stderr.count("edgebuild: error:") == 1 and "task head 'size'" in r.stderr
