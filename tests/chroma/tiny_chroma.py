"""A tiny random Chroma pipeline, built in code and saved in the real layout.

``build_tiny_chroma`` writes a ``ChromaPipeline`` folder (``transformer/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``model_index.json``) made of the real classes
with small dimensions, so the chroma family loads it through the same code as a download of
``lodestones/Chroma1-HD``:

- ``ChromaTransformer2DModel``: 64 input channels (16 latent channels x 2x2 packing),
  ``joint_attention_dim`` = T5's ``d_model``; the approximator's input stays the real 64 channels
  (timestep, guidance and modulation-index projections of 16 + 16 + 32), its hidden size and
  depth shrunk;
- FLUX.1's ``AutoencoderKL`` (16 latent channels, scaling 0.3611, shift 0.1159) and T5 (encoder
  and tokenizer) from :mod:`tests.flux1.tiny_flux1`; no CLIP;
- ``FlowMatchEulerDiscreteScheduler`` as Chroma1-HD's ``scheduler_config.json`` (FLUX.1 dev's
  dynamic shifting).

``original_layout`` converts a diffusers state dict to the layout of Chroma's own single files
(``double_blocks``, ``single_blocks``, ``distilled_guidance_layer``), the inverse of diffusers'
``convert_chroma_transformer_checkpoint_to_diffusers`` (which hard-codes the real width, 3072).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ChromaPipeline,
    ChromaTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
)
from transformers import T5Config, T5EncoderModel

from tests.flux1.tiny_flux1 import SCHEDULERS, T5_DIM, VAE, build_t5_tokenizer

TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 1,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": T5_DIM,
    "axes_dims_rope": (4, 6, 6),  # sums to attention_head_dim (real: 16, 56, 56 -> 128)
    "approximator_num_channels": 64,  # the real value: 16 + 16 + 32 (see the module docstring)
    "approximator_hidden_dim": 32,  # real 5120
    "approximator_layers": 2,  # real 5
}
SCHEDULER = SCHEDULERS["dev"]  # lodestones/Chroma1-HD scheduler/scheduler_config.json


def build_tiny_chroma(folder: Path, *, seed: int = 0) -> Path:
    """Save a tiny Chroma pipeline at ``folder``."""
    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer()
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=T5_DIM,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            is_gated_act=True,
            dense_act_fn="gelu_new",
        )
    ).eval()
    pipeline = ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=AutoencoderKL(**VAE),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=ChromaTransformer2DModel(**TRANSFORMER),
    )
    pipeline.save_pretrained(folder)
    return folder


def original_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``ChromaTransformer2DModel`` state dict in Chroma's original single-file
    layout (no prefix; ComfyUI's files put ``model.diffusion_model.`` before each key)."""
    sd = dict(state)
    out: dict[str, torch.Tensor] = {}

    def take(src: str, dst: str) -> None:
        for suffix in ("weight", "bias"):
            if f"{src}.{suffix}" in sd:
                out[f"{dst}.{suffix}"] = sd.pop(f"{src}.{suffix}")

    def fuse(srcs: list[str], dst: str) -> None:
        for suffix in ("weight", "bias"):
            out[f"{dst}.{suffix}"] = torch.cat([sd.pop(f"{s}.{suffix}") for s in srcs], dim=0)

    take("distilled_guidance_layer.in_proj", "distilled_guidance_layer.in_proj")
    take("distilled_guidance_layer.out_proj", "distilled_guidance_layer.out_proj")
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("distilled_guidance_layer.layers.")}
    for i in sorted(layers):
        p = f"distilled_guidance_layer.layers.{i}."
        take(p + "linear_1", p + "in_layer")
        take(p + "linear_2", p + "out_layer")
        out[f"distilled_guidance_layer.norms.{i}.scale"] = sd.pop(
            f"distilled_guidance_layer.norms.{i}.weight"
        )
    take("context_embedder", "txt_in")
    take("x_embedder", "img_in")
    take("proj_out", "final_layer.linear")
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")}
    for i in sorted(blocks):
        p, q = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        fuse([p + "attn.to_q", p + "attn.to_k", p + "attn.to_v"], q + "img_attn.qkv")
        fuse(
            [p + "attn.add_q_proj", p + "attn.add_k_proj", p + "attn.add_v_proj"],
            q + "txt_attn.qkv",
        )
        out[q + "img_attn.norm.query_norm.scale"] = sd.pop(p + "attn.norm_q.weight")
        out[q + "img_attn.norm.key_norm.scale"] = sd.pop(p + "attn.norm_k.weight")
        out[q + "txt_attn.norm.query_norm.scale"] = sd.pop(p + "attn.norm_added_q.weight")
        out[q + "txt_attn.norm.key_norm.scale"] = sd.pop(p + "attn.norm_added_k.weight")
        take(p + "ff.net.0.proj", q + "img_mlp.0")
        take(p + "ff.net.2", q + "img_mlp.2")
        take(p + "ff_context.net.0.proj", q + "txt_mlp.0")
        take(p + "ff_context.net.2", q + "txt_mlp.2")
        take(p + "attn.to_out.0", q + "img_attn.proj")
        take(p + "attn.to_add_out", q + "txt_attn.proj")
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")}
    for i in sorted(blocks):
        p, q = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        fuse([p + "attn.to_q", p + "attn.to_k", p + "attn.to_v", p + "proj_mlp"], q + "linear1")
        out[q + "norm.query_norm.scale"] = sd.pop(p + "attn.norm_q.weight")
        out[q + "norm.key_norm.scale"] = sd.pop(p + "attn.norm_k.weight")
        take(p + "proj_out", q + "linear2")
    if sd:
        raise ValueError(f"unconverted keys: {sorted(sd)}")
    return {k: v.contiguous() for k, v in out.items()}
