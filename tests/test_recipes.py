import pytest

from allcore.data.labels import get_label_set
from allcore.models.registry import list_models
from allcore.models.recipes import Recipe, list_recipes, load_recipe
from allcore.imaging.data_config import DataConfig
from allcore.imaging.transforms import train_transform

PUBLISHED = ["s000_mobilenet_v2_all4", "s001_efficientnet_b3_onecycle", "s002_vgg16_cnn",
             "s003_mobilenet_binary", "s003_efficientnet_b3_binary", "s004_mobilenet_m"]


def test_every_published_recipe_is_shipped():
    assert set(PUBLISHED) <= set(list_recipes())


@pytest.mark.parametrize("name", list_recipes())
def test_recipe_is_consistent(name):
    recipe = load_recipe(name)
    assert recipe.model in list_models()
    get_label_set(recipe.label_set)
    train_transform(DataConfig(input_size=32, mask_corner=recipe.mask_corner), recipe.augment)
    if name in PUBLISHED:
        assert recipe.reported, "published recipes carry the paper's figures for comparison"


def test_reference_details_survive_loading():
    s004 = load_recipe("s004_mobilenet_m")
    assert (s004.balance, s004.schedule, s004.plateau_factor, s004.plateau_patience) == (
        "desaturate_minority", "plateau", 0.1, 5)
    assert (s004.min_lr, s004.early_stopping_patience, s004.folds) == (1e-6, 20, 3)
    assert s004.augment["gaussian_noise_sigma"] == [3, 9]
    s001 = load_recipe("s001_efficientnet_b3_onecycle")
    assert s001.lr_finder and s001.schedule == "one_cycle" and s001.mixed_precision


def test_overrides_parse_types_and_nested_augment():
    recipe = load_recipe("s000_mobilenet_v2_all4").override(
        ["epochs=2", "lr=3e-4", "mask_corner=true", "augment.hflip=0.25", "split=[0.6, 0.2, 0.2]"])
    assert recipe.epochs == 2 and recipe.lr == 3e-4 and recipe.mask_corner is True
    assert recipe.augment["hflip"] == 0.25 and recipe.augment["vflip"] == 0.5
    assert recipe.split == (0.6, 0.2, 0.2)


def test_unknown_field_fails_with_the_valid_names():
    with pytest.raises(ValueError, match="unknown recipe field.*epochz.*valid fields"):
        load_recipe("demo").override(["epochz=3"])


def test_a_recipe_loads_by_name_from_the_package_or_from_a_file_path(tmp_path):
    from allcore.models.recipes import RECIPE_DIR

    assert (RECIPE_DIR / "demo.toml").is_file() and load_recipe("demo").name == "demo"
    path = tmp_path / "my_recipe.toml"
    path.write_text('model = "mobilenet_v2"\nepochs = 2\n')
    recipe = load_recipe(str(path))
    assert (recipe.name, recipe.model, recipe.epochs) == ("my_recipe", "mobilenet_v2", 2)


def test_bad_choices_and_unknown_recipe_are_explained():
    with pytest.raises(ValueError, match="schedule must be one of"):
        Recipe(name="x", model="mobilenet_v2", schedule="cosine")
    with pytest.raises(ValueError, match="known recipes"):
        load_recipe("nope")
