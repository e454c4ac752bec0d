"""The command line as a user meets it: exit codes, clean messages, Ctrl-C, --cfg, multirun."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from tests.conftest import FAST, ROOT, run_cli

QUICK = ["tracking=none", "eval=fast", *FAST]


def summaries(cwd):
    return sorted(Path(cwd).glob("outputs/**/summary.json"), key=lambda p: p.stat().st_mtime)


@pytest.mark.parametrize("args,rc,message", [
    pytest.param(["recipe=zz_no_such_recipe"], 2, "Could not find 'recipe/zz_no_such_recipe'", id="unknown-recipe"),
    pytest.param(["target=tpu"], 2, "Could not find 'target/tpu'", id="unknown-target"),
    pytest.param(["no_such_key=1"], 2, "Could not override 'no_such_key'", id="unknown-key"),
    pytest.param(["stages.train.epochs=many"], 2, "could not be converted to Integer", id="wrong-type"),
    pytest.param(["stages.train.kind=zz_no_such_stage"], 2, "unknown stage kind 'zz_no_such_stage'",
                 id="unknown-stage"),
    pytest.param(["stages.train.input=export"], 2, "input 'export' comes later", id="input-later"),
    pytest.param(["data=imagefolder", "data.root=/nonexistent/folder"], 2, "does not exist", id="missing-data"),
    pytest.param(["model.weights=/nonexistent/w.pt"], 2, "weights file /nonexistent/w.pt", id="missing-weights"),
    pytest.param(["model.name=resnet999"], 2, "unknown model 'resnet999'", id="unknown-model"),
])
def test_bad_input_gives_one_clear_message(tmp_path, args, rc, message):
    quick = [a for a in QUICK if not (a.startswith("data=") and any(x.startswith("data=") for x in args))]
    result = run_cli([*quick, *args], tmp_path)
    assert result.returncode == rc, result.stderr[-2000:]
    out = result.stdout + result.stderr
    assert message in out
    assert "Traceback" not in out
    assert not list(tmp_path.glob("outputs/cache/*/*/result.json")), "no stage may have been built"


def test_failure_inside_the_build_marks_runs_failed_and_leaves_no_half_entry(tmp_path):
    root = tmp_path / "ds"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((8, 8, 3), 100 * (c == "b"), np.uint8)).save(root / c / f"{i}.png")
    (root / "b" / "corrupt.png").write_bytes(b"\x89PNG broken")
    result = run_cli(["data=imagefolder", f"data.root={root}", "eval=fast", "stages.train.epochs=1"], tmp_path)
    assert result.returncode == 2
    assert "cannot read image" in result.stderr and "corrupt.png" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) and set(runs["status"]) <= {"FAILED"}
    assert not list(tmp_path.glob("outputs/cache/*/.tmp-*"))


def test_budget_violation_exits_1_with_the_table(tmp_path):
    result = run_cli([*QUICK, "budget.max_size_bytes=1"], tmp_path)
    assert result.returncode == 1
    assert "VIOLATED" in result.stdout and "max_size_bytes" in result.stdout
    assert "budget violated" in result.stderr
    assert json.loads(summaries(tmp_path)[-1].read_text())["budget"]["ok"] is False


def test_cfg_job_prints_the_resolved_config(tmp_path):
    result = run_cli(["--cfg", "job", "stages.train.epochs=3"], tmp_path)
    assert result.returncode == 0
    assert "epochs: 3" in result.stdout and "kind: export" in result.stdout and "name: digits" in result.stdout


def test_multirun_builds_each_job(tmp_path):
    result = run_cli(["-m", *QUICK, "stages.train.epochs=1,2"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    found = [json.loads(p.read_text()) for p in Path(tmp_path).glob("outputs/multirun/**/summary.json")]
    assert len(found) == 2


def test_ctrl_c_marks_runs_killed_and_finished_stages_resume(tmp_path):
    args = ["eval=fast", *FAST, "+stages.long={kind: train, epochs: 500, input: train}"]
    log = (tmp_path / "log.txt").open("w")
    # the default SIGINT action even when the suite itself runs in the background (`cmd &` without job
    # control ignores SIGINT, children inherit that, and the build would rightly go on)
    proc = subprocess.Popen([sys.executable, "-m", "edgebuild", *args], cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while "stage long (train): running" not in (tmp_path / "log.txt").read_text():
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
        time.sleep(0.5)
    time.sleep(3)  # inside Lightning's fit loop
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    text = (tmp_path / "log.txt").read_text()
    assert "interrupted" in text and "Traceback" not in text
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    runs = mlflow.search_runs(search_all_experiments=True)
    status = dict(zip(runs["tags.mlflow.runName"], runs["status"], strict=True))
    assert status == {"default": "KILLED", "train": "FINISHED", "export": "FINISHED", "long": "KILLED"}
    assert not list(tmp_path.glob("outputs/cache/*/.tmp-*"))
    resumed = run_cli(["eval=fast", *FAST, "+stages.long={kind: train, epochs: 1, input: train}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    hits = [s["cache_hit"] for s in json.loads(summaries(tmp_path)[-1].read_text())["stages"]]
    assert hits == [True, True, False]
