"""A content-keyed cache of encoded latents with their masks baked in, reused across runs.

One safetensors file per item at ``cache_dir/<key[:2]>/<key>.safetensors``. The key is the
sha256 of everything the stored tensors depend on: the image bytes, the mask bytes (or
"no-mask"), the caption text, the resolution and the caller's settings (model family, model
identity, codec version, ...); for a clip also the frame count and rate, and for folders of
frames every frame's name and bytes. Editing an image, its mask or its caption, or switching
models, therefore gives a new key and a fresh encode; unchanged items are never encoded again.

Still images are encoded in batches of (3, R, R); a clip with ``frames > 1`` alone as
(1, 3, F, R, R) (see :mod:`modules.data.video`), and with ``frames == 1`` as its first frame,
like a still image.

Stored tensors (all contiguous, on the CPU):

- ``latent``: (C, h, w) or (C, F, h, w), float32 whatever the encoder's dtype, because the
  trainer adds noise and computes targets in float32.
- ``mask``: the mask at latent resolution via :func:`mask_to_latent` (clips:
  :func:`~modules.data.video.clip_mask_to_latent`), (1, h, w) or (1, F, h, w), float32; all
  ones when the image has no mask.
- ``text.<name>``: the caption's prompt encoding, one row of each batch-first tensor, in the
  encoder's dtype (attention masks stay integer).
- ``empty.<name>``: the empty prompt's encoding, used for caption dropout.

The metadata records the source image and mask, the caption, ``has_mask``, ``mask_max`` (the
largest weight of the mask on the latent grid), ``mask_coloured`` (the mask file was not grey)
and the settings. Files are written to a temporary name in the same folder and renamed with
``os.replace``, so a crash never leaves a half-written file under a key's name; a file that is
damaged all the same (a disk error, a copy cut short) is found by its header when the cache is
opened, and encoded again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from modules.atomic import write_bytes_atomic
from modules.data.concept import ConceptItem, DataError, list_frames
from modules.data.images import image_size, load_image, load_mask_with_notes, mask_to_latent
from modules.data.video import (
    clip_frame_indices,
    clip_info,
    clip_mask_to_latent,
    load_clip,
    load_clip_mask,
)

Encoder = Callable[[Tensor], Tensor]
"""(B, 3, R, R) float32 CPU images in [-1, 1] → latents (B, C, h, w) or (B, C, F, h, w); for
video families also (1, 3, F, R, R) clips → (1, C, F', h, w).

The callable moves the batch to its own device and dtype; build_cache runs it under no_grad.
"""
PromptEncoder = Callable[[list[str]], dict[str, Tensor]]
"""B prompts → named batch-first tensors (B, ...)."""
Progress = Callable[[int, int], None]
"""Called with (items encoded so far, items to encode)."""
Warn = Callable[[str], None]
"""Called with a line for the user (a damaged cache file encoded again)."""

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


@dataclass(frozen=True)
class CachedInfo:
    """What a cache file's header says about its item, read without its tensors."""

    has_mask: bool
    mask_max: float
    """The mask's largest weight on the latent grid: 0 for a mask with no weight anywhere."""
    mask_coloured: bool
    """The mask file had colours (not grey levels): its luminance was used."""
    source_mask: str
    latent_frames: int


def cache_key(
    item: ConceptItem,
    *,
    resolution: int,
    settings: Mapping[str, Any],
    frames: int = 1,
    fps: float = 0.0,
) -> str:
    """The sha256 hex digest that names an item's cache file (``frames``, ``fps``: clips only)."""
    digest = hashlib.sha256()
    _update(digest, CACHE_FORMAT.encode())
    _update_content(digest, item.image)
    if item.mask is not None:
        _update_content(digest, item.mask)
    else:
        _update(digest, b"no-mask")
    _update(digest, item.caption.encode("utf-8"))
    _update(digest, str(resolution).encode())
    _update(digest, json.dumps(settings, sort_keys=True, separators=(",", ":")).encode())
    if item.clip:
        _update(digest, f"clip:{frames}:{fps:g}".encode())
    return digest.hexdigest()


def _update(digest: Any, part: bytes) -> None:
    # Length prefixes keep the parts apart: ("ab", "c") and ("a", "bc") must not collide.
    digest.update(len(part).to_bytes(8, "little"))
    digest.update(part)


def _update_content(digest: Any, path: Path) -> None:
    """A file's bytes (streamed: videos can be large), or a frame folder's names and bytes."""
    if path.is_dir():
        inner = hashlib.sha256()
        for frame in list_frames(path):
            _update(inner, frame.name.encode("utf-8"))
            _update_content(inner, frame)
        _update(digest, b"frames:" + inner.digest())
        return
    try:
        with path.open("rb") as file:
            digest.update(os.fstat(file.fileno()).st_size.to_bytes(8, "little"))
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    except OSError as error:
        raise DataError(
            f"cannot read '{path}' ({error.strerror}): it changed after the concept folder was "
            "scanned; scan the folder again"
        ) from error


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
    frames: int = 1,
    fps: float = 0.0,
    warn: Warn | None = None,
) -> list[Path]:
    """Encode the items that are not cached yet; return every item's cache file, in order.

    A cache file that is there but damaged is removed and encoded again, and ``warn`` told.

    Clips train as ``frames`` frames at ``fps`` (see :mod:`modules.data.video`). ``progress`` is
    called with (0, n) before the first batch and after each batch (each clip), where n is the
    number of items to encode; it is not called when everything is cached already.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    paths = [
        cache_path(
            cache_dir,
            cache_key(item, resolution=resolution, settings=settings, frames=frames, fps=fps),
        )
        for item in items
    ]
    # Keyed by path so an image listed twice (e.g. in two concepts) is encoded once.
    missing = {
        path: item
        for path, item in zip(paths, items, strict=True)
        if not path.exists() or not _usable(path, item, warn)
    }
    if not missing:
        return paths
    todo = list(missing.items())
    if progress is not None:
        progress(0, len(todo))
    metadata = {"format": CACHE_FORMAT, "settings": json.dumps(settings, sort_keys=True)}
    # Stills (and 1-frame clips) batch together; longer clips are encoded one at a time.
    stills = [entry for entry in todo if not entry[1].clip or frames == 1]
    clips = [entry for entry in todo if entry[1].clip and frames > 1]
    done = 0
    with torch.no_grad():
        empty = _rows(encode_prompts([""]), 1, "empty prompt")[0]
        for start in range(0, len(stills), batch_size):
            batch = stills[start : start + batch_size]
            _encode_batch(batch, resolution, encode_images, encode_prompts, empty, metadata)
            done += len(batch)
            if progress is not None:
                progress(done, len(todo))
        for path, item in clips:
            clip = _ClipRequest(item, resolution, frames, fps)
            _encode_clip(path, clip, encode_images, encode_prompts, empty, metadata)
            done += 1
            if progress is not None:
                progress(done, len(todo))
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
    if not _is_cache_file(metadata, tensors.keys()):
        raise DataError(f"'{path}' is not a {CACHE_FORMAT} file: the next run encodes it again")
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
    return cached_info(path).has_mask


def cached_info(path: Path) -> CachedInfo:
    """A cache file's :class:`CachedInfo`, from its header (files from before ``mask_max`` was
    recorded: from the mask tensor)."""
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            shape = file.get_slice("latent").get_shape()
            if "mask_max" in metadata:
                mask_max = float(metadata["mask_max"])
            else:
                mask_max = float(file.get_tensor("mask").amax())
    except (OSError, SafetensorError, ValueError) as error:
        raise _unreadable(path, error) from error
    return CachedInfo(
        has_mask=metadata.get("has_mask") == "1",
        mask_max=mask_max,
        mask_coloured=metadata.get("mask_coloured") == "1",
        source_mask=metadata.get("source_mask", ""),
        latent_frames=shape[1] if len(shape) == 4 else 1,
    )


def _usable(path: Path, item: ConceptItem, warn: Warn | None) -> bool:
    """Whether an existing cache file can be read; a damaged one is removed (and said)."""
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            names = set(file.keys())
        if not _is_cache_file(metadata, names):
            raise ValueError(f"not a {CACHE_FORMAT} file")
    except (OSError, SafetensorError, ValueError) as error:
        if warn is not None:
            warn(f"cache file {path} of '{item.image}' is damaged ({error}): encoding it again")
        path.unlink(missing_ok=True)
        return False
    return True


def _is_cache_file(metadata: Mapping[str, str], names: Iterable[str]) -> bool:
    return metadata.get("format") == CACHE_FORMAT and {"latent", "mask"} <= set(names)


def _unreadable(path: Path, error: Exception) -> DataError:
    return DataError(
        f"cannot read cache file '{path}' ({error}): it changed or was damaged during the run; "
        "start the run again, which encodes it again"
    )


def _encode_batch(
    batch: list[tuple[Path, ConceptItem]],
    resolution: int,
    encode_images: Encoder,
    encode_prompts: PromptEncoder,
    empty: dict[str, Tensor],
    metadata: dict[str, str],
) -> None:
    images = torch.stack([_still_pixels(item, resolution) for _, item in batch])  # (B,3,R,R)
    latents = encode_images(images)
    if latents.dim() not in (4, 5) or latents.shape[0] != len(batch):
        raise ValueError(
            f"image encoder returned shape {tuple(latents.shape)} for {len(batch)} images; "
            "expected (B, C, h, w) or (B, C, F, h, w)"
        )
    texts = _rows(encode_prompts([item.caption for _, item in batch]), len(batch), "captions")
    for (path, item), latent, text in zip(batch, latents, texts, strict=True):
        mask, coloured = _latent_mask(item, resolution, latent.shape)
        item_metadata = {**metadata, "mask_coloured": "1" if coloured else "0"}
        _write_item(path, item, latent, mask, text, empty, item_metadata)


@dataclass(frozen=True)
class _ClipRequest:
    item: ConceptItem
    resolution: int
    frames: int
    fps: float


def _encode_clip(
    path: Path,
    clip: _ClipRequest,
    encode_images: Encoder,
    encode_prompts: PromptEncoder,
    empty: dict[str, Tensor],
    metadata: dict[str, str],
) -> None:
    item, resolution = clip.item, clip.resolution
    info = clip_info(item.image)
    indices = clip_frame_indices(item.image, info, clip.frames, clip.fps)
    pixels = load_clip(item.image, indices, resolution)  # (3, F, R, R)
    latents = encode_images(pixels.unsqueeze(0))  # (1, C, F', h, w)
    if latents.dim() != 5 or latents.shape[0] != 1:
        raise ValueError(
            f"image encoder returned shape {tuple(latents.shape)} for one clip of "
            f"{clip.frames} frames; expected (1, C, F', h, w): this model family trains "
            "images only, set data.frames=1"
        )
    latent = latents[0]  # (C, F', h, w)
    size = (latent.shape[-2], latent.shape[-1])
    if item.mask is None:
        mask = torch.ones(1, latent.shape[1], *size)
    else:
        full = load_clip_mask(item.mask, item.image, info, indices, resolution)  # (1, F, R, R)
        mask = clip_mask_to_latent(full, size, latent.shape[1])  # (1, F', h, w)
    text = _rows(encode_prompts([item.caption]), 1, "captions")[0]
    metadata = {**metadata, "frames": str(clip.frames), "source_frames": json.dumps(indices)}
    _write_item(path, item, latent, mask, text, empty, metadata)


def _write_item(
    path: Path,
    item: ConceptItem,
    latent: Tensor,
    mask: Tensor,
    text: dict[str, Tensor],
    empty: dict[str, Tensor],
    metadata: dict[str, str],
) -> None:
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
        "mask_max": repr(float(mask.amax())),
    }
    _write_atomic(path, tensors, item_metadata)


def _still_pixels(item: ConceptItem, resolution: int) -> Tensor:
    """(3, R, R): the image, or a clip's first frame."""
    if not item.clip:
        return load_image(item.image, resolution)
    return load_clip(item.image, [0], resolution)[:, 0]  # (3, 1, R, R) → (3, R, R)


def _still_mask(item: ConceptItem, resolution: int) -> tuple[Tensor, bool]:
    """(1, R, R): the image's mask, or the mask of a clip's first frame (item.mask is set); and
    whether the mask image is coloured rather than grey (known for mask images only)."""
    assert item.mask is not None
    if not item.clip:
        mask, notes = load_mask_with_notes(item.mask, image_size(item.image), resolution)
        return mask, notes.coloured
    info = clip_info(item.image)
    return load_clip_mask(item.mask, item.image, info, [0], resolution)[:, 0], False


def _latent_mask(
    item: ConceptItem, resolution: int, latent_shape: torch.Size
) -> tuple[Tensor, bool]:
    """The item's mask on the latent grid, (1, h, w) or (1, F, h, w) for a (C, F, h, w) latent,
    and whether the mask file was coloured."""
    size = (latent_shape[-2], latent_shape[-1])
    coloured = False
    if item.mask is None:
        mask = torch.ones(1, *size)
    else:
        still, coloured = _still_mask(item, resolution)
        mask = mask_to_latent(still, size)  # (1, R, R) → (1, h, w)
    if len(latent_shape) == 4:
        # Video latents: the still mask applies to every latent frame.
        mask = mask.unsqueeze(1).expand(1, latent_shape[1], *size)  # (1, F, h, w)
    return mask, coloured


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
    write_bytes_atomic(path, data)


def _strip_prefix(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {
        name[len(prefix) :]: value for name, value in tensors.items() if name.startswith(prefix)
    }
