"""The training path every recipe starts with (issue 19): batched tensor augmentation, per-epoch progress and
series, precision and preset checks at plan time, and DDP that parallelizes fit only."""

import collections
import json
import logging
import re

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgebuild import testing
from edgebuild.data import augment_batch
from edgebuild.errors import EdgebuildError
from edgebuild.finetune import _cpu_has_amx_bf16, _cpu_supports, check_precision, resolve_optimizer
from edgebuild.pipeline import plan
from tests.conftest import FAST, run_cli

EPOCH_LINE = re.compile(r"train epoch (\d+)/(\d+): loss [\d.]+, val/acc [\d.]+, [\d.]+ s, \d+ img/s")


def distinct_images(b=48, c=3, h=8, w=8):
    return torch.arange(b * c * h * w, dtype=torch.float32).reshape(b, c, h, w)


def test_flip_is_drawn_per_image():
    x = distinct_images()
    out = augment_batch(x, pad=0, flip=True, generator=torch.Generator().manual_seed(0))
    flipped = [bool(torch.equal(o, xi.flip(2))) for o, xi in zip(out, x, strict=True)]
    kept = [bool(torch.equal(o, xi)) for o, xi in zip(out, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)), "every image is itself or its mirror"
    assert 0 < sum(flipped) < len(x), "each image draws its own flip"


def test_crop_is_a_window_of_the_padded_image_at_a_per_image_offset():
    x, pad = distinct_images(), 2
    out = augment_batch(x, pad=pad, flip=False, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = F.pad(x, (pad,) * 4, mode="reflect")
    offsets = []
    for o, p in zip(out, padded, strict=True):
        found = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if torch.equal(o, p[:, dy:dy + 8, dx:dx + 8])]
        assert found, "the crop must be a window of the reflect-padded image"
        offsets.append(found[0])
    assert len(set(offsets)) > 3, "offsets are drawn per image, not once per batch"


def test_training_batches_are_the_normalized_images_the_evaluation_sees(tmp_path):
    cfg = testing.compose(testing.shrink(tmp_path) + FAST)
    from edgebuild.tasks import make_task

    task = make_task(cfg.task)
    dm = task.datamodule(cfg.data, tmp_path / "cache")
    x, y = next(iter(dm.loader("val")))
    ex, ey = next(dm.batches("val", len(y)))
    np.testing.assert_allclose(x.numpy(), ex, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(y.numpy(), np.asarray(ey))
    bs = cfg.data.batch_size
    batches = [yb for _, yb in dm.loader("train", train=True)]
    n = len(dm.splits["train"].labels)
    assert n > bs and {len(b) for b in batches} == {bs}, "training batches are full: the short last one is dropped"
    assert len(batches) == n // bs
    seen = collections.Counter(torch.cat(batches).tolist())
    assert not seen - collections.Counter(dm.splits["train"].labels.tolist()), "no image is seen twice in an epoch"


def test_epoch_lines_series_and_trained_precision_are_recorded(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="edgebuild.finetune")
    summary = testing.build(testing.shrink(tmp_path, tracking=True) + FAST, tmp_path)
    lines = [m for m in caplog.messages if EPOCH_LINE.search(m)]
    assert [EPOCH_LINE.search(m).groups() for m in lines] == [("1", "2"), ("2", "2")]
    m = next(s for s in summary["stages"] if s["name"] == "train")["metrics"]
    assert m["train/precision"] == "32-true" and m["train/epochs"] == 2
    assert len(m["time/epoch_s"]) == 2 and all(v > 0 for v in m["time/epoch_s"])
    assert len(m["throughput/train_images_per_s"]) == 2 and all(v > 0 for v in m["throughput/train_images_per_s"])
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.mlflow.runName = 'train'")
    client = mlflow.MlflowClient()
    for key in ("time/epoch_s", "throughput/train_images_per_s"):
        history = client.get_metric_history(runs.run_id[0], key)
        assert sorted(h.step for h in history) == [1, 2], key
    from edgebuild.summary import training_lines

    assert any(line.startswith("trained train: 32-true, 2 epochs") for line in training_lines(summary))


def test_sgd_onecycle_preset_sets_optimizer_and_schedule_and_trains(tmp_path):
    cfg = testing.compose(["stages.train.optimizer=sgd_onecycle"])
    stage = plan(cfg)[0][1]
    opt, sched = resolve_optimizer(stage)
    assert opt["_target_"] == "torch.optim.SGD" and opt["nesterov"] is True
    assert sched["_target_"].endswith("OneCycleLR") and sched["interval"] == "step"
    summary = testing.build(testing.shrink(tmp_path) + FAST + ["stages.train.optimizer=sgd_onecycle",
                                                               "stages.train.epochs=3"], tmp_path)
    assert summary["stages"][0]["metrics"]["acc/top1"] > 0.5  # 4 generated classes: chance is 0.25


def unsupported_precisions():
    """What this machine cannot train in: always a GPU precision without CUDA (CI), plus the CPU's own gaps."""
    cases = [(["trainer.accelerator=gpu", "trainer.precision=bf16-mixed"], "no CUDA device")] \
        if not torch.cuda.is_available() else []
    for precision, kind in (("bf16-mixed", "bf16"), ("16-mixed", "16")):
        if not _cpu_supports(kind):
            cases.append(([f"trainer.precision={precision}"], "needs a CPU with"))
    return cases + [(["trainer.precision=fp8"], "is not a Lightning precision")]


@pytest.mark.parametrize("overrides,message", [
    *unsupported_precisions(),
    (["stages.train.optimizer=adam_nonsense"], "is not a known preset"),
    (["data.augment=true", "data.augment_pad=8"], "does not fit 8x8"),
    (["data.augment=true", "data.augment_pad=-1"], "out of range"),
])
def test_bad_training_options_fail_at_plan_time(overrides, message):
    cfg = testing.compose(overrides)  # the default recipe's digits are 8x8
    with pytest.raises(EdgebuildError, match=message):
        plan(cfg)


def test_supported_precisions_pass_the_plan_and_auto_follows_the_cpu():
    from types import SimpleNamespace

    assert check_precision(SimpleNamespace(precision="32-true", accelerator="cpu")) == "32-true"
    auto = check_precision(SimpleNamespace(precision="auto", accelerator="cpu"))
    assert auto == ("bf16-mixed" if _cpu_supports("bf16") and _cpu_has_amx_bf16() else "32-true")
    if _cpu_supports("bf16"):
        assert check_precision(SimpleNamespace(precision="bf16-mixed", accelerator="cpu")) == "bf16-mixed"


@pytest.mark.parametrize("amx", [False, True])
def test_auto_precision_is_bf16_only_with_amx(monkeypatch, amx):
    """AVX-512 BF16 alone trained slower than f32 (docs/benchmarks.md): auto wants AMX as well."""
    from types import SimpleNamespace

    import edgebuild.finetune as finetune

    monkeypatch.setattr(finetune, "_cpu_supports", lambda kind: kind == "bf16")
    monkeypatch.setattr(finetune, "_cpu_has_amx_bf16", lambda: amx)
    auto = check_precision(SimpleNamespace(precision="auto", accelerator="cpu"))
    assert auto == ("bf16-mixed" if amx else "32-true")


def test_unsupported_precision_exits_2_before_any_stage(tmp_path):
    result = run_cli(["tracking=none", f"cache.dir={tmp_path}/cache", "trainer.precision=fp8"], tmp_path)
    assert result.returncode == 2
    out = result.stdout + result.stderr
    assert "trainer.precision='fp8'" in out and "Traceback" not in out
    assert "running" not in out and not list(tmp_path.glob("cache/*/*/result.json"))


def test_ddp_runs_fit_on_two_processes_and_everything_else_once(tmp_path):
    common = ["data=synthetic", "model.kwargs.width=8", "stages.train.epochs=4", "eval=fast"]

    def cli(name, extra):
        store = tmp_path / name
        args = [*common, f"cache.dir={store}/cache", f"tracking.uri=sqlite:///{store}/mlflow.db",
                f"tracking.artifact_location={store}/art", *extra]
        result = run_cli(args, store.mkdir() or store)
        assert result.returncode == 0, result.stderr[-3000:]
        summaries = list(store.glob("outputs/**/summary.json"))
        assert len(summaries) == 1, "one summary, written once"
        mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
        runs = mlflow.search_runs(search_all_experiments=True)
        return result, json.loads(summaries[0].read_text()), runs

    result, ddp, runs = cli("ddp", ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"])
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    assert len(parents) == 1 and set(runs["status"]) == {"FINISHED"}
    assert sorted(runs["tags.mlflow.runName"]) == sorted(["default", "train", "export"])
    out = result.stdout + result.stderr
    assert len(EPOCH_LINE.findall(out)) == 4, "rank 0 alone reports epochs"
    assert out.count("stage export (export): running") == 1
    assert "sync_dist=True" not in out, "epoch metrics are synced across ranks"
    _, single, _ = cli("single", [])
    train_ddp, train_single = (next(s for s in x["stages"] if s["name"] == "train")["metrics"] for x in (ddp, single))
    assert train_ddp["train/epochs"] == train_single["train/epochs"] == 4
    assert len(train_ddp["time/epoch_s"]) == 4
    # two ranks see half the batches each (twice the global batch): close to, not equal to, one process
    assert abs(train_ddp["acc/top1"] - train_single["acc/top1"]) <= 0.1
    assert train_ddp["acc/top1"] > 0.5


@pytest.mark.parametrize("channels_last", [True, False])
def test_conv_models_train_in_nhwc_and_come_back_nchw(tmp_path, channels_last):
    from types import SimpleNamespace

    from edgebuild.finetune import fit
    from edgebuild.models import build_model
    from edgebuild.stages.train import Train
    from edgebuild.tasks import make_task

    cfg = testing.compose(testing.shrink(tmp_path) + FAST + [f"trainer.channels_last={str(channels_last).lower()}"])
    task = make_task(cfg.task)
    dm = task.datamodule(cfg.data, tmp_path / "cache")
    model = build_model(cfg.model, dm)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)  # C=1: same bytes
    layouts = []
    conv.register_forward_pre_hook(lambda _, args: layouts.append(
        args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous()))
    ctx = SimpleNamespace(cfg=cfg, data=dm, task=task, workdir=tmp_path, seed=0, logger=None)
    trained, metrics = fit(model, ctx, Train(epochs=1), name="train")
    assert layouts and set(layouts) == {channels_last}, "every training and validation batch in the asked layout"
    assert metrics["train/channels_last"] == float(channels_last)
    assert all(p.is_contiguous() for p in trained.parameters()), "weights come back in the standard NCHW layout"
    x = torch.from_numpy(dm.normalize(dm.splits["val"].images[:4]))
    assert trained(x).shape == (4, dm.num_classes)
