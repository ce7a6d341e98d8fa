"""Tiny random FLUX.2 pipelines (dev and klein), built in code and saved in the real layout.

``build_tiny_flux2`` writes a diffusers pipeline folder (``transformer/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``model_index.json``) made of the real classes
with small dimensions, so a FLUX.2 family loads it through the same code as a downloaded
``black-forest-labs/FLUX.2-dev`` / ``FLUX.2-klein-*`` folder:

- ``Flux2Transformer2DModel``: 1 double-stream + 1 single-stream block, 2 heads x 16,
  ``axes_dims_rope=(4, 4, 4, 4)`` (4 even entries summing to ``attention_head_dim``; real ``(32,
  32, 32, 32)`` -> 128), ``in_channels = 4 * latent_channels = 128`` (as the real models),
  ``joint_attention_dim = 3 * text hidden size``; dev has ``guidance_embeds=True``, klein
  ``False``.
- ``AutoencoderKLFlux2``: 4 blocks (8x compression), 32 latent channels, 2x2 patch, and non-trivial
  batch-norm running statistics (the pipelines de-normalise latents with them).
- klein (``Flux2KleinPipeline``, ``_class_name`` "Flux2KleinPipeline"): ``Qwen3ForCausalLM`` with
  28 narrow layers (the pipeline stacks hidden states 9, 18, 27) and a ``Qwen2Tokenizer``
  (byte-level BPE trained here) with a Qwen3-style chat template honouring ``enable_thinking``.
  ``variant="klein"`` is the step-distilled model (``is_distilled=True``: no CFG), ``"klein-base"``
  the undistilled one (CFG with an empty negative prompt when ``guidance_scale > 1``).
- dev (``Flux2Pipeline``, ``_class_name`` "Flux2Pipeline"): ``Mistral3ForConditionalGeneration``
  with 31 narrow text layers (hidden states 10, 20, 30 are stacked) and a tiny Pixtral vision
  tower. The real ``tokenizer/`` is a ``PixtralProcessor``, which needs torchvision; here it is a
  plain fast tokenizer (``PreTrainedTokenizerFast``) with a Mistral-style chat template accepting
  list-style content. The dev text path only calls ``tokenizer.apply_chat_template(...)`` (batched,
  tokenize=True, padding="max_length", max_length=512), so the tokenizer is enough for
  text-to-image.
- ``FlowMatchEulerDiscreteScheduler`` configured as the real ``scheduler_config.json`` (dynamic
  shifting; the pipelines pass ``mu`` from ``compute_empirical_mu``).

Both pipelines pad prompts to 512 tokens, so both tokenizers have a pad token.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VARIANTS = ("klein", "klein-base", "dev")
TEXT_DIM = 16  # text encoder hidden size; joint_attention_dim = 3 * TEXT_DIM
TEXT_LAYERS = {"klein": 28, "dev": 31}  # hidden states (9, 18, 27) / (10, 20, 30) are stacked
LATENT_CHANNELS = 32
WORDS = (
    *("a", "an", "the", "photo", "picture", "of", "sks", "star", "square", "red", "blue"),
    *("green", "yellow", "cat", "dog", "on", "in", "with", "striped", "background", "heart"),
    *("you", "are", "an", "ai", "that", "reasons", "about", "image", "descriptions", "description"),
)

TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 4 * LATENT_CHANNELS,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 3 * TEXT_DIM,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": (4, 4, 4, 4),
    "rope_theta": 2000,
    "eps": 1e-6,
}
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 8, 8, 8],
    "layers_per_block": 1,
    "latent_channels": LATENT_CHANNELS,
    "norm_num_groups": 4,
    "sample_size": 64,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "batch_norm_eps": 1e-4,
    "batch_norm_momentum": 0.1,
    "patch_size": (2, 2),
}
# black-forest-labs/FLUX.2-* scheduler/scheduler_config.json (the conversion script copies
# FLUX.1-dev's): dynamic shifting, exponential time shift. With dynamic shifting the pipeline's
# mu (compute_empirical_mu) decides the shift; shift/base_shift/max_shift are unused at sampling.
SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}

# Qwen3-style: string content, generation prompt with an empty think block when thinking is off.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- else -%}{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}{%- endif -%}"
)
# Mistral-style (Mistral-Small-3.x): list-style or string content for system and user turns.
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- else -%}{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{- '[SYSTEM_PROMPT]' + content + '[/SYSTEM_PROMPT]' -}}"
    "{%- elif message['role'] == 'user' -%}{{- '[INST]' + content + '[/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- content + eos_token -}}"
    "{%- endif -%}{%- endfor -%}"
)


def _train_bpe(special: list[str]) -> Tokenizer:
    """A byte-level BPE over WORDS (every byte is in the alphabet, so any text encodes)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([" ".join(WORDS)] * 4, trainer=trainer)
    return bpe


def build_qwen_tokenizer() -> Qwen2Tokenizer:
    """Qwen2Tokenizer (klein's tokenizer class) with Qwen's special tokens and pad token."""
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    bpe = _train_bpe(special)
    model = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[
            tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in model["merges"]
        ],
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": special[1:]})
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def build_mistral_tokenizer() -> PreTrainedTokenizerFast:
    """A plain fast tokenizer with Mistral's special tokens and a Mistral-style chat template."""
    special = [
        "<unk>",
        "<s>",
        "</s>",
        "[INST]",
        "[/INST]",
        "[SYSTEM_PROMPT]",
        "[/SYSTEM_PROMPT]",
        "[IMG]",
        "<pad>",
    ]
    bpe = _train_bpe(special)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=131072,
    )
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer


def _qwen3(tokenizer: Qwen2Tokenizer) -> Qwen3ForCausalLM:
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=32,
        num_hidden_layers=TEXT_LAYERS["klein"],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Qwen3ForCausalLM(config).eval()


def _mistral3(tokenizer: PreTrainedTokenizerFast) -> Mistral3ForConditionalGeneration:
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": len(tokenizer),
            "hidden_size": TEXT_DIM,
            "intermediate_size": 32,
            "num_hidden_layers": TEXT_LAYERS["dev"],
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "max_position_embeddings": 1024,
            "rms_norm_eps": 1e-5,
            "sliding_window": None,
            **ids,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "head_dim": 8,
            "image_size": 32,
            "patch_size": 8,
            "num_channels": 3,
        },
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        vision_feature_layer=-1,
        **ids,
    )
    return Mistral3ForConditionalGeneration(config).eval()


def build_tiny_flux2(folder: Path, *, variant: str = "klein", seed: int = 0) -> Path:
    """Save a tiny FLUX.2 pipeline: ``variant`` "klein" (distilled), "klein-base" or "dev"."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    folder = Path(folder)
    torch.manual_seed(seed)
    dev = variant == "dev"
    transformer = Flux2Transformer2DModel(**TRANSFORMER, guidance_embeds=dev)
    vae = AutoencoderKLFlux2(**VAE)
    with torch.no_grad():  # latents are de-normalised with these: make them non-trivial
        channels = vae.bn.running_mean.numel()
        vae.bn.running_mean.copy_(0.3 * torch.randn(channels))
        vae.bn.running_var.copy_(0.5 + torch.rand(channels))
        vae.bn.num_batches_tracked.fill_(1000)
    vae.eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    if dev:
        tokenizer = build_mistral_tokenizer()
        pipeline = Flux2Pipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=_mistral3(tokenizer),
            tokenizer=tokenizer,
            transformer=transformer,
        )
    else:
        tokenizer = build_qwen_tokenizer()
        pipeline = Flux2KleinPipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=_qwen3(tokenizer),
            tokenizer=tokenizer,
            transformer=transformer,
            is_distilled=variant == "klein",
        )
    pipeline.save_pretrained(folder)
    if dev:
        _portable_tokenizer_class(folder)
    return folder


def _portable_tokenizer_class(folder: Path) -> None:
    """Record the dev tokenizer as ``PreTrainedTokenizerFast``.

    transformers 5 saves a plain fast tokenizer under its v5 name ``TokenizersBackend``;
    ``PreTrainedTokenizerFast`` is the same class in v5 (an alias) and the real class in v4.
    """
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config_path = folder / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
