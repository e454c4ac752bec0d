"""cluster: k shared values per layer in the torch model and in the exported IR, fine-tuned with
tied weights, smaller when zipped, cached like every stage; bad input refused at plan time."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgebuild import testing
from edgebuild.errors import EdgebuildError
from edgebuild.pipeline import plan
from edgebuild.stages.cluster import Cluster, kmeans

TINY = ["data=synthetic", "data.num_samples=400", "budget.min_acc=null", "model.kwargs.width=8",
        "stages.train.epochs=3", "stages.export=null",
        "+stages.cluster={kind: cluster, input: train, n_clusters: 4, epochs: 1}"]


def stage(summary, name):
    return next(s for s in summary["stages"] if s["name"] == name)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    return tmp, testing.build(testing.shrink(tmp) + TINY, tmp)


def test_every_selected_layer_holds_k_values_and_the_classifier_is_left_alone(built):
    _, s = built
    model = torch.load(Path(stage(s, "cluster")["artifact"]) / "model.pt", weights_only=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # folded before clustering
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 and all(torch.unique(c.weight).numel() <= 4 for c in convs)
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert torch.unique(linear.weight).numel() > 4
    m = stage(s, "cluster")["metrics"]
    assert m["cluster/unique_values_max"] <= 4 and m["cluster/layers"] == 3
    assert m["acc/top1"] > 0.4  # chance is 0.25


def test_exported_ir_keeps_the_shared_values_and_zips_smaller(built):
    import openvino as ov

    _, s = built
    deploy = Path(stage(s, "cluster")["deployable"])
    graph = ov.Core().read_model(str(deploy / "model.xml"))
    convs = [op for op in graph.get_ops() if op.get_type_name() == "Convolution"]
    for op in convs:
        w = op.input_value(1).get_node().get_data()
        assert len(np.unique(w)) <= 4, op.get_friendly_name()
    train, clustered = stage(s, "train")["metrics"], stage(s, "cluster")["metrics"]
    assert clustered["size/zip_bytes"] < 0.6 * train["size/zip_bytes"]
    assert clustered["size/bytes"] >= 0.9 * train["size/bytes"]  # same dense layout: the gain is in the zip
    assert any("quantiz" in n for n in s["notes"])


def test_rebuild_hits_the_cache(built, monkeypatch):
    tmp, _ = built

    def boom(self, ctx):
        raise AssertionError("cluster ran on a cached build")

    monkeypatch.setattr(Cluster, "run", boom)
    again = testing.build(testing.shrink(tmp) + TINY, tmp, run_name="again")
    assert all(st["cache_hit"] for st in again["stages"])


def test_kmeans_never_asks_for_more_clusters_than_distinct_values():
    centroids, labels = kmeans(np.array([0.5, -0.5, 0.5, 0.5, -0.5], dtype=np.float32), 16, "linear", 0)
    assert sorted(centroids.tolist()) == pytest.approx([-0.5, 0.5])
    assert torch.allclose(centroids[labels], torch.tensor([0.5, -0.5, 0.5, 0.5, -0.5]))


def test_bad_input_is_refused_before_any_work(tmp_path):
    cfg = testing.compose(testing.shrink(tmp_path) + ["data=synthetic", "+stages.c={kind: cluster, n_clusters: 1}"])
    with pytest.raises(EdgebuildError, match=r"n_clusters=1 is out of range: it must be >= 2"):
        plan(cfg)
    cfg = testing.compose(testing.shrink(tmp_path) + ["data=synthetic", "+stages.c={kind: cluster, layers: ['[0-']}"])
    with pytest.raises(EdgebuildError, match="layers entry .* is not a regex"):
        plan(cfg)
    cfg = testing.compose(testing.shrink(tmp_path) + ["+stages.q={kind: quantize}", "+stages.c={kind: cluster}"])
    with pytest.raises(EdgebuildError, match="its input 'q' is already quantized"):
        plan(cfg)
