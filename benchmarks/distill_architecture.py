"""Distillation, architecture rewrites and cascades on CIFAR-10 (issue 6), in one edgebuild build.

    nice -n 10 python benchmarks/distill_architecture.py [--limit 50000] [--teacher-epochs 8] [--width 48]
        [--epochs 8] [--student-width 16] [--alpha 0.5] [--min-macs 5000000]

Stages (one build, `edgebuild.pipeline.build`, cached in outputs/bench-cache):
  train      a VGG-style CNN (3 standard 3x3 conv blocks, `--width`), `--teacher-epochs` on labels:
             the original, the teacher and the cascade's big model
  student    the same CNN family at `--student-width`, distilled from `train`; also trained without a
             teacher for the same epochs (compare_baseline)
  separable  the convs of `train` costing >= `--min-macs` -> depthwise 3x3 + pointwise 1x1, started
             from the SVD factorisation of each kernel (the 3-channel stem stays a standard conv, as in
             MobileNet: a depthwise conv over RGB keeps too little)
  sep_kd     the separable CNN distilled from `train` (the original)
  cascade    small = student, big = train: accuracy / escalation / expected latency per threshold
Then the deployables are timed again in one process, interleaved rounds.
Prints one table per outcome and says which targets were met.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cifar_baseline  # noqa: E402


def overrides(args: argparse.Namespace) -> list[str]:
    kd = f"alpha: {args.alpha}, temperature: {args.temperature}"
    small_cnn = f"{{name: cnn, kwargs: {{width: {args.student_width}}}}}"
    student = (f"{{kind: distill, teacher: train, student_model: {small_cnn}, epochs: {args.epochs}, {kd}, "
               "compare_baseline: true}")
    return [
        "model=cnn", f"model.kwargs.width={args.width}", "data=imagefolder", f"data.root={args.data}",
        f"data.limit={args.limit}", f"stages.train.epochs={args.teacher_epochs}", f"cache.dir={args.cache}",
        "stages.export=null", "tracking=none",
        "budget.min_acc=null",  # the default recipe's digits budget; this script reports the targets itself
        f"+stages.student={student}",
        f"+stages.separable={{kind: separable, input: train, min_macs: {args.min_macs}}}",
        f"+stages.sep_kd={{kind: distill, teacher: train, epochs: {args.epochs}, {kd}}}",
        "+stages.cascade={kind: cascade, small: student, big: train, "
        "thresholds: [0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]}",
        "eval.latency.min_seconds=1.0",
    ]


def interleaved_latency(deploys: dict[str, Path], rounds: int, threads: int) -> dict[str, list[float]]:
    """p50 per round of each deployable, measured in turn in this one process (fair under load)."""
    import numpy as np
    import openvino as ov

    core = ov.Core()
    compiled, inputs = {}, {}
    for name, folder in deploys.items():
        spec = json.loads((folder / "model.json").read_text()) if (folder / "model.json").exists() else None
        xml = folder / "model.xml"
        model = core.read_model(str(xml))
        shape = spec["input_shape"] if spec else list(model.inputs[0].get_partial_shape().get_min_shape())
        model.reshape([1, *shape[1:]])
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
        compiled[name] = core.compile_model(model, "CPU", config)
        inputs[name] = np.random.default_rng(0).standard_normal([1, *shape[1:]]).astype(np.float32)
    out: dict[str, list[float]] = {n: [] for n in deploys}
    for _ in range(rounds):
        for name, c in compiled.items():
            req = c.create_infer_request()
            req.set_input_tensor(0, ov.Tensor(inputs[name]))
            for _ in range(20):
                req.infer()
            times = []
            for _ in range(300):
                t0 = time.perf_counter_ns()
                req.infer()
                times.append((time.perf_counter_ns() - t0) / 1e6)
            out[name].append(float(np.percentile(times, 50)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(cifar_baseline.DATA))
    parser.add_argument("--limit", type=int, default=cifar_baseline.LIMIT)
    parser.add_argument("--teacher-epochs", type=int, default=8, help="the original CNN's epochs on labels")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of each distillation (and its baseline)")
    parser.add_argument("--width", type=int, default=48, help="the original CNN's first-layer width")
    parser.add_argument("--student-width", type=int, default=16, help="the distilled student's first-layer width")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the distillation term (stage default 0.9)")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--min-macs", type=int, default=5_000_000, help="separable rewrites convs costing this much")
    parser.add_argument("--cache", default=str(cifar_baseline.CACHE))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from edgebuild import testing
    from edgebuild.pipeline import build

    load0, t0 = os.getloadavg()[0], time.perf_counter()
    run_dir = ROOT / "outputs" / "benchmarks" / f"distill_architecture-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = testing.compose(overrides(args))
    summary = build(cfg, run_dir, "distill_architecture-benchmark")
    by = {s["name"]: s for s in summary["stages"]}
    m = {n: s["metrics"] for n, s in by.items()}
    deploys = {"train (standard convs)": Path(by["train"]["deployable"]),
               "student (distilled)": Path(by["student"]["deployable"]),
               "sep_kd (separable)": Path(by["sep_kd"]["deployable"])}
    lat = interleaved_latency(deploys, args.rounds, int(cfg.target.threads))
    seconds, load1 = time.perf_counter() - t0, os.getloadavg()[0]

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load avg {load0:.1f} at "
          f"start, {load1:.1f} at end; {seconds / 60:.1f} min; CIFAR-10 limit {args.limit} (held-out "
          f"{m['train'].get('eval/samples')} images); original width {args.width}, {args.teacher_epochs} epochs; "
          f"{args.epochs} epochs per distillation, alpha {args.alpha}, T {args.temperature}")
    print(f"cache hits: {', '.join(n for n, s in by.items() if s['cache_hit']) or 'none'}")
    print("\n1) separable rewrite of the VGG-style CNN, distilled from the original")
    print(f"{'model':24} {'top-1':>7} {'MACs':>11} {'params':>8} {'p50 ms (median of rounds)':>27}")
    for name, stage in (("train (standard convs)", "train"), ("separable (no training)", "separable"),
                        ("sep_kd (separable)", "sep_kd")):
        p50 = f"{statistics.median(lat[name]):.3f} ({min(lat[name]):.3f}-{max(lat[name]):.3f})" if name in lat else "-"
        print(f"{name:24} {m[stage]['acc/top1']:7.4f} {m[stage]['macs']:11,} {m[stage]['params']:8,} {p50:>27}")
    ratio = m["separable"]["separable/layer_macs_ratio"]
    drop = (m["train"]["acc/top1"] - m["sep_kd"]["acc/top1"]) * 100
    print(f"rewritten layers: {m['separable']['separable/layer_macs_before']:,} -> "
          f"{m['separable']['separable/layer_macs_after']:,} MACs (x{ratio:.1f}; target >= 5x: "
          f"{'met' if ratio >= 5 else 'NOT met'}); accuracy {drop:+.2f} pp below the original (target <= 2 pp: "
          f"{'met' if drop <= 2 else 'NOT met'})")

    print("\n2) distilled student vs the same student without a teacher (same epochs)")
    print(f"{'student':24} {'teacher':>8} {'no teacher':>11} {'distilled':>10} {'gain pp':>8}")
    for stage, label in (("student", f"CNN width {args.student_width}"),):
        d = m[stage]
        if "distill/baseline_acc" not in d:
            continue
        print(f"{label:24} {d['distill/teacher_acc']:8.4f} {d['distill/baseline_acc']:11.4f} "
              f"{d['distill/student_acc']:10.4f} {d['distill/gain_pp']:+8.2f}")

    print("\n3) cascade: small = student, big = train (latencies on the target, interleaved in the stage)")
    report = json.loads((Path(by["cascade"]["artifact"]) / "cascade.json").read_text())
    print(f"small alone {report['small_acc']:.4f} @ {report['small_latency_ms']:.3f} ms; big alone "
          f"{report['big_acc']:.4f} @ {report['big_latency_ms']:.3f} ms")
    print(f"{'threshold':>9} {'top-1':>7} {'escalated':>9} {'expected ms':>11} {'vs big':>7}")
    for c in report["curve"]:
        print(f"{c['threshold']:9.2f} {c['accuracy']:7.4f} {c['escalated']:9.1%} {c['expected_latency_ms']:11.3f} "
              f"{c['expected_latency_ms'] / report['big_latency_ms']:7.0%}")
    hits = [c for c in report["curve"] if (report["big_acc"] - c["accuracy"]) * 100 <= 0.5
            and c["expected_latency_ms"] <= 0.6 * report["big_latency_ms"]]
    print("target (within 0.5 pp of big at <= 60 % of its latency): "
          + (f"met at threshold {hits[0]['threshold']}" if hits else "NOT met on this curve"))
    print(f"\nsummary: {run_dir / 'summary.json'}; curve plot: {Path(by['cascade']['artifact']) / 'cascade.png'}")


if __name__ == "__main__":
    main()
