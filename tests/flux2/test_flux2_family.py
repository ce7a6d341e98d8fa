"""The flux2 family on tiny real FLUX.2 folders (klein, klein base, dev): the pipelines'
encodings, latents and samples, the teacher equal to a separately loaded base on a non-square
grid, the shift by token count, single-file transformers, and the public CLI training a
masked-prior LoRA from the shipped preset that the FLUX.2 pipeline loads back, in the diffusers
layout and in ComfyUI's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from safetensors.torch import load_file, save_file

from modules.config.schema import ModelConfig
from modules.lora import add_lora, lora_disabled, lora_state_dict
from modules.lora.init_from import init_lora_from
from modules.loss import masked_prior_loss
from modules.models import ModelLoadError, get_family, load_model
from modules.models.flux2 import SPEC
from modules.models.flux2.family import (
    Flux2Family,
    image_ids,
    pack,
    patchify,
    text_ids,
    to_comfyui,
    unpack,
    unpatchify,
)
from modules.models.spec import LatentGrid
from tests.flux2.tiny_flux2 import TEXT_DIM, build_tiny_flux2
from tests.runner_check import assert_predict_goes_through_the_runner
from tests.trained_lora import SAMPLES, train_in_process, train_preset

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
TOKENS = 128  # dev's system message alone is about 110 tokens with the tiny tokenizer
PIPELINES = {"klein": Flux2KleinPipeline, "klein-base": Flux2KleinPipeline, "dev": Flux2Pipeline}
FLAGS = {
    "klein": (True, True, False),
    "klein-base": (True, False, False),
    "dev": (False, False, True),
}
"""(klein, distilled, guidance embedding) of each tiny variant."""


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2")
    return {variant: build_tiny_flux2(root / variant, variant=variant) for variant in PIPELINES}


@pytest.fixture(scope="module", params=["klein", "dev"])
def variant(request):
    return request.param


def load(folder, **options):
    config = ModelConfig(family="flux2", path=str(folder), flux2={"text_tokens": TOKENS, **options})
    family = get_family(config)
    return family, load_model(family, config, dtype=torch.float32, device=CPU)


def pipeline(folders, variant):
    return PIPELINES[variant].from_pretrained(folders[variant], local_files_only=True)


@pytest.mark.parametrize("name", list(FLAGS))
def test_the_variant_is_read_from_the_folder(folders, name):
    family, _ = load(folders[name])
    assert (family.klein, family.distilled, family.guided) == FLAGS[name]
    assert family.cfg is (name == "klein-base")
    assert SPEC.latent_grid(str(folders[name])) == LatentGrid(16, 16)


def test_encodings_latents_and_packing_are_the_pipeline_s(folders, variant):
    family, model = load(folders[variant])
    pipe = pipeline(folders, variant)
    prompts = ["a photo of sks star", "a red cat on a blue background"]
    text = family.encode_prompts(model, prompts)
    embeds, ids = pipe.encode_prompt(prompts, max_sequence_length=TOKENS)
    assert set(text) == {"embeds"} and torch.equal(text["embeds"], embeds)
    assert embeds.shape == (2, TOKENS, 3 * TEXT_DIM)
    assert torch.equal(text_ids(TOKENS, CPU), ids[0])
    counts, limit = family.prompt_token_counts(model, prompts)
    assert limit == TOKENS and counts[0] < counts[1]
    images = torch.rand(1, 3, 48, 64) * 2 - 1  # non-square: 3 x 4 cells of 16 px
    latents = family.encode_images(model, images)
    assert latents.shape == (1, 128, 3, 4)
    assert torch.equal(latents, pipe._encode_vae_image(images, generator=None))
    raw = pipe.vae.encode(images).latent_dist.mode()
    assert torch.equal(patchify(raw), pipe._patchify_latents(raw))
    assert torch.equal(unpatchify(patchify(raw)), raw)
    assert torch.equal(pack(latents), pipe._pack_latents(latents))
    assert torch.equal(unpack(pack(latents), 3, 4), latents)
    assert torch.equal(image_ids(3, 4, CPU), pipe._prepare_latent_ids(latents)[0])
    decoded = family.decode_latents(model, latents)
    assert decoded.shape == images.shape and torch.isfinite(decoded).all()


@pytest.mark.parametrize("name", list(PIPELINES))
def test_samples_are_the_pipeline_s(folders, name):
    """Same noise, same schedule and mu, dev's embedded guidance, the klein base's true CFG
    with the empty negative prompt, none for the distilled klein."""
    family, model = load(folders[name])
    text = family.encode_prompts(model, ["a red cat"])
    ours = family.sample(
        model, text, size=(32, 32), steps=3, generator=torch.Generator().manual_seed(0)
    )
    theirs = pipeline(folders, name)(
        prompt="a red cat",
        height=32,
        width=32,
        num_inference_steps=3,
        max_sequence_length=TOKENS,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert torch.allclose(ours * 0.5 + 0.5, theirs, atol=1e-5)


def test_the_presets_adapt_exactly_the_intended_layers(folders):
    family, model = load(folders["klein"])
    targets = family.lora_targets(model)
    assert set(targets) == set(SPEC.lora_targets)
    add_lora(model.denoiser, rank=2, alpha=2, dropout=0.0, target_modules=targets["attention_ffn"])
    adapted = {
        name.removesuffix(".lora_A.default")
        for name, _ in model.denoiser.named_modules()
        if name.endswith(".lora_A.default")
    }
    double = [
        *("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"),
        "to_add_out",
    ]
    assert adapted == {
        *(f"transformer_blocks.0.attn.{name}" for name in double),
        *(
            f"transformer_blocks.0.{ff}.{io}"
            for ff in ("ff", "ff_context")
            for io in ("linear_in", "linear_out")
        ),
        "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
        "single_transformer_blocks.0.attn.to_out",
    }
    assert "single_transformer_blocks.0.attn.to_out" not in targets["attention"]


def test_teacher_is_the_base_on_a_non_square_grid_and_the_loss_takes_it(folders, variant):
    family, model = load(folders[variant])
    base = Flux2Transformer2DModel.from_pretrained(folders[variant] / "transformer")
    text = family.encode_prompts(model, ["a photo of sks star"] * 2)
    family.release_encoders(model, keep_decoder=False)
    targets = family.lora_targets(model)["attention_ffn"]
    add_lora(model.denoiser, rank=2, alpha=2, dropout=0.0, target_modules=targets)
    with torch.no_grad():
        for name, param in model.denoiser.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(0))
    noisy, t = torch.randn(2, 128, 3, 4), torch.tensor([0.3, 0.8])  # a 48 x 64 px image
    student = family.predict(model, noisy, t, text)
    assert_predict_goes_through_the_runner(family, model, noisy, t, text, student)
    with torch.no_grad(), lora_disabled(model.denoiser):
        teacher = family.predict(model, noisy, t, text)
    plain = Flux2Family(family.options)
    plain.guided = family.guided
    with torch.no_grad():
        reference = plain.predict(
            type(model)(denoiser=base, identity="", parts=model.parts), noisy, t, text
        )
    assert student.shape == noisy.shape == (2, 128, 3, 4)
    assert torch.equal(teacher, reference) and not torch.allclose(student, teacher)
    mask = torch.zeros(2, 1, 3, 4)
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


def test_timesteps_shift_with_the_token_count_as_the_pipeline_does(folders, variant):
    """``exp(mu) / (exp(mu) + 1/u - 1)`` with the pipeline's mu at 200 steps."""
    family, _ = load(folders[variant])

    def draw(side):
        shape = torch.Size([4000, 128, side, side])
        return family.sample_timesteps(
            shape, generator=torch.Generator().manual_seed(0), device=CPU
        )

    small, large = draw(8), draw(64)
    assert float(large.mean()) > float(small.mean()) + 0.05
    u = torch.rand(4000, generator=torch.Generator().manual_seed(0)).clamp(1e-3, 1 - 1e-3)
    scale = math.exp(compute_empirical_mu(64 * 64, 200))
    assert torch.allclose(large, (scale / (scale + 1 / u - 1)).clamp(1e-3, 1 - 1e-3))
    assert compute_empirical_mu(64 * 64, 200) == pytest.approx(1.15, abs=1e-3)  # 1024 px
    fractions = torch.tensor([0.25, 0.5])
    assert torch.equal(
        family.timesteps_from_fractions(fractions, torch.Size([2, 128, 4, 4])), fractions
    )


def test_a_single_file_bfl_transformer_is_the_folder_s(folders, tmp_path):
    folder = folders["dev"]
    base = Flux2Transformer2DModel.from_pretrained(folder / "transformer")
    file = tmp_path / "flux2-dev.safetensors"
    save_file(to_bfl_checkpoint(base.state_dict()), str(file))
    _, model = load(folder, transformer_file=str(file))
    loaded = model.denoiser.state_dict()
    assert loaded.keys() == base.state_dict().keys()
    assert all(torch.equal(loaded[key], value) for key, value in base.state_dict().items())
    broken = tmp_path / "broken.safetensors"
    save_file({"img_in.weight": torch.zeros(2, 2)}, str(broken))
    with pytest.raises(ModelLoadError, match="model.flux2.transformer_file: .*broken"):
        load(folder, transformer_file=str(broken))


def test_the_comfyui_layout_converts_back_exactly(folders, tmp_path):
    """Only q and k of the image stream trained: the fused qkv LoRA's v rows stay zero, and
    diffusers' converter gives every module its update back (v's: zero)."""
    _, model = load(folders["dev"])
    targets = ["to_q", "to_k", "add_v_proj", "to_out.0", "to_qkv_mlp_proj", "ff.linear_in"]
    add_lora(model.denoiser, rank=2, alpha=3, dropout=0.0, target_modules=targets)
    with torch.no_grad():
        for name, param in model.denoiser.named_parameters():
            if "lora_B" in name:
                param.normal_(generator=torch.Generator().manual_seed(len(name)))
    state = lora_state_dict(model.denoiser)
    file = tmp_path / "comfy.safetensors"
    save_file(to_comfyui(state, 3.0), str(file))
    keys = set(load_file(file))
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in keys
    assert "diffusion_model.single_blocks.0.linear1.lora_B.weight" in keys
    reference = _updates(state, scale=3 / 2)
    converted = _updates(Flux2Pipeline.lora_state_dict(str(file)))
    attention = "transformer.transformer_blocks.0.attn"
    extra = {f"{attention}.{name}" for name in ("to_v", "add_q_proj", "add_k_proj")}
    assert converted.keys() == reference.keys() | extra
    for module, update in converted.items():
        expected = reference.get(module, torch.zeros_like(update))
        assert torch.allclose(update, expected, rtol=1e-6, atol=1e-7), module


def test_a_comfyui_file_starts_a_run_at_its_rank_though_its_qkv_come_back_at_3r(folders, tmp_path):
    """lora.init_from: the fused qkv LoRA of a ComfyUI file converts back at rank 3r per
    projection, yet each projection's update has rank r, so a rank-r run holds it exactly."""
    family, model = load(folders["dev"])
    targets = family.lora_targets(model)["attention_ffn"]
    add_lora(model.denoiser, rank=2, alpha=3, dropout=0.0, target_modules=targets)
    with torch.no_grad():
        for name, param in model.denoiser.named_parameters():
            if "lora_B" in name:
                param.normal_(generator=torch.Generator().manual_seed(len(name)))
    expected = _velocity(model.denoiser)
    file = tmp_path / "comfy.safetensors"
    save_file(to_comfyui(lora_state_dict(model.denoiser), 3.0), str(file))
    converted = Flux2Pipeline.lora_state_dict(str(file))
    assert converted["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape[0] == 6

    _, fresh = load(folders["dev"])
    add_lora(fresh.denoiser, rank=2, alpha=2, dropout=0.0, target_modules=targets)
    base = _velocity(load(folders["dev"])[1].denoiser)
    report = init_lora_from(fresh.denoiser, file, family.lora_loader(fresh))
    assert (report.file_rank, report.fresh) == (2, 0) and report.kept == pytest.approx(1.0)
    assert not torch.allclose(expected, base, atol=1e-3)
    assert torch.allclose(_velocity(fresh.denoiser), expected, atol=1e-5, rtol=1e-5)


def test_a_module_without_a_comfyui_name_is_refused():
    state = {
        "transformer.x_embedder.lora_A.weight": torch.zeros(2, 4),
        "transformer.x_embedder.lora_B.weight": torch.zeros(4, 2),
    }
    with pytest.raises(ValueError, match="output.format=comfyui: the LoRA module 'x_embedder'"):
        to_comfyui(state, 2.0)


def test_a_corrupt_scheduler_config_is_named_not_replaced_by_defaults(tmp_path):
    folder = build_tiny_flux2(tmp_path / "klein", variant="klein")
    (folder / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"cannot read .*scheduler_config.json"):
        load(folder)


# ------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def runs(folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2-runs")
    flux = folders["klein"]
    tokens = "model.flux2.text_tokens=16"

    def train(name, *extra):
        return train_preset("presets/flux2-prior.json", root, name, flux, tokens, *extra)

    return flux, train("comfy"), train("diffusers", "output.format=diffusers", *SAMPLES)


@pytest.mark.slow
def test_the_preset_trains_with_the_teacher_and_the_lora_loads_in_the_pipeline(runs):
    flux, comfy, diffusers = runs
    rows = [json.loads(x) for x in (diffusers / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["teacher_fraction"] > 0 for r in rows) and rows[-1]["loss_prior"] > 0
    # Samples with the family's own sampler, beside the base model's.
    assert (diffusers / "samples/step000003-0-pair.png").is_file()
    pipe = Flux2KleinPipeline.from_pretrained(flux, local_files_only=True)
    before = _velocity(pipe.transformer)
    pipe.load_lora_weights(str(diffusers / "lora.safetensors"))
    after = _velocity(pipe.transformer)
    assert not torch.allclose(before, after, atol=1e-6)
    # The ComfyUI file: original (BFL) names, scale baked in, no alpha; diffusers' converter
    # gives back, module for module, the update of the diffusers file.
    comfy_file = load_file(comfy / "lora.safetensors")
    assert all(key.startswith("diffusion_model.") for key in comfy_file)
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight" in comfy_file
    assert not any(key.endswith(".alpha") for key in comfy_file)
    reference = _updates(load_file(diffusers / "lora.safetensors"), scale=8 / 4)
    converted = _updates(Flux2KleinPipeline.lora_state_dict(str(comfy / "lora.safetensors")))
    assert converted.keys() == reference.keys()
    for module, update in reference.items():
        assert torch.allclose(converted[module], update, rtol=1e-5, atol=1e-7), module
    other = Flux2KleinPipeline.from_pretrained(flux, local_files_only=True)
    other.load_lora_weights(str(comfy / "lora.safetensors"))
    assert torch.allclose(_velocity(other.transformer), after, atol=1e-5)


def _updates(state, scale=1.0):
    """module → ``scale * lora_B @ lora_A`` of a diffusers-named state dict."""
    modules = {key.removesuffix(".lora_A.weight") for key in state if key.endswith("lora_A.weight")}
    return {m: scale * state[f"{m}.lora_B.weight"] @ state[f"{m}.lora_A.weight"] for m in modules}


def _velocity(transformer):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, 4, 128, generator=generator)  # a 2 x 2 grid of cells
    embeds = torch.randn(1, 16, 3 * TEXT_DIM, generator=generator)
    with torch.no_grad():
        return transformer(
            hidden_states=tokens,
            encoder_hidden_states=embeds,
            timestep=torch.tensor([0.5]),
            img_ids=image_ids(2, 2, CPU),
            txt_ids=text_ids(16, CPU),
            return_dict=False,
        )[0]


# ---------------------------------------------------------------- the original (BFL) layout

_RENAMES = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_DOUBLE = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
    "attn.to_add_out": "txt_attn.proj",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
_SINGLE = {
    "attn.to_qkv_mlp_proj": "linear1",
    "attn.to_out": "linear2",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
}
_QKV = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}


def to_bfl_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers Flux2Transformer2DModel state dict in the original BFL key layout: the
    inverse of diffusers' ``convert_flux2_transformer_checkpoint_to_diffusers``."""
    state, out = dict(state), {}
    blocks = {int(key.split(".")[1]) for key in state if key.startswith("transformer_blocks.")}
    for i in sorted(blocks):
        for fused, parts in _QKV.items():
            weights = [state.pop(f"transformer_blocks.{i}.{part}.weight") for part in parts]
            out[f"double_blocks.{i}.{fused}.weight"] = torch.cat(weights)
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        block, index, inner = [*module.split(".", 2), "", ""][:3]
        if block == "transformer_blocks":
            name, norm = f"double_blocks.{index}.{_DOUBLE[inner]}", "norm" in inner
        elif block == "single_transformer_blocks":
            name, norm = f"single_blocks.{index}.{_SINGLE[inner]}", "norm" in inner
        else:
            name, norm = _RENAMES[module], False
        if module == "norm_out.linear":  # diffusers (scale, shift), BFL (shift, scale)
            value = torch.cat(value.chunk(2)[::-1])
        out[f"{name}.{'scale' if norm else param}"] = value
    return out


@pytest.mark.slow
def test_the_saved_lora_in_the_pipeline_predicts_as_the_trained_model(folders, tmp_path):
    model = {"family": "flux2", "path": str(folders["klein"]), "flux2": {"text_tokens": 16}}
    trained, lora = train_in_process(tmp_path, model)
    pipe = Flux2KleinPipeline.from_pretrained(folders["klein"], local_files_only=True)
    base = _velocity(pipe.transformer)
    pipe.load_lora_weights(str(lora))
    loaded = _velocity(pipe.transformer)
    assert torch.allclose(loaded, _velocity(trained), atol=1e-5)
    assert not torch.allclose(loaded, base, atol=1e-5)
