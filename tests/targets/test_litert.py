"""LiteRT target with the real libraries: .tflite files from litert-torch, run by ai-edge-litert."""

import sys

import numpy as np
import pytest
import torch

from edgebuild.artifact import Artifact
from edgebuild.errors import EdgebuildError
from edgebuild.evaluate import latency
from edgebuild.targets import Target
from edgebuild.targets.base import QuantizeRequest
from edgebuild.targets.litert import COMPUTE_OPS, LiteRTRuntime, graph
from tests.targets.conftest import fp32_deployable, int8_deployable, target_cfg, top1


class Cumprod(torch.nn.Module):  # module level: artifacts pickle the class by reference
    def forward(self, x):
        return torch.cumprod(x, -1).flatten(1)


class MatmulOnly(torch.nn.Module):  # torch.matmul, not nn.Linear: the PT2E quantizer leaves it float
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16, 4))

    def forward(self, x):
        return torch.matmul(x.flatten(1), self.w)


@pytest.fixture(scope="module")
def runtime():
    return LiteRTRuntime(target_cfg("litert"))


@pytest.fixture(scope="module")
def fp32(runtime, digits_model, tmp_path_factory):
    return fp32_deployable(runtime, digits_model, tmp_path_factory)


@pytest.fixture(scope="module")
def int8(runtime, digits, digits_model, tmp_path_factory):
    return int8_deployable(runtime, digits, digits_model, tmp_path_factory)


def test_fp32_tflite_matches_torch(runtime, fp32, digits, digits_model):
    source, _ = digits_model
    assert fp32.kind == "litert" and fp32.main_file.suffix == ".tflite"
    session = runtime.load(fp32, "CPU", 8)
    x = digits.normalize(digits.splits["test"].images[:8])
    expected = source.load_torch()(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(session.infer(x)[0], expected, atol=1e-4, rtol=1e-4)
    info = session.runtime_info()
    assert info["runtime/precision"] == "fp32" and info["int8/ops_fraction"] == 0.0
    assert info["runtime/compute_ops"] == 4 and info["runtime/input_dtype"] == "float32"
    assert "int8" not in info["runtime/tensor_dtypes"]


def test_fp16_weights_halve_the_file_and_keep_outputs(runtime, fp32, digits, digits_model, tmp_path):
    source, _ = digits_model
    fp16 = runtime.compress_weights(source, "fp16", tmp_path, ["logits"], {**source.meta, "precision": "fp16"})
    params = sum(p.numel() for p in source.load_torch().parameters())
    assert fp32.size_bytes - fp16.size_bytes > 0.4 * 4 * params  # ~2 bytes saved per weight (BN folds in)
    session = runtime.load(fp16, "CPU", 1)
    info = session.runtime_info()
    assert info["runtime/weights_dtype"] == "float16" and "float16" in info["runtime/tensor_dtypes"]
    x = digits.normalize(digits.splits["test"].images[:4])
    expected = source.load_torch()(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(session.infer(x)[0], expected, atol=2e-2)  # fp16 weight rounding, not more
    with pytest.raises(EdgebuildError, match="no data-free 'int8'"):
        runtime.compress_weights(source, "int8", tmp_path / "w8", ["logits"], source.meta)


def test_int8_is_full_integer_with_exposed_io_quantization(runtime, int8, digits, digits_model):
    _, float_top1 = digits_model
    session = runtime.load(int8.artifact, "CPU", 1)
    info = session.runtime_info()
    assert info["runtime/precision"] == "int8" and info["int8/ops_fraction"] == 1.0
    assert info["runtime/input_dtype"] == "int8" and info["runtime/output_dtype"] == "int8"
    assert "float32" not in info["runtime/tensor_dtypes"]
    io = int8.artifact.meta["deploy_io_quantization"]  # deploy_* meta is written into model.json
    assert io == session.io_quantization()
    (inp,), (out,) = io["inputs"], io["outputs"]
    assert inp["dtype"] == "int8" and inp["scale"] > 0 and out["scale"] > 0
    # the session quantizes inputs with that scale/zero point and dequantizes outputs: float in, float out
    x = digits.normalize(digits.splits["test"].images[:1])
    q = np.clip(np.round(x / inp["scale"]) + inp["zero_point"], -128, 127).astype(np.int8)
    session.it.set_tensor(session.input["index"], q)
    session.it.invoke()
    raw = session.it.get_tensor(session.outputs[0]["index"])
    np.testing.assert_allclose(session.infer(x)[0], (raw.astype(np.float32) - out["zero_point"]) * out["scale"])
    int8_top1 = top1(lambda a: session.infer(a)[0], digits)
    assert float_top1 > 0.9 and abs(int8_top1 - float_top1) <= 0.02, (int8_top1, float_top1)


def test_graph_reads_the_flatbuffer_as_the_interpreter_wires_it(runtime, int8):
    """The op listing comes from the published schema, not the interpreter's private one: its tensors are the
    interpreter's own (names, dtypes), the model's input feeds the first op and its output leaves the last."""
    session = runtime.load(int8.artifact, "CPU", 1)
    ops = graph(int8.artifact.main_file)
    tensors = {t["index"]: t for t in session.it.get_tensor_details()}
    for op in ops:
        for i, dtype in zip([i for i in op["inputs"] if i >= 0], op["operand_types"], strict=True):
            assert np.dtype(tensors[i]["dtype"]).name == dtype
        assert op["output_names"] == [tensors[i]["name"] for i in op["outputs"]]
    assert session.input["index"] in ops[0]["inputs"] and session.outputs[0]["index"] in ops[-1]["outputs"]
    compute = [op for op in ops if op["op_name"] in COMPUTE_OPS]
    assert compute and all(op["operand_types"][0] == "int8" for op in compute)


def test_latency_is_positive_and_load_is_timed(runtime, fp32, int8):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"warmup": 5, "iterations": 30, "min_seconds": 0.0})
    for artifact in (fp32, int8.artifact):
        session = runtime.load(artifact, "CPU", 1)
        m = latency(session, artifact.meta["input_shape"], cfg)
        assert session.load_ms > 0 and m["latency/first_ms"] > 0
        assert 0 < m["latency/p50_ms"] <= m["latency/p90_ms"]


def test_int8_that_stays_float_fails_clearly(runtime, tmp_path):
    source = Artifact.save_torch(MatmulOnly(), tmp_path / "src", {"input_shape": [1, 1, 4, 4]})
    request = QuantizeRequest(calibration=np.random.default_rng(0).standard_normal((8, 1, 4, 4), dtype=np.float32),
                              output_names=["logits"], meta={"input_shape": [1, 1, 4, 4], "precision": "int8"})
    (tmp_path / "q").mkdir()
    (tmp_path / "f").mkdir()
    with pytest.raises(EdgebuildError, match="runs no compute op in int8"):
        runtime.quantize(source, request, tmp_path / "q", tmp_path / "f")


def test_precision_it_does_not_have_is_refused():
    with pytest.raises(EdgebuildError, match="no inference precision 'int8'"):
        LiteRTRuntime(target_cfg("litert", precision="int8"))


def test_missing_package_names_it_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "litert_torch", None)
    with pytest.raises(EdgebuildError) as e:
        Target(target_cfg("litert")).check()
    assert "litert-torch==0.10.0" in str(e.value) and '".[runtimes]"' in str(e.value)


def test_unconvertible_operator_is_named_with_the_runtime(runtime, tmp_path):
    source = Artifact.save_torch(Cumprod(), tmp_path / "src", {"input_shape": [1, 1, 4, 4]})
    with pytest.raises(EdgebuildError, match=r"litert cannot convert operator aten\.cumprod"):
        runtime.deployable(source, tmp_path / "out", ["logits"])
