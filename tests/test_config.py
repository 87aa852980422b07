"""Integer and choice fields of the three configs are checked the one way, naming the config and the field."""

import pytest

from spectral_peft import FastFourierFTConfig, LocaConfig, S2FTConfig

BAD_VALUES = [
    (LocaConfig, "coefficient_steps", -1, "an integer >= 0"),
    (LocaConfig, "location_steps", True, "an integer >= 0"),
    (LocaConfig, "location_learning_steps", 2.0, "None or an integer >= 0"),
    (LocaConfig, "location_seed", "7", "None or an integer"),
    (S2FTConfig, "prior_rank", 0, "an integer >= 1"),
    (S2FTConfig, "prior_steps", None, "an integer >= 1"),
    (S2FTConfig, "refine_passes", -1, "an integer >= 0"),
    (S2FTConfig, "ordering_seed", 1.5, "an integer"),
    (S2FTConfig, "ordering", "greedy", "one of"),
    (S2FTConfig, "prior", "svd", "one of"),
    (FastFourierFTConfig, "random_loc_seed", None, "an integer"),
]


@pytest.mark.parametrize("config_class,field_name,value,expected", BAD_VALUES)
def test_bad_field_names_config_field_and_expectation(config_class, field_name, value, expected):
    with pytest.raises(ValueError, match=rf"{config_class.__name__}\.{field_name} must be {expected}.*got {value!r}"):
        config_class(target_modules=["query"], **{field_name: value})


@pytest.mark.parametrize("config_class,field_name,value", [
    (LocaConfig, "location_learning_steps", None), (LocaConfig, "location_learning_steps", 0),
    (LocaConfig, "location_seed", -5), (S2FTConfig, "refine_passes", 0), (S2FTConfig, "ordering", "none"),
])
def test_good_field_values_are_kept(config_class, field_name, value):
    assert getattr(config_class(target_modules=["query"], **{field_name: value}), field_name) == value
