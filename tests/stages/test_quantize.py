"""quantize (NNCF PTQ, accuracy control, ONNX Runtime QDQ), fp16, the gpu/vpu/onnxruntime targets and
the mobilenet_int8_vpu recipe, on a tiny CNN and generated data."""

import json
import logging
from pathlib import Path

import onnx
import openvino as ov
import pytest

from edgebuild import testing
from edgebuild.errors import EdgebuildError
from edgebuild.targets.openvino import is_quantized as is_quantized_openvino
from tests.conftest import FAST, run_cli

STAGES = ["+stages.quantize={kind: quantize}", "+stages.fp16={kind: fp16, input: train}",
          "+stages.int8_weights={kind: fp16, input: train, weights: int8}"]


def stage(summary, name):
    return next(s for s in summary["stages"] if s["name"] == name)


def bin_bytes(st):
    return (Path(st["deployable"]) / "model.bin").stat().st_size


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module: the trained tiny CNN is built once and reused by every build."""
    return tmp_path_factory.mktemp("quant")


def quick(cache, *extra):
    return [*testing.shrink(cache), *FAST, "stages.export=null", *extra]


@pytest.fixture(scope="module")
def vpu(cache):
    """train -> quantize / fp16 / int8 weights, for the NPU target (absent here: CPU proxy)."""
    return testing.build(quick(cache, "target=vpu", *STAGES), cache, run_name="vpu")


def test_ptq_ir_really_runs_int8_and_is_smaller(vpu):
    train, q = stage(vpu, "train")["metrics"], stage(vpu, "quantize")
    m = q["metrics"]
    assert m["int8/ops_fraction"] == 1.0 and m["runtime/precision"] == "int8" and m["runtime/precision_raw"] in ("u8", "i8")
    assert train["int8/ops_fraction"] == 0.0 and train["runtime/precision"] == "fp32"
    assert m["acc/top1"] >= train["acc/top1"] - 0.02
    assert bin_bytes(q) * 3 < bin_bytes(stage(vpu, "train"))  # int8 weights
    assert m["quantize/fp_layers"] == 0 and json.loads((Path(q["artifact"]) / "fp_layers.json").read_text()) == []
    assert m["quantize/calibration_samples"] == 32 and m["quantize/speedup_vs_float"] > 0
    assert is_quantized_openvino(ov.Core().read_model(str(Path(q["deployable"]) / "model.xml")))


def test_absent_npu_is_measured_on_cpu_with_a_roofline_estimate(vpu):
    assert vpu["target_info"]["device"] == "NPU" and vpu["target_info"]["measured_on"] == "CPU"
    assert any("NPU is not on this machine" in n for n in vpu["notes"])
    for name, precision in (("train", "fp32"), ("quantize", "int8")):
        st = stage(vpu, name)
        m = st["metrics"]
        assert m["latency/proxy_device"] == "CPU"
        weights = sum(f.stat().st_size for f in Path(st["deployable"]).iterdir() if f.suffix in (".xml", ".bin"))
        peak = {"fp32": 2.75e12, "int8": 5.5e12}[precision]  # conf/target/vpu.yaml
        assert m["latency/estimate_ms"] == pytest.approx(max(m["macs"] / peak, weights / 1.19e11) * 1e3)


def test_fp16_and_int8_weight_only_shrink_weights_and_keep_accuracy(vpu):
    train = stage(vpu, "train")
    for name, factor in (("fp16", 2), ("int8_weights", 3)):
        st = stage(vpu, name)
        assert bin_bytes(st) * factor <= bin_bytes(train) + 64, name
        assert st["metrics"]["acc/top1"] >= train["metrics"]["acc/top1"] - 0.02
        assert st["metrics"]["int8/ops_fraction"] == 0.0  # weight-only: activations stay float
    xml = (Path(stage(vpu, "fp16")["deployable"]) / "model.xml").read_text()
    assert 'element_type="f16"' in xml


def test_accuracy_control_records_validation_drop_and_float_layers(cache, caplog):
    """max_drop runs NNCF's quantize_with_accuracy_control; a calibration set larger than the train
    split is clamped with a warning."""
    with caplog.at_level(logging.WARNING):
        s = testing.build(quick(cache, "+stages.quantize={kind: quantize, max_drop: 0.01, preset: mixed}",
                                "data.calibration.size=100000"), cache, run_name="ac")
    assert any("calibration subset of 100000" in r.getMessage() for r in caplog.records)
    m = stage(s, "quantize")["metrics"]
    assert 0 < m["quantize/calibration_samples"] < 600 and m["int8/ops_fraction"] > 0
    step = stage(s, "quantize")
    result = json.loads((Path(step["artifact"]).parent / "result.json").read_text())
    (ac,) = result["steps"]
    assert ac["name"] == "accuracy_control" and ac["metrics"]["val/drop"] <= 1.0
    assert m["quantize/fp_layers"] == len(json.loads((Path(step["artifact"]) / "fp_layers.json").read_text()))
    assert any("accuracy control kept" in n for n in s["notes"])


def test_onnxruntime_target_gives_qdq_onnx_measured_on_ort(cache):
    s = testing.build(quick(cache, "target=onnxruntime", "+stages.quantize={kind: quantize, preset: mixed}"),
                      cache, run_name="ort")
    q = stage(s, "quantize")
    assert Path(q["deployable"], "model.onnx").exists()
    ops = [n.op_type for n in onnx.load(str(Path(q["deployable"]) / "model.onnx")).graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    assert q["metrics"]["int8/ops_fraction"] > 0.5
    assert q["metrics"]["acc/top1"] >= stage(s, "train")["metrics"]["acc/top1"] - 0.02


@pytest.mark.parametrize("extra,message", [
    pytest.param(["+stages.q={kind: quantize, preset: fastest}"], "unknown preset 'fastest'", id="unknown-preset"),
    pytest.param(["+stages.q={kind: quantize, max_drop: 5}"], "max_drop=5", id="drop-not-a-fraction"),
    pytest.param(["+stages.q={kind: quantize, ignored_patterns: ['(']}"], "is not a regex", id="bad-regex"),
    pytest.param(["target=onnxruntime", "+stages.q={kind: quantize, max_drop: 0.01}"],
                 "quantize: max_drop=0.01 is not supported by target 'onnxruntime'", id="ort-openvino-only-option"),
    pytest.param(["target=onnxruntime", "+stages.q={kind: fp16}"], "fp16: target 'onnxruntime' runs onnxruntime, which has no 'weights.fp16'", id="ort-fp16"),
    pytest.param(["target=onnxruntime", "+stages.q={kind: qat}"], "qat: target 'onnxruntime' runs onnxruntime, which has no 'qat'", id="ort-qat"),
    pytest.param(["target=vpu", "target.require_device=true", "+stages.q={kind: quantize}"],
                 "requires device NPU", id="require-absent-npu"),
])
def test_bad_options_fail_at_plan_time(cache, extra, message):
    with pytest.raises(EdgebuildError, match=message.replace("(", r"\(")):
        testing.build(quick(cache, *extra), cache, run_name="bad")
    assert not (cache / "bad" / "summary.json").exists()


@pytest.mark.parametrize("extra,message", [
    pytest.param(["+stages.quantize={kind: quantize}", "+stages.again={kind: quantize}"], "already quantized",
                 id="already-int8"),
    pytest.param(["+stages.quantize={kind: quantize, ignored_patterns: ['.*']}"], "runs no compute layer in INT8",
                 id="nothing-runs-int8"),
    pytest.param(["+stages.quantize={kind: quantize, ignored_names: [no_such_layer]}"], "are not layers",
                 id="unknown-layer-name"),
])
def test_bad_inputs_fail_cleanly_and_leave_no_cache_entry(cache, extra, message):
    entries = set(cache.glob("cache/*/*"))
    with pytest.raises(EdgebuildError, match=message):
        testing.build(quick(cache, *extra), cache, run_name="bad")
    new = [e for e in set(cache.glob("cache/*/*")) - entries if e.is_dir()]
    quantized = [e for e in new if json.loads((e / "result.json").read_text()).get("kind") == "quantize"]
    assert len(quantized) <= (1 if "again" in extra[-1] else 0)  # the failing stage published nothing


def test_unknown_target_is_named_by_hydra():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="target/tpu"):
        testing.compose(["target=tpu"])


def test_recipe_mobilenet_int8_vpu_shrunk(tmp_path):
    """The headline recipe composes and builds end to end in a shrunk form (few batches)."""
    cfg = testing.compose([], "mobilenet_int8_vpu")
    assert cfg.target.device == "NPU" and cfg.model.name == "mobilenet_v2" and cfg.data.image_size == 48
    shrunk = [*testing.shrink(tmp_path), "stages.train.epochs=1", "trainer.limit_train_batches=2",
              "trainer.limit_val_batches=1", "eval.limit=64", "budget.min_acc=null", "budget.max_acc_drop=null"]
    s = testing.build(shrunk, tmp_path, recipe="mobilenet_int8_vpu")
    q = stage(s, "quantize")["metrics"]
    assert q["int8/ops_fraction"] > 0.5 and q["latency/proxy_device"] == "CPU"
    assert stage(s, "train")["metrics"]["size/bytes"] > 3 * q["size/bytes"]


def test_require_device_exits_2_with_a_clean_message(tmp_path):
    result = run_cli(["recipe=mobilenet_int8_vpu", "tracking=none", "target.require_device=true"], tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-2000:]
    assert "requires device NPU" in out and "Traceback" not in out
