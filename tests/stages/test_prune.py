"""prune: structured (channels removed), unstructured (one-shot and AGP), activation utilization,
the accuracy floor, the gain check, caching, and every bad input."""

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest
import torch
from torch import nn

from edgebuild import testing
from edgebuild.data import DataModule
from edgebuild.errors import EdgebuildError
from edgebuild.models import small_cnn
from edgebuild.stages.prune import ChannelPruner, Prune, check_gain, onnx_macs, search_floor
from edgebuild.tasks.classification import Classification

DATA = ["data=synthetic", "data.num_samples=400", "budget.min_acc=null"]
TINY = [*DATA, "model.kwargs.width=8"]
STAGES = [
    "stages.train.epochs=3", "stages.export=null",
    "+stages.structured={kind: prune, input: train, macs_target: 0.5, epochs: 1}",
    "+stages.sparse={kind: prune, input: train, mode: unstructured, ratio: 0.8, scope: layer, schedule: agp,"
    " epochs: 2}",
    "+stages.floor={kind: prune, input: train, importance: activation, epochs: 1,"
    " until: {max_acc_drop: 30.0, step: 0.3, max_ratio: 0.9}}",
    "+stages.export2={kind: export, input: structured}",
]


def stage(summary, name):
    return next(s for s in summary["stages"] if s["name"] == name)


def artifact_dir(summary, name):
    return Path(stage(summary, name)["artifact"])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prune")
    return tmp, testing.build(testing.shrink(tmp) + TINY + STAGES, tmp)


def test_structured_prune_removes_channels_macs_params_and_file_size(built):
    _, s = built
    train, pruned, export = (stage(s, n)["metrics"] for n in ("train", "structured", "export2"))
    assert pruned["macs"] <= 0.5 * train["macs"] and pruned["params"] < 0.7 * train["params"]
    assert pruned["size/bytes"] < 0.75 * train["size/bytes"]  # the deployable IR really is smaller
    assert export["size/bytes"] == pruned["size/bytes"] and export["macs"] == pruned["macs"]
    # the gain check measured the exported ONNX graph itself, and it agrees with torch's counter
    assert pruned["prune/export_macs_fraction"] == pytest.approx(pruned["macs"] / train["macs"], abs=0.01)
    model = torch.load(artifact_dir(s, "structured") / "model.pt", weights_only=False)  # saved whole
    assert model[0].out_channels < 8 and model[-1].out_features == 4  # the classifier keeps its classes
    assert pruned["acc/top1"] > 0.4  # chance is 0.25


def test_unstructured_agp_reaches_the_sparsity_in_every_layer_and_masks_are_permanent(built):
    _, s = built
    m = stage(s, "sparse")["metrics"]
    assert m["sparsity"] == pytest.approx(0.8, abs=0.02)
    assert m["macs/effective"] < 0.35 * m["macs"]  # dense MACs unchanged, effective ones shrink
    assert m["size/zip_bytes"] < 0.6 * stage(s, "train")["metrics"]["size/zip_bytes"]
    table = json.loads((artifact_dir(s, "sparse") / "sparsity.json").read_text())
    model = torch.load(artifact_dir(s, "sparse") / "model.pt", weights_only=False)
    assert not any(n.endswith(("_orig", "_mask")) for n, _ in model.named_parameters())  # plain modules
    for name, row in table.items():
        expected = 0.0 if name == "11" else 0.8  # the classifier (output layer) is left alone
        assert row["sparsity"] == pytest.approx(expected, abs=0.02), name
    assert any(n.startswith("sparse:") and "latency does not improve" in n for n in s["notes"])


def test_floor_loop_keeps_the_last_step_within_the_floor_and_records_each_step(built):
    _, s = built
    floor = stage(s, "floor")
    record = json.loads((artifact_dir(s, "floor").parent / "result.json").read_text())
    steps = record["steps"]
    drops = [st["metrics"]["val/drop"] for st in steps]
    assert [st["params"]["ratio"] for st in steps] == [0.3, 0.6, 0.9][:len(steps)]
    within = [d <= 30.0 for d in drops]
    assert all(within[:-1]) and (within[-1] is False or len(steps) == 3)  # stopped at the first breach
    kept = [st for st, ok in zip(steps, within, strict=True) if ok][-1]
    assert floor["metrics"]["macs"] == kept["metrics"]["macs"]
    fractions = [st["metrics"]["macs/fraction"] for st in steps]
    assert fractions == sorted(fractions, reverse=True)


def test_rebuild_hits_the_cache_and_runs_no_prune(built, monkeypatch):
    tmp, first = built

    def boom(self, ctx):
        raise AssertionError("prune ran on a cached build")

    monkeypatch.setattr(Prune, "run", boom)
    again = testing.build(testing.shrink(tmp) + TINY + STAGES, tmp, run_name="again")
    assert all(st["cache_hit"] for st in again["stages"])
    assert stage(again, "structured")["metrics"]["macs"] == stage(first, "structured")["metrics"]["macs"]


def test_search_floor_stops_at_the_first_step_beyond_the_floor():
    drops = {0.1: 0.2, 0.2: 0.6, 0.3: 0.9, 0.4: 1.4, 0.5: 0.5}  # 0.5 would pass again: never tried
    tried = []

    def attempt(ratio, kept):
        tried.append((ratio, kept[0] if kept else None))
        return f"model@{ratio}", drops[ratio], {"val/drop": drops[ratio]}

    kept, steps = search_floor([0.1, 0.2, 0.3, 0.4, 0.5], attempt, max_drop=1.0)
    assert kept == (0.3, "model@0.3")
    assert tried == [(0.1, None), (0.2, 0.1), (0.3, 0.2), (0.4, 0.3)]  # each step prunes the kept model further
    assert [st["name"] for st in steps] == ["ratio_0.10", "ratio_0.20", "ratio_0.30", "ratio_0.40"]


def _ctx(tmp_path, importance):
    cfg = testing.compose(testing.shrink(tmp_path) + TINY)
    dm = DataModule(cfg.data, tmp_path)
    ctx = SimpleNamespace(task=Classification(cfg.task), data=dm,
                          input=SimpleNamespace(meta={"input_shape": [1, 1, 16, 16]}))
    return ChannelPruner(Prune(importance=importance), small_cnn(4, 1, 8).eval(), ctx), ctx


def test_activation_utilization_removes_dead_channels_first_where_l1_keeps_them(tmp_path):
    model = small_cnn(4, 1, 8).eval()
    with torch.no_grad():
        model[0].weight[0].fill_(5.0)  # the largest L1 norm of the layer ...
        model[1].bias[0] = -1e4  # ... but BatchNorm shifts it below zero: ReLU never lets it through
    signature = model[0].weight[0].clone()

    def kept(importance):
        pruner, _ = _ctx(tmp_path, importance)
        out = pruner.by_ratio(model, 0.5)
        return any(torch.equal(w, signature) for w in out[0].weight), pruner

    kept_l1, _ = kept("l1")
    kept_act, pruner = kept("activation")
    assert kept_l1 and not kept_act
    assert pruner.dead_channels >= 1


@pytest.mark.parametrize("global_pruning", [False, True])
def test_round_to_keeps_channel_counts_in_simd_blocks_and_never_empties_a_layer(tmp_path, global_pruning):
    model = small_cnn(4, 1, 12).eval()  # convs of 12, 24, 48 channels
    _, ctx = _ctx(tmp_path, "l1")

    def pruned(round_to, ratio):
        pruner = ChannelPruner(Prune(round_to=round_to, global_pruning=global_pruning), model, ctx)
        return [m.out_channels for m in pruner.by_ratio(model, ratio).modules() if isinstance(m, nn.Conv2d)]

    # 90 % of 24 leaves 2 channels, rounded down to 0: Torch-Pruning alone then keeps all 24; one block stays
    assert pruned(8, 0.9) == [8, 8, 8]
    moderate = pruned(8, 0.3)
    assert all(c % 8 == 0 for c in moderate) and sum(moderate) < 12 + 24 + 48
    first, *rest = pruned(16, 0.5)
    assert first == 12 and all(c % 16 == 0 and c >= 16 for c in rest)  # 12 <= 16: left whole
    # to the nearest block, not down: 5 % of 24 and 48 leaves 22.8 and 45.6 -> 24 and 48, not 16 and 40
    assert pruned(8, 0.05)[1:] == [24, 48]


def test_gain_check_fails_when_channels_are_only_masked(tmp_path):
    model = small_cnn(4, 1, 8).eval()
    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked[0].weight[:4] = 0  # "pruned" by zeros: same shapes, same file, same MACs
    with pytest.raises(EdgebuildError, match="not smaller"):
        check_gain(model, masked, 0.5, [1, 1, 16, 16], ["logits"], tmp_path / "scratch")
    assert not (tmp_path / "scratch").exists()


def test_onnx_macs_matches_torch_counter(tmp_path):
    from edgebuild.convert import torch_to_onnx
    from edgebuild.evaluate import count_macs

    model = small_cnn(4, 1, 8).eval()
    path = torch_to_onnx(model, [1, 1, 16, 16], tmp_path / "m.onnx", ["logits"], dynamic_batch=False)
    assert onnx.load(str(path)) and onnx_macs(path) == count_macs(model, [1, 1, 16, 16])[0]


# ------------------------------------------------------------------------------------ bad input
class FixedGainNet(nn.Module):
    """Scales its features by a fixed per-channel buffer: Torch-Pruning removes channels it cannot see there."""

    def __init__(self, num_classes=4, in_channels=1, width=8):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)
        self.register_buffer("gain", torch.linspace(0.5, 1.5, 8).view(1, 8, 1, 1))

    def forward(self, x):
        x = torch.relu(self.stem(x)) * self.gain
        return self.fc(self.head(x).mean((2, 3)))


def quantized_cnn(num_classes=4, in_channels=1, width=8):
    model = small_cnn(num_classes, in_channels, width)
    return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


ALONE = ["stages.train=null", "stages.export=null"]


@pytest.mark.parametrize("stage_cfg,extra,message", [
    pytest.param("{kind: prune, ratio: 1.5}", [], r"ratio=1.5 is out of range: it must be > 0 and < 1", id="ratio"),
    pytest.param("{kind: prune, macs_target: 0.0}", [], r"macs_target=0.0 is out of range", id="macs-target-range"),
    pytest.param("{kind: prune, epochs: 0, macs_target: 0.001}", [], "cannot be reached without removing whole layers",
                 id="unreachable"),
    pytest.param("{kind: prune, round_to: 0}", [], r"round_to=0 is out of range: it must be >= 1", id="round-to"),
    pytest.param("{kind: prune, mode: unstructured, round_to: 8}", [], "apply to structured pruning only",
                 id="round-to-unstructured"),
    pytest.param("{kind: prune, epochs: 0, layers: ['^no_such_layer']}", [], "matches no layer", id="regex"),
    pytest.param("{kind: prune, epochs: 0, ignore: ['(']}", [], "ignore entry '(' is not a regex", id="bad-regex"),
    pytest.param("{kind: prune, epochs: 0}", ["model._target_=tests.stages.test_prune.quantized_cnn"],
                 "already quantized", id="quantized-model"),
    pytest.param("{kind: prune, epochs: 0, ratio: 0.5}", ["model._target_=tests.stages.test_prune.FixedGainNet"],
                 "fails after layer 'stem'", id="untraceable"),
])
def test_bad_input_is_a_clear_error_and_nothing_is_written(tmp_path, stage_cfg, extra, message):
    with pytest.raises(EdgebuildError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model = extra or ["model.kwargs.width=8"]
        testing.build(testing.shrink(tmp_path) + DATA + ALONE + [f"+stages.p={stage_cfg}", *model], tmp_path)
    assert not list(Path(tmp_path, "cache").glob("*/*/result.json"))[1:]  # at most the model source, no stage


@pytest.mark.parametrize("kind,then", [("quantize", "prune"), ("qat", "cluster"), ("fp16", "prune"),
                                        ("quantize", "separable"), ("qat", "quantize"), ("quantize", "fp16")])
@pytest.mark.parametrize("explicit", [True, False])
def test_a_quantized_input_is_refused_at_plan_time(kind, then, explicit):
    from edgebuild.pipeline import plan

    after = {"kind": "export"}  # an implicit input passes the precision through a stage that keeps it
    stages = {"train": {"kind": "train"}, "q": {"kind": kind}, "x": after, "p": {"kind": then}}
    if explicit:
        stages["p"]["input"] = "q"
    cfg = testing.compose([f"+stages={stages}".replace("'", "")])
    with pytest.raises(EdgebuildError, match=rf"stages.p: its input '{'q' if explicit else 'x'}' is already quantized"):
        plan(cfg)
    stages["p"]["input"] = "train"
    plan(testing.compose([f"+stages={stages}".replace("'", "")]))


def test_pruning_an_exported_model_is_refused(tmp_path):
    with pytest.raises(EdgebuildError, match="already an exported"):
        testing.build(testing.shrink(tmp_path) + TINY + ["stages.train.epochs=1", "+stages.p={kind: prune}"], tmp_path)



def test_floor_limit_is_in_points_of_the_primary_metric_map_drop_for_detectors(tmp_path):
    from edgebuild.errors import EdgebuildError
    from edgebuild.stage import build_stage

    cfg = testing.compose(testing.shrink(tmp_path) + TINY)
    acc = build_stage("floor", {"kind": "prune", "until": {"max_acc_drop": 2.0}})
    det = build_stage("floor", {"kind": "prune", "until": {"max_acc_drop": 2.0, "max_map_drop": 0.5}})
    assert (acc.until.limit, det.until.limit) == (2.0, 0.5)
    with pytest.raises(EdgebuildError, match=r"until\.max_map_drop=-1\.0 is out of range"):
        build_stage("floor", {"kind": "prune", "until": {"max_map_drop": -1.0}}).check(cfg)


@pytest.mark.parametrize("prune_depthwise", [False, True])
def test_unstructured_leaves_depthwise_convs_whole_unless_asked(tmp_path, prune_depthwise):
    mobilenet = ["model=mobilenet_v2", "model.kwargs.width_mult=0.25", "data.channels=3", "data.mean=[0.5,0.5,0.5]",
                 "data.std=[0.25,0.25,0.25]", "data.num_samples=120",
                 "stages.train=null", "stages.export=null"]
    flag = str(prune_depthwise).lower()
    node = f"{{kind: prune, mode: unstructured, ratio: 0.9, epochs: 0, prune_depthwise: {flag}}}"
    summary = testing.build(testing.shrink(tmp_path) + DATA + mobilenet + [f"+stages.p={node}"], tmp_path)

    table = json.loads((artifact_dir(summary, "p") / "sparsity.json").read_text())
    # MobileNetV2's 3x3 depthwise convs (the first block has no expansion conv before its own)
    depthwise = ["features.1.conv.0.0", *(n for n in table if n.endswith("conv.1.0"))]
    assert len(depthwise) == 17 and table["features.2.conv.0.0"]["sparsity"] > 0.5
    if prune_depthwise:
        assert sum(table[n]["sparsity"] for n in depthwise) > 0
    else:
        assert all(table[n]["sparsity"] == 0 for n in depthwise)


def test_collapsed_layers_are_named():
    from edgebuild.stages.weights import collapsed_layers

    table = {"a": {"weights": 9, "zeros": 9}, "b": {"weights": 9, "zeros": 8}, "c": {"weights": 4, "zeros": 4}}
    assert collapsed_layers(table, ["a", "b"]) == ["a"]
