"""distill: the KD loss by hand, a shrunk separable_distill build, teachers validated at plan time."""

import math

import pytest
import torch

from edgebuild import testing
from edgebuild.errors import EdgebuildError
from edgebuild.finetune import kd_loss
from edgebuild.pipeline import plan

QUICK = ["data=synthetic", "model.kwargs.width=8", "stages.train.epochs=2", "stages.distill.epochs=4",
         "budget.max_acc_drop=null"]


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    temp = 2.0

    def softmax(row):
        e = [math.exp(v / temp) for v in row]
        return [v / sum(e) for v in e]

    kl = [sum(pt * math.log(pt / ps) for pt, ps in zip(softmax(tr), softmax(sr), strict=True))
          for sr, tr in zip(s.tolist(), t.tolist(), strict=True)]
    expected = temp**2 * sum(kl) / len(kl)  # T^2 * KL(teacher || student), mean over the batch
    assert kd_loss(s, t, temp).item() == pytest.approx(expected, rel=1e-6)
    assert kd_loss(t, t, temp).item() == pytest.approx(0.0, abs=1e-7)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    overrides = testing.shrink(tmp) + QUICK + ["stages.distill.compare_baseline=true"]
    return tmp, testing.build(overrides, tmp, recipe="separable_distill")


def test_separable_distill_shrunk(built):
    _, s = built
    by = {st["name"]: st for st in s["stages"]}
    assert list(by) == ["train", "separable", "distill", "int8"]
    assert by["int8"]["kind"] == "quantize" and by["int8"]["input"] == "distill"
    assert by["int8"]["metrics"]["int8/ops_fraction"] > 0.5
    train, sep, dis = by["train"]["metrics"], by["separable"]["metrics"], by["distill"]["metrics"]
    assert sep["macs"] < train["macs"] / 2 and sep["separable/layer_macs_ratio"] > 3
    assert dis["macs"] == sep["macs"]  # distillation trains the rewritten student, it does not change it
    for key in ("distill/teacher_acc", "distill/baseline_acc", "distill/student_acc", "distill/gain_pp"):
        assert key in dis
    # the stage's own measurement of the student is the pipeline's (same deployable path)
    assert dis["distill/student_acc"] == pytest.approx(dis["acc/top1"], abs=1e-9)
    assert dis["distill/teacher_acc"] == pytest.approx(train["acc/top1"], abs=1e-9)
    assert dis["acc/top1"] > 0.4  # it learned (4 classes: chance is 0.25)


def test_teacher_from_config_with_other_class_count_fails(built):
    tmp, _ = built
    bad = ["stages.distill.teacher=null", "+stages.distill.teacher_model={name: cnn, num_classes: 7}"]
    with pytest.raises(EdgebuildError, match="outputs 7 classes, the data has"):
        testing.build(testing.shrink(tmp) + QUICK + bad, tmp, recipe="separable_distill", run_name="bad")


@pytest.mark.parametrize("override,message", [
    ("stages.distill.teacher=nosuch", "reference 'nosuch' is not a stage"),
    ("stages.separable.input=distill", "input 'distill' comes later"),
    ("stages.distill.teacher=extra", "reference 'extra' comes later"),
    ("stages.distill.teacher=null", "distill needs exactly one teacher"),
    ("stages.distill.teacher_weights=/nonexistent/t.pt", "distill needs exactly one teacher"),
    ("+stages.distill.student_model={num_classes: 3}", "teacher predicts 10 classes, the student 3"),
])
def test_bad_teachers_fail_at_plan_time(override, message):
    extra = ["+stages.extra={kind: export}"]
    if "student_model" in override:
        extra += ["stages.distill.teacher=null", "+stages.distill.teacher_model={num_classes: 10}"]
    cfg = testing.compose([*extra, override], recipe="separable_distill")
    with pytest.raises(EdgebuildError, match=message):
        plan(cfg)
