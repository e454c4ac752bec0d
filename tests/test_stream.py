"""Streaming (edgebuild/stream): a real tiny SSD build streamed through real capture and inference threads.
Properties, not speeds: block drops nothing and keeps order, a tiny ring under a producer that is structurally
faster than inference drops and counts, streamed results equal the offline ones, the annotated video decodes with
the processed frame count, the energy arithmetic matches a hand-computed example, bad input is exit 2."""

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from edgebuild import testing
from edgebuild.errors import EdgebuildError
from edgebuild.stream import energy, measure, pipeline
from edgebuild.stream.__main__ import main
from edgebuild.stream.model import from_deploy_dir
from edgebuild.stream.sources import FolderSource, MemorySource, ShapesVideo, VideoSource
from tests.conftest import ROOT

SMALL = ["data.num_samples=200", "data.image_size=96", "model.kwargs.width=8", "stages.train.epochs=4",
         "stages.train.optimizer.lr=0.01", "data.batch_size=16", "budget.min_map=null", "budget.max_map_drop=null",
         "stages.quantize=null", "eval.stream.enabled=true", "eval.stream.seconds=1",
         "budget.min_fps=100000", "budget.max_e2e_latency_ms=1e9"]  # one stream budget no stream meets, one met
SWSCALE_MEAN_LEVELS = 1.0  # |swscale - PIL|, grey levels, mean over a 128x112 -> 96x80 frame (measured 0.2-0.3, max 2)
ACCEPTANCE_KEYS = ["stream/fps", "stream/offered_fps", "stream/dropped_frames", "stream/e2e_p50_ms",
                   "stream/e2e_p90_ms", "energy/mj_per_inference", "battery/hours"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from edgebuild.errors import BudgetExceeded

    tmp = tmp_path_factory.mktemp("stream")
    with pytest.raises(BudgetExceeded):  # budget.min_fps: the stream budget fails the build (exit 1)
        testing.build(testing.shrink(tmp) + SMALL, tmp, recipe="ssd_int8")
    return tmp, json.loads((tmp / "run" / "summary.json").read_text())


@pytest.fixture(scope="module")
def model(built):
    return from_deploy_dir(Path(built[1]["deploy"]))[0]


def frames_of(model, n, seed=0):
    video = ShapesVideo(model.width, model.height, num_classes=3, seed=seed)
    return [video.frame(i) for i in range(n)]


def stream(model, source, **kw):
    cfg = pipeline.StreamConfig(**{"fps": 1e6, "frames": 10**6, "depth": 2, **kw})
    return measure(model, source, cfg, (2.0, 0.1), (1000.0, 3.7))


def test_build_records_stream_metrics_on_the_final_stage(built):
    _, s = built
    m = s["stages"][-1]["metrics"]
    for key in ACCEPTANCE_KEYS + ["stream/e2e_p99_ms", "stream/map_50", "stream/load_ms", "stream/cpu_util"]:
        assert key in m, key
    assert m["stream/frames"] == 30 and m["stream/processed_frames"] + m["stream/dropped_frames"] == 30
    assert m["energy/estimated"] == 1.0 and m["energy/active_w"] == 7.5  # conf/target/cpu.yaml spec.power
    assert any("stream:" in n for n in s["notes"])


def test_block_policy_drops_nothing_and_keeps_order(model):
    frames = frames_of(model, 40)
    m, result = stream(model, MemorySource(frames), depth=1, policy="block")
    assert m["stream/dropped_frames"] == 0 and m["stream/processed_frames"] == m["stream/frames"] == 40
    assert [r.index for r in result.records] == list(range(40))


def test_a_tiny_ring_under_a_fast_producer_drops_and_reports(model):
    # the producer reads frames already in memory (microseconds), the consumer runs a network: it falls behind
    frames = frames_of(model, 60)
    m, result = stream(model, MemorySource(frames), depth=1, policy="drop_oldest")
    assert m["stream/dropped_frames"] > 0 and m["stream/dropped_frames"] == len(result.dropped)
    assert m["stream/processed_frames"] + m["stream/dropped_frames"] == m["stream/frames"] == 60
    processed = [r.index for r in result.records]
    assert processed == sorted(processed) and not set(processed) & set(result.dropped)
    assert m["stream/ring_high_water"] == 1


def test_latency_percentiles_are_ordered_and_cover_the_model(model):
    m, _ = stream(model, MemorySource(frames_of(model, 30)), fps=30.0)
    assert 0 < m["stream/e2e_p50_ms"] <= m["stream/e2e_p90_ms"] <= m["stream/e2e_p99_ms"] <= m["stream/e2e_max_ms"]
    # the e2e time of a frame contains its own preprocess + inference + postprocess
    assert m["stream/e2e_mean_ms"] >= m["stream/preprocess_ms"] + m["stream/inference_ms"] + m["stream/postprocess_ms"]
    assert abs(sum(m[f"stream/share_{s}"] for s in pipeline.STAGES) - 1) < 1e-9
    assert m["stream/cpu_util"] > 0 and m["stream/load_ms"] > 0


def test_streamed_detections_equal_the_offline_ones_in_order(model):
    frames = frames_of(model, 20)
    m, result = stream(model, MemorySource(frames), policy="block")
    assert [r.index for r in result.records] == list(range(20))
    for r, f in zip(result.records, frames, strict=True):
        offline = model.postprocess(model.infer(model.preprocess(f.pixels)), (model.width, model.height))
        for k in ("boxes", "scores", "labels"):
            np.testing.assert_array_equal(r.result[k], offline[k])
    from edgebuild.stream.quality import detection_map

    q = detection_map([r.result for r in result.records], [f.truth for f in frames])
    assert m["stream/map_50_95"] == q["map/50_95"] and m["stream/map_50"] == q["map/50"]


def test_frame_reuse_saves_inferences_and_measures_its_cost(model):
    frames = frames_of(model, 30)
    every, _ = stream(model, MemorySource(frames), policy="block")
    m, result = stream(model, MemorySource(frames), policy="block", reuse_threshold=1.0)  # everything but the first
    assert m["stream/inferences"] == 1 and m["stream/reuse_fraction"] == pytest.approx(29 / 30)
    assert all(r.reused for r in result.records[1:])
    # the reference is every frame inferred: exactly the stream without reuse on the same frames
    assert m["stream/map_50_95_every_frame"] == every["stream/map_50_95"]
    assert m["stream/reuse_map_cost"] == pytest.approx((every["stream/map_50_95"] - m["stream/map_50_95"]) * 100)
    off, _ = stream(model, MemorySource(frames), policy="block", reuse_threshold=0.0)
    assert off["stream/reused_frames"] == 0


def test_moving_shapes_video_is_seeded_exact_and_moves():
    v = ShapesVideo(96, 96, seed=3)
    a, b = v.frame(5), ShapesVideo(96, 96, seed=3).frame(5)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    np.testing.assert_array_equal(a.truth["boxes"], b.truth["boxes"])
    later = v.frame(25)
    assert len(later.truth["boxes"]) == len(a.truth["boxes"]) >= 1
    assert not np.array_equal(later.truth["boxes"], a.truth["boxes"])  # the shapes moved
    x1, y1, x2, y2 = a.truth["boxes"][0].astype(int)  # the box is tight on the drawn shape
    assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 96


def test_still_periods_hold_the_scene_and_are_seeded():
    v = ShapesVideo(96, 96, seed=3, still=0.5, slow=0.2)
    speeds = [v.speed(i) for i in range(600)]
    assert set(speeds) <= {0.0, ShapesVideo.SLOW_SPEED, 1.0} and {0.0, 1.0} <= set(speeds)
    assert 0.2 < speeds.count(0.0) / 600 < 0.8  # expected 0.5, over ~20 seeded segments
    again = ShapesVideo(96, 96, seed=3, still=0.5, slow=0.2)
    np.testing.assert_array_equal(again.frame(400).pixels, v.frame(400).pixels)  # any order: the same frame
    i = speeds.index(0.0)  # a still step: the next frame has the same boxes, only the noise differs
    a, b = v.frame(i), v.frame(i + 1)
    np.testing.assert_array_equal(a.truth["boxes"], b.truth["boxes"])
    assert not np.array_equal(a.pixels, b.pixels)
    moving = ShapesVideo(96, 96, seed=3)  # the default: every frame moves, the clock is the frame index
    assert moving.scene_time(7) == 7 and moving.describe().endswith("seed 3")
    with pytest.raises(EdgebuildError, match="still"):
        ShapesVideo(96, 96, still=0.7, slow=0.4)


def test_reuse_compares_block_means_so_sensor_noise_reads_as_still(model):
    frozen = ShapesVideo(model.width, model.height, seed=1, still=1.0)  # nothing moves; new noise every frame
    frames = [frozen.frame(i) for i in range(12)]
    sampled = np.abs(frames[1].pixels[::8, ::8].astype(float) - frames[0].pixels[::8, ::8]).mean() / 255
    assert sampled > 0.02  # every 8th pixel: the noise alone exceeds the threshold
    m, _ = stream(model, MemorySource(frames), policy="block", reuse_threshold=0.02)
    assert m["stream/inferences"] == 1 and m["stream/reused_frames"] == 11


def test_busy_time_is_the_union_of_the_frames_work_intervals():
    assert pipeline.union_seconds([(0, 2), (1, 3), (5, 6)]) == 4
    assert pipeline.union_seconds([(0, 1), (0.2, 0.5)]) == 1 and pipeline.union_seconds([]) == 0
    # two async requests overlapping by 20 ms: 30 ms of work each, 40 ms busy in all
    times = {"decode": 0.001, "preprocess": 0.005, "inference": 0.020, "postprocess": 0.005}
    records = [pipeline.Record(i, t0 - 0.002, t0 + 0.030, times, False, {}, None, (8, 8), (t0, t0 + 0.030))
               for i, t0 in enumerate((0.0, 0.010))]
    ring = pipeline.Ring(2, "block")
    m = pipeline.summarize(records, ring, [-0.002, 0.008], pipeline.StreamConfig(fps=100.0, frames=2, requests=2),
                           cpu=0.05, wall=0.05, t_start=None, model=type("M", (), {"load_ms": 1.0})())
    assert m["stream/work_ms_per_inference"] == pytest.approx(30.0)
    assert m["stream/busy_ms_per_inference"] == pytest.approx(20.0)  # 40 ms / 2 inferences, not 30
    e = energy.for_stream(m, 2.0, 0.1, 1000, 3.7)
    assert e["energy/mj_per_inference"] == pytest.approx(40.0)  # 2 W x 20 ms
    assert e["energy/busy_fraction"] == pytest.approx(0.8)  # 2 inferences / 0.05 s x 20 ms


def test_energy_arithmetic_matches_a_hand_computed_example():
    e = energy.estimate(busy_s=0.020, inferences_per_s=10, active_w=2.0, idle_w=0.1, battery_mah=1000, battery_v=3.7)
    assert e["energy/busy_fraction"] == pytest.approx(0.2)
    assert e["energy/mj_per_inference"] == pytest.approx(40.0)
    assert e["energy/avg_power_w"] == pytest.approx(0.48)
    assert e["battery/hours"] == pytest.approx(3.7 / 0.48)
    active, idle, _ = energy.device_powers({"active_ma": {"int8": 100.0}, "sleep_ma": 1.0, "volts": 3.3}, "int8")
    assert (active, idle) == (pytest.approx(0.33), pytest.approx(0.0033))


def test_cli_annotates_a_decodable_video_and_writes_the_json(built, tmp_path):
    out, js = tmp_path / "a.mp4", tmp_path / "s.json"
    p = subprocess.run([sys.executable, "-m", "edgebuild.stream", built[1]["deploy"], "--source", "shapes", "--fps",
                        "30", "--frames", "24", "--policy", "block", "--annotate", str(out), "--json", str(js)],
                       capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin"},
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert "processed FPS" in p.stdout and "e2e latency" in p.stdout
    j = json.loads(js.read_text())
    assert all(k in j for k in ACCEPTANCE_KEYS) and j["stream/processed_frames"] == 24
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 24 == j["stream/annotated_frames"]
    # the annotated video streams back in as a video file; its frames as a folder
    video = VideoSource(str(out))
    m, _ = stream(from_deploy_dir(Path(built[1]["deploy"]))[0], video, policy="block")
    assert m["stream/processed_frames"] == 24 and "stream/map_50" not in m  # no ground truth in a file


def test_folder_source_streams_every_file_and_resizes(model, tmp_path):
    from PIL import Image

    for f in ShapesVideo(64, 48).frame(0), ShapesVideo(64, 48).frame(1):
        Image.fromarray(f.pixels).save(tmp_path / f"frame_{f.index:03d}.png")
    m, result = stream(model, FolderSource(tmp_path), policy="block")
    assert m["stream/processed_frames"] == 2 and result.notes and "resized" in result.notes[0]
    assert all(r.size == (64, 48) for r in result.records)


@pytest.mark.parametrize("args, says", [
    pytest.param(["{missing}"], "does not exist", id="missing-deploy-dir"),
    pytest.param(["{bad_json}"], "model.json", id="malformed-model-json"),
    pytest.param(["{deploy}", "--source", "/nonexistent/video.mp4"], "does not exist", id="missing-source"),
    pytest.param(["{deploy}", "--source", "{corrupt}"], "cannot be opened as video", id="corrupt-video"),
    pytest.param(["{deploy}", "--fps", "0"], "--fps", id="fps-zero"),
    pytest.param(["{deploy}", "--fps", "-5"], "--fps", id="fps-negative"),
    pytest.param(["{deploy}", "--depth", "0"], "ring depth", id="ring-depth-0"),
    pytest.param(["{deploy}", "--still", "1.5"], "--still", id="still-above-1"),
    pytest.param(["{deploy}", "--still", "0.6", "--slow", "0.6"], "summing to at most 1", id="still-plus-slow"),
    pytest.param(["{deploy}", "--still", "0.5", "--source", "{corrupt}"], "generated video", id="still-on-a-file"),
], )
def test_bad_input_is_exit_2_with_one_message(built, tmp_path, capsys, args, says):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.json").write_text("{not json")
    corrupt = tmp_path / "video.mp4"
    corrupt.write_bytes(b"\x00garbage" * 100)
    paths = {"missing": str(tmp_path / "nope"), "bad_json": str(bad), "deploy": built[1]["deploy"],
             "corrupt": str(corrupt)}
    assert main([a.format(**paths) for a in args]) == 2
    err = capsys.readouterr().err
    assert says in err and "fix:" in err and "Traceback" not in err


def test_missing_video_from_the_command_line_is_clean(built):
    p = subprocess.run([sys.executable, "-m", "edgebuild.stream", built[1]["deploy"], "--source", "/nonexistent.mp4"],
                       capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin"}, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "fix:" in p.stderr


def test_eval_stream_options_are_checked_at_plan_time(tmp_path):
    from edgebuild.pipeline import plan

    with pytest.raises(EdgebuildError, match="eval.stream.policy"):
        plan(testing.compose(testing.shrink(tmp_path) + ["eval.stream.policy=newest"]))
    with pytest.raises(EdgebuildError, match="eval.stream.depth"):
        plan(testing.compose(testing.shrink(tmp_path) + ["eval.stream.depth=0"]))
    with pytest.raises(EdgebuildError, match="eval.stream.fps"):
        plan(testing.compose(testing.shrink(tmp_path) + ["eval.stream.fps=0"]))


# ------------------------------------------------------------------ budgets, summary, report
def test_stream_budgets_are_checked_like_the_others(built):
    from edgebuild.summary import markdown, stream_rows

    _, s = built
    checks = {c["budget"]: c for c in s["budget"]["checks"]}
    assert not s["budget"]["ok"]
    assert checks["min_fps"]["metric"] == "stream/fps" and not checks["min_fps"]["ok"]
    assert checks["max_e2e_latency_ms"]["metric"] == "stream/e2e_p90_ms" and checks["max_e2e_latency_ms"]["ok"]
    md = markdown(s)
    assert "## Stream" in md and "## Budget: VIOLATED" in md and "min_fps" in md
    header, rows = stream_rows([("final", s["stages"][-1]["metrics"])])
    assert "processed FPS" in header and "energy from" in header and rows[0][header.index("energy from")] in (
        "model", "rapl")


def test_report_has_a_stream_section(built):
    from edgebuild.report import Report

    _, s = built
    build = {"run_id": "0" * 32, "name": "b", "params": {}, "tags": {}, "status": "FINISHED", "metrics": {},
             "stages": [{**st, "tags": {}, "params": {}} for st in s["stages"]]}
    sections = dict(Report([build], "t", [("stream/fps", "max")]).sections())
    assert any(h.startswith("Stream") for h in sections)


def test_stream_budget_without_a_stream_and_async_without_the_runtime_are_refused_at_plan_time(tmp_path):
    from edgebuild.pipeline import plan

    with pytest.raises(EdgebuildError, match="budget.min_fps.*eval.stream.enabled"):
        plan(testing.compose(testing.shrink(tmp_path) + ["budget.min_fps=10"]))
    with pytest.raises(EdgebuildError, match="eval.stream.requests=2"):
        plan(testing.compose(testing.shrink(tmp_path) + ["target=onnxruntime", "eval.stream.requests=2"]))
    plan(testing.compose(testing.shrink(tmp_path) + ["eval.stream.requests=2", "eval.stream.enabled=true",
                                                     "budget.min_fps=10"]))  # OpenVINO has them


# ------------------------------------------------------------------ async requests
def test_async_requests_give_the_offline_results_in_order(model):
    frames = frames_of(model, 16, seed=2)
    m, result = stream(model, MemorySource(frames), policy="block", requests=2)
    assert m["stream/requests"] == 2 and m["stream/dropped_frames"] == 0
    assert [r.index for r in result.records] == list(range(16))
    for r, f in zip(result.records, frames, strict=True):
        offline = model.postprocess(model.infer(model.preprocess(f.pixels)), (model.width, model.height))
        for k in ("boxes", "scores", "labels"):
            np.testing.assert_array_equal(r.result[k], offline[k])
    # busy time counts the overlap of in-flight requests once: never more than the summed work, nor the wall time
    busy = m["stream/busy_ms_per_inference"] * m["stream/inferences"] / 1000
    assert busy <= m["stream/work_ms_per_inference"] * m["stream/inferences"] / 1000 + 1e-9
    assert busy <= m["stream/wall_s"]
    # reuse with async: the reused frames take the result of the last inferred frame before them
    m, result = stream(model, MemorySource(frames), policy="block", requests=3, reuse_threshold=1.0)
    assert m["stream/inferences"] == 1 and all(r.result is result.records[0].result for r in result.records)


def test_async_requests_on_a_runtime_without_them_is_exit_2(model, built, capsys):
    from edgebuild.stream.model import StreamModel

    sync_only = StreamModel(model.meta, model.session, model.load_ms, model.options, "a sync runtime", False)
    with pytest.raises(EdgebuildError, match="asynchronous"):
        stream(sync_only, MemorySource(frames_of(model, 2)), requests=2)
    assert main([built[1]["deploy"], "--requests", "0"]) == 2 and "requests" in capsys.readouterr().err


def test_cli_compares_async_with_synchronous_inference(built, tmp_path):
    js = tmp_path / "a.json"
    assert main([built[1]["deploy"], "--frames", "8", "--policy", "block", "--requests", "2", "--json",
                 str(js)]) == 0
    j = json.loads(js.read_text())
    assert j["stream/requests"] == 2 and j["compare"]["synchronous (1 request)"]["stream/requests"] == 1
    assert j["stream/processed_frames"] == j["compare"]["synchronous (1 request)"]["stream/processed_frames"] == 8


# ------------------------------------------------------------------ energy: RAPL counters or the stated model
def test_rapl_counters_are_read_from_powercap_with_wraparound(tmp_path):
    for zone, uj in (("intel-rapl:0", 900), ("intel-rapl:1", 100), ("intel-rapl:0:0", 5)):  # a subzone: not summed
        (tmp_path / zone).mkdir()
        (tmp_path / zone / "energy_uj").write_text(f"{uj}\n")
        (tmp_path / zone / "max_energy_range_uj").write_text("1000\n")
    meter = energy.Rapl.open(str(tmp_path))
    assert [z.name for z in meter.zones] == ["intel-rapl:0", "intel-rapl:1"]
    meter.begin()
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("100\n")  # wrapped: 900 -> 1000 -> 100 = 200 uJ
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("400\n")  # 300 uJ
    assert meter.joules() == pytest.approx(500e-6)
    assert energy.Rapl.open(str(tmp_path / "none")) is None
    m = {"stream/inferences": 10, "stream/wall_s": 2.0, "stream/busy_ms_per_inference": 20.0}
    measured = energy.for_stream(m, 2.0, 0.1, 1000, 3.7, rapl_j=1.0)
    assert measured["energy/source"] == "rapl" and measured["energy/mj_per_inference"] == pytest.approx(100.0)
    assert measured["energy/avg_power_w"] == pytest.approx(0.5) and measured["battery/hours"] == pytest.approx(7.4)
    assert measured["energy/model_mj_per_inference"] == pytest.approx(40.0)  # the estimate kept beside it
    modelled = energy.for_stream(m, 2.0, 0.1, 1000, 3.7, rapl_j=1.0, source="model")
    assert modelled["energy/source"] == "model" and modelled["energy/mj_per_inference"] == pytest.approx(40.0)


# ------------------------------------------------------------------ the runner shipped in deploy/
def test_standalone_runner_reproduces_the_streams_detections(built, model, tmp_path):
    from PIL import Image

    deploy = Path(built[1]["deploy"])
    assert (deploy / "stream.py").is_file() and (deploy / "postprocess.py").is_file()
    frames = tmp_path / "frames"
    frames.mkdir()
    for f in frames_of(model, 8, seed=4):
        Image.fromarray(f.pixels).save(frames / f"f{f.index:03d}.png")
    _, result = stream(model, FolderSource(frames), policy="block")
    out = tmp_path / "det.jsonl"
    # -I: no PYTHONPATH, no user site, no script folder; cwd outside the repository: edgebuild cannot be imported
    p = subprocess.run([sys.executable, "-I", str(deploy / "stream.py"), str(deploy), "--source", str(frames),
                        "--out", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "8 frames processed" in p.stdout
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["index"] for x in lines] == [r.index for r in result.records] == list(range(8))
    for x, r in zip(lines, result.records, strict=True):
        np.testing.assert_array_equal(np.asarray(x["labels"]), r.result["labels"])
        np.testing.assert_allclose(np.asarray(x["boxes"]).reshape(-1, 4), r.result["boxes"], atol=1e-4)
        np.testing.assert_allclose(np.asarray(x["scores"]), r.result["scores"], atol=1e-5)
    # frames of another size: the runner resizes as the stream does (PIL) and gives boxes in the frame's pixels
    big = tmp_path / "big"
    big.mkdir()
    video = ShapesVideo(128, 112, seed=4)
    for i in range(4):
        Image.fromarray(video.frame(i).pixels).save(big / f"f{i:03d}.png")
    _, result = stream(model, FolderSource(big), policy="block")
    out = tmp_path / "big.jsonl"
    p = subprocess.run([sys.executable, "-I", str(deploy / "stream.py"), str(deploy), "--source", str(big),
                        "--out", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    for x, r in zip([json.loads(x) for x in out.read_text().splitlines()], result.records, strict=True):
        np.testing.assert_array_equal(np.asarray(x["labels"]), r.result["labels"])
        np.testing.assert_allclose(np.asarray(x["boxes"]).reshape(-1, 4), r.result["boxes"], atol=1e-3)
    bad = subprocess.run([sys.executable, "-I", str(deploy / "stream.py"), str(deploy), "--source",
                          str(tmp_path / "nope.mp4")], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "does not exist" in bad.stderr


def test_runner_converts_frames_as_the_stream_does(model):
    from PIL import Image

    from edgebuild.stream import runner

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    np.testing.assert_array_equal(runner.grey(rgb)[..., 0], np.asarray(Image.fromarray(rgb).convert("L")))
    frame = ShapesVideo(128, 112, seed=2).frame(0).pixels
    for channels in (1, 3):
        stream_way = runner.converter(channels, 96, 80, use_pil=True)
        assert stream_way.by == "PIL"
        ref = np.asarray(Image.fromarray(frame).convert("L") if channels == 1 else Image.fromarray(frame))
        ref = np.asarray(Image.fromarray(ref).resize((96, 80), Image.BILINEAR)).reshape(80, 96, -1)
        np.testing.assert_array_equal(stream_way(frame), ref)
        # without Pillow: swscale's bilinear, within a few grey levels of PIL's on average
        fallback = runner.converter(channels, 96, 80, use_pil=False)(frame)
        assert fallback.shape == ref.shape
        assert np.abs(fallback.astype(int) - ref).mean() < SWSCALE_MEAN_LEVELS


# ------------------------------------------------------------------ soak and Ctrl-C
def test_soak_a_few_hundred_frames_keeps_the_ring_bounded_and_leaves_no_threads(model):
    import threading

    before = {t.ident for t in threading.enumerate()}
    for requests in (1, 2):
        # a camera-paced source far faster than inference: the ring stays at its depth, the rest is dropped
        m, result = stream(model, ShapesVideo(model.width, model.height, seed=5, frames=300), fps=1000.0, depth=3,
                           requests=requests)
        assert m["stream/frames"] == 300 and m["stream/processed_frames"] + m["stream/dropped_frames"] == 300
        assert m["stream/ring_high_water"] <= 3
        processed = [r.index for r in result.records]
        assert processed == sorted(processed) and len(set(processed)) == len(processed)
    left = [t.name for t in threading.enumerate() if t.ident not in before and t.name.startswith("stream-")]
    assert not left


def test_ctrl_c_stops_both_threads_with_a_partial_table_and_no_half_written_file(built, tmp_path):
    import signal

    js = tmp_path / "out.json"
    p = subprocess.Popen([sys.executable, "-m", "edgebuild.stream", built[1]["deploy"], "--source", "shapes",
                          "--fps", "30", "--seconds", "600", "--json", str(js)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin", "PYTHONFAULTHANDLER": "1"},
                         # the default SIGINT action even when the suite runs in the background (`cmd &` without job
                         # control ignores SIGINT and children inherit it: the stream would rightly go on)
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in p.stderr:  # the first result is ready: the stream runs
            if "first result" in line:
                break
        p.send_signal(signal.SIGINT)
        try:
            out, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # a hang: every thread's stack (faulthandler on SIGABRT) into the failure
            p.send_signal(signal.SIGABRT)
            out, err = p.communicate(timeout=30)
            pytest.fail(f"no exit 60 s after Ctrl-C; the threads' stacks:\n{err[-6000:]}")
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert "INTERRUPTED" in out and "processed FPS" in out
    j = json.loads(js.read_text())  # complete JSON (written atomically), marked partial
    assert j["stream/interrupted"] == 1 and 1 <= j["stream/processed_frames"] < 18000
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out.json"]  # no temporary file left


# ------------------------------------------------------------------ bounded memory over long streams
def test_latency_percentiles_are_exact_then_within_the_stated_error_in_fixed_memory():
    from edgebuild.stream.stats import Quantiles

    rng = np.random.default_rng(0)  # a long synthetic stream: a lognormal body, a heavy (Pareto) tail, sub-µs values
    x = np.concatenate([rng.lognormal(2.5, 0.4, 60_000), rng.pareto(1.5, 20_000) * 30 + 5, rng.uniform(0, 1e-3, 20)])
    rng.shuffle(x)
    q = Quantiles(exact=1000)
    for v in x[:1000]:
        q.add(v)
    assert q.exact and [q.percentile(p) for p in (0, 50, 90, 99, 100)] == list(np.percentile(x[:1000], [0, 50, 90,
                                                                                                          99, 100]))
    for v in x[1000:40_000]:
        q.add(v)
    assert not q.exact and q.values is None
    nbytes = q.counts.nbytes
    for v in x[40_000:]:
        q.add(v)
    assert q.counts.nbytes == nbytes < 20_000 and q.n == len(x)  # the histogram's size does not grow
    for p in (0, 0.1, 1, 10, 50, 90, 99, 99.9, 100):  # the bound the docs state, relative, for values >= 1 µs
        exact = np.percentile(x, p)
        assert abs(q.percentile(p) - exact) <= q.rel_error * exact * (1 + 1e-9), p
    assert q.max == x.max() and q.min == x.min() and q.mean() == pytest.approx(x.mean(), rel=1e-12)


def test_busy_union_kept_incrementally_equals_the_sorted_union():
    from edgebuild.stream.stats import BusyUnion

    rng = np.random.default_rng(1)  # async-like: overlapping work with gaps, arriving a few places out of order
    starts = np.cumsum(rng.uniform(0, 0.02, 3000))
    intervals = [(float(a), float(a + rng.uniform(0.001, 0.025))) for a in starts]
    order = np.argsort(np.arange(len(intervals)) + rng.uniform(0, 8, len(intervals)))
    u = BusyUnion(window=16)
    for i in order:
        u.add(*intervals[i])
    assert len(u.heap) <= 16 and u.seconds() == pytest.approx(pipeline.union_seconds(intervals), rel=1e-12)


def test_a_stream_longer_than_its_record_bound_keeps_the_bound_and_the_full_metrics(model):
    frames = frames_of(model, 30, seed=6)
    seen = []
    cfg = pipeline.StreamConfig(fps=1e6, frames=10**6, depth=2, policy="block", keep_records=8)
    m, result = measure(model, MemorySource(frames), cfg, (2.0, 0.1), (1000.0, 3.7), on_result=seen.append)
    assert len(seen) == 30 and [r.index for r in result.records] == list(range(22, 30))  # the last 8 kept
    # every metric but quality equals the computation over all 30 records (exact region: 30 < EXACT_LATENCIES)
    e2e = np.asarray([(r.t_done - r.t_capture) * 1000.0 for r in seen])
    assert m["stream/processed_frames"] == m["stream/frames"] == m["stream/inferences"] == 30
    for p in (50, 90, 99):
        assert m[f"stream/e2e_p{p}_ms"] == np.percentile(e2e, p)
    assert m["stream/e2e_mean_ms"] == e2e.mean() and m["stream/e2e_max_ms"] == e2e.max()
    assert m["stream/e2e_rel_error"] == 0 and not any("histogram" in n for n in result.notes)
    assert m["stream/fps"] == pytest.approx(29 / (seen[-1].t_done - seen[0].t_done), rel=1e-12)
    for s in pipeline.STAGES:
        assert m[f"stream/{s}_ms"] == pytest.approx(sum(r.times[s] for r in seen) * 1000 / 30, rel=1e-12)
    assert m["stream/busy_ms_per_inference"] == pytest.approx(
        pipeline.union_seconds([r.span for r in seen]) * 1000 / 30, rel=1e-12)
    # quality over the kept frames, and said so
    from edgebuild.stream.quality import detection_map

    assert m["stream/quality_frames"] == 8
    q = detection_map([r.result for r in result.records], [frames[r.index].truth for r in result.records])
    assert m["stream/map_50_95"] == q["map/50_95"]
    assert any("last 8 processed frames of 30" in n for n in result.notes)
    # reuse's cost over the kept window: the kept frames inferred again equal the stream without reuse on them
    cfg = pipeline.StreamConfig(fps=1e6, frames=10**6, depth=2, policy="block", keep_records=8, reuse_threshold=1.0)
    m, result = measure(model, MemorySource(frames), cfg, (2.0, 0.1), (1000.0, 3.7))
    assert m["stream/inferences"] == 1 and m["stream/reused_frames"] == 29 and len(result.records) == 8
    every = detection_map([seen[r.index].result for r in result.records], [frames[r.index].truth for r in
                                                                           result.records])
    assert m["stream/map_50_95_every_frame"] == every["map/50_95"]


def test_dropped_frames_are_counted_beyond_the_kept_indices(model):
    frames, seen = frames_of(model, 60), []
    cfg = pipeline.StreamConfig(fps=1e6, frames=10**6, depth=1, policy="drop_oldest", keep_records=3)
    m, result = measure(model, MemorySource(frames), cfg, (2.0, 0.1), (1000.0, 3.7), on_result=seen.append)
    dropped = sorted(set(range(60)) - {r.index for r in seen})  # every frame was captured: the rest were dropped
    assert m["stream/dropped_frames"] == len(dropped) > 3 and m["stream/processed_frames"] == len(seen)
    assert result.dropped == dropped[-3:] and [r.index for r in result.records] == [r.index for r in seen[-3:]]


def test_cli_keep_records_bounds_the_quality_window_and_is_checked(built, tmp_path, capsys):
    js = tmp_path / "k.json"
    assert main([built[1]["deploy"], "--frames", "12", "--policy", "block", "--keep-records", "4", "--json",
                 str(js)]) == 0
    j = json.loads(js.read_text())
    assert j["stream/processed_frames"] == 12 and j["stream/quality_frames"] == 4 and "stream/map_50" in j
    assert main([built[1]["deploy"], "--keep-records", "-1"]) == 2 and "keep-records" in capsys.readouterr().err


def test_generated_video_keeps_one_segment_and_draws_any_frame_again():
    v = ShapesVideo(64, 64, seed=2, still=0.4, slow=0.3)
    forward = [v.scene_time(i) for i in range(900)]
    assert isinstance(v._segment, tuple)  # one segment's state, not a list per frame
    assert [v.scene_time(i) for i in (850, 3, 500, 0, 899)] == [forward[i] for i in (850, 3, 500, 0, 899)]
    assert forward == list(np.cumsum([0.0] + [v.speed(i) for i in range(899)]))  # the clock sums the speeds
