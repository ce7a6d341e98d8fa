"""What every family that loads a local diffusers folder does the same way: check the folder's
parts, read its JSON files, stamp the files a cache depends on, keep what it loads beside the
denoiser in a :class:`FolderParts` of its own, and move the denoiser to the training device once
the encoders are gone."""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor

from modules.models.base import LoadedModel, ModelLoadError
from modules.models.base_weights import ScaledLayer, keep_scaled_layers, read_single_file
from modules.models.folder_check import FolderProblem, check_folder
from modules.models.registry import family_spec


@dataclass(kw_only=True)
class FolderParts:
    """What every family that loads a local diffusers folder keeps beside its denoiser; each
    family's own parts (``WanParts``, ``Flux1Parts``, ...) add its encoders to these."""

    folder: Path
    """The model folder, read when a part loads on first use."""
    device: torch.device
    """The training device: the denoiser moves there once the text encoders are freed."""
    dtype: torch.dtype
    """The base model's dtype (the text encoders: :func:`text_encoder_dtype` of it)."""
    vae_config: dict[str, Any]
    """The VAE's ``config.json`` (latent statistics, scale factors), read without the VAE."""
    vae: Any = None
    """The VAE, loaded on first use; dropped by ``release_encoders`` unless samples decode."""
    released: bool = False
    """Whether ``release_encoders`` ran (the text encoders are gone)."""


def check_model_folder(path: str, family: str, options: Any = None) -> Path:
    """The folder at ``path``, read as a ``family`` model folder before anything is built
    (:mod:`modules.models.folder_check`: its parts, another family's or variant's folder, the
    family's own checks with its ``options``); a ModelLoadError naming the field and the fix
    otherwise."""
    try:
        folder = check_folder(family_spec(family), path, options)
    except FolderProblem as problem:
        raise ModelLoadError(str(problem)) from None
    assert folder is not None  # an empty path is refused by families that need one
    return folder


def read_model_json(path: Path) -> dict[str, Any] | None:
    """A model folder's JSON file; None when it is absent, a ModelLoadError naming the file
    when it cannot be read (a corrupt config must not silently become the defaults)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"model.path: cannot read {path} ({error}); repair or re-download the file"
        ) from error


def files_stamp(folder: Path, parts: tuple[str, ...]) -> str:
    """Path, size and modification time of every file in ``parts``: what a cache of their
    outputs is keyed by (re-encoded when one changes)."""
    return ",".join(
        sorted(
            f"{p.relative_to(folder)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
            for part in parts
            for p in (folder / part).rglob("*")
            if p.is_file()
        )
    )


def denoiser_on_device(model: LoadedModel[FolderParts]) -> None:
    """Move the denoiser to ``model.parts.device`` (families keep it on the CPU until the
    text encoders are freed, so the two never share the GPU)."""
    device = model.parts.device
    if next(model.denoiser.parameters()).device != device:
        model.denoiser.to(device)


def free_encoders(model: LoadedModel[FolderParts], *, keep_decoder: bool) -> None:
    """After the family dropped its text encoders: drop ``model.parts.vae`` unless samples are
    decoded, free their memory, and move the denoiser to the training device (a family's
    ``release_encoders`` once the cache is filled)."""
    parts = model.parts
    if not keep_decoder:
        parts.vae = None
    parts.released = True
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    denoiser_on_device(model)


def load_transformer(
    transformer_class: Any,
    folder: Path,
    dtype: torch.dtype,
    *,
    file: str,
    field: str,
    what: str,
    rename: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Any:
    """The folder's ``transformer/``, or with ``file`` set that single-file transformer on the
    folder's config (``from_single_file(state, config=folder, subfolder="transformer")``, the
    file's tensors read by :func:`read_single_file`, which dequantises ComfyUI's scaled fp8
    layers to ``dtype``, and passed through ``rename`` when given); the layers a scaled fp8 file
    stored that way stay in 8 bits (:func:`keep_scaled_layers`). A file that does not fit is a
    ModelLoadError naming ``field`` (the option) and ``what`` it must be."""
    if not file:
        return transformer_class.from_pretrained(
            folder / "transformer", torch_dtype=dtype, local_files_only=True
        )
    path = Path(file).expanduser()
    scaled: list[ScaledLayer] = []
    try:
        state = read_single_file(path, dtype, scaled=scaled)
        denoiser = transformer_class.from_single_file(
            state if rename is None else rename(state),
            config=str(folder),
            subfolder="transformer",
            torch_dtype=dtype,
            local_files_only=True,
        )
    except (ValueError, KeyError, RuntimeError, OSError, SafetensorError) as error:
        raise ModelLoadError(
            f"{field}: {path} is not {what} matching {folder / 'transformer'} "
            f"({type(error).__name__}: {error}); use such a file, or leave it empty"
        ) from error
    del state  # the dequantised tensors: the denoiser has its own now
    keep_scaled_layers(denoiser, scaled, dtype)
    return denoiser


def load_frozen(model_class: Any, folder: Path, device: torch.device, **options: Any) -> Any:
    """A part of the base model (a VAE, a text encoder) from ``folder``, offline, in eval mode,
    its weights frozen, on ``device``."""
    loaded = model_class.from_pretrained(folder, local_files_only=True, **options)
    return loaded.eval().requires_grad_(False).to(device)


def frozen_vae(parts: FolderParts, vae_class: Any) -> Any:
    """The folder's VAE in float32, loaded on first use and kept in ``parts.vae``."""
    if parts.vae is None:
        folder = parts.folder / "vae"
        parts.vae = load_frozen(vae_class, folder, parts.device, torch_dtype=torch.float32)
    return parts.vae


@torch.no_grad()
def encode_shifted(vae: Any, vae_config: dict[str, Any], images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] → ``(z - shift_factor) * scaling_factor`` of the posterior's mode
    (deterministic, so the cache holds one latent per item), float32: FLUX.1's VAE, which
    FLUX.1, Kontext, Chroma and Z-Image share."""
    param = next(vae.parameters())
    latents = vae.encode(images.to(param.device, param.dtype)).latent_dist.mode()
    return ((latents - vae_config["shift_factor"]) * vae_config["scaling_factor"]).float()


@torch.no_grad()
def decode_shifted(vae: Any, vae_config: dict[str, Any], latents: Tensor) -> Tensor:
    """The inverse of :func:`encode_shifted`: latents → (B, 3, H, W) in [-1, 1], float32."""
    param = next(vae.parameters())
    latents = latents / vae_config["scaling_factor"] + vae_config["shift_factor"]
    return vae.decode(latents.to(param.device, param.dtype)).sample.float().clamp(-1, 1)


def text_encoder_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a text encoder runs in: the base dtype, but bfloat16 for float16, which the
    large language-model encoders (T5, UMT5, Qwen, Mistral) overflow in."""
    return torch.bfloat16 if dtype == torch.float16 else dtype
