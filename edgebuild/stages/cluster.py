"""cluster: weight sharing. Each selected layer's weights become `n_clusters` shared values
(per-layer k-means, scikit-learn), optionally fine-tuned with every weight tied to its centroid
(the centroids train; the assignment stays), then written back as plain weights.

The exporter folds BatchNorm into the convolution before it (scaling every output channel), which
would turn k shared values into k x channels; so BatchNorm is folded first (torch.fx) and the folded
weights are clustered: the deployable holds exactly k values per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from edgebuild.artifact import Artifact, write_json
from edgebuild.config import bounded
from edgebuild.errors import EdgebuildError
from edgebuild.finetune import DEFAULT_SCHEDULER, FitConfig, fit
from edgebuild.stage import Stage, StageResult, check_patterns
from edgebuild.stages import weights

QUANTIZE_NOTE = ("clustered weights hold few distinct values: they compress well (size/zip_bytes) but run at the "
                 "same speed; a quantize stage afterwards maps each shared value to one INT8 level (per channel), "
                 "so a layer still holds at most n_clusters values and the two gains stack: INT8 speed, and "
                 "4-bit indices' worth of information for storage or transfer")


@dataclass
class Cluster(FitConfig, Stage):
    kind: ClassVar[str] = "cluster"
    needs_float_input: ClassVar[bool] = True
    version: ClassVar[int] = 1
    uses: ClassVar[tuple[str, ...]] = ("data", "task", "trainer")

    n_clusters: int = bounded(16, ge=2, le=256)
    init: str = "linear"  # linear (evenly spaced between min and max: keeps the rare large weights) | k-means++
    fold_batchnorm: bool = True  # fold BatchNorm into convolutions first, so the export keeps k values per layer
    layers: list[str] = field(default_factory=list)  # regexes of layer names to cluster; empty = all
    layer_types: list[str] = field(default_factory=lambda: ["Conv2d", "Linear"])
    ignore: list[str] = field(default_factory=list)  # regexes left alone (the task's output layers always are)
    epochs: int = bounded(1, ge=0)  # fine-tuning with weights tied to their centroids; 0 = none
    optimizer: dict[str, Any] = field(default_factory=lambda: {"_target_": "torch.optim.AdamW", "_partial_": True,
                                                               "lr": 1e-4, "weight_decay": 0.0})
    scheduler: dict[str, Any] | None = field(default_factory=lambda: dict(DEFAULT_SCHEDULER))

    def check(self, cfg: Any) -> None:
        if not 2 <= self.n_clusters <= 65536:
            raise EdgebuildError(f"cluster: n_clusters {self.n_clusters} is outside [2, 65536]",
                                 "use e.g. n_clusters: 16 (4-bit indices) or 32")
        if self.init not in ("linear", "k-means++"):
            raise EdgebuildError(f"cluster: unknown init {self.init!r}", "use linear or k-means++")
        check_patterns(self, layers=self.layers, ignore=self.ignore)

    def run(self, ctx: Any) -> StageResult:
        from torch.nn.utils import parametrize

        model = weights.load_float_model(ctx, "cluster")
        notes = [QUANTIZE_NOTE]
        if self.fold_batchnorm:
            model, folded = fold_batchnorm(model)
            if not folded:
                notes.append("BatchNorm could not be folded (the model is not torch.fx-traceable): the exporter's "
                             "folding will multiply the distinct values per layer")
        layers = weights.select_layers(model, ctx, self.layer_types, self.layers, self.ignore)
        for i, module in enumerate(layers.values()):
            values = module.weight.detach().flatten().numpy()
            centroids, labels = kmeans(values, self.n_clusters, self.init, ctx.seed + i)
            parametrize.register_parametrization(module, "weight", tied_to_centroids(centroids, labels, module.weight))
        metrics: dict[str, Any] = {"finetune/val_before": weights.validate(model, ctx)}
        model, fit_metrics = fit(model, ctx, self, name="finetune")
        metrics.update(fit_metrics)
        modules = dict(model.named_modules())
        for name in layers:  # the tied weights become plain tensors holding k distinct values
            parametrize.remove_parametrizations(modules[name], "weight", leave_parametrized=True)
        table = {n: r for n, r in weights.sparsity_table(model).items() if n in layers}
        write_json(ctx.workdir / "clusters.json", table)
        metrics.update({"cluster/unique_values_max": max(r["unique_values"] for r in table.values()),
                        "cluster/layers": len(table),
                        "cluster/weights_fraction": sum(r["weights"] for r in table.values()) /
                        sum(p.numel() for p in model.parameters())})
        meta = {**ctx.input.meta, "clustered": {"n_clusters": self.n_clusters, "layers": len(table)}}
        return StageResult(Artifact.save_torch(model, ctx.workdir, meta), metrics, files={"clusters": "clusters.json"},
                           notes=notes)


def kmeans(values: np.ndarray, k: int, init: str, seed: int) -> tuple[Any, Any]:
    """1-D k-means of one layer's weights: (centroids [k'], label per weight); k' <= k when the layer
    has fewer distinct values. Fitted on at most 100k sampled weights, then every weight assigned."""
    import torch
    from sklearn.cluster import KMeans

    distinct = np.unique(values)
    k = min(k, len(distinct))
    rng = np.random.default_rng(seed)
    sample = values if len(values) <= 100_000 else rng.choice(values, 100_000, replace=False)
    start = np.linspace(values.min(), values.max(), k).reshape(-1, 1) if init == "linear" else "k-means++"
    km = KMeans(n_clusters=k, init=start, n_init=1, max_iter=100, random_state=seed).fit(sample.reshape(-1, 1))
    centroids = km.cluster_centers_.reshape(-1).astype(np.float32)
    labels = np.abs(values.reshape(-1, 1) - centroids.reshape(1, -1)).argmin(1)
    return torch.from_numpy(centroids), torch.from_numpy(labels)


def tied_to_centroids(centroids: Any, labels: Any, weight: Any) -> Any:
    """A parametrization: weight = centroids[labels]; gradients of tied weights sum into their centroid."""
    from torch import nn

    class TiedToCentroids(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.centroids = nn.Parameter(centroids.clone())
            self.register_buffer("labels", labels.reshape(weight.shape).clone())

        def forward(self, original: Any) -> Any:  # the original weights no longer matter
            return self.centroids[self.labels]

    return TiedToCentroids()


def fold_batchnorm(model: Any) -> tuple[Any, bool]:
    """Conv+BatchNorm pairs folded into one convolution (torch.fx), as the exporter would do."""
    import torch.fx
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model), True
    except (torch.fx.proxy.TraceError, TypeError, RuntimeError, NotImplementedError):
        return model, False
