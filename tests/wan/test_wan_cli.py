"""End to end, as a user runs it: the public CLI trains a masked-prior WAN LoRA from the shipped
WAN preset on a tiny WAN folder and a tiny video dataset with masks, once in the preset's
ComfyUI layout and once in the diffusers layout; both files load back."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers
from safetensors import safe_open
from safetensors.torch import load_file

from modules.config import load_preset
from modules.lora import load_lora

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PRESET = "presets/wan-prior.json"
STEPS = 6
RANK, ALPHA = 4, 8  # alpha != rank: the ComfyUI file carries alpha, diffusers folds it in


def train(tiny_wan, video_concept, cache, run_dir, *extra):
    overrides = [
        f"model.path={tiny_wan}",
        f"data.concepts.0.path={video_concept}",
        f"data.cache_dir={cache}",
        "data.resolution=32",
        "data.frames=9",
        f"training.steps={STEPS}",
        "training.learning_rate=0.001",
        f"lora.rank={RANK}",
        f"lora.alpha={ALPHA}",
        "output.save_every=0",
        *extra,
    ]
    command = [sys.executable, "-m", "modules.cli", "train", PRESET]
    for override in overrides:
        command += ["--set", override]
    result = subprocess.run(
        [*command, "--run-dir", str(run_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def runs(tiny_wan, video_concept, tmp_path_factory):
    """The preset as shipped (ComfyUI layout), then the same run in the diffusers layout."""
    root = tmp_path_factory.mktemp("runs")
    comfy = train(tiny_wan, video_concept, root / "cache", root / "comfy")
    diffusers = train(
        tiny_wan, video_concept, root / "cache", root / "diffusers", "output.format=diffusers"
    )
    return {"comfy": (root / "comfy", comfy), "diffusers": (root / "diffusers", diffusers)}


def test_the_preset_has_the_recommended_settings():
    """Design §10, weighted masks, continuous mode; WAN memory settings for a GPU."""
    config = load_preset(REPO / PRESET)
    assert config.model.family == "wan" and config.model.dtype == "bfloat16"
    assert config.mask.enabled and config.mask.gamma == 0.7 and config.mask.min_weight == 0.0
    assert config.mask.normalize_per_sample and config.prior.weight == 1.0
    assert config.prior.threshold is None
    assert config.training.mixed_precision == "bf16" and config.training.gradient_checkpointing
    assert (config.data.frames - 1) % 4 == 0 and config.output.format == "comfyui"


def test_training_logs_both_loss_terms_with_the_teacher_on_every_step(runs):
    run_dir, result = runs["comfy"]
    assert "MASKED PRIOR PRESERVATION TRAINING ENABLED" in result.stdout
    assert "4 items (3 clips, 1 image): 4 with a mask, 0 without." in result.stdout
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == STEPS
    assert all(x["teacher_fraction"] == 1.0 and x["loss_target"] > 0 for x in lines)
    assert all(x["loss_prior"] > 0 for x in lines[1:])  # 0 at step 1: the LoRA starts at base
    assert 0 < lines[0]["prior_weight_mean"] < 1
    resolved = json.loads((run_dir / "lora.json").read_text())
    assert resolved["model"]["family"] == "wan" and resolved["data"]["frames"] == 9


def test_the_second_run_reuses_the_cache(runs):
    _, result = runs["diffusers"]
    assert "latents 4 reused, 0 encoded" in result.stdout
    assert "Caching latents" not in result.stdout


def test_the_diffusers_file_loads_through_the_wan_pipeline(runs, tiny_wan):
    path = runs["diffusers"][0] / "lora.safetensors"
    with safe_open(str(path), "pt") as handle:
        assert all(k.startswith("transformer.blocks.") for k in handle.keys())  # noqa: SIM118
    pipeline = WanPipeline.from_pretrained(tiny_wan, local_files_only=True)
    inputs = _inputs()
    base = _velocity(pipeline.transformer, *inputs)
    pipeline.load_lora_weights(str(path))
    tuned = _velocity(pipeline.transformer, *inputs)
    assert not torch.allclose(tuned, base, atol=1e-5)
    fresh = WanTransformer3DModel.from_pretrained(tiny_wan / "transformer")
    load_lora(fresh, path)
    assert torch.allclose(_velocity(fresh, *inputs), tuned, atol=1e-6)


def test_the_comfyui_file_converts_back_to_the_diffusers_tensors(runs, tiny_wan):
    comfy = runs["comfy"][0] / "lora.safetensors"
    state = load_file(comfy)
    assert all(k.startswith("diffusion_model.blocks.") for k in state)
    assert float(state["diffusion_model.blocks.0.self_attn.q.alpha"]) == ALPHA
    reference = load_file(runs["diffusers"][0] / "lora.safetensors")
    converted = _convert_non_diffusers_wan_lora_to_diffusers(state)
    assert set(converted) == set(reference)
    for key, value in reference.items():
        # diffusers folds alpha / rank = 2 into the down (lora_A) matrix.
        expected = value * (ALPHA / RANK) if ".lora_A." in key else value
        # Two runs with one seed on one machine; a tolerance in case kernels differ per run.
        assert torch.allclose(converted[key], expected, rtol=1e-4, atol=1e-7), key
    # And the pipeline's own loader reads it to the same model as the diffusers file.
    pipeline = WanPipeline.from_pretrained(tiny_wan, local_files_only=True)
    pipeline.load_lora_weights(str(comfy))
    fresh = WanTransformer3DModel.from_pretrained(tiny_wan / "transformer")
    load_lora(fresh, runs["diffusers"][0] / "lora.safetensors")
    inputs = _inputs()
    assert torch.allclose(_velocity(pipeline.transformer, *inputs), _velocity(fresh, *inputs))


def _inputs():
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, 16, 3, 4, 4, generator=generator)
    text = torch.randn(1, 512, 32, generator=generator)
    return noisy, torch.tensor([500.0]), text


@torch.no_grad()
def _velocity(transformer, noisy, timestep, text):
    return transformer(noisy, timestep, text, return_dict=False)[0]
