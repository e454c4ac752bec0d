import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see edgebuild/__main__.py: spinning OpenMP threads on busy cores
ROOT = Path(__file__).resolve().parent.parent

# a small, fast build: the default recipe on generated data with a narrow CNN
FAST = ["data=synthetic", "model.kwargs.width=8", "stages.train.epochs=2"]


@pytest.fixture
def fast(tmp_path):
    from edgebuild import testing

    return testing.shrink(tmp_path) + FAST


def run_cli(args, cwd, timeout=600, env=None):
    """python -m edgebuild ARGS in `cwd` (outputs land there); returns CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgebuild", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
