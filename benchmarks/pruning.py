"""Pruning and clustering on the shared CIFAR-10 baseline (benchmarks/cifar_baseline.py).

    nice -n 10 python benchmarks/pruning.py [--epochs 2] [--macs-target 0.5] [--round-to N] [--iterative-steps N]
                                            [--global-pruning] [--variants a,b,...] [--limit 50000]
                                            [--train-epochs 8] [--cache-dir outputs/bench-cache] [--rounds 5]
                                            [overrides...]
    # issue 5's targets (docs/benchmarks.md):
    python benchmarks/pruning.py --epochs 8 --round-to 16 --iterative-steps 2 \
        --variants reference,struct_l1,int8,struct_int8

One edgebuild build (edgebuild.pipeline.build): the baseline `train` stage (a stage-cache hit when
the shared baseline exists with the same options), then from it, each with `--epochs` of fine-tuning:
structured pruning to 50 % MACs with L1 and with activation-utilization importance, Torch-Pruning's
own example settings (50 % channels, group L2 magnitude), each of those + INT8 PTQ, INT8 PTQ of the
unpruned model, unstructured 80 % sparsity, and clustering to 16 centroids; and the reference they are
judged against: the unpruned model fine-tuned for the same epochs with the same optimizer (so a variant's
drop is not hidden by training the baseline further). Then every deployable is compiled on the OpenVINO
CPU runtime (f32 hint for FP32 IRs, 2 threads) and its latency measured in `--rounds` interleaved rounds
in this one process, at the model's own 32x32 and reshaped to 224x224 (latency only; a 32x32 model of a
few M MACs is dispatch-bound, where neither fewer MACs nor INT8 can show).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cifar_baseline  # noqa: E402
from quantization import interleaved_latency as latency_at  # noqa: E402

# name -> (stage node, what it stands for); every stage's input is the trained baseline unless given
# the reference fine-tunes with prune's default optimizer
FINETUNE = "optimizer: {_target_: torch.optim.AdamW, _partial_: true, lr: 0.001, weight_decay: 0.0001}"
VARIANTS = {
    "reference": (f"{{kind: train, input: train, epochs: E, {FINETUNE}}}",
                  "unpruned, fine-tuned like the variants (reference)"),
    "struct_l1": ("{kind: prune, input: train, macs_target: M, importance: l1, global_pruning: G, round_to: R, "
                  "iterative_steps: I, epochs: E}",
                  "structured, MAC target, L1"),
    "struct_act": ("{kind: prune, input: train, macs_target: M, importance: activation, round_to: R, epochs: E}",
                   "structured, MAC target, activation utilization"),
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
    base = [*cifar_baseline.MODEL, *data, f"data.limit={args.limit}", "budget.min_acc=null",
            f"stages.train.epochs={args.train_epochs}", f"cache.dir={args.cache_dir}", "tracking=none",
            "stages.export=null", "eval.latency.enabled=false"]
    steps = args.iterative_steps  # first: its "epochs: E" is per step
    fill = {"iterative_steps: I, epochs: E": f"iterative_steps: {steps}, epochs: {args.epochs // steps}",
            "epochs: E": f"epochs: {args.epochs}", "macs_target: M": f"macs_target: {args.macs_target}",
            "global_pruning: G": f"global_pruning: {str(args.global_pruning).lower()}",
            "round_to: R": f"round_to: {args.round_to or 'null'}"}
    return base + [f"+stages.{name}={functools.reduce(lambda n, kv: n.replace(*kv), fill.items(), node)}"
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
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs per variant")
    parser.add_argument("--macs-target", type=float, default=0.5, help="structured variants keep this MAC fraction")
    parser.add_argument("--round-to", type=int, default=None, help="struct variants keep channels in blocks of N")
    parser.add_argument("--iterative-steps", type=int, default=1,
                        help="struct_l1 prunes in N steps, --epochs / N fine-tuning epochs after each")
    parser.add_argument("--global-pruning", action="store_true", help="struct_l1 ranks channels across layers")
    parser.add_argument("--limit", type=int, default=cifar_baseline.LIMIT, help="CIFAR-10 images used")
    parser.add_argument("--train-epochs", type=int, default=cifar_baseline.EPOCHS, help="baseline training epochs")
    parser.add_argument("--data", default=str(cifar_baseline.DATA))
    parser.add_argument("--cache-dir", default=str(cifar_baseline.CACHE))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="generated data instead of CIFAR-10 (checks the script)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    args.variants = args.variants.split(",")
    if args.iterative_steps < 1 or args.epochs % args.iterative_steps:
        parser.error(f"--epochs {args.epochs} must split evenly into --iterative-steps {args.iterative_steps}")

    from edgebuild import testing
    from edgebuild.pipeline import build

    load0, t0 = os.getloadavg()[0], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = testing.compose(overrides(args, Path(tmp)))
        summary = build(cfg, Path(tmp) / "run", "pruning-benchmark")
        seconds = time.perf_counter() - t0
        p50 = interleaved_latency(summary, cfg, args.rounds)
        xmls = {st["name"]: Path(st["deployable"]) / "model.xml" for st in summary["stages"]}
        p50_224 = latency_at(xmls, 224, args.rounds, 25)
    load1 = os.getloadavg()[0]

    stages = {st["name"]: st for st in summary["stages"]}
    base = stages["train"]["metrics"]
    ref = stages.get("reference", stages["train"])["metrics"]
    int8_p50 = statistics.median(p50["int8"]) if "int8" in p50 else None
    int8_224 = statistics.median(p50_224["int8"]) if "int8" in p50_224 else None
    print(f"variants: {', '.join(args.variants)}; macs_target {args.macs_target}, round_to {args.round_to}, "
          f"global {args.global_pruning}; data limit {args.limit}; baseline {args.train_epochs} epochs")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; load avg {load0:.1f} at "
          f"start, {load1:.1f} at end; build {seconds:.0f} s; fine-tuning {args.epochs} epoch(s) per variant; "
          f"latency: OpenVINO CPU, batch 1, {cfg.target.threads} threads, median of {args.rounds} interleaved rounds")
    head = (f"{'stage':12} {'what':46} {'top-1':>7} {'drop pp':>7} {'vs ref':>6} {'MACs':>6} {'IR MB':>6} {'IR x':>5} "
            f"{'zip x':>5} {'p50 ms':>7} {'spread':>6} {'speed-up':>8} {'vs INT8':>7} {'224 ms':>7} {'224 x':>6} "
            f"{'vs INT8':>7} {'sec':>5}")
    print(head)
    for name, st in stages.items():
        m = st["metrics"]
        lat = statistics.median(p50[name])
        spread = (max(p50[name]) - min(p50[name])) / lat
        base_lat = statistics.median(p50["train"])
        vs_int8 = f"{int8_p50 / lat:7.2f}" if int8_p50 and name.endswith("int8") else f"{'':7}"
        lat224, base224 = statistics.median(p50_224[name]), statistics.median(p50_224["train"])
        vs_int8_224 = f"{int8_224 / lat224:7.2f}" if int8_224 and name.endswith("int8") else f"{'':7}"
        what = VARIANTS.get(name, ("", "unpruned FP32 baseline"))[1]
        print(f"{name:12} {what:46} {m['acc/top1']:7.4f} {(base['acc/top1'] - m['acc/top1']) * 100:7.2f} "
              f"{(ref['acc/top1'] - m['acc/top1']) * 100:6.2f} "
              f"{m.get('macs', 0) / base['macs']:6.2f} {m['size/bytes'] / 1e6:6.2f} "
              f"{base['size/bytes'] / m['size/bytes']:5.2f} {base['size/zip_bytes'] / m['size/zip_bytes']:5.2f} "
              f"{lat:7.3f} {spread:6.0%} {base_lat / lat:8.2f} {vs_int8} {lat224:7.3f} {base224 / lat224:6.2f} "
              f"{vs_int8_224} {st['seconds']:5.0f}")
    for note in summary["notes"]:
        print("note:", note)


if __name__ == "__main__":
    main()
