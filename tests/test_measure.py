"""Measurement primitives: MACs (one per multiply-add), params, sizes."""

import pytest
import torch
from torch import nn

from edgebuild.evaluate import count_macs, size_metrics


def test_textbook_conv_macs():
    conv = nn.Conv2d(3, 128, 3, bias=False)
    assert count_macs(conv, [1, 3, 10, 10]) == (221_184, 3 * 3 * 3 * 128)


def test_textbook_depthwise_separable_macs():
    separable = nn.Sequential(nn.Conv2d(3, 3, 3, groups=3, bias=False), nn.Conv2d(3, 128, 1, bias=False))
    macs, params = count_macs(separable, [1, 3, 10, 10])
    assert macs == 26_304
    assert params == 3 * 9 + 3 * 128


def test_torchvision_mobilenet_v2_matches_published_counts():
    import torchvision

    macs, params = count_macs(torchvision.models.mobilenet_v2(), [1, 3, 224, 224])
    assert macs == pytest.approx(300.8e6, rel=0.002)
    assert params == pytest.approx(3.50e6, rel=0.002)


def test_count_is_at_batch_one_whatever_the_shape_says():
    conv = nn.Conv2d(3, 128, 3, bias=False)
    assert count_macs(conv, [8, 3, 10, 10])[0] == 221_184


def test_zip_size_sees_zeros(tmp_path):
    torch.manual_seed(0)
    dense, sparse = torch.randn(50_000), torch.randn(50_000)
    sparse[torch.rand(50_000) < 0.9] = 0
    (tmp_path / "dense.bin").write_bytes(dense.numpy().tobytes())
    (tmp_path / "sparse.bin").write_bytes(sparse.numpy().tobytes())
    d, s = size_metrics(tmp_path, ["dense.bin"]), size_metrics(tmp_path, ["sparse.bin"])
    assert d["size/bytes"] == s["size/bytes"] == 200_000
    assert s["size/zip_bytes"] < d["size/zip_bytes"] / 3


def test_per_layer_macs_follow_the_textbook():
    from edgebuild.evaluate import layer_macs

    separable = nn.Sequential(nn.Conv2d(3, 3, 3, groups=3, bias=False), nn.Conv2d(3, 128, 1, bias=False),
                              nn.Flatten(), nn.Linear(128 * 64, 10))
    per_layer = {name: macs for name, (_, macs) in layer_macs(separable, [1, 3, 10, 10]).items()}
    assert per_layer == {"0": 1_728, "1": 24_576, "3": 81_920}
    assert sum(per_layer.values()) == count_macs(separable, [1, 3, 10, 10])[0]


def test_accuracy_comparison_accepts_only_flips_within_a_tie():
    import numpy as np

    from tests.conftest import assert_accuracy_matches

    logits = np.array([[2.0, 1.0], [1.0, 1.0000001], [0.0, 3.0], [5.0, 0.0]])  # row 1: a tie within rounding
    labels = np.array([0, 0, 1, 1])  # argmax right, wrong (tie), right, wrong: 2 / 4
    assert_accuracy_matches(logits, labels, 0.5)
    assert_accuracy_matches(logits, labels, 0.75)  # the tied row counted the other way by another runtime
    with pytest.raises(AssertionError, match="only 1 rows"):
        assert_accuracy_matches(logits, labels, 1.0)  # a row with a clear margin cannot flip
