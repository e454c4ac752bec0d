"""Shared by the runtime tests: the embedded digits data and the project's CNN trained on it (plain torch,
a few seconds), saved as a torch artifact every runtime converts from."""

import numpy as np
import pytest

from edgebuild import testing
from edgebuild.artifact import Artifact
from edgebuild.data import DataModule


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("digits")
    return DataModule(testing.compose(testing.shrink(tmp) + ["data.calibration.size=64"]).data, tmp)


@pytest.fixture(scope="session")
def digits_model(digits, tmp_path_factory):
    """(torch artifact, torch float top-1 on the test split)."""
    import torch

    from edgebuild.models import small_cnn

    torch.manual_seed(0)
    model = small_cnn(num_classes=digits.num_classes, in_channels=1, width=8)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    train = digits.splits["train"]
    x, y = torch.from_numpy(digits.normalize(train.images)), torch.from_numpy(train.labels)
    for _ in range(15):
        for i in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
    model.eval()
    meta = {**digits.meta(), "precision": "fp32"}
    artifact = Artifact.save_torch(model, tmp_path_factory.mktemp("torch"), meta)
    return artifact, top1(lambda a: model(torch.from_numpy(a)).detach().numpy(), digits)


def top1(predict, digits):
    test = digits.splits["test"]
    logits = predict(digits.normalize(test.images))
    return float((np.asarray(logits).argmax(1) == test.labels).mean())


def target_cfg(runtime, **kw):
    from omegaconf import OmegaConf

    return OmegaConf.merge(testing.compose([f"target={runtime}"]).target, kw)


def fp32_deployable(runtime, digits_model, tmp_path_factory):
    """The digits CNN converted to the runtime's FP32 format."""
    source, _ = digits_model
    return runtime.deployable(source, tmp_path_factory.mktemp(f"{runtime.name}_fp32"), ["logits"])


def int8_deployable(runtime, digits, digits_model, tmp_path_factory):
    """The digits CNN quantized to INT8 by the runtime's own quantizer, calibrated on digits."""
    from edgebuild.targets.base import QuantizeRequest

    source, _ = digits_model
    request = QuantizeRequest(calibration=digits.calibration(), output_names=["logits"],
                              meta={**source.meta, "precision": "int8"})
    return runtime.quantize(source, request, tmp_path_factory.mktemp(f"{runtime.name}_int8"),
                            tmp_path_factory.mktemp(f"{runtime.name}_float"))
