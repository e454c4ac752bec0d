"""target=mcu: flash / peak RAM estimates checked by hand, static shapes required, recipe tiny_mcu."""

from pathlib import Path

import pytest

from edgebuild import testing
from edgebuild.errors import BudgetExceeded, EdgebuildError
from edgebuild.targets.mcu import Node, estimate, peak_memory

INT8 = {"runtime_overhead_bytes": 0, "bytes_per_weight": 1, "bytes_per_activation": 1}


def test_peak_memory_on_a_hand_checked_graph():
    """x(64 B, input) -> conv1 a(256) -> relu b (in place over a) -> conv2 c(128), conv3 d(128) both read b
    -> add e(128) of c and d -> pool f(8) -> fc y(10, output).
    Live per step: conv1 256 | relu 256 | conv2 256+128 | conv3 256+128+128 = 512 | add 128+128+128
    | pool 128+8 | fc 8. Peak arena 512 (at conv3) + input 64 + output 10 = 586."""
    nodes = [
        Node("conv1", "Convolution", ["x"], {"a": 256}),
        Node("relu1", "Relu", ["a"], {"b": 256}),
        Node("conv2", "Convolution", ["b"], {"c": 128}),
        Node("conv3", "Convolution", ["b"], {"d": 128}),
        Node("add", "Add", ["c", "d"], {"e": 128}),
        Node("pool", "ReduceMean", ["e"], {"f": 8}),
        Node("fc", "MatMul", ["f"], {"y": 10}),
    ]
    mem = peak_memory(nodes, {"x": 64}, ["y"])
    assert mem == {"arena_bytes": 512, "input_bytes": 64, "output_bytes": 10, "peak_ram_bytes": 586, "peak_at": "conv3"}
    # a ReLU whose input another op still reads cannot run in place: at conv2 a, b and c are live
    nodes[2] = Node("conv2", "Convolution", ["a"], {"c": 128})
    assert peak_memory(nodes, {"x": 64}, ["y"])["arena_bytes"] == 256 + 256 + 128


def test_estimates_of_an_exported_model(tmp_path):
    """conv 1->4 3x3 (+bias) -> relu -> flatten -> linear 256->3 at 1x1x8x8, exported like a deployable.
    weights 36 + 4 + 768 + 3 = 811; arena peak at the matmul: its input 256 (conv output, with bias,
    relu and flatten in place) + its output 3 = 259; + input 64 + output 3 = 326 B; MACs 256*9 + 3*256."""
    from torch import nn

    from edgebuild.convert import onnx_to_openvino, torch_to_onnx

    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3)).eval()
    onnx = torch_to_onnx(model, [1, 1, 8, 8], tmp_path / "m.onnx", ["logits"])
    xml = onnx_to_openvino(onnx, tmp_path / "m.xml")
    est = estimate(xml, [1, 1, 8, 8], {**INT8, "runtime_overhead_bytes": 1000})
    assert est["memory/weights_bytes"] == 811 and est["memory/flash_bytes"] == 1811
    assert est["memory/arena_bytes"] == 259 and est["memory/peak_ram_bytes"] == 326
    assert est["mcu/macs"] == 256 * 9 + 3 * 256


def test_a_model_without_static_shapes_is_a_clear_error(tmp_path):
    import torch
    from torch import nn

    from edgebuild.convert import onnx_to_openvino, torch_to_onnx

    class Positives(nn.Module):  # how many pixels are positive: a data-dependent shape inside
        def forward(self, x):
            return torch.nonzero(x.flatten(1) > 0).float().sum(0, keepdim=True)

    xml = onnx_to_openvino(torch_to_onnx(Positives(), [1, 1, 4, 4], tmp_path / "m.onnx", ["out"]), tmp_path / "m.xml")
    with pytest.raises(EdgebuildError, match="needs static shapes.*NonZero"):
        estimate(xml, [1, 1, 4, 4], INT8)
    with pytest.raises(EdgebuildError, match="static input shape"):
        estimate(xml, [1, 1, None, 4], INT8)


def test_tiny_mcu_reports_flash_and_ram_and_fails_a_budget_it_does_not_fit(tmp_path):
    overrides = testing.shrink(tmp_path) + ["data=synthetic", "stages.train.epochs=1", "budget.min_acc=null"]
    summary = testing.build(overrides, tmp_path, recipe="tiny_mcu")
    final = summary["stages"][-1]["metrics"]
    assert 65536 < final["memory/flash_bytes"] < 65536 + 40_000  # ~24 K INT8 weights + stated overhead
    assert 0 < final["memory/peak_ram_bytes"] < 524288 and final["latency/estimate_ms"] > 0
    assert final["latency/proxy_device"] == "CPU" and "estimates for Cortex-M7" in final["mcu/estimated"]
    checks = {c["budget"]: c for c in summary["budget"]["checks"]}
    assert checks["max_flash_bytes"]["ok"] and checks["max_ram_bytes"]["ok"]
    assert checks["max_ram_bytes"]["source"] == "target"
    assert "memory/peak_ram_bytes" in (Path(summary["run_dir"]) / "summary.json").read_text()
    with pytest.raises(BudgetExceeded) as e:  # the same model on a smaller part: exit 1 with the table
        testing.build(overrides + ["target.budget.max_ram_bytes=1000"], tmp_path, recipe="tiny_mcu", run_name="small")
    violated = [c["budget"] for c in e.value.args[0]["budget"]["checks"] if not c["ok"]]
    assert violated == ["max_ram_bytes"]


def test_mcu_accepts_the_stages_its_openvino_stand_in_can_build():
    """Stages ask for capabilities, not runtime names: mcu runs OpenVINO, so qat and fp16 plan (this was
    refused at plan time when qat/fp16 checked target.runtime == 'openvino')."""
    from edgebuild.pipeline import plan

    for kind, stage in (("qat", "{kind: qat}"), ("fp16", "{kind: fp16, weights: int8}")):
        cfg = testing.compose([f"+stages.q={stage}"], recipe="tiny_mcu")
        assert plan(cfg)[-1][1].kind == kind
