"""Pruning and clustering on the shared CIFAR-10 baseline (MobileNetV2 width 0.5, stride-1 stem).

    nice -n 10 python benchmarks/pruning.py [--epochs 1] [--limit 20000] [--train-epochs 6]
                                            [--cache-dir outputs/bench-cache] [--rounds 5] [overrides...]

One edgebuild build (edgebuild.pipeline.build): the baseline `train` stage (a stage-cache hit when
the shared baseline exists with the same options), then from it, each with `--epochs` of fine-tuning:
structured pruning to 50 % MACs with L1 and with activation-utilization importance, Torch-Pruning's
own example settings (50 % channels, group L2 magnitude), each of those + INT8 PTQ, INT8 PTQ of the
unpruned model, unstructured 80 % sparsity, and clustering to 16 centroids. Then every deployable is
compiled on the OpenVINO CPU runtime (f32 hint for FP32 IRs, 2 threads) and its latency measured in
`--rounds` interleaved rounds in this one process (medians; spread and load average printed).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "cifar10-train.tar.gz"

# name -> (stage node, what it stands for); every stage's input is the trained baseline unless given
VARIANTS = {
    "struct_l1": ("{kind: prune, input: train, macs_target: 0.5, importance: l1, epochs: E}",
                  "structured, 50 % MACs, L1"),
    "struct_act": ("{kind: prune, input: train, macs_target: 0.5, importance: activation, epochs: E}",
                   "structured, 50 % MACs, activation utilization"),
    "tp_example": ("{kind: prune, input: train, ratio: 0.5, importance: l2, epochs: E}",
                   "Torch-Pruning example: 50 % channels, group L2"),
    "int8": ("{kind: quantize, input: train}", "INT8 PTQ of the unpruned model"),
    "struct_int8": ("{kind: quantize, input: struct_l1}", "structured L1 + INT8 PTQ"),
    "sparse80": ("{kind: prune, input: train, mode: unstructured, ratio: 0.8, epochs: E}",
                 "unstructured 80 %, global magnitude"),
    "cluster16": ("{kind: cluster, input: train, n_clusters: 16, epochs: E}", "clustering, 16 centroids per layer"),
}


def overrides(args: argparse.Namespace, tmp: Path) -> list[str]:
    data = ["data=synthetic", "data.channels=3", "data.image_size=32", "data.mean=[0.5,0.5,0.5]",
            "data.std=[0.25,0.25,0.25]"] if args.smoke else ["data=imagefolder", f"data.root={args.data}"]
    base = ["model=mobilenet_v2", *data, f"data.limit={args.limit}", "budget.min_acc=null",
            f"stages.train.epochs={args.train_epochs}", f"cache.dir={args.cache_dir}", "tracking=none",
            "stages.export=null", "eval.latency.enabled=false"]
    return base + [f"+stages.{name}={node.replace('epochs: E', f'epochs: {args.epochs}')}"
                   for name, (node, _) in VARIANTS.items() if name in args.variants] + args.overrides


def interleaved_latency(summary: dict, cfg, rounds: int) -> dict[str, list[float]]:
    """p50 per round for every stage's deployable, compiled once, measured round-robin."""
    from edgebuild.artifact import Artifact
    from edgebuild.targets import make_target

    target = make_target(cfg.target)
    sessions = {}
    for st in summary["stages"]:
        root = Path(st["deployable"])
        files = ["model.xml", "model.bin"]  # the main file first
        art = Artifact("openvino", root, files, meta={"input_shape": [1, 3, cfg.data.image_size, cfg.data.image_size]})
        sessions[st["name"]] = target.runtime.compile(art, target.device, 1)
    import numpy as np

    x = np.random.default_rng(0).standard_normal([1, 3, cfg.data.image_size, cfg.data.image_size]).astype(np.float32)
    p50: dict[str, list[float]] = {n: [] for n in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            p50[name].append(float(np.median(session.bench(x, 20, 300, 0.5))))
    return p50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs per variant")
    parser.add_argument("--limit", type=int, default=20000, help="CIFAR-10 images used (shared baseline: 20000)")
    parser.add_argument("--train-epochs", type=int, default=6, help="baseline training epochs (shared baseline: 6)")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--cache-dir", default=str(ROOT / "outputs" / "bench-cache"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="generated data instead of CIFAR-10 (checks the script)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    args.variants = args.variants.split(",")

    from edgebuild import testing
    from edgebuild.pipeline import build

    load0, t0 = os.getloadavg()[0], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = testing.compose(overrides(args, Path(tmp)))
        summary = build(cfg, Path(tmp) / "run", "pruning-benchmark")
        seconds = time.perf_counter() - t0
        p50 = interleaved_latency(summary, cfg, args.rounds)
    load1 = os.getloadavg()[0]

    stages = {st["name"]: st for st in summary["stages"]}
    base = stages["train"]["metrics"]
    int8_p50 = statistics.median(p50["int8"]) if "int8" in p50 else None
    print(f"variants: {', '.join(args.variants)}; data limit {args.limit}; baseline {args.train_epochs} epochs")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; load avg {load0:.1f} at "
          f"start, {load1:.1f} at end; build {seconds:.0f} s; fine-tuning {args.epochs} epoch(s) per variant; "
          f"latency: OpenVINO CPU, batch 1, {cfg.target.threads} threads, median of {args.rounds} interleaved rounds")
    head = (f"{'stage':12} {'what':46} {'top-1':>7} {'drop pp':>7} {'MACs':>6} {'IR MB':>6} {'IR x':>5} {'zip x':>5} "
            f"{'p50 ms':>7} {'spread':>6} {'speed-up':>8} {'vs INT8':>7} {'sec':>5}")
    print(head)
    for name, st in stages.items():
        m = st["metrics"]
        lat = statistics.median(p50[name])
        spread = (max(p50[name]) - min(p50[name])) / lat
        base_lat = statistics.median(p50["train"])
        vs_int8 = f"{int8_p50 / lat:7.2f}" if int8_p50 and name.endswith("int8") else f"{'':7}"
        what = VARIANTS.get(name, ("", "unpruned FP32 baseline"))[1]
        print(f"{name:12} {what:46} {m['acc/top1']:7.4f} {(base['acc/top1'] - m['acc/top1']) * 100:7.2f} "
              f"{m.get('macs', 0) / base['macs']:6.2f} {m['size/bytes'] / 1e6:6.2f} "
              f"{base['size/bytes'] / m['size/bytes']:5.2f} {base['size/zip_bytes'] / m['size/zip_bytes']:5.2f} "
              f"{lat:7.3f} {spread:6.0%} {base_lat / lat:8.2f} {vs_int8} {st['seconds']:5.0f}")
    for note in summary["notes"]:
        print("note:", note)


if __name__ == "__main__":
    main()
