"""Model sources: built-in, torchvision by name, _target_, local weights with weights_only=True."""

import pytest
import torch

from edgebuild import testing
from edgebuild.data import DataModule
from edgebuild.errors import EdgebuildError
from edgebuild.models import build_model


def build(tmp_path, *overrides):
    cfg = testing.compose(testing.shrink(tmp_path) + ["data=synthetic", *overrides])
    return build_model(cfg.model, DataModule(cfg.data, tmp_path))


def test_builtin_cnn_fits_the_data(tmp_path):
    model = build(tmp_path)
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 4)


def test_torchvision_model_with_small_input_stem_and_channels(tmp_path):
    model = build(tmp_path, "model=mobilenet_v2")
    first = model.features[0][0]
    assert first.in_channels == 1 and first.stride == (1, 1)
    assert model.eval()(torch.zeros(1, 1, 16, 16)).shape == (1, 4)


def test_local_weights_load_with_weights_only(tmp_path):
    source = build(tmp_path, "model=mobilenet_v2")
    torch.nn.init.constant_(source.classifier[1].weight, 0.125)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    loaded = build(tmp_path, "model=mobilenet_v2", f"model.weights={tmp_path}/w.pt")
    assert torch.equal(loaded.classifier[1].weight, source.classifier[1].weight)


def test_lightning_checkpoint_weights_load(tmp_path):
    source = build(tmp_path)
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "last.ckpt")
    loaded = build(tmp_path, f"model.weights={tmp_path}/last.ckpt")
    pairs = zip(loaded.state_dict().values(), source.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_incompatible_weights_are_named_and_can_be_loaded_partially(tmp_path):
    other = build(tmp_path, "model=mobilenet_v2", "model.num_classes=7")
    torch.save(other.state_dict(), tmp_path / "w7.pt")
    with pytest.raises(EdgebuildError, match="shape mismatch: classifier.1.weight"):
        build(tmp_path, "model=mobilenet_v2", f"model.weights={tmp_path}/w7.pt")
    partial = build(tmp_path, "model=mobilenet_v2", f"model.weights={tmp_path}/w7.pt", "model.strict_weights=false")
    assert torch.equal(partial.features[1].conv[0][0].weight, other.features[1].conv[0][0].weight)


@pytest.mark.parametrize("content,match", [(b"garbage", "cannot load weights"), (None, "does not exist")])
def test_missing_or_corrupt_weights(tmp_path, content, match):
    path = tmp_path / "w.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(EdgebuildError, match=match):
        build(tmp_path, f"model.weights={path}")


def test_pickled_module_is_refused_as_weights(tmp_path):
    torch.save(build(tmp_path), tmp_path / "whole.pt")  # a whole pickled module: code could run on load
    with pytest.raises(EdgebuildError, match="cannot load weights"):
        build(tmp_path, f"model.weights={tmp_path}/whole.pt")


def test_target_class(tmp_path):
    model = build(tmp_path, "model._target_=edgebuild.models.small_cnn", "model.kwargs={width: 2}")
    assert model[0].out_channels == 2 and model.eval()(torch.zeros(1, 1, 16, 16)).shape == (1, 4)


def test_unknown_model_name(tmp_path):
    with pytest.raises(EdgebuildError, match="unknown model 'mobilenet_v9'"):
        build(tmp_path, "model.name=mobilenet_v9")


def test_bn_momentum_sets_every_batchnorm_and_enters_the_source_key(tmp_path):
    default = build(tmp_path, "model.name=mobilenet_v3_small")
    assert {m.momentum for m in default.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.01}  # torchvision's
    model = build(tmp_path, "model.name=mobilenet_v3_small", "model.bn_momentum=0.1")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) > 30 and {m.momentum for m in norms} == {0.1}
    from edgebuild.pipeline import Builder  # the option must reach the cache key, or a stale model is reused

    keys = set()
    for extra in ([], ["model.bn_momentum=0.1"]):
        cfg = testing.compose(testing.shrink(tmp_path) + ["data=synthetic", "model=mobilenet_v2", *extra])
        keys.add(Builder(cfg, tmp_path / "run", "default").source().digest)
    assert len(keys) == 2


def test_bn_momentum_without_batchnorm_or_out_of_range_is_refused(tmp_path):
    with pytest.raises(EdgebuildError, match="has no BatchNorm layer"):
        build(tmp_path, "model._target_=torch.nn.Flatten", "~model.kwargs.width", "model.bn_momentum=0.1")
    from edgebuild.config import check_config

    with pytest.raises(EdgebuildError, match=r"model.bn_momentum=1.5 is out of range: it must be > 0 and <= 1"):
        check_config(testing.compose(testing.shrink(tmp_path) + ["model.bn_momentum=1.5"]))
