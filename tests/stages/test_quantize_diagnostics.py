"""Issue 16: quantize with the target device's own scheme, calibration methods, the per-layer sensitivity
report and float_layers=auto, on the tiny CNN and generated data (one trained model for the module)."""

import json
import math
from pathlib import Path

import openvino as ov
import pytest

from edgebuild import report, testing
from edgebuild.errors import EdgebuildError
from edgebuild.stages.quantize import Quantize
from edgebuild.stages.sensitivity import choose, order
from edgebuild.targets import Target
from edgebuild.targets.openvino import COMPUTE_LAYERS
from tests.conftest import FAST

SENSITIVE = "+stages.quantize={kind: quantize, sensitivity: true, sensitivity_top: 1, float_layers: auto, " \
            "max_drop: 0.05, calibration: {method: mean_minmax, samples: 16}}"


def stage(summary, name):
    return next(s for s in summary["stages"] if s["name"] == name)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("quantdiag")


def quick(cache, *extra, tracking=False):
    # one epoch and no end-of-build latency rounds: this module checks quantization, not speed
    return [*testing.shrink(cache, tracking=tracking), *FAST, "stages.train.epochs=1", "eval.latency.rounds=0",
            "budget.min_acc=null",
            "stages.export=null", *extra]


@pytest.fixture(scope="module")
def npu(cache):
    """train -> quantize with sensitivity + float_layers=auto for the NPU target (absent: CPU proxy), tracked."""
    return testing.build(quick(cache, "target=vpu", SENSITIVE, tracking=True), cache, run_name="npu")


def test_npu_target_is_quantized_with_nncf_npu_scheme_and_the_method_is_recorded(npu):
    m = stage(npu, "quantize")["metrics"]
    assert m["quantize/target_device"] == "NPU"  # conf/target/vpu.yaml device: NPU -> nncf.TargetDevice.NPU
    assert m["quantize/calibration_method"] == "mean_minmax" and m["quantize/calibration_samples"] == 16
    assert m["quantize/float_precision"] == "fp16"  # what stays float on an NPU
    assert m["int8/ops_fraction"] > 0


def test_sensitivity_table_has_one_ranked_row_per_quantizable_layer(npu):
    q = stage(npu, "quantize")
    float_ir = ov.Core().read_model(str(Path(stage(npu, "train")["deployable"]) / "model.xml"))
    compute = {op.get_friendly_name() for op in float_ir.get_ops() if op.get_type_name() in COMPUTE_LAYERS}
    rows = json.loads((Path(q["artifact"]) / "sensitivity.json").read_text())
    assert {r["layer"] for r in rows} == compute and len(rows) == len(compute) >= 3
    sqnr = [r["sqnr_db"] for r in rows]
    assert all(v is not None and math.isfinite(v) for v in sqnr) and sqnr == sorted(sqnr)
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1)) and all(r["mse"] >= 0 for r in rows)
    checked = [r for r in rows if r["metric_drop"] is not None]
    assert [r["layer"] for r in checked] == [rows[0]["layer"]]  # sensitivity_top=1: the worst layer only
    m = q["metrics"]
    for r in checked:  # keeping one layer in float does not cost accuracy beyond a few validation images
        assert r["metric_float_kept"] >= m["quantize/val_int8"] - 0.05
        assert r["metric_drop"] == pytest.approx(m["quantize/val_float"] - r["metric_float_kept"])
    assert m["quantize/sensitivity_layers"] == len(rows) and m["quantize/sensitivity_seconds"] > 0
    # cost: the full INT8 + one per checked layer (+ any auto sets); float + INT8 + one per checked layer
    assert m["quantize/sensitivity_quantizations"] >= 1 + len(checked)
    assert m["quantize/sensitivity_evaluations"] >= 2 + len(checked)
    for f in ("sensitivity.csv", "sensitivity.md", "sensitivity.png"):
        assert (Path(q["artifact"]) / f).stat().st_size > 0, f
    md = (Path(q["artifact"]) / "sensitivity.md").read_text()
    assert rows[0]["layer"] in md and "validation evaluations" in md


def test_sensitivity_layer_names_are_accepted_by_ignored_names(npu, cache):
    """A row copied into the recipe keeps that layer out of INT8 (it shows up in fp_layers.json)."""
    worst = json.loads((Path(stage(npu, "quantize")["artifact"]) / "sensitivity.json").read_text())[0]["layer"]
    s = testing.build(quick(cache, "target=vpu", f"+stages.quantize={{kind: quantize, ignored_names: ['{worst}']}}"),
                      cache, run_name="copied")
    q = stage(s, "quantize")
    assert q["metrics"]["quantize/fp_layers"] >= 1 and q["metrics"]["int8/ops_fraction"] < 1.0
    assert "quantize/sensitivity_layers" not in q["metrics"]  # no report unless asked


def test_float_layers_auto_meets_max_drop_on_validation(npu):
    m = stage(npu, "quantize")["metrics"]
    reached = m["quantize/val_float"] - m["quantize/val_mixed"] <= 0.05 + 1e-9
    assert reached or any("NOT reached" in n for n in npu["notes"])
    assert m["quantize/float_layers_auto"] <= m["quantize/sensitivity_layers"]
    if m["quantize/val_float"] - m["quantize/val_int8"] <= 0.05:  # INT8 already within: nothing kept float
        assert m["quantize/float_layers_auto"] == 0


def test_float_layers_auto_reads_each_layers_latency_cost_from_the_runtime_profile(npu):
    q = stage(npu, "quantize")
    m = q["metrics"]
    assert m["quantize/float_layers_cost_source"].startswith("openvino per-layer profile on CPU (CPU proxy)")
    rows = json.loads((Path(q["artifact"]) / "sensitivity.json").read_text())
    # every convolution is an executed node of the profile under its own name (the classifier's MatMul runs
    # fused under its bias Add's name: unprofiled, so ranked last among layers recovering as much)
    convs = [r for r in rows if r["type"] == "Convolution"]
    assert len(convs) >= 3 and all(r["latency_cost_ms"] is not None for r in convs)
    assert "latency cost ms" in (Path(q["artifact"]) / "sensitivity.md").read_text()
    kept = [r for r in rows if r["kept_in_float"]]
    assert len(kept) == m["quantize/float_layers_auto"]
    if all(r["latency_cost_ms"] is not None for r in kept):
        assert m["quantize/float_layers_cost_ms"] == pytest.approx(sum(r["latency_cost_ms"] for r in kept))
    else:
        assert "quantize/float_layers_cost_ms" not in m
    assert m["quantize/calibrate_seconds"] > 0


def test_greedy_choice_prefers_the_cheaper_of_layers_that_recover_about_as_much():
    """Within max_drop / 2 of the best recovery left, the layer with the smaller profiled cost goes first."""
    rows = [{"layer": "a", "sqnr_db": 5.0, "recovered": 0.05, "metric_float_kept": 0.85, "latency_cost_ms": 1.0},
            {"layer": "b", "sqnr_db": 6.0, "recovered": 0.045, "metric_float_kept": 0.845, "latency_cost_ms": 0.1},
            {"layer": "c", "sqnr_db": 7.0, "recovered": 0.01, "metric_float_kept": 0.81, "latency_cost_ms": 0.0},
            {"layer": "d", "sqnr_db": 9.0, "recovered": None, "metric_float_kept": None, "latency_cost_ms": 0.0}]
    assert order(rows, 0.01) == ["b", "a", "c", "d"]  # c (0.0 ms) is not near a's 0.05: recovery first
    assert order(rows, 0.0) == ["a", "b", "c", "d"]
    assert choose(rows, 0.90, 0.80, 0.06, lambda layers: pytest.fail("single rows suffice")) == (["b"], 0.845, True)
    unprofiled = [{**r, "latency_cost_ms": None} for r in rows]  # no profile: recovery alone, as before
    assert choose(unprofiled, 0.90, 0.80, 0.06, lambda layers: pytest.fail("no")) == (["a"], 0.85, True)


def weight_scale_sizes(folder: Path, target: str) -> list[int]:
    """Elements of each INT8 weight tensor's scale: 1 per tensor, out-channels per channel."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    if target == "onnxruntime":  # QDQ: DequantizeLinear(int8 weight initializer, scale initializer, zero point)
        graph = onnx.load(str(folder / "model.onnx")).graph
        init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        return [init[n.input[1]].size for n in graph.node if n.op_type == "DequantizeLinear"
                and n.input[0] in init and init[n.input[0]].dtype == np.int8]
    model = ov.Core().read_model(str(folder / "model.xml"))  # NNCF: int8 Constant -> Convert -> (Subtract) -> Multiply

    def int8_constant(node):
        while node.get_type_name() in ("Convert", "Subtract"):
            node = node.input_value(0).get_node()
        return node.get_type_name() == "Constant" and node.get_output_element_type(0).get_type_name() in ("i8", "u8")

    sizes = []
    for op in model.get_ops():
        if op.get_type_name() == "Multiply":
            a, b = (op.input_value(i).get_node() for i in range(2))
            if int8_constant(a) and b.get_type_name() == "Constant":
                sizes.append(int(np.prod(list(b.get_output_shape(0)))))
    return sizes


@pytest.mark.parametrize("target", ["cpu", "onnxruntime"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_per_channel_or_per_tensor_weight_scales_on_both_runtimes(cache, target, per_channel):
    s = testing.build(quick(cache, f"target={target}", "+stages.quantize={kind: quantize, per_channel: "
                                   f"{str(per_channel).lower()}}}"), cache, run_name=f"scales_{target}_{per_channel}")
    q = stage(s, "quantize")
    assert q["metrics"]["quantize/weight_scales"] == ("per_channel" if per_channel else "per_tensor")
    sizes = weight_scale_sizes(Path(q["artifact"]), target)
    assert len(sizes) >= 3  # every conv and the classifier have INT8 weights
    assert (max(sizes) > 1) == per_channel and (min(sizes) > 1) == per_channel


def test_smooth_quant_alpha_reaches_nncf_and_smooths_the_convolutions(cache):
    """With smooth_quant_alpha NNCF inserts its SmoothQuant scales (Multiply .../nncf_smooth_quant) before the
    convolutions too; the same transformer scheme without it (NNCF's default) smooths the classifier MatMul only."""
    s = testing.build(quick(cache, "+stages.sq={kind: quantize, input: train, model_type: transformer, "
                                   "smooth_quant_alpha: 0.5}",
                            "+stages.plain={kind: quantize, input: train, model_type: transformer}"),
                      cache, run_name="smooth_quant")

    def smoothed(name):  # the type of the layer each SmoothQuant scale feeds
        model = ov.Core().read_model(str(Path(stage(s, name)["artifact"]) / "model.xml"))
        scales = [op for op in model.get_ops() if op.get_friendly_name().endswith("/nncf_smooth_quant")]
        fed = []
        for op in scales:  # scale -> FakeQuantize -> the smoothed layer
            (fq,) = [t.get_node() for t in op.output(0).get_target_inputs()]
            fed += [t.get_node().get_type_name() for t in fq.output(0).get_target_inputs()]
        return sorted(fed)

    assert smoothed("plain") == ["MatMul"]
    assert smoothed("sq").count("Convolution") >= 2 and "MatMul" in smoothed("sq")


def test_the_quantization_device_enters_the_cache_key():
    """target=vpu after target=cpu (same IR format) must requantize with the NPU's scheme, not hit the cache."""
    keys = {t: Quantize().cache_inputs(testing.compose([f"target={t}"])) for t in ("cpu", "vpu", "gpu")}
    assert [k["quantization_device"] for k in keys.values()] == ["CPU", "NPU", "GPU"]


def test_sensitivity_is_an_mlflow_artifact_and_a_report_section(npu, cache, tmp_path):
    uri = f"sqlite:///{cache}/mlflow.db"
    assert report.main(["--uri", uri, "--run", npu["mlflow_run_id"], "--out", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    worst = json.loads((Path(stage(npu, "quantize")["artifact"]) / "sensitivity.json").read_text())[0]["layer"]
    assert "INT8 sensitivity of quantize" in md and worst in md


def test_greedy_choice_keeps_the_fewest_layers_that_reach_the_limit():
    """float_layers=auto's rule on a known ranking: best single recovery first, stop at the limit."""
    rows = [{"layer": "a", "sqnr_db": 5.0, "recovered": 0.01, "metric_float_kept": 0.81},
            {"layer": "b", "sqnr_db": 8.0, "recovered": 0.05, "metric_float_kept": 0.85},
            {"layer": "c", "sqnr_db": 9.0, "recovered": None, "metric_float_kept": None},
            {"layer": "d", "sqnr_db": 20.0, "recovered": None, "metric_float_kept": None}]
    gains = {"a": 0.01, "b": 0.05, "c": 0.06, "d": 0.0}
    calls = []

    def evaluate(layers):
        calls.append(list(layers))
        return 0.80 + sum(gains[x] for x in layers)

    assert choose(rows, 0.90, 0.80, 0.05, evaluate) == (["b"], 0.85, True) and calls == []  # b's own row
    assert choose(rows, 0.90, 0.80, 0.01, evaluate) == (["b", "a", "c"], pytest.approx(0.92), True)
    assert calls == [["b", "a"], ["b", "a", "c"]]
    assert choose(rows, 0.90, 0.88, 0.05, evaluate) == ([], 0.88, True)  # already within: none
    layers, _, reached = choose(rows, 1.5, 0.80, 0.01, evaluate)
    assert layers == ["b", "a", "c", "d"] and not reached


def test_onnxruntime_sensitivity_and_calibration_method(cache):
    s = testing.build(quick(cache, "target=onnxruntime", "+stages.quantize={kind: quantize, sensitivity: true, "
                                   "sensitivity_top: 1, calibration: {method: entropy}}"), cache, run_name="ort")
    q = stage(s, "quantize")
    m = q["metrics"]
    assert m["quantize/target_device"] == "CPU" and m["quantize/calibration_method"] == "entropy"
    rows = json.loads((Path(q["artifact"]) / "sensitivity.json").read_text())
    import onnx

    graph = onnx.load(str(Path(stage(s, "train")["deployable"]) / "model.onnx")).graph
    assert {r["layer"] for r in rows} == {n.name for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")}
    assert all(math.isfinite(r["sqnr_db"]) for r in rows) and rows[0]["metric_drop"] is not None
    assert all(r["latency_cost_ms"] is None for r in rows)  # ONNX Runtime has no per-layer profile here


@pytest.mark.parametrize("target,device", [("cpu", "CPU"), ("gpu", "GPU"), ("vpu", "NPU"), ("mcu", "CPU"),
                                           ("onnxruntime", "CPU"), ("tensorrt", "GPU")])
def test_each_target_names_the_scheme_it_quantizes_for(target, device):
    """quantize and qat both take the device from Runtime.quantization_device()."""
    assert Target(testing.compose([f"target={target}"]).target).runtime.quantization_device() == device


@pytest.mark.parametrize("extra,message", [
    pytest.param(["+stages.q={kind: quantize, calibration: {method: entropy}}"],
                 r"(?s)calibration.method='entropy' is not a method of target 'cpu'.*'entropy' is in: onnxruntime", id="method-not-nncf"),
    pytest.param(["target=onnxruntime", "+stages.q={kind: quantize, calibration: {method: mean_minmax}}"],
                 r"use one of: minmax, entropy, percentile", id="method-not-ort"),
    pytest.param(["+stages.q={kind: quantize, calibration: {method: kl}}"], r"edgebuild's methods are",
                 id="method-unknown"),
    pytest.param(["+stages.q={kind: quantize, calibration: {samples: 0}}"], r"calibration.samples=0",
                 id="samples-zero"),
    pytest.param(["+stages.q={kind: quantize, calibration: {size: 10}}"], r"unknown calibration option",
                 id="calibration-key"),
    pytest.param(["+stages.q={kind: quantize, float_layers: auto}"], r"float_layers=auto needs max_drop",
                 id="auto-without-max-drop"),
    pytest.param(["+stages.q={kind: quantize, float_layers: some, max_drop: 0.01}"], r"float_layers='some'",
                 id="float-layers-value"),
    pytest.param(["+stages.q={kind: quantize, sensitivity: true, sensitivity_top: 0}"],
                 r"sensitivity_top=0 is out of range", id="budget-below-one-evaluation"),
    pytest.param(["target=executorch", "+stages.q={kind: quantize, sensitivity: true}"],
                 r"sensitivity=true is not supported by target 'executorch'", id="sensitivity-executorch"),
    pytest.param(["target=litert", "+stages.q={kind: quantize, calibration: {method: minmax}}"],
                 r"not a method of target 'litert'", id="method-litert"),
    pytest.param(["+stages.q={kind: quantize, model_type: transformer, smooth_quant_alpha: 1.5}"],
                 r"smooth_quant_alpha=1.5 is out of range: it must be >= 0 and <= 1", id="smooth-quant-above-1"),
    pytest.param(["+stages.q={kind: quantize, model_type: transformer, smooth_quant_alpha: -0.1}"],
                 r"smooth_quant_alpha=-0.1 is out of range", id="smooth-quant-negative"),
    pytest.param(["+stages.q={kind: quantize, smooth_quant_alpha: 0.5}"],
                 r"smooth_quant_alpha=0.5 needs model_type=transformer", id="smooth-quant-without-transformer"),
    pytest.param(["target=onnxruntime", "+stages.q={kind: quantize, model_type: transformer, "
                  "smooth_quant_alpha: 0.5}"], r"not supported by target 'onnxruntime'", id="smooth-quant-ort"),
])
def test_bad_diagnostic_options_fail_at_plan_time(cache, extra, message):
    with pytest.raises(EdgebuildError, match=message) as e:
        testing.build(quick(cache, *extra), cache, run_name="bad")
    assert e.value.exit_code == 2
    assert not (cache / "bad" / "summary.json").exists()
