"""`python -m edgebuild.report`: recorded builds (MLflow) -> a self-contained report and a paper table.

Select builds by experiment, sweep id or run ids (default: the latest build, with its whole sweep
if it was part of one). Writes into --out: report.html (images embedded), report.md (+ PNGs beside
it), paper.md and paper.tex (booktabs). Every number comes from the recorded runs: regenerate the
paper table instead of typing it. Reading MLflow goes through edgebuild.tracking.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import sys
import tempfile
from pathlib import Path
from typing import Any

from edgebuild.errors import EdgebuildError
from edgebuild.summary import format_value, stream_rows
from edgebuild.sweep import pareto_front, parse_objectives

# (metric, header, format, paper header, LaTeX header, scale, decimals) — the paper columns in a paper's units
COLUMNS = [
    ("acc/top1", "top-1", "{:.2%}", "Top-1 (%)", r"Top-1 (\%)", 100.0, 2),
    ("acc/drop", "drop pp", "{:+.2f}", "Δ top-1 (pp)", r"$\Delta$ (pp)", 1.0, 2),
    ("map/50_95", "mAP", "{:.3f}", "mAP", "mAP", 1.0, 3),
    ("macs", "MACs", "{:,.0f}", "MMACs", "MMACs", 1e-6, 2),
    ("params", "params", "{:,.0f}", "Params (M)", "Params (M)", 1e-6, 3),
    ("size/bytes", "size B", "{:,.0f}", "Size (KB)", "Size (KB)", 1e-3, 1),
    ("memory/flash_bytes", "flash B", "{:,.0f}", "Flash (KB)", "Flash (KB)", 1e-3, 1),
    ("memory/peak_ram_bytes", "RAM B", "{:,.0f}", "RAM (KB)", "RAM (KB)", 1e-3, 1),
    ("latency/p50_ms", "p50 ms", "{:.3f}", "p50 (ms)", "p50 (ms)", 1.0, 3),
    ("latency/estimate_ms", "est. ms", "{:.3f}", "est. (ms)", "est. (ms)", 1.0, 3),
]
DELTAS = [("latency/p50_ms", "latency"), ("size/bytes", "size"), ("acc/top1", "accuracy")]
ENV_TAGS = ("git_sha", "git_dirty", "seed", "data_fingerprint", "target", "edgebuild_version")


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def latex_table(header: list[str], rows: list[list[str]], caption: str) -> str:
    def esc(s: str) -> str:  # headers arrive in LaTeX already; names and captions need escaping
        return s if s.startswith("$") or "\\%" in s else s.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")

    return "\n".join([r"\begin{table}[t]", r"\centering", rf"\caption{{{esc(caption)}}}",
                      r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
                      " & ".join(esc(h) for h in header) + r" \\", r"\midrule",
                      *(" & ".join(esc(str(c)) for c in r) + r" \\" for r in rows),
                      r"\bottomrule", r"\end{tabular}", r"\end{table}"]) + "\n"


class Report:
    """Tables and figures over a list of builds as returned by tracking.read_builds."""

    def __init__(self, builds: list[dict[str, Any]], title: str, objectives: list[tuple[str, str]],
                 uri: str | None = None, top: int = 10):
        self.builds, self.title, self.objectives, self.uri, self.top = builds, title, objectives, uri, top
        self.figures: dict[str, bytes] = {}

    # ------------------------------------------------------------------------------ numbers
    @staticmethod
    def final(build: dict[str, Any]) -> dict[str, Any]:
        return build["stages"][-1]["metrics"] if build["stages"] else {}

    def varying_params(self) -> list[str]:
        """Config keys whose values differ between the builds: what the sweep changed."""
        keys = sorted({k for b in self.builds for k in b["params"]})
        return [k for k in keys if len({b["params"].get(k) for b in self.builds}) > 1]

    def label(self, build: dict[str, Any]) -> str:
        varying = self.varying_params()
        if varying:
            return ", ".join(f"{k.split('.', 1)[-1] if k.startswith('stages.') else k}={build['params'].get(k)}"
                             for k in varying)
        return f"{build['name']} {build['run_id'][:8]}"

    def front(self) -> list[int]:
        metrics = [m for m, _ in self.objectives]
        usable = [i for i, b in enumerate(self.builds) if all(m in self.final(b) for m in metrics)]
        points = [[self.final(self.builds[i])[m] for m in metrics] for i in usable]
        return [usable[i] for i in pareto_front(points, [d for _, d in self.objectives])]

    def build_rows(self) -> tuple[list[str], list[list[str]]]:
        cols = [c for c in COLUMNS if any(c[0] in self.final(b) for b in self.builds)]
        front = set(self.front()) if len(self.builds) > 1 else set()
        header = ["build", "run", "status", "budget", *[c[1] for c in cols], "time s", "cached stages", "Pareto"]
        rows = []
        for i, b in enumerate(self.builds):
            stages = b["stages"]
            cached = sum(s["tags"].get("cache_hit") == "true" for s in stages)
            rows.append([self.label(b), b["run_id"][:8], b["tags"].get("status", b["status"].lower()),
                         {"1.0": "met", "0.0": "VIOLATED"}.get(str(b["metrics"].get("budget/ok")), "-"),
                         *[format_value(self.final(b).get(c[0]), c[2]) for c in cols],
                         format_value(b["metrics"].get("build/seconds"), "{:.1f}"), f"{cached}/{len(stages)}",
                         "yes" if i in front else ""])
        return header, rows

    def front_rows(self) -> tuple[list[str], list[list[str]]]:
        header = ["build", "run", *[f"{m} ({d})" for m, d in self.objectives]]
        rows = [[self.label(self.builds[i]), self.builds[i]["run_id"][:8],
                 *[format_value(self.final(self.builds[i]).get(m), "{:.4g}") for m, _ in self.objectives]]
                for i in sorted(self.front(), key=lambda i: self.final(self.builds[i]).get(self.objectives[0][0], 0))]
        return header, rows

    def front_table(self) -> Any:
        from rich.table import Table

        header, rows = self.front_rows()
        table = Table(title=f"Pareto front · {self.title}")
        for h in header:
            table.add_column(h)
        for r in rows:
            table.add_row(*r)
        return table

    def stage_rows(self, build: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
        """Per stage: what it measured, what it cost (wall time) and what it bought vs its input."""
        stages = build["stages"]
        cols = [c for c in COLUMNS if any(c[0] in s["metrics"] for s in stages)]
        header = ["stage", "kind", "cached", "time s", *[c[1] for c in cols], "Δ latency", "Δ size", "Δ acc pp"]
        by_name = {s["name"]: s for s in stages}
        rows = []
        for i, s in enumerate(stages):
            m = s["metrics"]
            source = by_name.get(s["params"].get("stage.input", ""), stages[i - 1] if i else None)
            prev = source["metrics"] if source is not None and source is not s else {}
            deltas = []
            for metric, _ in DELTAS:
                if metric in m and metric in prev and prev[metric]:
                    deltas.append(f"{(m[metric] - prev[metric]) * 100:+.2f}" if metric == "acc/top1"
                                  else f"{(m[metric] / prev[metric] - 1):+.0%}")
                else:
                    deltas.append("-")
            rows.append([s["name"], s["tags"].get("kind", "?"), "yes" if s["tags"].get("cache_hit") == "true" else "no",
                         format_value(m.get("stage/seconds"), "{:.1f}"),
                         *[format_value(m.get(c[0]), c[2]) for c in cols], *deltas])
        return header, rows

    def environment_rows(self) -> tuple[list[str], list[list[str]]]:
        keys = sorted({k for b in self.builds for k in b["tags"] if k.startswith(("env.", "version."))})
        rows = []
        for k in [*ENV_TAGS, *keys]:
            values = sorted({str(b["tags"].get(k, "-")) for b in self.builds})
            if values != ["-"]:
                rows.append([k, ", ".join(values)])
        return ["", "value (all builds)"], rows

    def paper_rows(self, latex: bool = False) -> tuple[list[str], list[list[str]], str]:
        """One row per build (a sweep) or per stage (one build); units a paper uses."""
        if len(self.builds) > 1:
            items = [(self.label(b), self.final(b)) for b in self.builds]
            caption = f"{self.title}: final stage of each build"
        else:
            items = [(s["name"], s["metrics"]) for s in self.builds[0]["stages"]]
            caption = f"{self.title}: every stage of build {self.builds[0]['run_id'][:8]}"
        cols = [c for c in COLUMNS if any(c[0] in m for _, m in items)]
        rows = [[name, *["-" if m.get(c[0]) is None else f"{m[c[0]] * c[5]:.{c[6]}f}" for c in cols]]
                for name, m in items]
        return ["Model" if len(self.builds) > 1 else "Stage", *[c[4 if latex else 3] for c in cols]], rows, caption

    def profile_rows(self, build: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
        """The final stage's per-layer profile, when the build recorded one (eval.profile.enabled)."""
        if not self.uri:
            return None
        from edgebuild import profile, tracking

        with tempfile.TemporaryDirectory() as tmp:
            path = tracking.download(self.uri, build["stages"][-1]["run_id"], "profile", Path(tmp))
            files = sorted(path.rglob("*.json")) if path else []
            return profile.table(profile.load(files[0]), self.top) if files else None

    def sensitivity_rows(self, build: dict[str, Any]) -> list[tuple[str, tuple[list[str], list[list[str]]]]]:
        """Per quantize stage that ran `sensitivity: true` (or float_layers=auto): its ranked layer table
        (the stage file sensitivity.json, an MLflow artifact of the stage run), worst SQNR first."""
        if not self.uri:
            return []
        import json

        from edgebuild import tracking

        out = []
        for stage in build["stages"]:
            m = stage["metrics"]
            if "quantize/sensitivity_layers" not in m:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                path = tracking.download(self.uri, stage["run_id"], "sensitivity", Path(tmp))
                files = sorted(path.rglob("*.json")) if path else []
                rows = json.loads(files[0].read_text()) if files else []
            if not rows:
                continue
            header = ["rank", "layer (as ignored_names takes it)", "type", "SQNR dB", "MSE", "metric, layer in float",
                      "drop vs float"]
            table = [[str(r.get("rank", i + 1)), r["layer"], r.get("type", ""), format_value(r.get("sqnr_db"), "{:.2f}"),
                      format_value(r.get("mse"), "{:.3g}"), format_value(r.get("metric_float_kept"), "{:.4f}"),
                      format_value(r.get("metric_drop"), "{:+.4f}")] for i, r in enumerate(rows[: max(self.top, 1)])]
            title = (f"INT8 sensitivity of {stage['name']} (run {stage['run_id'][:8]}): float "
                     f"{format_value(m.get('quantize/val_float'), '{:.4f}')}, INT8 "
                     f"{format_value(m.get('quantize/val_int8'), '{:.4f}')} on the validation split; cost "
                     f"{format_value(m.get('quantize/sensitivity_seconds'), '{:.1f}')} s, "
                     f"{format_value(m.get('quantize/sensitivity_evaluations'), '{:.0f}')} evaluations")
            out.append((title, (header, table)))
        return out

    # ------------------------------------------------------------------------------ figures
    def make_figures(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        def png(fig: Any) -> bytes:
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
            plt.close(fig)
            return buf.getvalue()

        if len(self.builds) > 1 and len(self.objectives) >= 2:
            (mx, dx), (my, dy) = self.objectives[:2]
            pts = [(i, self.final(b).get(mx), self.final(b).get(my)) for i, b in enumerate(self.builds)]
            pts = [p for p in pts if p[1] is not None and p[2] is not None]
            front = sorted((p for p in pts if p[0] in set(self.front())), key=lambda p: p[1])
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.scatter([p[1] for p in pts], [p[2] for p in pts], c="#999", label="builds")
            ax.plot([p[1] for p in front], [p[2] for p in front], "o-", c="#d62728", label="Pareto front")
            for i, x, y in front:
                ax.annotate(self.label(self.builds[i])[:40], (x, y), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
            ax.set_xlabel(f"{mx} ({dx})")
            ax.set_ylabel(f"{my} ({dy})")
            ax.legend()
            ax.set_title(f"Pareto front: {self.title}")
            self.figures["pareto.png"] = png(fig)
        front = self.front() if len(self.builds) > 1 else []
        build = self.builds[front[0]] if front else self.builds[-1]  # the chart shows one build's stages
        header, rows = self.stage_rows(build)
        if len(rows) > 1:
            fig, axes = plt.subplots(1, 3, figsize=(10, 3))
            for ax, (col, title) in zip(axes, [("Δ latency", "latency change"), ("Δ size", "size change"),
                                                ("Δ acc pp", "accuracy change (pp)")], strict=True):
                j = header.index(col)
                vals = [float(r[j].rstrip("%")) if r[j] != "-" else 0.0 for r in rows]
                ax.bar([r[0] for r in rows], vals, color=["#2ca02c" if (v <= 0) != (col == "Δ acc pp") else "#d62728"
                                                         for v in vals])
                ax.axhline(0, color="black", lw=0.8)
                ax.set_title(title + (" %" if col != "Δ acc pp" else ""), fontsize=9)
                ax.tick_params(axis="x", rotation=45, labelsize=7)
            fig.suptitle(f"what each stage changed vs its input ({self.label(build)[:60]})", fontsize=9)
            self.figures["stages.png"] = png(fig)

    # ------------------------------------------------------------------------------ writing
    def sections(self) -> list[tuple[str, Any]]:
        """(heading, content) where content is a table (header, rows), a figure name or text."""
        out: list[tuple[str, Any]] = [("Builds", self.build_rows())]
        if "pareto.png" in self.figures:
            out += [("Pareto front", "pareto.png"), ("", self.front_rows())]
        detailed = self.builds if len(self.builds) <= 4 else [self.builds[i] for i in self.front()[:4]]
        for b in detailed:
            out.append((f"Stages of {self.label(b)} (run {b['run_id'][:8]}): cost and gain", self.stage_rows(b)))
            prof = self.profile_rows(b)
            if prof:
                out.append((f"Slowest layers on the runtime, final stage of {b['run_id'][:8]}", prof))
            out += self.sensitivity_rows(b)
        streamed = stream_rows([(self.label(b), self.final(b)) for b in self.builds])
        if streamed:
            out.append(("Stream: the final deployable in a real-time pipeline (energy: estimates unless from rapl)",
                        streamed))
        if "stages.png" in self.figures:
            out.append(("What each stage changed", "stages.png"))
        out.append(("Environment", self.environment_rows()))
        header, rows, _ = self.paper_rows()
        out.append(("Paper table", (header, rows)))
        return out

    def markdown(self) -> str:
        lines = [f"# edgebuild report: {self.title}", "",
                 f"{len(self.builds)} build(s); objectives: " + ", ".join(f"{m} ({d})" for m, d in self.objectives), ""]
        for heading, content in self.sections():
            if heading:
                lines += [f"## {heading}", ""]
            lines += [f"![{content}]({content})" if isinstance(content, str) else md_table(*content), ""]
        return "\n".join(lines)

    def html(self) -> str:
        parts = [f"<h1>edgebuild report: {html.escape(self.title)}</h1>",
                 f"<p>{len(self.builds)} build(s); objectives: "
                 + html.escape(", ".join(f"{m} ({d})" for m, d in self.objectives)) + "</p>"]
        for heading, content in self.sections():
            if heading:
                parts.append(f"<h2>{html.escape(heading)}</h2>")
            if isinstance(content, str):
                data = base64.b64encode(self.figures[content]).decode()
                parts.append(f'<img alt="{content}" src="data:image/png;base64,{data}">')
            else:
                parts.append(html_table(*content))
        parts.append(f"<h3>LaTeX (booktabs)</h3><pre>{html.escape(latex_table(*self.paper_rows(latex=True)))}</pre>")
        style = ("body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;"
                 "margin:8px 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right;font-size:13px}"
                 "td:first-child{text-align:left}img{max-width:100%}")
        return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>" \
               f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"

    def write(self, folder: Path) -> dict[str, Path]:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.make_figures()
        paths = {}
        for name, data in self.figures.items():
            (folder / name).write_bytes(data)
            paths[name.replace(".", "_")] = folder / name
        header, rows, caption = self.paper_rows()
        texts = {"report.md": self.markdown(), "report.html": self.html(),
                 "paper.md": f"{caption}\n\n{md_table(header, rows)}\n",
                 "paper.tex": latex_table(*self.paper_rows(latex=True))}
        for name, text in texts.items():
            (folder / name).write_text(text)
            paths[name.replace(".", "_")] = folder / name
        return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edgebuild.report",
        description="Report on recorded edgebuild builds (MLflow): per-stage table with cost and gain, "
                    "bar chart, Pareto plot for sweeps, per-layer profile, environment, and a paper table in "
                    "Markdown and LaTeX (booktabs). Default: the latest build (its whole sweep if it had one).")
    parser.add_argument("--uri", default="sqlite:///outputs/mlflow.db", help="MLflow tracking URI")
    parser.add_argument("--experiment", action="append", help="experiment name, e.g. edgebuild/default (repeatable)")
    parser.add_argument("--sweep", help="sweep id (tag sweep_id, printed by every multirun job)")
    parser.add_argument("--run", action="append", dest="runs", help="parent run id (repeatable)")
    parser.add_argument("--objectives", nargs="+", default=["acc/top1:max", "latency/p50_ms:min"],
                        help="METRIC:max|min for the Pareto front (default: acc/top1:max latency/p50_ms:min)")
    parser.add_argument("--top", type=int, default=10, help="layers listed in the profile table")
    parser.add_argument("--out", default=None, help="output folder (default: outputs/reports/<selection>)")
    args = parser.parse_args(argv)
    from edgebuild import tracking

    try:
        objectives = parse_objectives(args.objectives)
        if not (args.experiment or args.sweep or args.runs):  # the latest build, with its sweep
            latest = tracking.read_builds(args.uri)[-1]
            args.sweep = latest["tags"].get("sweep_id")
            args.runs = None if args.sweep else [latest["run_id"]]
        builds = tracking.read_builds(args.uri, args.experiment, args.sweep, args.runs)
        title = (f"sweep {args.sweep}" if args.sweep else ", ".join(args.experiment) if args.experiment
                 else f"{builds[0]['name']} {builds[0]['run_id'][:8]}" if len(builds) == 1 else f"{len(builds)} runs")
        out = Path(args.out or Path("outputs/reports") / "".join(c if c.isalnum() else "-" for c in title))
        paths = Report(builds, title, objectives, uri=args.uri, top=args.top).write(out)
    except EdgebuildError as e:
        print(f"edgebuild.report: error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"report: {paths['report_html']}\n        {paths['report_md']}\npaper table: {paths['paper_tex']}, "
          f"{paths['paper_md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
