"""Tiny FLUX.1 dev / schnell pipelines load from disk, generate, and match the documented facts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

from tests.flux1.tiny_flux1 import bfl_layout, build_tiny_flux1

MAX_LEN = 16  # real default max_sequence_length: 512 (use 256 for schnell)


@pytest.fixture(scope="module", params=["dev", "schnell"])
def flux1(request, tmp_path_factory):
    folder = build_tiny_flux1(
        tmp_path_factory.mktemp("flux1") / request.param, variant=request.param
    )
    return request.param, FluxPipeline.from_pretrained(folder, local_files_only=True)


def test_config_of_variant(flux1):
    variant, pipe = flux1
    assert pipe.transformer.config.guidance_embeds is (variant == "dev")
    assert pipe.scheduler.config.use_dynamic_shifting is (variant == "dev")
    assert pipe.scheduler.config.shift == (3.0 if variant == "dev" else 1.0)
    assert pipe.tokenizer.model_max_length == 77
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (0.3611, 0.1159)
    assert pipe.vae_scale_factor == 8


@pytest.mark.parametrize("height,width", [(64, 64), (48, 64)])
def test_generates(flux1, height, width):
    _, pipe = flux1
    image = pipe(
        "a photo of sks star",
        height=height,
        width=width,
        num_inference_steps=2,
        max_sequence_length=MAX_LEN,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, height, width, 3)
    assert np.isfinite(image).all()


def test_direct_transformer_call_matches_pipeline_step(flux1):
    """One Euler step done by hand equals the pipeline's (output_type="latent", 1 step)."""
    _, pipe = flux1
    height, width, prompt = 48, 64, "a red cat"
    expected = pipe(
        prompt,
        height=height,
        width=width,
        num_inference_steps=1,
        max_sequence_length=MAX_LEN,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
    ).images

    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(
            prompt, prompt_2=None, max_sequence_length=MAX_LEN
        )
        lat_h, lat_w = height // 8, width // 8  # VAE latent grid; packed grid is half of it
        noise = torch.randn(1, 16, lat_h, lat_w, generator=torch.Generator().manual_seed(3))
        packed = FluxPipeline._pack_latents(noise, 1, 16, lat_h, lat_w)
        img_ids = FluxPipeline._prepare_latent_image_ids(
            1, lat_h // 2, lat_w // 2, "cpu", embeds.dtype
        )
        sigma = 1.0  # 1 step: sigmas = linspace(1, 1/1, 1) -> 1.0 (any shift keeps 1.0)
        guidance = torch.full([1], 3.5) if pipe.transformer.config.guidance_embeds else None
        velocity = pipe.transformer(
            hidden_states=packed,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=torch.tensor([sigma]),  # = scheduler timestep / 1000
            img_ids=img_ids,
            txt_ids=text_ids,
            guidance=guidance,
            return_dict=False,
        )[0]
    assert packed.shape == (1, (lat_h // 2) * (lat_w // 2), 64)
    assert text_ids.shape == (MAX_LEN, 3) and not text_ids.any()
    torch.testing.assert_close(packed + (0.0 - sigma) * velocity, expected)


def test_bfl_layout_matches_diffusers_single_file_converter():
    """bfl_layout inverts convert_flux_transformer_checkpoint_to_diffusers (real width, meta)."""
    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True)
    state = model.state_dict()
    bfl = bfl_layout(state)
    assert "double_blocks.0.img_attn.qkv.weight" in bfl and "single_blocks.1.linear1.weight" in bfl
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in state.items()}


def test_bfl_layout_values_round_trip(flux1):
    """Values: fusing then chunking (as diffusers does for double blocks) returns the tensors."""
    _, pipe = flux1
    state = pipe.transformer.state_dict()
    bfl = bfl_layout(state)
    q, _, v = bfl["double_blocks.0.img_attn.qkv.weight"].chunk(3, dim=0)
    torch.testing.assert_close(q, state["transformer_blocks.0.attn.to_q.weight"])
    torch.testing.assert_close(v, state["transformer_blocks.0.attn.to_v.weight"])
    scale, shift = state["norm_out.linear.weight"].chunk(2)
    torch.testing.assert_close(
        bfl["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale])
    )


def test_kohya_fused_block_diagonal_lora_converts_back_exactly():
    """Separate q/k/v(/mlp) LoRAs written as one fused kohya LoRA (down stacked, up block-diagonal,
    alpha = fused rank) come back from diffusers' converter as exactly the same tensors."""
    rank, dim, mlp = 4, 3072, 12288
    gen = torch.Generator().manual_seed(0)
    ours = {
        name: (torch.randn(rank, dim, generator=gen), torch.randn(out, rank, generator=gen))
        for name, out in (("to_q", dim), ("to_k", dim), ("to_v", dim), ("proj_mlp", mlp))
    }

    def fused(names):
        downs = torch.cat([ours[n][0] for n in names])
        up = torch.block_diag(*[ours[n][1] for n in names])
        return downs, up, torch.tensor(float(downs.shape[0]))

    sd = {}
    for key, names in (
        ("lora_unet_double_blocks_0_img_attn_qkv", ["to_q", "to_k", "to_v"]),
        ("lora_unet_single_blocks_0_linear1", ["to_q", "to_k", "to_v", "proj_mlp"]),
    ):
        down, up, alpha = fused(names)
        sd |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": alpha}
    out = _convert_kohya_flux_lora_to_diffusers(sd)
    for prefix, names in (
        ("transformer.transformer_blocks.0.attn.", ["to_q", "to_k", "to_v"]),
        (
            "transformer.single_transformer_blocks.0.",
            ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
        ),
    ):
        for name in names:
            down, up = ours[name.split(".")[-1]]
            assert torch.equal(out[f"{prefix}{name}.lora_A.weight"], down)
            assert torch.equal(out[f"{prefix}{name}.lora_B.weight"], up)


TARGETS = (
    *("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj"),
    *("attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj"),
    "ff_context.net.2",
)
SINGLE_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")


def test_diffusers_format_lora_with_alpha_loads_exactly(tmp_path):
    """`transformer.<module>.lora_A/lora_B.weight` + `.alpha` (the layout ComfyUI also maps for
    FLUX) goes through no converter: tensors are kept as written, scaling = alpha / rank."""
    pipe = FluxPipeline.from_pretrained(build_tiny_flux1(tmp_path / "dev"), local_files_only=True)
    rank, alpha, gen = 2, 1.0, torch.Generator().manual_seed(0)
    modules = [f"transformer_blocks.0.{t}" for t in TARGETS]
    modules += [f"single_transformer_blocks.{i}.{t}" for i in (0, 1) for t in SINGLE_TARGETS]
    sd = {}
    for name in modules:
        layer = pipe.transformer.get_submodule(name)
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(
            rank, layer.in_features, generator=gen
        )
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(
            layer.out_features, rank, generator=gen
        )
        sd[f"transformer.{name}.alpha"] = torch.tensor(alpha)
    pipe.load_lora_weights(dict(sd), adapter_name="ours")
    for name in modules:
        layer = pipe.transformer.get_submodule(name)
        assert torch.equal(layer.lora_A["ours"].weight, sd[f"transformer.{name}.lora_A.weight"])
        assert torch.equal(layer.lora_B["ours"].weight, sd[f"transformer.{name}.lora_B.weight"])
        assert float(layer.scaling["ours"]) == alpha / rank
