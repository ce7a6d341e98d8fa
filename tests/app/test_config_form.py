"""Validation of the form's values is the config model's, mapped back to field paths."""

from app.config_form import error_messages, lookup, nest, validate_values
from modules.config import TrainConfig
from modules.config.schema import ConceptConfig


def values(**changes):
    data = TrainConfig(data={"concepts": [ConceptConfig(path="x")]}).model_dump()
    for path, value in changes.items():
        *parents, name = path.split("__")
        node = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[name] = value
    return data


def test_valid_values_give_the_config_and_its_warnings():
    result = validate_values(values(prior__weight=1.0, mask__enabled=True), set())
    assert result.config is not None and result.config.prior.weight == 1.0
    assert any("normalize_per_sample" in warning for warning in result.warnings)
    assert result.blockers == []


def test_field_errors_go_to_their_paths():
    known = {"prior.threshold", "mask.gamma", "data.concepts.0.repeats"}
    result = validate_values(
        values(prior__threshold=1.5, mask__gamma="abc", data__concepts__0__repeats=0), known
    )
    assert result.config is None
    assert result.errors["prior.threshold"] == "Input should be less than 1"
    assert "valid number" in result.errors["mask.gamma"]
    assert "greater than or equal to 1" in result.errors["data.concepts.0.repeats"]
    assert "prior.threshold: Input should be less than 1" in result.blockers


def test_an_error_in_a_list_item_goes_to_the_list_row():
    known = {"drift.timesteps"}
    result = validate_values(values(drift__timesteps=[0.5, "half"]), known)
    assert result.errors["drift.timesteps"].startswith("item 2: Input should be a valid number")
    result = validate_values(values(drift__timesteps=[0.5, 1.5]), known)
    assert result.errors["drift.timesteps"].startswith("1.5 not between 0 and 1")


def test_cross_field_rule_goes_to_the_field_it_names():
    result = validate_values(values(prior__weight=1.0), {"prior.weight"})
    assert result.errors["prior.weight"].startswith("masked prior preservation needs masks")


def test_errors_without_a_row_are_general():
    result = validate_values(values(prior__threshold=1.5), set())
    assert result.general == ["prior.threshold: Input should be less than 1"]


def test_no_concepts_blocks_start():
    result = validate_values(TrainConfig().model_dump(), set())
    assert result.config is not None
    assert result.blockers == ["data.concepts: add at least one concept folder on the Concepts tab"]


def test_error_messages_of_a_root_error_without_a_path():
    from pydantic import ValidationError

    try:
        TrainConfig.model_validate({"prior": {"weight": 1.0}})
    except ValidationError as error:
        ((path, message),) = error_messages(error)
    assert path == "prior.weight" and "mask.enabled=true" in message


def test_nest_and_lookup():
    nested = nest({"a.b": 1, "a.c": 2, "d": 3})
    assert nested == {"a": {"b": 1, "c": 2}, "d": 3}
    assert lookup({"x": [{"y": 5}]}, "x.0.y") == 5
