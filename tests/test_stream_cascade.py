"""The cascade deployable in the stream (edgebuild/stream/model.py CascadeModel) on a shrunk cascade build: the
small model on every frame, the big one below the threshold; the escalation rate and latencies are measured, the
answers follow the cascade stage's rule, bad input is exit 2."""

import json
from pathlib import Path

import numpy as np
import pytest

from edgebuild import testing
from edgebuild.errors import EdgebuildError
from edgebuild.stages.cascade import escalates
from edgebuild.stream import measure, pipeline
from edgebuild.stream.__main__ import main
from edgebuild.stream.model import CascadeModel, from_deploy_dir
from edgebuild.stream.sources import Frame, MemorySource

QUICK = ["data=synthetic", "model.kwargs.width=8", "stages.big.epochs=2", "stages.small.epochs=2",
         "stages.cascade.latency_rounds=1", "stages.cascade.max_drop_pp=100",
         "stages.cascade.thresholds=[0.32,0.5,0.9]"]
STREAM = ["eval.stream.enabled=true", "eval.stream.seconds=1", "eval.stream.policy=block"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream_cascade")
    s = testing.build(testing.shrink(tmp) + QUICK + STREAM, tmp, recipe="cascade")
    return tmp, s


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(7)  # noise frames: the rule, not the accuracy, is under test
    return [Frame(i, rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for i in range(24)]


def test_the_build_streams_its_cascade_over_labelled_held_out_frames(built):
    _, s = built
    m = s["stages"][-1]["metrics"]
    assert m["stream/processed_frames"] == 30 and m["stream/dropped_frames"] == 0  # block: nothing dropped
    assert m["stream/cascade_threshold"] == m["cascade/threshold"]
    n_up = m["stream/cascade_escalated_frames"]
    assert m["stream/cascade_escalated"] == pytest.approx(n_up / 30)
    assert 0 <= m["stream/acc_top1"] <= 1 and "stream/e2e_p50_ms" in m and "energy/mj_per_inference" in m
    assert any("stream cascade at threshold" in n for n in s["notes"])


def test_streamed_answers_follow_the_cascade_rule(built, frames):
    _, s = built
    model = from_deploy_dir(Path(s["deploy"]))[0]
    assert isinstance(model, CascadeModel) and model.threshold == s["stages"][-1]["metrics"]["cascade/threshold"]
    small_logits = np.concatenate([model.small.infer(model.small.preprocess(f.pixels))[0] for f in frames])
    _, confidence = escalates(small_logits, 0.5)
    c = np.sort(confidence)
    threshold = float((c[len(c) // 2 - 1] + c[len(c) // 2]) / 2)  # between two frames: about half escalate
    model.threshold = threshold
    cfg = pipeline.StreamConfig(fps=1e6, frames=10**6, depth=2, policy="block")
    m, result = measure(model, MemorySource(frames), cfg, (2.0, 0.1), (1000.0, 3.7))
    up = confidence < threshold
    assert 0 < up.sum() < len(frames)
    assert m["stream/cascade_escalated"] == pytest.approx(up.mean())
    assert m["stream/cascade_escalated_frames"] == up.sum()
    for r, f, esc in zip(result.records, frames, up, strict=True):
        assert r.result["escalated"] == esc
        answer = model.big if esc else model.small
        logits = answer.infer(answer.preprocess(f.pixels))[0]
        assert r.result["label"] == int(np.argmax(logits))
        # the frame's inference time holds the small model's and, escalated, the big one's
        assert r.times["inference"] * 1000 >= r.result["small_ms"] + r.result["big_ms"]
        assert (r.result["big_ms"] > 0) == esc
    assert m["stream/cascade_e2e_p50_escalated_ms"] > 0 and m["stream/cascade_e2e_p50_small_ms"] > 0


@pytest.mark.parametrize("threshold, escalated", [(1.0, 1.0), (0.0, 0.0)])
def test_cli_streams_a_cascade_deploy_folder(built, tmp_path, threshold, escalated):
    js = tmp_path / "c.json"
    assert main([built[1]["deploy"], "--frames", "6", "--policy", "block", "--cascade-threshold", str(threshold),
                 "--json", str(js)]) == 0
    j = json.loads(js.read_text())
    assert j["stream/cascade_escalated"] == escalated and j["stream/processed_frames"] == 6
    assert j["stream/cascade_threshold"] == threshold and "stream/fps" in j


@pytest.mark.parametrize("args, says", [
    pytest.param(["--requests", "2"], "asynchronous", id="async-cascade"),
    pytest.param(["--cascade-threshold", "1.5"], "--cascade-threshold", id="threshold-out-of-range"),
])
def test_cascade_bad_input_is_exit_2(built, capsys, args, says):
    assert main([built[1]["deploy"], "--frames", "2", *args]) == 2
    err = capsys.readouterr().err
    assert says in err and "fix:" in err and "Traceback" not in err


def test_async_stream_of_a_cascade_build_is_refused_at_plan_time(tmp_path):
    from edgebuild.pipeline import plan

    with pytest.raises(EdgebuildError, match="a cascade streams synchronously"):
        plan(testing.compose(testing.shrink(tmp_path) + QUICK + STREAM + ["eval.stream.requests=2"], "cascade"))
