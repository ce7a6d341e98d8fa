"""The ``sdxl`` family: SDXL base and fine-tune LoRAs from a local diffusers folder or a single
``.safetensors`` checkpoint in the original layout.

The folder is the diffusers layout (as ``StableDiffusionXLPipeline.save_pretrained`` writes it,
e.g. a download of ``stabilityai/stable-diffusion-xl-base-1.0``)::

    unet/            UNet2DConditionModel (text_time additional conditioning)
    vae/             AutoencoderKL, 4 latent channels, scaling factor 0.13025, no shift
    text_encoder/    CLIPTextModel (CLIP ViT-L)                tokenizer/    CLIPTokenizer
    text_encoder_2/  CLIPTextModelWithProjection (OpenCLIP bigG) tokenizer_2/ CLIPTokenizer
    scheduler/       scheduler_config.json: betas, prediction_type, timestep spacing

A single-file checkpoint (``model.path`` a file, as A1111 and ComfyUI load them) is read once
through diffusers' single-file conversion with the configs and tokenizers of
``model.sdxl.config_folder`` (:func:`modules.models.sdxl.config_folder_of`); nothing is fetched.

As ``StableDiffusionXLPipeline`` does:

- Latents: ``z * scaling_factor`` of the VAE posterior's mode (deterministic, so the cache holds
  one latent per image), (B, 4, H/8, W/8); the VAE runs in float32 (it overflows in float16).
- Prompts: the penultimate hidden states of both encoders (77 tokens each), concatenated along
  the features, and text_encoder_2's projected pooled output.
- Size and crop conditioning: each item's ``add_time_ids`` (original height and width, the
  crop's top and left in the resized image, the training height and width), from how the
  buckets made it (:meth:`SdxlFamily.encode_conditioning`); a batch without them (the drift
  meter, the samples) gets an uncropped image of the latents' size, the pipeline's default.
- Noise: DDPM's discrete timesteps 0..T-1 over the scheduler config's betas (rescaled to zero
  terminal SNR with ``model.sdxl.zero_terminal_snr``), uniform in training;
  ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) n`` with the cumulative alpha ``a_t``; the target is the
  noise ``n`` (epsilon) or ``v = sqrt(a_t) n - sqrt(1 - a_t) x_0`` (v_prediction).
- Samples: the folder's Euler scheduler, classifier-free guidance ``model.sdxl.sample_cfg``
  against the pipeline's negative (zeros when ``force_zeros_for_empty_prompt``, SDXL's default).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
)
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from modules.models.base import ComfyConverter, LoadedModel, ModelLoadError, TextEncoding
from modules.models.model_folder import (
    FolderParts,
    check_model_folder,
    denoiser_on_device,
    files_stamp,
    free_encoders,
    frozen_vae,
    load_frozen,
    read_model_json,
)
from modules.models.sdxl import LORA_TARGETS, SIZE_CROP, SdxlOptions, config_folder_of
from modules.models.sdxl.comfyui import to_comfyui
from modules.models.spec import ItemGeometry

TEXT_PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
PREDICTIONS = ("epsilon", "v_prediction")

Encoders = tuple[CLIPTokenizer, CLIPTextModel, CLIPTokenizer, CLIPTextModelWithProjection]


@dataclass(kw_only=True)
class SdxlParts(FolderParts):
    """What a loaded SDXL keeps beside its UNet (the folder, device, dtype and VAE of
    :class:`FolderParts`; ``folder`` gives the configs and tokenizers, for a single file its
    config folder)."""

    encoders: Encoders | None = None
    """Both tokenizers and text encoders: a folder's load on first use, a single file's with
    the UNet; freed by ``release_encoders``."""
    zero_negative: bool = True
    """The samples' negative prompt is zeros (``force_zeros_for_empty_prompt``)."""
    negative: TextEncoding | None = None
    """The empty prompt encoded before the encoders are freed, where it is not zeros."""


SdxlModel = LoadedModel[SdxlParts]


class SdxlFamily:
    """SDXL text-to-image, with its options (``model.sdxl``)."""

    name = "sdxl"
    loss_layout = "video"

    def __init__(self, options: SdxlOptions | None = None) -> None:
        self.options = options if options is not None else SdxlOptions()
        self.scheduler_config: dict[str, Any] = {}
        self.prediction = "epsilon"
        self.alphas_cumprod = _alphas_cumprod({}, zero_terminal_snr=False)
        """(T,) the cumulative alphas of the training schedule; set by ``load``."""

    def lora_targets(self, model: LoadedModel) -> dict[str, list[str]]:
        return {name: list(modules) for name, modules in LORA_TARGETS.items()}

    def blocks(self, denoiser: torch.nn.Module) -> list[torch.nn.Module]:
        """The UNet's down blocks, mid block and up blocks (7 for SDXL, of uneven sizes): what
        the quantised storage forms and ``blocks_to_swap`` act on. SDXL's UNet (2.6B weights,
        about 5 GB in bfloat16) fits most GPUs whole, so block swap is rarely worth its cost."""
        return [*denoiser.down_blocks, denoiser.mid_block, *denoiser.up_blocks]

    def lora_loader(self, model: LoadedModel) -> type:
        """StableDiffusionXLPipeline's LoRA loader, told this UNet's config so that files with
        the original (sgm) block names, as kohya's and this trainer's ComfyUI files have,
        convert as the pipeline's ``load_lora_weights`` converts them."""
        unet_config = model.denoiser.config

        class _Loader(StableDiffusionXLLoraLoaderMixin):
            @classmethod
            def lora_state_dict(cls, pretrained_model_name_or_path_or_dict, **kwargs):
                kwargs.setdefault("unet_config", unet_config)
                return super().lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)

        return _Loader

    def comfyui_converter(self, model: LoadedModel) -> ComfyConverter:
        """kohya's names (``lora_unet_<sgm module>``, ``lora_down`` / ``lora_up`` / ``alpha``),
        which ComfyUI, A1111 and diffusers load for SDXL."""
        layers = model.denoiser.config.layers_per_block
        return lambda state, alpha: to_comfyui(state, alpha, layers_per_block=layers)

    # ---------------------------------------------------------------------------------- load

    def load(self, path: str, *, dtype: torch.dtype, device: torch.device) -> SdxlModel:
        """The UNet to train, on the CPU until ``release_encoders``. A folder's VAE and text
        encoders load on first use; a single file's are built with the UNet, from one read."""
        checked = check_model_folder(path, "sdxl", self.options)
        single = checked.is_file()
        folder = config_folder_of(checked, self.options) if single else checked
        parts = SdxlParts(
            folder=folder,
            device=torch.device(device),
            dtype=dtype,
            vae_config=read_model_json(folder / "vae" / "config.json") or {},
        )
        if single:
            denoiser = self._load_single_file(checked, parts)
        else:
            denoiser = UNet2DConditionModel.from_pretrained(
                folder / "unet", torch_dtype=dtype, local_files_only=True
            )
        self._read_schedule(folder)
        index = read_model_json(folder / "model_index.json") or {}
        parts.zero_negative = bool(index.get("force_zeros_for_empty_prompt", True))
        identity = _identity(checked, folder, dtype)
        return LoadedModel(denoiser=denoiser, identity=identity, parts=parts)

    def _read_schedule(self, folder: Path) -> None:
        config = read_model_json(folder / "scheduler" / "scheduler_config.json") or {}
        chosen = self.options.prediction
        prediction = (config.get("prediction_type") or "epsilon") if chosen == "auto" else chosen
        if prediction not in PREDICTIONS:
            raise ModelLoadError(
                f"model.sdxl.prediction: {folder / 'scheduler' / 'scheduler_config.json'} says "
                f"prediction_type={prediction!r}, which this family does not train; set "
                "model.sdxl.prediction to epsilon or v_prediction"
            )
        self.scheduler_config = dict(config)
        self.prediction = prediction
        self.alphas_cumprod = _alphas_cumprod(
            config, zero_terminal_snr=self.options.zero_terminal_snr
        )

    def _load_single_file(self, file: Path, parts: SdxlParts) -> UNet2DConditionModel:
        """The UNet, the VAE and both text encoders of a checkpoint in the original layout,
        converted by diffusers with the config folder's configs."""
        config, dtype = str(parts.folder), parts.dtype
        try:
            state = load_file(str(file))
            denoiser = UNet2DConditionModel.from_single_file(
                state, config=config, subfolder="unet", torch_dtype=dtype, local_files_only=True
            )
            parts.vae = (
                AutoencoderKL.from_single_file(
                    state,
                    config=config,
                    subfolder="vae",
                    torch_dtype=torch.float32,
                    local_files_only=True,
                )
                .eval()
                .requires_grad_(False)
            )
            encoders = [
                create_diffusers_clip_model_from_ldm(
                    encoder_class,
                    state,
                    subfolder=subfolder,
                    config=config,
                    torch_dtype=dtype,
                    local_files_only=True,
                ).requires_grad_(False)
                for encoder_class, subfolder in (
                    (CLIPTextModel, "text_encoder"),
                    (CLIPTextModelWithProjection, "text_encoder_2"),
                )
            ]
        except (ValueError, KeyError, RuntimeError, OSError, SafetensorError) as error:
            raise ModelLoadError(
                f"model.path: {file} is not an SDXL checkpoint matching the configs of "
                f"{parts.folder} ({type(error).__name__}: {str(error)[:300]}); give the "
                "checkpoint's own architecture in model.sdxl.config_folder"
            ) from error
        del state
        tokenizers = [
            CLIPTokenizer.from_pretrained(parts.folder / name, local_files_only=True)
            for name in ("tokenizer", "tokenizer_2")
        ]
        parts.encoders = (tokenizers[0], encoders[0], tokenizers[1], encoders[1])
        return denoiser

    # ------------------------------------------------------------------------------ encoders

    @torch.no_grad()
    def encode_images(self, model: SdxlModel, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, 4, H/8, W/8)."""
        vae = self._vae(model)
        latents = vae.encode(images.to(vae.device, torch.float32)).latent_dist.mode()
        return (latents * model.parts.vae_config.get("scaling_factor", 0.13025)).float()

    @torch.no_grad()
    def decode_latents(self, model: SdxlModel, latents: Tensor) -> Tensor:
        vae = self._vae(model)
        latents = latents / model.parts.vae_config.get("scaling_factor", 0.13025)
        return vae.decode(latents.to(vae.device, torch.float32)).sample.float().clamp(-1, 1)

    @torch.no_grad()
    def encode_prompts(self, model: SdxlModel, prompts: list[str]) -> TextEncoding:
        """``{"embeds": (B, 77, D1 + D2), "pooled": (B, P)}``: both encoders' penultimate
        hidden states side by side, and text_encoder_2's projected pooled output."""
        tokenizer, encoder, tokenizer_2, encoder_2 = self._encoders(model)
        hidden = []
        for tok, enc in ((tokenizer, encoder), (tokenizer_2, encoder_2)):
            ids = tok(
                prompts,
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            out = enc(ids.to(next(enc.parameters()).device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        pooled = out.text_embeds  # text_encoder_2's
        return {"embeds": torch.cat(hidden, dim=-1).float(), "pooled": pooled.float()}

    def prompt_token_counts(self, model: SdxlModel, prompts: list[str]) -> tuple[list[int], int]:
        tokenizer = CLIPTokenizer.from_pretrained(
            model.parts.folder / "tokenizer", local_files_only=True
        )
        return [len(ids) for ids in tokenizer(prompts).input_ids], tokenizer.model_max_length

    def encode_conditioning(
        self,
        model: SdxlModel,
        kind: str,
        images: list[Tensor],
        *,
        frames: int = 1,
        geometry: ItemGeometry | None = None,
    ) -> TextEncoding:
        """``{"time_ids": (1, 6)}``: (original height, original width, crop top, crop left,
        target height, target width), as SDXL was trained (the crop's top-left in the pixels of
        the original resized to cover the training size, as kohya's sd-scripts computes it).
        Without ``geometry``: an uncropped item of its own size."""
        if kind != SIZE_CROP.name:
            raise ValueError(f"the sdxl family has no conditioning kind {kind!r}")
        if geometry is None:
            height, width = images[0].shape[-2:]
            return {"time_ids": _time_ids(height, width, 1)}
        (original_w, original_h), (left, top, right, _), (width, height) = (
            geometry.original,
            geometry.crop,
            geometry.size,
        )
        scale = width / (right - left) if right > left else 1.0
        values = [original_h, original_w, round(top * scale), round(left * scale), height, width]
        return {"time_ids": torch.tensor([values], dtype=torch.float32)}

    def release_encoders(self, model: SdxlModel, *, keep_decoder: bool) -> None:
        """Free both text encoders (and the VAE unless samples are decoded), then move the UNet
        to the training device. A negative prompt that is not zeros is encoded first."""
        parts = model.parts
        if keep_decoder and not parts.zero_negative and parts.negative is None:
            parts.negative = self.encode_prompts(model, [""])
        parts.encoders = None
        free_encoders(model, keep_decoder=keep_decoder)

    def _encoders(self, model: SdxlModel) -> Encoders:
        parts = model.parts
        if parts.encoders is None:
            loaded: list[Any] = []
            for tokenizer, encoder, encoder_class in (
                ("tokenizer", "text_encoder", CLIPTextModel),
                ("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection),
            ):
                folder = parts.folder
                loaded.append(
                    CLIPTokenizer.from_pretrained(folder / tokenizer, local_files_only=True)
                )
                loaded.append(
                    load_frozen(encoder_class, folder / encoder, parts.device, dtype=parts.dtype)
                )
            parts.encoders = tuple(loaded)  # type: ignore[assignment]
        for encoder in parts.encoders[1::2]:  # a single file's were built on the CPU
            encoder.to(parts.device)
        return parts.encoders

    def _vae(self, model: SdxlModel) -> AutoencoderKL:
        vae = frozen_vae(model.parts, AutoencoderKL)
        return vae.to(model.parts.device)

    # ---------------------------------------------------------------------------- training

    def sample_timesteps(
        self, shape: torch.Size, *, generator: torch.Generator, device: torch.device
    ) -> Tensor:
        """Uniform discrete timesteps 0..T-1 (as float), drawn on the CPU generator."""
        count = len(self.alphas_cumprod)
        return torch.randint(0, count, (shape[0],), generator=generator).float().to(device)

    def timesteps_from_fractions(self, fractions: Tensor, shape: torch.Size) -> Tensor:
        """The timesteps whose noise level matches flow matching's at ``fractions``: the same
        signal-to-noise ratio, ``a_t / (1 - a_t) = ((1 - f) / f)^2`` (the nearest timestep in
        log SNR). With SDXL's schedule 0.25 is timestep 95, 0.5 is 354 and 0.75 is 673: uniform
        timesteps spend about two thirds of the training above half noise."""
        f = fractions.detach().double().cpu().clamp(1e-6, 1 - 1e-6)
        wanted = 2 * torch.log((1 - f) / f)  # (B,) log SNR of the interpolation
        cumulative = self.alphas_cumprod.double()
        log_snr = torch.log(cumulative) - torch.log1p(-cumulative)  # (T,), falling
        rising = -log_snr
        after = torch.searchsorted(rising, -wanted).clamp(1, len(rising) - 1)
        before = after - 1
        nearer = (rising[after] + wanted).abs() < (rising[before] + wanted).abs()
        steps = torch.where(nearer, after, before)
        raw = fractions.detach().cpu()  # the ends are the schedule's ends (a gate of 0..1: all)
        steps = torch.where(raw >= 1, len(rising) - 1, torch.where(raw <= 0, 0, steps))
        return steps.to(fractions.device, torch.float32)

    def noisy_input_and_target(
        self, latents: Tensor, noise: Tensor, timesteps: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``sqrt(a_t) x_0 + sqrt(1 - a_t) n`` and the noise (epsilon) or v."""
        index = timesteps.long().to(self.alphas_cumprod.device)
        cumulative = self.alphas_cumprod[index].to(latents.device, latents.dtype)
        shape = (-1,) + (1,) * (latents.ndim - 1)
        signal, sigma = cumulative.sqrt().view(shape), (1 - cumulative).sqrt().view(shape)
        noisy = signal * latents + sigma * noise
        if self.prediction == "v_prediction":
            return noisy, signal * noise - sigma * latents
        return noisy, noise

    def predict(
        self, model: SdxlModel, noisy: Tensor, timesteps: Tensor, text: TextEncoding
    ) -> Tensor:
        """The UNet's prediction (noise or v) (B, 4, h, w) for noisy latents of that shape."""
        denoiser_on_device(model)
        dtype = model.parts.dtype
        time_ids = text.get("time_ids")
        if time_ids is None:  # no item conditioning: an uncropped image of the latents' size
            scale = self._vae_scale(model)
            height, width = noisy.shape[-2] * scale, noisy.shape[-1] * scale
            time_ids = _time_ids(height, width, noisy.shape[0])
        return model.runner(
            noisy.to(dtype),
            timesteps,
            encoder_hidden_states=text["embeds"].to(dtype),
            added_cond_kwargs={
                "text_embeds": text["pooled"].to(dtype),
                "time_ids": time_ids.to(noisy.device, dtype),
            },
            return_dict=False,
        )[0]

    @staticmethod
    def _vae_scale(model: SdxlModel) -> int:
        return 2 ** (len(model.parts.vae_config.get("block_out_channels") or [0] * 4) - 1)

    @torch.no_grad()
    def sample(
        self,
        model: SdxlModel,
        text: TextEncoding,
        *,
        size: tuple[int, int],
        steps: int,
        generator: torch.Generator,
    ) -> Tensor:
        """The pipeline's sampler: the folder's Euler scheduler (``trailing`` spacing with zero
        terminal SNR), classifier-free guidance ``sample_cfg`` against the negative prompt, an
        uncropped image of ``size`` in ``add_time_ids``."""
        denoiser_on_device(model)
        device = model.parts.device
        scheduler = self._sampler()
        scheduler.set_timesteps(steps, device=device)
        batch = text["embeds"].shape[0]
        scale = self._vae_scale(model)
        channels = model.denoiser.config.in_channels
        shape = (batch, channels, size[1] // scale, size[0] // scale)
        latents = torch.randn(shape, generator=generator).to(device) * scheduler.init_noise_sigma
        conditions = {
            "embeds": text["embeds"].to(device),
            "pooled": text["pooled"].to(device),
            "time_ids": _time_ids(size[1], size[0], batch).to(device),
        }
        guidance = self.options.sample_cfg
        if guidance > 1:
            negative = model.parts.negative
            if model.parts.zero_negative or negative is None:
                negative = {key: torch.zeros_like(conditions[key]) for key in ("embeds", "pooled")}
            conditions = {  # (2B, ...): the negative half first, as the pipeline does
                key: torch.cat([negative[key].to(device).expand_as(value), value])
                for key, value in conditions.items()
                if key != "time_ids"
            } | {"time_ids": conditions["time_ids"].repeat(2, 1)}
        for t in scheduler.timesteps:
            x = torch.cat([latents] * 2) if guidance > 1 else latents
            x = scheduler.scale_model_input(x, t)
            step = t.expand(x.shape[0])
            prediction = self.predict(model, x, step, conditions).float()
            if guidance > 1:
                unconditional, conditional = prediction.chunk(2)
                prediction = unconditional + guidance * (conditional - unconditional)
            latents = scheduler.step(prediction, t, latents, return_dict=False)[0]
        return self.decode_latents(model, latents)

    def _sampler(self) -> EulerDiscreteScheduler:
        overrides: dict[str, Any] = {"prediction_type": self.prediction}
        if self.options.zero_terminal_snr:
            overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        return EulerDiscreteScheduler.from_config({**self.scheduler_config, **overrides})


def _alphas_cumprod(config: dict[str, Any], *, zero_terminal_snr: bool) -> Tensor:
    """(T,) the cumulative alphas of the scheduler config's betas, as DDPMScheduler computes
    them (``rescale_betas_zero_snr``: the last one exactly 0)."""
    known = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    settings = {key: config[key] for key in known if config.get(key) is not None}
    scheduler = DDPMScheduler(**settings, rescale_betas_zero_snr=zero_terminal_snr)
    return scheduler.alphas_cumprod.float()


def _time_ids(height: int | float, width: int | float, batch: int) -> Tensor:
    """(batch, 6) ``add_time_ids`` of an uncropped image of that size at that size."""
    row = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
    return row.repeat(batch, 1)


def _identity(path: Path, folder: Path, dtype: torch.dtype) -> str:
    """What the cached latents and prompt encodings depend on: the VAE, both text encoders and
    tokenizers (path, size, modification time; a single file's own stamp) and the dtype, not
    the UNet."""
    head = f"sdxl:{path.resolve()}:dtype={dtype}:"
    if path.is_file():
        stat = path.stat()
        return head + f"{stat.st_size}:{stat.st_mtime_ns}:" + files_stamp(folder, TEXT_PARTS[1::2])
    return head + files_stamp(folder, ("vae", *TEXT_PARTS))
