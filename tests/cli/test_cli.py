"""The public command line, run as a user runs it: a subprocess on the shipped presets."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def cli(*args, timeout=300, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "modules.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def test_threshold_out_of_range_exits_non_zero_naming_the_field(tmp_path):
    result = cli("train", "presets/demo-prior.json", "--set", "prior.threshold=1.5")
    assert result.returncode == 2
    assert "prior.threshold" in result.stderr and "less than 1" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_key_in_a_preset_exits_non_zero_naming_the_field(tmp_path):
    preset = json.loads((REPO / "presets/demo-prior.json").read_text())
    preset["mask"]["gama"] = 0.5
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(preset))
    result = cli("train", str(path))
    assert result.returncode == 2
    assert "unknown field 'mask.gama'; did you mean 'gamma'?" in result.stderr
    assert str(path) in result.stderr


def test_check_validates_every_shipped_preset():
    for preset in sorted((REPO / "presets").glob("demo-*.json")):
        result = cli("check", str(preset.relative_to(REPO)))
        assert result.returncode == 0, result.stderr
        assert f"{preset.relative_to(REPO)}: OK" in result.stdout
    # The WAN preset is a template: its config is valid, and check names both paths to fill in.
    result = cli("check", "presets/wan-prior.json")
    assert result.returncode == 2
    assert "model.path: 'models/Wan2.1-T2V-1.3B-Diffusers' does not exist" in result.stderr
    assert "concept folder 'datasets/my-subject' does not exist" in result.stderr
