"""TensorFlow Lite Micro (target=mcu) and Vela (target=ethos_u55/u65) with the real libraries, on the digits CNN
quantized by litert's PT2E quantizer: TFLM's int8 outputs against LiteRT's, the arena search, the
firmware C array (compiled and run when a C++ compiler exists), Vela's figures, and the bad-input errors."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgebuild.errors import EdgebuildError
from edgebuild.targets import Target
from edgebuild.targets.ethos_u import PER_OPERATOR, EthosURuntime
from edgebuild.targets.firmware import MODEL_CC, MODEL_H, OPS_H, write_firmware
from edgebuild.targets.litert import LiteRTRuntime
from edgebuild.targets.tflm import Micro, TFLMRuntime, model_ops, resolver_name
from tests.targets.conftest import fp32_deployable, int8_deployable, target_cfg, top1


class Atan2(torch.nn.Module):  # ATAN2: LiteRT has it, TFLite Micro has no kernel for it
    def forward(self, x):
        return torch.atan2(x, x + 1).flatten(1)


@pytest.fixture(scope="module")
def runtime():
    return TFLMRuntime(target_cfg("mcu"))


@pytest.fixture(scope="module")
def int8(runtime, digits, digits_model, tmp_path_factory):
    return int8_deployable(runtime, digits, digits_model, tmp_path_factory).artifact


def test_tflm_int8_outputs_match_litert_and_accuracy_is_tflms(runtime, int8, digits):
    """The same .tflite: TFLM's int8 kernels against LiteRT's builtin (non-delegated) int8 kernels. Measured here:
    not bit-identical (up to 1 LSB on this model: the kernels' rounding differs; 2 LSB against XNNPACK), so at
    most 2 LSB apart, the same class wherever LiteRT's top two differ by more than 4 LSB, and the held-out
    top-1 computed by TFLM's session within 0.5 pp of LiteRT's."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    micro = Micro(int8.main_file)
    lite = Interpreter(model_path=str(int8.main_file),
                       experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    lite.allocate_tensors()
    inp, out = lite.get_input_details()[0], lite.get_output_details()[0]
    x = digits.normalize(digits.splits["test"].images[:64])
    for row in x:
        q = micro.quantize(row[None])
        assert q.dtype == np.int8
        lite.set_tensor(inp["index"], q)
        lite.invoke()
        ref, got = lite.get_tensor(out["index"]).astype(int)[0], micro.raw(q).astype(int)[0]
        assert np.abs(got - ref).max() <= 2
        top2 = np.sort(ref)[-2:]
        if top2[1] - top2[0] > 4:
            assert got.argmax() == ref.argmax()
    tflm = top1(lambda a: runtime.load(int8, "CPU", 1).infer(a)[0], digits)
    lite = top1(lambda a: LiteRTRuntime(target_cfg("litert")).load(int8, "CPU", 1).infer(a)[0], digits)
    assert abs(tflm - lite) <= 0.005 and tflm > 0.5


def test_arena_is_the_planners_and_the_search_finds_the_smallest_that_works(runtime, int8):
    session = runtime.load(int8, "CPU", 1)
    info = session.runtime_info()
    micro = session.micro
    assert info["memory/arena_bytes"] == micro.arena_bytes > 0 and info["runtime/precision"] == "int8"
    assert micro.arena_search_bytes <= micro.arena_bytes + 16
    assert micro._try(micro.arena_search_bytes)[0] is not None  # the figure found works...
    assert micro._try(micro.arena_search_bytes - 16)[0] is None  # ...and 16 bytes less does not
    io = 1 * 8 * 8 * 1 + 10  # int8 input [1,1,8,8] and output [1,10]
    assert info["memory/io_bytes"] == io and info["memory/peak_ram_bytes"] == info["memory/arena_bytes"] + io
    code = runtime.options["runtime_code_bytes"]
    ops = model_ops(int8.main_file)
    expected_code = code["core"] + sum(code["per_op"].get(op, code["default_op"]) for op in ops)
    assert info["memory/flash_bytes"] == int8.main_file.stat().st_size + expected_code
    assert "16 KB" in info["memory/runtime_code_source"]
    assert info["memory/estimate_flash_bytes"] > 0 and info["memory/estimate_arena_bytes"] > 0  # the old figures


def test_firmware_c_array_round_trips_and_compiles(runtime, int8, tmp_path):
    """model_data.cc holds the .tflite's bytes, 16-byte aligned, with its length; model_ops.h lists the resolver
    entries. With a C++ compiler: a program linking model_data.cc writes the array back, byte for byte."""
    micro = Micro(int8.main_file)
    fw = write_firmware(int8.main_file, tmp_path, model_ops(int8.main_file), micro.arena_bytes,
                        micro.io_quantization())
    data = int8.main_file.read_bytes()
    cc = (tmp_path / MODEL_CC).read_text()
    assert "alignas(16) const unsigned char g_model_data[]" in cc and f"g_model_data_len = {len(data)};" in cc
    body = cc[cc.index("{") + 1:cc.index("};")]
    assert bytes(int(b, 16) for b in body.replace(",", " ").split()) == data
    ops_h = (tmp_path / OPS_H).read_text()
    assert "resolver.AddConv2D()" in ops_h and "resolver.AddFullyConnected()" in ops_h
    assert "MicroMutableOpResolver<kNumOps>" in ops_h and f"kNumOps = {len(fw['resolver'])};" in ops_h
    assert f"kTensorArenaSize = {fw['tensor_arena_bytes']};" in ops_h and fw["tensor_arena_bytes"] % 16 == 0
    q = micro.io_quantization()["input"]
    assert f"kInputZeroPoint = {q['zero_point']};" in ops_h and q["dtype"] == "int8"
    compiler = shutil.which("g++") or shutil.which("c++")
    if not compiler:
        pytest.skip("no C++ compiler on this machine")
    (tmp_path / "main.cc").write_text(
        f'#include <cstdio>\n#include <cstdint>\n#include "{MODEL_H}"\n'
        "int main(int, char** argv) { if (reinterpret_cast<std::uintptr_t>(g_model_data) % 16) return 3;\n"
        '  FILE* f = std::fopen(argv[1], "wb"); std::fwrite(g_model_data, 1, g_model_data_len, f);\n'
        "  std::fclose(f); return 0; }\n")
    subprocess.run([compiler, "-std=c++17", "-O0", "-o", str(tmp_path / "dump"), str(tmp_path / "main.cc"),
                    str(tmp_path / MODEL_CC)], check=True, cwd=tmp_path)
    subprocess.run([str(tmp_path / "dump"), str(tmp_path / "back.tflite")], check=True)
    assert (tmp_path / "back.tflite").read_bytes() == data


def test_resolver_names():
    assert [resolver_name(o) for o in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "MAX_POOL_2D",
                                       "BATCH_MATMUL", "HARD_SWISH")] == \
        ["Conv2D", "DepthwiseConv2D", "FullyConnected", "MaxPool2D", "BatchMatMul", "HardSwish"]


def test_vela_on_the_int8_model(int8, digits_model, tmp_path_factory, tmp_path):
    rt = EthosURuntime(target_cfg("ethos_u55"))
    session = rt.load(int8, "CPU", 1)
    info = session.runtime_info()
    assert info["ethos_u/accelerator"] == "ethos-u55-128" and info["ethos_u/cycles"] > info["ethos_u/npu_cycles"] > 0
    assert info["latency/estimate_ms"] == pytest.approx(info["ethos_u/cycles"] / 500e6 * 1000)
    assert info["ethos_u/inferences_per_s"] == pytest.approx(500e6 / info["ethos_u/cycles"])
    assert info["ethos_u/npu_ops_fraction"] == 1.0 and info["ethos_u/cpu_ops"] == ""  # every op on the NPU
    assert info["ethos_u/sram_bytes"] > 0 and info["ethos_u/flash_bytes"] > 0
    assert info["memory/arena_bytes"] > 0  # TFLM's figures beside Vela's
    files = session.report_files(tmp_path)
    header = files["ethos_u_per_operator"].read_text().splitlines()[0]
    assert files["ethos_u_per_operator"].name == PER_OPERATOR and "Target" in header and "Op Cycles" in header
    u65 = EthosURuntime(target_cfg("ethos_u65")).load(int8, "CPU", 1).runtime_info()
    assert u65["ethos_u/accelerator"] == "ethos-u65-256" and u65["ethos_u/cycles"] > 0
    # a float model: Vela's CPU fallbacks would be everything; it is measured by TFLM only, and says so
    fp32 = fp32_deployable(rt, digits_model, tmp_path_factory)
    assert "float model" in rt.load(fp32, "CPU", 1).runtime_info()["ethos_u/skipped"]


def test_bad_target_options_are_clear_errors():
    with pytest.raises(EdgebuildError, match="(?s)unknown accelerator config 'ethos-u55-100'.*u55-128"):
        Target(target_cfg("ethos_u55", options={"accelerator_config": "ethos-u55-100"}))
    with pytest.raises(EdgebuildError, match="(?s)system_config .Nope. is not in vela.ini.*U55_High_End_Embedded"):
        Target(target_cfg("ethos_u55", options={"system_config": "Nope"}))
    with pytest.raises(EdgebuildError, match="memory_mode 'Nope'"):
        Target(target_cfg("ethos_u65", options={"memory_mode": "Nope"}))
    with pytest.raises(EdgebuildError, match="no inference precision 'f32'"):
        Target(target_cfg("mcu", precision="f32"))


def test_missing_packages_are_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "tflite_micro", None)
    with pytest.raises(EdgebuildError, match="tflite-micro==0.dev20261023182759"):
        Target(target_cfg("mcu")).check()
    monkeypatch.delitem(sys.modules, "tflite_micro")
    monkeypatch.setitem(sys.modules, "ethosu.vela", None)
    with pytest.raises(EdgebuildError, match="ethos-u-vela==5.2.0"):
        Target(target_cfg("ethos_u55")).check()


def test_an_operator_tflite_micro_lacks_is_named_with_its_layer(tmp_path):
    from edgebuild.targets.litert import convert

    path = convert(Atan2().eval(), {"input_shape": [1, 1, 4, 4]}, tmp_path / "m.tflite")
    with pytest.raises(EdgebuildError, match="(?s)no kernel for operator ATAN2 \\(layer '.*Atan2.*'\\).*rewrite"):
        Micro(path)
