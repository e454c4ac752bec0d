"""ExecuTorch target with the real library: XNNPACK-lowered .pte programs of the digits CNN and a tiny CNN."""

import sys

import numpy as np
import pytest
import torch

from edgebuild.artifact import Artifact
from edgebuild.errors import EdgebuildError
from edgebuild.evaluate import latency
from edgebuild.targets import Target
from edgebuild.targets.executorch import ExecuTorchRuntime
from tests.targets.conftest import fp32_deployable, int8_deployable, target_cfg, top1


class Cumprod(torch.nn.Module):  # module level: artifacts pickle the class by reference
    def forward(self, x):
        return torch.cumprod(x, -1).flatten(1)


@pytest.fixture(scope="module")
def runtime():
    return ExecuTorchRuntime(target_cfg("executorch"))


@pytest.fixture(scope="module")
def fp32(runtime, digits_model, tmp_path_factory):
    return fp32_deployable(runtime, digits_model, tmp_path_factory)


@pytest.fixture(scope="module")
def int8(runtime, digits, digits_model, tmp_path_factory):
    return int8_deployable(runtime, digits, digits_model, tmp_path_factory)


def test_fp32_pte_matches_torch_and_is_fully_delegated(runtime, fp32, digits, digits_model):
    source, _ = digits_model
    assert fp32.kind == "executorch" and fp32.main_file.suffix == ".pte"
    session = runtime.load(fp32, "CPU", 8)
    x = digits.normalize(digits.splits["test"].images[:8])  # batch 8 on a batch-1 program: row by row
    expected = source.load_torch()(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(session.infer(x)[0], expected, atol=1e-4, rtol=1e-4)
    info = session.runtime_info()
    assert info["runtime/precision"] == "fp32" and info["int8/ops_fraction"] == 0.0
    assert info["runtime/compute_ops"] == 4  # 3 convs + the linear head
    assert info["runtime/delegated_fraction"] == 1.0 and info["runtime/delegates"] == "XnnpackBackend"
    assert info["runtime/non_delegated_ops"] == 0


def test_int8_runs_int8_in_xnnpack_and_keeps_digits_accuracy(runtime, int8, fp32, digits, digits_model):
    _, float_top1 = digits_model
    session = runtime.load(int8.artifact, "CPU", 1)
    info = session.runtime_info()
    assert info["runtime/precision"] == "int8" and info["int8/ops_fraction"] == 1.0
    assert info["runtime/delegated_fraction"] == 1.0
    assert int8.float_model.kind == "executorch" and runtime.load(int8.float_model, "CPU", 1).runtime_info()[
        "runtime/precision"] == "fp32"
    assert int8.artifact.size_bytes < 0.6 * fp32.size_bytes  # int8 weights (plus the program's fixed overhead)
    int8_top1 = top1(lambda x: session.infer(x)[0], digits)
    assert float_top1 > 0.9 and abs(int8_top1 - float_top1) <= 0.02, (int8_top1, float_top1)


def test_latency_is_positive_and_load_is_timed(runtime, fp32, int8):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"warmup": 5, "iterations": 30, "min_seconds": 0.0})
    for artifact in (fp32, int8.artifact):
        session = runtime.load(artifact, "CPU", 1)
        m = latency(session, artifact.meta["input_shape"], cfg)
        assert session.load_ms > 0 and m["latency/first_ms"] > 0
        assert 0 < m["latency/p50_ms"] <= m["latency/p90_ms"] and m["latency/iterations"] >= 30


def test_precision_it_does_not_have_is_refused():
    with pytest.raises(EdgebuildError, match="no inference precision 'bf16'"):
        ExecuTorchRuntime(target_cfg("executorch", precision="bf16"))


def test_missing_package_names_it_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "executorch.runtime", None)  # what an environment without it imports
    with pytest.raises(EdgebuildError) as e:
        Target(target_cfg("executorch")).check()
    assert "executorch==1.5.1" in str(e.value) and '".[runtimes]"' in str(e.value)


def test_unconvertible_operator_is_named_with_the_runtime(runtime, tmp_path):
    source = Artifact.save_torch(Cumprod(), tmp_path / "src", {"input_shape": [1, 1, 4, 4]})
    with pytest.raises(EdgebuildError, match=r"executorch cannot convert operator aten\.cumprod"):
        runtime.deployable(source, tmp_path / "out", ["logits"])
