"""Measurement: one path for every stage's artifact, and the helpers stages measure with.

Accuracy (and the task's other quality metrics) by the deployed artifact on the target runtime over
held-out data; MACs and params with torch's own flop counter; size on disk and zipped; latency on
the compiled artifact (warm-up, percentiles, throughput) with the thread count and load recorded.

This module owns timing: `time_calls` is the one timing loop (a runtime only provides
`Session.bind(x)`, one inference per call), `interleaved` the one alternating-rounds comparison, and
`deploy` / `load` / `score` / `outputs` how a stage deploys, compiles and scores a model (distill,
cascade) the way the pipeline does.
"""

from __future__ import annotations

import io
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np


def count_macs(model: Any, input_shape: list[int]) -> tuple[int, int]:
    """(MACs, params) at batch 1; one MAC per multiply-add (torch counts FLOPs = 2 x MACs)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = model.eval()
    shape = [1, *list(input_shape)[1:]]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(shape))
    params = sum(p.numel() for p in model.parameters())
    return int(counter.get_total_flops() // 2), int(params)


def layer_macs(model: Any, input_shape: list[int]) -> dict[str, tuple[Any, int]]:
    """Dense MACs of every conv and linear layer at batch 1: {name: (module, MACs)}, each output
    element costing one multiply-add per weight of its filter (in/groups x kernel, or in_features)."""
    import torch
    from torch import nn

    out: dict[str, tuple[Any, int]] = {}

    def hook(name: str) -> Any:
        def count(m: Any, _inputs: Any, y: Any) -> None:  # a module called twice counts twice
            out[name] = (m, out.get(name, (m, 0))[1] + int(y.numel() * m.weight[0].numel()))
        return count

    hooks = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
             if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros([1, *list(input_shape)[1:]]))
    finally:
        for h in hooks:
            h.remove()
    return out


def size_metrics(root: Path, files: list[str]) -> dict[str, int]:
    """Bytes on disk and bytes after zip (deflate) — what zeros and shared weights compress to."""
    total = sum((root / f).stat().st_size for f in files)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for f in files:
            z.write(root / f, arcname=f)
    return {"size/bytes": int(total), "size/zip_bytes": len(buf.getvalue())}


# ------------------------------------------------------------------ deploy, compile, score
def deploy(artifact: Any, folder: Path, ctx: Any) -> Any:
    """The artifact as the target runtime's deployable (converted into `folder` when needed)."""
    return ctx.target.runtime.deployable(artifact, folder, ctx.task.output_names)


def load(deployable: Any, ctx: Any, batch: int) -> Any:
    """Compiled on the target's measuring device; `session.load_ms` = read + compile."""
    return ctx.target.runtime.load(deployable, ctx.target.device, batch)


def outputs(session: Any, batch: int, data: Any, eval_cfg: Any) -> Any:
    """(raw outputs, targets) per held-out batch of the compiled session."""
    for x, y in data.batches(eval_cfg.split, batch, eval_cfg.limit):
        n = len(x)
        if n < batch:  # the compiled shape is static: pad the last batch, drop the padding's outputs
            x = np.concatenate([x, np.zeros((batch - n, *x.shape[1:]), dtype=x.dtype)])
        yield [o[:n] for o in session.infer(x)], y


def quality(session: Any, batch: int, data: Any, task: Any, eval_cfg: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The task's metrics, computed from the compiled artifact's raw outputs on held-out data."""
    evaluator = task.evaluator(data.class_names)
    for outs, y in outputs(session, batch, data, eval_cfg):
        evaluator.update(outs, y)
    return evaluator.compute()


def score(deployable: Any, ctx: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Quality of a deployable on the held-out split at its own input size, compiled at eval batch size."""
    from edgebuild.data import for_input

    batch = ctx.cfg.eval.batch_size
    session = load(deployable, ctx, batch)
    return quality(session, batch, for_input(ctx.data, deployable.meta.get("input_shape")), ctx.task, ctx.cfg.eval)


# ------------------------------------------------------------------------------- timing
def sample_input(input_shape: list[int]) -> np.ndarray:
    """The batch-1 input every latency is measured on (fixed seed: same bytes in every process)."""
    return np.random.default_rng(0).standard_normal([1, *list(input_shape)[1:]]).astype(np.float32)


def time_calls(call: Any, warmup: int, iterations: int, min_seconds: float) -> np.ndarray:
    """THE timing loop: ms per call of `call` (a Session.bind), after `warmup` untimed calls, at least
    `iterations` calls and at least `min_seconds`."""
    for _ in range(warmup):
        call()
    times = []
    start = time.perf_counter()
    while len(times) < iterations or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter_ns()
        call()
        times.append((time.perf_counter_ns() - t0) / 1e6)
    return np.asarray(times)


def interleaved(sessions: list[Any], shapes: list[list[int]], cfg: Any, rounds: int) -> list[list[float]]:
    """Per-round p50 (ms) of each session, timed in alternating rounds in one process: every model sees
    the same machine load (the only comparison that survives a shared machine's load swings)."""
    calls = [s.bind(sample_input(shape)) for s, shape in zip(sessions, shapes, strict=True)]
    per_round = max(10, int(cfg.iterations) // rounds)
    medians: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for i, call in enumerate(calls):
            medians[i].append(float(np.median(time_calls(call, cfg.warmup, per_round, 0.0))))
    return medians


def interleaved_latency(deployables: list[Any], ctxs: list[Any], rounds: int) -> tuple[list[dict[str, float]],
                                                                                      list[list[float]]]:
    """Deployables compiled at batch 1 together and timed by `interleaved` in `rounds`: per deployable
    `latency/interleaved_ms` (median of its round medians) and `latency/speedup` (the first one's over
    its own), plus the per-round medians. Minutes apart, a shared machine's load swings more than the
    gap between two stages; interleaved, every deployable sees the same load."""
    sessions = [load(d, c, 1) for d, c in zip(deployables, ctxs, strict=True)]
    medians = interleaved(sessions, [d.meta["input_shape"] for d in deployables], ctxs[0].cfg.eval.latency, rounds)
    p50 = [float(np.median(m)) for m in medians]
    return [{"latency/interleaved_ms": v, "latency/speedup": p50[0] / v} for v in p50], medians


def first_call_ms(call: Any) -> float:
    """The first inference of a fresh session, apart (`latency/first_ms`: lazy allocations, kernel selection)."""
    t0 = time.perf_counter_ns()
    call()
    return (time.perf_counter_ns() - t0) / 1e6


def latency(session: Any, input_shape: list[int], cfg: Any) -> dict[str, float]:
    """Latency of a freshly compiled session: the first inference apart, then warm-up and the timed loop."""
    call = session.bind(sample_input(input_shape))
    first_ms = first_call_ms(call)
    times = time_calls(call, cfg.warmup, cfg.iterations, cfg.min_seconds)
    return {
        "latency/first_ms": first_ms,
        "latency/p50_ms": float(np.percentile(times, 50)),
        "latency/p90_ms": float(np.percentile(times, 90)),
        "latency/mean_ms": float(times.mean()),
        "throughput/fps": float(1000.0 / times.mean()),
        "latency/iterations": int(len(times)),
        "system/loadavg_1m": float(os.getloadavg()[0]),
    }


def measure_static(artifact: Any, folder: Path, ctx: Any) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """Everything that does not change between runs of the same artifact (cached with the stage):
    the deployable for the target, its quality on held-out data, MACs, params and sizes."""
    deployable = deploy(artifact, folder, ctx)
    metrics: dict[str, Any] = {}
    if artifact.kind == "torch":
        metrics["macs"], metrics["params"] = count_macs(artifact.load_torch(), artifact.meta["input_shape"])
    metrics.update(size_metrics(deployable.root, deployable.files))
    if ctx.target.unmeasured:  # nothing can run it here: no quality rather than another runtime's
        return metrics, deployable, {}
    q, tables = score(deployable, ctx)
    metrics.update(q)
    return metrics, deployable, tables


def measure_runtime(deployable: Any, ctx: Any, macs: float | None, reports_dir: Path | None = None,
                    reports: dict[str, Path] | None = None) -> dict[str, Any]:
    """Re-measured on every build, never cached: latency on the compiled artifact and what ran. The
    runtime's report files (Session.report_files) go into `reports_dir`, their paths into `reports`."""
    target = ctx.target
    if target.unmeasured:  # no latency recorded as this runtime's; the spec's roofline estimate is labelled so
        est = target.estimate_ms(macs, sum((deployable.root / f).stat().st_size for f in deployable.files),
                                 str(deployable.meta.get("precision", "fp32")))
        return {"latency/unmeasured": target.unmeasured, "latency/threads": int(target.cfg.threads),
                **({"latency/estimate_ms": est} if est is not None else {})}
    session = load(deployable, ctx, 1)
    metrics: dict[str, Any] = dict(session.runtime_info())
    if reports_dir is not None and reports is not None:
        reports.update(session.report_files(reports_dir))
    metrics["latency/load_ms"] = session.load_ms
    if ctx.cfg.eval.latency.enabled:
        metrics.update(latency(session, deployable.meta["input_shape"], ctx.cfg.eval.latency))
        if hasattr(ctx.task, "runtime_metrics"):  # work outside the network (detection: decode + NMS), timed apart
            metrics.update(ctx.task.runtime_metrics(session, ctx.data, ctx.cfg.eval))
    else:  # one inference even then: load and first call are what a deployment pays at start-up
        metrics["latency/first_ms"] = first_call_ms(session.bind(sample_input(deployable.meta["input_shape"])))
    metrics["latency/threads"] = int(target.cfg.threads)
    metrics["latency/device"] = target.device
    if target.is_proxy:
        metrics["latency/proxy_device"] = target.device
    precision = "int8" if metrics.get("int8/ops_fraction", 0) > 0.5 else "fp32"
    weight_bytes = sum((deployable.root / f).stat().st_size for f in deployable.files)
    est = target.estimate_ms(macs, weight_bytes, precision)
    if est is not None:  # a runtime that computes its own (Vela's cycles at the stated clock) keeps it
        metrics.setdefault("latency/estimate_ms", est)
    return metrics


# ------------------------------------------------------------------------ a stage's metrics
def inherit_counts(metrics: dict[str, Any], input_metrics: dict[str, Any]) -> None:
    """Runtime formats keep the MACs/params of their source (torch's counter needs a torch model)."""
    for key in ("macs", "params"):
        if key not in metrics and key in input_metrics:
            metrics[key] = input_metrics[key]


class Drops:
    """`acc/drop` (pp) / `map/drop` (points) vs the first stage that has the task's primary metric."""

    def __init__(self, task: Any):
        self.primary, self.drop, self.reference = task.primary_metric, task.drop_metric, None

    def add(self, metrics: dict[str, Any]) -> None:
        if self.primary in metrics:
            if self.reference is None:
                self.reference = metrics[self.primary]
            metrics[self.drop] = (self.reference - metrics[self.primary]) * 100.0
