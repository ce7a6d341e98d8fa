"""The ``chroma`` family: Chroma LoRAs from a local diffusers folder.

The folder is the diffusers layout (as ``ChromaPipeline.save_pretrained`` writes it, e.g. a
download of ``lodestones/Chroma1-HD``)::

    transformer/   ChromaTransformer2DModel (FLUX.1's blocks, modulation from an approximator)
    vae/           AutoencoderKL (FLUX.1's), 16 latent channels, scaling and shift factor
    text_encoder/  T5EncoderModel            tokenizer/  its T5 tokenizer (no CLIP)
    scheduler/     scheduler_config.json: the timestep shift rule (FLUX.1 dev's)

Everything is read with ``local_files_only``. As ``ChromaPipeline`` does:

- Latents: ``(z - shift_factor) * scaling_factor`` of the VAE posterior's mode, (B, 16, H/8,
  W/8); ``predict`` packs each 2x2 patch into one token of 64 values with position ids (0, row,
  column) and unpacks the prediction, as the FLUX.1 family does.
- Prompts: T5's last hidden state, the prompt padded to ``model.chroma.text_tokens`` (512) and
  encoded with its attention mask. The transformer attends to the prompt's tokens and the first
  padding token only (the pipeline's mask): the encoding keeps that mask, and ``predict`` hands
  it to the transformer as booleans (the masking Chroma was trained with). diffusers 0.42.1's
  pipeline hands the same mask as floats, which attention reads as an additive bias of 0 or 1,
  so there the padding is barely masked (diffusers issue 12116). With the padding masked, the
  tokens after the batch's longest mask are dropped before the transformer: the same result,
  a much shorter sequence.
- Timesteps: ``t`` uniform, shifted by the folder's scheduler rule (dynamic: ``mu`` from the
  image's token count), in training and in the samples.
- Samples: Euler over the pipeline's schedule with classifier-free guidance
  (``model.chroma.sample_cfg``, the pipeline's ``guidance_scale``; the negative prompt
  ``model.chroma.negative_prompt``, empty as the pipeline's). Chroma has no guidance embedding.
- Single files (``model.chroma.transformer_file``): Chroma's own layout (``double_blocks``,
  ``single_blocks``, ``distilled_guidance_layer``; ComfyUI's adds ``model.diffusion_model.``) is
  renamed here to diffusers' names, the widths read from the file (diffusers' own converter
  assumes the released width), and loaded on the folder's config.
- LoRA files: the diffusers layout loads with ``ChromaPipeline.load_lora_weights``; the ComfyUI
  layout is Chroma's own module names (:func:`to_comfyui`).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, ChromaTransformer2DModel
from diffusers.loaders import FluxLoraLoaderMixin
from diffusers.models.transformers.transformer_chroma import ChromaSingleTransformerBlock
from torch import Tensor
from transformers import AutoTokenizer, T5EncoderModel

from modules.models.base import ComfyConverter, LoadedModel, TextEncoding
from modules.models.chroma import LORA_TARGETS, ChromaOptions
from modules.models.flow_matching import ScheduleShift, ShiftedByTokens
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

SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
COMFYUI_PREFIX = "diffusion_model."


@dataclass(kw_only=True)
class ChromaParts(FolderParts):
    """What a loaded Chroma keeps beside its transformer (the folder, device, dtype and VAE of
    :class:`FolderParts`)."""

    encoder: tuple[Any, T5EncoderModel] | None = None
    """T5's tokenizer and encoder: loaded on first use, freed by ``release_encoders``."""
    negative: TextEncoding | None = None
    """``negative_prompt`` encoded before the text encoder is freed, for guided samples."""


ChromaModel = LoadedModel[ChromaParts]


class ChromaFamily(ShiftedByTokens):
    """Chroma text-to-image, with its options (``model.chroma``)."""

    name = "chroma"
    loss_layout = "video"

    def __init__(self, options: ChromaOptions | None = None) -> None:
        self.options = options if options is not None else ChromaOptions()
        self.shift = ScheduleShift()

    def lora_targets(self, model: LoadedModel) -> dict[str, list[str]]:
        return {name: list(modules) for name, modules in LORA_TARGETS.items()}

    def blocks(self, denoiser: torch.nn.Module) -> list[torch.nn.Module]:
        """The double-stream blocks, then the single-stream blocks (the forward's order)."""
        return [*denoiser.transformer_blocks, *denoiser.single_transformer_blocks]

    def lora_loader(self, model: LoadedModel) -> type:
        """ChromaPipeline's LoRA loader (FLUX.1's)."""
        return FluxLoraLoaderMixin

    def comfyui_converter(self, model: LoadedModel) -> ComfyConverter:
        """Chroma's own module names under ``diffusion_model.``, fused where Chroma fuses
        (:func:`to_comfyui`), for the widths of this transformer."""
        config = model.denoiser.config
        width = config.num_attention_heads * config.attention_head_dim
        return lambda state, alpha: to_comfyui(state, alpha, width=width)

    # ---------------------------------------------------------------------------------- load

    def load(self, path: str, *, dtype: torch.dtype, device: torch.device) -> ChromaModel:
        """The transformer to train, on the CPU until ``release_encoders``; the VAE and T5
        load on first use."""
        folder = check_model_folder(path, "chroma", self.options)
        denoiser = load_transformer(
            ChromaTransformer2DModel,
            folder,
            dtype,
            file=self.options.transformer_file,
            field="model.chroma.transformer_file",
            what="a Chroma transformer (Chroma's, ComfyUI's or diffusers' names)",
            rename=diffusers_names,
        )
        scheduler = read_model_json(folder / "scheduler" / "scheduler_config.json") or {}
        self.shift = ScheduleShift.from_scheduler_config(scheduler)
        parts = ChromaParts(
            folder=folder,
            device=torch.device(device),
            dtype=dtype,
            vae_config=read_model_json(folder / "vae" / "config.json") or {},
        )
        return LoadedModel(denoiser=denoiser, identity=self._identity(folder, dtype), parts=parts)

    def _identity(self, folder: Path, dtype: torch.dtype) -> str:
        """What the cached latents and prompt encodings depend on: the VAE, T5 and its
        tokenizer (path, size, modification time), the dtype and the prompt length."""
        head = f"chroma:{folder.resolve()}:dtype={dtype}:tokens={self.options.text_tokens}:"
        return head + files_stamp(folder, ("vae", "text_encoder", "tokenizer"))

    # ------------------------------------------------------------------------------ encoders

    def encode_images(self, model: ChromaModel, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, 16, H/8, W/8)."""
        return encode_shifted(
            frozen_vae(model.parts, AutoencoderKL), model.parts.vae_config, images
        )

    def decode_latents(self, model: ChromaModel, latents: Tensor) -> Tensor:
        return decode_shifted(
            frozen_vae(model.parts, AutoencoderKL), model.parts.vae_config, latents
        )

    @torch.no_grad()
    def encode_prompts(self, model: ChromaModel, prompts: list[str]) -> TextEncoding:
        """``{"embeds": (B, L, D), "mask": (B, L)}``, L = ``text_tokens``: T5 run with the
        tokenizer's mask, and the transformer's mask (1 on the prompt's tokens and the first
        padding token), as ``ChromaPipeline._get_t5_prompt_embeds`` makes them."""
        tokenizer, encoder = self._encoder(model)
        device = next(encoder.parameters()).device
        tokens = tokenizer(
            prompts,
            padding="max_length",
            max_length=self.options.text_tokens,
            truncation=True,
            return_tensors="pt",
        ).to(device)
        embeds = encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        lengths = tokens.attention_mask.sum(dim=1, keepdim=True)  # (B, 1)
        positions = torch.arange(tokens.input_ids.shape[1], device=device)[None, :]  # (1, L)
        mask = (positions <= lengths).long()  # the prompt and one padding token
        return {"embeds": embeds.float(), "mask": mask}

    def prompt_token_counts(self, model: ChromaModel, prompts: list[str]) -> tuple[list[int], int]:
        tokenizer = AutoTokenizer.from_pretrained(
            model.parts.folder / "tokenizer", local_files_only=True
        )
        return [len(ids) for ids in tokenizer(prompts).input_ids], self.options.text_tokens

    def release_encoders(self, model: ChromaModel, *, keep_decoder: bool) -> None:
        """Free T5 (and the VAE unless samples are decoded), then move the transformer to the
        training device. For guided samples the negative prompt is encoded first."""
        parts = model.parts
        if keep_decoder and self.options.sample_cfg > 1 and parts.negative is None:
            parts.negative = self.encode_prompts(model, [self.options.negative_prompt])
        parts.encoder = None
        free_encoders(model, keep_decoder=keep_decoder)

    def _encoder(self, model: ChromaModel) -> tuple[Any, T5EncoderModel]:
        parts = model.parts
        if parts.encoder is None:
            tokenizer = AutoTokenizer.from_pretrained(
                parts.folder / "tokenizer", local_files_only=True
            )
            # T5 overflows in float16: bfloat16 then.
            encoder = load_frozen(
                T5EncoderModel,
                parts.folder / "text_encoder",
                parts.device,
                dtype=text_encoder_dtype(parts.dtype),
            )
            parts.encoder = (tokenizer, encoder)
        return parts.encoder

    # ---------------------------------------------------------------------------- training

    def predict(
        self, model: ChromaModel, noisy: Tensor, timesteps: Tensor, text: TextEncoding
    ) -> Tensor:
        """The velocity (B, 16, h, w) for noisy latents of the same shape."""
        _, channels, height, width = noisy.shape
        tokens = self._velocity_tokens(model, pack(noisy), timesteps, text, height, width)
        return unpack(tokens, channels, height, width)

    def _velocity_tokens(
        self,
        model: ChromaModel,
        tokens: Tensor,
        t: Tensor,
        text: TextEncoding,
        height: int,
        width: int,
    ) -> Tensor:
        """One transformer call on packed tokens (B, h/2 * w/2, 64)."""
        denoiser_on_device(model)
        dtype, device = model.parts.dtype, tokens.device
        # Every position after the batch's longest mask is masked for every sample: drop them.
        kept = int(text["mask"].sum(dim=1).max())
        embeds = text["embeds"][:, :kept].to(dtype)  # (B, kept, D)
        text_mask = text["mask"][:, :kept].to(device).bool()
        image_mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=device)
        mask = torch.cat([text_mask, image_mask], dim=1)  # (B, kept + h/2 * w/2)
        with _single_blocks_masked(model.denoiser, mask):
            return model.runner(
                hidden_states=tokens.to(dtype),
                encoder_hidden_states=embeds,
                timestep=t.to(dtype),
                img_ids=image_ids(height // 2, width // 2, device),
                txt_ids=torch.zeros(kept, 3, device=device),
                attention_mask=mask,
                return_dict=False,
            )[0]

    def training_mu(self, shape: torch.Size) -> float:
        """``calculate_shift`` of the packed token count (training and the samples)."""
        return self.shift.mu_for((shape[-2] // 2) * (shape[-1] // 2))

    @torch.no_grad()
    def sample(
        self,
        model: ChromaModel,
        text: TextEncoding,
        *,
        size: tuple[int, int],
        steps: int,
        generator: torch.Generator,
    ) -> Tensor:
        """Euler over the pipeline's schedule (``linspace(1, 1/steps)`` shifted for the
        image's token count), with classifier-free guidance against the negative prompt."""
        denoiser_on_device(model)
        device = model.parts.device
        batch = text["embeds"].shape[0]
        scale = 2 ** (len(model.parts.vae_config.get("block_out_channels") or [0] * 4) - 1)
        rows, columns = size[1] // scale, size[0] // scale
        channels = model.denoiser.config.in_channels // 4
        latents = torch.randn(batch, channels, rows, columns, generator=generator).to(device)
        tokens = pack(latents)
        negative = self._negative(model, batch)
        grid = torch.linspace(1.0, 1.0 / steps, steps)
        sigmas = torch.cat(
            [self.shift.sigmas(grid, self.training_mu(latents.shape)), torch.zeros(1)]
        )
        for now, after in itertools.pairwise(sigmas.tolist()):
            t = torch.full((batch,), now, device=device)
            v = self._velocity_tokens(model, tokens, t, text, rows, columns).float()
            if negative is not None:
                unguided = self._velocity_tokens(model, tokens, t, negative, rows, columns)
                v = unguided.float() + self.options.sample_cfg * (v - unguided.float())
            tokens = tokens + (after - now) * v
        return self.decode_latents(model, unpack(tokens, channels, rows, columns))

    def _negative(self, model: ChromaModel, batch: int) -> TextEncoding | None:
        parts = model.parts
        if self.options.sample_cfg <= 1:
            return None
        if parts.negative is None and not parts.released:
            parts.negative = self.encode_prompts(model, [self.options.negative_prompt])
        if parts.negative is None:
            return None
        return {key: value.expand(batch, *value.shape[1:]) for key, value in parts.negative.items()}


def image_ids(rows: int, columns: int, device: torch.device) -> Tensor:
    """(rows * columns, 3) position ids (0, row, column) of the packed tokens, row-major."""
    ids = torch.zeros(rows, columns, 3, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(columns, device=device)[None, :]
    return ids.reshape(rows * columns, 3)


@contextlib.contextmanager
def _single_blocks_masked(denoiser: torch.nn.Module, mask: Tensor) -> Iterator[None]:
    """With gradient checkpointing on, diffusers 0.42.1's ``ChromaTransformer2DModel.forward``
    calls each single-stream block through the checkpoint function without the attention mask,
    so the student (checkpointed) would attend to the padding that the teacher (no gradients,
    not checkpointed) and the samples mask. Inside this block the checkpoint function gives
    those blocks the mask (their fourth positional argument)."""
    inner = getattr(denoiser, "_gradient_checkpointing_func", None)
    if inner is None or not getattr(denoiser, "gradient_checkpointing", False):
        yield
        return

    def checkpointed(block: torch.nn.Module, *args: Any) -> Any:
        if isinstance(block, ChromaSingleTransformerBlock) and len(args) == 3:
            args = (*args, mask)  # hidden_states, temb, image_rotary_emb, attention_mask
        return inner(block, *args)

    denoiser._gradient_checkpointing_func = checkpointed
    try:
        yield
    finally:
        denoiser._gradient_checkpointing_func = inner


# ------------------------------------------------------------------------ single-file names


def diffusers_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A single-file transformer's state dict with diffusers' names: Chroma's own layout (and
    ComfyUI's, the same under a model prefix) converted as diffusers'
    ``convert_chroma_transformer_checkpoint_to_diffusers`` does, with the widths read from the
    file; a file in diffusers' names is returned without its prefix."""
    state = {_strip_prefix(key): value for key, value in state.items()}
    if not any(key.startswith("double_blocks.") for key in state):
        return state
    sd, out = dict(state), {}

    def take(src: str, dst: str) -> None:
        for suffix in ("weight", "bias"):
            if f"{src}.{suffix}" in sd:
                out[f"{dst}.{suffix}"] = sd.pop(f"{src}.{suffix}")

    def split(src: str, dsts: list[str], sizes: list[int]) -> None:
        for suffix in ("weight", "bias"):
            parts = torch.split(sd.pop(f"{src}.{suffix}"), sizes, dim=0)
            for dst, part in zip(dsts, parts, strict=True):
                out[f"{dst}.{suffix}"] = part

    width = state["img_in.weight"].shape[0]
    take("distilled_guidance_layer.in_proj", "distilled_guidance_layer.in_proj")
    take("distilled_guidance_layer.out_proj", "distilled_guidance_layer.out_proj")
    for i in _indices(sd, "distilled_guidance_layer.layers.", 2):
        p = f"distilled_guidance_layer.layers.{i}."
        take(p + "in_layer", p + "linear_1")
        take(p + "out_layer", p + "linear_2")
        norm = f"distilled_guidance_layer.norms.{i}."
        out[norm + "weight"] = sd.pop(norm + "scale")
    take("txt_in", "context_embedder")
    take("img_in", "x_embedder")
    take("final_layer.linear", "proj_out")
    for i in _indices(sd, "double_blocks.", 1):
        p, q = f"double_blocks.{i}.", f"transformer_blocks.{i}.attn."
        split(p + "img_attn.qkv", [q + "to_q", q + "to_k", q + "to_v"], [width] * 3)
        split(
            p + "txt_attn.qkv", [q + "add_q_proj", q + "add_k_proj", q + "add_v_proj"], [width] * 3
        )
        for theirs, ours in (
            ("img_attn.norm.query_norm", "norm_q"),
            ("img_attn.norm.key_norm", "norm_k"),
            ("txt_attn.norm.query_norm", "norm_added_q"),
            ("txt_attn.norm.key_norm", "norm_added_k"),
        ):
            out[f"{q}{ours}.weight"] = sd.pop(f"{p}{theirs}.scale")
        block = f"transformer_blocks.{i}."
        take(p + "img_mlp.0", block + "ff.net.0.proj")
        take(p + "img_mlp.2", block + "ff.net.2")
        take(p + "txt_mlp.0", block + "ff_context.net.0.proj")
        take(p + "txt_mlp.2", block + "ff_context.net.2")
        take(p + "img_attn.proj", q + "to_out.0")
        take(p + "txt_attn.proj", q + "to_add_out")
    for i in _indices(sd, "single_blocks.", 1):
        p, q = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        mlp = sd[p + "linear1.weight"].shape[0] - 3 * width
        names = [q + "attn.to_q", q + "attn.to_k", q + "attn.to_v", q + "proj_mlp"]
        split(p + "linear1", names, [width, width, width, mlp])
        out[q + "attn.norm_q.weight"] = sd.pop(p + "norm.query_norm.scale")
        out[q + "attn.norm_k.weight"] = sd.pop(p + "norm.key_norm.scale")
        take(p + "linear2", q + "proj_out")
    return out  # other keys are dropped, as diffusers' converter drops them


def _indices(state: dict[str, Tensor], prefix: str, position: int) -> list[int]:
    """The block numbers of ``prefix`` keys (the ``position``-th dotted part)."""
    return sorted({int(key.split(".")[position]) for key in state if key.startswith(prefix)})


def _strip_prefix(key: str) -> str:
    for prefix in SINGLE_FILE_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


# -------------------------------------------------------------------------- ComfyUI layout

_FUSED = {
    # Chroma's fused layer → the diffusers modules in it, in order.
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
}
_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None),
    "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None),
    "ff_context.net.2": ("txt_mlp.2", None),
}
_SINGLE = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None),
}
_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear"}


def to_comfyui(state: dict[str, Tensor], alpha: float, *, width: int) -> dict[str, Tensor]:
    """``transformer.<module>.lora_A/B.weight`` → Chroma's own names under ``diffusion_model.``
    with ``lora_down`` / ``lora_up`` and a per-module ``alpha``: the layout ComfyUI loads
    for Chroma (its keys for the model's own layers) and diffusers' FLUX / Chroma loader reads
    back (as a kohya-style file).

    Where Chroma fuses layers (q, k, v into ``qkv``; q, k, v and the MLP's input into a single
    block's ``linear1``), the parts' LoRAs become one LoRA of the fused layer: ``lora_down``
    the parts' A stacked (n r × in), ``lora_up`` block-diagonal (the parts' B on the diagonal,
    out_1 + ... + out_n × n r) and alpha n α, so that up @ down * alpha / (n r) is each part's
    B A α / r in its rows. A part the LoRA does not target gets zeros. (``width`` is the
    transformer's, for a single block's MLP part: 4 x width.)

    The final layer (``final_layer.linear``) is written with alpha = its rank and α / r in
    its ``lora_up``: diffusers' converter reads that layer without its alpha."""
    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        module, _, kind = key.removeprefix("transformer.").rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise ValueError(
                f"output.format=comfyui: '{key}' is neither a lora_A nor a lora_B weight; use "
                "output.format=diffusers"
            )
        modules.setdefault(module, {})[kind[0]] = value
    fused: dict[str, dict[int, dict[str, Tensor]]] = {}
    converted: dict[str, Tensor] = {}
    for module, weights in modules.items():
        target, part = _chroma_name(module)
        if part is not None:
            fused.setdefault(target, {})[part] = weights
            continue
        down, up, module_alpha = weights["A"], weights["B"], float(alpha)
        if target == "final_layer.linear":
            rank = down.shape[0]
            up, module_alpha = up * (alpha / rank), float(rank)
        _put(converted, target, down, up, module_alpha)
    for target, parts in fused.items():
        count = len(_FUSED[target.split(".", 2)[2]])
        outs = [width] * 3 + [4 * width] * (count - 3)  # q, k, v (and a single block's MLP)
        some = next(iter(parts.values()))["A"]
        rank = some.shape[0]
        zeros = torch.zeros(rank, some.shape[1], dtype=some.dtype)
        down = torch.cat([parts[i]["A"] if i in parts else zeros for i in range(count)])
        up = torch.zeros(sum(outs), count * rank, dtype=some.dtype)  # (out_1 + ... , n r)
        row = 0
        for i, out in enumerate(outs):
            if i in parts:
                up[row : row + out, i * rank : (i + 1) * rank] = parts[i]["B"]
            row += out
        _put(converted, target, down, up, alpha * count)
    return converted


def _put(converted: dict[str, Tensor], target: str, down: Tensor, up: Tensor, alpha: float) -> None:
    name = COMFYUI_PREFIX + target
    converted[f"{name}.lora_down.weight"] = down.contiguous()
    converted[f"{name}.lora_up.weight"] = up.contiguous()
    converted[f"{name}.alpha"] = torch.tensor(float(alpha))


def _chroma_name(module: str) -> tuple[str, int | None]:
    """A diffusers module's Chroma layer, and its part's index when Chroma fuses it."""
    for prefix, table, theirs in (
        ("transformer_blocks.", _DOUBLE, "double_blocks."),
        ("single_transformer_blocks.", _SINGLE, "single_blocks."),
    ):
        if module.startswith(prefix):
            index, _, inner = module.removeprefix(prefix).partition(".")
            if inner in table:
                layer, part = table[inner]
                return f"{theirs}{index}.{layer}", part
    if module in _TOP:
        return _TOP[module], None
    raise ValueError(
        f"output.format=comfyui: the LoRA's module '{module}' has no place in ComfyUI's Chroma "
        "layout; train other lora.targets or use output.format=diffusers"
    )
