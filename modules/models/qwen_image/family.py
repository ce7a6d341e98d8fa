"""The ``qwen_image`` family: Qwen-Image LoRAs from a local diffusers folder.

The folder is the diffusers layout (as ``QwenImagePipeline.save_pretrained`` writes it, e.g. a
download of ``Qwen/Qwen-Image``)::

    transformer/   QwenImageTransformer2DModel
    vae/           AutoencoderKLQwenImage: 16 latent channels, per-channel latents_mean / _std
    text_encoder/  Qwen2_5_VLForConditionalGeneration (its language model reads the prompt)
    tokenizer/     Qwen2Tokenizer
    scheduler/     scheduler_config.json: the timestep shift rule

Everything is read with ``local_files_only``. As ``QwenImagePipeline`` does:

- Latents: ``(z - latents_mean) / latents_std`` of the VAE posterior's mode (deterministic, so
  the cache holds one latent per image); the VAE works on one-frame videos, the family keeps
  images (B, 16, H/8, W/8). ``predict`` packs each 2x2 patch into one token of 64 values and
  unpacks the prediction, so masks and the loss stay on the latent grid.
- Prompts: the pipeline's chat template around the caption; the last hidden state of the text
  encoder, without the template's 34-token system prefix, up to ``model.qwen_image.text_tokens``
  tokens, with its attention mask (padded positions are not attended; the mask is left out when
  no sample of a batch is padded, as the pipeline does).
- Timesteps: sigma in (0, 1), uniform then shifted by the folder's rule, which grows with the
  image's token count (``mu`` from ``calculate_shift``). The samples use the pipeline's schedule
  (the same shift, stretched so its last step lands on ``shift_terminal``); training draws
  ``t`` continuously and takes the shift alone, as the stretch is anchored at a sampler's last
  step.
- Samples: true classifier-free guidance (``sample_cfg`` with ``negative_prompt``), the
  combined prediction rescaled to the conditional one's norm per token.

A Qwen-Image-Edit or Edit Plus (2509 / 2511) folder (``model_index.json`` names
``QwenImageEditPipeline`` or ``QwenImageEditPlusPipeline``; a ``processor/`` beside the
tokenizer) trains edits: each item's references come through the conditioning slot
(:meth:`QwenImageFamily.encode_conditioning`, :mod:`modules.models.qwen_image.edit`), the
denoiser reads the edit prompt and the references' tokens after the target's, and predicts the
target's. Edit samples are the pipelines' default call: no true CFG (their negative prompt would
have to be read with each sample's references).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from diffusers.loaders import QwenImageLoraLoaderMixin
from torch import Tensor
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from modules.config import ConfigError
from modules.models.base import ComfyConverter, LoadedModel, TextEncoding
from modules.models.flow_matching import ScheduleShift, ShiftedByTokens
from modules.models.model_folder import (
    FolderParts,
    check_model_folder,
    denoiser_on_device,
    files_stamp,
    free_encoders,
    frozen_vae,
    load_frozen,
    load_transformer,
    read_model_json,
    text_encoder_dtype,
)
from modules.models.packing import pack, unpack
from modules.models.qwen_image import LORA_TARGETS, QwenImageOptions
from modules.models.qwen_image import edit as edits

# QwenImagePipeline's prompt template and the number of its leading tokens it drops (the
# system prefix, up to the user's prompt); the tokenizer reads at most 1024 + those.
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
TEMPLATE_TOKENS = 34
MAX_TOKENS = 1024
SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
COMFYUI_PREFIX = "diffusion_model."


@dataclass(kw_only=True)
class QwenImageParts(FolderParts):
    """What a loaded Qwen-Image keeps beside its transformer (the folder, device, dtype and VAE
    of :class:`FolderParts`)."""

    encoder: tuple[Any, Qwen2_5_VLForConditionalGeneration] | None = None
    """The tokenizer and the text encoder: loaded on first use, freed by ``release_encoders``."""
    negative: TextEncoding | None = None
    """``negative_prompt`` encoded before the text encoder is freed, for guided samples."""
    processor: Any = None
    """Edit models: the VL processor the references are read with (loaded with the encoder)."""


QwenImageModel = LoadedModel[QwenImageParts]


class QwenImageFamily(ShiftedByTokens):
    """Qwen-Image text-to-image, with its options (``model.qwen_image``)."""

    name = "qwen_image"
    loss_layout = "video"

    def __init__(self, options: QwenImageOptions | None = None) -> None:
        self.options = options if options is not None else QwenImageOptions()
        self.shift = ScheduleShift()
        self.edit: edits.EditForm | None = None
        """The loaded folder's edit form (None: text-to-image)."""

    def lora_targets(self, model: LoadedModel) -> dict[str, list[str]]:
        return {name: list(modules) for name, modules in LORA_TARGETS.items()}

    def blocks(self, denoiser: torch.nn.Module) -> list[torch.nn.Module]:
        """The dual-stream blocks (the only repeated ones)."""
        return list(denoiser.transformer_blocks)

    def lora_loader(self, model: LoadedModel) -> type:
        """QwenImagePipeline' LoRA loader."""
        return QwenImageLoraLoaderMixin

    def comfyui_converter(self, model: LoadedModel) -> ComfyConverter:
        """ComfyUI names a Qwen-Image LoRA after the diffusers modules under
        ``diffusion_model.``, with ``lora_down`` / ``lora_up`` and a per-module ``alpha``."""
        return to_comfyui

    # ---------------------------------------------------------------------------------- load

    def load(self, path: str, *, dtype: torch.dtype, device: torch.device) -> QwenImageModel:
        """The transformer to train, on the CPU until ``release_encoders``; the VAE and the
        text encoder load on first use."""
        folder = check_model_folder(path, "qwen_image", self.options)
        denoiser = self._load_transformer(folder, dtype)
        scheduler = read_model_json(folder / "scheduler" / "scheduler_config.json") or {}
        self.shift = ScheduleShift.from_scheduler_config(scheduler)
        self.edit = edits.edit_form(folder)
        vae_config = read_model_json(folder / "vae" / "config.json") or {}
        parts = QwenImageParts(
            folder=folder, device=torch.device(device), dtype=dtype, vae_config=vae_config
        )
        return LoadedModel(denoiser=denoiser, identity=self._identity(folder, dtype), parts=parts)

    def _load_transformer(self, folder: Path, dtype: torch.dtype) -> QwenImageTransformer2DModel:
        return load_transformer(
            QwenImageTransformer2DModel,
            folder,
            dtype,
            file=self.options.transformer_file,
            field="model.qwen_image.transformer_file",
            what="a Qwen-Image transformer (diffusers or ComfyUI names, the same architecture)",
            rename=_diffusers_names,
        )

    def _identity(self, folder: Path, dtype: torch.dtype) -> str:
        """What the cached latents and prompt encodings depend on: the VAE, the text encoder
        and tokenizer (path, size, modification time), the dtype and the prompt length."""
        head = f"qwen_image:{folder.resolve()}:dtype={dtype}:tokens={self.options.text_tokens}:"
        if self.edit is None:
            return head + files_stamp(folder, ("vae", "text_encoder", "tokenizer"))
        # Edit models: the references' size and the processor that reads them too.
        head += f"{self.edit}:references={self.options.reference_pixels}:"
        return head + files_stamp(folder, ("vae", "text_encoder", "tokenizer", "processor"))

    # ------------------------------------------------------------------------------ encoders

    @torch.no_grad()
    def encode_images(self, model: QwenImageModel, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] → normalised latents (B, 16, H/8, W/8)."""
        vae = self._vae(model)
        param = next(vae.parameters())
        frames = images.to(param.device, param.dtype).unsqueeze(2)  # one-frame videos
        latents = vae.encode(frames).latent_dist.mode()[:, :, 0]
        mean, std = self._latent_statistics(model, latents)
        return ((latents - mean) / std).float()

    @torch.no_grad()
    def decode_latents(self, model: QwenImageModel, latents: Tensor) -> Tensor:
        vae = self._vae(model)
        param = next(vae.parameters())
        mean, std = self._latent_statistics(model, latents)
        frames = (latents * std + mean).to(param.device, param.dtype).unsqueeze(2)
        return vae.decode(frames).sample[:, :, 0].float().clamp(-1, 1)

    @staticmethod
    def _latent_statistics(model: QwenImageModel, like: Tensor) -> tuple[Tensor, Tensor]:
        config = model.parts.vae_config
        shape = (1, -1, 1, 1)
        mean = torch.tensor(config["latents_mean"], device=like.device).view(shape)
        std = torch.tensor(config["latents_std"], device=like.device).view(shape)
        return mean.to(like.dtype), std.to(like.dtype)

    @torch.no_grad()
    def encode_prompts(self, model: QwenImageModel, prompts: list[str]) -> TextEncoding:
        """``{"embeds": (B, L, D), "mask": (B, L)}``: each prompt's hidden states after the
        template's prefix, zero-padded to the longest, with 1 where a token is real."""
        tokenizer, encoder = self._encoder(model)
        device = next(encoder.parameters()).device
        tokens = tokenizer(
            [PROMPT_TEMPLATE.format(prompt) for prompt in prompts],
            max_length=MAX_TOKENS + TEMPLATE_TOKENS,
            padding=True,
            truncation=True,
            return_tensors="pt",
        ).to(device)
        hidden = encoder(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            output_hidden_states=True,
        ).hidden_states[-1]
        kept = [
            row[valid.bool()][TEMPLATE_TOKENS:][: self.options.text_tokens]
            for row, valid in zip(hidden, tokens.attention_mask, strict=True)
        ]
        length = max(row.shape[0] for row in kept)
        embeds = hidden.new_zeros(len(kept), length, hidden.shape[-1])
        mask = torch.zeros(len(kept), length, dtype=torch.long, device=hidden.device)
        for index, row in enumerate(kept):
            embeds[index, : row.shape[0]] = row
            mask[index, : row.shape[0]] = 1
        return {"embeds": embeds.float(), "mask": mask}

    def prompt_token_counts(
        self, model: QwenImageModel, prompts: list[str]
    ) -> tuple[list[int], int]:
        """Tokens after the template's prefix (the caption and the template's 5 closing
        tokens), and how many the transformer reads (edit models: every one, as the edit
        pipelines cut nothing)."""
        tokenizer = AutoTokenizer.from_pretrained(
            model.parts.folder / "tokenizer", local_files_only=True
        )
        ids = tokenizer([PROMPT_TEMPLATE.format(prompt) for prompt in prompts]).input_ids
        counts = [len(row) - TEMPLATE_TOKENS for row in ids]
        if self.edit is not None:
            return counts, max([MAX_TOKENS, *counts])
        return counts, self.options.text_tokens

    def release_encoders(self, model: QwenImageModel, *, keep_decoder: bool) -> None:
        """Free the text encoder (and the VAE unless samples are decoded), then move the
        transformer to the training device. For guided samples the negative prompt is
        encoded first."""
        parts = model.parts
        guided = self.options.sample_cfg > 1 and self.edit is None  # edit samples: no CFG
        if keep_decoder and guided and parts.negative is None:
            parts.negative = self.encode_prompts(model, [self.options.negative_prompt])
        parts.encoder = None
        parts.processor = None
        free_encoders(model, keep_decoder=keep_decoder)

    def _encoder(self, model: QwenImageModel) -> tuple[Any, Qwen2_5_VLForConditionalGeneration]:
        parts = model.parts
        if parts.encoder is None:
            folder = parts.folder
            tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
            encoder = load_frozen(
                Qwen2_5_VLForConditionalGeneration,
                folder / "text_encoder",
                parts.device,
                dtype=text_encoder_dtype(parts.dtype),
            )
            parts.encoder = (tokenizer, encoder)
        return parts.encoder

    def _vae(self, model: QwenImageModel) -> AutoencoderKLQwenImage:
        return frozen_vae(model.parts, AutoencoderKLQwenImage)

    @torch.no_grad()
    def encode_conditioning(
        self,
        model: QwenImageModel,
        kind: str,
        images: Sequence[Tensor],
        *,
        frames: int = 1,
        caption: str = "",
    ) -> TextEncoding:
        """An edit item's references (each (3, H, W) in [-1, 1] at its own size) and caption →
        the edit prompt read with them by the VL encoder and their packed latents
        (:mod:`.edit`), batch-first with a batch of one."""
        if self.edit is None or kind != "reference":
            raise ValueError(f"{model.parts.folder} is not an edit model: it takes no {kind}")
        most = edits.most_references(self.edit)
        if not 1 <= len(images) <= most:
            raise ValueError(f"this edit model takes 1 to {most} references, not {len(images)}")
        parts = model.parts
        pictures = [edits.to_picture(image) for image in images]
        _, encoder = self._encoder(model)
        if parts.processor is None:
            parts.processor = edits.load_processor(parts.folder)
        area = self.options.reference_pixels
        prompt = edits.encode_edit_prompt(
            parts.processor,
            encoder,
            caption,
            pictures,
            self.edit,
            parts.vae_config,
            vae_pixels=area,
        )
        references = edits.encode_references(
            self._vae(model), parts.vae_config, pictures, vae_pixels=area
        )
        return {**prompt, **references}

    # ---------------------------------------------------------------------------- training

    def predict(
        self, model: QwenImageModel, noisy: Tensor, timesteps: Tensor, text: TextEncoding
    ) -> Tensor:
        """The velocity (B, 16, h, w) for noisy latents of the same shape (edit models: with
        the references in ``text``)."""
        if self.edit is not None and not edits.has_references(text):
            # Only the drift meter's held-out stills come without references.
            raise ConfigError(
                "drift.every: the drift meter measures held-out images without reference "
                "images, which an edit model needs; set drift.every=0 for this model"
            )
        _, channels, height, width = noisy.shape
        tokens = self._velocity_tokens(model, pack(noisy), timesteps, text, height, width)
        return unpack(tokens, channels, height, width)

    def _velocity_tokens(
        self,
        model: QwenImageModel,
        tokens: Tensor,
        t: Tensor,
        text: TextEncoding,
        height: int,
        width: int,
    ) -> Tensor:
        """One transformer call on packed tokens (B, h/2 * w/2, 64); with an edit's references
        in ``text``, their tokens follow the target's and the output is cut back to the
        target's."""
        denoiser_on_device(model)
        dtype = model.parts.dtype
        hidden, embeds, mask = tokens, text["embeds"], text["mask"]
        img_shapes = [[(1, height // 2, width // 2)]] * tokens.shape[0]
        if edits.has_references(text):
            try:
                hidden, embeds, mask, img_shapes = edits.denoiser_inputs(
                    tokens, text, height, width
                )
            except ValueError as error:
                raise ConfigError(str(error)) from None
        return model.runner(
            hidden_states=hidden.to(dtype),
            encoder_hidden_states=embeds.to(dtype),
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            timestep=t.to(dtype),
            img_shapes=img_shapes,
            return_dict=False,
        )[0][:, : tokens.shape[1]]  # the target's tokens

    def training_mu(self, shape: torch.Size) -> float:
        """``calculate_shift`` of the packed token count (training and the samples)."""
        return self.shift.mu_for((shape[-2] // 2) * (shape[-1] // 2))

    @torch.no_grad()
    def sample(
        self,
        model: QwenImageModel,
        text: TextEncoding,
        *,
        size: tuple[int, int],
        steps: int,
        generator: torch.Generator,
        conditioning: TextEncoding | None = None,
    ) -> Tensor:
        """Euler over the pipeline's schedule (``linspace(1, 1/steps)``, shifted for the
        image's token count and stretched to ``shift_terminal``), with true CFG. Edit models:
        ``conditioning``, each prompt's references encoded with it by
        :meth:`encode_conditioning` (batch-first), whose edit prompt replaces ``text``'s;
        no CFG, as the edit pipelines' default call."""
        if self.edit is not None and not conditioning:
            raise ValueError("Qwen-Image-Edit samples need each prompt's references")
        denoiser_on_device(model)
        device = model.parts.device
        batch = text["embeds"].shape[0]
        scale = _vae_scale(model.parts.vae_config)
        rows, columns = size[1] // scale, size[0] // scale
        channels = model.denoiser.config.out_channels
        latents = torch.randn(batch, channels, rows, columns, generator=generator).to(device)
        grid = torch.linspace(1.0, 1.0 / steps, steps)
        sigmas = torch.cat(
            [self.shift.sigmas(grid, self.training_mu(latents.shape)), torch.zeros(1)]
        ).tolist()
        if conditioning is None or self.edit is None:
            tokens = self._denoise(model, pack(latents), text, sigmas, rows, columns)
        else:  # one prompt at a time, as the edit pipelines: its references may differ
            tokens = torch.cat(
                [
                    self._denoise(
                        model,
                        pack(latents[i : i + 1]),
                        edits.row(text, conditioning, i),
                        sigmas,
                        rows,
                        columns,
                    )
                    for i in range(batch)
                ]
            )
        return self.decode_latents(model, unpack(tokens, channels, rows, columns))

    def _denoise(
        self,
        model: QwenImageModel,
        tokens: Tensor,
        text: TextEncoding,
        sigmas: list[float],
        rows: int,
        columns: int,
    ) -> Tensor:
        """Euler steps over ``sigmas`` from the packed noise ``tokens`` (B, N, 64)."""
        batch, device = tokens.shape[0], model.parts.device
        negative = self._negative(model, batch)
        for now, after in itertools.pairwise(sigmas):
            t = torch.full((batch,), now, device=device)
            v = self._velocity_tokens(model, tokens, t, text, rows, columns).float()
            if negative is not None:
                v = _true_cfg(
                    v,
                    self._velocity_tokens(model, tokens, t, negative, rows, columns).float(),
                    self.options.sample_cfg,
                )
            tokens = tokens + (after - now) * v
        return tokens

    def _negative(self, model: QwenImageModel, batch: int) -> TextEncoding | None:
        negative = model.parts.negative
        if self.options.sample_cfg <= 1 or negative is None or self.edit is not None:
            return None
        return {key: value.expand(batch, *value.shape[1:]) for key, value in negative.items()}


def _true_cfg(conditional: Tensor, unconditional: Tensor, scale: float) -> Tensor:
    """``neg + scale * (cond - neg)``, rescaled per token to the conditional prediction's norm
    (QwenImagePipeline's true CFG)."""
    combined = unconditional + scale * (conditional - unconditional)
    norm = conditional.norm(dim=-1, keepdim=True)
    return combined * (norm / combined.norm(dim=-1, keepdim=True))


def _vae_scale(vae_config: dict[str, Any]) -> int:
    """Pixels per latent cell: 2 per ``temperal_downsample`` entry (8)."""
    return 2 ** len(vae_config.get("temperal_downsample") or [0, 0, 0])


def _diffusers_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A transformer file's state dict with diffusers names: diffusers reads a Qwen-Image file
    only with unprefixed names; ComfyUI's use the same names, some under a model prefix."""
    return {_strip_prefix(key): value for key, value in state.items()}


def _strip_prefix(key: str) -> str:
    for prefix in SINGLE_FILE_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def to_comfyui(state: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """``transformer.<module>.lora_A/B.weight`` → ``diffusion_model.<module>.lora_down/up.weight``
    and ``diffusion_model.<module>.alpha``: the layout ComfyUI loads for Qwen-Image, which
    diffusers' own converter for non-diffusers Qwen-Image LoRAs reads back."""
    converted: dict[str, Tensor] = {}
    for key, value in state.items():
        module, _, kind = key.removeprefix("transformer.").rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise ValueError(
                f"output.format=comfyui: '{key}' is neither a lora_A nor a lora_B weight; use "
                "output.format=diffusers"
            )
        converted[f"{COMFYUI_PREFIX}{module}.lora_{'down' if kind[0] == 'A' else 'up'}.weight"] = (
            value
        )
        converted[f"{COMFYUI_PREFIX}{module}.alpha"] = torch.tensor(float(alpha))
    return converted
