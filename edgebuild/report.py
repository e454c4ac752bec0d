"""Build summaries: summary.json (machine-readable), summary.md and a rich table for humans."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
    ("throughput/fps", "fps", "{:,.0f}"),
    ("runtime/precision", "ran in", "{}"),
]


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def table_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    stages = summary["stages"]
    cols = [c for c in COLUMNS if any(c[0] in s["metrics"] for s in stages)]
    header = ["stage", "kind", "cached", "s", *[c[1] for c in cols]]
    rows = [[s["name"], s["kind"], "yes" if s["cache_hit"] else "no", f"{s['seconds']:.1f}",
             *[_fmt(s["metrics"].get(c[0]), c[2]) for c in cols]] for s in stages]
    return header, rows


def budget_rows(budget: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["limit", "from", "metric", "value", "limit value", "ok"]
    rows = [[c["budget"], c["source"], c["metric"], _fmt(c["value"], "{:.4g}"), f"{c['op']} {c['limit']:.4g}",
             "ok" if c["ok"] else "VIOLATED"] for c in budget["checks"]]
    return header, rows


def markdown(summary: dict[str, Any]) -> str:
    def md(header: list[str], rows: list[list[str]]) -> str:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])

    out = [f"# edgebuild: {summary['recipe']}", "", f"target: {summary['target']}", "", md(*table_rows(summary)), ""]
    if summary["budget"]["checks"]:
        out += ["## Budget: " + ("met" if summary["budget"]["ok"] else "VIOLATED"), "", md(*budget_rows(summary["budget"])), ""]
    for note in summary.get("notes", []):
        out.append(f"- {note}")
    return "\n".join(out) + "\n"


def print_summary(summary: dict[str, Any], path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
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
    for note in summary.get("notes", []):
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(f"summary: {path}")


def write(summary: dict[str, Any], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "summary.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    (folder / "summary.md").write_text(markdown(summary))
    return path
