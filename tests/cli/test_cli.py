"""The public command line, run as a user runs it: a subprocess on the shipped presets."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from modules.lora import load_lora
from modules.models.demo.family import DemoFamily, build_demo_model

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


@pytest.mark.slow
def test_demo_prior_preset_trains_30_steps(tmp_path):
    run_dir = tmp_path / "D"
    started = time.monotonic()
    result = cli(
        "train",
        "presets/demo-prior.json",
        "--set",
        "training.steps=30",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
        "--run-dir",
        str(run_dir),
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert elapsed < 120
    assert "MASKED PRIOR PRESERVATION TRAINING ENABLED" in result.stdout
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lines = [row for row in rows if "loss_total" in row]  # drift readings may add rows
    assert len(lines) == 30
    assert all(x["loss_target"] > 0 and x["teacher_fraction"] == 1.0 for x in lines)
    assert sum(x["loss_prior"] > 0 for x in lines) >= 25
    assert (run_dir / "lora.safetensors").is_file() and (run_dir / "lora.json").is_file()
    resolved = json.loads((run_dir / "lora.json").read_text())
    assert resolved["training"]["steps"] == 30 and resolved["prior"]["weight"] == 1.0
    # The saved LoRA reloads through diffusers and changes the base model's output.
    family, model = DemoFamily(), build_demo_model(seed=0)
    text = family.encode_prompts(model, ["a sks heart on a plain background"])
    noisy, t = (
        torch.randn(1, 48, 16, 16, generator=torch.Generator().manual_seed(0)),
        torch.tensor([0.5]),
    )
    with torch.no_grad():
        base = family.predict(model, noisy, t, text)
        load_lora(model.denoiser, run_dir / "lora.safetensors")
        assert not torch.allclose(family.predict(model, noisy, t, text), base, atol=1e-5)
