"""Config: recipes are a Hydra group, schemas are typed, every recipe composes and plans."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from edgebuild import testing
from edgebuild.config import RECIPES_DIR
from edgebuild.errors import EdgebuildError
from edgebuild.pipeline import plan

RECIPES = sorted(p.stem for p in Path(RECIPES_DIR).glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_plans(recipe):
    cfg = testing.compose(recipe=recipe)
    stages = plan(cfg)
    assert stages, recipe
    assert Path(RECIPES_DIR / f"{recipe}.yaml").read_text().startswith("# @package _global_")


def test_recipe_name_selects_the_file():
    cfg = testing.compose(recipe="default")
    assert list(cfg.stages) == ["train", "export"]
    assert cfg.stages.train.kind == "train"


def test_typo_in_recipe_name_is_rejected():
    with pytest.raises(MissingConfigException, match="recipe/defualt"):
        testing.compose(recipe="defualt")


def test_unknown_key_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException, match="no_such_key") as e:
        testing.compose(["no_such_key=1"])
    assert isinstance(e.value.__cause__, (ConfigKeyError, ConfigAttributeError))


@pytest.mark.parametrize("override", ["data.batch_size=abc", "stages.train.epochs=abc"])
def test_wrong_type_fails_at_compose_time(override):
    with pytest.raises(ConfigCompositionException) as e:
        testing.compose([override])
    assert isinstance(e.value.__cause__, ValidationError)


def test_stage_options_are_overridable_even_when_the_recipe_uses_defaults():
    cfg = testing.compose(["stages.train.optimizer.lr=0.5", "stages.export.opset=16"])
    assert cfg.stages.train.optimizer.lr == 0.5
    assert cfg.stages.export.opset == 16


def test_unknown_stage_option_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException, match="epochz"):
        testing.compose(["stages.train.epochz=3"])


def test_unknown_stage_kind_is_a_clear_error():
    with pytest.raises(EdgebuildError, match="unknown stage kind 'zz'.*\n.*fix: use one of"):
        plan(testing.compose(["stages.train.kind=zz"]))


@pytest.mark.parametrize("target,why", [("zz", "is not a stage"), ("export", "comes later")])
def test_stage_input_must_name_an_earlier_stage(target, why):
    with pytest.raises(EdgebuildError, match=why):
        plan(testing.compose([f"stages.train.input={target}"]))


def test_new_stage_can_be_added_and_one_switched_off():
    cfg = testing.compose(["+stages.onnx_only={kind: export, formats: [onnx]}", "stages.export=null"])
    assert [name for name, _, _ in plan(cfg)] == ["train", "onnx_only"]
