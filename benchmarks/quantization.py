"""Quantization on real data: FP32 vs PTQ vs accuracy-controlled PTQ vs QAT vs FP16 vs `nncf.quantize` called
directly with its defaults (the anchor a user would otherwise reach for), on the OpenVINO CPU runtime.

    python benchmarks/quantization.py [--limit 50000] [--epochs 8] [--qat-epochs 1] [--rounds 5]

Builds with edgebuild itself (`python -m edgebuild`: the shared CIFAR-10 baseline of
benchmarks/cifar_baseline.py, so training is a cache hit in outputs/bench-cache once built), adding
quantize / quantize(max_drop) / qat / fp16 stages on the trained model.
Top-1 on the held-out test split (20 % of the images) comes from each stage's measured deployable.
Latency: batch 1, 2 threads, every IR compiled the same way (f32 hint for float layers) and measured in
interleaved rounds in one process, at the model's own 32x32 and reshaped to 224x224 (latency only);
the table shows the median of the round medians and their spread, with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import cifar_baseline
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "cifar10-train.tar.gz"


def edgebuild(overrides: list[str], run_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "edgebuild", *overrides, f"hydra.run.dir={run_dir}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if result.returncode not in (0, 1):
        sys.exit(f"edgebuild failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def direct_nncf(summary: dict, cfg, folder: Path) -> tuple[Path, dict]:
    """The anchor: the trained model converted with ov.convert_model and quantized by nncf.quantize with
    its defaults (300 samples, performance preset) on the same training images; top-1 by edgebuild's
    own evaluator on the same test split."""
    import nncf
    import openvino as ov
    import torch

    from edgebuild.artifact import Artifact
    from edgebuild.evaluate import quality
    from edgebuild.targets import make_target
    from edgebuild.tasks import make_task

    train = next(s for s in summary["stages"] if s["name"] == "train")
    entry = Path(train["artifact"]).parent
    model = Artifact.from_json(json.loads((entry / "result.json").read_text())["artifact"], entry).load_torch()
    task = make_task(cfg.task)
    dm = task.datamodule(cfg.data, Path(cfg.cache.dir))
    shape = dm.input_shape
    ov_model = ov.convert_model(model, example_input=torch.zeros(shape))
    # shuffled, as a user's loader would be: the split keeps the folder's class order, and NNCF's first
    # 300 samples in that order would all be one class
    images = torch.utils.data.DataLoader(dm.dataset("train"), batch_size=1, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    quantized = nncf.quantize(ov_model, nncf.Dataset(images, lambda item: item[0].numpy()))
    folder.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(folder / "model.xml"), compress_to_fp16=False)
    art = Artifact("openvino", folder, ["model.xml", "model.bin"], {**dm.meta()})
    target = make_target(cfg.target)
    session = target.runtime.compile(art, "CPU", cfg.eval.batch_size)
    metrics, _ = quality(session, cfg.eval.batch_size, dm, task, cfg.eval)
    metrics.update(target.runtime.compile(art, "CPU", 1).runtime_info())
    metrics["size/bytes"] = art.size_bytes
    return folder / "model.xml", metrics


def interleaved_latency(models: dict[str, Path], size: int, rounds: int, iterations: int,
                        precision: str = "f32") -> dict[str, list[float]]:
    """p50 per round for each model, the models taking turns inside every round."""
    import openvino as ov

    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 2}
    if precision != "auto":
        config["INFERENCE_PRECISION_HINT"] = precision
    requests = {}
    for name, xml in models.items():
        m = core.read_model(str(xml))
        m.reshape([1, 3, size, size])
        requests[name] = core.compile_model(m, "CPU", config).create_infer_request()
    x = np.random.default_rng(0).standard_normal([1, 3, size, size]).astype(np.float32)
    out: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(rounds):
        for name, req in requests.items():
            req.set_input_tensor(0, ov.Tensor(x))
            for _ in range(10):
                req.infer()
            times = []
            for _ in range(iterations):
                t0 = time.perf_counter_ns()
                req.infer()
                times.append((time.perf_counter_ns() - t0) / 1e6)
            out[name].append(float(np.median(times)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--limit", type=int, default=cifar_baseline.LIMIT, help="images used")
    p.add_argument("--epochs", type=int, default=cifar_baseline.EPOCHS, help="FP32 training epochs")
    p.add_argument("--qat-epochs", type=int, default=1, help="0 skips QAT")
    p.add_argument("--max-drop", type=float, default=0.005, help="accuracy control: max top-1 drop (fraction)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--cache-dir", default=str(ROOT / "outputs" / "bench-cache"))
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "quantization"))
    args = p.parse_args()
    out = Path(args.out)
    load_start = os.getloadavg()[0]
    base = cifar_baseline.overrides(args.data, args.limit, args.epochs, args.cache_dir)
    stages = ["stages.export=null", "budget.min_acc=null", "+stages.ptq={kind: quantize}",
              f"+stages.ptq_ac={{kind: quantize, input: train, max_drop: {args.max_drop}}}",
              "+stages.fp16={kind: fp16, input: train}"]
    qat = [f"+stages.qat={{kind: qat, input: train, epochs: {args.qat_epochs}}}"] if args.qat_epochs else []
    t0 = time.perf_counter()
    summary = edgebuild([*base, *stages], out / "build")
    print("PTQ build done:", {s["name"]: round(s["metrics"]["acc/top1"], 4) for s in summary["stages"]}, flush=True)
    from edgebuild.testing import compose

    t1 = time.perf_counter()
    direct_xml, direct = direct_nncf(summary, compose(base), out / "direct_nncf")
    direct_s = time.perf_counter() - t1
    print("direct NNCF done:", round(direct["acc/top1"], 4), flush=True)
    if qat:  # a second build (train and PTQ stages are cache hits) so the PTQ numbers exist even if QAT is cut short
        summary = edgebuild([*base, *stages, *qat], out / "build_qat")
    build_s = time.perf_counter() - t0 - direct_s

    rows = {s["name"]: {**s["metrics"], "xml": Path(s["deployable"]) / "model.xml", "cache_hit": s["cache_hit"]}
            for s in summary["stages"]}
    rows["nncf_direct"] = {**direct, "xml": direct_xml, "stage/build_seconds": direct_s}
    names = {"train": "FP32 IR", "ptq": "PTQ (quantize)", "ptq_ac": f"PTQ + accuracy control {args.max_drop:g}",
             "qat": f"QAT ({args.qat_epochs} ep)", "fp16": "FP16 weights", "nncf_direct": "nncf.quantize defaults"}
    models = {n: r["xml"] for n, r in rows.items()}
    lat32 = interleaved_latency(models, 32, args.rounds, args.iterations)
    lat224 = interleaved_latency(models, 224, args.rounds, max(20, args.iterations // 4))
    bf16 = interleaved_latency({"train": models["train"]}, 224, args.rounds, max(20, args.iterations // 4), "auto")
    fp32 = rows["train"]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; load avg {load_start:.1f} "
          f"at start, {os.getloadavg()[0]:.1f} at end; build {build_s:.0f} s (train cache hit: "
          f"{rows['train']['cache_hit']}), direct NNCF {direct_s:.0f} s")
    print(f"data: {args.limit} CIFAR-10 images, test split {fp32.get('eval/samples')} images; latency: batch 1, "
          f"2 threads, median of {args.rounds} interleaved rounds [min-max]")
    head = (f"| {'model':30} | top-1 % | drop pp | size MB | x smaller | p50 32x32 ms | p50 224x224 ms "
            "| x faster 224 | int8 ops |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    result = {}
    for n, r in rows.items():
        p32, p224 = float(np.median(lat32[n])), float(np.median(lat224[n]))
        drop = (fp32["acc/top1"] - r["acc/top1"]) * 100
        result[n] = {"top1": r["acc/top1"], "drop_pp": drop, "size_bytes": r["size/bytes"], "p50_32": p32,
                     "p50_224": p224, "spread_32": [min(lat32[n]), max(lat32[n])],
                     "spread_224": [min(lat224[n]), max(lat224[n])], "int8_fraction": r.get("int8/ops_fraction")}
        print(f"| {names[n]:30} | {r['acc/top1'] * 100:7.2f} | {drop:7.2f} | {r['size/bytes'] / 1e6:7.2f} | "
              f"{fp32['size/bytes'] / r['size/bytes']:9.2f} | {p32:5.3f} [{min(lat32[n]):.2f}-{max(lat32[n]):.2f}] | "
              f"{p224:6.2f} [{min(lat224[n]):.1f}-{max(lat224[n]):.1f}] | "
              f"{float(np.median(lat224['train'])) / p224:12.2f} | {r.get('int8/ops_fraction', 0):8.2f} |")
    b = float(np.median(bf16["train"]))
    print(f"FP32 IR at the runtime's default precision (bf16 on this CPU), 224x224: {b:.2f} ms")
    ptq, ac, direct = result["ptq"], result["ptq_ac"], result["nncf_direct"]
    qat = result.get("qat", {"drop_pp": float("nan")})
    checks = [
        ("PTQ drop <= 0.5 pp", ptq["drop_pp"] <= 0.5, f"{ptq['drop_pp']:.2f} pp"),
        ("PTQ size >= 3.5x smaller", fp32["size/bytes"] / ptq["size_bytes"] >= 3.5,
         f"x{fp32['size/bytes'] / ptq['size_bytes']:.2f}"),
        ("INT8 >= 2x faster than FP32 (f32) at 224", result["train"]["p50_224"] / ptq["p50_224"] >= 2,
         f"x{result['train']['p50_224'] / ptq['p50_224']:.2f}"),
        ("PTQ accuracy >= direct NNCF", ptq["top1"] >= direct["top1"], f"{ptq['top1']:.4f} vs {direct['top1']:.4f}"),
        ("PTQ latency <= direct NNCF (224, +5 % noise)", ptq["p50_224"] <= direct["p50_224"] * 1.05,
         f"{ptq['p50_224']:.2f} vs {direct['p50_224']:.2f} ms"),
        ("QAT recovers >= half of PTQ's drop", ptq["drop_pp"] <= 0 or qat["drop_pp"] <= ptq["drop_pp"] / 2,
         f"PTQ {ptq['drop_pp']:.2f} pp -> QAT {qat['drop_pp']:.2f} pp"),
        ("accuracy control holds max_drop", ac["drop_pp"] <= args.max_drop * 100 + 0.5,
         f"{ac['drop_pp']:.2f} pp on test (max_drop is on val)"),
    ]
    for name, ok, value in checks:
        print(f"{'MET ' if ok else 'MISSED'} {name}: {value}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps({"rows": result, "bf16_224": b, "load_start": load_start,
                                                 "load_end": os.getloadavg()[0]}, indent=2))


if __name__ == "__main__":
    main()
