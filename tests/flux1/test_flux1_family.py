"""The flux1 family on tiny real FLUX.1 folders: the pipeline's encodings, packing on any grid,
the teacher equal to a separately loaded base, the shift by token count, and the public CLI
training a masked-prior LoRA from the shipped preset that the FLUX pipeline loads back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file

from modules.config.schema import ModelConfig
from modules.lora import add_lora, lora_disabled
from modules.lora.init_from import init_lora_from
from modules.loss import masked_prior_loss
from modules.models import ModelLoadError, get_family, load_model
from modules.models.packing import pack, unpack
from tests.flux1.tiny_flux1 import build_tiny_flux1
from tests.runner_check import assert_predict_goes_through_the_runner
from tests.trained_lora import SAMPLES, train_in_process, train_preset

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
TOKENS = 16


@pytest.fixture(scope="module", params=["dev", "schnell"])
def folder(request, tmp_path_factory):
    return build_tiny_flux1(tmp_path_factory.mktemp("flux1") / request.param, variant=request.param)


def load(folder):
    config = ModelConfig(family="flux1", path=str(folder), flux1={"text_tokens": TOKENS})
    family = get_family(config)
    return family, load_model(family, config, dtype=torch.float32, device=CPU)


def test_encodings_and_latents_are_the_pipeline_s(folder):
    family, model = load(folder)
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    text = family.encode_prompts(model, ["a photo of sks star", "a red cat"])
    embeds, pooled, _ = pipe.encode_prompt(
        ["a photo of sks star", "a red cat"], prompt_2=None, max_sequence_length=TOKENS
    )
    assert torch.allclose(text["embeds"], embeds, atol=1e-5)
    assert torch.allclose(text["pooled"], pooled, atol=1e-5)
    images = torch.rand(1, 3, 48, 64) * 2 - 1  # non-square: 6 x 8 latent cells
    latents = family.encode_images(model, images)
    expected = pipe.vae.encode(images).latent_dist.mode()
    config = pipe.vae.config
    assert latents.shape == (1, 16, 6, 8)
    assert torch.allclose(latents, (expected - config.shift_factor) * config.scaling_factor)
    assert torch.equal(pack(latents), pipe._pack_latents(latents, 1, 16, 6, 8))
    assert torch.equal(unpack(pack(latents), 16, 6, 8), latents)


def test_teacher_is_the_base_on_a_non_square_grid_and_the_loss_takes_it(folder):
    family, model = load(folder)
    base = FluxTransformer2DModel.from_pretrained(folder / "transformer")
    text = family.encode_prompts(model, ["a photo of sks star"] * 2)
    family.release_encoders(model, keep_decoder=False)
    add_lora(model.denoiser, rank=2, alpha=2, dropout=0.0, target_modules=["to_q", "proj_mlp"])
    with torch.no_grad():
        for name, param in model.denoiser.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(0))
    noisy, t = torch.randn(2, 16, 6, 8), torch.tensor([0.3, 0.8])
    student = family.predict(model, noisy, t, text)
    assert_predict_goes_through_the_runner(family, model, noisy, t, text, student)
    with torch.no_grad(), lora_disabled(model.denoiser):
        teacher = family.predict(model, noisy, t, text)
    plain = type(family)(family.options)
    plain.guided = family.guided
    with torch.no_grad():
        reference = plain.predict(
            type(model)(denoiser=base, identity="", parts=model.parts), noisy, t, text
        )
    assert student.shape == noisy.shape == (2, 16, 6, 8)
    assert torch.equal(teacher, reference) and not torch.allclose(student, teacher)
    mask = torch.zeros(2, 1, 6, 8)
    mask[:, :, 1:4, 2:6] = 1.0
    loss = masked_prior_loss(
        (student - noisy) ** 2,
        mask,
        prior_loss=(student - teacher) ** 2,
        prior_weight=1.0,
        normalize_per_sample=True,
        layout="video",
    )
    loss.total.backward()
    assert torch.isfinite(loss.total) and float(loss.prior.detach()) > 0


def test_timesteps_shift_with_the_token_count_as_the_pipeline_does(folder):
    family, _ = load(folder)
    draw = lambda side: family.sample_timesteps(  # noqa: E731
        torch.Size([4000, 16, side, side]), generator=torch.Generator().manual_seed(0), device=CPU
    )
    small, large = draw(16), draw(128)
    if family.guided:  # dev: dynamic shifting, more tokens → more noise
        assert float(large.mean()) > float(small.mean()) + 0.05
    else:  # schnell: shift 1, uniform
        assert torch.equal(small, large) and float(small.mean()) == pytest.approx(0.5, abs=0.02)


# ------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux1-runs")
    flux = build_tiny_flux1(root / "dev", variant="dev")
    tokens = f"model.flux1.text_tokens={TOKENS}"

    def train(name, *extra):
        return train_preset("presets/flux1-prior.json", root, name, flux, tokens, *extra)

    return flux, train("comfy"), train("diffusers", "output.format=diffusers", *SAMPLES)


@pytest.mark.slow
def test_the_preset_trains_with_the_teacher_and_the_lora_loads_in_the_pipeline(runs):
    flux, comfy, diffusers = runs
    rows = [json.loads(x) for x in (diffusers / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["teacher_fraction"] > 0 for r in rows) and rows[-1]["loss_prior"] > 0
    # Samples with the family's own sampler, beside the base model's.
    assert (diffusers / "samples/step000003-0-pair.png").is_file()
    pipe = FluxPipeline.from_pretrained(flux, local_files_only=True)
    inputs = _inputs()
    before = _velocity(pipe.transformer, *inputs)
    pipe.load_lora_weights(str(diffusers / "lora.safetensors"))
    after = _velocity(pipe.transformer, *inputs)
    assert not torch.allclose(before, after, atol=1e-6)
    # The ComfyUI file: diffusers names with a per-module alpha, read back tensor for tensor.
    reference = load_file(diffusers / "lora.safetensors")
    state, alphas = FluxPipeline.lora_state_dict(
        str(comfy / "lora.safetensors"), return_alphas=True
    )
    assert set(state) == set(reference) and {float(a) for a in alphas.values()} == {8.0}
    for key, value in reference.items():
        assert torch.allclose(state[key], value, rtol=1e-4, atol=1e-7), key
    other = FluxPipeline.from_pretrained(flux, local_files_only=True)
    other.load_lora_weights(str(comfy / "lora.safetensors"))
    assert torch.allclose(_velocity(other.transformer, *inputs), after, atol=1e-5)


def _inputs():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, 4, 64, generator=generator)  # a 2 x 2 grid of packed tokens
    embeds = torch.randn(1, TOKENS, 32, generator=generator)
    pooled = torch.randn(1, 32, generator=generator)
    return tokens, embeds, pooled


@pytest.mark.slow
def test_a_run_starts_from_either_file_as_the_pipeline_loads_it(runs):
    flux, comfy, diffusers = runs
    inputs = _inputs()
    """lora.init_from, at another rank and alpha than the file's: the run's LoRA predicts as
    the pipeline does with the file loaded, for the diffusers and the ComfyUI file alike."""
    pipe = FluxPipeline.from_pretrained(flux, local_files_only=True)
    pipe.load_lora_weights(str(diffusers / "lora.safetensors"))
    expected = _velocity(pipe.transformer, *inputs)
    for file in (diffusers / "lora.safetensors", comfy / "lora.safetensors"):
        family, model = load(flux)
        add_lora(
            model.denoiser,
            rank=6,
            alpha=5,
            dropout=0.0,
            target_modules=family.lora_targets(model)["attention_ffn"],
        )
        report = init_lora_from(model.denoiser, file, family.lora_loader(model))
        assert report.file_rank == 4 and report.kept == pytest.approx(1.0), file
        assert torch.allclose(_velocity(model.denoiser, *inputs), expected, atol=1e-5), file


def _velocity(transformer, tokens, embeds, pooled):
    ids = torch.tensor([[0.0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]])
    with torch.no_grad():
        return transformer(
            hidden_states=tokens,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=torch.tensor([0.5]),
            img_ids=ids,
            txt_ids=torch.zeros(TOKENS, 3),
            guidance=torch.tensor([1.0]),
            return_dict=False,
        )[0]


def test_a_corrupt_scheduler_config_is_named_not_replaced_by_defaults(tmp_path):
    folder = build_tiny_flux1(tmp_path / "dev", variant="dev")
    (folder / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"cannot read .*scheduler_config.json"):
        load(folder)


@pytest.mark.slow
def test_the_saved_lora_in_the_pipeline_predicts_as_the_trained_model(tmp_path):
    folder = build_tiny_flux1(tmp_path / "dev", variant="dev")
    model = {"family": "flux1", "path": str(folder), "flux1": {"text_tokens": TOKENS}}
    trained, lora = train_in_process(tmp_path, model)
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    base = _velocity(pipe.transformer, *_inputs())
    pipe.load_lora_weights(str(lora))
    loaded = _velocity(pipe.transformer, *_inputs())
    assert torch.allclose(loaded, _velocity(trained, *_inputs()), atol=1e-5)
    assert not torch.allclose(loaded, base, atol=1e-5)
