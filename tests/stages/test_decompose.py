"""decompose: the Haar split loses nothing (the image comes back from its 4 bands), the adapted model still takes
the raw image (in torch and as the deployed IR), and a stem that cannot read the bands is refused by name."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from edgebuild import testing
from edgebuild.errors import EdgebuildError
from edgebuild.evaluate import count_macs
from edgebuild.pipeline import plan
from edgebuild.stages.decompose import _haar_class, decompose
from tests.conftest import assert_accuracy_matches


def test_haar_split_is_invertible():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 16, 12)
    split = _haar_class()(3)
    bands = split(x)
    assert bands.shape == (3, 12, 8, 6)
    # orthonormal: the transpose rebuilds the image, and the energy is the same
    back = nn.functional.conv_transpose2d(bands, split.weight, stride=2, groups=3)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-6)
    torch.testing.assert_close(bands.square().sum(), x.square().sum(), rtol=1e-5, atol=0)
    # LL (band 0 of each channel) is the 2x2 mean, doubled; the detail bands of a flat image are 0
    torch.testing.assert_close(bands[:, 0::4], 2 * nn.functional.avg_pool2d(x, 2), rtol=0, atol=1e-6)
    flat = split(torch.ones(1, 3, 4, 4))
    assert torch.all(flat[:, 1::4].abs() < 1e-7) and torch.allclose(flat[:, 0::4], torch.full((1, 3, 2, 2), 2.0))


def test_decomposed_model_takes_the_raw_image_and_reads_half_size_bands():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    shape = [1, 3, 16, 16]
    adapted = decompose(model, shape).eval()
    seen = []
    adapted[1][0].register_forward_pre_hook(lambda m, a: seen.append(list(a[0].shape)))
    x = torch.rand(2, 3, 16, 16)
    assert adapted(x).shape == (2, 5)
    assert seen == [[2, 12, 8, 8]]  # the stem reads 4 x 3 bands at 8x8
    assert isinstance(model[0], nn.Conv2d) and model[0].in_channels == 3  # the input model is left as it was
    macs, macs_new = count_macs(model, shape)[0], count_macs(adapted, shape)[0]
    stem, second = 8 * 3 * 9 * 16 * 16, 8 * 8 * 9 * 16 * 16
    assert macs == stem + second + 8 * 5
    # the stem reads 4x the channels on 1/4 of the pixels (same MACs), the next conv runs on 1/4 of the pixels,
    # and the split itself is one 2x2 filter per band: a hand count of what the decomposition costs
    assert macs_new == stem + second // 4 + 12 * 4 * 8 * 8 + 8 * 5


@pytest.mark.parametrize("stem, why", [
    (nn.Conv2d(1, 4, 3, stride=3), r"stride \(3, 3\) is not 1 or 2"),
    (nn.Conv2d(2, 4, 3, groups=2), r"grouped conv \(groups=2\)"),
    (nn.Conv1d(1, 4, 3), "it is a Conv1d, not a Conv2d"),
])
def test_a_stem_that_cannot_take_the_bands_is_named(stem, why):
    channels = stem.in_channels
    model = nn.Sequential(nn.Identity(), stem)
    shape = [1, channels, 8] if isinstance(stem, nn.Conv1d) else [1, channels, 8, 8]
    with pytest.raises(EdgebuildError, match=rf"stem layer '1' cannot take Haar sub-bands: .*{why}"):
        decompose(model, shape)


def test_a_stem_that_does_not_read_the_raw_input_and_an_odd_image_are_refused():
    resize = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(1, 4, 3))
    with pytest.raises(EdgebuildError, match=r"stem layer '1' .* does not read the raw input"):
        decompose(resize, [1, 1, 8, 8])
    with pytest.raises(EdgebuildError, match=r"stem layer '0' .* the input 9x9 is not even"):
        decompose(nn.Sequential(nn.Conv2d(1, 4, 3)), [1, 1, 9, 9])


def test_unknown_method_stops_the_plan():
    with pytest.raises(EdgebuildError, match="unknown method 'dct'"):
        plan(testing.compose(["stages.haar.method=dct"], recipe="decompose_haar"))


def test_decompose_haar_deployable_takes_the_raw_image(tmp_path):
    import openvino as ov

    from edgebuild.data import DataModule

    quick = ["data=synthetic", "model.kwargs.width=8", "stages.train.epochs=2", "stages.haar.epochs=1",
             "stages.res4.epochs=1", "budget.max_acc_drop=null"]
    s = testing.build(testing.shrink(tmp_path) + quick, tmp_path, recipe="decompose_haar")
    by = {st["name"]: st["metrics"] for st in s["stages"]}
    assert by["haar"]["decompose/bands"] == 4 and by["haar"]["decompose/band_size"] == 8
    assert by["haar"]["macs"] < 0.5 * by["train"]["macs"]
    deploy = Path(s["deploy"])
    spec = json.loads((deploy / "model.json").read_text())
    assert spec["input_shape"] == [1, 1, 16, 16] and spec["deploy_input_transform"]["kind"] == "haar2x2"
    core = ov.Core()
    ir = core.read_model(str(deploy / "model.xml"))
    assert list(ir.inputs[0].get_partial_shape().get_min_shape())[1:] == [1, 16, 16]
    dm = DataModule(testing.compose(testing.shrink(tmp_path) + ["data=synthetic"]).data, tmp_path / "cache")
    test = dm.splits["test"]
    compiled = core.compile_model(ir, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert_accuracy_matches(compiled(dm.normalize(test.images))[0], test.labels, by["export"]["acc/top1"])
