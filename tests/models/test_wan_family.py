"""The wan family on tiny random WAN folders saved by ``WanPipeline.save_pretrained``: loading,
latents and prompts as the WAN pipeline makes them, experts, timesteps, memory options."""

import copy
import shutil

import pytest
import torch
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
from safetensors.torch import save_file

from modules.config import ConfigError
from modules.config.schema import ModelConfig
from modules.models import ModelLoadError, get_family, load_model
from modules.models.flow_matching import shift_timesteps
from modules.models.spec import LatentGrid
from modules.models.wan import SPEC
from modules.models.wan.family import TEXT_TOKENS, WanFamily
from tests.wan.tiny_wan import TRANSFORMER, original_layout

CPU = torch.device("cpu")
F32 = torch.float32


def load(folder, **options):
    config = ModelConfig(family="wan", path=str(folder), wan=options)
    family = get_family(config)
    return family, load_model(family, config, dtype=options.get("dtype_", F32), device=CPU)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def video(batch=1, frames=9, side=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, side, side, generator=generator) * 2 - 1


# ------------------------------------------------------------------------------------- load


def test_load_reads_the_folder_and_defers_the_encoders(tiny_wan):
    family, model = load(tiny_wan)
    reference = WanTransformer3DModel.from_pretrained(tiny_wan / "transformer")
    assert same_weights(model.denoiser, reference)
    assert model.parts.text_encoder is None and model.parts.vae is None  # lazy
    assert SPEC.latent_grid(str(tiny_wan)) == LatentGrid(pixels_per_cell=8, pixel_multiple=16)
    assert family.timestep_range == (0.0, 1.0)
    assert model.identity.startswith("wan:") and "transformer" not in model.identity


@pytest.mark.parametrize("missing", ["transformer", "vae", "text_encoder", "tokenizer"])
def test_a_missing_subfolder_is_named(tmp_path, tiny_wan, missing):
    broken = shutil.copytree(tiny_wan, tmp_path / "broken")
    shutil.rmtree(broken / missing)
    with pytest.raises(ModelLoadError, match=rf"model.path: .*broken has no {missing}/ subfolder"):
        load(broken)


def test_an_empty_or_wrong_path_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="no built-in weights; set model.path"):
        WanFamily().load("", dtype=F32, device=CPU)
    with pytest.raises(ModelLoadError, match="nowhere. does not exist"):
        load(tmp_path / "nowhere")


def test_a_transformer_reading_the_first_frame_trains_image_to_video(tmp_path, tiny_wan):
    """Told apart from the folder as the pipelines do (tests/wan/test_image_to_video.py)."""
    i2v = shutil.copytree(tiny_wan, tmp_path / "i2v")
    shutil.rmtree(i2v / "transformer")
    WanTransformer3DModel(**{**TRANSFORMER, "in_channels": 36}).save_pretrained(i2v / "transformer")
    family, _ = load(i2v)
    assert family.image_to_video and not WanFamily().image_to_video


# ------------------------------------------------------------------------- latents, prompts


def test_latents_are_normalised_like_the_wan_pipeline(tiny_wan):
    family, model = load(tiny_wan)
    clip = video(frames=9)
    latents = family.encode_images(model, clip)
    assert latents.shape == (1, 16, 3, 4, 4)  # (9 - 1) / 4 + 1 latent frames, 32 / 8 pixels
    vae = AutoencoderKLWan.from_pretrained(tiny_wan / "vae")
    raw = vae.encode(clip).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    assert torch.allclose(latents, (raw - mean) / std, atol=1e-6)
    decoded = family.decode_latents(model, latents)
    assert decoded.shape == (1, 3, 9, 32, 32)
    assert torch.allclose(decoded, vae.decode(raw).sample.clamp(-1, 1), atol=1e-5)
    image = family.encode_images(model, clip[:, :, 0])  # (B, 3, H, W): a 1-frame video
    assert torch.allclose(image, latents[:, :, :1], atol=1e-5)
    assert family.decode_latents(model, image).shape == (1, 3, 32, 32)


def test_a_resolution_the_model_cannot_patch_is_a_config_error(tiny_wan):
    family, model = load(tiny_wan)
    with pytest.raises(ConfigError, match="data.resolution: 24×24 is not a multiple of 16"):
        family.encode_images(model, video(frames=1, side=24)[:, :, 0])


def test_prompts_match_the_wan_pipeline(tiny_wan):
    family, model = load(tiny_wan)
    prompts = ["a photo of sks heart", "a  red &amp; blue video of a dog walking slowly", ""]
    text = family.encode_prompts(model, prompts)
    embeds = text["embeds"]
    pipeline = WanPipeline.from_pretrained(tiny_wan, local_files_only=True)
    expected, _ = pipeline.encode_prompt(
        prompts, do_classifier_free_guidance=False, max_sequence_length=TEXT_TOKENS
    )
    length = embeds.shape[1]
    assert length < TEXT_TOKENS  # the cache keeps only the longest prompt's tokens
    assert torch.allclose(embeds, expected[:, :length], atol=1e-5)
    assert torch.count_nonzero(expected[:, length:]) == 0
    assert torch.count_nonzero(embeds[2, 1:]) == 0  # "" is one token (</s>); padding is zero


def test_prompt_token_counts_need_only_the_tokenizer(tiny_wan):
    family, model = load(tiny_wan)
    assert model.parts.text_encoder is None  # deferred: a cached run never loads it
    prompts = ["a photo of sks heart", "word " * 600]
    counts, limit = family.prompt_token_counts(model, prompts)
    assert limit == TEXT_TOKENS
    assert counts[0] < 20 and counts[1] > TEXT_TOKENS
    assert model.parts.text_encoder is None
    mask = family.encode_prompts(model, prompts[:1])["embeds"].abs().sum(-1) > 0
    assert counts[0] == int(mask.sum())  # the same tokens the encoder sees


def test_predict_pads_the_prompt_to_the_transformers_length(tiny_wan):
    family, model = load(tiny_wan)
    text = family.encode_prompts(model, ["a photo of sks heart", "a dog"])
    noisy = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.3, 0.9])
    padded = torch.cat(
        [text["embeds"], torch.zeros(2, TEXT_TOKENS - text["embeds"].shape[1], 32)], 1
    )
    with torch.no_grad():
        out = family.predict(model, noisy, t, text)
        expected = model.denoiser(noisy, t * 1000, padded, return_dict=False)[0]
    assert out.shape == noisy.shape and torch.equal(out, expected)


# --------------------------------------------------------------------------------- timesteps


def test_timesteps_are_flow_shifted(tiny_wan):
    family, _ = load(tiny_wan)
    assert family.flow_shift == 3.0  # WAN's default when model.wan.flow_shift is empty
    t = family.sample_timesteps(
        torch.Size([4000]), generator=torch.Generator().manual_seed(0), device=CPU
    )
    assert t.min() > 0 and t.max() < 1
    # Unshifting gives back uniform draws: mean 1/2; the shift itself puts ~3/4 above 1/2.
    uniform = t / (3 - 2 * t)
    assert abs(float(uniform.mean()) - 0.5) < 0.02
    assert abs(float((t > 0.5).float().mean()) - 0.75) < 0.03
    five, _ = load(tiny_wan, flow_shift=5.0)
    u = torch.rand(8, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(shift_timesteps(u, 5.0), 5 * u / (1 + 4 * u))
    assert five.flow_shift == 5.0


@pytest.mark.parametrize(
    ("expert", "subfolder", "inside"),
    [
        ("high_noise", "transformer", lambda t: t >= 0.875),
        ("low_noise", "transformer_2", lambda t: t < 0.875),
    ],
)
def test_an_a14b_expert_trains_its_own_weights_on_its_own_range(
    tiny_wan_a14b, expert, subfolder, inside
):
    family, model = load(tiny_wan_a14b, expert=expert)
    reference = WanTransformer3DModel.from_pretrained(tiny_wan_a14b / subfolder)
    assert same_weights(model.denoiser, reference)
    assert family.boundary == 0.875  # boundary_ratio from model_index.json
    t = family.sample_timesteps(
        torch.Size([2000]), generator=torch.Generator().manual_seed(0), device=CPU
    )
    assert bool(inside(t).all())
    assert float(t.min()) < 0.2 if expert == "low_noise" else float(t.max()) > 0.99


def test_expert_mismatches_are_named(tiny_wan, tiny_wan_a14b):
    with pytest.raises(ModelLoadError, match="model.wan.expert: .* two experts .*high_noise or"):
        load(tiny_wan_a14b)
    with pytest.raises(ModelLoadError, match="model.wan.expert=low_noise: .* one transformer"):
        load(tiny_wan, expert="low_noise")


# ------------------------------------------------------------------------ memory, sampling


def test_release_keeps_only_the_decoder_and_samples_with_guidance(tiny_wan):
    family, model = load(tiny_wan)
    family.encode_images(model, video(frames=5))
    text = family.encode_prompts(model, ["a photo of sks heart", "a dog"])
    family.release_encoders(model, keep_decoder=True)
    parts = model.parts
    assert parts.text_encoder is None and parts.tokenizer is None and parts.released
    assert parts.vae.encoder is None and parts.vae.decoder is not None
    assert parts.negative["embeds"].shape[0] == 1  # "" for classifier-free guidance
    images = family.sample(
        model, text, size=(32, 32), steps=2, generator=torch.Generator().manual_seed(0)
    )
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1
    family.release_encoders(model, keep_decoder=False)
    assert parts.vae is None


def test_a14b_samples_switch_to_the_other_expert_below_the_boundary(tiny_wan_a14b):
    family, model = load(tiny_wan_a14b, expert="high_noise")
    text = family.encode_prompts(model, ["a photo of sks heart"])
    family.release_encoders(model, keep_decoder=True)
    assert family._expert_for(model, 0.9) is model.denoiser
    assert model.parts.other_subfolder == "transformer_2"
    assert model.parts.other_expert is None  # not loaded while training
    family.sample(model, text, size=(32, 32), steps=3, generator=torch.Generator().manual_seed(0))
    other = model.parts.other_expert
    assert isinstance(other, WanTransformer3DModel) and family._expert_for(model, 0.5) is other
    assert same_weights(
        other, WanTransformer3DModel.from_pretrained(tiny_wan_a14b / "transformer_2")
    )


def test_single_file_transformer_replaces_the_folders(tmp_path, tiny_wan):
    torch.manual_seed(7)
    other = WanTransformer3DModel(**TRANSFORMER)
    file = tmp_path / "wan_t2v.safetensors"
    save_file(original_layout(other.state_dict()), file)
    _, model = load(tiny_wan, transformer_file=str(file))
    assert same_weights(model.denoiser, other)
    with pytest.raises(
        ModelLoadError, match="model.wan.transformer_file: .*missing.safetensors not"
    ):
        load(tiny_wan, transformer_file=str(tmp_path / "missing.safetensors"))


def test_ti2v_5b_trains_as_text_to_video(tiny_wan_ti2v):
    family, model = load(tiny_wan_ti2v)
    assert SPEC.latent_grid(str(tiny_wan_ti2v)) == LatentGrid(16, 32)
    latents = family.encode_images(model, video(frames=5, side=32))
    assert latents.shape == (1, 48, 2, 2, 2)
    text = family.encode_prompts(model, ["a photo of sks heart"])
    t = torch.tensor([0.4])
    with torch.no_grad():
        out = family.predict(model, latents, t, text)
        # The TI2V pipeline passes one timestep per token; with no frame conditioned they are
        # all equal, which is the same as one timestep per sample.
        tokens = latents.shape[2] * (latents.shape[3] // 2) * (latents.shape[4] // 2)
        padded = torch.cat(
            [text["embeds"], torch.zeros(1, TEXT_TOKENS - text["embeds"].shape[1], 32)], 1
        )
        per_token = model.denoiser(
            latents, (t * 1000).expand(1, tokens), padded, return_dict=False
        )[0]
    assert torch.allclose(out, per_token, atol=1e-5)
    with pytest.raises(ConfigError, match="not a multiple of 32"):
        family.encode_images(model, video(frames=1, side=48)[:, :, 0])


def test_the_base_model_is_not_changed_by_loading_twice(tiny_wan):
    _, first = load(tiny_wan)
    snapshot = copy.deepcopy(first.denoiser.state_dict())
    _, second = load(tiny_wan)
    assert all(torch.equal(snapshot[k], v) for k, v in second.denoiser.state_dict().items())
