"""MCU: measured vs estimated (issue 18). For tiny_mcu and the seed recipes mcu_20kb, mcu_1mb:

- TFLite Micro's arena and flash (memory/arena_bytes, memory/flash_bytes) beside the previous release's estimates
  (memory/estimate_arena_bytes, memory/estimate_flash_bytes) and the estimates' error;
- held-out top-1 of the same deployed .tflite by TFLite Micro's interpreter and by LiteRT's, through
  evaluate.quality (the pipeline's scoring path), and the difference in pp (target: within 0.5 pp);
- the same .tflite compiled by Vela for target=ethos_u55 (ethos-u55-128 at 500 MHz) and ethos_u65
  (ethos-u65-256 at 1 GHz), full builds through the pipeline: cycles, inferences/s, SRAM, flash, NPU share;
- the per-stage table of each build (summary.table_rows: the seed recipes' prune and quantize steps).

    python benchmarks/mcu.py [--recipes tiny_mcu mcu_20kb mcu_1mb] [--npu-targets ethos_u55 ethos_u65] [--cache DIR]

Builds in-process with tracking off and one stage cache (default: a temporary folder), so the ethos_u55 build
reuses the mcu build's stages: Vela compiles the very .tflite TFLM measured.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                platform.processor() or platform.machine())


def build(recipe: str, extra: list[str], cache: Path, run: Path) -> dict[str, Any]:
    from edgebuild import testing
    from edgebuild.errors import BudgetExceeded

    overrides = [f"cache.dir={cache}", "tracking=none", *extra]
    try:
        return testing.build(overrides, run, recipe=recipe, run_name=f"{recipe}-{len(list(run.glob('*')))}")
    except BudgetExceeded as e:  # still measured: report it, with the verdict
        return e.args[0]


def top1_by(runtime_name: str, summary: dict[str, Any], recipe: str, cache: Path) -> float:
    """Held-out top-1 of the build's deployed .tflite on `runtime_name`, by evaluate.quality."""
    from edgebuild import evaluate, testing
    from edgebuild.artifact import read_deploy_folder
    from edgebuild.targets import make_target
    from edgebuild.tasks import make_task

    cfg = testing.compose([f"cache.dir={cache}", "tracking=none"], recipe)
    task = make_task(cfg.task)
    data = task.datamodule(cfg.data, cache)
    target = make_target(cfg.target).for_runtime(runtime_name)
    deploy = Path(summary["deploy"])
    session = target.runtime.load(read_deploy_folder(deploy), target.device, cfg.eval.batch_size)
    metrics, _ = evaluate.quality(session, cfg.eval.batch_size, data, task, cfg.eval)
    return float(metrics["acc/top1"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["tiny_mcu", "mcu_20kb", "mcu_1mb"])
    parser.add_argument("--npu-targets", nargs="+", default=["ethos_u55", "ethos_u65"])
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args()
    from edgebuild import summary as summaries
    from edgebuild.openmp import limit_spinning

    limit_spinning()
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        cache, run = args.cache or Path(tmp) / "cache", Path(tmp) / "runs"
        rows, npu_rows, tables = [], [], []
        for recipe in args.recipes:
            mcu = build(recipe, [], cache, run)
            m = mcu["stages"][-1]["metrics"]
            tflm, lite = top1_by("tflm", mcu, recipe, cache), top1_by("litert", mcu, recipe, cache)
            arena, est_arena = m["memory/arena_bytes"], m["memory/estimate_arena_bytes"]
            flash, est_flash = m["memory/flash_bytes"], m["memory/estimate_flash_bytes"]
            rows.append([recipe, f"{m['memory/flatbuffer_bytes']:,}", f"{arena:,}", f"{est_arena:,}",
                         f"{(est_arena - arena) / arena:+.0%}", f"{flash:,}", f"{est_flash:,}",
                         f"{(est_flash - flash) / flash:+.0%}", f"{m['memory/peak_ram_bytes']:,}",
                         f"{tflm:.2%}", f"{lite:.2%}", f"{(tflm - lite) * 100:+.2f}",
                         "met" if mcu["budget"]["ok"] else "VIOLATED"])
            for npu in args.npu_targets:
                built = build(recipe, [f"target={npu}"], cache, run)
                e = built["stages"][-1]["metrics"]
                npu_rows.append([recipe, f"{npu} ({e['ethos_u/accelerator']} @ {e['ethos_u/clock_hz'] / 1e6:g} MHz)",
                                 f"{e['ethos_u/cycles']:,.0f}", f"{e['latency/estimate_ms'] * 1000:.2f}",
                                 f"{e['ethos_u/inferences_per_s']:,.0f}", f"{e['ethos_u/sram_bytes']:,.0f}",
                                 f"{e['ethos_u/flash_bytes']:,.0f}", f"{e['ethos_u/npu_ops_fraction']:.0%}",
                                 e.get("ethos_u/cpu_ops") or "-", f"{m['latency/estimate_ms'] * 1000:.1f}",
                                 "met" if built["budget"]["ok"] else "VIOLATED"])
            checks = [f"{c['budget']} {c['metric']} {summaries.format_value(c['value'], '{:.4g}')} {c['op']} "
                      f"{c['limit']:.4g}: {'ok' if c['ok'] else 'VIOLATED'}" for c in mcu["budget"]["checks"]]
            tables.append((recipe, summaries.table_rows(mcu), checks))

    def md(header: list[str], body: list[list[str]]) -> str:
        return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                          *["| " + " | ".join(str(c) for c in r) + " |" for r in body]])

    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average {load0[0]:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end")
    print("\nTFLite Micro (target=mcu) vs the previous estimates; top-1 of the same .tflite, TFLM vs LiteRT\n")
    print(md(["recipe", "flatbuffer B", "arena B (TFLM)", "arena B (est.)", "est. error", "flash B (TFLM)",
              "flash B (est.)", "est. error", "peak RAM B", "top-1 TFLM", "top-1 LiteRT", "diff pp", "budget"],
             rows))
    print("\nEthos-U by Vela 5.2 (conf/target/ethos_u*.yaml), the same .tflite as the mcu build's\n")
    print(md(["recipe", "target", "cycles", "us/inf", "inf/s", "SRAM B", "flash B", "NPU ops", "CPU fallbacks",
              "Cortex-M7 est. us", "budget"], npu_rows))
    for recipe, (header, body), checks in tables:
        print(f"\nper-stage table, recipe={recipe} (target=mcu)\n")
        print(md(header, body))
        print("\nbudget: " + "; ".join(checks))


if __name__ == "__main__":
    main()
