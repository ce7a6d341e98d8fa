"""A content-keyed cache of encoded latents with their masks baked in, reused across runs.

One safetensors file per item at ``cache_dir/<key[:2]>/<key>.safetensors``. The key is the
sha256 of everything the stored tensors depend on: the image bytes, the mask bytes (or
"no-mask"), the caption text, the resolution and the caller's settings (model family, model
identity, codec version, ...). Editing an image, its mask or its caption, or switching models,
therefore gives a new key and a fresh encode; unchanged items are never encoded again.

Stored tensors (all contiguous, on the CPU):

- ``latent``: (C, h, w) or (C, F, h, w), float32 whatever the encoder's dtype, because the
  trainer adds noise and computes targets in float32.
- ``mask``: the mask at latent resolution via :func:`mask_to_latent`, (1, h, w) or (1, F, h, w),
  float32; all ones when the image has no mask.
- ``text.<name>``: the caption's prompt encoding, one row of each batch-first tensor, in the
  encoder's dtype (attention masks stay integer).
- ``empty.<name>``: the empty prompt's encoding, used for caption dropout.

The metadata records the source image and mask, the caption, ``has_mask`` and the settings.
Files are written to a temporary name in the same folder and renamed with ``os.replace``, so a
crash never leaves a half-written file under a key's name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from modules.data.concept import ConceptItem, DataError
from modules.data.images import image_size, load_image, load_mask, mask_to_latent

Encoder = Callable[[Tensor], Tensor]
"""(B, 3, R, R) float32 CPU images in [-1, 1] → latents (B, C, h, w) or (B, C, F, h, w).

The callable moves the batch to its own device and dtype; build_cache runs it under no_grad.
"""
PromptEncoder = Callable[[list[str]], dict[str, Tensor]]
"""B prompts → named batch-first tensors (B, ...)."""
Progress = Callable[[int, int], None]
"""Called with (items encoded so far, items to encode)."""

CACHE_FORMAT = "maskprior-latent-cache-v1"
"""Part of every key and every file's metadata: bump it when the stored layout changes."""
_TEXT_PREFIX = "text."
_EMPTY_PREFIX = "empty."


@dataclass(frozen=True)
class CachedSample:
    latent: Tensor
    """(C, h, w) or (C, F, h, w), float32."""
    mask: Tensor
    """(1, h, w) or (1, F, h, w) weights in [0, 1]; all ones when ``has_mask`` is False."""
    text: dict[str, Tensor]
    """The caption's encoding, per tensor without the batch dimension."""
    empty_text: dict[str, Tensor]
    """The empty prompt's encoding, same layout as ``text``."""
    has_mask: bool
    source: str
    """The image file the latent was encoded from."""


def cache_key(item: ConceptItem, *, resolution: int, settings: Mapping[str, Any]) -> str:
    """The sha256 hex digest that names an item's cache file."""
    digest = hashlib.sha256()
    parts = (
        CACHE_FORMAT.encode(),
        _read_bytes(item.image),
        _read_bytes(item.mask) if item.mask is not None else b"no-mask",
        item.caption.encode("utf-8"),
        str(resolution).encode(),
        json.dumps(settings, sort_keys=True, separators=(",", ":")).encode(),
    )
    for part in parts:
        # Length prefixes keep the parts apart: ("ab", "c") and ("a", "bc") must not collide.
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


def cache_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / key[:2] / f"{key}.safetensors"


def build_cache(
    items: list[ConceptItem],
    *,
    resolution: int,
    cache_dir: Path,
    settings: Mapping[str, Any],
    encode_images: Encoder,
    encode_prompts: PromptEncoder,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> list[Path]:
    """Encode the items that are not cached yet; return every item's cache file, in order.

    ``progress`` is called with (0, n) before the first batch and after each batch, where n is
    the number of items to encode; it is not called when everything is cached already.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    paths = [
        cache_path(cache_dir, cache_key(item, resolution=resolution, settings=settings))
        for item in items
    ]
    # Keyed by path so an image listed twice (e.g. in two concepts) is encoded once.
    missing = {path: item for path, item in zip(paths, items, strict=True) if not path.exists()}
    if not missing:
        return paths
    todo = list(missing.items())
    if progress is not None:
        progress(0, len(todo))
    metadata = {"format": CACHE_FORMAT, "settings": json.dumps(settings, sort_keys=True)}
    with torch.no_grad():
        empty = _rows(encode_prompts([""]), 1, "empty prompt")
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            _encode_batch(batch, resolution, encode_images, encode_prompts, empty[0], metadata)
            if progress is not None:
                progress(start + len(batch), len(todo))
    return paths


def load_cached(path: Path) -> CachedSample:
    """Read one cache file written by :func:`build_cache`."""
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            # safe_open is not iterable, so .keys() is needed here.
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    except (OSError, SafetensorError) as error:
        raise _unreadable(path, error) from error
    if metadata.get("format") != CACHE_FORMAT or "latent" not in tensors or "mask" not in tensors:
        raise DataError(
            f"'{path}' is not a {CACHE_FORMAT} file: delete it, it is re-encoded on the next run"
        )
    return CachedSample(
        latent=tensors["latent"],
        mask=tensors["mask"],
        text=_strip_prefix(tensors, _TEXT_PREFIX),
        empty_text=_strip_prefix(tensors, _EMPTY_PREFIX),
        has_mask=metadata.get("has_mask") == "1",
        source=metadata.get("source_image", ""),
    )


def cached_has_mask(path: Path) -> bool:
    """Whether a cache file's image had a mask, reading only the file's header."""
    try:
        with safe_open(str(path), framework="pt") as file:
            return (file.metadata() or {}).get("has_mask") == "1"
    except (OSError, SafetensorError) as error:
        raise _unreadable(path, error) from error


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise DataError(
            f"cannot read '{path}' ({error.strerror}): it changed after the concept folder was "
            "scanned; scan the folder again"
        ) from error


def _unreadable(path: Path, error: Exception) -> DataError:
    return DataError(
        f"cannot read cache file '{path}' ({error}): delete it if it exists; the next run "
        "re-encodes it"
    )


def _encode_batch(
    batch: list[tuple[Path, ConceptItem]],
    resolution: int,
    encode_images: Encoder,
    encode_prompts: PromptEncoder,
    empty: dict[str, Tensor],
    metadata: dict[str, str],
) -> None:
    images = torch.stack([load_image(item.image, resolution) for _, item in batch])  # (B,3,R,R)
    latents = encode_images(images)
    if latents.dim() not in (4, 5) or latents.shape[0] != len(batch):
        raise ValueError(
            f"image encoder returned shape {tuple(latents.shape)} for {len(batch)} images; "
            "expected (B, C, h, w) or (B, C, F, h, w)"
        )
    texts = _rows(encode_prompts([item.caption for _, item in batch]), len(batch), "captions")
    for (path, item), latent, text in zip(batch, latents, texts, strict=True):
        mask = _latent_mask(item, resolution, latent.shape)
        tensors = {
            "latent": latent.float(),
            "mask": mask,
            **{_TEXT_PREFIX + name: value for name, value in text.items()},
            **{_EMPTY_PREFIX + name: value for name, value in empty.items()},
        }
        item_metadata = {
            **metadata,
            "source_image": str(item.image),
            "source_mask": str(item.mask) if item.mask is not None else "",
            "caption": item.caption,
            "has_mask": "1" if item.mask is not None else "0",
        }
        _write_atomic(path, tensors, item_metadata)


def _latent_mask(item: ConceptItem, resolution: int, latent_shape: torch.Size) -> Tensor:
    """The item's mask on the latent grid: (1, h, w), or (1, F, h, w) for a (C, F, h, w) latent."""
    size = (latent_shape[-2], latent_shape[-1])
    if item.mask is None:
        mask = torch.ones(1, *size)
    else:
        full = load_mask(item.mask, image_size(item.image), resolution)  # (1, R, R)
        mask = mask_to_latent(full, size)  # (1, h, w)
    if len(latent_shape) == 4:
        # Video latents: the still mask applies to every latent frame.
        mask = mask.unsqueeze(1).expand(1, latent_shape[1], *size)  # (1, F, h, w)
    return mask


def _rows(encoding: Mapping[str, Tensor], count: int, what: str) -> list[dict[str, Tensor]]:
    """Split a batch-first prompt encoding into ``count`` per-sample dicts."""
    for name, value in encoding.items():
        if value.dim() == 0 or value.shape[0] != count:
            raise ValueError(
                f"prompt encoder returned '{name}' with shape {tuple(value.shape)} for "
                f"{count} {what}; expected batch-first tensors ({count}, ...)"
            )
    return [{name: value[index] for name, value in encoding.items()} for index in range(count)]


def _write_atomic(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    # clone(): each tensor gets its own compact CPU storage; safetensors refuses shared storage
    # and a row of a batch would otherwise be a view into the whole batch.
    data = safetensors_bytes(
        {
            name: value.detach().to("cpu").clone(memory_format=torch.contiguous_format)
            for name, value in tensors.items()
        },
        metadata=metadata,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary file sits in the same folder so os.replace is an atomic rename.
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _strip_prefix(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {
        name[len(prefix) :]: value for name, value in tensors.items() if name.startswith(prefix)
    }
