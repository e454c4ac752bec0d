"""Issue 19: one epoch of edgebuild's training path vs a plain PyTorch loop, measured interleaved in one process.

    python benchmarks/training.py [--limit 10000] [--rounds 3] [--epochs 1] [--precision 32-true,bf16-mixed]
    python benchmarks/training.py --variants        # plain loop: channels_last and torch.compile vs eager
    python benchmarks/training.py --presets --epochs 3 --limit 20000   # held-out top-1 per preset vs the script
    python benchmarks/training.py --precision-top1 --precision 32-true,bf16-mixed --epochs 3 --limit 20000

Same data (the first --limit images of ../shared/data/cifar10-train.tar.gz as edgebuild's imagefolder source
takes them, split 0.05/0.05 by seed), same model (MobileNetV2-0.5, stride-1 stem), batch 128, AdamW 3e-3, the
same threads. "edgebuild" is `finetune.fit` as the train stage calls it: Lightning, validation every epoch and the
best checkpoint included. The plain loop is the acceptance check's (flip + pad-crop on tensors, no validation).
Each round runs every variant once, in turn, so load changes hit all of them; medians over rounds are printed
with the load average and the CPU model. `--breakdown` also times the pieces of an edgebuild epoch.
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
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from edgebuild.openmp import limit_spinning  # noqa: E402

limit_spinning()  # before torch loads, as the CLI does (both loops run under it)
DATA = ROOT.parent / "shared" / "data" / "cifar10-train.tar.gz"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown"


def make_model():
    import torchvision

    m = torchvision.models.mobilenet_v2(width_mult=0.5, num_classes=10)
    m.features[0][0].stride = (1, 1)
    return m


def plain_epoch(x, y, bs: int, epochs: int, augment: bool, precision: str, channels_last: bool = False,
                compiled: bool = False) -> float:
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    m = make_model()
    opt = torch.optim.AdamW(m.parameters(), 3e-3, weight_decay=1e-4)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    step_model = torch.compile(m) if compiled else m
    bf16 = precision.startswith("bf16")
    t = time.perf_counter()
    m.train()
    for _ in range(epochs):
        for i in range(0, len(x) - bs + 1, bs):
            xb = x[i:i + bs]
            if augment:
                flip = torch.rand(len(xb)) < 0.5
                xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
                pad = F.pad(xb, (4, 4, 4, 4))
                dx, dy = np.random.randint(0, 9, 2)
                xb = pad[:, :, dy:dy + 32, dx:dx + 32]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(step_model(xb), y[i:i + bs])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return (time.perf_counter() - t) / epochs


def edgebuild_epoch(cfg, dm, task, epochs: int, precision: str) -> tuple[float, float, float]:
    """(seconds per epoch incl. validation + checkpoint, training-only seconds per epoch, best val acc)."""
    from omegaconf import OmegaConf

    from edgebuild.finetune import fit
    from edgebuild.stages.train import Train

    cfg = cfg.copy()
    OmegaConf.update(cfg, "trainer.precision", precision)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = SimpleNamespace(cfg=cfg, data=dm, task=task, workdir=Path(tmp), seed=0, logger=None)
        stage = Train(epochs=epochs)
        _, metrics = fit(make_model(), ctx, stage, name="train")
    ips = metrics["throughput/train_images_per_s"]
    n = len(dm.splits["train"].labels)
    return (metrics["train/seconds"] / epochs, statistics.mean(n / v for v in ips),
            metrics.get("train/best_val_acc", float("nan")))


def breakdown(dm, bs: int) -> list[tuple[str, float]]:
    """Seconds per epoch of the pieces: loading batches (new batched path vs the old per-sample one),
    forward+backward+step alone on ready batches, validation."""
    import torch
    from torch.utils.data import DataLoader

    rows = []
    for aug in (False, True):
        dm.cfg.augment = aug
        t = time.perf_counter()
        batches = list(dm.loader("train", train=True))
        rows.append((f"load batches, batched tensors, augment={aug}", time.perf_counter() - t))
        t = time.perf_counter()
        for _ in DataLoader(dm.dataset("train", train=True), batch_size=bs, shuffle=True):
            pass
        rows.append((f"load batches, per-sample (before issue 19), augment={aug}", time.perf_counter() - t))
    m = make_model()
    opt = torch.optim.AdamW(m.parameters(), 3e-3, weight_decay=1e-4)
    t = time.perf_counter()
    for xb, yb in batches:
        loss = torch.nn.functional.cross_entropy(m(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    rows.append(("forward + backward + step on ready batches", time.perf_counter() - t))
    m.eval()
    t = time.perf_counter()
    with torch.no_grad():
        for xb, _ in dm.loader("val"):
            m(xb)
    rows.append((f"validation ({len(dm.splits['val'].labels)} images)", time.perf_counter() - t))
    return rows


def variants(x, y, bs: int, rounds: int) -> None:
    """The plain loop in eager NCHW, channels_last and torch.compile, interleaved; adopted only if faster."""
    names = {"eager": {}, "channels_last": {"channels_last": True}, "torch.compile": {"compiled": True}}
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n, kw in names.items():
            times[n].append(plain_epoch(x, y, bs, 1, True, "32-true", **kw))
            print(f"round {r + 1} {n}: {times[n][-1]:.1f} s/epoch, load {os.getloadavg()[0]:.2f}", flush=True)
    base = statistics.median(times["eager"])
    print("\n| plain loop variant | s/epoch (median) | vs eager | rounds |\n|---|---|---|---|")
    for n, t in times.items():
        print(f"| {n} | {statistics.median(t):.1f} | x{statistics.median(t) / base:.2f} | {len(t)} |")


def script_top1(x, y, xt, yt, bs: int, epochs: int) -> tuple[float, float]:
    """The issue's hand-written script: SGD + Nesterov, OneCycle to 0.1, flip only, no validation; returns
    (held-out top-1, seconds)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    m = make_model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * (len(x) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    t = time.perf_counter()
    for _ in range(epochs):
        m.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x) - bs + 1, bs):
            idx = perm[i:i + bs]
            xb = x[idx]
            flip = torch.rand(len(xb)) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            loss = F.cross_entropy(m(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    seconds = time.perf_counter() - t
    return held_out_top1(m, xt, yt), seconds


def held_out_top1(m, xt, yt) -> float:
    import torch

    m.eval()
    with torch.no_grad():
        pred = torch.cat([m(xt[i:i + 500]).argmax(1) for i in range(0, len(xt), 500)])
    return float((pred == yt).float().mean())


def precision_top1(cfg, dm, task, epochs: int, precisions: list[str]) -> None:
    """Held-out (test split) top-1 and seconds of the default train stage at each trainer.precision, same
    epochs, seed and data; the precision that trained is the one the metrics say (train/precision)."""
    import torch
    from omegaconf import OmegaConf

    from edgebuild.finetune import fit
    from edgebuild.stages.train import Train

    te = dm.splits["test"]
    mean = torch.tensor(list(cfg.data.mean)).view(1, -1, 1, 1)
    std = torch.tensor(list(cfg.data.std)).view(1, -1, 1, 1)
    xt, yt = (torch.from_numpy(te.images).float() / 255 - mean) / std, torch.from_numpy(te.labels)
    rows = []
    for p in precisions:
        c = cfg.copy()
        OmegaConf.update(c, "trainer.precision", p)
        with tempfile.TemporaryDirectory() as tmp:
            ctx = SimpleNamespace(cfg=c, data=dm, task=task, workdir=Path(tmp), seed=0, logger=None)
            model, metrics = fit(make_model(), ctx, Train(epochs=epochs), name="train")
        rows.append((p, metrics.get("train/precision", p), held_out_top1(model.float(), xt, yt),
                     metrics["train/seconds"] / epochs, os.getloadavg()[0]))
        print(rows[-1], flush=True)
    print(f"\n{epochs} epochs, {len(dm.splits['train'].labels)} training images, {len(yt)} held-out test images, "
          f"{cpu_model()}\n")
    print("| trainer.precision | trained in | held-out top-1 | vs first | s/epoch (incl. val) | load |\n"
          "|---|---|---|---|---|---|")
    for p, ran, t1, sec, load in rows:
        print(f"| {p} | {ran} | {t1:.4f} | {100 * (t1 - rows[0][2]):+.1f} pp | {sec:.1f} | {load:.2f} |")


def presets(cfg, dm, task, x, y, bs: int, epochs: int) -> None:
    """Held-out (test split) top-1 in equal epochs: edgebuild's default, its sgd_onecycle preset, the script."""
    import torch
    from omegaconf import OmegaConf

    from edgebuild.finetune import fit
    from edgebuild.stages.train import Train

    te = dm.splits["test"]
    mean = torch.tensor(list(cfg.data.mean)).view(1, -1, 1, 1)
    std = torch.tensor(list(cfg.data.std)).view(1, -1, 1, 1)
    xt, yt = (torch.from_numpy(te.images).float() / 255 - mean) / std, torch.from_numpy(te.labels)
    rows = []
    for label, optimizer, augment in (("edgebuild default (AdamW 3e-3, cosine), flip + crop", None, True),
                                      ("edgebuild sgd_onecycle, flip + crop", "sgd_onecycle", True),
                                      ("edgebuild sgd_onecycle, flip only", "sgd_onecycle", "flip")):
        c = cfg.copy()
        OmegaConf.update(c, "data.augment", True)
        OmegaConf.update(c, "data.augment_pad", 0 if augment == "flip" else None)
        d = task.datamodule(c.data, Path(c.cache.dir))
        stage = Train(epochs=epochs) if optimizer is None else Train(epochs=epochs, optimizer=optimizer)
        with tempfile.TemporaryDirectory() as tmp:
            ctx = SimpleNamespace(cfg=c, data=d, task=task, workdir=Path(tmp), seed=0, logger=None)
            model, metrics = fit(make_model(), ctx, stage, name="train")
        rows.append((label, held_out_top1(model, xt, yt), metrics["train/seconds"], os.getloadavg()[0]))
        print(rows[-1], flush=True)
    top1, seconds = script_top1(x, y, xt, yt, bs, epochs)
    rows.append(("hand-written script (SGD nesterov, OneCycle 0.1, flip only, no validation)", top1, seconds,
                 os.getloadavg()[0]))
    print(f"\n{epochs} epochs, {len(y)} training images, {len(yt)} held-out test images\n")
    print("| recipe | held-out top-1 | vs script | train s | load |\n|---|---|---|---|---|")
    for label, t1, sec, load in rows:
        print(f"| {label} | {t1:.4f} | {100 * (t1 - rows[-1][1]):+.1f} pp | {sec:.0f} | {load:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--limit", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--precision", default="32-true", help="comma-separated trainer.precision values")
    ap.add_argument("--augment", default="on,off", help="on,off | on | off")
    ap.add_argument("--breakdown", action="store_true")
    ap.add_argument("--variants", action="store_true", help="channels_last / torch.compile of the plain loop")
    ap.add_argument("--presets", action="store_true", help="held-out top-1 per optimizer preset vs the script")
    ap.add_argument("--precision-top1", action="store_true", help="held-out top-1 per --precision, equal epochs")
    args = ap.parse_args()

    import torch

    from edgebuild.errors import EdgebuildError
    from edgebuild.finetune import check_precision
    from edgebuild.tasks import make_task
    from edgebuild.testing import compose

    threads = torch.get_num_threads()
    base = ["data=imagefolder", f"data.root={args.data}", f"data.limit={args.limit}", "data.image_size=32",
            "data.split.val=0.05", "data.split.test=0.05", "model=mobilenet_v2", "tracking=none",
            f"cache.dir={ROOT / 'outputs' / 'bench-cache'}"]
    precisions = []
    for p in args.precision.split(","):
        try:
            check_precision(SimpleNamespace(precision=p, accelerator="cpu"))
            precisions.append(p)
        except EdgebuildError as e:
            print(f"skipping {p}: {e}")
    results: dict[tuple, list] = {}
    augments = [a == "on" for a in args.augment.split(",")]
    dms = {}
    for aug in augments:
        cfg = compose(base + [f"data.augment={str(aug).lower()}"])
        task = make_task(cfg.task)
        dm = task.datamodule(cfg.data, Path(cfg.cache.dir))
        dms[aug] = (cfg, dm, task)
    cfg, dm, task = dms[augments[0]]
    tr = dm.splits["train"]
    mean = torch.tensor(list(cfg.data.mean)).view(1, -1, 1, 1)
    std = torch.tensor(list(cfg.data.std)).view(1, -1, 1, 1)
    x = (torch.from_numpy(tr.images).float() / 255 - mean) / std
    y = torch.from_numpy(tr.labels)
    bs = int(cfg.data.batch_size)
    print(f"{len(y)} training images, batch {bs}, {threads} threads, {cpu_model()}, "
          f"load {os.getloadavg()[0]:.2f} at start")
    if args.variants:
        return variants(x, y, bs, args.rounds)
    if args.presets:
        return presets(cfg, dm, task, x, y, bs, args.epochs)
    if args.precision_top1:
        return precision_top1(cfg, dm, task, args.epochs, precisions)
    loads = []
    for r in range(args.rounds):
        for aug in augments:
            for p in precisions:
                c, d, t = dms[aug]
                e = edgebuild_epoch(c, d, t, args.epochs, p)
                pl_s = plain_epoch(x, y, bs, args.epochs, aug, p)
                results.setdefault((aug, p), []).append((e[0], e[1], pl_s, e[2]))
                loads.append(os.getloadavg()[0])
                print(f"round {r + 1} augment={aug} {p}: edgebuild {e[0]:.1f} s/epoch (train only {e[1]:.1f}), "
                      f"plain {pl_s:.1f} s, x{e[0] / pl_s:.2f}, load {loads[-1]:.2f}", flush=True)
    print()
    print("| augment | precision | edgebuild s/epoch (incl. val + ckpt) | edgebuild train-only | plain loop s/epoch "
          "| ratio (incl.) | ratio (train-only) | best val acc | rounds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (aug, p), rows in results.items():
        e = statistics.median(v[0] for v in rows)
        et = statistics.median(v[1] for v in rows)
        pl_s = statistics.median(v[2] for v in rows)
        ratios = [v[0] / v[2] for v in rows]
        tratios = [v[1] / v[2] for v in rows]
        print(f"| {'on' if aug else 'off'} | {p} | {e:.1f} | {et:.1f} | {pl_s:.1f} | x{statistics.median(ratios):.2f} "
              f"[{min(ratios):.2f}-{max(ratios):.2f}] | x{statistics.median(tratios):.2f} "
              f"[{min(tratios):.2f}-{max(tratios):.2f}] | {statistics.median(v[3] for v in rows):.3f} | {len(rows)} |")
    print(f"\nload average during the rounds: {min(loads):.2f}-{max(loads):.2f}; CPU: {cpu_model()}; "
          f"threads {threads}")
    if args.breakdown:
        print("\n| piece of one epoch | seconds |\n|---|---|")
        for name, s in breakdown(dm, bs):
            print(f"| {name} | {s:.2f} |")


if __name__ == "__main__":
    main()
