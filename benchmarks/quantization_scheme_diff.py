"""NNCF scheme per target device on MobileNetV2 (random weights): where FakeQuantize nodes go (docs/benchmarks.md)."""
import collections

import nncf
import numpy as np
import openvino as ov
import torch
import torchvision

m = torchvision.models.mobilenet_v2(num_classes=10).eval()
model = ov.convert_model(m, example_input=torch.zeros(1,3,48,48))
data = nncf.Dataset([np.random.rand(1,3,48,48).astype(np.float32) for _ in range(20)])
for dev in ("CPU", "GPU", "NPU"):
    q = nncf.quantize(model, data, subset_size=20, target_device=nncf.TargetDevice[dev])
    fq = [op for op in q.get_ops() if op.get_type_name() == "FakeQuantize"]
    levels = collections.Counter(int(op.get_attributes()["levels"]) for op in fq)
    consumers = collections.Counter(next(iter(op.output(0).get_target_inputs())).get_node().get_type_name()
                                    for op in fq)
    print(dev, "FakeQuantize", len(fq), "levels", dict(levels), "feeding", dict(consumers))
