"""recipe=runtime_shootout: one trained model through every installed runtime, FP32 and INT8, one
interleaved timing, the fastest within budget deployed on its own runtime, every candidate a nested run."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest

from edgebuild import budget, testing
from edgebuild.errors import BudgetExceeded
from edgebuild.stages.shootout import choose
from edgebuild.targets import base, formats
from edgebuild.targets.onnxruntime import ONNXRuntime
from tests.conftest import FAST


def installed() -> set[str]:
    """One runtime per registered format whose package imports here (what the shootout must cover)."""
    out = set()
    for cls in formats().values():
        try:
            devices = cls.__new__(cls).available_devices()
        except Exception:  # a missing package: not a candidate
            continue
        if devices:  # no device (TensorRT without a GPU): unmeasured, not a candidate
            out.add(cls.name)
    return out


@pytest.fixture(scope="module")
def shootout(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shootout")
    summary = testing.build(testing.shrink(tmp, tracking=True) + FAST + ["stages.shootout.rounds=3"], tmp,
                            recipe="runtime_shootout")
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    return tmp, summary


def test_every_installed_runtime_is_a_candidate_in_fp32_and_int8(shootout):
    _, s = shootout
    candidates = s["pick"]["candidates"]
    classes = {cls.name: cls for cls in formats().values()}
    expected = {f"{n}-fp32" for n in installed()} | {f"{n}-int8" for n in installed()
                                                     if classes[n].supports(base.QUANTIZE)}
    assert {"openvino-fp32", "openvino-int8", "onnxruntime-fp32", "onnxruntime-int8"} <= expected
    assert {c["name"] for c in candidates} == expected
    for c in candidates:
        m = c["metrics"]
        assert m["acc/top1"] > 0.5 and m["size/bytes"] > 0 and m["latency/interleaved_ms"] > 0
        assert m["latency/load_ms"] > 0 and m["latency/first_ms"] > 0 and m["runtime/precision"]
        if c["params"]["precision"] == "int8":
            assert m["int8/ops_fraction"] > 0  # what ran, read from the compiled model


def test_the_pick_is_the_fastest_within_budget_and_is_what_deploys(shootout):
    _, s = shootout
    candidates, pick = s["pick"]["candidates"], s["pick"]
    ok = [c for c in candidates if c["budget_ok"]]
    fastest = min(c["metrics"]["latency/interleaved_ms"] for c in ok)
    tied = [c for c in ok if c["metrics"]["latency/interleaved_ms"] <= fastest * 1.05]  # the default tolerance
    assert ok and pick["name"] == min(tied, key=lambda c: c["metrics"]["size/bytes"])["name"]
    assert [c["name"] for c in candidates if c["pick"]] == [pick["name"]]
    assert all(c["metrics"]["acc/drop"] <= 1.0 for c in ok)
    model_json = json.loads((Path(s["deploy"]) / "model.json").read_text())
    assert model_json["runtime"] == pick["runtime"] and model_json["deploy_precision"] == pick["precision"]
    assert model_json["precision"] == s["stages"][-1]["metrics"]["runtime/precision"]
    assert model_json["target"]["runtime"] == pick["runtime"]
    # the pick was measured by the pipeline on its own runtime: same accuracy as its candidate row
    assert s["stages"][-1]["metrics"]["acc/top1"] == pytest.approx(pick["metrics"]["acc/top1"])
    assert "pick" in (Path(s["run_dir"]) / "summary.md").read_text()
    assert all(c["why"] for c in candidates)


def test_every_candidate_is_a_nested_run_of_the_stage(shootout):
    _, s = shootout
    client = mlflow.MlflowClient()
    exp = client.get_run(s["mlflow_run_id"]).info.experiment_id
    (stage,) = client.search_runs([exp], f"tags.mlflow.parentRunId = '{s['mlflow_run_id']}' "
                                         "and tags.mlflow.runName = 'shootout'")
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{stage.info.run_id}'")
    by_name = {r.info.run_name.split("/")[-1]: r for r in children}
    assert set(by_name) == {c["name"] for c in s["pick"]["candidates"]}
    assert by_name[s["pick"]["name"]].data.metrics["shootout/pick"] == 1.0
    assert sum(r.data.metrics["shootout/pick"] for r in children) == 1.0
    assert np.isfinite(by_name[s["pick"]["name"]].data.metrics["latency/interleaved_ms"])


def test_a_latency_tie_goes_to_the_smallest_and_a_real_gap_to_the_fastest():
    def row(name, ms, size, ok=True):
        return {"name": name, "budget_ok": ok, "violations": [] if ok else ["acc/drop 2 not <= 1"],
                "metrics": {"latency/interleaved_ms": ms, "size/bytes": size, "acc/top1": 0.9}}

    rows = [row("fp32", 1.00, 4e6), row("int8", 1.03, 1e6), row("small-but-slow", 1.5, 0.5e6),
            row("tiny-but-inaccurate", 0.5, 0.1e6, ok=False)]
    pick, why = choose(rows, 0.05)
    assert rows[pick]["name"] == "int8" and "within 5% of the fastest" in why[pick]
    assert "latency tie" in why[0] and "slower" in why[2] and why[3].startswith("budget")
    pick, why = choose(rows, 0.0)
    assert rows[pick]["name"] == "fp32" and why[pick] == "fastest within the budget"
    rows[1]["metrics"]["latency/interleaved_ms"] = 1.2  # outside the tolerance: speed decides
    assert rows[choose(rows, 0.05)[0]]["name"] == "fp32"


def test_a_floor_no_candidate_meets_is_exit_1_with_the_table(tmp_path):
    with pytest.raises(BudgetExceeded) as e:
        testing.build(testing.shrink(tmp_path) + FAST + ["stages.shootout.rounds=1", "budget.max_acc_drop=-50",
                                                         "stages.shootout.runtimes=[onnxruntime]"],
                      tmp_path, recipe="runtime_shootout")
    summary = e.value.summary if hasattr(e.value, "summary") else e.value.args[0]
    assert not summary["budget"]["ok"]
    assert all(not c["budget_ok"] for c in summary["pick"]["candidates"])
    assert "no candidate meets the budget" in (Path(summary["run_dir"]) / "summary.md").read_text()
    (pick_check,) = [c for c in summary["budget"]["checks"] if c["budget"] == "candidates"]
    assert pick_check["source"] == "shootout" and pick_check["value"] == 0 and not pick_check["ok"]
    # the failure does not hang on the kept model's own check: with no limit on it, the build still fails
    assert not budget.check_pick(budget.check(summary["stages"][-1]["metrics"], []), summary["pick"])["ok"]
    assert budget.check_pick(budget.check({}, []), None)["ok"]  # no choosing stage: nothing added


class CopyOfONNXRuntime(ONNXRuntime):  # a newly registered runtime (its own format), e.g. just installed
    name = "ortcopy"
    format = "ortcopy"


def test_the_candidate_set_and_its_versions_are_in_the_cache_key(tmp_path):
    from importlib import metadata

    from edgebuild.pipeline import Builder
    from edgebuild.stage import build_stage
    from edgebuild.targets import RUNTIMES

    cfg = testing.compose(testing.shrink(tmp_path) + FAST, recipe="runtime_shootout")
    stage = build_stage("shootout", cfg.stages.shootout)
    inputs = stage.cache_inputs(cfg)["candidates"]
    assert inputs["onnxruntime"]["onnxruntime"] == metadata.version("onnxruntime")
    assert installed() <= set(inputs) and "openvino" in inputs
    builder = Builder(cfg, tmp_path / "run", "runtime_shootout")
    key = builder.stage_key(stage, [])
    RUNTIMES["ortcopy"] = f"{__name__}:CopyOfONNXRuntime"
    try:
        assert "ortcopy" in stage.cache_inputs(cfg)["candidates"] and builder.stage_key(stage, []) != key
    finally:
        del RUNTIMES["ortcopy"]
    assert builder.stage_key(stage, []) == key


def test_a_target_on_another_runtime_keeps_device_and_threads_and_drops_its_options():
    from edgebuild.targets import make_target

    cpu = make_target(testing.compose(["target.threads=1", "+target.options={INFERENCE_NUM_THREADS: 1}"]).target)
    other = cpu.for_runtime("onnxruntime")
    assert cpu.for_runtime("openvino") is cpu
    assert other.runtime.name == "onnxruntime" and other.cfg.threads == 1 and other.device == "CPU"
    assert dict(other.cfg.options) == {}  # OpenVINO's compile options mean nothing to another runtime
    assert other.cfg.precision in type(other.runtime).precisions
