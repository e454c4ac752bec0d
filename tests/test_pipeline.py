"""The default pipeline end to end: measurement, cache hits, re-runs, budget, determinism, MLflow."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from edgebuild import testing
from edgebuild.artifact import Artifact
from edgebuild.errors import BudgetExceeded
from edgebuild.stages.export import Export
from edgebuild.stages.train import Train
from tests.conftest import assert_accuracy_matches

NEED = ["acc/top1", "macs", "params", "size/bytes", "size/zip_bytes", "latency/p50_ms", "latency/p90_ms",
        "throughput/fps", "runtime/precision", "int8/ops_fraction"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One tracked build shared by the read-only checks below."""
    tmp = tmp_path_factory.mktemp("built")
    from tests.conftest import FAST

    summary = testing.build(testing.shrink(tmp, tracking=True) + FAST, tmp)
    return tmp, summary


def test_every_stage_is_measured_the_same_way(built):
    _, s = built
    assert [st["name"] for st in s["stages"]] == ["train", "export"]
    for st in s["stages"]:
        missing = [k for k in NEED if k not in st["metrics"]]
        assert not missing, (st["name"], missing)
        assert st["cache_hit"] is False
    train = s["stages"][0]["metrics"]
    assert train["acc/top1"] > 0.6
    assert train["runtime/precision"] == "fp32" and train["runtime/precision_raw"] == "f32"  # true FP32 stated
    assert s["budget"]["ok"] is True and s["budget"]["checks"][0]["budget"] == "min_acc"


def test_summary_and_deployable_on_disk(built):
    tmp, s = built
    run_dir = Path(s["run_dir"])
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["stages"][1]["metrics"]["acc/top1"] == s["stages"][1]["metrics"]["acc/top1"]
    assert "| export | export |" in (run_dir / "summary.md").read_text()
    deploy = Path(s["deploy"])
    model_json = json.loads((deploy / "model.json").read_text())
    assert model_json["format"] == "openvino" and (deploy / "model.xml").exists() and (deploy / "model.bin").exists()
    assert model_json["input_shape"] == [1, 1, 16, 16]
    assert model_json["preprocess"]["mean"] == [0.5] and len(model_json["class_names"]) == 4


def test_deployable_runs_without_edgebuild_and_matches_summary(built):
    """model.json says everything needed: read the IR with plain OpenVINO and get the same accuracy."""
    import openvino as ov

    from edgebuild.data import DataModule

    tmp, s = built
    deploy = Path(s["deploy"])
    spec = json.loads((deploy / "model.json").read_text())
    cfg = testing.compose(testing.shrink(tmp) + ["data=synthetic"]).data
    raw = DataModule(cfg, tmp / "cache").splits["test"]
    x = (raw.images / spec["preprocess"]["scale"] - np.array(spec["preprocess"]["mean"]).reshape(1, -1, 1, 1)) / \
        np.array(spec["preprocess"]["std"]).reshape(1, -1, 1, 1)
    compiled = ov.Core().compile_model(str(deploy / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    logits = compiled(x.astype(np.float32))[0]
    # the same IR at another batch size: equal up to rows whose top-2 logits tie within rounding
    assert_accuracy_matches(logits, raw.labels, s["stages"][-1]["metrics"]["acc/top1"])


def test_openvino_accuracy_equals_torch_accuracy(built):
    tmp, s = built
    from edgebuild.data import DataModule

    train = s["stages"][0]
    model = Artifact.from_json(json.loads((Path(train["artifact"]).parent / "result.json").read_text())["artifact"],
                               relative_to=Path(train["artifact"]).parent).load_torch()
    dm = DataModule(testing.compose(testing.shrink(tmp) + ["data=synthetic"]).data, tmp / "cache")
    logits, labels = [], []
    with torch.no_grad():
        for x, y in dm.batches("test", 64):
            logits.append(model(torch.from_numpy(x)).numpy())
            labels.append(y)
    # torch and OpenVINO round differently: only rows whose top-2 logits tie within that may count differently
    assert_accuracy_matches(np.concatenate(logits), np.concatenate(labels), train["metrics"]["acc/top1"])


def test_mlflow_parent_and_nested_runs(built):
    tmp, s = built
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    runs = mlflow.search_runs(search_all_experiments=True)
    parent = runs[runs["run_id"] == s["mlflow_run_id"]].iloc[0]
    assert parent["status"] == "FINISHED"
    assert parent["tags.recipe"] == "default" and parent["tags.status"] == "ok" and parent["tags.git_sha"]
    assert parent["params.stages.train.epochs"] == "2"
    nested = runs[runs["tags.mlflow.parentRunId"] == s["mlflow_run_id"]]
    assert sorted(nested["tags.mlflow.runName"]) == ["export", "train"]
    assert set(nested["status"]) == {"FINISHED"}
    assert set(nested["tags.cache_hit"]) == {"false"}
    train = nested[nested["tags.mlflow.runName"] == "train"].iloc[0]
    assert train["metrics.acc/top1"] == s["stages"][0]["metrics"]["acc/top1"]
    assert train["params.stage.epochs"] == "2"
    client = mlflow.MlflowClient()
    curve = client.get_metric_history(train["run_id"], "train/loss")
    assert len(curve) == 2  # one point per epoch, from Lightning's MLFlowLogger
    assert client.get_metric_history(train["run_id"], "val/acc")
    files = {f.path for f in client.list_artifacts(train["run_id"], "model")}
    assert files == {"model/model.xml", "model/model.bin"}
    assert {f.path for f in client.list_artifacts(s["mlflow_run_id"])} >= {"summary", "deploy"}


def test_rebuild_is_all_cache_hits_and_runs_no_stage(built, monkeypatch):
    tmp, first = built

    def boom(self, ctx):
        raise AssertionError(f"{self.kind}.run was called on a cached build")

    monkeypatch.setattr(Train, "run", boom)
    monkeypatch.setattr(Export, "run", boom)
    from tests.conftest import FAST

    second = testing.build(testing.shrink(tmp, tracking=True) + FAST, tmp, run_name="again")
    assert [st["cache_hit"] for st in second["stages"]] == [True, True]
    for a, b in zip(first["stages"], second["stages"], strict=True):
        assert a["metrics"]["acc/top1"] == b["metrics"]["acc/top1"] and a["metrics"]["macs"] == b["metrics"]["macs"]
    runs = mlflow.search_runs(search_all_experiments=True)
    nested = runs[runs["tags.mlflow.parentRunId"] == second["mlflow_run_id"]]
    assert set(nested["tags.cache_hit"]) == {"true"}


def test_changed_parameter_reruns_that_stage_and_later_only(fast, tmp_path):
    testing.build(fast, tmp_path)
    export_changed = testing.build(fast + ["stages.export.opset=16"], tmp_path, run_name="b")
    assert [st["cache_hit"] for st in export_changed["stages"]] == [True, False]
    train_changed = testing.build(fast + ["stages.train.optimizer.lr=0.01"], tmp_path, run_name="c")
    assert [st["cache_hit"] for st in train_changed["stages"]] == [False, False]
    batch_changed = testing.build(fast + ["data.batch_size=16"], tmp_path, run_name="d")
    assert [st["cache_hit"] for st in batch_changed["stages"]] == [False, False]  # the batch size shapes training


def test_damaged_cache_entry_is_rebuilt_not_used(fast, tmp_path):
    first = testing.build(fast, tmp_path)
    model_file = Path(first["stages"][0]["artifact"]) / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:100])  # truncated by a crash or a full disk
    again = testing.build(fast, tmp_path, run_name="b")
    assert again["stages"][0]["cache_hit"] is False
    assert again["stages"][0]["metrics"]["acc/top1"] == first["stages"][0]["metrics"]["acc/top1"]


def test_budget_violation_raises_with_the_table(fast, tmp_path):
    with pytest.raises(BudgetExceeded) as e:
        testing.build(fast + ["budget.max_size_bytes=1", "budget.max_latency_ms=1000"], tmp_path)
    checks = {c["budget"]: c for c in e.value.args[0]["budget"]["checks"]}
    assert checks["max_size_bytes"]["ok"] is False and checks["max_latency_ms"]["ok"] is True
    summary_md = (Path(e.value.args[0]["run_dir"]) / "summary.md").read_text()
    assert "VIOLATED" in summary_md


def test_builds_are_deterministic_without_cache(fast, tmp_path):
    a = testing.build(fast + ["cache.enabled=false"], tmp_path, run_name="a")
    b = testing.build(fast + ["cache.enabled=false"], tmp_path, run_name="b")
    assert not any(st["cache_hit"] for st in a["stages"] + b["stages"])
    for x, y in zip(a["stages"], b["stages"], strict=True):
        assert x["metrics"]["acc/top1"] == y["metrics"]["acc/top1"]
        assert x["metrics"]["macs"] == y["metrics"]["macs"]
