"""The ``flux1`` family: FLUX.1 dev, schnell and Kontext LoRAs from a local diffusers folder.

The folder is the diffusers layout (as ``FluxPipeline.save_pretrained`` writes it, e.g. a
download of ``black-forest-labs/FLUX.1-dev``; ``FluxKontextPipeline`` for
``black-forest-labs/FLUX.1-Kontext-dev``, the same parts)::

    transformer/     FluxTransformer2DModel (dev: guidance embedding; schnell: none)
    vae/             AutoencoderKL, 16 latent channels, scaling and shift factor
    text_encoder/    CLIPTextModel (its pooled output)      tokenizer/    CLIPTokenizer
    text_encoder_2/  T5EncoderModel (the token embeddings)  tokenizer_2/  T5 tokenizer
    scheduler/       scheduler_config.json: the timestep shift rule

Everything is read with ``local_files_only``. As ``FluxPipeline`` does:

- Latents: ``(z - shift_factor) * scaling_factor`` of the VAE posterior's mode (deterministic,
  so the cache holds one latent per image), (B, 16, H/8, W/8). ``predict`` packs each 2x2 patch
  into one token of 64 values (channel order c, dy, dx), with position ids (0, row, column), and
  unpacks the prediction, so masks and the loss stay on the latent grid.
- Prompts: CLIP's pooled output (77 tokens) and T5's last hidden state padded to
  ``model.flux1.text_tokens`` (512 dev, 256 schnell); FLUX attends to the padding too, so the
  encoding keeps every position. Both are batch-first in the encoding.
- Timesteps: ``t`` uniform, then shifted by the folder's scheduler rule: dev shifts by the
  image's token count (``mu`` from ``calculate_shift``), schnell not at all; training and the
  samples use the same rule (``modules.models.flow_matching.ScheduleShift``).
- Guidance: dev's embedding gets ``model.flux1.guidance`` in training and in the teacher pass
  (the same value), ``sample_guidance`` in the samples; no classifier-free guidance.
- Kontext (told apart by ``model_index.json``'s ``FluxKontextPipeline``): each item's one
  reference image is encoded as the pipeline encodes it (:mod:`.kontext`) and its tokens follow
  the target's in the transformer; the prediction is the target's tokens only. Guidance as dev.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.loaders import FluxLoraLoaderMixin
from torch import Tensor
from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

from modules.models.base import ComfyConverter, LoadedModel, TextEncoding, with_conditioning
from modules.models.flow_matching import ScheduleShift, ShiftedByTokens
from modules.models.flux1 import LORA_TARGETS, Flux1Options, is_kontext
from modules.models.flux1 import kontext as ref
from modules.models.model_folder import (
    FolderParts,
    check_model_folder,
    decode_shifted,
    denoiser_on_device,
    encode_shifted,
    files_stamp,
    free_encoders,
    frozen_vae,
    load_frozen,
    load_transformer,
    read_model_json,
    text_encoder_dtype,
)
from modules.models.packing import pack, unpack


@dataclass(kw_only=True)
class Flux1Parts(FolderParts):
    """What a loaded FLUX.1 keeps beside its transformer (the folder, device, dtype and VAE of
    :class:`FolderParts`)."""

    encoders: tuple[Any, CLIPTextModel, Any, T5EncoderModel] | None = None
    """CLIP's tokenizer and encoder, T5's tokenizer and encoder: loaded on first use, freed by
    ``release_encoders``."""


Flux1Model = LoadedModel[Flux1Parts]


class Flux1Family(ShiftedByTokens):
    """FLUX.1 dev / schnell text-to-image and Kontext image editing, with its options
    (``model.flux1``)."""

    name = "flux1"
    loss_layout = "video"

    def __init__(self, options: Flux1Options | None = None) -> None:
        self.options = options if options is not None else Flux1Options()
        self.shift = ScheduleShift()
        self.guided = True
        """Whether the transformer has a guidance embedding (dev); set by ``load``."""
        self.kontext = False
        """Whether the folder is FLUX.1 Kontext (items have a reference image); set by ``load``."""

    def lora_targets(self, model: LoadedModel) -> dict[str, list[str]]:
        return {name: list(modules) for name, modules in LORA_TARGETS.items()}

    def blocks(self, denoiser: torch.nn.Module) -> list[torch.nn.Module]:
        """The double-stream blocks, then the single-stream blocks."""
        return [*denoiser.transformer_blocks, *denoiser.single_transformer_blocks]

    def lora_loader(self, model: LoadedModel) -> type:
        """FluxPipeline' LoRA loader."""
        return FluxLoraLoaderMixin

    def comfyui_converter(self, model: LoadedModel) -> ComfyConverter:
        """ComfyUI maps ``transformer.<diffusers module>`` keys of a FLUX LoRA onto its fused
        layers itself; it reads the scale from a per-module ``alpha``."""
        return _with_alphas

    # ---------------------------------------------------------------------------------- load

    def load(self, path: str, *, dtype: torch.dtype, device: torch.device) -> Flux1Model:
        folder = check_model_folder(path, "flux1", self.options)
        denoiser = self._load_transformer(folder, dtype)
        self.guided = bool(denoiser.config.guidance_embeds)
        self.kontext = is_kontext(folder)
        scheduler = read_model_json(folder / "scheduler" / "scheduler_config.json") or {}
        self.shift = ScheduleShift.from_scheduler_config(scheduler)
        parts = Flux1Parts(
            folder=folder,
            device=torch.device(device),
            dtype=dtype,
            vae_config=read_model_json(folder / "vae" / "config.json") or {},
        )
        identity = _identity(folder, dtype, self.text_tokens)
        if self.kontext:  # the references' encodings depend on how they are resized
            identity += f":kontext={self.options.reference_size}"
        return LoadedModel(denoiser=denoiser, identity=identity, parts=parts)

    def _load_transformer(self, folder: Path, dtype: torch.dtype) -> FluxTransformer2DModel:
        return load_transformer(
            FluxTransformer2DModel,
            folder,
            dtype,
            file=self.options.transformer_file,
            field="model.flux1.transformer_file",
            what="a FLUX.1 transformer (the original BFL file of the same model)",
        )

    @property
    def text_tokens(self) -> int:
        return self.options.text_tokens or (512 if self.guided else 256)

    # ------------------------------------------------------------------------------ encoders

    def encode_images(self, model: Flux1Model, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, 16, H/8, W/8)."""
        return encode_shifted(self._vae(model), model.parts.vae_config, images)

    def decode_latents(self, model: Flux1Model, latents: Tensor) -> Tensor:
        return decode_shifted(self._vae(model), model.parts.vae_config, latents)

    @torch.no_grad()
    def encode_prompts(self, model: Flux1Model, prompts: list[str]) -> TextEncoding:
        """``{"embeds": (B, L, D) T5, "pooled": (B, D') CLIP}``, L = ``text_tokens``."""
        clip_tokenizer, clip, t5_tokenizer, t5 = self._encoders(model)
        device = next(clip.parameters()).device
        clip_ids = clip_tokenizer(
            prompts,
            padding="max_length",
            max_length=clip_tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        pooled = clip(clip_ids.to(device), output_hidden_states=False).pooler_output
        t5_ids = t5_tokenizer(
            prompts,
            padding="max_length",
            max_length=self.text_tokens,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        embeds = t5(t5_ids.to(next(t5.parameters()).device))[0]
        return {"embeds": embeds.float(), "pooled": pooled.float()}

    def prompt_token_counts(self, model: Flux1Model, prompts: list[str]) -> tuple[list[int], int]:
        tokenizer = AutoTokenizer.from_pretrained(
            model.parts.folder / "tokenizer_2", local_files_only=True
        )
        return [len(ids) for ids in tokenizer(prompts).input_ids], self.text_tokens

    def release_encoders(self, model: Flux1Model, *, keep_decoder: bool) -> None:
        """Free both text encoders (and the VAE unless samples are decoded), then move the
        transformer to the training device."""
        model.parts.encoders = None
        free_encoders(model, keep_decoder=keep_decoder)

    def _encoders(self, model: Flux1Model) -> tuple[Any, CLIPTextModel, Any, T5EncoderModel]:
        parts = model.parts
        if parts.encoders is None:
            folder, dtype = parts.folder, parts.dtype
            # T5 overflows in float16: bfloat16 then, as for WAN's UMT5.
            t5_dtype = text_encoder_dtype(dtype)
            loaded = []
            for tokenizer, encoder, encoder_class, encoder_dtype in (
                ("tokenizer", "text_encoder", CLIPTextModel, dtype),
                ("tokenizer_2", "text_encoder_2", T5EncoderModel, t5_dtype),
            ):
                loaded.append(
                    AutoTokenizer.from_pretrained(folder / tokenizer, local_files_only=True)
                )
                loaded.append(
                    load_frozen(encoder_class, folder / encoder, parts.device, dtype=encoder_dtype)
                )
            parts.encoders = tuple(loaded)
        return parts.encoders

    @torch.no_grad()
    def encode_conditioning(
        self, model: Flux1Model, kind: str, images: Sequence[Tensor], *, frames: int = 1
    ) -> TextEncoding:
        """Kontext: the one reference ``images[0]`` (3, H, W) at its own size → its packed
        tokens and grid, as ``FluxKontextPipeline`` prepares it (:mod:`.kontext`)."""
        if not self.kontext or kind != "reference" or len(images) != 1:
            raise ValueError(
                f"FLUX.1 Kontext takes one reference image, not {len(images)} {kind} images"
            )
        multiple = 2 * _vae_scale(model)
        mode = self.options.reference_size
        pixels = ref.reference_pixels(images[0], multiple=multiple, mode=mode)  # (1, 3, H', W')
        return ref.encode_reference(self._vae(model), model.parts.vae_config, pixels)

    def _vae(self, model: Flux1Model) -> AutoencoderKL:
        return frozen_vae(model.parts, AutoencoderKL)

    # ---------------------------------------------------------------------------- training

    def predict(
        self, model: Flux1Model, noisy: Tensor, timesteps: Tensor, text: TextEncoding
    ) -> Tensor:
        """The velocity (B, 16, h, w) for noisy latents of the same shape (Kontext: with each
        item's reference tokens in ``text``, after the target's)."""
        return self._velocity(model, noisy, timesteps, text, self.options.guidance)

    def _velocity(
        self, model: Flux1Model, noisy: Tensor, t: Tensor, text: TextEncoding, guidance: float
    ) -> Tensor:
        denoiser_on_device(model)
        batch, channels, height, width = noisy.shape
        tokens = pack(noisy).to(model.parts.dtype)  # (B, n, 4C), n = h/2 * w/2
        ids = image_ids(height // 2, width // 2, noisy.device)  # (n, 3)
        if not ref.conditioned(text):
            out = self._forward(model, tokens, ids, text, t, guidance)
            return unpack(out, channels, height, width)
        # The transformer takes one set of position ids for the batch: items whose references
        # differ in size run one by one.
        grids = ref.grids(text)
        groups = [list(range(batch))] if len(set(grids)) == 1 else [[row] for row in range(batch)]
        outs = []
        for rows in groups:
            grid = grids[rows[0]]
            reference = text[ref.TOKENS_KEY][rows, : grid[0] * grid[1]]  # (b, m, 4C)
            hidden = torch.cat([tokens[rows], reference.to(tokens)], dim=1)  # (b, n + m, 4C)
            both = torch.cat([ids, ref.reference_ids(grid, noisy.device)])  # (n + m, 3)
            out = self._forward(model, hidden, both, _rows_of(text, rows), t[rows], guidance)
            outs.append(out[:, : tokens.shape[1]])  # the target's tokens only
        return unpack(torch.cat(outs), channels, height, width)

    def _forward(
        self,
        model: Flux1Model,
        tokens: Tensor,
        ids: Tensor,
        text: TextEncoding,
        t: Tensor,
        guidance: float,
    ) -> Tensor:
        """The transformer's output (b, L, 4C) for packed ``tokens`` (b, L, 4C) at ``ids``."""
        dtype, device = model.parts.dtype, tokens.device
        embeds = text["embeds"].to(dtype)
        batch = tokens.shape[0]
        return model.runner(
            hidden_states=tokens,
            encoder_hidden_states=embeds,
            pooled_projections=text["pooled"].to(dtype),
            timestep=t.to(dtype),
            img_ids=ids,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device),
            guidance=torch.full((batch,), guidance, device=device) if self.guided else None,
            return_dict=False,
        )[0]

    def training_mu(self, shape: torch.Size) -> float:
        """``calculate_shift`` of the packed token count (training and the samples)."""
        return self.shift.mu_for((shape[-2] // 2) * (shape[-1] // 2))

    @torch.no_grad()
    def sample(
        self,
        model: Flux1Model,
        text: TextEncoding,
        *,
        size: tuple[int, int],
        steps: int,
        generator: torch.Generator,
        conditioning: TextEncoding | None = None,
    ) -> Tensor:
        """Euler over the pipeline's schedule (``linspace(1, 1/steps)`` shifted by the folder's
        rule), with dev's embedded ``sample_guidance``. Kontext: ``conditioning``, each prompt's
        reference encoded by :meth:`encode_conditioning` (batch-first; one row serves every
        prompt); without it, the prompt alone (as the pipeline without ``image``)."""
        denoiser_on_device(model)
        device = model.parts.device
        batch = text["embeds"].shape[0]
        if conditioning:
            text = with_conditioning(text, _for_batch(conditioning, batch))
        scale = _vae_scale(model)
        channels = model.denoiser.config.in_channels // 4
        x = torch.randn(batch, channels, size[1] // scale, size[0] // scale, generator=generator)
        x = x.to(device)
        grid = torch.linspace(1.0, 1.0 / steps, steps)
        sigmas = torch.cat([self.shift.sigmas(grid, self.training_mu(x.shape)), torch.zeros(1)])
        for now, after in itertools.pairwise(sigmas.tolist()):
            t = torch.full((batch,), now, device=device)
            v = self._velocity(model, x, t, text, self.options.sample_guidance).float()
            x = x + (after - now) * v
        return self.decode_latents(model, x)


def _vae_scale(model: Flux1Model) -> int:
    """Pixels per latent cell of the folder's VAE (8 for FLUX.1's)."""
    return 2 ** (len(model.parts.vae_config.get("block_out_channels") or [0] * 4) - 1)


def _rows_of(text: TextEncoding, rows: list[int]) -> TextEncoding:
    return {key: value[rows] for key, value in text.items()}


def _for_batch(conditioning: TextEncoding, batch: int) -> TextEncoding:
    """``conditioning`` with ``batch`` rows: one row repeated for every prompt, else as given
    (a ValueError when the counts differ)."""
    rows = {value.shape[0] for value in conditioning.values()}
    if rows == {batch}:
        return conditioning
    if rows == {1}:
        return {key: value.expand(batch, *value.shape[1:]) for key, value in conditioning.items()}
    raise ValueError(f"{sorted(rows)} references for {batch} sample prompts: give one per prompt")


def image_ids(rows: int, columns: int, device: torch.device) -> Tensor:
    """(rows * columns, 3) position ids (0, row, column) of the packed tokens, row-major."""
    ids = torch.zeros(rows, columns, 3, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(columns, device=device)[None, :]
    return ids.reshape(rows * columns, 3)


def _with_alphas(state: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """The diffusers keys, plus ``transformer.<module>.alpha`` for every module."""
    converted = dict(state)
    for key in state:
        if key.endswith(".lora_A.weight"):
            converted[key.removesuffix(".lora_A.weight") + ".alpha"] = torch.tensor(float(alpha))
    return converted


def _identity(folder: Path, dtype: torch.dtype, text_tokens: int) -> str:
    """What the cached latents and prompt encodings depend on: the VAE, both text encoders and
    tokenizers (path, size, modification time) and the dtype, not the transformer."""
    parts = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    head = f"flux1:{folder.resolve()}:dtype={dtype}:tokens={text_tokens}:"
    return head + files_stamp(folder, parts)
