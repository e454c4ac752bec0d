"""Quantization sensitivity for the quantize stage (`sensitivity: true`, `float_layers: auto`).

Per quantizable layer of the model (named the way `ignored_names` takes it, so a row can be copied into
the recipe):
- the error INT8 introduces at the layer's output, float model vs the fully INT8 model, over the
  calibration set: SQNR in dB (10·log10(Σ float² / Σ (float − int8)²)) and MSE. It is the error seen at that
  point of the INT8 network, so it includes what earlier layers passed on (as ONNX Runtime's QDQ debugger
  and AIMET's per-layer analysis measure it);
- for the `sensitivity_top` layers with the lowest SQNR: the task's primary metric on the validation split
  with only that layer kept in float (one re-quantization and one evaluation each).

`float_layers: auto` then keeps layers in float greedily, the ones whose float copy recovered most first
(then lowest SQNR), until the primary metric is within `max_drop` of the float model's. Among layers that
recover about as much (within max_drop / 2 of the best one left), the one that costs least latency goes
first: its cost is what the runtime's per-layer profile (`Runtime.profile`, on the target's device) says the
layer takes in the float model minus in the INT8 model, i.e. the speed-up given back by keeping it float.

The layer outputs are read by the target's runtime (`Runtime.layers`, `Runtime.layer_outputs`): nothing
here knows a format. "Float" is the target's float precision: a layer kept out of INT8 runs in what the
device computes float in (FP16 on an NPU or GPU, the target's precision hint on the CPU).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgebuild.artifact import write_json


@dataclasses.dataclass
class Diagnosis:
    rows: list[dict[str, Any]]  # one per quantizable layer, worst SQNR first
    float_metric: float
    int8_metric: float
    chosen: list[str]  # float_layers=auto: the layers kept in float (else [])
    chosen_metric: float | None  # the primary metric with `chosen` in float
    seconds: float
    quantizations: int  # re-quantizations of the model (the full INT8 one included)
    evaluations: int  # validation-split evaluations of a model (the float one included)
    calibration_passes: int  # forward passes over the calibration set (float + INT8, with layer outputs)
    within: bool = True  # float_layers=auto: whether the limit was reached
    cost_source: str = "none"  # where rows' latency_cost_ms came from (the runtime's per-layer profile), or why not


def float_precision(target: Any) -> str:
    """What a layer kept out of INT8 computes in on the target's device."""
    device = str(target.cfg.device).upper()
    if device in ("NPU", "VPU", "GPU"):
        return "fp16"
    precision = str(target.cfg.precision)
    return {"f32": "fp32", "auto": "runtime default"}.get(precision, precision)


def precision_statement(target: Any) -> str:
    """float_precision in words, saying what ran instead when the device is absent (CPU proxy)."""
    label = float_precision(target)
    if not target.is_proxy:
        return f"{label} on {target.cfg.device}"
    here = {"f32": "fp32", "auto": "the CPU's default (bf16 where the CPU has it)"}.get(str(target.cfg.precision),
                                                                                     str(target.cfg.precision))
    return f"{label} on {target.cfg.device}; measured here on the CPU proxy, where it ran in {here}"


def layer_costs(ctx: Any, float_model: Any, int8_model: Any, iterations: int = 20) -> tuple[dict[str, float], str]:
    """{layer: ms it costs to keep it float} = its time in the float model's per-layer profile minus its time
    in the INT8 model's, on the target's device; ({}, why not) when the runtime has no per-layer profile."""
    from edgebuild.profile import layer_times
    from edgebuild.targets import base

    runtime = ctx.target.runtime
    if not runtime.supports(base.PROFILE):
        return {}, f"none: runtime {runtime.name} has no per-layer profile (layers ordered by recovery alone)"
    times = [{r["name"]: r["ms"] for r in layer_times(m, ctx, iterations)} for m in (float_model, int8_model)]
    costs = {n: ms - times[1].get(n, 0.0) for n, ms in times[0].items()}
    proxy = " (CPU proxy)" if ctx.target.is_proxy else ""
    return costs, (f"{runtime.name} per-layer profile on {ctx.target.device}{proxy}: float minus INT8 ms, "
                   f"mean of {iterations} inferences each")


def diagnose(ctx: Any, request: Any, top: int, max_drop: float | None, auto: bool) -> Diagnosis:
    """Quantize once fully, measure per-layer error, then re-quantize with single layers (and, with `auto`,
    growing sets of layers) kept in float; every model goes into a scratch folder removed at the end."""
    from edgebuild.evaluate import load
    from edgebuild.stages.quantize import primary_metric_fn

    t0 = time.perf_counter()
    runtime = ctx.target.runtime
    scratch = ctx.workdir / ".sensitivity"
    scratch.mkdir()
    validation = [(x, y) for x, y in ctx.data.batches("val", 1)]
    score_pairs = primary_metric_fn(ctx)
    counts = {"quantizations": 0, "evaluations": 0}

    def quantize(name: str, extra: list[str]) -> Any:
        folder = scratch / name
        (folder / ".float").mkdir(parents=True)
        counts["quantizations"] += 1
        names = list(dict.fromkeys([*request.ignored_names, *extra]))
        return runtime.quantize(ctx.input, dataclasses.replace(request, ignored_names=names), folder,
                                folder / ".float")

    def score(artifact: Any) -> float:
        counts["evaluations"] += 1
        session = load(artifact, ctx, 1)
        return score_pairs((session.infer(x), y) for x, y in validation)

    full = quantize("int8", [])
    float_model = full.float_model
    user = set(request.ignored_names)
    layers = [l for l in runtime.layers(float_model) if l["name"] not in user
              and not any(re.search(p, l["name"]) for p in request.ignored_patterns)]
    names = [l["name"] for l in layers]
    signal, noise, count = (dict.fromkeys(names, 0.0) for _ in range(3))
    inputs = [x[None] for x in request.calibration]
    for f_out, q_out in zip(runtime.layer_outputs(float_model, names, inputs),
                            runtime.layer_outputs(full.artifact, names, inputs), strict=True):
        for n in names:
            f, q = f_out[n].astype(np.float64), q_out[n].astype(np.float64)
            signal[n] += float(np.sum(f * f))
            noise[n] += float(np.sum((f - q) ** 2))
            count[n] += f.size
    rows = []
    for layer in layers:
        n = layer["name"]
        sqnr = 10 * math.log10(signal[n] / noise[n]) if noise[n] > 0 and signal[n] > 0 else \
            (math.inf if noise[n] == 0 else -math.inf)
        rows.append({"layer": n, "type": layer["type"], "sqnr_db": sqnr, "mse": noise[n] / max(count[n], 1),
                     "metric_float_kept": None, "metric_drop": None, "recovered": None})
    costs, cost_source = layer_costs(ctx, float_model, full.artifact)
    for r in rows:
        r["latency_cost_ms"] = costs.get(r["layer"])
    rows.sort(key=lambda r: r["sqnr_db"])
    for i, r in enumerate(rows):
        r["rank"] = i + 1
    float_metric, int8_metric = score(float_model), score(full.artifact)
    for i, r in enumerate(rows[:top]):
        kept = score(quantize(f"layer{i}", [r["layer"]]).artifact)
        r.update(metric_float_kept=kept, metric_drop=float_metric - kept, recovered=kept - int8_metric)
    chosen: list[str] = []
    chosen_metric: float | None = None
    within = True
    if auto:
        assert max_drop is not None
        step = iter(range(10**6))
        chosen, chosen_metric, within = choose(
            rows, float_metric, int8_metric, max_drop,
            lambda layers: score(quantize(f"auto{next(step)}", layers).artifact))
        for r in rows:
            r["kept_in_float"] = r["layer"] in chosen
    shutil.rmtree(scratch)
    return Diagnosis(rows, float_metric, int8_metric, chosen, chosen_metric, time.perf_counter() - t0,
                     counts["quantizations"], counts["evaluations"], 2, within, cost_source)


def chosen_cost_ms(d: Diagnosis) -> float | None:
    """The profiled latency the float_layers=auto choice gives back (None when a layer was not profiled)."""
    costs = {r["layer"]: r.get("latency_cost_ms") for r in d.rows}
    values = [costs.get(n) for n in d.chosen]
    return None if any(v is None for v in values) else float(sum(values))


def order(rows: list[dict[str, Any]], similar: float) -> list[str]:
    """The order float_layers=auto tries layers in: rows with a metric check by recovery, except that among
    those within `similar` of the best recovery left the cheapest (latency_cost_ms; unprofiled last) goes
    first; then the unchecked rows, lowest SQNR first (rows come sorted that way)."""
    left = sorted((r for r in rows if r.get("recovered") is not None), key=lambda r: -r["recovered"])
    out = []
    while left:
        near = [r for r in left if r["recovered"] >= left[0]["recovered"] - similar - 1e-12]
        cost = [math.inf if r.get("latency_cost_ms") is None else r["latency_cost_ms"] for r in near]
        pick = near[min(range(len(near)), key=lambda i: (cost[i], -near[i]["recovered"]))]
        out.append(pick["layer"])
        left.remove(pick)
    return out + [r["layer"] for r in rows if r.get("recovered") is None]


def choose(rows: list[dict[str, Any]], float_metric: float, int8_metric: float, max_drop: float,
           evaluate: Any) -> tuple[list[str], float, bool]:
    """Greedy mixed precision: add layers to the float set in `order` (most recovery first, the cheapest of
    those within max_drop / 2 of it; then the rest by lowest SQNR), until float − metric <= max_drop.
    `evaluate(layers)` is the primary metric with those layers in float. Returns (layers, metric, reached);
    no layer when INT8 is already within the limit. The first layer's metric is reused from its row."""
    if float_metric - int8_metric <= max_drop + 1e-9:
        return [], int8_metric, True
    single = {r["layer"]: r["metric_float_kept"] for r in rows if r.get("recovered") is not None}
    chosen: list[str] = []
    metric = int8_metric
    for layer in order(rows, max_drop / 2):
        chosen.append(layer)
        metric = single[layer] if len(chosen) == 1 and layer in single else evaluate(list(chosen))
        if float_metric - metric <= max_drop + 1e-9:  # accuracy is a multiple of 1/n: no rounding trap
            return chosen, metric, True
    return chosen, metric, False


def write(diagnosis: Diagnosis, folder: Path, metric: str, precision: str) -> dict[str, str]:
    """sensitivity.json (rows), sensitivity.csv, sensitivity.md and, where matplotlib is installed,
    sensitivity.png: the stage's report files."""
    rows = diagnosis.rows
    write_json(folder / "sensitivity.json", [{k: _finite(v) for k, v in r.items()} for r in rows])
    keys = ["rank", "layer", "type", "sqnr_db", "mse", "metric_float_kept", "metric_drop", "recovered",
            "latency_cost_ms", *(["kept_in_float"] if rows and "kept_in_float" in rows[0] else [])]
    with open(folder / "sensitivity.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in keys})
    (folder / "sensitivity.md").write_text(markdown(diagnosis, metric, precision))
    files = {"sensitivity": "sensitivity.json", "sensitivity_csv": "sensitivity.csv", "sensitivity_md": "sensitivity.md"}
    try:
        import matplotlib
    except ImportError:
        return files
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(rows) + 2), 3.5))
    finite = [r["sqnr_db"] if math.isfinite(r["sqnr_db"]) else 0.0 for r in rows]
    colors = ["#d62728" if r["recovered"] is not None else "#1f77b4" for r in rows]
    ax.bar(range(len(rows)), finite, color=colors)
    ax.set_xticks(range(len(rows)), [r["layer"][-28:] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("SQNR at the layer output (dB)")
    ax.set_title(f"INT8 sensitivity, worst first (red: {metric} checked with the layer in float)", fontsize=9)
    fig.savefig(folder / "sensitivity.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return {**files, "sensitivity_png": "sensitivity.png"}


def markdown(d: Diagnosis, metric: str, precision: str) -> str:
    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else fmt.format(v)

    lines = [f"# INT8 sensitivity ({metric}, validation split)", "",
             f"float {d.float_metric:.4f}, all INT8 {d.int8_metric:.4f} (drop {d.float_metric - d.int8_metric:+.4f}); "
             f"a layer kept in float runs in {precision}.",
             f"Cost: {d.seconds:.1f} s, {d.quantizations} quantizations, {d.evaluations} validation evaluations, "
             f"{d.calibration_passes} passes over the calibration set.",
             f"Latency cost of keeping a layer float: {d.cost_source}.", ""]
    if d.chosen or d.chosen_metric is not None:
        lines += [f"float_layers=auto kept {len(d.chosen)} layer(s) in float: {', '.join(d.chosen) or 'none'} "
                  f"-> {num(d.chosen_metric, '{:.4f}')}" + ("" if d.within else " (max_drop NOT reached)"), ""]
    lines += ["| rank | layer | type | SQNR dB | MSE | metric, layer in float | drop vs float | recovered | "
              "latency cost ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in d.rows:
        lines.append(f"| {r['rank']} | `{r['layer']}` | {r['type']} | {r['sqnr_db']:.2f} | {r['mse']:.3g} | "
                     f"{num(r['metric_float_kept'], '{:.4f}')} | {num(r['metric_drop'], '{:+.4f}')} | "
                     f"{num(r['recovered'], '{:+.4f}')} | {num(r.get('latency_cost_ms'), '{:+.4f}')} |")
    return "\n".join(lines) + "\n"


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v
