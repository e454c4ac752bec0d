"""Streaming (issue 17): deployables streamed over the generated moving-shapes video through the capture and
inference threads of edgebuild/stream, synchronous vs asynchronous requests, frame reuse on vs off, at an
offered rate and unthrottled; plus the duty-cycle energy arithmetic for the mcu and vpu targets' specs.

    nice -n 10 python benchmarks/streaming.py --deploy outputs/runs/.../deploy [--deploy ...] [--frames 150]
        [--rounds 2] [--fps 30,0] [--requests 1,2] [--reuse 0,0.02]
    nice -n 10 python benchmarks/streaming.py --quick        # builds a tiny ssd_int8 first (a smoke run)

Every configuration of every deployable runs once per round, rounds interleaved, in this process; the table shows
the median over rounds. `--fps 0` is unthrottled: the capture offers frames as fast as it can and the ring
blocks it (nothing dropped), so processed FPS is the pipeline's capacity. Records the load average and CPU: on a
shared machine, absolute numbers say little (docs/benchmarks.md says where they were measured).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from edgebuild.openmp import limit_spinning  # noqa: E402

limit_spinning()  # before torch loads

QUICK = ["data.num_samples=200", "data.image_size=96", "model.kwargs.width=8", "stages.train.epochs=4",
         "data.batch_size=16", "budget.min_map=null", "budget.max_map_drop=null", "eval.latency.rounds=0"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def quick_deploy(out: Path) -> Path:
    from edgebuild import testing
    from edgebuild.errors import BudgetExceeded
    from edgebuild.pipeline import build

    try:
        build(testing.compose(testing.shrink(out) + QUICK, "ssd_int8"), out / "run", "ssd_int8")
    except BudgetExceeded:
        pass
    return out / "run" / "deploy"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deploy", action="append", default=[], help="a build's deploy/ folder (repeatable)")
    p.add_argument("--quick", action="store_true", help="build a tiny ssd_int8 deployable first")
    p.add_argument("--frames", type=int, default=150)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--fps", default="30,0", help="offered rates; 0 = unthrottled")
    p.add_argument("--requests", default="1,2", help="inference requests in flight (1 = synchronous)")
    p.add_argument("--reuse", default="0,0.02", help="frame-reuse thresholds (0 = off)")
    a = p.parse_args(argv)

    from edgebuild.stream import energy, measure
    from edgebuild.stream.model import from_deploy_dir
    from edgebuild.stream.pipeline import StreamConfig
    from edgebuild.stream.sources import ShapesVideo

    deploys = [Path(d) for d in a.deploy]
    if a.quick:
        deploys.append(quick_deploy(ROOT / "outputs" / "bench-streaming"))
    if not deploys:
        p.error("give --deploy DIR or --quick")
    models = {str(d): from_deploy_dir(d)[0] for d in deploys}
    configs = [(float(f), int(r), float(t)) for f in a.fps.split(",") for r in a.requests.split(",")
               for t in a.reuse.split(",")]
    results: dict[tuple[str, tuple[float, int, float]], list[dict]] = {}
    load = [os.getloadavg()[0]]
    for _ in range(a.rounds):
        for name, model in models.items():
            for fps, requests, reuse in configs:
                if requests > 1 and not model.async_capable:
                    continue
                cfg = StreamConfig(fps=fps or 1e6, frames=a.frames, depth=2,
                                   policy="drop_oldest" if fps else "block", reuse_threshold=reuse, requests=requests)
                source = ShapesVideo(model.width, model.height, num_classes=len(model.class_names or []) or 3,
                                     seed=0, frames=a.frames)
                m, _ = measure(model, source, cfg, (None, None), (2000.0, 3.7), energy_source="model")
                results.setdefault((name, (fps, requests, reuse)), []).append(m)
                load.append(os.getloadavg()[0])

    def med(ms: list[dict], k: str) -> float:
        vals = [m[k] for m in ms if k in m]
        return statistics.median(vals) if vals else float("nan")

    print(f"# streaming benchmark: {a.frames} frames x {a.rounds} rounds (median), CPU {cpu_name()}, "
          f"{os.cpu_count()} cores, load average {min(load):.1f}-{max(load):.1f}")
    print("| deployable | offered FPS | requests | reuse T | processed FPS | dropped | e2e p50 ms | e2e p90 ms | "
          "infer share | inferences saved | mAP@[.5:.95] | reuse cost (points) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (name, (fps, requests, reuse)), ms in results.items():
        print(f"| {models[name].describe} ({Path(name).parent.name}) | {fps:g}{'' if fps else ' (unthrottled)'} | "
              f"{requests} | {reuse:g} | {med(ms, 'stream/fps'):.1f} | {med(ms, 'stream/dropped_frames'):.0f} | "
              f"{med(ms, 'stream/e2e_p50_ms'):.1f} | {med(ms, 'stream/e2e_p90_ms'):.1f} | "
              f"{med(ms, 'stream/share_inference'):.0%} | {med(ms, 'stream/reuse_fraction'):.0%} | "
              f"{med(ms, 'stream/map_50_95'):.3f} | {med(ms, 'stream/reuse_map_cost'):+.2f} |")

    # the energy arithmetic for the specs of mcu and vpu, at an example busy time per inference
    from omegaconf import OmegaConf

    print("\n# energy (ESTIMATES from the target specs' stated powers; busy time: an example, not measured)")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
