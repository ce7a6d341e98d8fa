"""peft LoRA on a diffusers denoiser: attach, switch off for the teacher, save, load.

A LoRA adds to a frozen linear layer ``W`` the low-rank update ``(alpha / r) * B @ A`` with
``A`` (r × in) random and ``B`` (out × r) zero at the start, so the LoRA model equals the base
model at step 0. Switching the adapter off (``lora_disabled``) removes the update exactly: the
teacher then *is* the base model, which is what masked prior preservation needs.

Files are saved in the diffusers layout or in the layout ComfyUI loads for the family (the
family's ``comfyui_converter``, e.g. :mod:`modules.models.wan.comfyui`); :func:`load_lora` reads
the diffusers layout, and the others through the family's diffusers loader (``lora_loader``).
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from diffusers.models.modeling_utils import ModelMixin
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from modules.atomic import replacing

ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # the key diffusers reads rank/alpha from
PREFIX = "transformer"
UNET_PREFIX = "unet"


def lora_prefix(denoiser: ModelMixin) -> str:
    """The key prefix diffusers' pipelines give this denoiser's LoRA: ``unet.`` for a UNet
    (Stable Diffusion's loaders), ``transformer.`` for a transformer (WAN, FLUX, Qwen-Image)."""
    return UNET_PREFIX if type(denoiser).__name__.startswith("UNet") else PREFIX


def add_lora(
    denoiser: ModelMixin, *, rank: int, alpha: float, dropout: float, target_modules: list[str]
) -> list[torch.nn.Parameter]:
    """Freeze the base, add one LoRA adapter, upcast its weights to float32; return them."""
    denoiser.requires_grad_(False)
    config = PeftLoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        init_lora_weights=True,
    )
    denoiser.add_adapter(config)
    trainable = [p for p in denoiser.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(
            f"lora.targets: no layer of {type(denoiser).__name__} matches {target_modules}"
        )
    for param in trainable:
        # Low-precision LoRA weights lose small updates; the base may stay in bf16.
        param.data = param.data.float()
    return trainable


@contextmanager
def lora_disabled(denoiser: ModelMixin) -> Iterator[None]:
    """Run the base model: every LoRA adapter of ``denoiser`` is off inside, back on after.

    The only way the teacher pass switches the adapter off. ``try/finally`` puts the adapter back
    even when the teacher forward raises, so a failed step never leaves the student as the base.

    It switches each adapter layer as diffusers' ``disable_adapters`` / ``enable_adapters`` do
    (peft's ``BaseTunerLayer.enable_adapters``), but over the layers found once per denoiser:
    those walk every module and check the installed peft version on each call, which costs a
    large share of a small model's step.

    Denoisers joined by :func:`join_adapters` (the experts of WAN 2.2 A14B trained in one run)
    are one base model: switching off any of them switches off all.
    """
    layers = [layer for each in _joined(denoiser) for layer in _adapter_layers(each)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


_ADAPTER_LAYERS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[BaseTunerLayer, ...]] = (
    weakref.WeakKeyDictionary()
)


def join_adapters(denoisers: list[torch.nn.Module]) -> None:
    """Make ``denoisers`` (each with its LoRA) one base model for :func:`lora_disabled`: the
    teacher and the base samples of a model whose experts each train a LoRA run every expert
    without its LoRA, whichever one the caller holds. (Weak references: a denoiser holds no
    other alive.)"""
    for denoiser in denoisers:
        denoiser._joined_adapters = tuple(weakref.ref(each) for each in denoisers)


def _joined(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """``denoiser`` and the denoisers joined to it (:func:`join_adapters`)."""
    joined = getattr(denoiser, "_joined_adapters", None)
    if joined is None:
        return [denoiser]
    return [each for each in (ref() for ref in joined) if each is not None]


def _adapter_layers(denoiser: torch.nn.Module) -> tuple[BaseTunerLayer, ...]:
    """The denoiser's peft adapter layers, looked up once (a LoRA is added once per run)."""
    layers = _ADAPTER_LAYERS.get(denoiser)
    if layers is None:
        layers = tuple(m for m in denoiser.modules() if isinstance(m, BaseTunerLayer))
        if not layers:
            raise ValueError("lora_disabled: the denoiser has no LoRA adapter to switch off")
        _ADAPTER_LAYERS[denoiser] = layers
    return layers


def lora_state_dict(denoiser: ModelMixin) -> dict[str, torch.Tensor]:
    """The adapter weights in the diffusers layout: ``transformer.<module>.lora_A.weight``
    (``unet.`` for a UNet)."""
    state = get_peft_model_state_dict(denoiser)
    prefix = lora_prefix(denoiser)
    return {
        f"{prefix}.{key}": value.detach().float().contiguous().cpu() for key, value in state.items()
    }


def _adapter_metadata(denoiser: ModelMixin) -> dict[str, object]:
    config = denoiser.peft_config["default"].to_dict()
    plain = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    return {f"{lora_prefix(denoiser)}.{key}": value for key, value in plain.items()}


class NonFiniteLoraError(ValueError):
    """A LoRA with NaN or infinite weights: never written, since it would only break a model."""


def save_lora(
    denoiser: ModelMixin,
    path: str | os.PathLike[str],
    *,
    family: str,
    config_json: str,
    layout: Literal["diffusers", "comfyui"] = "diffusers",
    comfyui: Callable[[dict[str, torch.Tensor], float], dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write the LoRA as safetensors, atomically: a crash mid-write keeps the previous file.
    Non-finite weights are refused (``NonFiniteLoraError``), so no such file is ever written.

    ``layout="diffusers"``: the metadata carries what diffusers needs to rebuild the adapter
    (``lora_adapter_metadata``: rank, alpha, target modules). ``layout="comfyui"``: the
    family's ComfyUI names from ``comfyui`` (its ``comfyui_converter``, which this layout
    needs) and no adapter metadata (diffusers would apply alpha twice after converting). Both
    carry, for people, the rank, alpha, family, layout and the whole resolved training config.
    """
    path = Path(path)
    if layout == "comfyui" and comfyui is None:
        raise ValueError(
            "save_lora: layout='comfyui' needs the family's converter (comfyui=, the family's "
            "comfyui_converter)"
        )
    peft_config = denoiser.peft_config["default"]
    state = lora_state_dict(denoiser)
    broken = [name for name, tensor in state.items() if not torch.isfinite(tensor).all()]
    if broken:
        raise NonFiniteLoraError(
            f"the LoRA has non-finite weights ({len(broken)} of {len(state)} tensors, e.g. "
            f"{broken[0]}); it was not written to {path}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": "pt",
        "maskprior.family": family,
        "maskprior.layout": layout,
        "maskprior.rank": str(peft_config.r),
        "maskprior.alpha": str(peft_config.lora_alpha),
        "maskprior.config": config_json,
    }
    if layout == "comfyui" and comfyui is not None:
        state = comfyui(state, peft_config.lora_alpha)
    else:
        metadata[ADAPTER_METADATA_KEY] = json.dumps(_adapter_metadata(denoiser), sort_keys=True)
    with replacing(path) as temporary:
        save_file(state, str(temporary), metadata=metadata)
    return path


def load_lora(
    denoiser: ModelMixin,
    path: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    loader: type | None = None,
) -> None:
    """Load a saved LoRA file into ``denoiser`` through diffusers' own LoRA loading.

    A diffusers-layout file (keys under the denoiser's prefix) loads as it is. A file in another
    layout (e.g. ComfyUI's) is converted by ``loader``, the family's diffusers LoRA loader
    (``family.lora_loader(model)``), whose ``lora_state_dict`` folds each module's alpha / rank
    into the weights, as the family's pipeline does.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: LoRA file not found")
    prefix = lora_prefix(denoiser)
    with safe_open(str(path), framework="pt") as file:
        keys = list(file.keys())
    if all(key.startswith(f"{prefix}.") for key in keys):
        denoiser.load_lora_adapter(
            str(path.parent),
            weight_name=path.name,
            prefix=prefix,
            adapter_name=adapter_name,
            local_files_only=True,
        )
        return
    if loader is None:
        raise ValueError(
            f"{path}: not a diffusers-layout LoRA of this {type(denoiser).__name__} (keys "
            f"outside '{prefix}.'); load it with the family's LoRA loader (loader=)"
        )
    state = loader.lora_state_dict(str(path))
    denoiser.load_lora_adapter(state, prefix=prefix, adapter_name=adapter_name)
