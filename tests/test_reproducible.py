"""Reproducible artifacts (issue 14 §6): the same recipe built cold twice, in one process or in two, gives
byte-identical artifacts, so a cache entry rebuilt after damage keeps its digest and nothing downstream reruns.

OpenVINO names the nodes it creates TYPE_ID with a process-wide counter; before edgebuild.convert.save_ir
renumbered them, the second build in a process wrote Constant_4938 where the first wrote Constant_2440."""

import json
from pathlib import Path

import pytest
import torch

from edgebuild import testing
from edgebuild.artifact import tree_digest
from edgebuild.convert import onnx_to_openvino, save_ir, torch_to_onnx
from tests.conftest import FAST, run_cli

# every stage kind that writes an IR from a build: export (convert), quantize (NNCF), fp16 (both modes)
STAGES = ["+stages.int8={kind: quantize}", "+stages.half={kind: fp16, input: export}",
          "+stages.wint8={kind: fp16, input: export, weights: int8}", "data.num_samples=200", "budget.min_acc=null"]


def artifacts(summary):
    """{stage: {file: bytes}}: each stage artifact's model files (what its cache digest covers)."""
    out = {}
    for st in summary["stages"]:
        root = Path(st["artifact"])
        files = sorted(p.name for p in root.iterdir() if p.suffix in (".pt", ".onnx", ".xml", ".bin"))
        assert files, root
        out[st["name"]] = {f: (root / f).read_bytes() for f in files}
    return out


def digests(summary):
    return {name: tree_digest(Path(st["artifact"]), list(files))
            for st, (name, files) in zip(summary["stages"], artifacts(summary).items(), strict=True)}


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    """Two cold builds in this process, each with its own cache (nothing shared, nothing reused)."""
    builds = []
    for name in ("a", "b"):
        tmp = tmp_path_factory.mktemp(f"repro_{name}")
        builds.append(testing.build(testing.shrink(tmp) + FAST + STAGES, tmp))
    return builds


def test_the_same_conversion_twice_in_one_process_writes_the_same_bytes(tmp_path):
    torch.manual_seed(0)
    onnx = torch_to_onnx(testing.tiny_model(), [1, 1, 8, 8], tmp_path / "model.onnx", ["logits"])
    written = []
    for i in range(2):
        xml = onnx_to_openvino(onnx, tmp_path / f"r{i}" / "model.xml")
        written.append((xml.read_bytes(), xml.with_suffix(".bin").read_bytes()))
    assert written[0] == written[1]


def test_save_ir_keeps_the_source_models_names(tmp_path):
    """Only OpenVINO's own TYPE_ID names are renumbered: inputs, outputs and named layers stay."""
    import openvino as ov

    torch.manual_seed(0)
    onnx = torch_to_onnx(testing.tiny_model(), [1, 1, 8, 8], tmp_path / "model.onnx", ["logits"])
    model = ov.convert_model(str(onnx))
    before = {op.get_friendly_name() for op in model.get_ops() if any(o.get_names() for o in op.outputs())}
    saved = ov.Core().read_model(str(save_ir(model, tmp_path / "ir" / "model.xml")))
    after = {op.get_friendly_name() for op in saved.get_ops()}
    assert before <= after and "input" in after
    assert [o.get_any_name() for o in saved.outputs] == ["logits"]


def test_two_cold_builds_in_one_process_give_identical_artifacts(two_builds):
    a, b = two_builds
    assert not any(st["cache_hit"] for st in a["stages"] + b["stages"])
    fa, fb = artifacts(a), artifacts(b)
    assert set(fa) == {"train", "export", "int8", "half", "wint8"}
    for stage in fa:
        for name in fa[stage]:
            assert fa[stage][name] == fb[stage][name], f"{stage}/{name} differs between two cold builds"
    assert digests(a) == digests(b)


def test_a_cold_build_in_a_fresh_process_gives_the_same_digests(two_builds, tmp_path):
    r = run_cli(["recipe=default", *testing.shrink(tmp_path), *FAST, *STAGES], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    assert digests(summary) == digests(two_builds[0])
