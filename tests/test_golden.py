"""Golden-metric regression tests: every recipe still plans and builds its source as recorded, and the
shrunk builds still produce their numbers (exact counts, accuracy and size within stated tolerances).
Regenerate after a deliberate change: `python -m tests.golden --update [RECIPE ...]` (tests/golden.py)."""

import pytest

from tests import golden

GOLDEN = golden.load()


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("golden")  # one cache: each data set is decoded once


def _recorded(recipe):
    if recipe not in GOLDEN:
        pytest.fail(f"recipe {recipe!r} has no golden values in {golden.GOLDEN.relative_to(golden.ROOT)}: "
                    f"run `python -m tests.golden --update {recipe}` and commit the file")
    return GOLDEN[recipe]


@pytest.mark.parametrize("recipe", golden.recipes())
def test_golden(recipe, tmp):
    want = _recorded(recipe)["source"]
    got = golden.source_record(recipe, tmp)
    assert got == want, f"{recipe}: plan or source model changed: {got} vs golden {want}"


@pytest.mark.parametrize("recipe", sorted(golden.BUILDS))
def test_golden_build(recipe, tmp):
    want = _recorded(recipe).get("build")
    assert want, f"recipe {recipe!r} is built by the golden tests but has no recorded build numbers"
    problems = golden.compare_build(recipe, want, golden.build_record(recipe, tmp))
    assert not problems, "; ".join(problems)


def test_a_drifted_number_fails():
    want = {"train": {"macs": 100, "acc/top1": 0.9, "size/bytes": 1000, "runtime/precision": "fp32"}}
    assert golden.compare_build("r", want, want) == []
    close = {"train": {"macs": 100, "acc/top1": 0.9 - golden.ACC_TOL / 2, "size/bytes": 1010,
                       "runtime/precision": "fp32"}}
    assert golden.compare_build("r", want, close) == []
    drifted = {"train": {"macs": 101, "acc/top1": 0.5, "size/bytes": 2000, "runtime/precision": "bf16"}}
    problems = golden.compare_build("r", want, drifted)
    assert len(problems) == 4 and all(p.startswith("r/train") for p in problems)
    assert golden.compare_build("r", want, {}) == ["r: stage 'train' is gone"]


def test_every_recipe_has_a_golden_record():
    missing = [r for r in golden.recipes() if r not in GOLDEN]
    assert not missing, f"recipes without golden values: {missing}; run `python -m tests.golden --update NAME`"
