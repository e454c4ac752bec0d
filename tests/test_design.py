"""The design's load-bearing lines, as tests."""

import re
import subprocess
import sys

from tests.conftest import ROOT

PACKAGE = ROOT / "edgebuild"


def sources():
    return {p: p.read_text() for p in PACKAGE.rglob("*.py")}


def test_import_edgebuild_loads_no_heavy_library():
    code = "import sys, edgebuild, edgebuild.config, edgebuild.stage, edgebuild.pipeline; " \
           "heavy = ('torch','openvino','nncf','mlflow','onnxruntime','pytorch_lightning'); " \
           "print(' '.join(m for m in heavy if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_only_tracking_imports_mlflow():
    """tracking.py, and the pyfunc file MLflow itself loads from code (the logged model's code), which
    no edgebuild module imports: it is never loaded by a build, only by mlflow.pyfunc.load_model."""
    importers = {p.name for p, text in sources().items() if re.search(r"^\s*(import mlflow|from mlflow)", text, re.M)}
    assert importers == {"tracking.py", "pyfunc_model.py"}
    for p, text in sources().items():
        assert not re.search(r"(import|from) [.a-z_]*pyfunc_model|edgebuild\.pyfunc_model", text), p
    assert "mlflow.pyfunc" in (PACKAGE / "pyfunc_model.py").read_text()


def test_stages_never_import_tracking():
    for p in (PACKAGE / "stages").glob("*.py"):
        assert not re.search(r"(from|import) [.a-z_]*tracking", p.read_text()), p


def test_one_helper_calls_instantiate():
    pattern = r"hydra\.utils import .*instantiate|hydra\.utils\.instantiate"
    callers = {p.name for p, text in sources().items() if re.search(pattern, text)}
    assert callers == {"config.py"}


def test_every_torch_load_states_weights_only():
    for p, text in sources().items():
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=" in call, (p, call)
