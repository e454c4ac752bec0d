"""Quantization diagnostics (issue 16) on a model where plain INT8 PTQ hurts: the sensitivity report, its
rank agreement with the metric cost, `float_layers: auto` vs NNCF's accuracy control, and calibration methods.

    python benchmarks/quantization_diagnostics.py [--model mobilenet_v3_small] [--bn-momentum 0.1] [--per-tensor]
        [--epochs 6] [--data data=imagefolder data.root=../shared/data/cifar10-train.tar.gz data.limit=20000 ...]

Three edgebuild builds (`python -m edgebuild`, one stage cache, so training runs once):
  A  target=cpu (OpenVINO): train -> plain INT8 (`quantize`), the full sensitivity report (`sens`, every layer
     metric-checked), `float_layers: auto` with max_drop (`auto`, default sensitivity_top), NNCF accuracy control
     with the same max_drop (`nncf_ac`), NNCF's range estimators (`cal_*`);
  B  the same stages (cache hits) + the rank-1 (lowest SQNR) layer alone in float (`top_float`) and the
     median-ranked one (`median_float`), named from A's sensitivity.json; its end-of-build pass times every
     stage's deployable interleaved in one process (`latency/interleaved_ms`): the speed-ups come from there;
  C  target=onnxruntime: ONNX Runtime's minmax / entropy / percentile calibration.
Top-1 is each stage's deployable on the held-out test split; the sensitivity metric checks and the float_layers
choice use the validation split. "Speed-up kept" = (t_float - t_mixed) / (t_float - t_int8), at the model's own
input size and, because a 32x32 MobileNet is dispatch-bound (INT8 gains little there), with the same IRs reshaped
to --latency-size (latency only), interleaved in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantization import interleaved_latency  # noqa: E402
NNCF_METHODS = ("minmax", "mean_minmax", "percentile")
ORT_METHODS = ("minmax", "entropy", "percentile")


def edgebuild(overrides: list[str], run_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "edgebuild", *overrides, f"hydra.run.dir={run_dir}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if result.returncode not in (0, 1):
        sys.exit(f"edgebuild failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def stage_node(name: str, options: str) -> str:
    return f"+stages.{name}={{kind: quantize, input: train, {options}}}"


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho (average ranks for ties, as scipy.stats.spearmanr)."""
    def ranks(v: list[float]) -> np.ndarray:
        v = np.asarray(v, float)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for value in np.unique(v):  # ties share their mean rank
            r[v == value] = r[v == value].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenet_v3_small", help="torchvision model name")
    p.add_argument("--width", type=float, default=None, help="model.kwargs.width_mult (mobilenet_v2)")
    p.add_argument("--bn-momentum", type=float, default=None, help="model.bn_momentum (MobileNetV3: 0.1)")
    p.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor (the hard case)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--samples", type=int, default=300, help="calibration images")
    p.add_argument("--cal-samples", type=int, default=None,
                   help="calibration.samples on every stage: the first N of the --samples subset (a fixed subset)")
    p.add_argument("--sens-top", type=int, default=1000, help="layers metric-checked in the report (default: all)")
    p.add_argument("--max-drop", type=float, default=0.003, help="float_layers=auto and accuracy control")
    p.add_argument("--data", nargs="*", default=[], help="extra data overrides, e.g. data=imagefolder data.root=...")
    p.add_argument("--rounds", type=int, default=5, help="end-of-build interleaved latency rounds")
    p.add_argument("--latency-size", type=int, default=224, help="IRs reshaped to this for a second latency table")
    p.add_argument("--probe", action="store_true",
                   help="only train and plain INT8 variants (per-tensor, no bias correction, 16/8/4/2 calibration images, "
                        "mixed preset): is it hurt?")
    p.add_argument("--cache-dir", default=str(ROOT / "outputs" / "bench-cache-qdiag"))
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "quantization_diagnostics"))
    args = p.parse_args()
    out = Path(args.out)
    load_start = os.getloadavg()[0]
    model = [f"model.name={args.model}"] + ([f"model.kwargs.width_mult={args.width}"] if args.width else []) \
        + ([f"model.bn_momentum={args.bn_momentum}"] if args.bn_momentum else [])
    base = ["recipe=mobilenet_int8_vpu", "target=cpu", *model, *args.data, f"stages.train.epochs={args.epochs}",
            f"cache.dir={args.cache_dir}", "tracking=none", "budget.min_acc=null", "budget.max_acc_drop=null",
            "budget.max_size_bytes=null", f"data.calibration.size={args.samples}", "eval.latency.rounds=0"]
    pc = f"per_channel: {str(not args.per_tensor).lower()}"

    def cal(method: str | None = None) -> str:  # one calibration mapping per stage: method and/or samples
        items = [f"method: {method}"] * bool(method) + [f"samples: {args.cal_samples}"] * bool(args.cal_samples)
        return f", calibration: {{{', '.join(items)}}}" if items else ""

    if args.probe:
        variants = {"per_tensor": "per_channel: false", "no_bias_correction": "bias_correction: none",
                    "per_tensor_no_bias_correction": "per_channel: false, bias_correction: none",
                    **{f"cal{n}": f"calibration: {{samples: {n}}}" for n in (16, 8, 4, 2)},
                    "per_tensor_cal16": "per_channel: false, calibration: {samples: 16}",
                    "per_tensor_cal4": "per_channel: false, calibration: {samples: 4}",
                    "mixed_cal8": "preset: mixed, calibration: {samples: 8}"}
        probe = edgebuild([*base, "stages.quantize.per_channel=true", *[stage_node(n, o) for n, o in variants.items()]],
                          out / "probe")
        f32 = probe["stages"][0]["metrics"]["acc/top1"]
        for s in probe["stages"]:
            print(f"{s['name']:18} top-1 {s['metrics']['acc/top1'] * 100:6.2f} %  drop "
                  f"{(f32 - s['metrics']['acc/top1']) * 100:+.2f} pp  ({s['seconds']:.0f} s)")
        return
    a_stages = [f"stages.quantize.per_channel={str(not args.per_tensor).lower()}",
                *([f"++stages.quantize.calibration.samples={args.cal_samples}"] if args.cal_samples else []),
                stage_node("sens", f"{pc}{cal()}, sensitivity: true, sensitivity_top: {args.sens_top}"),
                stage_node("auto", f"{pc}{cal()}, float_layers: auto, max_drop: {args.max_drop}"),
                stage_node("nncf_ac", f"{pc}{cal()}, max_drop: {args.max_drop}"),
                *[stage_node(f"cal_{m}", f"{pc}{cal(m)}") for m in NNCF_METHODS]]
    t0 = time.perf_counter()
    a = edgebuild([*base, *a_stages], out / "a")
    print(f"build A {time.perf_counter() - t0:.0f} s", flush=True)
    rows_a = {s["name"]: s for s in a["stages"]}
    sens = json.loads((Path(rows_a["sens"]["artifact"]) / "sensitivity.json").read_text())
    top, median = sens[0], sens[len(sens) // 2]  # by SQNR over all layers
    b_stages = [*a_stages, stage_node("top_float", f"{pc}{cal()}, ignored_names: ['{top['layer']}']"),
                stage_node("median_float", f"{pc}{cal()}, ignored_names: ['{median['layer']}']")]
    b = edgebuild([*[o for o in base if not o.startswith("eval.latency.rounds")], f"eval.latency.rounds={args.rounds}",
                   *b_stages], out / "b")
    ort_stages = [stage_node(f"ort_{m}", f"{pc}{cal(m)}") for m in ORT_METHODS]
    c = edgebuild([*[o for o in base if o != "target=cpu"], "target=onnxruntime", "stages.quantize=null",
                   *ort_stages], out / "c")
    timed = ("train", "quantize", "auto", "nncf_ac", "top_float", "median_float")
    xmls = {s["name"]: Path(s["deployable"]) / "model.xml" for s in b["stages"] if s["name"] in timed}
    big = interleaved_latency(xmls, args.latency_size, args.rounds, 50)
    load_end = os.getloadavg()[0]

    rows = {s["name"]: s for s in b["stages"]}
    f32 = rows["train"]["metrics"]["acc/top1"]
    lat = {n: s["metrics"].get("latency/interleaved_ms") for n, s in rows.items()}
    spread = b.get("interleaved", {}).get("round_medians_ms", {})

    def top1(s: dict) -> float:
        return s["metrics"]["acc/top1"] * 100

    def kept(name: str) -> float:
        return (lat["train"] - lat[name]) / (lat["train"] - lat["quantize"])

    def find_seconds(name: str) -> float:  # the sensitivity search (float_layers=auto) + the quantize call
        m = rows[name]["metrics"]  # (accuracy control's search runs inside it); cached with the stage
        return m.get("quantize/sensitivity_seconds", 0.0) + m["quantize/calibrate_seconds"]

    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    n_test = rows["train"]["metrics"].get("eval/samples")
    print(f"\n{cpu}; load avg {load_start:.1f} at start, {load_end:.1f} at end; total {time.perf_counter() - t0:.0f} s")
    print(f"model {args.model}{'' if not args.width else f' x{args.width}'}, "
          f"{'per-tensor' if args.per_tensor else 'per-channel'} weights, {args.epochs} epochs, {args.samples} "
          f"calibration images; held-out test {n_test} images; latency batch 1, median of {args.rounds} "
          f"interleaved rounds [min-max of round medians]")
    print("\n| model | top-1 % | drop pp | layers in float | p50 ms (interleaved) | x vs float | speed-up kept | "
          "time to find s |")
    print("|---|---|---|---|---|---|---|---|")
    names = {"train": "float (f32)", "quantize": "plain INT8", "auto": f"float_layers=auto, max_drop {args.max_drop}",
             "nncf_ac": f"NNCF accuracy control, max_drop {args.max_drop}",
             "top_float": f"rank 1 in float: `{top['layer']}`",
             "median_float": f"rank {median['rank']} (median) in float: `{median['layer']}`"}
    result: dict = {"rows": {}}
    for n, label in names.items():
        m = rows[n]["metrics"]
        r = spread.get(n, [float("nan")])
        fp = m.get("quantize/fp_layers", "-") if n != "train" else "all"
        k = "-" if n in ("train", "quantize") else f"{kept(n) * 100:.0f} %"
        find = f"{find_seconds(n):.1f}" if n in ("auto", "nncf_ac") else "-"
        print(f"| {label} | {top1(rows[n]):.2f} | {f32 * 100 - top1(rows[n]):+.2f} | {fp} | {lat[n]:.3f} "
              f"[{min(r):.3f}-{max(r):.3f}] | {lat['train'] / lat[n]:.2f} | {k} | {find} |")
        result["rows"][n] = {"top1": m["acc/top1"], "latency_ms": lat[n], "rounds_ms": r,
                             "fp_layers": m.get("quantize/fp_layers"), "seconds": rows_a.get(n, rows[n])["seconds"],
                             "find_seconds": find_seconds(n) if n in ("auto", "nncf_ac") else None}
    bl = {n: float(np.median(v)) for n, v in big.items()}
    print(f"\nthe same IRs reshaped to {args.latency_size}x{args.latency_size} (latency only), OpenVINO CPU f32 hint, "
          f"2 threads, median of {args.rounds} interleaved rounds of 50 [min-max]:")
    print("| model | p50 ms | x vs float | speed-up kept |\n|---|---|---|---|")
    for n in timed:
        k = "-" if n in ("train", "quantize") else f"{(bl['train'] - bl[n]) / (bl['train'] - bl['quantize']) * 100:.0f} %"
        print(f"| {names[n]} | {bl[n]:.3f} [{min(big[n]):.3f}-{max(big[n]):.3f}] | {bl['train'] / bl[n]:.2f} | {k} |")
    result["latency_big"] = {"size": args.latency_size, "rounds_ms": big}
    kept_big = (bl["train"] - bl["auto"]) / (bl["train"] - bl["quantize"])
    am = rows["auto"]["metrics"]
    print(f"\nfloat_layers=auto: {am.get('quantize/float_layers_auto')} layer(s) chosen; val float "
          f"{am.get('quantize/val_float'):.4f}, INT8 {am.get('quantize/val_int8'):.4f}, mixed "
          f"{am.get('quantize/val_mixed'):.4f}; {am.get('quantize/sensitivity_quantizations')} quantizations, "
          f"{am.get('quantize/sensitivity_evaluations')} evaluations; profiled cost of the kept layers "
          f"{am.get('quantize/float_layers_cost_ms', float('nan')):.4f} ms "
          f"({am.get('quantize/float_layers_cost_source')})")

    def pp(v: float | None) -> str:
        return "-" if v is None else f"{v * 100:+.2f}"

    # a layer's metric cost = what keeping it alone in float recovers over full INT8 (`recovered`)
    checked = [r for r in sens if r["recovered"] is not None and r["sqnr_db"] is not None]
    rho = spearman([-r["sqnr_db"] for r in checked], [r["recovered"] for r in checked])
    sm = rows_a["sens"]["metrics"]
    print(f"\nsensitivity report: {len(sens)} layers, {len(checked)} metric-checked, "
          f"{sm['quantize/sensitivity_seconds']:.0f} s, {sm['quantize/sensitivity_quantizations']} quantizations")
    print(f"Spearman rho(-SQNR, val top-1 recovered with the layer alone in float), {len(checked)} layers: "
          f"{rho:+.3f}")
    print(f"val: rank 1 `{top['layer']}` SQNR {top['sqnr_db']:.1f} dB, recovers {pp(top['recovered'])} pp; "
          f"rank {median['rank']} `{median['layer']}` SQNR {median['sqnr_db']:.1f} dB, recovers "
          f"{pp(median['recovered'])} pp")
    print("\n| worst 8 by SQNR | type | SQNR dB | MSE | val top-1 recovered pp, layer in float | latency cost ms |")
    print("|---|---|---|---|---|---|")
    for r in sens[:8]:
        cost = "-" if r.get("latency_cost_ms") is None else f"{r['latency_cost_ms']:+.4f}"
        print(f"| `{r['layer']}` | {r['type']} | {r['sqnr_db']:.1f} | {r['mse']:.3g} | {pp(r['recovered'])} | "
              f"{cost} |")

    print("\n| runtime | calibration.method | top-1 % | drop pp | calibrate + quantize s |")
    print("|---|---|---|---|---|")
    cal = {f"OpenVINO/NNCF|{m}": rows_a[f"cal_{m}"] for m in NNCF_METHODS}
    crow = {s["name"]: s for s in c["stages"]}
    ort_f32 = crow["train"]["metrics"]["acc/top1"]
    cal.update({f"ONNX Runtime|{m}": crow[f"ort_{m}"] for m in ORT_METHODS})
    for key, s in cal.items():
        runtime, method = key.split("|")
        ref = (f32 if runtime.startswith("OpenVINO") else ort_f32) * 100
        seconds = s["metrics"]["quantize/calibrate_seconds"]
        print(f"| {runtime} | {method} | {top1(s):.2f} | {ref - top1(s):+.2f} "
              f"| {seconds:.1f} |")
        result.setdefault("calibration", {})[key] = {"top1": s["metrics"]["acc/top1"], "seconds": seconds}
    print(f"(ONNX Runtime float top-1 {ort_f32 * 100:.2f} %)")

    drop = f32 * 100 - top1(rows["quantize"])
    auto_drop = f32 * 100 - top1(rows["auto"])
    checks = [("plain INT8 loses >= 1 pp", drop >= 1.0, f"{drop:.2f} pp"),
              ("float_layers=auto drop <= 0.3 pp", auto_drop <= 0.3, f"{auto_drop:.2f} pp"),
              ("float_layers=auto keeps >= 80 % of INT8's speed-up (own size)", kept("auto") >= 0.8,
               f"{kept('auto') * 100:.0f} %"),
              (f"float_layers=auto keeps >= 80 % of INT8's speed-up ({args.latency_size}x{args.latency_size})",
               kept_big >= 0.8, f"{kept_big * 100:.0f} %"),
              ("rank 1 in float recovers more than the median (test)",
               top1(rows["top_float"]) > top1(rows["median_float"]),
               f"{top1(rows['top_float']):.2f} vs {top1(rows['median_float']):.2f} %"),
              ("SQNR agrees in rank with the metric cost (rho > 0)", rho > 0, f"rho {rho:+.3f}")]
    for name, ok, value in checks:
        print(f"{'MET   ' if ok else 'MISSED'} {name}: {value}")
    out.mkdir(parents=True, exist_ok=True)
    result.update({"spearman": rho, "load_start": load_start, "load_end": load_end, "cpu": cpu, "args": vars(args),
                   "sensitivity": sens})
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
