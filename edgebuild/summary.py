"""Build summaries: summary.json (machine-readable), summary.md and a rich table for humans; and the
environment every build records as provenance (CPU, threads, library versions)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

# distributions whose versions change results; recorded on every build (read from metadata, not imported)
LIBRARIES = ("torch", "torchvision", "openvino", "nncf", "onnxruntime", "pytorch-lightning", "torch-pruning",
             "mlflow", "hydra-core", "numpy")

COLUMNS = [  # (metric, header, format)
    ("acc/top1", "top-1", "{:.2%}"),
    ("acc/drop", "drop pp", "{:+.2f}"),
    ("map/50", "mAP@.5", "{:.3f}"),
    ("map/50_95", "mAP", "{:.3f}"),
    ("macs", "MACs", "{:,.0f}"),
    ("params", "params", "{:,.0f}"),
    ("size/bytes", "size B", "{:,.0f}"),
    ("size/zip_bytes", "zip B", "{:,.0f}"),
    ("latency/p50_ms", "p50 ms", "{:.3f}"),
    ("latency/p90_ms", "p90 ms", "{:.3f}"),
    ("latency/interleaved_ms", "interleaved ms", "{:.3f}"),  # all stages timed together at the end
    ("latency/speedup", "speed-up", "{:.2f}x"),
    ("throughput/fps", "fps", "{:,.0f}"),
    ("memory/flash_bytes", "flash B", "{:,.0f}"),  # target=mcu estimates
    ("memory/peak_ram_bytes", "RAM B", "{:,.0f}"),
    ("runtime/precision", "ran in", "{}"),
]


def start(recipe: str, cfg: Any, target: Any, run_dir: Path, tags: dict[str, Any]) -> dict[str, Any]:
    """A build's summary before any stage ran; stages append rows (`stage_row`)."""
    return {"recipe": recipe, "description": cfg.description, "target": cfg.target.name,
            "target_info": target.describe(), "run_dir": str(run_dir), "stages": [], "notes": [],
            **{k: v for k, v in tags.items() if k.startswith("git")},
            "provenance": {k: v for k, v in tags.items() if k != "status"}}


def stage_row(name: str, stage: Any, source: str, entry: Any, deployable: Any, seconds: dict[str, float],
              metrics: dict[str, Any]) -> dict[str, Any]:
    """`seconds` is the stage's own work (training, quantizing; ~0 on a cache hit), `measure_seconds` the
    measurement of its deployable, `total_seconds` both with the MLflow recording."""
    return {"name": name, "kind": stage.kind, "input": source, "cache_hit": entry.hit, "seconds": seconds["stage"],
            "measure_seconds": seconds["measure"], "total_seconds": seconds["total"],
            "artifact": str(entry.path / entry.record["artifact"]["root"]), "deployable": str(deployable.root),
            "cache_key": entry.key, "metrics": metrics}


def pick(stage: str, steps: list[dict[str, Any]]) -> dict[str, Any]:
    """{"pick": ...} when a stage chose among candidates (a step marked "pick", e.g. a runtime shootout):
    the chosen step and the candidates, each with why it was or was not chosen; else {}."""
    chosen = next((s for s in steps if s.get("pick")), None)
    if chosen is None:
        return {}
    return {"pick": {"stage": stage, "name": chosen["name"], **chosen.get("params", {}),
                     "metrics": chosen.get("metrics", {}), "candidates": steps}}


def candidate_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    steps = summary["pick"]["candidates"]
    keys = list(dict.fromkeys(k for s in steps for k in s.get("params", {})))
    cols = [c for c in COLUMNS if any(c[0] in s["metrics"] for s in steps)
            and c[0] not in ("macs", "params", "latency/p50_ms", "latency/p90_ms", "throughput/fps")]
    header = ["candidate", *keys, *[c[1] for c in cols], "load ms", "picked", "why"]
    rows = [[s["name"], *[str(s.get("params", {}).get(k, "")) for k in keys],
             *[format_value(s["metrics"].get(c[0]), c[2]) for c in cols],
             format_value(s["metrics"].get("latency/load_ms"), "{:.1f}"), "PICK" if s.get("pick") else "",
             s.get("why", "")] for s in steps]
    return header, rows


def format_value(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def table_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    stages = summary["stages"]
    cols = [c for c in COLUMNS if any(c[0] in s["metrics"] for s in stages)]
    header = ["stage", "kind", "cached", "s", "measure s", *[c[1] for c in cols]]
    rows = [[s["name"], s["kind"], "yes" if s["cache_hit"] else "no", f"{s['seconds']:.1f}",
             f"{s.get('measure_seconds', 0.0):.1f}",
             *[format_value(s["metrics"].get(c[0]), c[2]) for c in cols]] for s in stages]
    return header, rows


def budget_rows(budget: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["limit", "from", "metric", "value", "limit value", "ok"]
    rows = [[c["budget"], c["source"], c["metric"], format_value(c["value"], "{:.4g}"), f"{c['op']} {c['limit']:.4g}",
             "ok" if c["ok"] else "VIOLATED" + (f": {c['detail']}" if c.get("detail") else "")]
            for c in budget["checks"]]
    return header, rows


STREAM_COLUMNS = [  # (header, metric, format): the stream's numbers (eval.stream.enabled), summary and report
    ("offered FPS", "stream/offered_fps", "{:.1f}"), ("processed FPS", "stream/fps", "{:.1f}"),
    ("dropped", "stream/dropped_frames", "{:.0f}"), ("requests", "stream/requests", "{:.0f}"),
    ("e2e p50 ms", "stream/e2e_p50_ms", "{:.1f}"), ("e2e p90 ms", "stream/e2e_p90_ms", "{:.1f}"),
    ("e2e p99 ms", "stream/e2e_p99_ms", "{:.1f}"), ("reused", "stream/reuse_fraction", "{:.0%}"),
    ("mAP@[.5:.95]", "stream/map_50_95", "{:.3f}"), ("mJ/inference", "energy/mj_per_inference", "{:.2f}"),
    ("battery h", "battery/hours", "{:.1f}"), ("energy from", "energy/source", "{}"),
]


def stream_rows(items: list[tuple[str, dict[str, Any]]]) -> tuple[list[str], list[list[str]]] | None:
    """One row per (name, metrics) that streamed; None when none did. Energy: `energy from` rapl (measured
    here) or model (an estimate from the target's stated powers)."""
    items = [(n, m) for n, m in items if "stream/fps" in m]
    if not items:
        return None
    cols = [c for c in STREAM_COLUMNS if any(c[1] in m for _, m in items)]
    return ["", *[c[0] for c in cols]], [[n, *[format_value(m.get(c[1]), c[2]) for c in cols]] for n, m in items]


def markdown(summary: dict[str, Any]) -> str:
    def md(header: list[str], rows: list[list[str]]) -> str:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])

    out = [f"# edgebuild: {summary['recipe']}", "", f"target: {summary['target']}", "", md(*table_rows(summary)), ""]
    if summary.get("data"):
        out += ["## Data", "", md(["split", "from"], [[k, v] for k, v in summary["data"].items()]), ""]
    if summary["budget"]["checks"]:
        verdict = "met" if summary["budget"]["ok"] else "VIOLATED"
        out += [f"## Budget: {verdict}", "", md(*budget_rows(summary["budget"])), ""]
    streamed = stream_rows([(summary["stages"][-1]["name"], summary["stages"][-1]["metrics"])]) \
        if summary.get("stages") else None
    if streamed:
        out += ["## Stream (final deployable; energy: estimates unless `energy from` is rapl)", "", md(*streamed), ""]
    if summary.get("pick"):
        out += [f"## Candidates ({summary['pick']['stage']}): pick {summary['pick']['name']}", "",
                md(*candidate_rows(summary)), ""]
    profiled = final_profile(summary)
    if profiled:
        out += [f"## Profile of the deployable ({summary['stages'][-1]['name']})", "", md(*profiled), ""]
    for note in summary.get("notes", []):
        out.append(f"- {note}")
    return "\n".join(out) + "\n"


def final_profile(summary: dict[str, Any], top: int = 10) -> tuple[list[str], list[list[str]]] | None:
    """The final stage's profile table, when the build profiled (eval.profile.enabled=true)."""
    if not summary.get("stages"):
        return None
    path = Path(summary.get("run_dir", ".")) / "profile" / f"{summary['stages'][-1]['name']}.json"
    if not path.exists():
        return None
    from edgebuild import profile

    return profile.table(profile.load(path), top)


def training_lines(summary: dict[str, Any]) -> list[str]:
    """Per training stage: the precision it trained in, its epochs and throughput (what the table leaves out)."""
    lines = []
    for st in summary["stages"]:
        m = st["metrics"]
        for key, precision in m.items():
            fit = key[: -len("/precision")]
            if not key.endswith("/precision") or fit == "runtime" or f"{fit}/epochs" not in m:
                continue
            prefix = "" if fit in ("train", "fit") else f"{fit}/"
            epoch_s, ips = m.get(f"{prefix}time/epoch_s") or [], m.get(f"{prefix}throughput/train_images_per_s") or []
            speed = f", median {sorted(epoch_s)[len(epoch_s) // 2]:.1f} s/epoch, " \
                    f"{sorted(ips)[len(ips) // 2]:.0f} img/s" \
                if epoch_s and ips else ""
            what = st["name"] if fit == st["name"] else f"{st['name']} ({fit})"
            lines.append(f"trained {what}: {precision}, {m[f'{fit}/epochs']:.0f} epochs{speed}")
    return lines


def print_summary(summary: dict[str, Any], path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # logs and pipes: rich would squeeze the table into 80 columns
        console.width = 240
    table = Table(title=f"edgebuild · {summary['recipe']} · {summary['target']}")
    header, rows = table_rows(summary)
    for h in header:
        table.add_column(h, justify="left" if h in ("stage", "kind", "ran in") else "right")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    if summary["budget"]["checks"]:
        bt = Table(title="budget " + ("met" if summary["budget"]["ok"] else "VIOLATED"),
                   style="green" if summary["budget"]["ok"] else "red")
        header, rows = budget_rows(summary["budget"])
        for h in header:
            bt.add_column(h)
        for r in rows:
            bt.add_row(*r, style=None if r[-1] == "ok" else "bold red")
        console.print(bt)
    streamed = stream_rows([(summary["stages"][-1]["name"], summary["stages"][-1]["metrics"])]) \
        if summary.get("stages") else None
    if streamed:
        st = Table(title="stream · final deployable (energy: estimate unless from rapl)")
        for h in streamed[0]:
            st.add_column(h, justify="right")
        for r in streamed[1]:
            st.add_row(*r)
        console.print(st)
    if summary.get("pick"):
        ct = Table(title=f"candidates · {summary['pick']['stage']} · pick {summary['pick']['name']}")
        header, rows = candidate_rows(summary)
        for h in header:
            ct.add_column(h)
        for r in rows:
            ct.add_row(*r, style="bold green" if r[-2] else None)
        console.print(ct)
    profiled = final_profile(summary, top=5)
    if profiled:
        pt = Table(title=f"profile · {summary['stages'][-1]['name']} (slowest layers; per-image preprocessing)")
        for h in profiled[0]:
            pt.add_column(h)
        for r in profiled[1]:
            pt.add_row(*r)
        console.print(pt)
    for line in training_lines(summary):
        console.print(line)
    for split, origin in summary.get("data", {}).items():
        console.print(f"data {split}: {origin}")
    if summary.get("data_seconds", 0) >= 0.1:
        console.print(f"data loaded in {summary['data_seconds']:.1f} s "
                      "(decoded once per cache.dir; not in stage seconds)")
    if summary.get("import_seconds", 0) >= 0.1:
        console.print(f"Lightning imported in {summary['import_seconds']:.1f} s "
                      "(once per process; not in stage seconds)")
    for note in summary.get("notes", []):
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(f"summary: {path}")


def write(summary: dict[str, Any], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "summary.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    (folder / "summary.md").write_text(markdown(summary))
    return path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, str]:
    """Where a build ran and with what: tags `env.*` and `version.*` on its MLflow parent run."""
    from importlib.metadata import PackageNotFoundError, version

    env = {"env.cpu": cpu_model(), "env.cpu_count": str(os.cpu_count()), "env.python": platform.python_version(),
           "env.platform": platform.platform()}
    for lib in LIBRARIES:
        try:
            env[f"version.{lib}"] = version(lib)
        except PackageNotFoundError:
            env[f"version.{lib}"] = "absent"
    return env
