"""Streaming: a deployable in a real-time pipeline (capture and inference threads over a ring buffer), measured as
an application sees it: offered vs processed FPS, dropped frames, end-to-end latency, where the time goes, CPU use,
start-up time, detection quality against the generated video's exact boxes, and a duty-cycle energy estimate.

`python -m edgebuild.stream DEPLOY_DIR --source shapes --fps 30` (edgebuild/stream/__main__.py) or, in a build,
`eval.stream.enabled=true` (`maybe_run`, called by the pipeline on the final stage's deployable). Modules:
sources (frames), model (preprocess / infer / postprocess of a deployable), pipeline (the threads and the ring),
quality (mAP vs ground truth), energy (the duty-cycle arithmetic), annotate (the drawn video).
"""

from __future__ import annotations

import time
from typing import Any


def measure(model: Any, source: Any, cfg: Any, power: tuple[float | None, float | None], battery: tuple[float, float],
            t_start: float | None = None, annotate: Any = None, energy_source: str = "auto",
            on_result: Any = None) -> tuple[dict[str, Any], Any]:
    """Stream once; return (metrics: stream/*, quality, energy/* and battery/* (estimates from `power`, or
    measured by RAPL where readable and `energy_source` is auto|rapl; `energy/source` says which), result)."""
    from edgebuild.stream import energy, pipeline, quality

    meter = energy.Rapl.open() if energy_source != "model" else None
    if energy_source == "rapl" and meter is None:
        from edgebuild.errors import EdgebuildError

        raise EdgebuildError("energy source rapl: this machine has no readable RAPL counters "
                             f"({energy.RAPL_ROOT}/intel-rapl:*/energy_uj)", "use --energy auto or model (the "
                             "stated powers of the target spec), or run where powercap is readable (root)")
    if meter is not None:
        meter.begin()
    try:
        result = pipeline.run(model, source, cfg, t_start, sink=annotate, on_result=on_result)
        interrupted = False
    except pipeline.Interrupted as e:  # Ctrl-C: the frames processed so far, then re-raised with their metrics
        if e.result is None:
            if annotate is not None:
                annotate.close()
            raise
        result, interrupted = e.result, True
    metrics = dict(result.metrics)
    if annotate is not None:
        metrics["stream/annotated_frames"] = annotate.close()
    q = quality.stream_quality(result, model, source)
    metrics.update(q)
    if q and q["stream/quality_frames"] < metrics["stream/processed_frames"]:
        result.notes.append(f"quality (mAP / accuracy) over the last {q['stream/quality_frames']} processed frames of "
                            f"{metrics['stream/processed_frames']} (keep_records; the other metrics cover them all)")
    metrics.update(result.model_metrics)  # a cascade: escalation rate, small vs escalated latency
    metrics.update(energy.for_stream(metrics, power[0], power[1], *battery,
                                     rapl_j=meter.joules() if meter is not None else None, source=energy_source,
                                     device=energy.device_latency(model.session)))
    if interrupted:
        raise pipeline.Interrupted(result, metrics)
    return metrics, result


def maybe_run(deployable: Any, ctx: Any) -> tuple[dict[str, Any], list[str]]:
    """`eval.stream.enabled`: the build's final deployable streams the generated video at the model's input size;
    returns (metrics, notes) for the final stage. Powers come from the target spec (`spec.power`)."""
    from omegaconf import OmegaConf

    from edgebuild.stream import energy
    from edgebuild.stream.model import for_build
    from edgebuild.stream.pipeline import StreamConfig
    from edgebuild.stream.sources import ShapesVideo

    c = ctx.cfg.eval.stream
    if not c.enabled:
        return {}, []
    t_start = time.perf_counter()
    model = for_build(deployable, ctx)
    frames = max(1, round(c.fps * c.seconds))
    if model.is_detection:
        source = ShapesVideo(model.width, model.height, num_classes=len(model.class_names or []) or 3, seed=c.seed,
                             frames=frames)
    else:  # a classifier (a cascade too) streams the build's held-out images, labelled, at the data's size
        from edgebuild.stream.sources import labelled_frames

        split = ctx.data.splits[ctx.cfg.eval.split]
        source = labelled_frames(split.images, split.labels, frames, f"held-out images ({ctx.cfg.eval.split} split, "
                                 "cycled)")
    cfg = StreamConfig(fps=float(c.fps), frames=frames, depth=int(c.depth), policy=str(c.policy),
                       reuse_threshold=float(c.reuse_threshold), requests=int(c.requests),
                       keep_records=int(c.keep_records))
    power = OmegaConf.to_container(ctx.target.cfg.spec.power, resolve=True)
    precision = energy.precision_key(model.session.runtime_info().get("runtime/precision"))
    active, idle, _ = energy.device_powers(power, precision)
    metrics, result = measure(model, source, cfg, (active, idle), (float(c.battery_mah), float(c.battery_volts)),
                              t_start)
    notes = [f"stream: {source.describe()} at {c.fps:g} FPS offered, {metrics['stream/fps']:.1f} processed, "
             f"{metrics['stream/dropped_frames']} dropped ({c.policy}, ring {c.depth}), e2e p50 "
             f"{metrics['stream/e2e_p50_ms']:.1f} ms"] + result.notes
    if "stream/cascade_escalated" in metrics:
        notes.append(cascade_note(metrics))
    if metrics.get("energy/source") == "rapl":
        notes.append(f"stream energy MEASURED by RAPL on this machine's CPU packages: "
                     f"{metrics['energy/mj_per_inference']:.2f} mJ/inference, battery {metrics['battery/hours']:.1f} h "
                     f"(estimate from spec.power: {metrics.get('energy/model_mj_per_inference', float('nan')):.2f} "
                     "mJ/inference)")
    elif "energy/mj_per_inference" in metrics:
        notes.append(f"stream energy (estimate from spec.power, {precision}): "
                     f"{metrics['energy/mj_per_inference']:.2f} mJ/inference, battery {metrics['battery/hours']:.1f} h")
    return metrics, notes


def cascade_note(m: dict[str, Any]) -> str:
    return (f"stream cascade at threshold {m['stream/cascade_threshold']:g}: {m['stream/cascade_escalated']:.0%} "
            f"of the inferred frames escalated to the big model ({m['stream/cascade_escalated_frames']}); e2e p50 "
            f"{m['stream/cascade_e2e_p50_small_ms']:.2f} ms answered by the small model, "
            f"{m['stream/cascade_e2e_p50_escalated_ms']:.2f} ms escalated")
