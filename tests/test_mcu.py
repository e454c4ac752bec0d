"""target=mcu: the previous release's estimates checked by hand (edgebuild/targets/mcu.py, still computed as
memory/estimate_*), static shapes required; recipe tiny_mcu on TensorFlow Lite Micro and on Ethos-U55 (Vela)."""

import json
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


def test_tiny_mcu_runs_tflite_micro_writes_firmware_and_fails_a_budget_it_does_not_fit(tmp_path):
    """recipe=tiny_mcu: train -> INT8 .tflite, measured by TFLite Micro (arena, flash, peak RAM beside the old
    estimates), deploy/ firmware-ready; the same model on a smaller part exits 1 with the table; the same
    cache on target=ethos_u55 adds Vela's figures and its per-operator table."""
    overrides = testing.shrink(tmp_path) + ["data=synthetic", "stages.train.epochs=1", "budget.min_acc=null"]
    summary = testing.build(overrides, tmp_path, recipe="tiny_mcu")
    final = summary["stages"][-1]["metrics"]
    assert final["runtime/precision"] == "int8" and final["runtime/interpreter"].startswith("tflite-micro")
    assert final["memory/peak_ram_bytes"] == final["memory/arena_bytes"] + final["memory/io_bytes"]
    assert final["memory/flash_bytes"] == final["memory/flatbuffer_bytes"] + final["memory/runtime_code_bytes"]
    assert 0 < final["memory/arena_bytes"] < 524288 and final["memory/estimate_peak_ram_bytes"] > 0
    assert final["latency/proxy_device"] == "CPU" and final["latency/estimate_ms"] > 0 and "acc/top1" in final
    checks = {c["budget"]: c for c in summary["budget"]["checks"]}
    assert checks["max_flash_bytes"]["ok"] and checks["max_ram_bytes"]["ok"]
    assert checks["max_ram_bytes"]["source"] == "target"
    deploy = Path(summary["deploy"])
    files = {p.name for p in deploy.iterdir()}
    assert {"model.tflite", "model_data.cc", "model_data.h", "model_ops.h", "model.json"} <= files
    spec = json.loads((deploy / "model.json").read_text())
    assert spec["firmware"]["model_data_len"] == (deploy / "model.tflite").stat().st_size
    assert spec["firmware"]["planner_arena_bytes"] == final["memory/arena_bytes"]
    assert spec["firmware"]["io_quantization"]["input"]["dtype"] == "int8"
    with pytest.raises(BudgetExceeded) as e:  # the same model on a smaller part: exit 1 with the table
        testing.build(overrides + ["target.budget.max_ram_bytes=1000"], tmp_path, recipe="tiny_mcu", run_name="small")
    violated = [c["budget"] for c in e.value.args[0]["budget"]["checks"] if not c["ok"]]
    assert violated == ["max_ram_bytes"]
    # max_latency_ms checks the MCU's latency (the MAC estimate), not TFLM's host p50; the stream's duty cycle
    # uses the same figure (1 s of video at 10 FPS: the build stays short)
    with pytest.raises(BudgetExceeded) as e:
        testing.build(overrides + ["budget.max_latency_ms=0.000001", "eval.stream.enabled=true",
                                   "eval.stream.seconds=1", "eval.stream.fps=10"], tmp_path, recipe="tiny_mcu",
                      run_name="slow")
    slow = e.value.args[0]
    latency = next(c for c in slow["budget"]["checks"] if c["budget"] == "max_latency_ms")
    final = slow["stages"][-1]["metrics"]
    assert latency["metric"] == "latency/estimate_ms" and not latency["ok"]
    assert final["mcu/macs"] == final["macs"]  # counted in the .tflite: the same as torch's counter on the model
    assert latency["value"] == pytest.approx(final["mcu/macs"] / 4.8e8 * 1000)  # conf/target/mcu.yaml's rate
    assert latency["detail"].startswith(f"device latency, estimate: {final['macs']:,} MACs")
    table = (Path(slow["run_dir"]) / "summary.md").read_text()
    assert "| max_latency_ms | recipe | latency/estimate_ms |" in table
    assert "VIOLATED: device latency, estimate" in table
    assert final["energy/busy_from"].startswith("device: estimate") and final["energy/source"] == "model"
    assert final["energy/busy_ms"] == pytest.approx(final["latency/estimate_ms"])
    assert final["energy/mj_per_inference"] == pytest.approx(0.130 * 3.3 * final["latency/estimate_ms"])  # mcu.yaml
    npu = testing.build(overrides + ["target=ethos_u55", "target.budget.min_npu_ops_fraction=1.0",
                                     "budget.max_latency_ms=1000"], tmp_path, recipe="tiny_mcu", run_name="u55")
    final = npu["stages"][-1]["metrics"]
    assert final["ethos_u/cycles"] > 0 and final["ethos_u/npu_ops_fraction"] == 1.0 and npu["budget"]["ok"]
    assert final["latency/estimate_ms"] == pytest.approx(final["ethos_u/cycles"] / 500e6 * 1000)
    latency = next(c for c in npu["budget"]["checks"] if c["budget"] == "max_latency_ms")
    assert latency["metric"] == "latency/estimate_ms" and latency["value"] == final["latency/estimate_ms"]
    assert latency["detail"].startswith("device latency, Vela:")
    assert (Path(npu["run_dir"]) / "targets" / "quantize" / "ethos_u_per_operator.csv").exists()


def test_int8_targets_refuse_a_float_recipe_and_stages_they_cannot_build_at_plan_time():
    """Stages ask for capabilities: mcu deploys litert's .tflite, so quantize plans; qat and data-free INT8
    weights (OpenVINO's) are refused; a recipe whose last stage leaves the model float is refused by the
    int8-only targets before any work."""
    from edgebuild.pipeline import plan

    assert plan(testing.compose([], recipe="tiny_mcu"))[-1][1].kind == "quantize"
    for stage, cap in (("{kind: qat}", "qat"), ("{kind: fp16, weights: int8}", "weights.int8")):
        with pytest.raises(EdgebuildError, match=f"has no '{cap}'"):
            plan(testing.compose([f"+stages.q={stage}", "stages.quantize=null"], recipe="tiny_mcu"))
    for target in ("mcu", "ethos_u55", "ethos_u65"):
        with pytest.raises(EdgebuildError, match="(?s)INT8 models only.*'train' outputs a fp32.*quantize"):
            plan(testing.compose([f"target={target}", "stages.quantize=null"], recipe="tiny_mcu"))


def test_the_latency_limit_checks_the_device_figure_a_runtime_names():
    """budget.check: max_latency_ms reads the metric named by latency/device_metric (an MCU's estimate, Vela's
    cycles) where the runtime names one, and the host's latency/p50_ms otherwise."""
    from types import SimpleNamespace

    from edgebuild.budget import check

    host = {"latency/p50_ms": 0.02, "latency/estimate_ms": 5.0}
    device = {**host, "latency/device_metric": "latency/estimate_ms", "latency/device_source": "estimate: MACs / rate"}
    budget = [("recipe", SimpleNamespace(max_latency_ms=1.0))]
    assert check(host, budget)["ok"] and check(host, budget)["checks"][0]["metric"] == "latency/p50_ms"
    c = check(device, budget)
    assert not c["ok"] and c["checks"][0]["metric"] == "latency/estimate_ms" and c["checks"][0]["value"] == 5.0
    assert c["checks"][0]["detail"] == "device latency, estimate: MACs / rate"


def test_duty_cycle_energy_uses_the_device_latency_on_a_hand_computed_example():
    """edgebuild/stream/energy.py with a device latency: t = 5 ms on the MCU (not the host's 20 ms busy time),
    r = 100 inferences / 10 s = 10/s, 130 mA run / 1 mA stop at 3.3 V (conf/target/mcu.yaml), 1000 mAh at 3.7 V:
    P_active = 0.429 W, P_idle = 0.0033 W, D = 10 * 0.005 = 0.05, E = 0.429 * 5 ms = 2.145 mJ,
    P = 0.05 * 0.429 + 0.95 * 0.0033 = 0.024585 W, h = 3.7 / 0.024585 = 150.50 h. RAPL (this host) is not the
    headline then: auto keeps the model's figures."""
    from edgebuild.stream import energy

    active, idle, _ = energy.device_powers({"active_ma": {"int8": 130.0}, "sleep_ma": 1.0, "volts": 3.3}, "int8")
    stream = {"stream/inferences": 100, "stream/wall_s": 10.0, "stream/busy_ms_per_inference": 20.0}
    e = energy.for_stream(stream, active, idle, 1000, 3.7, rapl_j=1.0, device=(5.0, "estimate: MACs / rate"))
    assert e["energy/busy_fraction"] == pytest.approx(0.05) and e["energy/busy_ms"] == 5.0
    assert e["energy/mj_per_inference"] == pytest.approx(2.145)
    assert e["energy/avg_power_w"] == pytest.approx(0.024585)
    assert e["battery/hours"] == pytest.approx(150.50, abs=0.01)
    assert e["energy/source"] == "model" and e["energy/busy_from"] == "device: estimate: MACs / rate"
    host = energy.for_stream(stream, active, idle, 1000, 3.7)  # no device latency: the host's busy time
    assert host["energy/mj_per_inference"] == pytest.approx(0.429 * 20) and host["energy/busy_from"].startswith("host")
