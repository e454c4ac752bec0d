"""The trust boundary: user folders give only runtime formats, `_target_` paths pass an allow-list
before anything is imported, and no file from a user path reaches unpickling."""

import json
import sys

import pytest

from edgebuild import testing
from edgebuild.config import ALLOWED_TARGETS_ENV, instantiate, resolve_target
from edgebuild.errors import EdgebuildError
from edgebuild.pipeline import plan
from tests.conftest import run_cli

QUICK = ["tracking=none", "eval=fast", "data=synthetic", "model.kwargs.width=8", "stages.train.epochs=1"]
SPEC = {"input_shape": [1, 1, 8, 8], "class_names": [str(i) for i in range(10)],
        "preprocess": {"mean": [0.5], "std": [0.5], "scale": 255.0}}


@pytest.fixture
def marker_module(tmp_path, monkeypatch):
    """A module on sys.path that leaves a marker file when it is imported."""
    marker = tmp_path / "IMPORTED"
    (tmp_path / "eb_marker_mod.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "import torch\n"
        "def net(num_classes=10, in_channels=1):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "eb_marker_mod", raising=False)
    return marker


def test_a_disallowed_target_is_refused_before_its_module_is_imported(marker_module, monkeypatch):
    monkeypatch.setenv(ALLOWED_TARGETS_ENV, "mypkg.models,torch.nn")
    with pytest.raises(EdgebuildError, match=r"model._target_ 'eb_marker_mod.net' is outside the allowed"):
        resolve_target("eb_marker_mod.net", "model._target_")
    nested = {"_target_": "torch.nn.Sequential", "_args_": [{"_target_": "eb_marker_mod.net"}]}
    with pytest.raises(EdgebuildError, match=r"_args_\[0\]._target_ 'eb_marker_mod.net' is outside"):
        instantiate(nested)
    with pytest.raises(EdgebuildError, match="outside the allowed _target_ prefixes"):
        plan(testing.compose(["model._target_=eb_marker_mod.net"]))
    assert not marker_module.exists()
    # prefixes match on dotted boundaries: 'eb_marker' does not allow 'eb_marker_mod'
    monkeypatch.setenv(ALLOWED_TARGETS_ENV, "eb_marker")
    with pytest.raises(EdgebuildError, match="outside"):
        resolve_target("eb_marker_mod.net")
    assert not marker_module.exists()


def test_an_allowed_target_and_edgebuilds_own_still_resolve(marker_module, monkeypatch):
    monkeypatch.setenv(ALLOWED_TARGETS_ENV, "eb_marker_mod")
    assert callable(resolve_target("eb_marker_mod.net")) and marker_module.exists()
    assert callable(resolve_target("edgebuild.models.small_cnn"))
    opt = instantiate({"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1})
    assert opt.func.__name__ == "SGD"
    monkeypatch.delenv(ALLOWED_TARGETS_ENV)
    assert callable(resolve_target("collections.OrderedDict"))  # unset: any importable path


def test_a_disallowed_target_on_the_command_line_is_exit_2_and_nothing_runs(marker_module, tmp_path):
    env = {ALLOWED_TARGETS_ENV: "mypkg", "PYTHONPATH": f"{tmp_path}:{testing.CONF_DIR.parent}"}
    r = run_cli([f"cache.dir={tmp_path}/cache", *QUICK, "model._target_=eb_marker_mod.net"], tmp_path, env=env)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stdout + r.stderr and "outside the allowed _target_ prefixes" in r.stderr
    assert not marker_module.exists() and not (tmp_path / "cache").exists()


def _folder(root, spec, files=()):
    root.mkdir(parents=True, exist_ok=True)
    for name in files:
        (root / name).write_bytes(b"x")
    (root / "model.json").write_text(spec if isinstance(spec, str) else json.dumps(spec))
    return root


@pytest.mark.parametrize("spec,files,message", [
    pytest.param({"format": "openvino", **SPEC}, [], "has no files", id="no-files-key"),
    pytest.param({"format": "openvino", "files": [], **SPEC}, [], "not a non-empty list", id="empty-files"),
    pytest.param({"format": "torch", "files": ["model.pt"], **SPEC}, ["model.pt"], "never loads torch pickles",
                 id="torch"),
    pytest.param({"format": "onnx", "files": ["../model.onnx"], **SPEC}, [], "lies outside the folder", id="outside"),
    pytest.param({"format": "onnx", "files": ["model.onnx"], **SPEC}, [], "'model.onnx' does not exist",
                 id="missing"),
    pytest.param({"format": "onnx", "files": ["model.pt"], **SPEC}, ["model.pt"], "is not a onnx file",
                 id="suffix"),
    pytest.param({"format": "onnx", "files": ["model.onnx"], **SPEC, "input_shape": [1, 8, 8]}, ["model.onnx"],
                 "input_shape .* is not", id="shape"),
    pytest.param("{not json", [], "model.json cannot be read", id="not-json"),
    pytest.param("[1, 2]", [], "not a JSON object", id="not-object"),
])
def test_a_malformed_deploy_folder_is_refused_at_plan_time(tmp_path, spec, files, message):
    folder = _folder(tmp_path / "big", spec, files)
    with pytest.raises(EdgebuildError, match=message):
        plan(testing.compose([f"stages.cascade.big={folder}"], recipe="cascade"))


def test_a_pickle_in_a_user_folder_is_never_unpickled(tmp_path):
    import torch

    marker = tmp_path / "EXECUTED"

    class Payload:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    folder = _folder(tmp_path / "torchdir", {"format": "torch", "files": ["model.pt"], **SPEC})
    torch.save({"x": Payload()}, folder / "model.pt")
    args = [f"cache.dir={tmp_path}/cache", "tracking=none", "recipe=cascade", f"stages.cascade.big={folder}"]
    r = run_cli(args, tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stdout + r.stderr and "never loads torch pickles" in r.stderr
    assert not marker.exists()
