"""The Table 3 recipes: present, faithful to section 3.1 and Table 3, validated strictly."""

import pytest

from vggkit.training.recipe import Recipe, apply_overrides, list_recipes, tomllib

# Table 3 of the paper (top-1 / top-5 val error, %), keyed by recipe name.
TABLE3 = {
    "A": ("A", 256, 29.6, 10.4), "A-LRN": ("A-LRN", 256, 29.7, 10.5), "B": ("B", 256, 28.7, 9.9),
    "C-256": ("C", 256, 28.1, 9.4), "C-384": ("C", 384, 28.1, 9.3), "C-256-512": ("C", [256, 512], 27.3, 8.8),
    "D-256": ("D", 256, 27.0, 8.8), "D-384": ("D", 384, 26.8, 8.7), "D-256-512": ("D", [256, 512], 25.6, 8.1),
    "E-256": ("E", 256, 27.3, 9.0), "E-384": ("E", 384, 26.9, 8.7), "E-256-512": ("E", [256, 512], 25.5, 8.0),
}


def test_every_table3_experiment_has_a_recipe():
    assert sorted(list_recipes()) == sorted(TABLE3)


@pytest.mark.parametrize("name", sorted(TABLE3))
def test_recipe_holds_the_papers_setup(name):
    recipe = Recipe.load(name)
    config, scale, top1, top5 = TABLE3[name]
    assert (recipe.model.name, recipe.data.scale) == (config, scale)
    assert (recipe.target.top1_error, recipe.target.top5_error) == (top1, top5)
    assert (recipe.model.num_classes, recipe.model.dropout, recipe.model.width) == (1000, 0.5, 1.0)
    assert (recipe.optim.batch_size, recipe.optim.momentum, recipe.optim.weight_decay) == (256, 0.9, 5e-4)
    assert (recipe.schedule.epochs, recipe.schedule.factor, recipe.schedule.max_drops) == (74, 0.1, 3)
    assert (recipe.data.crop, recipe.data.flip, recipe.data.pca_std) == (224, True, 0.1)
    # Validation at the paper's single test scale: Q = S, or 384 for jittered S.
    assert recipe.data.val_scale == (384 if scale == [256, 512] else scale)
    # Initialisation chain of section 3.1.
    if config in ("A", "A-LRN"):
        assert (recipe.init.method, recipe.init.from_a, recipe.init.weights, recipe.optim.lr) == ("paper", "", "", 0.01)
    elif scale == 256:
        assert recipe.init.from_a == "runs/imagenet/A/best.pt" and recipe.optim.lr == 0.01
    elif scale == 384:
        assert recipe.init.weights == f"runs/imagenet/{config}-256/best.pt" and recipe.optim.lr == 0.001
    else:
        assert recipe.init.weights == f"runs/imagenet/{config}-384/best.pt" and recipe.optim.lr == 0.001


def test_recipe_round_trips_through_toml():
    recipe = Recipe.load("D-256-512", ["optim.lr=0.003"])
    assert Recipe.from_dict(tomllib.loads(recipe.to_toml())) == recipe


def test_key_typo_is_an_error_naming_the_key(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text('[model]\nname = "D"\n\n[optim]\nlrr = 0.1\n')
    with pytest.raises(ValueError, match=r"typo\.toml: unknown key 'optim\.lrr'; did you mean 'optim\.lr'\?"):
        Recipe.load(path)
    path.write_text("[optimizer]\nlr = 0.1\n")
    with pytest.raises(ValueError, match=r"unknown key 'optimizer'; did you mean 'optim'\?"):
        Recipe.load(path)


def test_override_typo_and_bad_types_are_errors():
    with pytest.raises(ValueError, match=r"unknown key 'data\.scael'; did you mean 'data\.scale'\?"):
        Recipe.load("A", ["data.scael=384"])
    with pytest.raises(ValueError, match=r"optim\.lr must be float, got 'fast'"):
        Recipe.load("A", ["optim.lr=fast"])
    with pytest.raises(ValueError, match=r"not of the form section\.key=value"):
        Recipe.load("A", ["optim.lr"])


def test_overrides_are_read_as_toml_values():
    data = apply_overrides({}, ["data.scale=[256, 512]", "model.name=D", "run.compile=true", "optim.lr=1e-3"])
    assert data == {"data": {"scale": [256, 512]}, "model": {"name": "D"}, "run": {"compile": True},
                    "optim": {"lr": 0.001}}
    recipe = Recipe.load("A", ["model.name=E", "data.scale=[256, 512]"])
    assert recipe.model.name == "E" and recipe.scale_range == (256, 512)


@pytest.mark.parametrize("override, message", [
    ("data.scale=200", r"data\.scale: S=200 is smaller than the 224 px crop"),
    ("data.scale=[512, 256]", r"data\.scale: \[512, 256\] must be one size S or a range"),
    ("model.name=F", r"model\.name: Unknown VGG model 'F'"),
    ("init.method=xavier", r"init\.method: 'xavier' is not one of"),
    ("init.weights=x.pt", r"init: set either from_a .* or weights"),
    ("optim.batch_size=0", r"optim\.batch_size: must be positive"),
    ("model.dropout=1.0", r"model\.dropout: must be in \[0, 1\)"),
])
def test_values_that_make_no_sense_are_errors(override, message):
    with pytest.raises(ValueError, match=message):
        Recipe.load("B", [override])


def test_missing_recipe_lists_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match=r"Recipe not found: F-256\. .*D-256-512"):
        Recipe.load("F-256")


def test_a_file_that_is_not_toml_text_is_an_error_naming_it(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 not text")
    with pytest.raises(ValueError, match=r"photo\.jpg is not a TOML recipe \(not UTF-8 text\)"):
        Recipe.load(path)
