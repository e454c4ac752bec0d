"""The shared CIFAR-10 baseline of the quantization, pruning and distillation benchmarks: one place for its
options, so all three build the same trained FP32 model once and then take it from the stage cache.

MobileNetV2 at width 1.4 with the standard stride-2 stem (32x32 inputs, 4x fewer MACs than a stride-1 stem
at the same width; at 224x224 it is the paper's MobileNetV2-1.4), trained on all 50,000 images of
../shared/data/cifar10-train.tar.gz split by seed: 32,500 train / 7,500 val / 10,000 held-out test.
Width 1.4 rather than 0.5: a model with few weights cannot show INT8's size gain (scales, zero points and
the graph XML weigh as much as its INT8 weights), and edge users quantize and prune over-parameterized models.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "cifar10-train.tar.gz"
CACHE = ROOT / "outputs" / "bench-cache"
LIMIT = 50000
EPOCHS = 8
MODEL = ["model=mobilenet_v2", "model.kwargs.width_mult=1.4", "model.small_input=false"]


def overrides(data: str | Path = DATA, limit: int = LIMIT, epochs: int = EPOCHS,
              cache_dir: str | Path = CACHE) -> list[str]:
    """The baseline's `train` stage, as `python -m edgebuild` overrides."""
    return [*MODEL, "data=imagefolder", f"data.root={data}", f"data.limit={limit}",
            f"stages.train.epochs={epochs}", f"cache.dir={cache_dir}"]
