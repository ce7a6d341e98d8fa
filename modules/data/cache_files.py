"""The cache's files: where each kind lives, the keys that name them, and reading and writing
them. What goes in them is made by :mod:`modules.data.latent_cache`.

Four kinds of safetensors file, at ``cache_dir/<kind>/<key[:2]>/<key>.safetensors``:

- ``latents/``: ``latent`` (C, h, w) or (C, F, h, w), float32 whatever the encoder's dtype
  (the trainer adds noise and computes targets in float32). Keyed by the image's (or clip's)
  bytes (for folders of frames every frame's name and bytes), the training size (the bucket;
  the crop follows from it and the image), for clips the frame count and rate (and a window's
  first frame, for every window but the clip's first: ``data.frame_windows``), and the caller's
  settings (model family, model identity, codec version).
- ``text/``: the prompt encoding of one caption (each batch-first tensor's row, in the encoder's
  dtype; attention masks stay integer), keyed by the caption text and the settings: one file per
  distinct caption, the empty prompt (caption dropout) once.
- ``masks/``: the mask on the latent grid, (1, h, w) or (1, F, h, w), float32, keyed by the
  mask's bytes and its latent's key. An image without a mask has no mask file: it trains with
  an all-ones mask.
- ``conditioning/``: one item's encodings of one conditioning kind its family declares (a
  clip's first frame, an edit's reference images; :class:`modules.models.spec.ConditioningKind`),
  each tensor without the batch dimension, keyed by the kind, its source files' bytes in order
  (for the item's own file also its training size, frame count and window) and the settings
  (the encoder's identity):
  items with the same sources share one file. Families without conditioning have none.

Files are written to a temporary name in the same folder and renamed, so a crash never leaves a
half-written file under a key's name. Files of the earlier layout (one file per item directly
under two-letter folders) are not read (see :func:`old_layout_files`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from modules.atomic import write_bytes_atomic
from modules.data.buckets import Size
from modules.data.concept import ConceptItem, DataError, list_frames

CACHE_FORMAT = "maskprior-cache-v2"
"""Part of every key and every file's metadata: bump it when the stored layout changes."""
LATENTS, TEXTS, MASKS, CONDITIONING = "latents", "text", "masks", "conditioning"


@dataclass(frozen=True)
class CachedItem:
    """One training item's cache files."""

    latent: Path
    text: Path
    """The caption's encoding."""
    empty: Path
    """The empty prompt's encoding (caption dropout)."""
    mask: Path | None
    """None: the image has no mask (all ones)."""
    size: Size
    """(width, height) in pixels the item trains at (its bucket)."""
    source: Path
    """The image (or clip) file."""
    conditioning: tuple[Path, ...] = ()
    """One file per conditioning kind of the family (none for most families)."""


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
    conditioning: dict[str, Tensor] = field(default_factory=dict)
    """The item's conditioning encodings, every kind's, per tensor without the batch
    dimension; empty for a family without conditioning."""


@dataclass(frozen=True)
class CachedInfo:
    """What an item's cache file headers say, read without their tensors."""

    has_mask: bool
    mask_max: float
    """The mask's largest weight on the latent grid: 0 for a mask with no weight anywhere."""
    mask_coloured: bool
    """The mask file had colours (not grey levels): its luminance was used."""
    source_mask: str
    latent_shape: tuple[int, ...]
    """(C, h, w) or (C, F, h, w)."""

    @property
    def latent_frames(self) -> int:
        return self.latent_shape[1] if len(self.latent_shape) == 4 else 1


# ------------------------------------------------------------------------------------ keys


def latent_key(
    item: ConceptItem,
    *,
    size: Size,
    settings: Mapping[str, Any],
    frames: int = 1,
    fps: float = 0.0,
) -> str:
    """The sha256 hex digest naming an item's latent file (``frames``, ``fps`` and the
    window's ``item.start``: clips only; a clip's first window keeps the key it had before
    windows existed)."""
    digest = _digest(LATENTS)
    _update_content(digest, item.image)
    _update(digest, f"{size[0]}x{size[1]}".encode())
    _update(digest, _settings_bytes(settings))
    if item.clip:
        _update(digest, f"clip:{frames}:{fps:g}".encode())
        if item.start:
            _update(digest, f"window:{item.start}".encode())
    return digest.hexdigest()


def text_key(caption: str, *, settings: Mapping[str, Any]) -> str:
    """The sha256 hex digest naming a caption's prompt-encoding file."""
    digest = _digest(TEXTS)
    _update(digest, caption.encode("utf-8"))
    _update(digest, _settings_bytes(settings))
    return digest.hexdigest()


def mask_key(mask: Path, *, latent: str) -> str:
    """The sha256 hex digest naming a mask's file: its bytes and its latent's key (which
    holds the image, its geometry, the frames and the model)."""
    digest = _digest(MASKS)
    _update_content(digest, mask)
    _update(digest, latent.encode())
    return digest.hexdigest()


def conditioning_key(
    kind: str,
    sources: Iterable[Path],
    *,
    settings: Mapping[str, Any],
    size: Size | None = None,
    frames: int = 1,
    first_frame: int = 0,
    caption: str | None = None,
) -> str:
    """The sha256 hex digest naming one item's encodings of the conditioning ``kind``: its
    source files' bytes in order, the training size they were loaded at (None: their own), the
    item's frame count (a clip's first frame conditions that many frames), the source frame a
    window of a clip begins at (``first_frame``: the frame its encoding is made of), the
    item's caption for a kind encoded with it, and the settings (family, model identity, codec:
    the encoder)."""
    digest = _digest(CONDITIONING)
    _update(digest, kind.encode("utf-8"))
    for source in sources:
        _update_content(digest, source)
    _update(digest, b"own size" if size is None else f"{size[0]}x{size[1]}".encode())
    if frames != 1:  # keys of stills and references stay as they were
        _update(digest, f"frames={frames}".encode())
    if first_frame:  # a clip's first window keeps its key
        _update(digest, f"first frame={first_frame}".encode())
    if caption is not None:  # a kind with_caption (an edit model's prompt with its references)
        _update(digest, b"caption")
        _update(digest, caption.encode("utf-8"))
    _update(digest, _settings_bytes(settings))
    return digest.hexdigest()


def cache_path(cache_dir: Path, kind: str, key: str) -> Path:
    return Path(cache_dir) / kind / key[:2] / f"{key}.safetensors"


def _digest(kind: str) -> Any:
    digest = hashlib.sha256()
    _update(digest, CACHE_FORMAT.encode())
    _update(digest, kind.encode())
    return digest


def _settings_bytes(settings: Mapping[str, Any]) -> bytes:
    return json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()


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


# ------------------------------------------------------------------------------------ read


def load_cached(item: CachedItem) -> CachedSample:
    """Read one item's files written by :func:`build_cache`."""
    latent = _read(item.latent, "latent")["latent"]
    if item.mask is not None:
        mask = _read(item.mask, "mask")["mask"]
    else:
        mask = torch.ones(1, *latent.shape[1:])
    conditioning: dict[str, Tensor] = {}
    for path in item.conditioning:
        for name, value in _read(path, CONDITIONING).items():
            if name in conditioning:
                raise DataError(
                    f"cache file '{path}' holds '{name}', which another conditioning kind of "
                    "the family holds too: the family must name its kinds' tensors apart"
                )
            conditioning[name] = value
    return CachedSample(
        latent=latent,
        mask=mask,
        text=_read(item.text, "text"),
        empty_text=_read(item.empty, "text"),
        has_mask=item.mask is not None,
        source=str(item.source),
        conditioning=conditioning,
    )


def cached_info(item: CachedItem) -> CachedInfo:
    """An item's :class:`CachedInfo`, from its files' headers."""
    shape = latent_shape(item.latent)
    if item.mask is None:
        return CachedInfo(False, 1.0, False, "", shape)
    metadata = _header(item.mask)
    return CachedInfo(
        has_mask=True,
        mask_max=float(metadata.get("mask_max", "1")),
        mask_coloured=metadata.get("mask_coloured") == "1",
        source_mask=metadata.get("source_mask", ""),
        latent_shape=shape,
    )


def old_layout_files(cache_dir: Path) -> list[Path]:
    """Cache files of the earlier layout (one file per item under a two-letter folder of
    ``cache_dir``): never read now; the caller may tell the user they can be deleted."""
    folder = Path(cache_dir)
    if not folder.is_dir():
        return []
    return sorted(
        file
        for sub in folder.iterdir()
        if sub.is_dir() and re.fullmatch(r"[0-9a-f]{2}", sub.name)
        for file in sub.glob("*.safetensors")
    )


def _read(path: Path, kind: str) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            # safe_open is not iterable, so .keys() is needed here.
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    except (OSError, SafetensorError) as error:
        raise _unreadable(path, error) from error
    if not is_cache_file(metadata, tensors.keys(), kind):
        raise DataError(f"'{path}' is not a {CACHE_FORMAT} file: the next run makes it again")
    return tensors


def _header(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as file:
            return dict(file.metadata() or {})
    except (OSError, SafetensorError) as error:
        raise _unreadable(path, error) from error


def latent_shape(path: Path) -> tuple[int, ...]:
    try:
        with safe_open(str(path), framework="pt") as file:
            return tuple(file.get_slice("latent").get_shape())
    except (OSError, SafetensorError, ValueError) as error:
        raise _unreadable(path, error) from error


def is_cache_file(metadata: Mapping[str, str], names: Iterable[str], kind: str) -> bool:
    if metadata.get("format") != CACHE_FORMAT:
        return False
    names = set(names)
    if kind == CONDITIONING:  # the family's own tensor names; the kind in the metadata
        return bool(names) and CONDITIONING in metadata
    return kind in names or (kind == TEXTS and bool(names))


def _unreadable(path: Path, error: Exception) -> DataError:
    return DataError(
        f"cannot read cache file '{path}' ({error}): it changed or was damaged during the run; "
        "start the run again, which makes it again"
    )


def write_atomic(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
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
