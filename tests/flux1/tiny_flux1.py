"""Tiny random FLUX.1 pipelines (dev, schnell and Kontext), built in code and saved in the real
layout.

``build_tiny_flux1`` writes a ``FluxPipeline`` folder (Kontext: ``FluxKontextPipeline``),
``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``text_encoder_2/``,
``tokenizer_2/``, ``scheduler/``, ``model_index.json``, made of the real classes with small
dimensions, so a FLUX.1 family loads it through the same code as a downloaded
``black-forest-labs/FLUX.1-dev``, ``FLUX.1-schnell`` or ``FLUX.1-Kontext-dev`` folder:

- ``FluxTransformer2DModel`` (64 input channels = 16 latent channels x 2x2 patch; dev has
  ``guidance_embeds=True``, schnell ``False``);
- ``AutoencoderKL`` with FLUX's 16 latent channels, 8x compression (4 blocks), no quant convs,
  ``scaling_factor=0.3611``, ``shift_factor=0.1159``;
- ``CLIPTextModel`` + ``CLIPTokenizer`` (byte-level BPE trained here, ``model_max_length=77``);
- ``T5EncoderModel`` (gated-gelu, as t5-v1_1) + a T5 tokenizer over a Unigram vocabulary built
  here from (piece, score) pairs (saved as tokenizer.json; in transformers 5
  ``T5TokenizerFast`` is ``T5Tokenizer``);
- ``FlowMatchEulerDiscreteScheduler`` configured as the real ``scheduler_config.json``: dev uses
  dynamic shifting (base_shift 0.5, max_shift 1.15, base/max_image_seq_len 256/4096, shift 3.0,
  the static shift unused); schnell shift 1.0 without dynamic shifting.

The real pipeline pads T5 prompts to ``max_sequence_length`` (``FluxPipeline.__call__`` default
512 for both; schnell was trained with 256, which is the value to use for it). Tests pass a small
``max_sequence_length`` to keep the tiny T5 fast.

``bfl_layout`` converts a diffusers transformer state dict to the original BFL single-file key
layout (fused qkv, ``single_blocks.N.linear1``...). diffusers' converter for that layout
(``convert_flux_transformer_checkpoint_to_diffusers``) hard-codes ``inner_dim = 3072``, so a
tiny transformer cannot be loaded back with ``from_single_file``; the tests check the layout
against the converter on a meta-device transformer of the real width instead.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

CLIP_DIM = 32  # pooled_projection_dim
T5_DIM = 32  # joint_attention_dim
WORDS = (
    *("a", "an", "the", "photo", "picture", "of", "sks", "star", "square", "red", "blue"),
    *("green", "yellow", "cat", "dog", "on", "in", "with", "striped", "background", "heart"),
)

TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 1,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": T5_DIM,
    "pooled_projection_dim": CLIP_DIM,
    "axes_dims_rope": (4, 6, 6),  # sums to attention_head_dim (real: 16, 56, 56 -> 128)
}
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 8, 8, 8],
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 4,
    "sample_size": 64,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}
SCHEDULERS = {
    # black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json
    "dev": {
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
    # black-forest-labs/FLUX.1-Kontext-dev scheduler/scheduler_config.json: dev's
    "kontext": {
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
    # black-forest-labs/FLUX.1-schnell scheduler/scheduler_config.json
    "schnell": {
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
}


def build_clip_tokenizer() -> CLIPTokenizer:
    """A CLIPTokenizer over a byte-level BPE (``</w>`` word ends) trained here on WORDS."""
    special = ["<|startoftext|>", "<|endoftext|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator([" ".join(WORDS)] * 4, trainer=trainer)
    vocab = dict(bpe.get_vocab())
    for char in sorted(alphabet):  # every byte can end a word
        vocab.setdefault(f"{char}</w>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in _json_merges(bpe)]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _json_merges(bpe: Tokenizer) -> list:
    return json.loads(bpe.to_str())["model"]["merges"]


def build_t5_tokenizer() -> T5Tokenizer:
    """A T5 tokenizer (Unigram, T5's special tokens) whose vocabulary is WORDS plus characters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{word}", -1.0) for word in WORDS]
    pieces += [(char, -5.0) for char in string.ascii_lowercase + string.digits + ",.'-"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def build_tiny_flux1(folder: Path, *, variant: str = "dev", seed: int = 0) -> Path:
    """Save a tiny FLUX.1 pipeline, ``variant`` "dev" (guidance embedding), "schnell" or
    "kontext" (dev's parts saved by ``FluxKontextPipeline``, as FLUX.1-Kontext-dev)."""
    if variant not in SCHEDULERS:
        raise ValueError(f"variant must be 'dev', 'schnell' or 'kontext', not {variant!r}")
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_t5_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=CLIP_DIM,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=CLIP_DIM,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
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
    transformer = FluxTransformer2DModel(**TRANSFORMER, guidance_embeds=variant != "schnell")
    vae = AutoencoderKL(**VAE)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULERS[variant])
    pipeline_class = FluxKontextPipeline if variant == "kontext" else FluxPipeline
    pipeline = pipeline_class(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipeline.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------- BFL single-file layout


def bfl_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``FluxTransformer2DModel`` state dict in the original BFL single-file layout.

    The inverse of diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``: q/k/v fused into
    ``img_attn.qkv`` / ``txt_attn.qkv``, single-block q/k/v/mlp fused into ``linear1``, and the
    final adaLN modulation back in BFL's (shift, scale) order. Keys have no prefix (BFL's own
    files); ComfyUI-style files prefix them with ``model.diffusion_model.``.
    """
    sd = dict(state)
    out: dict[str, torch.Tensor] = {}

    def take(src: str, dst: str) -> None:
        for suffix in ("weight", "bias"):
            if f"{src}.{suffix}" in sd:
                out[f"{dst}.{suffix}"] = sd.pop(f"{src}.{suffix}")

    def fuse(srcs: list[str], dst: str) -> None:
        for suffix in ("weight", "bias"):
            out[f"{dst}.{suffix}"] = torch.cat([sd.pop(f"{s}.{suffix}") for s in srcs], dim=0)

    for ours, theirs in (
        ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
        ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
        ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
        ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
        ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
        ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
        ("context_embedder", "txt_in"),
        ("x_embedder", "img_in"),
        ("proj_out", "final_layer.linear"),
    ):
        take(ours, theirs)
    for suffix in ("weight", "bias"):
        scale, shift = sd.pop(f"norm_out.linear.{suffix}").chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = torch.cat([shift, scale], dim=0)

    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")}
    for i in sorted(blocks):
        p, q = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        take(p + "norm1.linear", q + "img_mod.lin")
        take(p + "norm1_context.linear", q + "txt_mod.lin")
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
        take(p + "norm.linear", q + "modulation.lin")
        fuse([p + "attn.to_q", p + "attn.to_k", p + "attn.to_v", p + "proj_mlp"], q + "linear1")
        out[q + "norm.query_norm.scale"] = sd.pop(p + "attn.norm_q.weight")
        out[q + "norm.key_norm.scale"] = sd.pop(p + "attn.norm_k.weight")
        take(p + "proj_out", q + "linear2")

    if sd:
        raise ValueError(f"unconverted keys: {sorted(sd)}")
    return {k: v.contiguous() for k, v in out.items()}
