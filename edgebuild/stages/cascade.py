"""cascade: evaluate a two-model cascade — the small model answers when its top-1 softmax confidence
is at least the threshold, otherwise the big model is run.

Both models are compiled on the target and run over the held-out split (each at its own input size);
per threshold: accuracy, the fraction escalated to the big model, and the expected latency
small + fraction x big, with both latencies measured on the target (batch 1, interleaved rounds,
medians). The operating threshold is the fastest one within `max_drop_pp` of the big model's accuracy.

Artifact: the small model's deployable (main file, measured by the pipeline as the small model alone)
with the big model's files beside it (`big_<file>`), and `meta["deploy_cascade"]` (threshold, rule, big
model file, input shape and preprocessing) so the packaged model.json describes the whole cascade (the
MLflow pyfunc of the deployable runs it). Each model is fed the held-out images with its own preprocessing
(a big model from a user's folder may normalize differently from the data). Report files: cascade.json (the
curve) and cascade.png (accuracy vs expected latency). Latencies are measured when the stage runs and
cached with it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgebuild.artifact import Artifact, read_deploy_folder
from edgebuild.config import bounded
from edgebuild.errors import EdgebuildError
from edgebuild.stage import Stage, StageResult

RULE = "softmax(small logits).max() >= threshold ? small's answer : big's answer"


def is_path(ref: str) -> bool:
    return "/" in ref or Path(ref).expanduser().exists()


@dataclass
class Cascade(Stage):
    kind: ClassVar[str] = "cascade"
    version: ClassVar[int] = 2  # 2: each model's own preprocessing, recorded in deploy_cascade
    uses: ClassVar[tuple[str, ...]] = ("data", "task", "target")
    tasks: ClassVar[tuple[str, ...]] = ("classification",)  # confidence = top-1 softmax of class logits

    small: str | None = None  # stage name or deploy folder (with model.json); default: this stage's input
    big: str | None = None  # stage name or deploy folder (required)
    thresholds: list[float] = bounded(factory=lambda: [0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.999], ge=0, le=1)
    # the operating threshold: fastest one within this many pp of the big model
    max_drop_pp: float = bounded(0.5, ge=0, le=100)
    latency_rounds: int = bounded(3, ge=1)  # interleaved small/big latency rounds (medians)

    def references(self) -> list[str]:
        return [r for r in (self.small, self.big) if r and not is_path(r)]

    def check(self, cfg: Any) -> None:
        if not self.big:
            raise EdgebuildError("cascade needs the big model",
                                 "set stages.<cascade>.big to a stage name or a deploy folder")
        bad = [t for t in self.thresholds if not 0.0 <= t <= 1.0]
        if bad or not self.thresholds:
            raise EdgebuildError(f"cascade thresholds {bad or '[]'} are not confidences in [0, 1]",
                                 "give one or more thresholds between 0 and 1, e.g. [0.8, 0.9, 0.99]")
        for role in ("small", "big"):
            ref = getattr(self, role)
            if ref and is_path(ref):
                read_deploy_folder(ref, f"cascade {role}=")
        stream = cfg.get("eval", {}).get("stream", {})
        if stream.get("enabled") and int(stream.get("requests", 1)) > 1:  # edgebuild/stream/model.py CascadeModel
            raise EdgebuildError(f"eval.stream.requests={stream.get('requests')}: a cascade streams synchronously (its "
                                 "big model runs after the small one, on the same frame)",
                                 "set eval.stream.requests=1 for a cascade build")

    def params(self) -> dict[str, Any]:
        p = super().params()
        for role in ("small", "big"):  # a folder's content, not only its name, decides the output
            ref = getattr(self, role)
            if ref and is_path(ref):
                p[f"{role}_digest"] = read_deploy_folder(ref, f"cascade {role}=").digest
        return p

    def run(self, ctx: Any) -> StageResult:
        from edgebuild.evaluate import deploy, interleaved, load

        arts = {"small": self._artifact(ctx, self.small) if self.small else ctx.input,
                "big": self._artifact(ctx, self.big)}
        deployables, logits, labels = {}, {}, {}
        for role, art in arts.items():
            deployables[role] = deploy(art, ctx.workdir / f".{role}", ctx)
            logits[role], labels[role] = predict(deployables[role], ctx)
        if not np.array_equal(labels["small"], labels["big"]):
            raise EdgebuildError("cascade: the two models were evaluated on different samples", "")
        roles = ("small", "big")
        rounds = interleaved([load(deployables[r], ctx, 1) for r in roles],  # both see the same machine load
                             [deployables[r].meta["input_shape"] for r in roles], ctx.cfg.eval.latency,
                             max(1, self.latency_rounds))
        p50s = dict(zip(roles, rounds, strict=True))
        ms = {role: float(np.median(v)) for role, v in p50s.items()}
        curve = cascade_curve(logits["small"], logits["big"], labels["big"], self.thresholds, ms["small"], ms["big"])
        big_acc = float((logits["big"].argmax(1) == labels["big"]).mean())
        small_acc = float((logits["small"].argmax(1) == labels["small"]).mean())
        point = operating_point(curve, big_acc, self.max_drop_pp)

        artifact = self._bundle(ctx, deployables, point["threshold"])
        report = {"rule": RULE, "small_acc": small_acc, "big_acc": big_acc, "small_latency_ms": ms["small"],
                  "big_latency_ms": ms["big"], "latency_rounds": p50s, "operating_point": point, "curve": curve}
        (ctx.workdir / "cascade.json").write_text(json.dumps(report, indent=2))
        plot(curve, small_acc, big_acc, ms, point, ctx.workdir / "cascade.png")
        metrics = {"cascade/small_acc": small_acc, "cascade/big_acc": big_acc, "cascade/small_latency_ms": ms["small"],
                   "cascade/big_latency_ms": ms["big"], "cascade/threshold": point["threshold"],
                   "cascade/acc": point["accuracy"], "cascade/escalated": point["escalated"],
                   "cascade/expected_latency_ms": point["expected_latency_ms"],
                   "cascade/latency_vs_big": point["expected_latency_ms"] / ms["big"],
                   "cascade/drop_vs_big_pp": (big_acc - point["accuracy"]) * 100}
        steps = [{"name": f"threshold={c['threshold']}", "params": {"threshold": c["threshold"]},
                  "metrics": {f"cascade/{k}": v for k, v in c.items() if k != "threshold"}} for c in curve]
        within = (big_acc - point["accuracy"]) * 100 <= self.max_drop_pp
        notes = [f"cascade at threshold {point['threshold']}: accuracy {point['accuracy']:.4f} (big {big_acc:.4f}, "
                 f"small {small_acc:.4f}), {point['escalated']:.0%} escalated, "
                 f"expected {point['expected_latency_ms']:.3f} ms"
                 f" = {metrics['cascade/latency_vs_big']:.0%} of the big model's {ms['big']:.3f} ms"
                 + ("" if within else f"; no threshold comes within {self.max_drop_pp} pp of the big model")]
        files = {"cascade_json": "cascade.json", "cascade_curve": "cascade.png"}
        return StageResult(artifact, metrics, files=files, steps=steps, notes=notes)

    def _artifact(self, ctx: Any, ref: str) -> Artifact:
        return read_deploy_folder(ref) if is_path(ref) else ctx.artifacts[ref]

    def _bundle(self, ctx: Any, deployables: dict[str, Artifact], threshold: float) -> Artifact:
        """The small model's deployable with the big one's files beside it (flat: packaging copies files)."""
        files = []
        for role, prefix in (("small", ""), ("big", "big_")):
            d = deployables[role]
            for f in d.files:
                shutil.copy2(d.root / f, ctx.workdir / f"{prefix}{Path(f).name}")
                files.append(f"{prefix}{Path(f).name}")
        for role in deployables:
            shutil.rmtree(ctx.workdir / f".{role}", ignore_errors=True)
        small = deployables["small"]
        cascade = {"threshold": threshold, "rule": RULE, "big_model": f"big_{Path(deployables['big'].files[0]).name}",
                   "big_input_shape": deployables["big"].meta["input_shape"],
                   "big_preprocess": preprocess(deployables["big"].meta, ctx.data.meta())}
        return Artifact(small.kind, ctx.workdir, files, meta={**small.meta, "deploy_cascade": cascade})


def preprocess(meta: dict[str, Any], data_meta: dict[str, Any]) -> dict[str, Any]:
    """A model's x = (pixels / scale - mean) / std, from its meta; what its meta leaves out, from the data's."""
    return {k: meta.get(k) if meta.get(k) is not None else data_meta[k] for k in ("scale", "mean", "std")}


def predict(deployable: Artifact, ctx: Any) -> tuple[np.ndarray, np.ndarray]:
    """Logits of the compiled deployable over the held-out split, at the model's own input size and with
    its own preprocessing."""
    from edgebuild.data import for_input
    from edgebuild.evaluate import load

    batch = ctx.cfg.eval.batch_size
    session = load(deployable, ctx, batch)
    data = for_input(ctx.data, deployable.meta["input_shape"])
    pre = preprocess(deployable.meta, data.meta())
    scale, mean, std = (np.asarray(v, dtype=np.float32).reshape(1, -1, 1, 1)
                        for v in ([pre["scale"]], pre["mean"], pre["std"]))
    split = data.splits[ctx.cfg.eval.split]
    n_all = min(len(split.labels), ctx.cfg.eval.limit) if ctx.cfg.eval.limit else len(split.labels)
    outs, ys = [], []
    for i in range(0, n_all, batch):
        x = (split.images[i:i + batch].astype(np.float32) / scale - mean) / std  # = data.normalize for its own
        n = len(x)
        if n < batch:  # static compiled shape: pad the last batch
            x = np.concatenate([x, np.zeros((batch - n, *x.shape[1:]), dtype=x.dtype)])
        outs.append(np.asarray(session.infer(x)[0])[:n])
        ys.append(np.asarray(split.labels[i:i + batch]))
    return np.concatenate(outs), np.concatenate(ys)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def escalates(small_logits: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The rule, shared by the curve and the stream (edgebuild/stream/model.py): (escalate to the big model,
    the small model's top-1 softmax confidence in float64) per row."""
    confidence = softmax(np.asarray(small_logits, np.float64)).max(axis=1)
    return confidence < threshold, confidence


def cascade_curve(small_logits: np.ndarray, big_logits: np.ndarray, labels: np.ndarray, thresholds: list[float],
                  small_ms: float, big_ms: float) -> list[dict[str, float]]:
    """Per threshold: accuracy, fraction escalated, expected latency = small + fraction x big."""
    small_pred, big_pred = small_logits.argmax(1), big_logits.argmax(1)
    curve = []
    for t in sorted(thresholds):
        escalate, _ = escalates(small_logits, t)
        pred = np.where(escalate, big_pred, small_pred)
        frac = float(escalate.mean())
        curve.append({"threshold": float(t), "accuracy": float((pred == labels).mean()), "escalated": frac,
                      "expected_latency_ms": small_ms + frac * big_ms})
    return curve


def operating_point(curve: list[dict[str, float]], big_acc: float, max_drop_pp: float) -> dict[str, float]:
    """The fastest threshold within max_drop_pp of the big model; else the most accurate one."""
    ok = [c for c in curve if (big_acc - c["accuracy"]) * 100 <= max_drop_pp + 1e-9]
    if ok:
        return min(ok, key=lambda c: (c["expected_latency_ms"], -c["accuracy"]))
    return max(curve, key=lambda c: (c["accuracy"], -c["expected_latency_ms"]))


def plot(curve: list[dict[str, float]], small_acc: float, big_acc: float, ms: dict[str, float],
         point: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    ax.plot([c["expected_latency_ms"] for c in curve], [c["accuracy"] for c in curve], "o-", label="cascade")
    for c in curve:
        ax.annotate(f"{c['threshold']:g}", (c["expected_latency_ms"], c["accuracy"]), fontsize=7,
                    textcoords="offset points", xytext=(3, -9))
    ax.plot([ms["small"]], [small_acc], "s", label="small alone")
    ax.plot([ms["big"]], [big_acc], "D", label="big alone")
    ax.plot([point["expected_latency_ms"]], [point["accuracy"]], "*", markersize=14, label="operating point")
    ax.set_xlabel("expected latency per image (ms, batch 1, target runtime)")
    ax.set_ylabel("top-1 accuracy (held-out)")
    ax.set_title("two-model cascade: threshold on the small model's confidence")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
