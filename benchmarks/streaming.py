"""Streaming (issue 17): deployables streamed over the generated moving-shapes video through the capture and
inference threads of edgebuild/stream. Four tables:

1. rates: every deployable at an offered rate and unthrottled, synchronous vs 2 asynchronous requests, all
   configurations run once per round with the rounds interleaved (median over rounds; the per-round FPS of sync
   and async side by side); beside each, the network's own p50 timed in the same round (evaluate.time_calls) and
   the sanity check e2e p50 >= network p50 + preprocess + postprocess (at the offered rate: unthrottled frames also
   wait in the ring);
2. frame reuse on a video with still periods and slow motion (`ShapesVideo(still=, slow=)`): per threshold, the
   fraction of inferences saved and the mAP@[.5:.95] cost vs inferring every frame (the skipped frames redrawn and
   inferred offline); the largest threshold within `--max-cost` points;
3. a cascade (recipe=cascade, shrunk) streamed over its held-out images: measured escalation rate and e2e latency
   of the frames the small model answered vs escalated;
4. the duty-cycle energy arithmetic for the mcu and vpu targets' specs.

    nice -n 10 python benchmarks/streaming.py --quick       # builds shrunk FP32 / INT8 / pruned + INT8 SSDs + a cascade
    nice -n 10 python benchmarks/streaming.py --deploy int8=outputs/runs/.../deploy [--deploy NAME=DIR ...]

`fps 0` is unthrottled: the capture offers frames as fast as it can and the ring blocks it (nothing dropped), so
processed FPS is the pipeline's capacity. Prints the load average and CPU: on a shared machine absolute numbers
say little (docs/benchmarks.md says where they were measured).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from edgebuild.openmp import limit_spinning  # noqa: E402

limit_spinning()  # before torch loads

DETECT = ["data.image_size=96", "model.kwargs.width=8", "data.batch_size=16", "budget.min_map=null",
          "budget.max_map_drop=null", "eval.latency.rounds=0"]
CASCADE = ["stages.big.epochs=6", "stages.small.epochs=6", "stages.cascade.latency_rounds=1",
           "eval.stream.enabled=true", "eval.stream.seconds=5"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def quick_builds(out: Path, samples: int, epochs: int) -> dict[str, Path]:
    """Shrunk FP32, INT8 and pruned + INT8 SSD deployables (one stage cache: the training is shared) and a cascade."""
    from edgebuild import testing
    from edgebuild.errors import BudgetExceeded
    from edgebuild.pipeline import build

    common = testing.shrink(out) + DETECT + [f"data.num_samples={samples}", f"stages.train.epochs={epochs}"]
    plans = {"fp32": ("ssd_int8", ["stages.quantize=null"]), "int8": ("ssd_int8", []),
             "pruned+int8": ("ssd_prune_int8", ["stages.prune.epochs=2"]),
             "cascade": ("cascade", testing.shrink(out) + CASCADE)}
    deploys = {}
    for name, (recipe, extra) in plans.items():
        overrides = extra if name == "cascade" else common + extra
        try:
            build(testing.compose(overrides, recipe), out / name, recipe)
        except BudgetExceeded:
            pass
        deploys[name] = out / name / "deploy"
    return deploys


def med(ms: list[dict], k: str) -> float:
    vals = [m[k] for m in ms if k in m]
    return statistics.median(vals) if vals else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deploy", action="append", default=[], help="NAME=DIR, a build's deploy/ folder (repeatable)")
    p.add_argument("--quick", action="store_true", help="build shrunk FP32 / INT8 / pruned+INT8 SSDs and a cascade")
    p.add_argument("--samples", type=int, default=600, help="--quick: generated images (train/val/test)")
    p.add_argument("--epochs", type=int, default=6, help="--quick: SSD training epochs")
    p.add_argument("--frames", type=int, default=120, help="frames per stream in the rates table")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the rates table (0: skip it)")
    p.add_argument("--fps", default="30,0", help="offered rates; 0 = unthrottled")
    p.add_argument("--requests", default="1,2", help="inference requests in flight (1 = synchronous)")
    p.add_argument("--reuse", default="0.006,0.008,0.01,0.015,0.02,0.03", help="frame-reuse thresholds to sweep")
    p.add_argument("--reuse-frames", type=int, default=300)
    p.add_argument("--still", type=float, default=0.5, help="still fraction of the reuse video")
    p.add_argument("--slow", type=float, default=0.2, help="slow-motion fraction of the reuse video")
    p.add_argument("--video-seed", type=int, default=0, help="seed of the reuse video")
    p.add_argument("--max-cost", type=float, default=1.0, help="mAP@[.5:.95] points reuse may cost")
    a = p.parse_args(argv)

    import numpy as np

    from edgebuild.evaluate import time_calls
    from edgebuild.stream import energy, measure
    from edgebuild.stream.model import from_deploy_dir
    from edgebuild.stream.pipeline import StreamConfig
    from edgebuild.stream.sources import ShapesVideo

    deploys = dict(d.split("=", 1) if "=" in d else (Path(d).parent.name, d) for d in a.deploy)
    deploys = {k: Path(v) for k, v in deploys.items()}
    if a.quick:
        deploys.update(quick_builds(ROOT / "outputs" / "bench-streaming", a.samples, a.epochs))
    if not deploys:
        p.error("give --deploy NAME=DIR or --quick")
    cascade_dir = deploys.pop("cascade", None)
    models = {name: from_deploy_dir(d)[0] for name, d in deploys.items()}
    load = [os.getloadavg()[0]]
    print(f"# streaming benchmark: CPU {cpu_name()}, {os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), "
          f"load average at start {load[0]:.1f}")
    for name, d in deploys.items():
        s = d.parent / "summary.json"
        if s.exists():
            final = json.loads(s.read_text())["stages"][-1]["metrics"]
            print(f"- {name}: {models[name].describe}, build mAP@[.5:.95] {final.get('map/50_95', float('nan')):.3f}, "
                  f"MACs {final.get('macs', 0) / 1e6:.1f} M, runtime precision {final.get('runtime/precision')}")

    # ---------------------------------------------------------------- 1. rates, sync vs async, interleaved rounds
    configs = [(float(f), int(r)) for f in a.fps.split(",") for r in a.requests.split(",")]
    results: dict[tuple[str, float, int], list[dict]] = {}
    network: dict[str, list[float]] = {}
    for _ in range(a.rounds):
        for name, model in models.items():
            frame = ShapesVideo(model.width, model.height).frame(0).pixels
            network.setdefault(name, []).append(float(np.median(time_calls(model.session.bind(
                model.preprocess(frame)), 10, 100, 0.3))))
            for fps, requests in configs:
                if requests > 1 and not model.async_capable:
                    continue
                cfg = StreamConfig(fps=fps or 1e6, frames=a.frames, depth=2, policy="drop_oldest" if fps else "block",
                                   requests=requests)
                source = ShapesVideo(model.width, model.height, num_classes=len(model.class_names or []) or 3,
                                     seed=0, frames=a.frames)
                m, _ = measure(model, source, cfg, (None, None), (2000.0, 3.7), energy_source="model")
                results.setdefault((name, fps, requests), []).append(m)
                load.append(os.getloadavg()[0])
    print(f"\n## 1. rates: {a.frames} frames x {a.rounds} interleaved rounds (median), ring 2, load average "
          f"{min(load):.1f}-{max(load):.1f}")
    print("| deployable | offered FPS | requests | processed FPS (per round) | dropped | e2e p50 ms | e2e p90 ms | "
          "pre / infer / post ms | infer share | network p50 ms | e2e p50 >= net + pre + post |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (name, fps, requests), ms in results.items():
        net = statistics.median(network[name])
        pre, post = med(ms, "stream/preprocess_ms"), med(ms, "stream/postprocess_ms")
        e2e = med(ms, "stream/e2e_p50_ms")
        sane = f"{'yes' if e2e >= net + pre + post else 'NO'} ({e2e:.1f} vs {net + pre + post:.1f})"
        rounds = ", ".join(f"{m['stream/fps']:.1f}" for m in ms)
        print(f"| {name} | {fps:g}{'' if fps else ' (unthrottled)'} | {requests} | {med(ms, 'stream/fps'):.1f} "
              f"({rounds}) | {med(ms, 'stream/dropped_frames'):.0f} | {e2e:.1f} | {med(ms, 'stream/e2e_p90_ms'):.1f} | "
              f"{pre:.2f} / {med(ms, 'stream/inference_ms'):.2f} / {post:.2f} | "
              f"{med(ms, 'stream/share_inference'):.0%} | {net:.2f} | {sane} |")
    for name in models:
        for fps in sorted({f for _, f, _ in results}, reverse=True):
            sync, asyn = results.get((name, fps, 1)), results.get((name, fps, 2))
            if sync and asyn:
                wins = sum(b["stream/fps"] > s["stream/fps"] for s, b in zip(sync, asyn, strict=True))
                ratio = med(asyn, "stream/fps") / med(sync, "stream/fps")
                print(f"- {name} at {fps:g} FPS offered: async(2) processed more frames per second than sync in "
                      f"{wins} of {len(sync)} rounds (ratio of medians {ratio:.2f})")
    if ("fp32", 0.0, 1) in results and ("int8", 0.0, 1) in results:
        r = med(results[("int8", 0.0, 1)], "stream/fps") / med(results[("fp32", 0.0, 1)], "stream/fps")
        print(f"- unthrottled sync, INT8 / FP32 processed FPS: {r:.2f} (issue target >= 1.5)")

    # ---------------------------------------------------------------- 2. frame reuse on a video with still periods
    name = "int8" if "int8" in models else next(iter(models))
    model = models[name]
    video = ShapesVideo(model.width, model.height, seed=a.video_seed, frames=a.reuse_frames, still=a.still,
                        slow=a.slow)
    speeds = [video.speed(i) for i in range(a.reuse_frames)]
    print(f"\n## 2. frame reuse, {name}: {video.describe()}, {a.reuse_frames} frames (drawn: "
          f"{speeds.count(0.0) / len(speeds):.0%} still, {speeds.count(video.SLOW_SPEED) / len(speeds):.0%} slow), "
          "unthrottled, ring blocks (nothing dropped)")
    print("| reuse T | inferences | saved | mAP@[.5:.95] | every frame | cost (points) | processed FPS |")
    print("|---|---|---|---|---|---|---|")
    best = None
    for t in [float(x) for x in a.reuse.split(",")]:
        cfg = StreamConfig(fps=1e6, frames=a.reuse_frames, depth=2, policy="block", reuse_threshold=t)
        source = ShapesVideo(model.width, model.height, seed=a.video_seed, frames=a.reuse_frames, still=a.still,
                             slow=a.slow)
        m, _ = measure(model, source, cfg, (None, None), (2000.0, 3.7), energy_source="model")
        cost = m.get("stream/reuse_map_cost", 0.0)
        print(f"| {t:g} | {m['stream/inferences']} | {m['stream/reuse_fraction']:.0%} | {m['stream/map_50_95']:.3f} | "
              f"{m.get('stream/map_50_95_every_frame', m['stream/map_50_95']):.3f} | {cost:+.2f} | "
              f"{m['stream/fps']:.1f} |")
        if cost <= a.max_cost and (best is None or m["stream/reuse_fraction"] > best[1]):
            best = (t, m["stream/reuse_fraction"], cost)
    if best:
        print(f"- largest saving within {a.max_cost:g} point: T = {best[0]:g} saves {best[1]:.0%} of inferences "
              f"(cost {best[2]:+.2f} points; issue target >= 30 %: {'met' if best[1] >= 0.3 else 'NOT met'})")
    else:
        print(f"- no threshold within {a.max_cost:g} point")

    # ---------------------------------------------------------------- 3. a cascade in the stream
    if cascade_dir is not None:  # its build streamed it (eval.stream.enabled): held-out images, labelled
        c = json.loads((cascade_dir.parent / "summary.json").read_text())["stages"][-1]["metrics"]
        print(f"\n## 3. cascade (recipe=cascade, shrunk: {' '.join(CASCADE)}), streamed by its build over "
              f"its held-out images at {c['stream/offered_fps']:g} FPS offered")
        print("| threshold | frames processed / dropped | escalated (stream) | escalated (stage, offline) | "
              "top-1 stream | top-1 stage | e2e p50 / p90 ms | e2e p50 small / escalated ms | small ms | "
              "big ms per escalation |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        print(f"| {c['stream/cascade_threshold']:g} | {c['stream/processed_frames']} / {c['stream/dropped_frames']} | "
              f"{c['stream/cascade_escalated']:.1%} | {c['cascade/escalated']:.1%} | {c['stream/acc_top1']:.3f} | "
              f"{c['cascade/acc']:.3f} | {c['stream/e2e_p50_ms']:.2f} / {c['stream/e2e_p90_ms']:.2f} | "
              f"{c['stream/cascade_e2e_p50_small_ms']:.2f} / {c['stream/cascade_e2e_p50_escalated_ms']:.2f} | "
              f"{c['stream/cascade_small_ms']:.3f} | {c['stream/cascade_big_ms']:.3f} |")

    # ---------------------------------------------------------------- 4. energy arithmetic from the specs
    from omegaconf import OmegaConf

    print("\n## 4. energy (ESTIMATES from the target specs' stated powers; busy time: an example, not measured)")
    print("| target | precision | P_active W | P_idle W | busy ms | rate /s | D = r*t | E mJ = P*t | "
          "P_avg W | battery h (2000 mAh, 3.7 V) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for target, busy_ms, rate in (("mcu", 50.0, 1.0), ("vpu", 5.0, 30.0)):
        spec = OmegaConf.load(ROOT / "conf" / "target" / f"{target}.yaml")
        power = OmegaConf.to_container(spec.spec.power) if "spec" in spec and "power" in spec.spec else None
        active, idle, _ = energy.device_powers(power, "int8")
        if active is None:
            print(f"| {target} | int8 | - | - | no spec.power | | | | | |")
            continue
        e = energy.estimate(busy_ms / 1000, rate, active, idle or 0.0, 2000, 3.7)
        print(f"| {target} | int8 | {active:.3g} | {idle or 0:.3g} | {busy_ms:g} | {rate:g} | "
              f"{e['energy/busy_fraction']:.3f} | {e['energy/mj_per_inference']:.3g} | {e['energy/avg_power_w']:.3g} | "
              f"{e['battery/hours']:.1f} |")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
