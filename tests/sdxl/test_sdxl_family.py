"""The sdxl family on tiny real SDXL folders (epsilon and v-prediction): the pipeline's
encodings, latents, size and crop ids and samples, DDPM noise and targets, noise fractions that
mean flow matching's noise level, the teacher equal to a separately loaded base, a single-file
checkpoint in the original layout that loads and trains, and the public CLI training a
masked-prior LoRA from the shipped preset whose ComfyUI (kohya) file diffusers reads back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import convert_unet_state_dict_to_peft
from safetensors.torch import load_file, save_file

from modules.config.schema import ModelConfig
from modules.lora import add_lora, lora_disabled, save_lora
from modules.loss import masked_prior_loss
from modules.models import get_family, load_model
from modules.models.folder_check import model_folder_problem
from modules.models.spec import ItemGeometry
from tests.runner_check import assert_predict_goes_through_the_runner
from tests.sdxl.tiny_sdxl import build_tiny_sdxl, write_original_checkpoint
from tests.trained_lora import SAMPLES, train_in_process, train_preset

CPU = torch.device("cpu")
PROMPTS = ["a photo of sks star", "a red cat on a striped background"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    return {
        "epsilon": build_tiny_sdxl(root / "base"),
        "v_prediction": build_tiny_sdxl(root / "vpred", prediction="v_prediction", seed=1),
    }


@pytest.fixture(scope="module")
def folder(folders):
    return folders["epsilon"]


def pipeline(folder: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load(path, **options):
    config = ModelConfig(family="sdxl", path=str(path), sdxl=options)
    family = get_family(config)
    return family, load_model(family, config, dtype=torch.float32, device=CPU)


def test_encodings_latents_and_size_ids_are_the_pipeline_s(folder):
    pipe = pipeline(folder)
    family, model = load(folder)
    text = family.encode_prompts(model, PROMPTS)
    embeds, _, pooled, _ = pipe.encode_prompt(
        PROMPTS, device=CPU, do_classifier_free_guidance=False
    )
    assert text["embeds"].shape == (2, 77, 32 + 48) and text["pooled"].shape == (2, 40)
    assert torch.equal(text["embeds"], embeds) and torch.equal(text["pooled"], pooled)
    counts, limit = family.prompt_token_counts(model, PROMPTS)
    assert counts == [len(ids) for ids in pipe.tokenizer(PROMPTS).input_ids] and limit == 77

    images = torch.rand(1, 3, 48, 64) * 2 - 1  # non-square: 6 x 8 latent cells
    latents = family.encode_images(model, images)
    raw = pipe.vae.encode(images).latent_dist.mode()
    assert latents.shape == (1, 4, 6, 8) and torch.equal(latents, raw * 0.13025)
    assert family.decode_latents(model, latents).shape == (1, 3, 48, 64)

    # A 96 x 48 file trained square at 32: its centred 48 x 48 crop starts 24 px from the left,
    # 16 px once the file is resized to cover 32 px in height (kohya's crop_top_left).
    wide = ItemGeometry(original=(96, 48), crop=(24.0, 0.0, 72.0, 48.0), size=(32, 32))
    ids = family.encode_conditioning(model, "size_crop", [images[0]], geometry=wide)
    assert ids["time_ids"].tolist() == [[48, 96, 0, 16, 32, 32]]
    expected = pipe._get_add_time_ids((48, 64), (0, 0), (48, 64), torch.float32, 40)
    plain = family.encode_conditioning(model, "size_crop", [images[0]])
    assert torch.equal(plain["time_ids"], expected)
    # Without item ids (drift meter, samples) predict uses the uncropped latents' size.
    noisy, t = torch.randn(1, 4, 6, 8), torch.tensor([500.0])
    one = {key: value[:1] for key, value in text.items()}
    assert torch.equal(
        family.predict(model, noisy, t, one), family.predict(model, noisy, t, {**one, **plain})
    )


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_samples_are_the_pipeline_s_with_cfg(folders, prediction):
    folder = folders[prediction]
    family, model = load(folder)
    text = family.encode_prompts(model, ["a red star"])
    family.release_encoders(model, keep_decoder=True)
    ours = family.sample(
        model, text, size=(64, 32), steps=3, generator=torch.Generator().manual_seed(0)
    )
    theirs = pipeline(folder)(
        "a red star",
        width=64,
        height=32,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images  # guidance_scale 5 against zeros (force_zeros_for_empty_prompt)
    assert ours.shape == (1, 3, 32, 64)
    assert torch.allclose(ours * 0.5 + 0.5, theirs, atol=1e-5)


def test_noise_targets_and_fractions_follow_the_scheduler_config(folders):
    latents, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([0.0, 400.0, 999.0])
    reference = DDPMScheduler.from_pretrained(folders["epsilon"] / "scheduler")
    family, _ = load(folders["epsilon"])
    noisy, target = family.noisy_input_and_target(latents, noise, t)
    assert torch.allclose(noisy, reference.add_noise(latents, noise, t.long()), atol=1e-6)
    assert torch.equal(target, noise)
    for folder, options in (
        (folders["v_prediction"], {}),
        (folders["epsilon"], {"prediction": "v_prediction"}),
    ):
        family, _ = load(folder, **options)
        _, target = family.noisy_input_and_target(latents, noise, t)
        assert torch.allclose(target, reference.get_velocity(latents, noise, t.long()), atol=1e-6)

    drawn = family.sample_timesteps(
        torch.Size([4000, 4, 4, 4]), generator=torch.Generator().manual_seed(0), device=CPU
    )
    assert torch.equal(drawn, drawn.round()) and drawn.min() == 0 and drawn.max() == 999
    # A noise fraction f is the timestep of the same signal-to-noise ratio as flow matching's
    # (1 - f) x + f n: a / (1 - a) = ((1 - f) / f)^2; a quarter noise is a low timestep.
    fractions = torch.tensor([0.25, 0.5, 0.75])
    steps = family.timesteps_from_fractions(fractions, latents.shape).long()
    log_snr = torch.log(family.alphas_cumprod / (1 - family.alphas_cumprod))
    wanted = 2 * torch.log((1 - fractions) / fractions)
    for step, target in zip(steps.tolist(), wanted, strict=True):
        gaps = (log_snr[step - 1 : step + 2] - target).abs()
        assert gaps[1] == gaps.min()  # the nearest timestep in log SNR
    assert steps.tolist() == [95, 354, 673]  # uniform timesteps: mostly high noise

    zero, _ = load(folders["v_prediction"], zero_terminal_snr=True)
    assert zero.options.warnings() == []
    warned = ModelConfig(family="sdxl", sdxl={"zero_terminal_snr": True, "prediction": "epsilon"})
    assert "teaches nothing" in warned.sdxl.warnings()[0]
    rescaled = DDPMScheduler.from_pretrained(
        folders["v_prediction"] / "scheduler", rescale_betas_zero_snr=True
    )
    assert (
        torch.equal(zero.alphas_cumprod, rescaled.alphas_cumprod) and zero.alphas_cumprod[-1] == 0
    )
    for schedule in (family, zero):  # the ends are the schedule's: a gate of 0..1 takes all
        ends = schedule.timesteps_from_fractions(torch.tensor([0.0, 1.0]), latents.shape)
        assert ends.tolist() == [0, 999]


def test_teacher_is_the_base_and_the_loss_takes_it(folder):
    family, model = load(folder)
    # Frozen like the trained UNet's base weights (CPU kernels for weights that need gradients
    # round differently, even under no_grad).
    base = UNet2DConditionModel.from_pretrained(folder / "unet").requires_grad_(False)
    text = family.encode_prompts(model, PROMPTS)
    ids = [
        family.encode_conditioning(model, "size_crop", [torch.zeros(3, 32, 32)])["time_ids"],
        torch.tensor([[64.0, 48.0, 8.0, 0.0, 32.0, 32.0]]),
    ]
    text = {**text, "time_ids": torch.cat(ids)}
    family.release_encoders(model, keep_decoder=False)
    assert len(family.blocks(model.denoiser)) == 7  # 3 down, mid, 3 up
    add_lora(model.denoiser, rank=2, alpha=2, dropout=0.0, target_modules=["to_q", "ff.net.2"])
    with torch.no_grad():
        for name, param in model.denoiser.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(0))
    noisy, t = torch.randn(2, 4, 4, 4), torch.tensor([100.0, 800.0])
    student = family.predict(model, noisy, t, text)
    assert_predict_goes_through_the_runner(family, model, noisy, t, text, student)
    with torch.no_grad(), lora_disabled(model.denoiser):
        teacher = family.predict(model, noisy, t, text)
    with torch.no_grad():
        reference = family.predict(
            type(model)(denoiser=base, identity="", parts=model.parts), noisy, t, text
        )
    assert torch.equal(teacher, reference) and not torch.allclose(student, teacher)
    # The size and crop ids reach the UNet.
    other = {**text, "time_ids": text["time_ids"].flip(0)}
    with torch.no_grad(), lora_disabled(model.denoiser):
        assert not torch.allclose(family.predict(model, noisy, t, other), teacher)
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, 1:3, 1:3] = 1.0
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


# ------------------------------------------------------------------------ single-file models


def test_a_single_file_checkpoint_is_checked_before_it_loads(folder, tmp_path):
    checkpoint = write_original_checkpoint(folder, tmp_path / "sdxl.safetensors")
    assert model_folder_problem("sdxl", str(checkpoint), None) is not None  # no configs beside
    problem = model_folder_problem("sdxl", str(checkpoint), _options(tmp_path))
    assert "model.sdxl.config_folder" in problem and "model_index.json" in problem
    assert model_folder_problem("sdxl", str(checkpoint), _options(folder)) is None
    state = load_file(checkpoint)
    unet_only = tmp_path / "unet.safetensors"
    save_file({k: v for k, v in state.items() if k.startswith("model.")}, unet_only)
    problem = model_folder_problem("sdxl", str(unet_only), _options(folder))
    assert "not a whole SDXL checkpoint" in problem and "OpenCLIP bigG" in problem
    # Beside the config folder's own files, no config folder is needed.
    inside = tmp_path / "copy"
    shutil.copytree(folder, inside)
    shutil.copy(checkpoint, inside / "sdxl.safetensors")
    assert model_folder_problem("sdxl", str(inside / "sdxl.safetensors"), None) is None


def _options(config_folder):
    return ModelConfig(family="sdxl", path="", sdxl={"config_folder": str(config_folder)}).sdxl


@pytest.mark.slow
def test_a_single_file_v_prediction_checkpoint_loads_and_trains(folders, tmp_path):
    """The original layout, read with the v-prediction folder's configs: the same weights as
    the folder; a masked-prior LoRA trains on it, loads through the pipeline's
    load_lora_weights with the diffusers file and changes its output, and its ComfyUI file
    converts back through diffusers' converter tensor for tensor."""
    folder = folders["v_prediction"]
    checkpoint = write_original_checkpoint(folder, tmp_path / "vpred.safetensors")
    family, model = load(checkpoint, config_folder=str(folder))
    assert family.prediction == "v_prediction"
    _, reference = load(folder)
    for name, value in reference.denoiser.state_dict().items():
        assert torch.equal(model.denoiser.state_dict()[name], value), name
    encoded = family.encode_prompts(model, PROMPTS)
    expected = family.encode_prompts(reference, PROMPTS)
    assert all(torch.equal(encoded[k], expected[k]) for k in expected)
    del model, reference

    options = {"config_folder": str(folder)}
    trained, lora = train_in_process(
        tmp_path, {"family": "sdxl", "path": str(checkpoint), "sdxl": options}
    )
    pipe = pipeline(folder)
    base = _prediction(pipe.unet)
    pipe.load_lora_weights(str(lora))
    loaded = _prediction(pipe.unet)
    assert torch.allclose(loaded, _prediction(trained), atol=1e-5)
    assert not torch.allclose(loaded, base, atol=1e-5)

    config = ModelConfig(family="sdxl", path=str(checkpoint), sdxl=options)
    comfy = tmp_path / "comfy.safetensors"
    converter = get_family(config).comfyui_converter(type("M", (), {"denoiser": trained}))
    save_lora(trained, comfy, family="sdxl", config_json="{}", layout="comfyui", comfyui=converter)
    _assert_converts_back(comfy, lora, pipe.unet.config)
    other = pipeline(folder)
    other.load_lora_weights(str(comfy))
    assert torch.allclose(_prediction(other.unet), loaded, atol=1e-6)


def _assert_converts_back(comfy: Path, diffusers_file: Path, unet_config) -> None:
    """kohya names with lora_down / lora_up / alpha, read back by diffusers' SDXL converter as
    the diffusers file's tensors (alpha 8 / rank 4 returned beside them)."""
    keys = set(load_file(comfy))
    assert all(key.startswith("lora_unet_") for key in keys)
    assert any(
        key.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1") for key in keys
    )
    assert any(key.startswith("lora_unet_output_blocks_") for key in keys)
    reference = load_file(diffusers_file)
    state, alphas = StableDiffusionXLPipeline.lora_state_dict(str(comfy), unet_config=unet_config)
    # What load_lora_weights then loads: the UNet's keys in peft's names.
    state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
    assert {f"unet.{key}" for key in state} == set(reference)
    for key, value in state.items():
        assert torch.equal(value, reference[f"unet.{key}"]), key
    assert set(alphas.values()) == {8.0}  # applied as alpha / rank by the loader


def _prediction(unet):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 4, 4, generator=generator)
    embeds = torch.randn(1, 77, 80, generator=generator)
    added = {
        "text_embeds": torch.randn(1, 40, generator=generator),
        "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]]),
    }
    with torch.no_grad():
        return unet(sample, torch.tensor([500.0]), embeds, added_cond_kwargs=added).sample


# ------------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_the_preset_trains_with_the_teacher_and_its_comfyui_file_loads(folder, tmp_path):
    run = train_preset("presets/sdxl-prior.json", tmp_path, "comfy", folder, *SAMPLES)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["teacher_fraction"] > 0 for r in rows) and rows[-1]["loss_prior"] > 0
    assert (run / "samples/step000003-0-pair.png").is_file()
    pipe = pipeline(folder)
    before = _prediction(pipe.unet)
    pipe.load_lora_weights(str(run / "lora.safetensors"))
    assert not torch.allclose(_prediction(pipe.unet), before, atol=1e-6)
