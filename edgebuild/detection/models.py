"""SSD detectors whose network returns raw outputs: what exports to ONNX / OpenVINO and what the
deployable runs; decode + NMS run outside it (edgebuild/detection/postprocess.py).

`RawSSD.forward(x [N,C,H,W]) -> (bbox_regression [N,A,4], cls_logits [N,A,1+classes], anchors [N,A,4])`.
The anchors (torchvision's `DefaultBoxGenerator` at the fixed input size) are computed once and
returned as an output, so the loss, the metric and a user of the deployable all read the same ones.
Whole torchvision detectors do not convert (their forward returns a list of dicts after NMS); their
backbone and head do, so torchvision's SSDs are wrapped here the same way as the built-in one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgebuild.detection.postprocess import BOX_CODER_WEIGHTS
from edgebuild.errors import EdgebuildError

TORCHVISION_SSDS = ("ssdlite320_mobilenet_v3_large", "ssd300_vgg16")


class RawSSD(nn.Module):
    """Backbone (image -> feature maps) + SSD head, with the anchors fixed for one input size."""

    def __init__(self, backbone: nn.Module, head: nn.Module, anchor_generator: nn.Module, input_shape: list[int]):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.box_coder_weights = BOX_CODER_WEIGHTS
        from torchvision.models.detection.image_list import ImageList

        was_training = backbone.training
        with torch.no_grad():  # the anchors depend only on the feature maps' sizes at this input size
            x = torch.zeros([1, *input_shape[1:]])
            backbone.eval()  # BN in training mode fails on 1x1 maps at batch 1 (and would update its statistics)
            features = self.features(x)
            anchors = anchor_generator(ImageList(x, [tuple(input_shape[2:])]), features)[0]
        backbone.train(was_training)
        # not in the state_dict: torchvision SSD checkpoints (backbone.*, head.*) load as they are
        self.register_buffer("anchors", anchors.float(), persistent=False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.backbone(x)
        return list(out.values()) if isinstance(out, dict) else list(out)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.head(self.features(x))
        return out["bbox_regression"], out["cls_logits"], self.anchors.expand(x.shape[0], -1, -1)


class ConvBackbone(nn.Module):
    """Plain 3x3 conv/BN/ReLU stack; the head reads its maps at strides 8, 16, 32 and 64."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()

        def block(i: int, o: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

        w = width
        self.levels = nn.ModuleList([
            nn.Sequential(block(in_channels, w, 2), block(w, 2 * w, 2), block(2 * w, 2 * w, 1),
                          block(2 * w, 4 * w, 2), block(4 * w, 4 * w, 1)),
            nn.Sequential(block(4 * w, 8 * w, 2), block(8 * w, 8 * w, 1)),
            block(8 * w, 8 * w, 2),
            block(8 * w, 8 * w, 2),
        ])
        self.out_channels = [4 * w, 8 * w, 8 * w, 8 * w]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for level in self.levels:
            x = level(x)
            maps.append(x)
        return maps


def small_ssd(num_classes: int, in_channels: int, input_shape: list[int], width: int = 16,
              min_ratio: float = 0.1, max_ratio: float = 0.8) -> RawSSD:
    """The built-in detector: 9 convs + torchvision's SSDHead and DefaultBoxGenerator (0.6 M params and
    about 90 M MACs at 160x160 with width 16); learns the generated shapes in about a minute."""
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.ssd import SSDHead

    backbone = ConvBackbone(in_channels, width)
    anchors = DefaultBoxGenerator([[2], [2, 3], [2, 3], [2]], min_ratio=min_ratio, max_ratio=max_ratio)
    head = SSDHead(backbone.out_channels, anchors.num_anchors_per_location(), num_classes + 1)
    return RawSSD(backbone, head, anchors, input_shape)


def torchvision_ssd(name: str, num_classes: int, in_channels: int, input_shape: list[int], **kwargs: Any) -> RawSSD:
    """torchvision's ssdlite320_mobilenet_v3_large / ssd300_vgg16 (untrained, or weights from a local
    state_dict through model.weights) as backbone + head at the data's input size; the model's own
    resize/normalize transform is dropped: edgebuild's preprocessing (model.json) replaces it."""
    import torchvision

    if in_channels != 3:
        raise EdgebuildError(f"{name} takes 3-channel images; the data has {in_channels}", "set data.channels=3")
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=num_classes + 1,
                                         **kwargs)
    return as_raw_detector(model, input_shape, name)


def as_raw_detector(model: nn.Module, input_shape: list[int], name: str | None = None) -> nn.Module:
    """A torchvision `SSD` (ssd300_vgg16, ssdlite320_mobilenet_v3_large, or one built by hand or by any
    `_target_`) as backbone + head + fixed anchors; any other module is returned as it is (the task then
    checks that it returns raw outputs)."""
    from torchvision.models.detection.ssd import SSD

    if not isinstance(model, SSD):
        return model
    if tuple(model.box_coder.weights) != tuple(BOX_CODER_WEIGHTS):
        raise EdgebuildError(f"the SSD's box coder weights {model.box_coder.weights} differ from the deployable's "
                             f"decode {BOX_CODER_WEIGHTS}", "build the SSD with torchvision's default box coder")
    try:
        return RawSSD(model.backbone, model.head, model.anchor_generator, input_shape)
    except RuntimeError as e:  # e.g. VGG-SSD's extra layers need about 300x300 input
        raise EdgebuildError(f"{name or type(model).__name__} cannot run at input {input_shape[2:]}: "
                             f"{str(e).splitlines()[0]}",
                             "use a larger data.image_size (ssd300_vgg16: 300)") from None


def build(cfg: Any, dm: Any, num_classes: int, in_channels: int, **kwargs: Any) -> RawSSD:
    """models.EXTRA_BUILDERS entry: `model.name` ssd_small or a torchvision SSD name; `num_classes`
    counts the objects' classes (the background is added)."""
    shape = list(dm.input_shape)
    if cfg.name == "ssd_small":
        return small_ssd(num_classes, in_channels, shape, **kwargs)
    return torchvision_ssd(cfg.name, num_classes, in_channels, shape, **kwargs)


def output_layers(model: nn.Module) -> list[nn.Module]:
    """The head's last convolutions (their channels are anchors x classes / box coordinates): layers
    a channel pruner must leave alone."""
    head = getattr(model, "head", None)
    if head is None or not hasattr(head, "classification_head"):
        return []
    out = []
    for branch in (head.classification_head, head.regression_head):
        for m in branch.module_list:
            convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
            out.append(convs[-1])
    return out
