import json

import pytest

from modules.config import (
    SCHEMA_VERSION,
    ConfigError,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_warnings,
    load_preset,
    preset_dict,
    save_preset,
)
from modules.config.presets import MIGRATIONS
from modules.config.schema import Section


def _all_fields(model=TrainConfig, prefix=""):
    for name, field in model.model_fields.items():
        yield f"{prefix}{name}", field
        annotation = field.annotation
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, Section):
                yield from _all_fields(candidate, f"{prefix}{name}.")


def test_every_field_has_a_title_and_a_description():
    for path, field in _all_fields():
        assert field.title, path
        is_section = isinstance(field.annotation, type) and issubclass(field.annotation, Section)
        assert is_section or field.description, f"{path} has no description"


def test_numeric_fields_have_bounds():
    for path, field in _all_fields():
        if field.annotation in (int, float):
            bounds = {type(m).__name__ for m in field.metadata}
            assert bounds & {"Ge", "Gt"} and bounds & {"Le", "Lt"}, f"{path} lacks bounds"


def test_defaults_are_valid_and_sparse_preset_is_just_the_version():
    assert preset_dict(TrainConfig()) == {"schema_version": SCHEMA_VERSION}


def test_round_trip_keeps_values(tmp_path):
    config = config_from_dict(
        {"schema_version": 1, "mask": {"enabled": True, "gamma": 0.7}, "prior": {"weight": 1.0}}
    )
    path = tmp_path / "p.json"
    save_preset(config, path)
    data = json.loads(path.read_text())
    assert data == {
        "schema_version": SCHEMA_VERSION,
        "data": {"buckets": False},  # a preset from before buckets keeps its square crop
        "mask": {"enabled": True, "gamma": 0.7},
        "prior": {"weight": 1.0},
    }
    assert load_preset(path) == config


def test_save_is_atomic_and_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    save_preset(TrainConfig(), path)
    before = path.read_text()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("modules.config.presets.os.replace", explode)
    config = apply_overrides(TrainConfig(), ["training.steps=7"])
    with pytest.raises(OSError):
        save_preset(config, path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]


def test_unknown_key_names_the_field_and_suggests_the_fix():
    with pytest.raises(ConfigError, match=r"unknown field 'mask\.gama'; did you mean 'gamma'"):
        config_from_dict({"schema_version": 1, "mask": {"gama": 0.5}}, "my.json")


def test_unknown_key_inside_a_concept():
    with pytest.raises(ConfigError, match=r"data\.concepts\.0\.repeat"):
        config_from_dict({"data": {"concepts": [{"path": "x", "repeat": 2}]}})


def test_threshold_out_of_range_names_the_field():
    with pytest.raises(ConfigError, match=r"prior\.threshold: Input should be less than 1"):
        apply_overrides(TrainConfig(), ["prior.threshold=1.5"])
    with pytest.raises(ConfigError, match=r"prior\.threshold"):
        apply_overrides(TrainConfig(), ["prior.threshold=0"])


def test_prior_preservation_needs_masks():
    with pytest.raises(ConfigError, match=r"prior\.weight: masked prior preservation needs masks"):
        apply_overrides(TrainConfig(), ["prior.weight=1"])
    config = apply_overrides(TrainConfig(), ["mask.enabled=true", "prior.weight=1"])
    assert config.prior.weight == 1.0


def test_overrides_are_type_checked():
    with pytest.raises(ConfigError, match=r"training\.steps: Input should be a valid integer"):
        apply_overrides(TrainConfig(), ["training.steps=many"])
    with pytest.raises(ConfigError, match=r"unknown field 'stepz'; did you mean 'steps'"):
        apply_overrides(TrainConfig(), ["training.stepz=3"])
    with pytest.raises(ConfigError, match="section.field=value"):
        apply_overrides(TrainConfig(), ["training.steps"])


def test_overrides_parse_json_none_and_list_indexes():
    config = config_from_dict({"data": {"concepts": [{"path": "a"}, {"path": "b"}]}})
    config = apply_overrides(
        config,
        [
            "data.concepts.1.type=prior_prediction",
            'sampling.prompts=["a star", "a ring"]',
            "output.name=123",
            "prior.threshold=none",
            "mask.enabled=true",
        ],
    )
    assert config.data.concepts[1].type == "prior_prediction"
    assert config.sampling.prompts == ["a star", "a ring"]
    assert config.output.name == "123"
    assert config.prior.threshold is None and config.mask.enabled is True
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides(config, ["data.concepts.5.path=x"])


def test_migration_from_version_0():
    assert 0 in MIGRATIONS
    config = config_from_dict(
        {"mask": {"enabled": True}, "prior": {"preservation_weight": 0.5}}  # no version: v0
    )
    assert config.prior.weight == 0.5


def test_version_2_presets_keep_the_square_crop_and_new_ones_bucket():
    assert 2 in MIGRATIONS
    old = config_from_dict({"schema_version": 2, "data": {"resolution": 512}})
    assert old.data.buckets is False and old.data.resolution == 512
    said = config_from_dict({"schema_version": 2, "data": {"buckets": True}})
    assert said.data.buckets is True
    assert config_from_dict({"schema_version": SCHEMA_VERSION}).data.buckets is True
    assert TrainConfig().data.buckets is True


def test_newer_schema_version_is_refused():
    with pytest.raises(ConfigError, match="newer than this program"):
        config_from_dict({"schema_version": SCHEMA_VERSION + 1})


def test_invalid_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{ not json")
    with pytest.raises(ConfigError, match=r"broken\.json: not valid JSON \(line 1"):
        load_preset(path)
    with pytest.raises(ConfigError, match="preset file not found"):
        load_preset(tmp_path / "missing.json")


def test_design_warnings():
    config = apply_overrides(
        TrainConfig(),
        ["mask.enabled=true", "prior.weight=1", "mask.min_weight=0.05", "prior.threshold=0.1"],
    )
    text = "\n".join(config_warnings(config))
    assert "reduces the prior effect" in text
    assert "threshold mode removes the overlap" in text
    assert "normalize_per_sample is off" in text
    clean = apply_overrides(
        TrainConfig(), ["mask.enabled=true", "prior.weight=1", "mask.normalize_per_sample=true"]
    )
    assert config_warnings(clean) == []


@pytest.mark.parametrize("family", ["wan", "flux1", "flux2", "qwen_image"])
def test_version_3_fp8_base_moves_to_model_memory(family):
    assert 3 in MIGRATIONS
    on = config_from_dict({"schema_version": 3, "model": {family: {"fp8_base": True}}})
    assert on.model.memory.base_weights == "fp8"
    off = config_from_dict({"schema_version": 3, "model": {family: {"fp8_base": False}}})
    assert off.model.memory.base_weights == "auto"
    assert preset_dict(off) == {"schema_version": SCHEMA_VERSION}  # false just goes
    assert preset_dict(on) == {
        "schema_version": SCHEMA_VERSION,
        "model": {"memory": {"base_weights": "fp8"}},
    }


def test_version_1_fp8_base_arrives_in_model_memory():
    """Version 1 kept WAN's options under ``model``: v1→v2 moves it to ``model.wan``, v3→v4 on."""
    config = config_from_dict(
        {"schema_version": 1, "model": {"family": "wan", "fp8_base": True, "flow_shift": 5.0}}
    )
    assert config.model.memory.base_weights == "fp8" and config.model.wan.flow_shift == 5.0
    assert "fp8_base" not in config.model.wan.model_dump()


def test_fp8_base_in_a_current_preset_or_override_says_where_it_went():
    moved = r"fp8_base'; it moved to 'model\.memory\.base_weights' \(fp8_base true is .*'fp8'"
    with pytest.raises(ConfigError, match=r"--set model\.wan\.fp8_base: unknown field '" + moved):
        apply_overrides(TrainConfig(), ["model.wan.fp8_base=true"])
    with pytest.raises(ConfigError, match=r"unknown field 'model\.flux2\.fp8_base'; it moved"):
        config_from_dict({"schema_version": SCHEMA_VERSION, "model": {"flux2": {"fp8_base": 1}}})
    with pytest.raises(ConfigError, match=r"unknown field 'model\.fp8_base'; it moved"):
        config_from_dict({"schema_version": SCHEMA_VERSION, "model": {"fp8_base": True}})
    # A value that is not true or false is not guessed at: validation names it where it was.
    with pytest.raises(ConfigError, match=r"unknown field 'model\.wan\.fp8_base'; it moved"):
        config_from_dict({"schema_version": 3, "model": {"wan": {"fp8_base": "yes"}}})
    config = apply_overrides(TrainConfig(), ["model.memory.base_weights=fp8"])
    assert config.model.memory.base_weights == "fp8"
    with pytest.raises(ConfigError, match=r"model\.memory\.base_weights: Input should be 'auto'"):
        apply_overrides(TrainConfig(), ["model.memory.base_weights=fp4"])
