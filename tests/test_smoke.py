from edgebuild import testing


def test_default_recipe_builds_on_synthetic(tmp_path):
    s = testing.build(testing.shrink(tmp_path) + ["data=synthetic", "stages.train.epochs=2"], tmp_path)
    assert [st["name"] for st in s["stages"]] == ["train", "export"]
    assert s["stages"][-1]["metrics"]["acc/top1"] > 0.5
