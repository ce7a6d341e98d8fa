"""Start a run's LoRA from an existing LoRA file (``lora.init_from``), in any layout the
family's diffusers loader reads: this trainer's diffusers and ComfyUI files, and the other
layouts the family's pipeline ``load_lora_weights`` takes (kohya, BFL, ...).

The file is read exactly as the family's pipeline reads it: its loader's ``lora_state_dict``
converts it to diffusers names, and the denoiser's ``load_lora_adapter`` loads it as a second,
temporary adapter, so each layer's update ``s · B @ A`` (``s`` = alpha / rank) is what
diffusers would apply. That update is then rewritten into the run's own adapter, of rank ``r``
and scale ``alpha / r``, and the temporary adapter is deleted. The optimizer starts fresh.

Rewriting an update without forming the (out × in) matrix: with ``B = Q_b R_b`` and
``Aᵀ = Q_a R_a`` (QR), ``B @ A = Q_b (R_b R_aᵀ) Q_aᵀ``, and the SVD of the small k × k matrix
``R_b R_aᵀ = U S Vᵀ`` gives ``B @ A = (Q_b U) S (Q_a V)ᵀ``. The new factors split ``S`` evenly:
``B' = Q_b U √(S s / s')``, ``A' = √(S s / s') (Q_a V)ᵀ``. A file whose updates have rank at most
``r`` is reproduced to float precision, whatever its own rank: a FLUX.2 ComfyUI file, whose fused
qkv layers come back from diffusers' converter at rank 3r, still holds rank-r updates per
projection. Where an update's rank exceeds ``r``, its ``r`` largest directions are kept, and the
share of the update kept is reported. Rows of the new ``A`` beyond the update's rank keep their
fresh random start (with ``B``'s columns 0) so that they still learn.
"""

from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError, safe_open
from torch import Tensor

from modules.lora.lora import _ADAPTER_LAYERS, lora_prefix

ADAPTER = "default"
"""The run's adapter (``add_lora``)."""
TEMPORARY = "init_from"
RANK_TOLERANCE = 1e-6
"""Singular values below this share of a layer's largest count as zero."""


class InitFromError(ValueError):
    """A ``lora.init_from`` file that cannot start this run; the message names it and the fix."""


@dataclass(frozen=True)
class InitReport:
    path: Path
    layers: int
    """Layers of the run's adapter the file's updates were written into."""
    fresh: int
    """Layers of the run's adapter the file has nothing for: they start as a new LoRA does."""
    file_rank: int
    """The largest rank of the file's updates (what ``lora.rank`` needs to hold them exactly)."""
    kept: float
    """The smallest share (Frobenius norm) of a layer's update the run's rank kept: 1.0 when
    every update fit."""

    def lines(self, rank: int) -> list[str]:
        said = [
            f"LoRA starts from {self.path}: {self.layers} layers"
            + (f", {self.fresh} layers it has nothing for start fresh" if self.fresh else "")
        ]
        if self.kept < 1.0 - 1e-4:
            said.append(
                f"warning: lora.init_from: its updates have rank up to {self.file_rank} and "
                f"lora.rank={rank} keeps {self.kept:.1%} of the least kept layer; set "
                f"lora.rank={self.file_rank} to start from it exactly"
            )
        return said


def lora_file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be a LoRA file (before any model loads), or None."""
    path = Path(path).expanduser()
    if not path.is_file():
        return f"lora.init_from: '{path}' is not a file; give a LoRA .safetensors file"
    try:
        with safe_open(str(path), framework="pt") as file:
            keys = list(file.keys())
    except (SafetensorError, OSError) as error:
        return f"lora.init_from: {path} is not a readable .safetensors file ({error})"
    if not any("lora" in key or key.endswith(".alpha") for key in keys):
        return (
            f"lora.init_from: {path} holds no LoRA weights (none of its {len(keys)} tensors is "
            "named lora_A/lora_B, lora_down/lora_up or alpha); is it a full model file?"
        )
    return None


def init_lora_from(
    denoiser: torch.nn.Module, path: str | os.PathLike[str], loader: type
) -> InitReport:
    """Write the updates of the LoRA file ``path`` into ``denoiser``'s adapter (``add_lora``'s),
    in place, so the optimizer's parameters stay the same tensors. ``loader``: the family's
    diffusers LoRA loader (``ModelFamily.lora_loader``)."""
    path = Path(path).expanduser()
    problem = lora_file_problem(path)
    if problem:
        raise InitFromError(problem)
    state, alphas, metadata = _read(loader, path)
    prefix = lora_prefix(denoiser)
    ours = {name: m for name, m in denoiser.named_modules() if _has(m, ADAPTER)}
    theirs = _modules_of(state, prefix)
    if not theirs:
        raise InitFromError(
            f"lora.init_from: {path} has no LoRA for this model's {type(denoiser).__name__} "
            f"('{prefix}.' layers); is it a LoRA for another model family?"
        )
    # A converter may give back layers the file has no update for (a FLUX.2 ComfyUI file's
    # fused qkv where only q and k trained: v's B is zero); those need no adapter here.
    for name in theirs - set(ours):
        if _is_zero(state, prefix, name):
            state = {k: v for k, v in state.items() if not k.startswith(f"{prefix}.{name}.")}
    theirs = _modules_of(state, prefix)
    missing = sorted(theirs - set(ours))
    if missing:
        raise InitFromError(
            f"lora.init_from: {path} trains {len(missing)} layers the run's lora.targets do not "
            f"(e.g. {missing[0]}); choose lora.targets that include them"
        )
    trainable = [p for p in denoiser.parameters() if p.requires_grad]
    try:
        with warnings.catch_warnings():  # peft's note that the model now has two adapters
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            denoiser.load_lora_adapter(
                state,
                prefix=prefix,
                adapter_name=TEMPORARY,
                network_alphas=alphas,
                metadata=metadata,
            )
    except (ValueError, RuntimeError, KeyError) as error:
        _drop_temporary(denoiser, trainable)
        raise InitFromError(
            f"lora.init_from: {path} does not fit this model ({type(error).__name__}: "
            f"{str(error)[:300]}); is it a LoRA for this model and size?"
        ) from None
    file_rank, kept = 0, 1.0
    try:
        with torch.no_grad():
            for name in sorted(theirs):
                rank, share = _rewrite(ours[name])
                file_rank, kept = max(file_rank, rank), min(kept, share)
    finally:
        _drop_temporary(denoiser, trainable)
    return InitReport(path, len(theirs), len(ours) - len(theirs), file_rank, kept)


def _read(loader: type, path: Path) -> tuple[dict[str, Tensor], Any, Any]:
    """The file through the loader's ``lora_state_dict``: (state, network alphas, metadata)."""
    wanted = inspect.signature(loader.lora_state_dict).parameters
    kwargs: dict[str, Any] = {"return_lora_metadata": True}
    if "return_alphas" in wanted:
        kwargs["return_alphas"] = True
    try:
        out = loader.lora_state_dict(str(path), **kwargs)
    except (ValueError, KeyError, RuntimeError) as error:
        raise InitFromError(
            f"lora.init_from: {path} is in a layout this model family's loader does not read "
            f"({type(error).__name__}: {str(error)[:300]})"
        ) from None
    if not isinstance(out, tuple):
        return out, None, None
    if len(out) == 3:
        return out
    state, second = out
    if kwargs.get("return_alphas"):
        return state, second, None
    return state, None, second


def _modules_of(state: dict[str, Tensor], prefix: str) -> set[str]:
    start = prefix + "."
    return {
        key[len(start) : key.index(".lora_A")]
        for key in state
        if key.startswith(start) and ".lora_A" in key
    }


def _is_zero(state: dict[str, Tensor], prefix: str, name: str) -> bool:
    """Whether the layer's update B @ A is zero (one of its factors is)."""
    factors = [v for k, v in state.items() if k.startswith(f"{prefix}.{name}.lora_")]
    return any(not bool(factor.any()) for factor in factors)


def _has(module: torch.nn.Module, adapter: str) -> bool:
    return isinstance(module, LoraLayer) and adapter in module.lora_A


def _rewrite(layer: LoraLayer) -> tuple[int, float]:
    """The temporary adapter's update written into the run's; (its rank, share kept)."""
    a_old, b_old = layer.lora_A[TEMPORARY].weight, layer.lora_B[TEMPORARY].weight
    a_new, b_new = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    # Convolutions: A (k, in, kh, kw) and B (out, k, 1, 1) are matrices (k, in·kh·kw), (out, k).
    a = a_old.detach().double().cpu().reshape(a_old.shape[0], -1)
    b = b_old.detach().double().cpu().reshape(b_old.shape[0], -1)
    scale = float(layer.scaling[TEMPORARY]) / float(layer.scaling[ADAPTER])
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    rank = int((s > RANK_TOLERANCE * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    r = a_new.shape[0]
    keep = min(rank, r)
    energy = float((s**2).sum())
    share = 1.0 if energy == 0 else float((s[:keep] ** 2).sum() / energy) ** 0.5
    root = (s[:keep] * scale).sqrt()
    b_rows = (q_b @ u[:, :keep]) * root  # (out, keep)
    a_rows = root[:, None] * (vh[:keep] @ q_a.T)  # (keep, in·kh·kw)
    new_b = torch.zeros(b_new.shape[0], r, dtype=torch.float64)
    new_b[:, :keep] = b_rows
    new_a = a_new.detach().double().cpu().reshape(r, -1).clone()
    new_a[:keep] = a_rows
    a_new.copy_(new_a.reshape(a_new.shape).to(a_new.dtype))
    b_new.copy_(new_b.reshape(b_new.shape).to(b_new.dtype))
    return rank, share


def _drop_temporary(denoiser: torch.nn.Module, trainable: list[torch.nn.Parameter]) -> None:
    """Delete the temporary adapter and leave the run's exactly as ``add_lora`` made it: active,
    and its parameters (only those) trainable."""
    denoiser.set_adapter(ADAPTER)
    if any(_has(m, TEMPORARY) for m in denoiser.modules()):
        denoiser.delete_adapters(TEMPORARY)
    for param in denoiser.parameters():
        param.requires_grad_(False)
    for param in trainable:
        param.requires_grad_(True)
    _ADAPTER_LAYERS.pop(denoiser, None)
