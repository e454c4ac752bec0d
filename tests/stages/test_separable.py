"""separable: textbook MAC/param counts, the factorised initialisation, a rewritten model exports."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from edgebuild import testing
from edgebuild.artifact import Artifact
from edgebuild.errors import EdgebuildError
from edgebuild.evaluate import count_macs
from edgebuild.stages.separable import Separable, conv_macs, separable_block


def test_seed_example_221184_to_26304_macs():
    """A 3x3 conv with 128 filters on a 10x10x3 input (no padding) and its depthwise-separable form."""
    conv = nn.Conv2d(3, 128, 3, bias=False)
    assert count_macs(nn.Sequential(conv), [1, 3, 10, 10]) == (221_184, 3 * 128 * 9)
    block, _ = separable_block(conv, batchnorm=False, activation=None)
    assert count_macs(nn.Sequential(block), [1, 3, 10, 10]) == (26_304, 3 * 9 + 3 * 128)  # 1,728 + 24,576
    assert [type(m) for m in block] == [nn.Conv2d, nn.Conv2d] and block[0].groups == 3


def test_factorisation_is_exact_for_a_separable_kernel():
    """W[o, i] = p[o, i] * d[i] is representable: the SVD init reproduces the conv (stride, padding, bias kept)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(10, 6, 1, 1) * torch.randn(1, 6, 3, 3))
    block, error = separable_block(conv, batchnorm=False, activation=None)
    x = torch.randn(2, 6, 9, 9)
    assert error < 1e-5
    torch.testing.assert_close(block(x), conv(x), atol=1e-5, rtol=1e-4)


def _ctx(tmp_path, model, shape):
    art = Artifact.save_torch(model, tmp_path / "in", {"input_shape": shape})
    (tmp_path / "out").mkdir()
    return SimpleNamespace(input=art, workdir=tmp_path / "out")


def test_small_cnn_rewrite_counts_shapes_and_export(tmp_path):
    import openvino as ov

    from edgebuild.convert import onnx_to_openvino, torch_to_onnx

    model = testing.tiny_model(num_classes=4, in_channels=1)
    shape = [1, 1, 16, 16]
    before = conv_macs(model, shape)
    result = Separable(min_macs=10_000).run(_ctx(tmp_path, model, shape))
    rewritten = result.artifact.load_torch()
    chosen = [n for n, v in before.items() if v >= 10_000]
    assert chosen and result.metrics["separable/layers"] == len(chosen)
    # textbook per layer: dw H*W*Cin*k*k + pw H*W*Cin*Cout, H*W from the original's output
    expected = 0
    for name in chosen:
        conv = model.get_submodule(name)
        hw = before[name] // (conv.in_channels * conv.out_channels * 9)
        expected += hw * conv.in_channels * 9 + hw * conv.in_channels * conv.out_channels
    assert result.metrics["separable/layer_macs_after"] == expected
    assert count_macs(rewritten, shape)[0] == count_macs(model, shape)[0] - sum(before[n] for n in chosen) + expected
    x = torch.randn(3, 1, 16, 16)
    assert rewritten(x).shape == (3, 4)
    assert count_macs(model, shape) == count_macs(testing.tiny_model(4, 1), shape)  # the input was not mutated
    onnx = torch_to_onnx(rewritten, shape, tmp_path / "m.onnx", ["logits"])
    xml = onnx_to_openvino(onnx, tmp_path / "m.xml")
    out = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x[:1].numpy())[0]
    torch.testing.assert_close(torch.from_numpy(out), rewritten(x[:1]).detach(), atol=1e-4, rtol=1e-3)


def test_bn_and_activation_between():
    block, _ = separable_block(nn.Conv2d(4, 8, 3, padding=1), batchnorm=True, activation="relu6")
    assert [type(m) for m in block] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU6, nn.Conv2d]


def test_selection_matching_no_layer_names_the_eligible_ones(tmp_path):
    with pytest.raises(EdgebuildError, match=r"no layer matches .*eligible convs.*0 "):
        Separable(layers=["nope\\..*"]).run(_ctx(tmp_path, testing.tiny_model(), [1, 1, 8, 8]))
    with pytest.raises(EdgebuildError, match="not a regex"):
        Separable(layers=["("]).check(None)
