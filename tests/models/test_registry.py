"""The family interface: declarations readable without torch, code imported only when used,
each family's options and LoRA targets validated with the rest of the config."""

import subprocess
import sys
from pathlib import Path

import pytest

from modules.config import ConfigError, config_from_dict
from modules.config.schema import ModelConfig, TrainConfig
from modules.models.registry import SPECS, family_spec
from modules.models.spec import FamilyOptions, LatentGrid
from modules.trainer.preflight import preflight

REPO = Path(__file__).resolve().parents[2]


def python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_config_and_every_declaration_load_without_torch():
    """What the UI and the CLI's check read: the config, presets, each family's spec."""
    out = python(
        "import sys\n"
        "from modules.config import load_preset\n"
        "from modules.models.registry import SPECS\n"
        "for name in sorted(__import__('pathlib').Path('presets').glob('*.json')):\n"
        "    load_preset(name)\n"
        "grids = [spec.latent_grid('') for spec in SPECS.values()]\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    assert out == "[]"


def test_a_family_s_code_is_imported_only_when_it_is_used():
    out = python(
        "import sys\n"
        "from modules.config.schema import ModelConfig\n"
        "from modules.models import get_family\n"
        "family = get_family(ModelConfig(family='demo'))\n"
        "print(family.name, 'modules.models.wan.family' in sys.modules)"
    )
    assert out == "demo False"


def test_every_family_declares_plain_data():
    for name, spec in SPECS.items():
        assert spec.name == name and spec.title
        assert issubclass(spec.options, FamilyOptions)
        assert spec.lora_targets and all(
            isinstance(modules, tuple) and modules for modules in spec.lora_targets.values()
        )
        assert isinstance(spec.grid, LatentGrid)
        assert spec.grid.pixel_multiple % spec.grid.pixels_per_cell == 0
    assert family_spec("demo").grid == LatentGrid(pixels_per_cell=4, pixel_multiple=16)
    with pytest.raises(LookupError, match="model.family: unknown family 'nope'; known: demo"):
        family_spec("nope")


def test_a_family_s_options_are_its_own_section():
    assert ModelConfig.model_fields["wan"].annotation is SPECS["wan"].options
    assert "demo" not in ModelConfig.model_fields  # no options, no section
    config = config_from_dict({"model": {"family": "wan", "path": "w", "wan": {"flow_shift": 5}}})
    assert config.model.wan.flow_shift == 5.0
    with pytest.raises(ConfigError, match="unknown field 'model.wan.flow_shfit'; did you mean"):
        config_from_dict({"model": {"wan": {"flow_shfit": 5}}})


def test_lora_targets_are_checked_against_the_family_s_presets():
    with pytest.raises(
        ConfigError,
        match="lora.targets: model.family=wan has no 'attention_conv' preset; choose one of "
        "attention, attention_ffn",
    ):
        config_from_dict(
            {"model": {"family": "wan", "path": "w"}, "lora": {"targets": "attention_conv"}}
        )
    assert (
        config_from_dict({"lora": {"targets": "attention_conv"}}).lora.targets == "attention_conv"
    )


def test_a_family_s_file_option_is_checked_before_loading(tmp_path):
    config = TrainConfig.model_validate(
        {
            "model": {
                "family": "wan",
                "path": str(tmp_path),
                "wan": {"transformer_file": str(tmp_path / "gone.safetensors")},
            },
            "data": {"concepts": [{"path": str(tmp_path)}], "cache_dir": str(tmp_path / "c")},
            "output": {"run_dir": str(tmp_path / "run")},
        }
    )
    with pytest.raises(ConfigError, match=r"model.wan.transformer_file: '.*gone.safetensors' is"):
        preflight(config, create_run_dir=False)


def test_the_resolution_must_fit_the_family_s_grid(tmp_path, tiny_wan_ti2v):
    """WAN TI2V 5B's grid (16 px cells, 2x2 patches) read from the folder, before loading."""
    config = TrainConfig.model_validate(
        {
            "model": {"family": "wan", "path": str(tiny_wan_ti2v)},
            "data": {
                "concepts": [{"path": str(tmp_path)}],
                "resolution": 48,
                "cache_dir": str(tmp_path / "c"),
                "buckets": False,
            },
            "output": {"run_dir": str(tmp_path / "run")},
        }
    )
    with pytest.raises(
        ConfigError,
        match="data.resolution: 48 is not a multiple of 32, the pixel multiple of this wan "
        r"model \(16 px per latent cell\); use 32 or 64",
    ):
        preflight(config, create_run_dir=False)
    # With buckets the sides are made multiples of 32 whatever the resolution; a set sample
    # size must be one.
    config.data.buckets = True
    config.sampling.width, config.sampling.height = 48, 64
    with pytest.raises(ConfigError, match="sampling.width: 48 is not a multiple of 32") as found:
        preflight(config, create_run_dir=False)
    assert "data.resolution" not in str(found.value) and "sampling.height" not in str(found.value)
