"""The WAN config fields: bounds, the 4n+1 frame rule, family checks, WAN-only warnings."""

import subprocess
import sys
from pathlib import Path

import pytest

from modules.config import ConfigError, apply_overrides, config_from_dict, config_warnings
from modules.config.schema import TrainConfig

REPO = Path(__file__).resolve().parents[2]


def wan(**sections):
    return config_from_dict({"model": {"family": "wan", "path": "w"}, **sections})


def test_wan_defaults_are_valid_and_demo_defaults_unchanged():
    config = wan()
    assert config.model.wan.flow_shift is None and config.model.wan.expert == "auto"
    assert (config.data.frames, config.data.fps, config.output.format) == (1, 16.0, "diffusers")
    assert config_warnings(TrainConfig()) == []


@pytest.mark.parametrize(("frames", "fix"), [(8, "use 5 or 9"), (2, "use 1 or 5"), (80, "81")])
def test_frames_must_be_4n_plus_1(frames, fix):
    with pytest.raises(ConfigError, match=rf"data.frames: {frames} is not 4n\+1 .*{fix}"):
        wan(data={"frames": frames})
    assert wan(data={"frames": frames - (frames - 1) % 4}).data.frames % 4 == 1


def test_clips_need_a_video_family():
    with pytest.raises(ConfigError, match="data.frames: model.family=demo trains images only"):
        config_from_dict({"data": {"frames": 5}})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "model.wan.flow_shift=0.5",
            "model.wan.flow_shift: Input should be greater than or equal to 1",
        ),
        ("model.wan.expert=middle", "model.wan.expert: Input should be 'auto', 'high_noise'"),
        ("model.flow_shift=5", "unknown field 'flow_shift'; did you mean 'model.wan.flow_shift'"),
        ("output.format=kohya", "output.format: Input should be 'diffusers' or 'comfyui'"),
        ("data.fps=-1", "data.fps: Input should be greater than or equal to 0"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(wan(), [override])


def test_wan_options_on_another_family_are_warnings():
    config = config_from_dict({"model": {"wan": {"flow_shift": 5.0, "expert": "low_noise"}}})
    warnings = config_warnings(config)
    for name in ("model.wan.flow_shift", "model.wan.expert"):
        assert f"{name} is a wan option; model.family=demo ignores it." in warnings
    assert not any("wan option" in w for w in config_warnings(wan(model={"family": "wan"})))


def test_version_1_presets_move_the_wan_options_to_their_section():
    """Presets written before the families had their own sections load unchanged."""
    old = {
        "schema_version": 1,
        "model": {"family": "wan", "path": "w", "flow_shift": 5.0, "expert": "low_noise"},
    }
    config = config_from_dict(old)
    assert (config.model.wan.flow_shift, config.model.wan.expert) == (5.0, "low_noise")
    assert config.model.wan.transformer_file == ""
    assert config.model.memory.base_weights == "auto"
    with pytest.raises(ConfigError, match="did you mean 'model.wan.expert'"):
        config_from_dict({**old, "schema_version": 2})


def test_cli_check_names_the_frames_field_and_the_fix():
    command = [sys.executable, "-m", "modules.cli", "check", "presets/wan-prior.json"]
    result = subprocess.run(
        [*command, "--set", "data.frames=32"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "data.frames: 32 is not 4n+1" in result.stderr and "use 29 or 33" in result.stderr
