"""The ``wan`` family: WAN 2.1 / 2.2 text- and image-to-video LoRAs from a local diffusers folder.

The folder is the diffusers layout (as ``WanPipeline.save_pretrained`` writes it, e.g. the
``Wan-AI/Wan2.1-T2V-14B-Diffusers`` download)::

    model_index.json   boundary_ratio (2.2 A14B), expand_timesteps (2.2 TI2V 5B)
    transformer/       WanTransformer3DModel (2.2 A14B: the high-noise expert)
    transformer_2/     2.2 A14B only: the low-noise expert
    vae/               AutoencoderKLWan
    text_encoder/      UMT5EncoderModel
    tokenizer/         the UMT5 tokenizer
    image_encoder/     2.1 I2V only (``WanImageToVideoPipeline``): the CLIP vision encoder,
    image_processor/   and its image processor

Everything is read with ``local_files_only``. Variants: WAN 2.1 T2V 1.3B and 14B; WAN 2.2 T2V
A14B (one LoRA per expert, ``model.wan.expert``); WAN 2.2 TI2V 5B trained as text-to-video (its
per-token timesteps are all equal when no frame is conditioned, which is one timestep per
sample); image-to-video: WAN 2.1 I2V, WAN 2.2 I2V A14B, and TI2V 5B with
``model.wan.task=image_to_video``, each clip's first frame given through the conditioning slot
(:mod:`.image_to_video`).

- Latents: the VAE (float32) posterior's mode (deterministic, so the cache holds one latent per
  item), normalised per channel to ``(z - latents_mean) / latents_std`` as the WAN pipelines do.
  Videos (B, 3, F, H, W) → (B, C, F', h, w) with F' = (F - 1) / 4 + 1; an image is a 1-frame
  video.
- Prompts: the UMT5 last hidden state with padded positions zeroed, as the pipeline does. The
  transformer always sees :data:`TEXT_TOKENS` tokens (zeros after the prompt); the cache keeps
  only the tokens up to the longest prompt of an encoding batch.
- Timesteps: flow matching with ``t`` uniform and then flow-shifted (``model.wan.flow_shift``).
  WAN 2.2 A14B: the pipeline hands a step to the high-noise expert when the shifted ``t`` is at
  or above ``boundary_ratio``; training draws ``t`` from the chosen expert's side only, keeping
  the shifted distribution within it, and the teacher is the same expert with the LoRA off.
  ``expert=both`` trains a LoRA on each: every optimizer step first draws its expert (high
  noise with the probability of a shifted ``t`` at or above the boundary, so the steps together
  follow the whole distribution), then its timesteps on that side; ``predict`` and ``sample``
  send each sample to the expert of its ``t``, the other expert parked in CPU memory.
- Memory: the VAE and the text encoder load on first use (a run whose cache is complete never
  loads them) and :meth:`WanFamily.release_encoders` frees them; the transformer stays on the
  CPU until then, so it never shares the GPU with the text encoder. The memory options
  (``model.memory``) are applied to the transformer after ``load``, and to the second expert when
  samples load it (``LoadedModel.prepare_denoiser``) or, with ``expert=both``, after ``load``.
"""

from __future__ import annotations

import gc
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.loaders import WanLoraLoaderMixin
from safetensors import SafetensorError
from torch import Tensor
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionModelWithProjection,
    UMT5EncoderModel,
)

from modules.config import ConfigError
from modules.models.base import (
    ComfyConverter,
    ExpertSplit,
    LoadedModel,
    ModelLoadError,
    TextEncoding,
    select_text,
)
from modules.models.base_weights import ScaledLayer, keep_scaled_layers, read_single_file
from modules.models.flow_matching import T_MAX, T_MIN, FlowMatching, euler_sample, shift_timesteps
from modules.models.memory import switch_denoiser
from modules.models.model_folder import (
    FolderParts,
    check_model_folder,
    denoiser_on_device,
    files_stamp,
    load_frozen,
    read_model_json,
    text_encoder_dtype,
)
from modules.models.wan import LORA_TARGETS, WanOptions, trains_image_to_video, wan_form
from modules.models.wan import image_to_video as i2v
from modules.models.wan.comfyui import to_comfyui

HIGH_NOISE, LOW_NOISE = "high_noise", "low_noise"
"""The experts' names (``model.wan.expert``, and the LoRA files of expert=both)."""
DEFAULT_FLOW_SHIFT = 3.0
"""WAN's flow shift for 480p; 5.0 suits 720p (``model.wan.flow_shift``)."""
DEFAULT_BOUNDARY = 0.875
"""WAN 2.2 T2V A14B's expert boundary, used when model_index.json has no boundary_ratio."""
TEXT_TOKENS = 512
"""Prompt length the WAN transformers were trained with (the pipeline's max_sequence_length)."""
SAMPLE_GUIDANCE = 5.0
"""Classifier-free guidance scale of the training samples (the WAN pipeline's default)."""
"""The uniform draw is kept off the exact ends, as in ``sample_flow_timesteps``."""


@dataclass(kw_only=True)
class WanParts(FolderParts):
    """What a loaded WAN keeps beside the transformer it trains (the folder, device, dtype and
    VAE of :class:`FolderParts`)."""

    other_subfolder: str | None = None
    """2.2 A14B: the subfolder of the expert that is not trained (None for one transformer)."""
    other_expert: WanTransformer3DModel | None = None
    """That expert, loaded on the first sample that needs it (training never does)."""
    text_encoder: UMT5EncoderModel | None = None
    """Loaded on first use with its tokenizer, freed by ``release_encoders``."""
    tokenizer: Any = None
    negative: TextEncoding | None = None
    """The empty prompt encoded before the text encoder is freed: the samples' negative."""
    image_encoder: Any = None
    """WAN 2.1 I2V: the CLIP vision encoder and its image processor, loaded on first use,
    freed by ``release_encoders``."""
    image_processor: Any = None


WanModel = LoadedModel[WanParts]


class WanFamily(FlowMatching):
    """WAN 2.1 / 2.2 text- and image-to-video, with its options (``model.wan``)."""

    name = "wan"
    loss_layout = "video"

    def __init__(self, options: WanOptions | None = None) -> None:
        self.options = options if options is not None else WanOptions()
        self.flow_shift = self.options.flow_shift or DEFAULT_FLOW_SHIFT
        self.timestep_range = (0.0, 1.0)
        """The trained expert's range of shifted ``t`` (the whole range unless 2.2 A14B)."""
        self.boundary: float | None = None
        """2.2 A14B: the shifted ``t`` at which sampling switches experts; set by ``load``."""
        self.image_to_video = False
        """Whether the loaded folder trains image-to-video (:mod:`.image_to_video`)."""
        self.form: str | None = None
        """The loaded folder's form (:func:`modules.models.wan.wan_form`)."""

    def lora_targets(self, model: LoadedModel) -> dict[str, list[str]]:
        """The presets; WAN 2.1 I2V's attention also has the image cross-attention's key and
        value projections (``attn2.add_k_proj`` / ``add_v_proj``)."""
        image = ["add_k_proj", "add_v_proj"] if model.denoiser.config.image_dim else []
        return {name: [*modules, *image] for name, modules in LORA_TARGETS.items()}

    def blocks(self, denoiser: torch.nn.Module) -> list[torch.nn.Module]:
        """The transformer blocks (the same for both WAN 2.2 experts)."""
        return list(denoiser.blocks)

    def lora_loader(self, model: LoadedModel) -> type:
        """WAN pipelines' LoRA loader."""
        return WanLoraLoaderMixin

    def comfyui_converter(self, model: LoadedModel) -> ComfyConverter:
        """The original WAN module names with a per-module alpha (:mod:`.comfyui`)."""
        return to_comfyui

    # ---------------------------------------------------------------------------------- load

    def load(self, path: str, *, dtype: torch.dtype, device: torch.device) -> WanModel:
        """The transformer to train, on the CPU until ``release_encoders``; the encoders load
        on first use."""
        folder = check_model_folder(path, "wan", self.options)
        index = read_model_json(folder / "model_index.json") or {}
        vae_config = read_model_json(folder / "vae" / "config.json") or {}
        subfolder, other = self._choose_expert(folder, index)
        denoiser = self._load_transformer(folder, subfolder, dtype)
        self.image_to_video = trains_image_to_video(folder, self.options)
        self.form = wan_form(folder)
        parts = WanParts(
            folder=folder,
            device=torch.device(device),
            dtype=dtype,
            vae_config=vae_config,
            other_subfolder=other,
        )
        identity = _encoders_identity(folder, text_encoder_dtype(dtype))
        experts = None
        if self.options.expert == "both":  # both LoRAs train: the other expert loads now
            assert other is not None  # the folder check refused both without transformer_2/
            parts.other_expert = self._load_transformer(folder, other, dtype)
            experts = ExpertSplit(
                denoisers={HIGH_NOISE: denoiser, LOW_NOISE: parts.other_expert},
                draw=self._draw_expert,
            )
        return LoadedModel(denoiser=denoiser, identity=identity, parts=parts, experts=experts)

    def _choose_expert(self, folder: Path, index: dict[str, Any]) -> tuple[str, str | None]:
        """The transformer subfolder to train and the other expert's (None without one).
        ``check_model_folder`` has refused an expert the folder does not have."""
        expert = self.options.expert
        if not (folder / "transformer_2").is_dir():
            return "transformer", None
        boundary = float(
            index.get("boundary_ratio") or i2v.default_boundary(folder, DEFAULT_BOUNDARY)
        )
        self.boundary = boundary
        if expert == "both":
            if self.options.transformer_file:
                raise ModelLoadError(
                    "model.wan.transformer_file: with model.wan.expert=both both experts load "
                    "from the folder; leave transformer_file empty, or train one expert per run"
                )
            return "transformer", "transformer_2"  # the whole range until a step's draw
        if expert == "high_noise":
            self.timestep_range = (boundary, 1.0)
            return "transformer", "transformer_2"
        self.timestep_range = (0.0, boundary)
        return "transformer_2", "transformer"

    def _load_transformer(
        self, folder: Path, subfolder: str, dtype: torch.dtype
    ) -> WanTransformer3DModel:
        file = self.options.transformer_file
        if not file:
            return WanTransformer3DModel.from_pretrained(
                folder / subfolder, torch_dtype=dtype, local_files_only=True
            )
        single = Path(file).expanduser()
        if not single.is_file():
            raise ModelLoadError(
                f"model.wan.transformer_file: {single} not found; point it at a .safetensors "
                "transformer or leave it empty to use the folder's"
            )
        scaled: list[ScaledLayer] = []
        try:
            denoiser = WanTransformer3DModel.from_single_file(
                read_single_file(single, dtype, scaled=scaled),  # scaled fp8 dequantised
                config=str(folder),
                subfolder=subfolder,
                torch_dtype=dtype,
                local_files_only=True,
            )
        except (ValueError, KeyError, RuntimeError, OSError, SafetensorError) as error:
            raise ModelLoadError(
                f"model.wan.transformer_file: {single} is not a WAN transformer matching "
                f"{folder / subfolder} ({type(error).__name__}: {error}); use a file of the "
                "same model size, or leave it empty"
            ) from error
        keep_scaled_layers(denoiser, scaled, dtype)  # a scaled fp8 file stays in 8 bits
        return denoiser

    # ------------------------------------------------------------------------------ encoders

    @torch.no_grad()
    def encode_images(self, model: WanModel, images: Tensor) -> Tensor:
        """(B, 3, H, W) images or (B, 3, F, H, W) videos in [-1, 1] → (B, C, F', h, w)."""
        vae = self._vae(model, encoder=True)
        video = images.unsqueeze(2) if images.dim() == 4 else images  # image → 1-frame video
        factor = self._pixel_multiple(model)
        height, width = video.shape[-2:]
        if height % factor or width % factor:
            raise ConfigError(
                f"data.resolution: {height}×{width} is not a multiple of {factor} (this model's "
                f"VAE factor × patch size); use a multiple of {factor}"
            )
        param = next(vae.parameters())
        latents = vae.encode(video.to(param.device, param.dtype)).latent_dist.mode()
        mean, std = _latent_stats(model.parts.vae_config, latents)
        return ((latents - mean) / std).float()

    @torch.no_grad()
    def decode_latents(self, model: WanModel, latents: Tensor) -> Tensor:
        """(B, C, F', h, w) → (B, 3, H, W) for one latent frame, else (B, 3, F, H, W); [-1, 1]."""
        vae = self._vae(model, encoder=False)
        param = next(vae.parameters())
        mean, std = _latent_stats(model.parts.vae_config, latents)
        frames = vae.decode((latents * std + mean).to(param.device, param.dtype)).sample
        frames = frames.float().clamp(-1, 1)
        return frames[:, :, 0] if latents.shape[2] == 1 else frames

    @torch.no_grad()
    def encode_prompts(self, model: WanModel, prompts: list[str]) -> TextEncoding:
        """``{"embeds": (B, L, D)}``: padding zeroed, L = the longest prompt's token count."""
        tokenizer, encoder = self._text_encoder(model)
        tokens = tokenizer(
            [_clean_prompt(prompt) for prompt in prompts],
            padding="max_length",
            max_length=TEXT_TOKENS,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = next(encoder.parameters()).device
        mask = tokens.attention_mask.to(device)  # (B, 512)
        hidden = encoder(tokens.input_ids.to(device), mask).last_hidden_state  # (B, 512, D)
        # WAN zeroes the padded positions instead of masking them in cross-attention.
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        length = max(int(mask.sum(dim=1).max()), 1)
        return {"embeds": hidden[:, :length].contiguous()}  # (B, L, D)

    def prompt_token_counts(self, model: WanModel, prompts: list[str]) -> tuple[list[int], int]:
        """Counted with the tokenizer alone: a run whose captions are all cached never loads
        the text encoder."""
        parts = model.parts
        tokenizer = parts.tokenizer
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(
                parts.folder / "tokenizer", local_files_only=True
            )
        ids = tokenizer([_clean_prompt(p) for p in prompts], add_special_tokens=True).input_ids
        return [len(row) for row in ids], TEXT_TOKENS

    def release_encoders(self, model: WanModel, *, keep_decoder: bool) -> None:
        """Free the text encoder and the VAE (its decoder stays for samples), then move the
        transformer to the training device. For samples, the empty prompt (the negative of
        classifier-free guidance) is encoded first."""
        parts = model.parts
        if keep_decoder and parts.negative is None:
            parts.negative = self.encode_prompts(model, [""])
        parts.text_encoder = parts.tokenizer = None
        parts.image_encoder = parts.image_processor = None
        vae = parts.vae
        if vae is not None and keep_decoder:
            vae.encoder = vae.quant_conv = None  # decoding needs post_quant_conv and decoder
        elif vae is not None:
            parts.vae = None
        parts.released = True
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        denoiser_on_device(model)

    def _text_encoder(self, model: WanModel) -> tuple[Any, UMT5EncoderModel]:
        parts = model.parts
        if parts.text_encoder is None:
            folder = parts.folder
            parts.tokenizer = AutoTokenizer.from_pretrained(
                folder / "tokenizer", local_files_only=True
            )
            dtype = text_encoder_dtype(parts.dtype)
            parts.text_encoder = load_frozen(
                UMT5EncoderModel, folder / "text_encoder", parts.device, dtype=dtype
            )
        return parts.tokenizer, parts.text_encoder

    def _vae(self, model: WanModel, *, encoder: bool) -> AutoencoderKLWan:
        parts = model.parts
        vae = parts.vae
        if vae is None or (encoder and vae.encoder is None):
            # float32 as the WAN pipelines run it: the VAE is small and only encodes once.
            vae = AutoencoderKLWan.from_pretrained(
                parts.folder / "vae", torch_dtype=torch.float32, local_files_only=True
            )
            vae = vae.eval().requires_grad_(False).to(parts.device)
            if parts.released and not encoder:
                vae.encoder = vae.quant_conv = None
            parts.vae = vae
        return vae

    def _pixel_multiple(self, model: WanModel) -> int:
        """Frame sides must be multiples of the VAE factor times the transformer's patch."""
        vae = model.parts.vae_config
        return int(vae.get("scale_factor_spatial") or 8) * model.denoiser.config.patch_size[1]

    # ---------------------------------------------------------------------------- training

    def sample_timesteps(
        self, shape: torch.Size, *, generator: torch.Generator, device: torch.device
    ) -> Tensor:
        """Shifted flow timesteps (B,) in (0, 1), within the trained expert's range. WAN's
        shift does not depend on the frame size (``model.wan.flow_shift`` is set per size)."""
        low, high = (_unshift(t, self.flow_shift) for t in self.timestep_range)
        low, high = max(low, T_MIN), min(high, T_MAX)
        u = low + (high - low) * torch.rand(shape[0], generator=generator)
        t = shift_timesteps(u, self.flow_shift)
        if self.boundary is not None and self.timestep_range != (0.0, 1.0):
            # float32 rounding must not carry a draw over the boundary into the other expert.
            lowest_high, highest_low = self._boundary_edges()
            high = self.timestep_range[0] > 0
            t = torch.maximum(t, lowest_high) if high else torch.minimum(t, highest_low)
        return t.to(device)

    def _high_noise(self, timesteps: Tensor) -> Tensor:
        """(B,) bool: the samples the pipeline hands to the high-noise expert, ``t`` at or above
        the boundary compared as ``WanPipeline`` does, on the transformer's 0-1000 scale."""
        assert self.boundary is not None
        return timesteps.float() * 1000 >= self.boundary * 1000

    def _boundary_edges(self) -> tuple[Tensor, Tensor]:
        """The lowest float32 ``t`` of the high-noise expert and the highest of the low-noise
        one (``t`` = the boundary may round either way)."""
        lowest = torch.tensor([self.boundary], dtype=torch.float32)
        up, down = torch.ones(1), torch.zeros(1)
        while not bool(self._high_noise(lowest)):
            lowest = torch.nextafter(lowest, up)
        while bool(self._high_noise(torch.nextafter(lowest, down))):
            lowest = torch.nextafter(lowest, down)
        return lowest, torch.nextafter(lowest, down)

    def _draw_expert(self, generator: torch.Generator) -> str:
        """expert=both: the next optimizer step's expert, high_noise with the probability that
        a shifted ``t`` lies at or above the boundary, so that the steps' timesteps together
        follow WAN's whole distribution; :meth:`sample_timesteps` then draws in its range."""
        assert self.boundary is not None  # both needs two experts, which come with a boundary
        u_boundary = _unshift(self.boundary, self.flow_shift)
        high_share = (T_MAX - max(u_boundary, T_MIN)) / (T_MAX - T_MIN)
        high = float(torch.rand(1, generator=generator)) < high_share
        self.timestep_range = (self.boundary, 1.0) if high else (0.0, self.boundary)
        return HIGH_NOISE if high else LOW_NOISE

    def _predict_by_expert(
        self, model: WanModel, noisy: Tensor, timesteps: Tensor, text: TextEncoding
    ) -> Tensor:
        """expert=both: each sample through the expert its timestep belongs to (at or above the
        boundary: high_noise), that expert alone on the device (the other parked in CPU
        memory). The trainer's steps are of one expert; the drift meter's may mix."""
        assert model.experts is not None and self.boundary is not None
        high = self._high_noise(timesteps.reshape(timesteps.shape[0], -1)[:, 0].cpu())  # (B,)
        out: Tensor | None = None
        for name, rows in ((HIGH_NOISE, high), (LOW_NOISE, ~high)):
            if not bool(rows.any()):
                continue
            expert = self._expert_model(model, name)
            if bool(rows.all()):
                return self.predict(expert, noisy, timesteps, text)
            index = rows.nonzero().squeeze(1).to(noisy.device)
            part = self.predict(expert, noisy[index], timesteps[index], select_text(text, index))
            if out is None:
                out = part.new_zeros((noisy.shape[0], *part.shape[1:]))
            out[index] = part
        assert out is not None
        return out

    def _expert_model(self, model: WanModel, name: str) -> WanModel:
        """``model`` as the expert ``name`` alone, on the device with the others parked."""
        assert model.experts is not None
        denoisers = model.experts.denoisers
        denoiser = denoisers[name]
        switch_denoiser(denoiser, denoisers.values(), model.parts.device)
        if denoiser.training != model.denoiser.training:  # samples and drift: eval, as it
            denoiser.train(model.denoiser.training)
        wrapper = model.wrapper if denoiser is model.denoiser else None
        return replace(model, denoiser=denoiser, wrapper=wrapper, experts=None)

    def predict(
        self, model: WanModel, noisy: Tensor, timesteps: Tensor, text: TextEncoding
    ) -> Tensor:
        """The velocity (B, C, F', h, w) for noisy latents of the same shape (expert=both:
        from the expert each sample's timestep belongs to)."""
        if model.experts is not None:
            return self._predict_by_expert(model, noisy, timesteps, text)
        if self.image_to_video and not i2v.conditioned(text):
            # Only the drift meter's held-out stills come without a first frame.
            raise ConfigError(
                "drift.every: the drift meter measures held-out still images, which give an "
                "image-to-video model no first frame; set drift.every=0 for this model"
            )
        denoiser_on_device(model)
        patch = model.denoiser.config.patch_size[-1]  # the runner may wrap it (DDP, compile)
        runner, dtype = model.runner, model.parts.dtype
        return _forward(runner, dtype, noisy, timesteps, text["embeds"], text, patch=patch)

    def predicted_frames(self, shape: torch.Size) -> Tensor | None:
        """(F',) weights of the latent frames the model predicts, for latents of ``shape``
        (B, C, F', h, w): TI2V image-to-video gives frame 0 (weight 0); None for the others,
        which predict every frame."""
        if not (self.image_to_video and self.form == "ti2v") or len(shape) != 5:
            return None
        return i2v.predicted_frames(shape[2])

    @torch.no_grad()
    def encode_conditioning(
        self, model: WanModel, kind: str, images: Sequence[Tensor], *, frames: int = 1
    ) -> TextEncoding:
        """The first frame ``images[0]`` (3, H, W) of a clip of ``frames`` frames → its
        encodings (:mod:`.image_to_video`): the latent of [frame, black frames] (2.1 / 2.2 I2V)
        and the CLIP embedding (2.1), or the frame's own latent (TI2V)."""
        if kind != "first_frame" or len(images) != 1:
            raise ValueError(f"WAN image-to-video takes one first frame, not {len(images)} {kind}")
        if frames == 1:
            raise ConfigError(
                "data.frames=1: an image-to-video model is given each clip's first frame and "
                "learns the frames after it; set data.frames to 5 or more (4n+1, e.g. 33)"
            )
        parts = model.parts
        vae = self._vae(model, encoder=True)
        ti2v = self.form == "ti2v"
        latent = i2v.encode_first_frame(vae, parts.vae_config, images[0], frames=frames, alone=ti2v)
        if ti2v:
            return {i2v.LATENT_KEY: latent}
        encodings = {i2v.VIDEO_KEY: latent}
        if model.denoiser.config.image_dim:
            encoder, processor = self._image_encoder(model)
            encodings[i2v.IMAGE_KEY] = i2v.encode_image(encoder, processor, images[0])
        return encodings

    def _image_encoder(self, model: WanModel) -> tuple[Any, Any]:
        """WAN 2.1 I2V's CLIP vision encoder (float32, as the VAE) and image processor."""
        parts = model.parts
        if parts.image_encoder is None:
            folder = parts.folder
            parts.image_processor = CLIPImageProcessor.from_pretrained(
                folder / "image_processor", local_files_only=True
            )
            parts.image_encoder = load_frozen(
                CLIPVisionModelWithProjection,
                folder / "image_encoder",
                parts.device,
                dtype=torch.float32,
            )
        return parts.image_encoder, parts.image_processor

    @torch.no_grad()
    def sample(
        self,
        model: WanModel,
        text: TextEncoding,
        *,
        size: tuple[int, int],
        steps: int,
        generator: torch.Generator,
        frames: int = 1,
        conditioning: TextEncoding | None = None,
    ) -> Tensor:
        """``frames`` frames per prompt at ``size`` (1: WAN as a text-to-image model, cheap
        previews, (B, 3, H, W); more: a clip, (B, 3, F, H, W)), with classifier-free guidance
        when the empty prompt was encoded; 2.2 A14B switches experts at the boundary like the
        pipeline. Image-to-video: ``conditioning``, each prompt's start image encoded by
        :meth:`encode_conditioning` at ``size`` and ``frames`` (batch-first)."""
        if self.image_to_video and not conditioning:
            raise ValueError("WAN image-to-video samples need a start image per prompt")
        denoiser_on_device(model)
        parts = model.parts
        embeds = text["embeds"]
        batch = embeds.shape[0]
        vae = parts.vae_config
        scale = int(vae.get("scale_factor_spatial") or 8)
        latent_frames = (frames - 1) // int(vae.get("scale_factor_temporal") or 4) + 1
        channels = model.denoiser.config.out_channels  # I2V reads more (the first frame's)
        shape = (batch, channels, latent_frames, size[1] // scale, size[0] // scale)
        noise = torch.randn(shape, generator=generator)
        negative = parts.negative
        uncond = None if negative is None else negative["embeds"].expand(batch, -1, -1)
        dtype = parts.dtype

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            denoiser = self._expert_for(model, float(t[0]))
            cond = _forward(denoiser, dtype, x, t, embeds, conditioning).float()
            if uncond is None:
                return cond
            free = _forward(denoiser, dtype, x, t, uncond, conditioning).float()
            return free + SAMPLE_GUIDANCE * (cond - free)

        latents = euler_sample(velocity, noise.to(parts.device), steps=steps, shift=self.flow_shift)
        return self.decode_latents(model, i2v.with_first_frame(latents, conditioning))

    def _expert_for(self, model: WanModel, t: float) -> torch.nn.Module:
        """The transformer the pipeline would use at shifted time ``t``."""
        if self.boundary is None:
            return model.denoiser
        high = bool(self._high_noise(torch.tensor([t])))
        if model.experts is not None:  # both trained, each with its LoRA: one on the device
            return self._expert_model(model, HIGH_NOISE if high else LOW_NOISE).denoiser
        trained_high = self.timestep_range[0] > 0
        if high == trained_high:
            return model.denoiser
        parts = model.parts
        if parts.other_expert is None:
            # Loaded on the first sample only: training itself never needs the other expert.
            assert parts.other_subfolder is not None  # a boundary comes with a second expert
            other = WanTransformer3DModel.from_pretrained(
                parts.folder / parts.other_subfolder,
                torch_dtype=parts.dtype,
                local_files_only=True,
            )
            model.prepare_denoiser(other)  # the memory options, as on the trained expert
            parts.other_expert = other.eval().requires_grad_(False).to(parts.device)
        return parts.other_expert


def _forward(
    denoiser: torch.nn.Module,
    dtype: torch.dtype,
    noisy: Tensor,
    t: Tensor,
    embeds: Tensor,
    condition: TextEncoding | None = None,
    *,
    patch: int | None = None,
) -> Tensor:
    """One transformer call: (B, C, F', h, w) latents, t (B,) in (0, 1), prompt (B, L, D), and
    for image-to-video the first frame's encodings (:func:`.image_to_video.denoiser_inputs`)."""
    if embeds.shape[1] < TEXT_TOKENS:
        # The transformer was trained on 512 tokens with zeros after the prompt.
        pad = embeds.new_zeros(embeds.shape[0], TEXT_TOKENS - embeds.shape[1], embeds.shape[2])
        embeds = torch.cat([embeds, pad], dim=1)  # (B, 512, D)
    patch = patch or denoiser.config.patch_size[-1]  # tokens per latent frame (TI2V)
    hidden, timestep, extra = i2v.denoiser_inputs(noisy, t * 1000, condition or {}, patch)
    return denoiser(
        hidden_states=hidden.to(dtype),
        timestep=timestep,  # the transformer's 0-1000 scale; TI2V I2V: one per token
        encoder_hidden_states=embeds.to(dtype),
        **{name: value.to(dtype) for name, value in extra.items()},
        return_dict=False,
    )[0]


def _unshift(t: float, shift: float) -> float:
    """Inverse of ``shift_timesteps``: the uniform draw that shifts to ``t``."""
    return t / (shift - (shift - 1) * t)


def _latent_stats(vae_config: dict[str, Any], like: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std, shaped (1, C, 1, 1, 1) to broadcast over (B, C, F, h, w)."""
    channels = like.shape[1]
    mean = vae_config.get("latents_mean") or [0.0] * channels
    std = vae_config.get("latents_std") or [1.0] * channels
    shape = (1, channels, 1, 1, 1)
    as_tensor = lambda values: torch.tensor(values).view(shape).to(like.device, like.dtype)  # noqa: E731
    return as_tensor(mean), as_tensor(std)


def _clean_prompt(text: str) -> str:
    """As the WAN pipeline cleans prompts: HTML entities decoded, whitespace collapsed."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


def _encoders_identity(folder: Path, text_dtype: torch.dtype) -> str:
    """What the cached latents and prompt encodings depend on: the VAE, the text encoder and
    the tokenizer files (path, size, modification time; WAN 2.1 I2V's image encoder too) and
    the text encoder's dtype, not the transformer. Runs on either A14B expert, or with another
    transformer file, share the cache."""
    head = f"wan:{folder.resolve()}:tokens={TEXT_TOKENS}:text={text_dtype}:"
    encoders = ("vae", "text_encoder", "tokenizer", "image_encoder", "image_processor")
    return head + files_stamp(folder, encoders)  # a T2V folder has no image_encoder/
