"""target=tensorrt without an NVIDIA GPU (CI and this machine): the target says so, records no CPU latency
or quality as TensorRT's, require_device=true exits 2 before any work; INT8 is a QDQ ONNX checked in the
graph. The GPU path itself (engine build, FP16/INT8 timings) runs only where a GPU and tensorrt are."""

import json
from pathlib import Path

import numpy as np
import pytest

from edgebuild import testing
from edgebuild.artifact import Artifact
from edgebuild.errors import BudgetExceeded, EdgebuildError
from edgebuild.targets import Target, base
from edgebuild.targets.tensorrt import TensorRTRuntime, missing
from tests.conftest import FAST

pytestmark = pytest.mark.skipif(missing() is None, reason="an NVIDIA GPU with tensorrt is here: measured instead")
TRT = ["target=tensorrt", "stages.export=null"]


def test_without_a_gpu_the_target_is_unmeasured_not_a_cpu_proxy():
    target = Target(testing.compose(["target=tensorrt"]).target)
    assert target.runtime.available_devices() == []
    assert target.unmeasured.startswith("no NVIDIA GPU") and "tensorrt" in target.unmeasured
    assert target.device == "GPU" and not target.is_proxy  # nothing is measured on the CPU in its name


def test_require_device_is_exit_2_naming_the_gpu_and_the_package(tmp_path):
    cfg = testing.compose(["target=tensorrt", "target.require_device=true"])
    with pytest.raises(EdgebuildError) as e:
        Target(cfg.target).check()
    assert e.value.exit_code == 2 and "no NVIDIA GPU" in e.value.what and "pip install tensorrt" in e.value.what


def test_a_build_states_unmeasured_and_records_no_latency_or_quality(tmp_path):
    with pytest.raises(BudgetExceeded) as e:  # the default recipe's min_acc cannot be checked: not met
        testing.build(testing.shrink(tmp_path) + FAST + TRT, tmp_path)
    s = e.value.args[0]
    assert any(n.startswith("unmeasured: no NVIDIA GPU") for n in s["notes"])
    m = s["stages"][-1]["metrics"]
    assert m["latency/unmeasured"].startswith("no NVIDIA GPU")
    assert not [k for k in m if k.startswith(("latency/p50", "latency/load", "latency/first", "latency/interleaved",
                                              "acc/", "runtime/"))]
    assert m["latency/estimate_ms"] > 0 and m["size/bytes"] > 0  # the spec's roofline, and the file
    (check,) = s["budget"]["checks"]
    assert not check["ok"] and str(check["value"]).startswith("unmeasured: no NVIDIA GPU")
    spec = json.loads((Path(s["deploy"]) / "model.json").read_text())
    assert spec["format"] == "tensorrt" and (Path(s["deploy"]) / "model.onnx").exists()
    assert "interleaved" not in s


def test_int8_is_a_qdq_onnx_whose_compute_nodes_are_quantized(tmp_path):
    s = testing.build(testing.shrink(tmp_path) + FAST + TRT + ["budget.min_acc=null", "+stages.int8={kind: quantize}"],
                      tmp_path)
    int8 = s["stages"][-1]
    assert int8["metrics"]["latency/unmeasured"].startswith("no NVIDIA GPU")
    assert any("int8: unmeasured" in n for n in s["notes"])
    from edgebuild.targets.tensorrt import qdq_fraction

    fraction, compute = qdq_fraction(Path(s["deploy"]) / "model.onnx")
    assert compute > 0 and fraction == 1.0


def test_int8_that_would_stay_float_fails_the_stage(tmp_path):
    from tests.targets.test_litert import MatmulOnly  # no conv, no nn.Linear: quantize_static leaves MatMul float

    runtime = TensorRTRuntime(testing.compose(["target=tensorrt"]).target)
    source = Artifact.save_torch(MatmulOnly(), tmp_path / "src", {"input_shape": [1, 1, 4, 4]})
    request = base.QuantizeRequest(calibration=np.random.default_rng(0).standard_normal((8, 1, 4, 4),
                                                                                        dtype=np.float32),
                                   output_names=["logits"], meta={"input_shape": [1, 1, 4, 4], "precision": "int8"},
                                   ignored_patterns=[".*"])
    (tmp_path / "q").mkdir()
    (tmp_path / "f").mkdir()
    with pytest.raises(EdgebuildError, match="TensorRT INT8: no compute node of the QDQ ONNX is quantized"):
        runtime.quantize(source, request, tmp_path / "q", tmp_path / "f")


def test_a_precision_it_does_not_have_is_refused():
    with pytest.raises(EdgebuildError, match="runtime tensorrt has no inference precision 'int8'"):
        TensorRTRuntime(testing.compose(["target=tensorrt", "target.precision=int8"]).target)


@pytest.mark.parametrize("args, message", [
    (["target=tensorrt", "target.require_device=true"], "no NVIDIA GPU (the Python package tensorrt is not installed"),
    (["target=tensorrt", "target.precision=bf16"], "runtime tensorrt has no inference precision 'bf16'"),
    (["target=executorch", "target.precision=bf16"], "runtime executorch has no inference precision 'bf16'"),
])
def test_bad_runtime_input_is_exit_2_one_message_nothing_written(args, message, tmp_path):
    from tests.conftest import run_cli

    result = run_cli(["tracking=none", "eval=fast", *FAST, *args], tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 2 and message in out and "Traceback" not in out, out[-2000:]
    assert not list(tmp_path.glob("outputs/cache/*/*/result.json"))
    assert not list(tmp_path.glob("outputs/**/summary.json"))
