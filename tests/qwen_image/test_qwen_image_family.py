"""The qwen_image family on a tiny real Qwen-Image folder: the pipeline's encodings, latents and
samples, packing on a non-square grid, the teacher equal to a separately loaded base, the shift
by token count, single-file transformers, and the public CLI training a masked-prior
LoRA from the shipped preset that the Qwen-Image pipeline loads back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
from safetensors.torch import load_file, save_file

from modules.config.schema import ModelConfig
from modules.lora import add_lora, lora_disabled
from modules.lora.init_from import init_lora_from
from modules.loss import masked_prior_loss
from modules.models import ModelLoadError, get_family, load_model
from modules.models.packing import pack, unpack
from tests.qwen_image.tiny_qwen_image import build_tiny_qwen_image
from tests.runner_check import assert_predict_goes_through_the_runner
from tests.trained_lora import SAMPLES, train_in_process, train_preset

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
TOKENS = 16
PROMPTS = ["a photo of sks star", "a red cat"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_qwen_image(tmp_path_factory.mktemp("qwen_image") / "tiny")


@pytest.fixture(scope="module")
def pipe(folder):
    pipeline = QwenImagePipeline.from_pretrained(folder, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def load(folder, **options):
    config = ModelConfig(
        family="qwen_image", path=str(folder), qwen_image={"text_tokens": TOKENS, **options}
    )
    family = get_family(config)
    return family, load_model(family, config, dtype=torch.float32, device=CPU)


def test_encodings_and_latents_are_the_pipeline_s(folder, pipe):
    family, model = load(folder)
    text = family.encode_prompts(model, PROMPTS)
    embeds, mask = pipe.encode_prompt(PROMPTS, device=CPU, max_sequence_length=TOKENS)
    assert torch.allclose(text["embeds"], embeds, atol=1e-5)
    assert torch.equal(text["mask"], mask) and not bool(mask.all())  # one prompt is padded
    counts, limit = family.prompt_token_counts(model, PROMPTS)
    assert counts == mask.sum(dim=1).tolist() and limit == TOKENS
    long = family.encode_prompts(model, [" ".join(["red"] * 40)])
    assert long["embeds"].shape[1] == TOKENS  # cut at text_tokens, as max_sequence_length does

    images = torch.rand(1, 3, 48, 64) * 2 - 1  # non-square: 6 x 8 latent cells
    latents = family.encode_images(model, images)
    raw = pipe.vae.encode(images.unsqueeze(2)).latent_dist.mode()
    config = pipe.vae.config
    mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1)
    assert latents.shape == (1, 16, 6, 8)
    assert torch.allclose(latents, ((raw - mean) / std)[:, :, 0], atol=1e-6)
    assert torch.equal(pack(latents), pipe._pack_latents(latents, 1, 16, 6, 8))
    assert torch.equal(unpack(pack(latents), 16, 6, 8), latents)
    decoded = family.decode_latents(model, latents)
    assert decoded.shape == (1, 3, 48, 64) and float(decoded.abs().max()) <= 1


def test_samples_are_the_pipeline_s_with_true_cfg(folder, pipe):
    family, model = load(folder)
    text = family.encode_prompts(model, ["a red star"])
    family.release_encoders(model, keep_decoder=True)  # encodes the negative prompt " "
    ours = family.sample(
        model, text, size=(32, 32), steps=3, generator=torch.Generator().manual_seed(0)
    )
    theirs = pipe(
        "a red star",
        negative_prompt=" ",
        true_cfg_scale=4.0,
        height=32,
        width=32,
        num_inference_steps=3,
        max_sequence_length=TOKENS,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert ours.shape == (1, 3, 32, 32)
    assert torch.allclose(ours * 0.5 + 0.5, theirs, atol=1e-4)


def test_teacher_is_the_base_on_a_non_square_grid_and_the_loss_takes_it(folder):
    family, model = load(folder)
    base = QwenImageTransformer2DModel.from_pretrained(folder / "transformer")
    text = family.encode_prompts(model, PROMPTS)  # different lengths: the mask is used
    family.release_encoders(model, keep_decoder=False)
    add_lora(model.denoiser, rank=2, alpha=2, dropout=0.0, target_modules=["to_q", "img_mlp.net.2"])
    with torch.no_grad():
        for name, param in model.denoiser.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(0))
    noisy, t = torch.randn(2, 16, 6, 8), torch.tensor([0.3, 0.8])
    student = family.predict(model, noisy, t, text)
    assert_predict_goes_through_the_runner(family, model, noisy, t, text, student)
    with torch.no_grad(), lora_disabled(model.denoiser):
        teacher = family.predict(model, noisy, t, text)
    with torch.no_grad():
        reference = family.predict(
            type(model)(denoiser=base, identity="", parts=model.parts), noisy, t, text
        )
    assert student.shape == noisy.shape == (2, 16, 6, 8)
    assert torch.equal(teacher, reference) and not torch.allclose(student, teacher)
    # The padded sample alone gives the same prediction: the mask hides the padding.
    alone = {key: value[1:, : int(text["mask"][1].sum())] for key, value in text.items()}
    with torch.no_grad(), lora_disabled(model.denoiser):
        single = family.predict(model, noisy[1:], t[1:], alone)
    assert torch.allclose(single, teacher[1:], atol=1e-5)
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


def test_timesteps_shift_with_the_token_count_as_the_pipeline_does(folder, pipe):
    family, _ = load(folder)

    def draw(side):
        shape = torch.Size([4000, 16, side, side])
        return family.sample_timesteps(
            shape, generator=torch.Generator().manual_seed(0), device=CPU
        )

    small, large = draw(16), draw(128)
    assert float(large.mean()) > float(small.mean()) + 0.01  # more tokens → more noise
    # The shift is the scheduler's: at the median, the pipeline's own mu and formula.
    mu = family.training_mu(torch.Size([1, 16, 128, 128]))
    scheduler = pipe.scheduler
    assert float(large.median()) == pytest.approx(
        float(scheduler.time_shift(mu, 1.0, torch.tensor(0.5))), abs=0.02
    )


def test_a_single_transformer_file_in_comfyui_names_loads(folder, tmp_path):
    state = QwenImageTransformer2DModel.from_pretrained(folder / "transformer").state_dict()
    file = tmp_path / "qwen_image_tiny.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in state.items()}, file)
    _, model = load(folder, transformer_file=str(file))
    for name, value in model.denoiser.state_dict().items():
        assert torch.equal(value, state[name]), name
    other = tmp_path / "other.safetensors"
    save_file({"model.diffusion_model.img_in.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(ModelLoadError, match=r"model.qwen_image.transformer_file: .*other"):
        load(folder, transformer_file=str(other))


def test_a_corrupt_scheduler_config_is_named(tmp_path):
    folder = build_tiny_qwen_image(tmp_path / "tiny")
    (folder / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"cannot read .*scheduler_config.json"):
        load(folder)


# ------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def runs(tmp_path_factory, folder):
    root = tmp_path_factory.mktemp("qwen-image-runs")
    tokens = f"model.qwen_image.text_tokens={TOKENS}"

    def train(name, *extra):
        return train_preset("presets/qwen-image-prior.json", root, name, folder, tokens, *extra)

    return train("comfy"), train("diffusers", "output.format=diffusers", *SAMPLES)


@pytest.mark.slow
def test_the_preset_trains_with_the_teacher_and_the_lora_loads_in_the_pipeline(folder, runs):
    comfy, diffusers = runs
    rows = [json.loads(x) for x in (diffusers / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["teacher_fraction"] > 0 for r in rows) and rows[-1]["loss_prior"] > 0
    # Samples with the family's own sampler (true CFG), beside the base model's.
    assert (diffusers / "samples/step000003-0-pair.png").is_file()
    pipe = QwenImagePipeline.from_pretrained(folder, local_files_only=True)
    before = _velocity(pipe.transformer)
    pipe.load_lora_weights(str(diffusers / "lora.safetensors"))
    after = _velocity(pipe.transformer)
    assert not torch.allclose(before, after, atol=1e-6)
    # The ComfyUI file: diffusion_model.<module>.lora_down / lora_up / alpha. diffusers' converter
    # folds alpha / rank (8 / 4 = 2, exact in binary) into lora_A: the same tensors otherwise.
    reference = load_file(diffusers / "lora.safetensors")
    keys = set(load_file(comfy / "lora.safetensors"))
    assert all(k.startswith("diffusion_model.transformer_blocks.") for k in keys)
    assert {k.rsplit(".", 2)[-2] for k in keys if k.endswith(".weight")} == {"lora_down", "lora_up"}
    state = QwenImagePipeline.lora_state_dict(str(comfy / "lora.safetensors"))
    assert set(state) == set(reference)
    for key, value in reference.items():
        expected = value * 2 if ".lora_A." in key else value
        assert torch.allclose(state[key], expected, rtol=1e-4, atol=1e-7), key
    other = QwenImagePipeline.from_pretrained(folder, local_files_only=True)
    other.load_lora_weights(str(comfy / "lora.safetensors"))
    assert torch.allclose(_velocity(other.transformer), after, atol=1e-5)


@pytest.mark.slow
def test_a_run_starts_from_either_file_as_the_pipeline_loads_it(folder, runs):
    comfy, diffusers = runs
    """lora.init_from, at another rank and alpha than the file's: the run's LoRA predicts as
    the pipeline does with the file loaded, for the diffusers and the ComfyUI file alike."""
    pipe = QwenImagePipeline.from_pretrained(folder, local_files_only=True)
    pipe.load_lora_weights(str(diffusers / "lora.safetensors"))
    expected = _velocity(pipe.transformer)
    for file in (diffusers / "lora.safetensors", comfy / "lora.safetensors"):
        family, model = load(folder)
        add_lora(
            model.denoiser,
            rank=6,
            alpha=5,
            dropout=0.0,
            target_modules=family.lora_targets(model)["attention_ffn"],
        )
        report = init_lora_from(model.denoiser, file, family.lora_loader(model))
        assert report.file_rank == 4 and report.kept == pytest.approx(1.0), file
        assert torch.allclose(_velocity(model.denoiser), expected, atol=1e-5), file


def _velocity(transformer):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, 4, 64, generator=generator)  # a 2 x 2 grid of packed tokens
    embeds = torch.randn(1, 6, 32, generator=generator)
    with torch.no_grad():
        return transformer(
            hidden_states=tokens,
            encoder_hidden_states=embeds,
            timestep=torch.tensor([0.5]),
            img_shapes=[[(1, 2, 2)]],
            return_dict=False,
        )[0]


@pytest.mark.slow
def test_the_saved_lora_in_the_pipeline_predicts_as_the_trained_model(folder, tmp_path):
    model = {"family": "qwen_image", "path": str(folder), "qwen_image": {"text_tokens": TOKENS}}
    trained, lora = train_in_process(tmp_path, model)
    pipe = QwenImagePipeline.from_pretrained(folder, local_files_only=True)
    base = _velocity(pipe.transformer)
    pipe.load_lora_weights(str(lora))
    loaded = _velocity(pipe.transformer)
    assert torch.allclose(loaded, _velocity(trained), atol=1e-5)
    assert not torch.allclose(loaded, base, atol=1e-5)
