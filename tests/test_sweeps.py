"""Sweeps and scale-out: joblib jobs in parallel on one shared cache and one MLflow store, one sweep id,
the Pareto front on a sweep-level run; bad sweeps fail before any job; a real MLflow server; presets."""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from edgebuild import testing
from edgebuild.cache import Cache
from edgebuild.errors import EdgebuildError
from edgebuild.sweep import objective_values, pareto_front
from tests.conftest import FAST, run_cli

QUICK = ["eval=fast", *FAST, "stages.train.epochs=1", "tracking.uri=sqlite:///outputs/mlflow.db"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_optuna_trials_on_joblib_share_cache_and_store_and_record_the_pareto_front(tmp_path):
    """Multi-objective Optuna (NSGA-II) hands 2 trials at once to the joblib launcher: two processes, a
    fresh SQLite store that both create at once, and the same train stage in both (one cache key
    written concurrently). Each trial returns its objectives; the front lands on a sweep-level run."""
    result = run_cli(["-m", *QUICK, "hydra/sweeper=edgebuild_pareto", "hydra.sweeper.n_trials=2",
                      "hydra.sweeper.n_jobs=2", "stages.export.opset=choice(16,17)", "hydra/launcher=joblib"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Number of Pareto solutions" in result.stdout + result.stderr  # Optuna got float objectives back
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    runs = mlflow.search_runs(search_all_experiments=True)
    parents = runs[runs["tags.mlflow.parentRunId"].isna() & runs["tags.sweep_level"].isna()]
    assert len(parents) == 2 and set(parents["status"]) == {"FINISHED"}
    assert parents["tags.sweep_id"].nunique() == 1
    sweep = parents["tags.sweep_id"].iloc[0]
    for tag in ("tags.version.torch", "tags.version.openvino", "tags.data_fingerprint", "tags.seed", "tags.env.cpu",
                "tags.git_sha"):
        assert parents[tag].notna().all() and parents[tag].nunique() == 1, tag
    level = runs[runs["tags.sweep_level"] == "true"]
    assert list(level["tags.sweep_id"]) == [sweep] and level["metrics.sweep/jobs"].iloc[0] == 2
    files = {f.path for f in mlflow.MlflowClient().list_artifacts(level["run_id"].iloc[0])}
    assert {"pareto_png", "report_html", "paper_tex"} <= files
    assert f"sweep {sweep}: 2 builds" in result.stdout and "Pareto front" in result.stdout
    train_entries = [p for p in tmp_path.glob("outputs/cache/*/*/result.json")
                     if json.loads(p.read_text()).get("kind") == "train"]
    assert len(train_entries) == 1, "both jobs' train stage share one cache entry"
    assert not list(tmp_path.glob("outputs/cache/*/.tmp-*"))
    assert list(tmp_path.glob("outputs/multirun/*/*/report/report.html"))


def _publish(root: str, barrier: multiprocessing.Barrier, out: multiprocessing.Queue) -> None:
    def produce(folder: Path) -> dict:
        barrier.wait(timeout=60)  # both processes are inside produce: their renames race
        (folder / "weights.bin").write_bytes(os.urandom(1 << 16))
        return {"writer": os.getpid()}

    entry = Cache(Path(root)).put("ab" + "0" * 62, produce)
    out.put((entry.record["writer"], (entry.path / "weights.bin").stat().st_size))


def test_two_processes_writing_one_cache_key_leave_one_valid_entry(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_publish, args=(str(tmp_path), barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    seen = [out.get(timeout=5) for _ in procs]
    entries = list(tmp_path.glob("ab/*"))
    assert [e.name for e in entries] == ["ab" + "0" * 62], entries  # no temporary folder left behind
    winner = json.loads((entries[0] / "result.json").read_text())["writer"]
    assert [w for w, _ in seen] == [winner, winner], "the loser reads the published entry, not its own"
    assert Cache(tmp_path).get("ab" + "0" * 62).record["writer"] == winner


@pytest.mark.parametrize("bad", ["stages.train.epochz=1,2", "no_such_group=a,b",
                                 # Optuna: the first trial's config fails to compose, so no trial builds
                                 "stages.train.epochz=choice(1,2) hydra/sweeper=edgebuild_pareto "
                                 "hydra.sweeper.n_trials=2"])
def test_a_sweep_over_a_missing_key_fails_before_any_job(tmp_path, bad):
    result = run_cli(["-m", *QUICK, *bad.split(), "hydra/launcher=joblib"], tmp_path)
    assert result.returncode == 2
    assert "Could not override" in result.stderr or "Key 'epochz' not in" in result.stderr, result.stderr[-2000:]
    assert not list(tmp_path.glob("outputs/multirun/*/*/summary.json"))
    assert not list(tmp_path.glob("outputs/cache/*/*/result.json"))


def test_objectives_and_pareto_front():
    summary = {"stages": [{"metrics": {"acc/top1": 0.9, "latency/p50_ms": 2.0}}]}
    assert objective_values(summary, ["acc/top1:max", "latency/p50_ms:min"]) == [0.9, 2.0]
    with pytest.raises(EdgebuildError, match="not METRIC:max"):
        objective_values(summary, ["acc/top1:up"])
    with pytest.raises(EdgebuildError, match="was not measured"):
        objective_values(summary, ["map/50:max"])
    # (acc, latency): b dominates d (better on both); a and c trade accuracy for latency; e ties a
    points = [[0.9, 2.0], [0.8, 1.0], [0.95, 3.0], [0.7, 1.5], [0.9, 2.0]]
    assert pareto_front(points, ["max", "min"]) == [0, 1, 2, 4]


def test_build_against_a_real_mlflow_server(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "art")],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        summary = testing.build(testing.shrink(tmp_path) + [*FAST, "stages.train.epochs=1", "budget.min_acc=null",
                                                           "tracking.enabled=true", f"tracking.uri={uri}"], tmp_path)
        client = mlflow.MlflowClient(uri)
        parent = client.get_run(summary["mlflow_run_id"])
        assert parent.info.status == "FINISHED" and parent.data.tags["status"] == "ok"  # budget off
        stages = client.search_runs([parent.info.experiment_id],
                                    f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}'")
        assert sorted(r.info.run_name for r in stages) == ["export", "train"]
        assert {f.path for f in client.list_artifacts(parent.info.run_id)} >= {"summary", "deploy"}
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_an_unreachable_server_fails_at_the_start_with_exit_2(tmp_path):
    t0 = time.time()
    result = run_cli(["eval=fast", *FAST, f"tracking.uri=http://127.0.0.1:{free_port()}"], tmp_path)
    assert result.returncode == 2
    assert "cannot reach the MLflow tracking server" in result.stderr and "tracking=none" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not list(tmp_path.glob("outputs/cache/*/*/result.json")), "no stage ran"
    assert time.time() - t0 < 60, "no minutes of retries"


def test_scale_out_presets_compose():
    """Launchers past one machine are Hydra plugins: the presets compose with our config."""
    from hydra import compose, initialize_config_dir

    from edgebuild.config import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        slurm = compose("config", ["hydra/launcher=edgebuild_slurm"], return_hydra_config=True)
        ray = compose("config", ["hydra/launcher=edgebuild_ray", "hydra.launcher.ray.init.address=auto"],
                      return_hydra_config=True)
        optuna = compose("config", ["hydra/sweeper=edgebuild_pareto"], return_hydra_config=True)
        ddp = compose("config", ["trainer=ddp"])
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher") and slurm.hydra.launcher.cpus_per_task == 2
    assert ray.hydra.launcher._target_ == "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
    assert ray.hydra.launcher.ray.init.address == "auto" and ray.hydra.launcher.ray.remote.num_cpus == 2
    assert optuna.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert list(optuna.hydra.sweeper.direction) == ["maximize", "minimize"]
    assert list(optuna.sweep.objectives) == ["acc/top1:max", "latency/p50_ms:min"]
    assert ddp.trainer.strategy == "ddp" and ddp.trainer.devices == 2
