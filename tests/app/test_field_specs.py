"""Field specs come from the config model's metadata, for every field."""

from typing import Literal, get_args

import pytest
from pydantic import BaseModel, Field

from app.field_specs import (
    SliderRange,
    format_number,
    format_numbers,
    leaf_paths,
    parse_number,
    parse_numbers,
    section_specs,
    slider_range,
)
from modules.config.schema import (
    DataConfig,
    DriftConfig,
    MaskConfig,
    ModelConfig,
    PriorConfig,
    SamplingConfig,
    TrainConfig,
    TrainingConfig,
)


def spec(model: type[BaseModel], name: str, prefix: str = "x"):
    return {s.name: s for s in section_specs(model, prefix)}[name]


def test_every_field_of_the_config_has_a_spec():
    paths = leaf_paths(TrainConfig, items=1)
    assert "prior.threshold" in paths and "data.concepts.0.caption.dropout" in paths
    assert len(paths) == len(set(paths))


def test_title_description_and_bounds_come_from_the_schema():
    gamma = spec(MaskConfig, "gamma", "mask")
    field = MaskConfig.model_fields["gamma"]
    assert (gamma.path, gamma.kind, gamma.title) == ("mask.gamma", "float", field.title)
    assert gamma.description == field.description
    assert (gamma.lower, gamma.lower_inclusive, gamma.upper, gamma.upper_inclusive) == (
        0.0,
        False,
        10.0,
        True,
    )
    assert gamma.description in gamma.tooltip() and "> 0 and ≤ 10" in gamma.tooltip()


def test_kinds():
    threshold = spec(PriorConfig, "threshold")
    assert threshold.kind == "float" and threshold.optional and threshold.default is None
    family = spec(ModelConfig, "family")
    assert family.kind == "choice"
    assert family.choices == get_args(ModelConfig.model_fields["family"].annotation)
    assert spec(SamplingConfig, "prompts").kind == "text_list"
    assert spec(DriftConfig, "timesteps").kind == "float_list"
    assert spec(MaskConfig, "enabled").kind == "bool"
    assert spec(TrainingConfig, "steps").kind == "int"
    concepts = spec(DataConfig, "concepts")
    assert concepts.kind == "section_list" and concepts.section.__name__ == "ConceptConfig"
    assert spec(TrainConfig, "mask").kind == "section"


def test_a_type_without_a_widget_fails_naming_the_field():
    class Odd(BaseModel):
        table: dict[str, int] = Field(default_factory=dict)

    with pytest.raises(TypeError, match=r"odd\.table"):
        section_specs(Odd, "odd")


def test_sliders_only_where_the_range_is_usable():
    assert slider_range(spec(MaskConfig, "gamma")) == SliderRange(0.01, 10.0, 0.01)
    # Exclusive bounds are not valid values: the slider stops one step inside.
    assert slider_range(spec(PriorConfig, "threshold")) == SliderRange(0.001, 0.999, 0.001)
    assert slider_range(spec(DataConfig, "resolution")) == SliderRange(16, 4096, 16)
    assert slider_range(spec(TrainingConfig, "steps")) is None  # 1 … 10 million
    assert slider_range(spec(TrainingConfig, "learning_rate")) is None  # 1e-4 in (0, 1]
    assert slider_range(spec(TrainingConfig, "seed")) is None


def test_slider_values_snap_to_clean_numbers():
    gamma = slider_range(spec(MaskConfig, "gamma"))
    assert gamma.snap(0.70000001) == 0.7
    assert gamma.snap(-3) == 0.01 and gamma.snap(99) == 10.0


@pytest.mark.parametrize("value", [0.0005, 1e-05, 0.7, 16.0, 3, 4294967295, 0.1 + 0.2])
def test_numbers_read_back_exactly(value):
    kind = "int" if isinstance(value, int) else "float"
    field_spec = spec(TrainingConfig, "seed" if kind == "int" else "learning_rate")
    assert parse_number(field_spec, format_number(value)) == value


def test_text_that_is_not_a_number_is_kept_for_validation_to_name():
    assert parse_number(spec(TrainingConfig, "steps"), " 1.5 ") == "1.5"
    assert format_number("abc") == "abc"


def test_number_lists_read_back_exactly_and_keep_what_is_not_a_number():
    assert format_numbers([0.25, 0.5, 0.1 + 0.2]) == "0.25, 0.5, 0.30000000000000004"
    assert parse_numbers(format_numbers([0.25, 0.5, 0.1 + 0.2])) == [0.25, 0.5, 0.1 + 0.2]
    assert parse_numbers(" 0.1 0.2,, 0.3 ") == [0.1, 0.2, 0.3]
    assert parse_numbers("0.1, half") == [0.1, "half"]
    assert parse_numbers("") == []


def test_literal_choices_are_strings():
    class Pick(BaseModel):
        mode: Literal["a", "b"] = "a"

    assert spec(Pick, "mode").choices == ("a", "b")


def test_family_only_fields_say_which_families_they_apply_to():
    wan = spec(ModelConfig, "wan", "model")
    assert wan.kind == "section" and wan.families == ("wan",)
    # A family's own options inherit its section's families.
    flow_shift = {s.name: s for s in section_specs(wan.section, wan.path, wan.families)}[
        "flow_shift"
    ]
    assert flow_shift.path == "model.wan.flow_shift" and flow_shift.families == ("wan",)
    assert flow_shift.applies_to("wan") and not flow_shift.applies_to("demo")
    path = spec(ModelConfig, "path", "model")
    assert path.families == () and path.applies_to("demo") and path.applies_to("wan")
