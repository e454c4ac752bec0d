"""Issue 20's techniques on the embedded digits (8x8, 1,797 images) or other data (--data): learned gates vs pruning
criteria at equal MACs, Haar decomposition vs downsampling, one shared backbone vs two separate models.

    nice -n 10 python benchmarks/techniques.py [--train-epochs 30] [--epochs 15] [--rounds 7] [--seed 0]
    nice -n 10 python benchmarks/techniques.py --parts input --image-size 32 \
        --data "data=imagefolder data.root=/work/shared/data/cifar10-train.tar.gz data.limit=6000 data.image_size=32"

Builds (edgebuild.pipeline.build, one stage cache, so the trained CNN is built once):
1. gates: train -> `gate` static (gate epochs + finetune epochs = --epochs in all) and dynamic; then, at the MAC
   fraction the static gates reached, `prune` (structured) with `importance: activation` and with `l1`, --epochs
   of fine-tuning each; INT8 PTQ of the three pruned models.
2. input: `decompose` (Haar, 4 bands per channel at half size) vs `resolution` to half size, --epochs of fine-tuning
   each.
3. shared backbone (always on the digits): task=multihead model=multihead_cnn, heads digit (10) + size (small 0-4 /
   large 5-9), loss weights 1 / 0.5; against two separate models of the same network, each trained for one task only
   (loss weights 1 / 0 and 0 / 1: the untrained head is one Linear of 24x10 or 24x2, <0.1 % of the MACs).
Latency: every deployable compiled on the OpenVINO CPU runtime (the default target, batch 1) and timed in
--rounds alternating rounds in this one process (evaluate.interleaved), so all see the same machine load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZE_MAP = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]


def gate_stages(args: argparse.Namespace, macs_fraction: float | None) -> list[str]:
    gate_epochs = args.epochs * 2 // 3
    ft = args.epochs - gate_epochs
    out = [f"+stages.gate_static={{kind: gate, input: train, mode: static, threshold: 0.05, sparsity: {args.sparsity}, "
           f"epochs: {gate_epochs}, finetune_epochs: {ft}}}"]
    if macs_fraction is None:
        return out
    out += [f"+stages.gate_dynamic={{kind: gate, input: train, mode: dynamic, threshold: 0.05, "
            f"sparsity: {args.sparsity}, epochs: {gate_epochs}}}"]
    for imp in ("activation", "l1"):
        out.append(f"+stages.prune_{imp}={{kind: prune, input: train, macs_target: {macs_fraction:.4f}, "
                   f"importance: {imp}, epochs: {args.epochs}}}")
    for name in ("gate_static", "prune_activation", "prune_l1"):
        out.append(f"+stages.{name}_int8={{kind: quantize, input: {name}}}")
    return out


def base(args: argparse.Namespace, cache: Path, data: bool = True) -> list[str]:
    return [f"cache.dir={cache}", "tracking=none", f"seed={args.seed}", f"stages.train.epochs={args.train_epochs}",
            "budget.min_acc=null", "budget.max_acc_drop=null", "~stages.export", *(args.data.split() if data else [])]


def interleaved_ms(stages: dict[str, dict], cfg, rounds: int) -> dict[str, list[float]]:
    """[median, min, max] over rounds of each deployable's p50, all compiled here and timed in alternating rounds."""
    from edgebuild.artifact import Artifact
    from edgebuild.evaluate import interleaved
    from edgebuild.targets import make_target

    target = make_target(cfg.target)
    names = list(stages)
    shapes = [list(stages[n]["input_shape"]) for n in names]
    arts = [Artifact(target.format, Path(stages[n]["deployable"]), ["model.xml", "model.bin"], meta={"input_shape": s})
            for n, s in zip(names, shapes, strict=True)]  # the default target's OpenVINO IR, main file first
    sessions = [target.runtime.load(a, target.device, 1) for a in arts]
    medians = interleaved(sessions, shapes, cfg.eval.latency, rounds)
    return {n: [statistics.median(m), min(m), max(m)] for n, m in zip(names, medians, strict=True)}


def input_shape(st: dict) -> list[int]:
    """The shape a stage's deployable takes, from its cache entry (the Haar split is inside the model)."""
    import json

    entry = json.loads((Path(st["artifact"]).parent / "result.json").read_text())
    return list(entry["artifact"]["meta"]["input_shape"])


def stage_rows(summary: dict, prefix: str = "") -> dict[str, dict]:
    return {prefix + st["name"]: {**st, "input_shape": input_shape(st)} for st in summary["stages"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-epochs", type=int, default=30)
    p.add_argument("--epochs", type=int, default=15, help="training after the trained CNN, per variant")
    p.add_argument("--sparsity", type=float, default=5.0, help="weight of the gates' sparsity (Hoyer) term")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", default="gates,input,shared")
    p.add_argument("--data", default="", help="data overrides for gates and input (shared: digits always), e.g. "
                   "'data=imagefolder data.root=/work/shared/data/cifar10-train.tar.gz data.limit=6000 "
                   "data.image_size=32'")
    p.add_argument("--image-size", type=int, default=8, help="the data's image size: `resolution` goes to half")
    p.add_argument("--res-sizes", default="", help="image sizes for `resolution` (default: half --image-size); "
                   "the Haar stem reads 4x the channels, so a size a little above half matches its MACs")
    p.add_argument("--cache", default=None, help="a stage cache kept between runs (default: a temporary one)")
    args = p.parse_args()
    parts = args.parts.split(",")
    sizes = [int(n) for n in args.res_sizes.split(",")] if args.res_sizes else [args.image_size // 2]

    from edgebuild import testing
    from edgebuild.pipeline import build

    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    load0, t0 = os.getloadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = Path(args.cache).resolve() if args.cache else tmp / "cache"
        rows: dict[str, dict] = {}
        cfg = None
        if "gates" in parts:
            first = build(testing.compose(base(args, cache) + gate_stages(args, None)), tmp / "g1", "techniques")
            frac = next(s for s in first["stages"] if s["name"] == "gate_static")["metrics"]["gate/macs_fraction"]
            if frac >= 0.999:
                sys.exit(f"the static gates removed no kernel (MAC fraction {frac:.3f}): raise --sparsity or --epochs")
            cfg = testing.compose(base(args, cache) + gate_stages(args, frac))
            rows.update(stage_rows(build(cfg, tmp / "g2", "techniques")))
        if "input" in parts:
            cfg = testing.compose(base(args, cache) + [
                f"+stages.haar={{kind: decompose, input: train, epochs: {args.epochs}}}",
                *(f"+stages.res{n}={{kind: resolution, input: train, image_size: {n}, epochs: {args.epochs}}}"
                  for n in sizes)])
            for k, v in stage_rows(build(cfg, tmp / "in", "techniques")).items():
                rows.setdefault(k, v)  # train: the same cached model as the gates' build
        if "shared" in parts:
            for name, weights in (("shared", "[1.0,0.5]"), ("digit_only", "[1.0,0.0]"), ("size_only", "[0.0,1.0]")):
                cfg = testing.compose(base(args, cache, data=False) + [
                    "task=multihead", "model=multihead_cnn", "task.first_name=digit",
                    f"task.heads=[{{name: size, classes: [small, large], map: {SIZE_MAP}}}]".replace(" ", ""),
                    f"task.loss_weights={weights}"])
                s = build(cfg, tmp / name, "techniques")
                rows[name] = {**s["stages"][-1], "input_shape": input_shape(s["stages"][-1])}
        spread = interleaved_ms(rows, cfg, args.rounds)
    latency = {n: v[0] for n, v in spread.items()}
    seconds = time.perf_counter() - t0
    load1 = os.getloadavg()

    print(f"{cpu}; {os.cpu_count()} cores; load avg (1/5/15 min) "
          f"{load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f} at start, "
          f"{load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f} at end; {seconds:.0f} s; seed {args.seed}; "
          f"{args.data or 'digits'} test split (shared: digits), "
          f"OpenVINO CPU batch 1, median of {args.rounds} interleaved rounds")
    train = rows.get("train", {}).get("metrics", {})
    print(f"{'stage':22} {'top-1':>7} {'drop pp':>7} {'MACs':>9} {'MACs x':>6} {'eff. MACs':>9} {'p50 ms':>7} "
          f"{'[min-max]':>13} {'speed-up':>8} {'precision':>9}")
    for name, st in rows.items():
        m = st["metrics"]
        eff = m.get("macs/effective_mean")
        acc = m.get("acc/top1")
        drop = (train["acc/top1"] - acc) * 100 if train and acc is not None else float("nan")
        ratio = m["macs"] / train["macs"] if train else float("nan")
        speed = latency["train"] / latency[name] if "train" in latency else float("nan")
        print(f"{name:22} {acc:7.4f} {drop:7.2f} {m['macs']:9,} {ratio:6.3f} {f'{eff:,.0f}' if eff else '':>9} "
              f"{latency[name]:7.3f} {f'[{spread[name][1]:.3f}-{spread[name][2]:.3f}]':>13} {speed:8.2f} "
              f"{m.get('runtime/precision', ''):>9}")
    if "shared" in rows:
        sh, d, z = (rows[n]["metrics"] for n in ("shared", "digit_only", "size_only"))
        print(f"shared vs the two separate models: MACs {sh['macs'] / (d['macs'] + z['macs']):.3f}x, latency "
              f"{latency['shared'] / (latency['digit_only'] + latency['size_only']):.3f}x (target <= 0.65x); "
              f"digit top-1 {sh['acc/digit/top1']:.4f} vs {d['acc/digit/top1']:.4f} "
              f"({(sh['acc/digit/top1'] - d['acc/digit/top1']) * 100:+.2f} pp), size top-1 {sh['acc/size/top1']:.4f} "
              f"vs {z['acc/size/top1']:.4f} ({(sh['acc/size/top1'] - z['acc/size/top1']) * 100:+.2f} pp)")


if __name__ == "__main__":
    main()
