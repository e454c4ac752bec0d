"""eval.profile.enabled=true: per-layer times from OpenVINO's performance counters, preprocessing vs inference."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgebuild import profile, testing
from edgebuild.artifact import Artifact
from tests.conftest import FAST


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("profiled")
    overrides = testing.shrink(tmp) + [*FAST, "stages.train.epochs=1", "budget.min_acc=null",
                                       "eval.profile.enabled=true", "eval.profile.images=8"]
    return tmp, overrides, testing.build(overrides, tmp)


def test_every_stage_gets_a_layer_profile_and_preprocessing_split(profiled):
    _, _, summary = profiled
    for stage in summary["stages"]:
        m = stage["metrics"]
        assert m["profile/preprocess_ms"] > 0 and m["profile/inference_ms"] > 0
        assert 0 < m["profile/preprocess_share"] < 1
        # timed by the same loop as latency/p50_ms (it used to read x5 higher); a shared machine's noise aside
        assert 0.5 < m["profile/inference_ms"] / m["latency/p50_ms"] < 2.0
        assert m["latency/load_ms"] > 0 and m["latency/first_ms"] > 0 and m["runtime/precision"]
        data = json.loads((Path(summary["run_dir"]) / "profile" / f"{stage['name']}.json").read_text())
        layers = data["layers"]
        # the small CNN: 3 convolutions and a fully connected layer, all executed in f32 (target cpu)
        assert sum(r["type"] == "Convolution" for r in layers) == 3
        assert {r["precision"] for r in layers if r["type"] in ("Convolution", "FullyConnected")} == {"f32"}
        assert [r["ms"] for r in layers] == sorted((r["ms"] for r in layers), reverse=True) and layers[0]["ms"] > 0
        pre = data["preprocessing"]
        assert pre["images"] == 8 and "re-encoded as 224x224 JPEG" in pre["source"]
        assert set(pre["ms"]) == {"decode", "resize", "normalize", "inference"}
    assert "## Profile of the deployable (export)" in (Path(summary["run_dir"]) / "summary.md").read_text()


def test_profiling_is_off_by_default(tmp_path):
    cfg = testing.compose(testing.shrink(tmp_path))
    assert cfg.eval.profile.enabled is False


def test_preprocessing_decodes_the_original_files_of_an_image_folder(profiled, tmp_path):
    from edgebuild.data import DataModule
    from edgebuild.pipeline import Context
    from edgebuild.targets import make_target
    from edgebuild.tasks import make_task

    tmp, overrides, summary = profiled
    for c in ("a", "b"):
        (tmp_path / "ds" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((40, 30, 3), 40 * i, np.uint8)).save(tmp_path / "ds" / c / f"{i}.png")
    cfg = testing.compose(overrides + ["data=imagefolder", f"data.root={tmp_path / 'ds'}", "data.image_size=16",
                                       "data.channels=1", "data.mean=[0.5]", "data.std=[0.25]"])
    ctx = Context(cfg=cfg, workdir=tmp_path, data=DataModule(cfg.data, tmp_path / "cache"), task=make_task(cfg.task),
                  target=make_target(cfg.target), seed=0)
    deploy = Path(summary["deploy"])
    meta = json.loads((deploy / "model.json").read_text())
    deployable = Artifact("openvino", deploy, ["model.xml", "model.bin"],
                          meta={"input_shape": meta["input_shape"], **meta["preprocess"]})
    pre = profile.preprocessing(deployable, ctx, 5)
    assert pre["images"] == 5 and pre["source"] == f"5 original image files of {tmp_path / 'ds'}"
    assert pre["ms"]["decode"] > 0 and pre["preprocess_ms"] == pytest.approx(
        pre["ms"]["decode"] + pre["ms"]["resize"] + pre["ms"]["normalize"])
