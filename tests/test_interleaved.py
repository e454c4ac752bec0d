"""One timing protocol across stages: at the end of a build every stage's deployable is timed again,
interleaved in rounds in one process; and every measured deployable records load, first call and the
precision that ran, on every CPU runtime."""

import mlflow
import numpy as np
import pytest

from edgebuild import evaluate, testing
from tests.conftest import FAST

INT8 = ["+stages.int8={kind: quantize, input: train}"]
STARTUP = ["latency/load_ms", "latency/first_ms", "runtime/precision"]


@pytest.fixture(scope="module")
def calls():
    """Every evaluate.interleaved call: how many sessions it timed, in how many rounds (the real function runs)."""
    return []


@pytest.fixture(scope="module")
def builds(tmp_path_factory, calls):
    tmp = tmp_path_factory.mktemp("interleaved")
    real = evaluate.interleaved

    def counted(sessions, shapes, cfg, rounds):
        calls.append((len(sessions), rounds))
        return real(sessions, shapes, cfg, rounds)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate, "interleaved", counted)
        overrides = testing.shrink(tmp, tracking=True) + FAST + INT8
        first = testing.build(overrides, tmp, run_name="first")
        n_first = len(calls)
        again = testing.build(overrides, tmp, run_name="again")
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    return first, again, n_first


def test_every_stage_latency_comes_from_one_interleaved_measurement(builds, calls):
    first, _, n_first = builds
    names = [st["name"] for st in first["stages"]]
    assert names == ["train", "export", "int8"]
    # quantize times INT8 vs float interleaved (2 sessions); the end of the build times all stages at once
    assert calls[:n_first].count((3, 3)) == 1 and calls[n_first - 1] == (3, 3)
    rounds = first["interleaved"]["round_medians_ms"]
    assert list(rounds) == names and all(len(r) == first["interleaved"]["rounds"] == 3 for r in rounds.values())
    base = np.median(rounds["train"])
    for st in first["stages"]:
        m = st["metrics"]
        assert m["latency/interleaved_ms"] == pytest.approx(np.median(rounds[st["name"]]))
        assert m["latency/speedup"] == pytest.approx(base / m["latency/interleaved_ms"])
        assert "latency/p50_ms" in m  # the stage's own timing stays beside it
    # the stage runs carry it too (recorded after they ended)
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_run(first["mlflow_run_id"]).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{first['mlflow_run_id']}'")
    by_name = {r.info.run_name: r.data.metrics for r in runs}
    for st in first["stages"]:
        assert by_name[st["name"]]["latency/interleaved_ms"] == pytest.approx(st["metrics"]["latency/interleaved_ms"])
    assert client.get_run(first["mlflow_run_id"]).data.metrics["latency/speedup"] == pytest.approx(
        first["stages"][-1]["metrics"]["latency/speedup"])


def test_a_cached_rebuild_is_re_measured_interleaved_and_stays_fast(builds, calls):
    first, again, n_first = builds
    assert all(st["cache_hit"] for st in again["stages"])
    assert calls[n_first:] == [(3, 3)]  # nothing but the final interleaved measurement: quantize did not run
    fresh = [st["metrics"]["latency/interleaved_ms"] for st in again["stages"]]
    old = [st["metrics"]["latency/interleaved_ms"] for st in first["stages"]]
    assert fresh != old  # timed again, not read from the cache
    assert again["seconds"] < first["seconds"] / 2


def test_rounds_zero_switches_it_off(tmp_path):
    s = testing.build(testing.shrink(tmp_path) + FAST + ["eval.latency.rounds=0", "stages.export=null"], tmp_path)
    assert "interleaved" not in s and "latency/interleaved_ms" not in s["stages"][0]["metrics"]


@pytest.mark.parametrize("target", ["cpu", "onnxruntime"])
def test_every_deployable_records_load_first_call_and_precision(target, tmp_path):
    s = testing.build(testing.shrink(tmp_path) + FAST + INT8 + [f"target={target}", "eval.latency.rounds=0"],
                      tmp_path)
    for st in s["stages"]:
        m = st["metrics"]
        assert all(k in m for k in STARTUP), (target, st["name"], [k for k in STARTUP if k not in m])
        assert m["latency/load_ms"] > 0 and m["latency/first_ms"] > 0
    precisions = {st["name"]: st["metrics"]["runtime/precision"] for st in s["stages"]}
    assert precisions["train"] == "fp32"
    assert precisions["int8"] == "int8"  # one vocabulary: OpenVINO's u8/i8 reads int8


def test_first_call_is_recorded_when_latency_is_off(tmp_path):
    s = testing.build(testing.shrink(tmp_path) + FAST + ["eval.latency.enabled=false", "stages.export=null"],
                      tmp_path)
    m = s["stages"][0]["metrics"]
    assert m["latency/first_ms"] > 0 and m["latency/load_ms"] > 0 and "latency/p50_ms" not in m
