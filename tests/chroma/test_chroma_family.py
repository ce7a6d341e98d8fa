"""The chroma family on a tiny real Chroma folder: the pipeline's encodings, mask and samples, the
teacher equal to a separately loaded base (with gradient checkpointing too), single-file
transformers in Chroma's and ComfyUI's layouts, the ComfyUI LoRA layout read back by diffusers'
converter, and the public CLI training a masked-prior LoRA from the shipped preset that
ChromaPipeline loads back."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import ChromaPipeline, ChromaTransformer2DModel
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

from modules.config.schema import ModelConfig
from modules.lora import add_lora, lora_disabled
from modules.models import get_family, load_model
from modules.models.base_weights import QuantisedLinear
from modules.models.chroma.family import diffusers_names, to_comfyui
from modules.models.packing import pack, unpack
from modules.models.registry import family_spec
from modules.models.single_file_check import single_file_problem
from tests.chroma.tiny_chroma import build_tiny_chroma, original_layout
from tests.models.test_block_swap import _step, _with_lora
from tests.runner_check import assert_predict_goes_through_the_runner
from tests.trained_lora import SAMPLES, train_preset

CPU = torch.device("cpu")
TOKENS = 16
PROMPTS = ["a photo of sks star on a striped background", "a red cat"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_chroma(tmp_path_factory.mktemp("chroma") / "tiny")


@pytest.fixture(scope="module")
def pipe(folder):
    pipeline = ChromaPipeline.from_pretrained(folder, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def load(folder, memory=None, **options):
    config = ModelConfig(
        family="chroma",
        path=str(folder),
        chroma={"text_tokens": TOKENS, **options},
        memory=memory or {},
    )
    family = get_family(config)
    return family, load_model(family, config, dtype=torch.float32, device=CPU)


def test_encodings_latents_and_samples_are_the_pipeline_s(folder, pipe):
    family, model = load(folder)
    text = family.encode_prompts(model, PROMPTS)
    embeds, _, mask, negative, _, negative_mask = pipe.encode_prompt(
        PROMPTS, negative_prompt=None, device=CPU, max_sequence_length=TOKENS
    )
    assert torch.allclose(text["embeds"], embeds, atol=1e-5)
    # The prompt's tokens and one padding token; the rest of the padding is masked.
    assert torch.equal(text["mask"], mask.long()) and text["mask"].sum(1).tolist() == [11, 5]
    counts, limit = family.prompt_token_counts(model, PROMPTS)
    assert counts == [10, 4] and limit == TOKENS
    images = torch.rand(1, 3, 48, 64) * 2 - 1  # non-square: 6 x 8 latent cells
    latents = family.encode_images(model, images)
    config = pipe.vae.config
    expected = (
        pipe.vae.encode(images).latent_dist.mode() - config.shift_factor
    ) * config.scaling_factor
    assert latents.shape == (1, 16, 6, 8) and torch.allclose(latents, expected)
    assert torch.equal(pack(latents), pipe._pack_latents(latents, 1, 16, 6, 8))
    assert torch.equal(unpack(pack(latents), 16, 6, 8), latents)
    # Samples: the pipeline's schedule (shifted by mu) and CFG 5 against the empty negative
    # prompt, with the mask as booleans (the family's; see its docstring).
    sample = family.sample(
        model, text, size=(32, 48), steps=2, generator=torch.Generator().manual_seed(3)
    )
    expected = pipe(
        prompt_embeds=embeds,
        prompt_attention_mask=mask.bool(),
        negative_prompt_embeds=negative,
        negative_prompt_attention_mask=negative_mask.bool(),
        height=48,
        width=32,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
    ).images
    assert sample.shape == (2, 3, 48, 32)
    assert torch.allclose(sample * 0.5 + 0.5, expected, atol=1e-4)


def test_teacher_is_the_base_and_checkpointing_keeps_the_mask(folder):
    family, model = load(folder)
    base = ChromaTransformer2DModel.from_pretrained(folder / "transformer")
    text = family.encode_prompts(model, PROMPTS)
    family.release_encoders(model, keep_decoder=False)
    add_lora(model.denoiser, rank=2, alpha=2, dropout=0.0, target_modules=["to_q", "proj_mlp"])
    noisy, t = torch.randn(2, 16, 6, 8), torch.tensor([0.3, 0.8])
    # Gradient checkpointing (the preset's): diffusers runs the single blocks without the mask
    # there; the student with its zero LoRA must still be the teacher.
    model.denoiser.enable_gradient_checkpointing()
    with lora_disabled(model.denoiser), torch.no_grad():
        teacher = family.predict(model, noisy, t, text)
    student = family.predict(model, noisy, t, text)
    assert student.requires_grad and torch.allclose(student, teacher, atol=1e-6)
    model.denoiser.disable_gradient_checkpointing()
    with torch.no_grad():
        for name, param in model.denoiser.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(0))
    student = family.predict(model, noisy, t, text)
    assert_predict_goes_through_the_runner(family, model, noisy, t, text, student)
    with torch.no_grad(), lora_disabled(model.denoiser):
        teacher = family.predict(model, noisy, t, text)
    with torch.no_grad():
        reference = family.predict(
            type(model)(denoiser=base, identity="", parts=model.parts), noisy, t, text
        )
    assert torch.equal(teacher, reference) and not torch.allclose(student, teacher)


def test_single_files_in_chroma_s_and_comfyui_s_layouts_load_as_the_folder(folder, tmp_path):
    folder_state = ChromaTransformer2DModel.from_pretrained(folder / "transformer").state_dict()
    original = original_layout(folder_state)
    files = {
        "chroma.safetensors": original,
        "comfyui.safetensors": {f"model.diffusion_model.{k}": v for k, v in original.items()},
        "diffusers.safetensors": folder_state,
    }
    spec = family_spec("chroma")
    for name, state in files.items():
        save_file(state, tmp_path / name)
        assert single_file_problem(spec, str(tmp_path / name), str(folder)) is None, name
        _, model = load(folder, transformer_file=str(tmp_path / name))
        loaded = model.denoiser.state_dict()
        assert set(loaded) == set(folder_state), name
        assert all(torch.equal(loaded[k], v) for k, v in folder_state.items()), name
    # ComfyUI's scaled fp8 form (its older one): that layer stays in 8 bits, as the file has it.
    layer = "double_blocks.0.img_mlp.0"
    weight = original[f"{layer}.weight"]
    scale = weight.abs().max() / 448
    scaled = dict(files["comfyui.safetensors"])
    codes = (weight / scale).to(torch.float8_e4m3fn)
    scaled[f"model.diffusion_model.{layer}.weight"] = codes
    scaled[f"model.diffusion_model.{layer}.scale_weight"] = scale.reshape(())
    scaled["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(scaled, tmp_path / "fp8.safetensors")
    _, model = load(folder, transformer_file=str(tmp_path / "fp8.safetensors"))
    kept = model.denoiser.transformer_blocks[0].ff.net[0].proj
    assert isinstance(kept, QuantisedLinear) and kept.form == "fp8_scaled"
    assert torch.equal(kept.dequantised(), codes.float() * scale)
    flux1 = {
        "double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2),
        "img_in.weight": torch.zeros(2, 4),
    }
    save_file(flux1, tmp_path / "flux1.safetensors")
    said = single_file_problem(spec, str(tmp_path / "flux1.safetensors"), str(folder))
    assert (
        said is not None and "holds a FLUX.1 transformer" in said and "model.family=flux1" in said
    )
    # And the other way round: a Chroma file given to FLUX.1 is named as Chroma's.
    said = single_file_problem(
        family_spec("flux1"), str(tmp_path / "chroma.safetensors"), str(folder)
    )
    assert said is not None and "model.family=chroma" in said, said
    # The renaming is diffusers' converter's at Chroma's real width (which it hard-codes).
    with torch.device("meta"):
        real = ChromaTransformer2DModel(num_layers=1, num_single_layers=1, approximator_layers=2)
    theirs = convert_chroma_transformer_checkpoint_to_diffusers(original_layout(real.state_dict()))
    ours = diffusers_names(
        {f"model.diffusion_model.{k}": v for k, v in original_layout(real.state_dict()).items()}
    )
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_the_comfyui_layout_converts_back_through_diffusers_tensor_for_tensor():
    """At Chroma's real width (diffusers' converter hard-codes a single block's linear1 split):
    every kind of module, fused ones included, comes back as the diffusers-layout LoRA."""
    width, rank, alpha = 3072, 2, 4.0  # alpha / rank = 2: the converter moves it into lora_A
    generator = torch.Generator().manual_seed(0)
    shapes = {
        "transformer_blocks.0.attn.to_q": (width, width),
        "transformer_blocks.0.attn.to_k": (width, width),
        "transformer_blocks.0.attn.to_v": (width, width),
        "transformer_blocks.0.attn.add_q_proj": (width, width),
        "transformer_blocks.0.attn.add_k_proj": (width, width),
        "transformer_blocks.0.attn.add_v_proj": (width, width),
        "transformer_blocks.0.attn.to_out.0": (width, width),
        "transformer_blocks.0.attn.to_add_out": (width, width),
        "transformer_blocks.0.ff.net.0.proj": (4 * width, width),
        "transformer_blocks.0.ff_context.net.2": (width, 4 * width),
        "single_transformer_blocks.0.attn.to_q": (width, width),
        "single_transformer_blocks.0.attn.to_k": (width, width),
        "single_transformer_blocks.0.attn.to_v": (width, width),
        "single_transformer_blocks.0.proj_mlp": (4 * width, width),
        "single_transformer_blocks.0.proj_out": (width, 5 * width),
        "proj_out": (64, width),
    }
    state = {}
    for module, (out, inputs) in shapes.items():
        state[f"transformer.{module}.lora_A.weight"] = torch.randn(
            rank, inputs, generator=generator
        )
        state[f"transformer.{module}.lora_B.weight"] = torch.randn(out, rank, generator=generator)
    comfy = to_comfyui(state, alpha, width=width)
    assert "diffusion_model.single_blocks.0.linear1.lora_up.weight" in comfy
    assert float(comfy["diffusion_model.double_blocks.0.img_attn.qkv.alpha"]) == 3 * alpha
    back = _convert_kohya_flux_lora_to_diffusers(dict(comfy))
    # diffusers' converter names the final layer without the transformer prefix.
    back = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in back.items()}
    assert set(back) == set(state)
    for key, value in state.items():
        final = key.startswith("transformer.proj_out.")
        scale = alpha / rank if (".lora_A." in key) != final else 1.0
        assert torch.equal(back[key], value * scale), key


# ------------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_the_preset_trains_with_the_teacher_and_the_lora_loads_in_the_pipeline(
    folder, pipe, tmp_path
):
    tokens = f"model.chroma.text_tokens={TOKENS}"
    run = train_preset(
        "presets/chroma-prior.json",
        tmp_path,
        "run",
        folder,
        tokens,
        "output.format=diffusers",
        *SAMPLES,
    )
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["teacher_fraction"] > 0 for r in rows) and rows[-1]["loss_prior"] > 0
    assert rows[0]["loss_prior"] == 0.0  # zero LoRA, checkpointed student: still the teacher
    assert (run / "samples/step000003-0-pair.png").is_file()
    inputs = _inputs()
    before = _velocity(pipe.transformer, *inputs)
    pipe.load_lora_weights(str(run / "lora.safetensors"))
    try:
        after = _velocity(pipe.transformer, *inputs)
    finally:
        pipe.unload_lora_weights()
    assert not torch.allclose(before, after, atol=1e-6)
    # The ComfyUI layout of that LoRA (what output.format=comfyui writes): Chroma's names,
    # read back by diffusers' converter (all but linear1, whose split it hard-codes at the
    # real width: the test above) as the diffusers file, tensor for tensor.
    family, model = load(folder)
    state = load_file(run / "lora.safetensors")
    comfy = family.comfyui_converter(model)(state, 8.0)
    assert all(k.startswith("diffusion_model.") for k in comfy)
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight" in comfy
    back = _convert_kohya_flux_lora_to_diffusers(
        {k: v for k, v in comfy.items() if ".linear1." not in k}
    )
    back = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in back.items()}
    fused = ("single_transformer_blocks.0.attn.to_", "single_transformer_blocks.1.attn.to_")
    assert set(back) == {
        k
        for k in state
        if not k.startswith(tuple(f"transformer.{f}" for f in fused)) and ".proj_mlp." not in k
    }
    for key, value in back.items():
        final = key.startswith("transformer.proj_out.")
        scale = 2.0 if (".lora_A." in key) != final else 1.0
        assert torch.equal(value, state[key] * scale), key


def _inputs():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, 4, 64, generator=generator)  # a 2 x 2 grid of packed tokens
    embeds = torch.randn(1, 6, 32, generator=generator)
    return tokens, embeds


def _velocity(transformer, tokens, embeds):
    ids = torch.tensor([[0.0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]])
    with torch.no_grad():
        return transformer(
            hidden_states=tokens,
            encoder_hidden_states=embeds,
            timestep=torch.tensor([0.5]),
            img_ids=ids,
            txt_ids=torch.zeros(embeds.shape[1], 3),
            return_dict=False,
        )[0]


def test_block_swap_and_checkpointing_change_nothing_training_computes(folder):
    """Double then single blocks, in the forward's order: with none or all of them swapped,
    gradient checkpointing off or on, a step (teacher, student, backward) with one prompt's
    padding masked computes the same loss and LoRA gradients."""
    text = {"embeds": torch.randn(2, 6, 32), "mask": torch.tensor([[1] * 6, [1] * 3 + [0] * 3])}
    results = {}
    for swap in (0, 3):
        family, model = load(folder, memory={"blocks_to_swap": swap})
        assert family.blocks(model.denoiser) == [
            *model.denoiser.transformer_blocks,
            *model.denoiser.single_transformer_blocks,
        ]
        params = _with_lora(family, model)
        for checkpointing in (False, True):
            if checkpointing:
                model.denoiser.enable_gradient_checkpointing()
            results[swap, checkpointing] = _step(
                family, model, params, lambda: (torch.randn(2, 16, 4, 6), text)
            )
    expected_loss, expected_grads = results[0, False]
    for key, (loss, grads) in results.items():
        assert torch.equal(loss, expected_loss), key
        assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads, strict=True)), key
