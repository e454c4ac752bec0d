"""qat: NNCF PTQ on the torch model, fine-tuning through the shared Lightning path, INT8 IR. The only
test module that uses NNCF's torch backend (its C++ extension compiles on first use, ~40 s)."""

from pathlib import Path

import openvino as ov
import pytest

from edgebuild import testing
from edgebuild.errors import EdgebuildError
from edgebuild.targets.openvino import is_quantized as is_quantized_openvino
from tests.conftest import FAST


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qat")
    overrides = [*testing.shrink(tmp), *FAST, "stages.export=null", "+stages.qat={kind: qat, epochs: 1}"]
    return tmp, overrides, testing.build(overrides, tmp)


def test_qat_fine_tunes_and_exports_an_int8_ir(built):
    _, _, s = built
    train, qat = (st["metrics"] for st in s["stages"])
    assert qat["qat/epochs"] == 1.0
    assert "qat/best_val_acc" in qat and "qat/seconds" in qat
    assert qat["int8/ops_fraction"] == 1.0 and qat["runtime/precision"] == "int8"
    assert qat["quantize/fp_layers"] == 0 and qat["quantize/calibration_samples"] == 32
    assert qat["quantize/target_device"] == "CPU"  # the default target's device: NNCF's CPU scheme
    assert qat["acc/top1"] >= train["acc/top1"] - 0.05
    assert qat["macs"] == train["macs"]  # an IR inherits its torch source's counts
    deployable = Path(s["stages"][-1]["deployable"])
    assert is_quantized_openvino(ov.Core().read_model(str(deployable / "model.xml")))
    assert (deployable / "model.bin").stat().st_size * 2 < train["size/bytes"]


def test_qat_refuses_an_int8_input_at_plan_time(built):
    tmp, overrides, _ = built
    with pytest.raises(EdgebuildError, match=r"its input .qat. is already quantized \(int8\)"):
        testing.build([*overrides, "+stages.again={kind: qat, input: qat}"], tmp, run_name="again")
