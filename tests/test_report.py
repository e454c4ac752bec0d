"""python -m edgebuild.report: recorded runs -> report (HTML, Markdown), paper table (Markdown, LaTeX)."""

import subprocess
import sys

import mlflow
import pytest

from edgebuild import report, testing
from edgebuild.pipeline import build
from tests.conftest import FAST, ROOT


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Two builds of one sweep in one MLflow store (the second re-uses the first's train stage and profiles)."""
    tmp = tmp_path_factory.mktemp("recorded")
    base = testing.shrink(tmp, tracking=True) + [*FAST, "stages.train.epochs=1", "budget.min_acc=null"]
    a = build(testing.compose(base), tmp / "a", "default", tags={"sweep_id": "s1"})
    b = build(testing.compose(base + ["stages.export.opset=16", "eval.profile.enabled=true"]), tmp / "b", "default",
              tags={"sweep_id": "s1"})
    return tmp, f"sqlite:///{tmp}/mlflow.db", a, b


def test_sweep_report_has_every_section_and_recorded_numbers(recorded, tmp_path):
    tmp, uri, a, b = recorded
    assert report.main(["--uri", uri, "--sweep", "s1", "--out", str(tmp_path)]) == 0
    html = (tmp_path / "report.html").read_text()
    for section in ("Builds", "Pareto front", "cost and gain", "Slowest layers", "What each stage changed",
                    "Environment", "Paper table", "LaTeX (booktabs)"):
        assert section in html, section
    assert html.count("data:image/png;base64,") == 2  # Pareto plot and stage bar chart, embedded
    assert "export.opset=16" in html and "export.opset=17" in html  # builds named by what the sweep changed
    assert "version.openvino" in html and a["git_sha"] in html
    md = (tmp_path / "report.md").read_text()
    assert "![pareto.png](pareto.png)" in md and (tmp_path / "pareto.png").stat().st_size > 1000
    top1 = f"{b['stages'][-1]['metrics']['acc/top1'] * 100:.2f}"
    tex = (tmp_path / "paper.tex").read_text()
    assert all(rule in tex for rule in (r"\toprule", r"\midrule", r"\bottomrule")) and r"Top-1 (\%)" in tex
    assert f"export.opset=16 & {top1} &" in tex.replace(r"\_", "_")
    assert f"export.opset=16 | {top1} |" in (tmp_path / "paper.md").read_text()
    # per-stage cost and gain: the second build's train stage came from the cache
    assert "| train | train | yes |" in md and "| train | train | no |" in md


def test_one_run_gives_a_per_stage_paper_table(recorded, tmp_path):
    tmp, uri, a, _ = recorded
    assert report.main(["--uri", uri, "--run", a["mlflow_run_id"], "--out", str(tmp_path)]) == 0
    paper = (tmp_path / "paper.md").read_text()
    assert "| Stage |" in paper and "| train |" in paper and "| export |" in paper
    assert "pareto.png" not in (tmp_path / "report.md").read_text()


def test_default_is_the_latest_build_with_its_sweep(recorded, tmp_path, monkeypatch, capsys):
    tmp, uri, *_ = recorded
    monkeypatch.chdir(tmp_path)
    assert report.main(["--uri", uri]) == 0
    assert "outputs/reports/sweep-s1/report.html" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--run", "0123456789abcdef"], "no MLflow run 0123456789abcdef"),
    (["--sweep", "nope"], "no recorded builds for sweep nope"),
    (["--experiment", "edgebuild/nope"], "no MLflow experiment named edgebuild/nope"),
    (["--objectives", "acc/top1:up"], "is not METRIC:max or METRIC:min"),
])
def test_runs_that_do_not_exist_are_a_clear_error(recorded, tmp_path, capsys, args, message):
    _, uri, *_ = recorded
    assert report.main(["--uri", uri, "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "fix:" in err
    assert not (tmp_path / "report.html").exists()


def test_report_command_line_help():
    out = subprocess.run([sys.executable, "-m", "edgebuild.report", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "--sweep" in out.stdout and "booktabs" in out.stdout


def test_parent_runs_carry_provenance(recorded):
    _, uri, a, _ = recorded
    mlflow.set_tracking_uri(uri)
    tags = mlflow.MlflowClient().get_run(a["mlflow_run_id"]).data.tags
    assert tags["sweep_id"] == "s1" and tags["seed"] == "0" and len(tags["data_fingerprint"]) == 64
    assert tags["version.torch"] and tags["env.cpu"] and tags["git_sha"] == a["git_sha"]
