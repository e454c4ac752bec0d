"""Any torchvision SSD given as a `_target_` is wrapped to raw outputs (backbone + head + fixed anchors),
takes a local torchvision checkpoint, counts the background class itself, and builds like the built-in SSD."""

import torch
from torchvision.models.detection import ssdlite320_mobilenet_v3_large
from torchvision.models.detection.image_list import ImageList

from edgebuild import testing
from edgebuild.detection.models import RawSSD
from edgebuild.models import build_model
from edgebuild.stages.distill import model_conf
from edgebuild.tasks import make_task

SSDLITE = "torchvision.models.detection.ssdlite320_mobilenet_v3_large"
DATA = ["data.num_samples=40", "data.image_size=96", "data.num_classes=3"]
# model=ssdlite only to start from a config without ssd_small's kwargs; the _target_ decides what is built
TARGET = ["model=ssdlite", "model.name=ssdlite_target", f"model._target_={SSDLITE}",
          "+model.kwargs.weights_backbone=null", *DATA]


def test_target_ssd_is_wrapped_with_its_checkpoint_and_background_class(tmp_path):
    torch.manual_seed(1)
    reference = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4).eval()
    torch.save(reference.state_dict(), tmp_path / "ssdlite.pt")  # a torchvision checkpoint, as users have them
    cfg = testing.compose(testing.shrink(tmp_path) + DATA, "ssd_int8")
    task = make_task(cfg.task)
    dm = task.datamodule(cfg.data, tmp_path / "cache")
    model_cfg = model_conf({"_target_": SSDLITE, "kwargs": {"weights_backbone": None},
                            "weights": str(tmp_path / "ssdlite.pt")})

    model = task.prepare_model(build_model(model_cfg, dm), dm)

    assert isinstance(model, RawSSD)
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        boxes, scores, anchors = model(x)
        features = list(reference.backbone(x).values())
        expected = reference.head(features)
        expected_anchors = reference.anchor_generator(ImageList(x, [(96, 96)] * 2), features)
    assert scores.shape[-1] == 4  # 3 shapes + background, although the data says 3 classes
    torch.testing.assert_close(scores, expected["cls_logits"])
    torch.testing.assert_close(boxes, expected["bbox_regression"])
    torch.testing.assert_close(anchors[0], expected_anchors[0])


def test_target_ssd_builds_exports_and_is_measured(tmp_path):
    overrides = testing.shrink(tmp_path) + TARGET + ["stages.train.epochs=1", "stages.quantize=null",
                                                     "budget.min_map=null", "budget.max_map_drop=null"]
    assert testing.compose(overrides, "ssd_int8").model._target_ == SSDLITE
    summary = testing.build(overrides, tmp_path, recipe="ssd_int8")

    train = summary["stages"][0]["metrics"]
    assert train["macs"] > 1e6 and "map/50_95" in train and train["latency/p50_ms"] > 0
