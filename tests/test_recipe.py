"""medcausal.recipe: loading a recipe file, with errors that name the file and the key."""

import pytest

from medcausal.errors import RecipeError
from medcausal.recipe import load_recipe


def test_recipe_simulator_options_are_typed(tmp_path):
    from medcausal.errors import RecipeError
    from medcausal.recipe import load_recipe

    (tmp_path / "r.toml").write_text('name = "t"\nedges = [["x1", "x2"]]\n[data]\nsynthetic = "chain"\nn = 50\n'
                                     'options = { additive = "false" }\n[variables]\nx1 = "continuous"\n'
                                     'x2 = "continuous"\nx3 = "continuous"\n')
    with pytest.raises(RecipeError, match="data.options.*additive must be True or False, got 'false'"):
        load_recipe(tmp_path / "r.toml").load_data()  # a string was truthy: the additive SCM, silently


def test_recipe_with_a_bad_image_shape_names_the_file(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[data]\npath="d.csv"\n[variables]\nmri={type="image", shape="64x64"}\n')
    with pytest.raises(RecipeError, match="r.toml.*'mri'.*'64x64'"):
        load_recipe(p)


def test_recipe_that_is_not_utf8_names_the_file(tmp_path):
    p = tmp_path / "r.toml"
    p.write_bytes('# caf\xe9\n[data]\npath="d.csv"\n[variables]\na="continuous"\n'.encode("latin-1"))
    with pytest.raises(RecipeError, match="r.toml.*not UTF-8"):
        load_recipe(p)
