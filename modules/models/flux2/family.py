"""The ``flux2`` family: FLUX.2 dev and klein LoRAs from a local diffusers folder.

The folder is the diffusers layout (as ``Flux2Pipeline`` / ``Flux2KleinPipeline``
``save_pretrained`` write it, e.g. a download of ``black-forest-labs/FLUX.2-dev`` or
``FLUX.2-klein-4B``)::

    model_index.json  _class_name Flux2Pipeline (dev) or Flux2KleinPipeline (klein, with
                      is_distilled: the step-distilled klein, or the klein base)
    transformer/      Flux2Transformer2DModel (dev: guidance embedding; klein: none)
    vae/              AutoencoderKLFlux2, 32 latent channels, batch-norm latent statistics
    text_encoder/     dev: Mistral3ForConditionalGeneration; klein: Qwen3ForCausalLM
    tokenizer/        dev: the Pixtral processor's tokenizer (only the tokenizer is read: it
                      has the chat template; no image processor); klein: the Qwen tokenizer
    scheduler/        scheduler_config.json: the timestep shift rule

The variant is told from ``model_index.json`` (and, without one, from the transformer's
guidance embedding). Everything is read with ``local_files_only``. As the pipelines do:

- Latents: the VAE posterior's mode (deterministic, so the cache holds one latent per image),
  each 2x2 patch folded into the channels (``_patchify_latents``: channel ``c*4 + 2*dy + dx``)
  and normalised with the VAE's batch-norm running statistics, ``(z - mean) / sqrt(var +
  batch_norm_eps)``, per patchified channel (128). The family's latent grid is this
  patchified one, (B, 128, H/16, W/16), 16 px per cell: the normalisation is defined on it (so
  the cached latents are exactly ``_encode_vae_image``'s), one cell is one transformer token,
  and the pipeline draws its noise on it too. ``predict`` flattens the cells into tokens
  (``_pack_latents``) with position ids (0, row, column, 0), and unfolds the prediction, so
  masks and the loss stay on the grid (non-square included). The VAE's ``bn`` module is never
  run: only its running statistics are read, so training never updates them.
- Prompts: dev formats each prompt as the pipeline does (its system message, list-style
  content) and tokenises with the tokenizer's chat template (the processor's own call
  tokenises the same text without adding special tokens, since the template starts with the
  BOS token); klein applies the Qwen3 chat template (user turn, generation prompt, thinking
  off). Both pad to ``model.flux2.text_tokens`` (the pipelines' ``max_sequence_length``, 512)
  and stack the text encoder's hidden states 10, 20, 30 (dev) or 9, 18, 27 (klein) per token,
  (B, L, 3 x D). The attention mask goes to the text encoder only; FLUX.2 attends to the
  padding too. Text position ids (0, 0, 0, l) are built in ``predict``.
- Timesteps: ``t`` uniform, then shifted as the scheduler shifts the pipeline's schedule,
  ``exp(mu) / (exp(mu) + 1/t - 1)``, with the pipeline's ``compute_empirical_mu`` for the
  image's token count. That ``mu`` also depends on the number of sampling steps, which a
  training step does not have: training takes its 200-step value, where the step dependence
  ends (``a2 * N + b2``, also what the pipeline uses above 4300 tokens at any step count, and
  the same line as the scheduler config's ``base_shift`` 0.5 at 256 tokens to ``max_shift``
  1.15 at 4096, FLUX.1's rule): about 1.15 at 1024 px. Fewer steps shift the pipeline's
  schedule further towards noise (about 2.0 at 50 steps, 1024 px); the samples use the
  pipeline's own ``mu`` for their step count. (diffusers' FLUX.2 DreamBooth scripts draw
  unshifted timesteps by default.)
- Editing (``model.flux2.task=edit``): each target's reference images are resized, encoded
  and packed as the pipelines' ``image=`` references, with their own time index in the
  position ids (:mod:`.references`); ``predict`` and ``sample`` put their tokens after the
  target's and keep the target's part of the prediction.
- Guidance: dev's embedding gets ``model.flux2.guidance`` in training and in the teacher pass
  (the same value), ``sample_guidance`` in the samples. klein has no guidance embedding; the
  klein base's samples use true classifier-free guidance with the empty prompt as negative
  (scale ``sample_guidance``, when above 1), the step-distilled klein none.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
from diffusers.loaders import Flux2LoraLoaderMixin
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu, format_input
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from torch import Tensor
from transformers import AutoTokenizer, Mistral3ForConditionalGeneration, Qwen3ForCausalLM

from modules.models.base import ComfyConverter, LoadedModel, TextEncoding
from modules.models.flow_matching import ScheduleShift, ShiftedByTokens
from modules.models.flux2 import LORA_TARGETS, REFERENCE_LIMITS, SINGLE_BLOCK_OUT, Flux2Options
from modules.models.flux2 import references as refs
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

TRAINING_MU_STEPS = 200
"""The step count whose ``compute_empirical_mu`` shifts the training timesteps (see above)."""
HIDDEN_LAYERS = {"dev": (10, 20, 30), "klein": (9, 18, 27)}
"""The text encoder hidden states the pipelines stack (``text_encoder_out_layers``)."""


@dataclass(kw_only=True)
class Flux2Parts(FolderParts):
    """What a loaded FLUX.2 keeps beside its transformer (the folder, device, dtype and VAE of
    :class:`FolderParts`)."""

    encoders: tuple[Any, torch.nn.Module] | None = None
    """The tokenizer and the text encoder (Mistral 3 or Qwen3): loaded on first use, freed by
    ``release_encoders``."""
    negative: Tensor | None = None
    """The empty prompt's embeds (1, L, 3 D), the klein base's negative for the samples."""


Flux2Model = LoadedModel[Flux2Parts]


class Flux2Family(ShiftedByTokens):
    """FLUX.2 dev / klein text-to-image, and editing with reference images
    (``model.flux2.task=edit``, :mod:`.references`), with its options (``model.flux2``)."""

    name = "flux2"
    loss_layout = "video"

    def __init__(self, options: Flux2Options | None = None) -> None:
        self.options = options if options is not None else Flux2Options()
        self.shift = ScheduleShift(dynamic=True)
        self.klein = True
        """Qwen3 text encoder (klein) or Mistral 3 (dev); set by ``load``."""
        self.distilled = True
        """The step-distilled klein (no classifier-free guidance); set by ``load``."""
        self.guided = False
        """Whether the transformer has a guidance embedding (dev); set by ``load``."""

    def lora_targets(self, model: LoadedModel) -> dict[str, list[str]]:
        """The declared presets, the single blocks' output named once per block."""
        per_block = [
            SINGLE_BLOCK_OUT.format(i) for i in range(len(model.denoiser.single_transformer_blocks))
        ]
        return {
            preset: [
                named
                for name in names
                for named in (per_block if name == SINGLE_BLOCK_OUT else [name])
            ]
            for preset, names in LORA_TARGETS.items()
        }

    def blocks(self, denoiser: torch.nn.Module) -> list[torch.nn.Module]:
        """The double-stream blocks, then the single-stream blocks."""
        return [*denoiser.transformer_blocks, *denoiser.single_transformer_blocks]

    def lora_loader(self, model: LoadedModel) -> type:
        """Flux2Pipeline and Flux2KleinPipeline' LoRA loader."""
        return Flux2LoraLoaderMixin

    def comfyui_converter(self, model: LoadedModel) -> ComfyConverter:
        """ComfyUI's original-layout (BFL) FLUX.2 names, read back exactly by diffusers too
        (:func:`to_comfyui`)."""
        return to_comfyui

    # ---------------------------------------------------------------------------------- load

    def load(self, path: str, *, dtype: torch.dtype, device: torch.device) -> Flux2Model:
        folder = check_model_folder(path, "flux2", self.options)
        index = read_model_json(folder / "model_index.json") or {}
        scheduler = read_model_json(folder / "scheduler" / "scheduler_config.json") or {}
        vae_config = read_model_json(folder / "vae" / "config.json") or {}
        denoiser = self._load_transformer(folder, dtype)
        self.guided = bool(denoiser.config.guidance_embeds)
        name = str(index.get("_class_name", ""))
        self.klein = name.startswith("Flux2Klein") if name else not self.guided
        self.distilled = self.klein and bool(index.get("is_distilled", False))
        self.shift = ScheduleShift.from_scheduler_config(scheduler)
        parts = Flux2Parts(
            folder=folder, device=torch.device(device), dtype=dtype, vae_config=vae_config
        )
        identity = _identity(folder, dtype, self.options.text_tokens)
        return LoadedModel(denoiser=denoiser, identity=identity, parts=parts)

    def _load_transformer(self, folder: Path, dtype: torch.dtype) -> Flux2Transformer2DModel:
        return load_transformer(
            Flux2Transformer2DModel,
            folder,
            dtype,
            file=self.options.transformer_file,
            field="model.flux2.transformer_file",
            what="a FLUX.2 transformer (the original BFL file of the same model)",
        )

    @property
    def cfg(self) -> bool:
        """Whether the samples use classifier-free guidance (klein base, scale above 1)."""
        return self.klein and not self.distilled and self.options.sample_guidance > 1

    # ------------------------------------------------------------------------------ encoders

    @torch.no_grad()
    def encode_images(self, model: Flux2Model, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] → normalised patchified latents (B, 128, H/16, W/16)."""
        vae = self._vae(model)
        param = next(vae.parameters())
        latents = vae.encode(images.to(param.device, param.dtype)).latent_dist.mode()
        mean, std = _latent_statistics(vae)
        return ((patchify(latents) - mean) / std).float()

    @torch.no_grad()
    def decode_latents(self, model: Flux2Model, latents: Tensor) -> Tensor:
        vae = self._vae(model)
        param = next(vae.parameters())
        mean, std = _latent_statistics(vae)
        latents = unpatchify(latents.to(param.device, param.dtype) * std + mean)
        return vae.decode(latents).sample.float().clamp(-1, 1)

    @torch.no_grad()
    def encode_prompts(self, model: Flux2Model, prompts: list[str]) -> TextEncoding:
        """``{"embeds": (B, L, 3 D)}``, L = ``text_tokens``, in the text encoder's dtype (as
        the pipeline returns them). For the klein base the empty prompt's encoding is kept
        too, the samples' negative prompt."""
        if self.cfg and model.parts.negative is None:
            model.parts.negative = self._embed(model, [""])
        return {"embeds": self._embed(model, prompts)}

    def _embed(self, model: Flux2Model, prompts: list[str]) -> Tensor:
        tokenizer, encoder = self._encoders(model)
        inputs = self._tokenize(tokenizer, prompts)
        device = next(encoder.parameters()).device
        output = encoder(
            input_ids=inputs["input_ids"].to(device),
            attention_mask=inputs["attention_mask"].to(device),
            output_hidden_states=True,
            use_cache=False,
        )
        layers = HIDDEN_LAYERS["klein" if self.klein else "dev"]
        stacked = torch.stack([output.hidden_states[k] for k in layers], dim=1)  # (B, 3, L, D)
        batch, count, length, width = stacked.shape
        return stacked.permute(0, 2, 1, 3).reshape(batch, length, count * width)

    def _tokenize(self, tokenizer: Any, prompts: list[str], **options: Any) -> dict[str, Any]:
        """The pipeline's token ids and attention mask: padded and cut to ``text_tokens``, or
        as ``options`` say (``padding=False``: each prompt's own length)."""
        options = options or {
            "padding": "max_length",
            "truncation": True,
            "max_length": self.options.text_tokens,
            "return_tensors": "pt",
        }
        if not self.klein:
            return tokenizer.apply_chat_template(
                format_input(prompts, system_message=SYSTEM_MESSAGE),
                add_generation_prompt=False,
                tokenize=True,
                return_dict=True,
                **options,
            )
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=False,
            )
            for prompt in prompts
        ]
        return tokenizer(texts, **options)

    def prompt_token_counts(self, model: Flux2Model, prompts: list[str]) -> tuple[list[int], int]:
        """Tokens with the chat template around each prompt (dev: the system message too)."""
        tokenizer = _tokenizer(model.parts.folder)
        ids = self._tokenize(tokenizer, prompts, padding=False)["input_ids"]
        return [len(row) for row in ids], self.options.text_tokens

    def release_encoders(self, model: Flux2Model, *, keep_decoder: bool) -> None:
        """Free the text encoder (and the VAE unless samples are decoded), then move the
        transformer to the training device."""
        model.parts.encoders = None
        free_encoders(model, keep_decoder=keep_decoder)

    def _encoders(self, model: Flux2Model) -> tuple[Any, torch.nn.Module]:
        parts = model.parts
        if parts.encoders is None:
            folder, dtype = parts.folder, text_encoder_dtype(parts.dtype)
            encoder_class = Qwen3ForCausalLM if self.klein else Mistral3ForConditionalGeneration
            encoder = load_frozen(encoder_class, folder / "text_encoder", parts.device, dtype=dtype)
            parts.encoders = (_tokenizer(folder), encoder)
        return parts.encoders

    def _vae(self, model: Flux2Model) -> AutoencoderKLFlux2:
        return frozen_vae(model.parts, AutoencoderKLFlux2)

    # ---------------------------------------------------------------------------- training

    def training_mu(self, shape: torch.Size) -> float:
        """The pipeline's ``compute_empirical_mu`` for this image's token count, at 200 steps
        (see the module's docstring)."""
        return compute_empirical_mu(image_seq_len=_tokens(shape), num_steps=TRAINING_MU_STEPS)

    def predict(
        self, model: Flux2Model, noisy: Tensor, timesteps: Tensor, text: TextEncoding
    ) -> Tensor:
        """The velocity (B, 128, h, w) for noisy latents of the same shape; with an edit's
        references in ``text`` (:mod:`.references`), their tokens after the target's."""
        references = refs.references_of(text)
        return self._velocity(
            model, noisy, timesteps, text["embeds"], self.options.guidance, references
        )

    def _velocity(
        self,
        model: Flux2Model,
        noisy: Tensor,
        t: Tensor,
        embeds: Tensor,
        guidance: float,
        references: list[refs.ReferenceGroup] | None = None,
    ) -> Tensor:
        """The velocity of the whole batch; items whose references differ in layout run in
        separate calls (one set of position ids per call), put back in the batch's order."""
        if references is None:
            return self._forward(model, noisy, t, embeds, guidance)
        if len(references) == 1:
            (group,) = references
            return self._forward(model, noisy, t, embeds, guidance, group)
        parts = [
            self._forward(model, noisy[g.index], t[g.index], embeds[g.index], guidance, g)
            for g in references
        ]
        order = torch.tensor([i for group in references for i in group.index]).argsort()
        return torch.cat(parts)[order.to(noisy.device)]

    def _forward(
        self,
        model: Flux2Model,
        noisy: Tensor,
        t: Tensor,
        embeds: Tensor,
        guidance: float,
        references: refs.ReferenceGroup | None = None,
    ) -> Tensor:
        denoiser_on_device(model)
        batch, _, rows, columns = noisy.shape
        dtype, device = model.parts.dtype, noisy.device
        hidden = pack(noisy).to(dtype)  # (B, h * w, 128)
        ids = image_ids(rows, columns, device)  # (h * w, 4)
        if references is not None:  # the pipelines' order: the target's tokens, then theirs
            hidden = torch.cat([hidden, references.latents.to(device, dtype)], dim=1)
            ids = torch.cat([ids, references.ids.to(device)])  # (h * w + N, 4)
        out = model.runner(
            hidden_states=hidden,
            encoder_hidden_states=embeds.to(device, dtype),
            timestep=t.to(dtype),
            img_ids=ids,
            txt_ids=text_ids(embeds.shape[1], device),
            guidance=torch.full((batch,), guidance, device=device) if self.guided else None,
            return_dict=False,
        )[0]
        return unpack(out[:, : rows * columns], rows, columns)  # the target's tokens only

    @torch.no_grad()
    def encode_conditioning(
        self, model: Flux2Model, kind: str, images: Sequence[Tensor], *, frames: int = 1
    ) -> TextEncoding:
        """One target's reference images, each (3, H, W) in [-1, 1] at its own size → their
        encodings (:func:`.references.encode_references`): resized, VAE-encoded, normalised
        and packed as the pipelines do, with their position ids."""
        if kind != "reference":
            raise ValueError(f"FLUX.2 takes reference images, not '{kind}'")
        limit = REFERENCE_LIMITS["klein" if self.klein else "dev"]
        if len(images) > limit:
            raise ValueError(
                f"FLUX.2 {'klein' if self.klein else 'dev'} takes at most {limit} reference "
                f"images, not {len(images)}"
            )
        return refs.encode_references(
            images, lambda image: self.encode_images(model, image), _pixels_per_cell(model)
        )

    @torch.no_grad()
    def sample(
        self,
        model: Flux2Model,
        text: TextEncoding,
        *,
        size: tuple[int, int],
        steps: int,
        generator: torch.Generator,
        conditioning: TextEncoding | None = None,
    ) -> Tensor:
        """Euler over the pipeline's schedule (``linspace(1, 1/steps)`` shifted with its
        ``mu`` for this size and step count), with dev's embedded ``sample_guidance``, the
        klein base's classifier-free guidance, or neither (distilled klein). Editing:
        ``conditioning``, each prompt's references encoded by :meth:`encode_conditioning`
        (batch-first), given to the conditional and the unconditional pass alike, as the
        pipelines give ``image=``."""
        denoiser_on_device(model)
        device = model.parts.device
        embeds = text["embeds"]
        batch, cell = embeds.shape[0], _pixels_per_cell(model)
        shape = (batch, model.denoiser.config.in_channels, size[1] // cell, size[0] // cell)
        x = torch.randn(shape, generator=generator)
        x = x.to(device)
        mu = compute_empirical_mu(image_seq_len=_tokens(x.shape), num_steps=steps)
        grid = torch.linspace(1.0, 1.0 / steps, steps)
        sigmas = torch.cat([self.shift.sigmas(grid, mu), torch.zeros(1)])
        negative = self._negative(model, batch) if self.cfg else None
        scale = self.options.sample_guidance
        references = refs.references_of(conditioning or {})
        for now, after in itertools.pairwise(sigmas.tolist()):
            t = torch.full((batch,), now, device=device)
            v = self._velocity(model, x, t, embeds, scale, references).float()
            if negative is not None:
                free = self._velocity(model, x, t, negative, scale, references).float()
                v = free + scale * (v - free)
            x = x + (after - now) * v
        return self.decode_latents(model, x)

    def _negative(self, model: Flux2Model, batch: int) -> Tensor:
        """The empty prompt's encoding (the pipeline's negative prompt), once per sample."""
        if model.parts.negative is None:
            model.parts.negative = self._embed(model, [""])
        return model.parts.negative.expand(batch, -1, -1)


def patchify(latents: Tensor) -> Tensor:
    """(B, C, 2h, 2w) → (B, 4C, h, w): each 2x2 patch into the channels (c*4 + 2*dy + dx)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return patches.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: Tensor) -> Tensor:
    """The inverse of :func:`patchify`: (B, 4C, h, w) → (B, C, 2h, 2w)."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return patches.reshape(b, c // 4, h * 2, w * 2)


def pack(latents: Tensor) -> Tensor:
    """(B, C, h, w) → (B, h * w, C): one token per cell, row-major."""
    return latents.flatten(2).transpose(1, 2)


def unpack(tokens: Tensor, rows: int, columns: int) -> Tensor:
    """The inverse of :func:`pack`: (B, h * w, C) → (B, C, h, w)."""
    b, _, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, rows, columns)


def image_ids(rows: int, columns: int, device: torch.device) -> Tensor:
    """(rows * columns, 4) position ids (0, row, column, 0) of the tokens, row-major."""
    ids = torch.zeros(rows, columns, 4, dtype=torch.long, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(columns, device=device)[None, :]
    return ids.reshape(rows * columns, 4)


def text_ids(length: int, device: torch.device) -> Tensor:
    """(length, 4) position ids (0, 0, 0, l) of the prompt tokens."""
    ids = torch.zeros(length, 4, dtype=torch.long, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids


def _tokens(shape: torch.Size) -> int:
    """The image's token count: one per latent cell."""
    return int(shape[-2]) * int(shape[-1])


def _pixels_per_cell(model: Flux2Model) -> int:
    blocks = model.parts.vae_config.get("block_out_channels") or [0] * 4
    return 2 ** (len(blocks) - 1) * 2


def _latent_statistics(vae: AutoencoderKLFlux2) -> tuple[Tensor, Tensor]:
    """The batch-norm running mean and standard deviation of the patchified latents, (1, 128,
    1, 1) each, as the pipelines normalise with them (never ``vae.bn`` in train mode)."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean, std


def _tokenizer(folder: Path) -> Any:
    return AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)


# ------------------------------------------------------------------------------- ComfyUI

_DOUBLE_BLOCK = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.linear_in": ("img_mlp.0", None),
    "ff.linear_out": ("img_mlp.2", None),
    "ff_context.linear_in": ("txt_mlp.0", None),
    "ff_context.linear_out": ("txt_mlp.2", None),
}
"""diffusers module in ``transformer_blocks.N`` → (original module in ``double_blocks.N``, the
part of its fused q, k, v or None)."""
_SINGLE_BLOCK = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
"""diffusers module in ``single_transformer_blocks.N`` → original in ``single_blocks.N``."""


def original_module(module: str) -> tuple[str, int | None]:
    """``transformer_blocks.0.attn.to_k`` → (``double_blocks.0.img_attn.qkv``, 1); a
    ValueError naming ``output.format`` for modules without an original name here."""
    block, _, index_inner = module.partition(".")
    index, _, inner = index_inner.partition(".")
    if index.isdigit():
        if block == "transformer_blocks" and inner in _DOUBLE_BLOCK:
            name, part = _DOUBLE_BLOCK[inner]
            return f"double_blocks.{index}.{name}", part
        if block == "single_transformer_blocks" and inner in _SINGLE_BLOCK:
            return f"single_blocks.{index}.{_SINGLE_BLOCK[inner]}", None
    raise ValueError(
        f"output.format=comfyui: the LoRA module '{module}' has no ComfyUI FLUX.2 name; train "
        "the attention and MLP layers only (lora.targets) or use output.format=diffusers"
    )


def to_comfyui(state: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """A diffusers-layout FLUX.2 LoRA state dict (``transformer.`` keys) in the original (BFL)
    layout ComfyUI loads: ``diffusion_model.double_blocks.N.img_attn.qkv.lora_A.weight`` /
    ``lora_B``, ``...single_blocks.N.linear1``, ...

    ComfyUI's ``model_lora_keys_unet`` (comfy/lora.py) maps, for every model, each weight of
    the loaded model by its own name, ``diffusion_model.<module>``, and a FLUX.2 model there
    has the original module names (fused q, k, v), so this layout loads in every ComfyUI with
    FLUX.2. (Diffusers names also reach ComfyUI's FLUX.2 model through ``flux_to_diffusers``
    (comfy/utils.py), its Flux2 model class deriving from Flux, but that map has FLUX.2's MLP
    and single-block names only since January 2026.) diffusers reads this layout back with
    ``_convert_non_diffusers_flux2_lora_to_diffusers``.

    The scale ``alpha / rank`` is baked into ``lora_B`` and no ``alpha`` is written: ComfyUI
    then applies ``lora_B @ lora_A`` as it is, and diffusers' converter refuses keys it does
    not map, ``alpha`` among them. A fused q, k, v gets ``lora_A = cat(A_q, A_k, A_v)`` and
    ``lora_B = block_diag(B_q, B_k, B_v)``, rank 3r: its product is the three updates
    stacked, exactly; diffusers splits it back into q, k, v of rank 3r with the same products.
    """
    fused: dict[str, dict[int, tuple[Tensor, Tensor]]] = {}
    converted: dict[str, Tensor] = {}
    for module, (down, up) in _lora_modules(state).items():
        name, part = original_module(module)
        up = up * (alpha / down.shape[0])
        if part is None:
            converted.update(_comfy_pair(name, down, up))
        else:
            fused.setdefault(name, {})[part] = (down, up)
    for name, parts in fused.items():
        converted.update(_comfy_pair(name, *_fuse_qkv(parts)))
    return converted


def _lora_modules(state: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """``transformer.<module>.lora_A/B.weight`` keys → module → (lora_A, lora_B)."""
    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        name, _, param = key.removeprefix("transformer.").rpartition(".lora_")
        if not key.startswith("transformer.") or param not in ("A.weight", "B.weight"):
            raise ValueError(
                f"output.format=comfyui: '{key}' is not a diffusers transformer LoRA weight; "
                "use output.format=diffusers"
            )
        modules.setdefault(name, {})[param[0]] = value
    return {name: (pair["A"], pair["B"]) for name, pair in modules.items()}


def _fuse_qkv(parts: dict[int, tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """q, k, v updates (the ones trained) as one LoRA of the fused layer: A stacked, B block
    diagonal (an untrained part's rows stay zero)."""
    out = next(iter(parts.values()))[1].shape[0]
    downs = [parts[i][0] for i in sorted(parts)]
    up = torch.zeros(3 * out, sum(d.shape[0] for d in downs), dtype=downs[0].dtype)
    column = 0
    for i in sorted(parts):
        rank = parts[i][0].shape[0]
        up[i * out : (i + 1) * out, column : column + rank] = parts[i][1]
        column += rank
    return torch.cat(downs), up


def _comfy_pair(name: str, down: Tensor, up: Tensor) -> dict[str, Tensor]:
    prefix = f"diffusion_model.{name}"
    return {f"{prefix}.lora_A.weight": down.contiguous(), f"{prefix}.lora_B.weight": up}


def _identity(folder: Path, dtype: torch.dtype, text_tokens: int) -> str:
    """What the cached latents and prompt encodings depend on: the VAE, the text encoder and
    tokenizer (path, size, modification time), the dtype and the prompt length, not the
    transformer."""
    head = f"flux2:{folder.resolve()}:dtype={dtype}:tokens={text_tokens}:"
    return head + files_stamp(folder, ("vae", "text_encoder", "tokenizer"))
