"""A tiny random Qwen-Image pipeline, built in code and saved in the real on-disk layout.

``build_tiny_qwen_image(folder)`` writes what ``QwenImagePipeline(...).save_pretrained`` writes for
``Qwen/Qwen-Image``: ``transformer/`` (``QwenImageTransformer2DModel``), ``vae/``
(``AutoencoderKLQwenImage``), ``text_encoder/`` (``Qwen2_5_VLForConditionalGeneration``),
``tokenizer/`` (``Qwen2Tokenizer``) and ``scheduler/`` (``FlowMatchEulerDiscreteScheduler``), so a
family loads it through the same code as a downloaded folder. All models are the real classes with
small dimensions and random weights (a few MB, built in well under a second or two).

What is kept from the real model, because training and inference code depends on it:

- the VAE compresses 8x (three ``temperal_downsample`` entries) into ``z_dim=16`` channels, with
  non-trivial ``latents_mean`` / ``latents_std`` (so a missing normalisation shows up);
- the transformer takes 2x2-packed latents (``in_channels = 4 * z_dim``, ``out_channels = z_dim``),
  ``joint_attention_dim`` equals the text encoder's hidden size and ``axes_dims_rope`` sums to
  ``attention_head_dim``;
- the text encoder is a Qwen2.5-VL (text + a one-block vision tower, ``mrope_section`` summing to
  half the text head size, vision ``out_hidden_size`` equal to the text hidden size);
- the tokenizer is a byte-level BPE trained here with the pre-tokenizer regex that transformers'
  ``Qwen2Tokenizer`` uses, on text that makes every word of the pipeline's prompt template a
  single token, so the template's system prefix is exactly 34 tokens, as with the real tokenizer,
  and the pipeline's ``prompt_template_encode_start_idx = 34`` drops exactly the template;
- the scheduler has the values of ``Qwen/Qwen-Image``'s ``scheduler/scheduler_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AddedToken,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

# The pipeline's prompt template (QwenImagePipeline.prompt_template_encode) and the prefix the
# pipeline drops (prompt_template_encode_start_idx = 34 tokens): everything before the user prompt.
TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
    "<|im_start|>user\n"
    "{}<|im_end|>\n<|im_start|>assistant\n"
)
TEMPLATE_PREFIX = TEMPLATE.split("{}")[0]
DROP_TOKENS = 34

# Qwen2's special tokens in their real order (<|endoftext|> is the pad/unk/eos token).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
PROMPT_WORDS = (
    *("a", "an", "the", "photo", "picture", "of", "sks", "star", "square", "heart", "red", "blue"),
    *("green", "yellow", "magenta", "cat", "dog", "on", "in", "with", "striped", "checkered"),
    *("background", "white", "black", "stripes", "ring", "close", "up", "person", "wearing"),
)

TEXT_DIM = 32
TEXT_HEADS = 2  # head_dim 16: mrope_section sums to 8
TEXT_ENCODER = {
    "text_config": {
        "hidden_size": TEXT_DIM,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": TEXT_HEADS,
        "num_key_value_heads": 1,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": [2, 3, 3],
        },
    },
    "vision_config": {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_heads": 2,
        "out_hidden_size": TEXT_DIM,
        "fullatt_block_indexes": [0],
    },
}
TRANSFORMER = {
    "patch_size": 2,
    "in_channels": 64,  # 4 * z_dim: 2x2 packed latents
    "out_channels": 16,  # z_dim
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": TEXT_DIM,
    "axes_dims_rope": (4, 6, 6),  # sums to attention_head_dim, entries even
}
VAE = {
    "base_dim": 8,
    "z_dim": 16,
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],  # 2 ** 3 = 8x spatial compression
    "latents_mean": [round(0.1 * (i - 7.5), 3) for i in range(16)],
    "latents_std": [round(1.5 + 0.1 * i, 3) for i in range(16)],
}
# Qwen/Qwen-Image scheduler/scheduler_config.json (other fields are the class defaults there too).
SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "invert_sigmas": False,
    "stochastic_sampling": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}


def _training_text(templates: tuple[str, ...]) -> list[str]:
    """Lines with every template and prompt word after a space and at a line start."""
    words = set(PROMPT_WORDS)
    for piece in " ".join(templates).replace("{}", " ").split():
        for special in SPECIAL_TOKENS:
            piece = piece.replace(special, " ")
        words.update(piece.replace(",", " ").replace(":", " ").split())
    lines = []
    for word in sorted(words):
        lines += [f"{word}, {word}: {word}\n", f" {word} {word.lower()} {word.capitalize()}\n"] * 4
    for template in templates:
        prefix = template.split("{}")[0]
        lines += [prefix.replace("<|im_start|>", "").replace("<|im_end|>", "")] * 8
    return lines


def build_tokenizer(templates: tuple[str, ...] = (TEMPLATE,)) -> Qwen2Tokenizer:
    """A Qwen2Tokenizer over a byte-level BPE trained here with Qwen2's own pre-tokenizer, on
    text that makes every word of ``templates`` a single token."""
    bpe = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        min_frequency=1,
        special_tokens=[SPECIAL_TOKENS[0]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_training_text(templates), trainer=trainer)
    merges = [tuple(pair) for pair in _merges(bpe)]
    tokenizer = Qwen2Tokenizer(vocab=bpe.get_vocab(), merges=merges, model_max_length=131072)
    tokenizer.add_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS[1:]]
    )
    return tokenizer


def _merges(bpe: Tokenizer) -> list[list[str]]:
    merges = json.loads(bpe.to_str())["model"]["merges"]
    return [m.split(" ") if isinstance(m, str) else m for m in merges]


def build_tiny_qwen_image(folder: Path, *, seed: int = 0) -> Path:
    """Save a tiny random Qwen-Image pipeline (diffusers layout) to ``folder`` and return it."""
    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        **TEXT_ENCODER,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    config.text_config.vocab_size = len(tokenizer)
    config.text_config.bos_token_id = ids("<|endoftext|>")
    config.text_config.eos_token_id = ids("<|im_end|>")
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    pipeline = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=AutoencoderKLQwenImage(**VAE),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=QwenImageTransformer2DModel(**TRANSFORMER),
    )
    pipeline.save_pretrained(folder)
    return folder
