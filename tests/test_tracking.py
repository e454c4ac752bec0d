"""What MLflow records for a build: final metrics on the parent, the deployable as a logged model
(pyfunc from code, same predictions), the Model Registry, the data as dataset input, and a store that
cannot be written stopping the build with one message."""

import json
import sqlite3
from pathlib import Path

import mlflow
import numpy as np
import pytest

from edgebuild import testing
from edgebuild.errors import EdgebuildError
from tests.conftest import FAST, run_cli


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One tracked build, registered, shared by the read-only checks below."""
    tmp = tmp_path_factory.mktemp("tracked")
    summary = testing.build(testing.shrink(tmp, tracking=True) + FAST + ["tracking.register=edgebuild-test"], tmp)
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    return tmp, summary


def test_parent_run_carries_the_final_stage_metrics(built):
    _, s = built
    parent = mlflow.MlflowClient().get_run(s["mlflow_run_id"])
    final = s["stages"][-1]["metrics"]
    for key in ("acc/top1", "acc/drop", "latency/p50_ms", "latency/p90_ms", "size/bytes", "macs"):
        assert parent.data.metrics[key] == pytest.approx(final[key]), key
    assert parent.data.tags["runtime/precision"] == final["runtime/precision"]
    assert "budget/ok" in parent.data.metrics and "build/seconds" in parent.data.metrics


def test_deployable_is_a_logged_model_with_its_metrics(built):
    tmp, s = built
    models = mlflow.search_logged_models(experiment_ids=[mlflow.get_experiment_by_name("edgebuild/default")
                                                         .experiment_id], output_format="list")
    mine = [m for m in models if m.source_run_id == s["mlflow_run_id"]]
    assert len(mine) == 1
    model = mine[0]
    assert s["mlflow_model_uri"] == f"models:/{model.model_id}"
    linked = {m.key: m.value for m in model.metrics}
    assert linked["acc/top1"] == pytest.approx(s["stages"][-1]["metrics"]["acc/top1"])
    with sqlite3.connect(tmp / "mlflow.db") as db:
        assert db.execute("select count(*) from logged_models").fetchone()[0] >= 1


def test_pyfunc_predicts_what_the_deployable_predicts(built):
    """mlflow.pyfunc.load_model runs the IR with OpenVINO (nothing pickled) and gives the same outputs."""
    import openvino as ov

    from edgebuild.data import DataModule

    tmp, s = built
    deploy = Path(s["deploy"])
    spec = json.loads((deploy / "model.json").read_text())
    raw = DataModule(testing.compose(testing.shrink(tmp) + ["data=synthetic"]).data, tmp / "cache").splits["test"]
    x = ((raw.images / spec["preprocess"]["scale"] - np.array(spec["preprocess"]["mean"]).reshape(1, -1, 1, 1))
         / np.array(spec["preprocess"]["std"]).reshape(1, -1, 1, 1)).astype(np.float32)
    expected = ov.Core().compile_model(str(deploy / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]

    loaded = mlflow.pyfunc.load_model(s["mlflow_model_uri"])
    got = loaded.predict(x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert (got.argmax(1) == expected.argmax(1)).all()
    assert float((got.argmax(1) == raw.labels).mean()) == pytest.approx(s["stages"][-1]["metrics"]["acc/top1"])
    # no pickle: the model folder holds the loader module (plain Python) and the deployable
    local = Path(mlflow.artifacts.download_artifacts(s["mlflow_model_uri"], dst_path=str(tmp / "dl")))
    assert not list(local.rglob("*.pkl")) and (local / "code" / "edgebuild_pyfunc.py").exists()
    assert "loader_module: edgebuild_pyfunc" in (local / "MLmodel").read_text()
    assert {"model.xml", "model.bin", "model.json"} <= {p.name for p in local.rglob("*")}


@pytest.fixture
def own_store():
    """A test that builds with tracking points MLflow at its own store: give the module's `built` store back."""
    previous = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(previous)


def test_pyfunc_of_an_onnx_deployable_runs_it_with_onnxruntime(tmp_path, own_store):
    """target=onnxruntime: the logged model holds the ONNX file, pins onnxruntime (not OpenVINO), and gives
    ONNX Runtime's outputs and the build's top-1."""
    import onnxruntime as ort

    from edgebuild.data import DataModule
    from tests.conftest import assert_accuracy_matches

    s = testing.build(testing.shrink(tmp_path, tracking=True) + FAST + ["target=onnxruntime"], tmp_path)
    deploy = Path(s["deploy"])
    spec = json.loads((deploy / "model.json").read_text())
    assert spec["format"] == "onnx" and spec["files"] == ["model.onnx"]
    data_cfg = testing.compose(testing.shrink(tmp_path) + ["data=synthetic"]).data
    raw = DataModule(data_cfg, tmp_path / "cache").splits["test"]
    pre = spec["preprocess"]
    x = ((raw.images / pre["scale"] - np.reshape(pre["mean"], (1, -1, 1, 1))) / np.reshape(pre["std"], (1, -1, 1, 1))
         ).astype(np.float32)
    session = ort.InferenceSession(str(deploy / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x})[0]

    got = mlflow.pyfunc.load_model(s["mlflow_model_uri"]).predict(x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert_accuracy_matches(got, raw.labels, s["stages"][-1]["metrics"]["acc/top1"])
    local = Path(mlflow.artifacts.download_artifacts(s["mlflow_model_uri"], dst_path=str(tmp_path / "dl")))
    names = {p.name for p in local.rglob("*")}
    assert "model.onnx" in names and "model.xml" not in names
    requirements = (local / "requirements.txt").read_text()
    assert "onnxruntime==" in requirements and "openvino" not in requirements


def test_register_creates_a_model_version(built):
    _, s = built
    versions = mlflow.MlflowClient().search_model_versions("name='edgebuild-test'")
    assert len(versions) == 1
    assert versions[0].run_id == s["mlflow_run_id"]
    assert versions[0].source == s["mlflow_model_uri"]
    loaded = mlflow.pyfunc.load_model("models:/edgebuild-test/1")
    assert loaded.predict(np.zeros((2, 1, 16, 16), np.float32)).shape == (2, 4)


def test_data_is_the_runs_dataset_input(built):
    tmp, s = built
    client = mlflow.MlflowClient()
    fingerprint = s["provenance"]["data_fingerprint"]
    parent = client.get_run(s["mlflow_run_id"])
    (ds,) = parent.inputs.dataset_inputs
    assert ds.dataset.name == "synthetic" and ds.dataset.digest == fingerprint[:36]
    assert json.loads(ds.dataset.source)["tags"]["signature"].startswith("synthetic-")
    assert {t.key: t.value for t in ds.tags}["fingerprint"] == fingerprint
    stages = client.search_runs([parent.info.experiment_id],
                                f"tags.mlflow.parentRunId = '{s['mlflow_run_id']}'")
    assert len(stages) == 2 and all(r.inputs.dataset_inputs[0].dataset.digest == fingerprint[:36] for r in stages)
    with sqlite3.connect(tmp / "mlflow.db") as db:
        assert db.execute("select count(*) from datasets").fetchone()[0] >= 1


def test_tracking_none_logs_no_model(fast, tmp_path):
    s = testing.build(fast, tmp_path)
    assert s.get("mlflow_model_uri") is None and s["mlflow_run_id"] is None


@pytest.mark.parametrize("uri", ["sqlite:////proc/edgebuild/x.db", "file:///proc/edgebuild/mlruns"])
def test_check_store_names_an_unwritable_store(uri, tmp_path):
    from edgebuild.tracking import check_store

    conf = testing.compose(testing.shrink(tmp_path, tracking=True) + [f"tracking.uri={uri}"]).tracking
    with pytest.raises(EdgebuildError) as e:
        check_store(conf)
    assert "cannot write the MLflow store" in str(e.value) and "tracking=none" in e.value.fix
    check_store(testing.compose(testing.shrink(tmp_path, tracking=True)).tracking)  # a writable one passes


def test_unwritable_store_is_exit_2_without_traceback_or_runs(tmp_path):
    """The store in /proc cannot be created: one message before any stage; nothing cached, no run."""
    args = testing.shrink(tmp_path, tracking=True) + FAST + ["tracking.uri=sqlite:////proc/x.db"]
    out = run_cli(args, cwd=tmp_path, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stdout + out.stderr
    assert "cannot write the MLflow store sqlite:////proc/x.db" in out.stderr and "tracking=none" in out.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("result.json"))
    assert not (tmp_path / "mlflow.db").exists()


def test_unwritable_artifact_location_is_exit_2_and_leaves_no_running_run(tmp_path):
    """A writable store with an unwritable artifact location: the check comes before any run exists."""
    args = testing.shrink(tmp_path, tracking=True) + FAST + ["tracking.artifact_location=/proc/edgebuild-art"]
    out = run_cli(args, cwd=tmp_path, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stdout + out.stderr and "tracking.artifact_location" in out.stderr
    if (tmp_path / "mlflow.db").exists():
        with sqlite3.connect(tmp_path / "mlflow.db") as db:
            assert db.execute("select count(*) from runs where status = 'RUNNING'").fetchone()[0] == 0
