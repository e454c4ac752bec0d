"""Issue 15: one model on every installed runtime, FP32 and INT8, with edgebuild's one protocol; OpenVINO's own
benchmark_app beside it as a check of the protocol.

    python benchmarks/runtimes.py [--cases cifar,mobilenet_v2_224] [--limit 10000] [--epochs 3] [--rounds 5]

Each case is one `recipe=runtime_shootout` build (the CLI, as a user runs it): every candidate (runtime x
precision) is compiled at batch 1 in one process and timed in `--rounds` alternating rounds, so load changes hit
all of them; p50 is the median of the round medians, [min-max] the spread of the round medians.
- `cifar`: MobileNetV2-0.5 with the stride-1 stem, trained `--epochs` on the first `--limit` images of
  ../shared/data/cifar10-train.tar.gz (split 0.05/0.05): top-1 is the deployed artifact's on the held-out split.
- `mobilenet_v2_224`: MobileNetV2 width 1.0 at 224x224, untrained (no ImageNet weights or data here): latency,
  load, size and the precision that ran only; its top-1 is not a quality figure.
- `moonshot`: the same untrained MobileNetV2-224, then structured pruning (`--macs-target` of the MACs, l1,
  round_to 16, no fine-tuning: latency does not depend on the weights' values) and a second shootout of INT8
  candidates; the build's end-of-build pass times the dense pick (every runtime, FP32 and INT8: the
  `mobilenet_v2_224` table) and the pruned INT8 pick interleaved in one process (the issue's moonshot: >= 2.2x
  over the uncompressed INT8 on the best runtime). Accuracy is not measured at 224 here (no ImageNet).
`benchmark_app` (OpenVINO's tool, run right after the build on the same IR: -hint none -nstreams 1 -nthreads T
-b 1 -api sync) gives the median to compare with edgebuild's OpenVINO p50.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.training import cpu_model  # noqa: E402

MACS_TARGET = 0.3
# OpenVINO reports the hint it compiled with as an element type; benchmark_app's -infer_precision takes short names
BENCHMARK_APP_PRECISION = {"float32": "f32", "f32": "f32", "bfloat16": "bf16", "bf16": "bf16", "float16": "f16",
                           "f16": "f16"}
DATA = ROOT.parent / "shared" / "data" / "cifar10-train.tar.gz"


def case_args(case: str, limit: int, epochs: int, rounds: int) -> list[str]:
    common = ["recipe=runtime_shootout", "data=imagefolder", f"data.root={DATA}", "data.split.val=0.05",
              "data.split.test=0.05", "model=mobilenet_v2", f"stages.shootout.rounds={rounds}", "tracking=none"]
    if case == "cifar":
        return [*common, f"data.limit={limit}", "data.image_size=32", "data.augment=true",
                f"stages.train.epochs={epochs}"]
    if case == "mobilenet_v2_224":
        return [*common, "data.limit=1000", "data.image_size=224", "model.small_input=false",
                "model.kwargs.width_mult=1.0", "stages.train=null", "budget.max_acc_drop=null"]
    if case == "moonshot":
        int8 = "precisions: [int8], runtimes: [openvino, executorch, litert]"
        return [*case_args("mobilenet_v2_224", limit, epochs, rounds), "~stages.shootout",
                f"+stages.dense={{kind: shootout, rounds: {rounds}}}",
                f"+stages.prune={{kind: prune, input: model, macs_target: {MACS_TARGET}, round_to: 16, epochs: 0}}",
                f"+stages.pruned={{kind: shootout, {int8}, rounds: {rounds}}}"]
    raise SystemExit(f"unknown case {case!r}: use cifar, mobilenet_v2_224, moonshot")


def benchmark_app_ms(xml: Path, threads: int, seconds: int = 10, precision: str | None = None) -> float | None:
    """benchmark_app's median latency (ms) of an IR at batch 1, one stream, sync API, at the inference precision
    edgebuild compiled it with (on a bf16 CPU benchmark_app's own default is bf16, not f32)."""
    cmd = ["benchmark_app", "-m", str(xml), "-d", "CPU", "-hint", "none", "-nstreams", "1", "-nthreads", str(threads),
           "-b", "1", "-api", "sync", "-t", str(seconds), *(["-infer_precision", precision] if precision else [])]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"Median:\s+([\d.]+)\s*(ms|us)", out)
    return None if not found else float(found.group(1)) / (1000.0 if found.group(2) == "us" else 1.0)


def run_case(case: str, args: argparse.Namespace, work: Path, workdir: Path) -> None:
    cmd = [sys.executable, "-m", "edgebuild", *case_args(case, args.limit, args.epochs, args.rounds),
           f"cache.dir={work}/cache", f"hydra.run.dir={workdir}/{case}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    summaries = sorted((workdir / case).glob("**/summary.json"))
    if not summaries:
        print(f"{case}: the build wrote no summary (exit {result.returncode}):\n{result.stderr[-3000:]}")
        return
    summary = json.loads(summaries[-1].read_text())
    threads = int(summary["stages"][-1]["metrics"].get("latency/threads") or os.cpu_count())
    for stage in (s for s in summary["stages"] if s["kind"] == "shootout"):
        candidates_dir = Path(stage["artifact"]).parent
        listed = candidates_dir / "shootout.json"
        rows = json.loads(listed.read_text()) if listed.exists() else summary["pick"]["candidates"]
        print_candidates(f"{case} / {stage['name']}", rows, candidates_dir, threads, untrained=case != "cifar",
                         rounds=args.rounds)
    if case == "moonshot":
        print_moonshot(summary, result.returncode)
    else:
        fastest = min(s["metrics"]["latency/p50_ms"] for s in summary["pick"]["candidates"])
        picked = summary["pick"]["metrics"]["latency/p50_ms"]
        print(f"\npick {summary['pick']['name']}: {picked:.3f} ms; fastest candidate {fastest:.3f} ms; "
              f"build exit {result.returncode} ({'budget met' if summary['budget']['ok'] else 'budget violated'})")


def print_candidates(title: str, rows: list[dict], candidates_dir: Path, threads: int, untrained: bool,
                     rounds: int) -> None:
    print(f"\n### {title}: {cpu_model()}, {os.cpu_count()} cores, {threads} threads, load {os.getloadavg()[0]:.1f}, "
          f"{rounds} interleaved rounds")
    print("| candidate | p50 ms [min-max] | benchmark_app median ms | load ms | size MB | top-1 | ran as | picked |")
    print("|---|---|---|---|---|---|---|---|")
    for step in rows:
        m = step["metrics"]
        spread = (f"[{m['latency/interleaved_min_ms']:.3f}-{m['latency/interleaved_max_ms']:.3f}]"
                  if "latency/interleaved_min_ms" in m else "")
        bapp = ""
        if step["params"]["runtime"] == "openvino":
            xml = next((candidates_dir / step["name"]).glob("*.xml"), None)
            hint = BENCHMARK_APP_PRECISION.get(str(m.get("runtime/inference_precision_hint")))
            ms = benchmark_app_ms(xml, int(threads), precision=hint) if xml else None
            bapp = "" if ms is None else f"{ms:.3f} (x{m['latency/p50_ms'] / ms:.2f})"
        top1 = m.get("acc/top1")
        top1 = "" if top1 is None else f"{top1 * 100:.2f} %" + (" (untrained)" if untrained else "")
        print(f"| {step['name']} | {m['latency/p50_ms']:.3f} {spread} | {bapp} | {m.get('latency/load_ms', 0):.0f} | "
              f"{m.get('size/bytes', 0) / 1e6:.2f} | {top1} | {m.get('runtime/precision', '')} | "
              f"{'PICK' if step.get('pick') else ''} |")


def macs_of_pick(stage: dict) -> float:
    """A shootout stage's MACs: its picked candidate's (shootout.json beside the artifact)."""
    listed = Path(stage["artifact"]).parent / "shootout.json"
    rows = json.loads(listed.read_text()) if listed.exists() else []
    return next((r["metrics"].get("macs", 0) for r in rows if r.get("pick")), 0)


def print_moonshot(summary: dict, returncode: int) -> None:
    """Each stage's end-of-build interleaved p50 and its speed-up over the dense pick."""
    stages = {s["name"]: s for s in summary["stages"]}
    dense = stages["dense"]["metrics"]["latency/interleaved_ms"]
    print(f"\n### moonshot: {cpu_model()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
          f"{summary.get('interleaved', {}).get('rounds')} interleaved rounds (end of build), build exit {returncode}")
    print("| stage | picked | MACs M | p50 ms (interleaved) | vs dense pick | ran as |\n|---|---|---|---|---|---|")
    for name in ("dense", "prune", "pruned"):
        m = stages[name]["metrics"]
        pick = next((n.split("pick: ", 1)[1].split(" ")[0] for n in summary.get("notes", [])
                     if n.startswith(f"{name}: pick: ")), "")
        macs = m.get("macs") or macs_of_pick(stages[name])
        print(f"| {name} | {pick} | {macs / 1e6:.0f} | {m['latency/interleaved_ms']:.3f} | "
              f"x{dense / m['latency/interleaved_ms']:.2f} | {m.get('runtime/precision', '')} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="cifar,mobilenet_v2_224")
    ap.add_argument("--limit", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--macs-target", type=float, default=MACS_TARGET, help="moonshot: fraction of MACs kept")
    args = ap.parse_args()
    globals()["MACS_TARGET"] = args.macs_target
    if not DATA.exists():
        raise SystemExit(f"no {DATA}")
    work = ROOT / "outputs" / "bench-runtimes"  # its stage cache: a rerun retrains nothing
    work.mkdir(parents=True, exist_ok=True)
    for case in args.cases.split(","):
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            run_case(case, args, work, Path(tmp))


if __name__ == "__main__":
    main()
