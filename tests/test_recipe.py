"""Recipes: a loaded recipe can be overridden again (what ``trainer.train(recipe, overrides)`` does)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stillroom.training.recipe import Recipe, load_recipe

RECIPES = sorted(p for p in (Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml")
                 if not p.name.startswith("accelerate") and p.name != "fuse-real-models.yaml")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_a_loaded_recipe_takes_overrides_like_its_file(path):
    loaded = load_recipe(path)
    again = load_recipe(loaded, ["train.max_steps=3", "loss.temperature=2.0"])
    direct = load_recipe(path, ["train.max_steps=3", "loss.temperature=2.0"])
    assert isinstance(again, Recipe)
    assert again.model_dump() == direct.model_dump()
    assert again.train.max_steps == 3 and loaded.train.max_steps != 3  # the loaded one is not changed


def test_a_loaded_recipe_with_teachers_keeps_them():
    path = Path(__file__).resolve().parent.parent / "recipes" / "fusellm-two-teachers.yaml"
    loaded = load_recipe(path)
    assert len(loaded.teachers) == 2
    again = load_recipe(loaded, ["fusion.method=avg_ce"])
    assert [t.name for t in again.teachers] == [t.name for t in loaded.teachers]
    assert [t.path for t in again.teachers] == [t.path for t in loaded.teachers]
    assert again.fusion.method == "avg_ce"


@pytest.mark.parametrize("override", ["fusion.top_k=null", "teachers.0.objective=alm"])
def test_a_support_temperature_without_a_kd_top_k_target_is_refused(override):
    """loss.support_temperature reshapes a kd teacher's top-k target: with the dense teacher (top_k null) or no kd
    teacher it would be ignored silently, so the recipe is refused naming the field and the fix."""
    from stillroom.errors import ConfigError

    path = Path(__file__).resolve().parent.parent / "recipes" / "fusellm-two-teachers.yaml"
    overrides = ["teachers=[{name: a, path: " + str(load_recipe(path).teachers[0].path) + "}]"]
    assert load_recipe(path, [*overrides, "loss.support_temperature=1.2"]).loss.support_temperature == 1.2
    with pytest.raises(ConfigError, match="loss.support_temperature: .*set fusion.top_k"):
        load_recipe(path, [*overrides, "loss.support_temperature=1.2", override])
