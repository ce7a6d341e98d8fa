"""Filling the cache of encoded training data (:mod:`modules.data.cache_files`): latents,
prompt encodings and masks apart, each made only when what it depends on changed.

So editing a mask makes one mask file and encodes nothing; editing a caption encodes that
caption; changing an image, its training size or the model encodes its latent again. A file
that is there but damaged (a disk error, a copy cut short) is found by its header when the cache
is opened, and made again.

Still images are encoded in batches of one training size, (B, 3, H, W); a clip with
``frames > 1`` alone as (1, 3, F, H, W) (see :mod:`modules.data.video`), and with
``frames == 1`` as its first frame, like a still image; a window of a clip
(``ConceptItem.start``, :mod:`modules.data.frame_windows`) from its own first frame on, its mask
cut at the same source frames. Masks are reduced to the latent grid with
:func:`~modules.data.images.mask_to_latent` (clips:
:func:`~modules.data.video.clip_mask_to_latent`) after the image's own geometry.

A family that declares conditioning (``FamilySpec.conditioning``) has each item's source images
of each kind encoded one item at a time (an ``item`` source at its training size, a clip's
window from the window's first frame, references at their own size) and kept in a file of their
own, made again when a source file or the encoder changes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from modules.data.buckets import Size, crop_box
from modules.data.cache_files import (
    CACHE_FORMAT,
    CONDITIONING,
    LATENTS,
    MASKS,
    TEXTS,
    CachedItem,
    cache_path,
    conditioning_key,
    is_cache_file,
    latent_key,
    latent_shape,
    mask_key,
    text_key,
    write_atomic,
)
from modules.data.concept import ConceptItem, DataError, name_list
from modules.data.conditioning import conditioning_sources
from modules.data.frame_windows import sample_frame_indices
from modules.data.images import image_size, load_image, load_mask_with_notes, mask_to_latent
from modules.data.video import (
    clip_frame_indices,
    clip_info,
    clip_mask_to_latent,
    load_clip,
    load_clip_mask,
)
from modules.models.spec import ConditioningKind, ItemGeometry

Encoder = Callable[[Tensor], Tensor]
"""(B, 3, H, W) float32 CPU images in [-1, 1] → latents (B, C, h, w) or (B, C, F, h, w); for
video families also (1, 3, F, H, W) clips → (1, C, F', h, w).

The callable moves the batch to its own device and dtype; build_cache runs it under no_grad.
"""
PromptEncoder = Callable[[list[str]], dict[str, Tensor]]
"""B prompts → named batch-first tensors (B, ...)."""
ConditioningEncoder = Callable[..., dict[str, Tensor]]
"""(the kind's name, one item's source images, each (3, H, W) float32 in [-1, 1], the item's
frame count: ``data.frames`` for a clip, 1 for a still, the item's caption for a kind
``with_caption``, else None; for a kind ``with_geometry`` also the keyword ``geometry``, an
``ItemGeometry``) → the item's encodings, batch-first with a batch of one (the family's
``encode_conditioning``)."""
Progress = Callable[[int, int], None]
"""Called with (latents encoded so far, latents to encode)."""
Warn = Callable[[str], None]
"""Called with a line for the user (a damaged cache file made again)."""


@dataclass
class CacheCounts:
    """What a cache build made and what it found made: distinct files of each kind."""

    latents_encoded: int = 0
    latents_reused: int = 0
    texts_encoded: int = 0
    texts_reused: int = 0
    masks_made: int = 0
    masks_reused: int = 0
    conditioning_encoded: int = 0
    conditioning_reused: int = 0

    def add(self, other: CacheCounts) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def describe(self) -> str:
        text = (
            f"latents {self.latents_reused} reused, {self.latents_encoded} encoded; "
            f"captions {self.texts_reused} reused, {self.texts_encoded} encoded; "
            f"masks {self.masks_reused} reused, {self.masks_made} made"
        )
        if self.conditioning_reused or self.conditioning_encoded:
            text += (
                f"; conditioning {self.conditioning_reused} reused, "
                f"{self.conditioning_encoded} encoded"
            )
        return text


@dataclass(frozen=True)
class BuiltCache:
    items: list[CachedItem]
    """Every item's files, in the order given."""
    counts: CacheCounts = field(default_factory=CacheCounts)


# ----------------------------------------------------------------------------------- build


@dataclass(frozen=True)
class _Plan:
    """One item's keys and files."""

    item: ConceptItem
    size: Size
    latent_key: str
    latent: Path
    text: Path
    mask: Path | None
    conditioning: tuple[_Conditioning, ...] = ()
    frames: int = 1
    """The frames it trains: ``data.frames`` for a clip, 1 for a still."""


@dataclass(frozen=True)
class _Conditioning:
    """One item's source files of one conditioning kind, and the file of their encodings."""

    kind: ConditioningKind
    sources: tuple[Path, ...]
    file: Path


def build_cache(
    items: Sequence[ConceptItem],
    *,
    resolution: int,
    cache_dir: Path,
    settings: Mapping[str, Any],
    encode_images: Encoder,
    encode_prompts: PromptEncoder,
    sizes: Sequence[Size] | None = None,
    batch_size: int = 8,
    progress: Progress | None = None,
    frames: int = 1,
    fps: float = 0.0,
    warn: Warn | None = None,
    conditioning: Sequence[ConditioningKind] = (),
    encode_conditioning: ConditioningEncoder | None = None,
    reference_dirs: Sequence[Path] = (),
) -> BuiltCache:
    """Make what the cache lacks for ``items``; return every item's files, in order.

    ``sizes``: each item's training size (its bucket), (width, height); None: every item at
    ``resolution`` × ``resolution``. A file that is there but damaged is removed and made
    again, and ``warn`` told. Clips train as ``frames`` frames at ``fps`` (see
    :mod:`modules.data.video`), from frame ``item.start`` for a window of a clip. ``progress``
    is called with (0, n) before the first latent is encoded and after each batch (each clip),
    n being the latents to encode; not at all when every latent is cached already.

    ``conditioning``: the family's conditioning kinds, encoded with ``encode_conditioning``
    (references found beside the items, or in ``reference_dirs`` when given); a DataError
    naming the item when one has no source file.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    cache_dir = Path(cache_dir)
    sizes = list(sizes) if sizes is not None else [(resolution, resolution)] * len(items)
    empty = cache_path(cache_dir, TEXTS, text_key("", settings=settings))
    if conditioning and encode_conditioning is None:
        raise ValueError("build_cache: conditioning kinds given without encode_conditioning")
    plans = [
        _with_conditioning(
            _plan(item, size, cache_dir, settings, frames, fps),
            conditioning,
            cache_dir,
            settings,
            reference_dirs,
            fps,
        )
        for item, size in zip(items, sizes, strict=True)
    ]
    build = _Build(
        encode_images=encode_images,
        encode_prompts=encode_prompts,
        encode_conditioning=encode_conditioning,
        metadata={"format": CACHE_FORMAT, "settings": json.dumps(settings, sort_keys=True)},
        batch_size=batch_size,
        frames=frames,
        fps=fps,
        warn=warn,
    )
    with torch.no_grad():
        encoded = build.latents(plans, progress)
        build.masks(plans, encoded)
        build.texts({plan.text: plan.item.caption for plan in plans} | {empty: ""})
        build.conditioning(plans)
    cached = [
        CachedItem(
            latent=plan.latent,
            text=plan.text,
            empty=empty,
            mask=plan.mask,
            size=plan.size,
            source=plan.item.image,
            conditioning=tuple(part.file for part in plan.conditioning),
        )
        for plan in plans
    ]
    return BuiltCache(items=cached, counts=build.counts)


def _plan(
    item: ConceptItem,
    size: Size,
    cache_dir: Path,
    settings: Mapping[str, Any],
    frames: int,
    fps: float,
) -> _Plan:
    key = latent_key(item, size=size, settings=settings, frames=frames, fps=fps)
    mask = None
    if item.mask is not None:
        mask = cache_path(cache_dir, MASKS, mask_key(item.mask, latent=key))
    return _Plan(
        item=item,
        size=size,
        latent_key=key,
        latent=cache_path(cache_dir, LATENTS, key),
        text=cache_path(cache_dir, TEXTS, text_key(item.caption, settings=settings)),
        mask=mask,
        frames=frames if item.clip else 1,
    )


def _with_conditioning(
    plan: _Plan,
    kinds: Sequence[ConditioningKind],
    cache_dir: Path,
    settings: Mapping[str, Any],
    reference_dirs: Sequence[Path],
    fps: float,
) -> _Plan:
    """``plan`` with the source files and cache file of each conditioning kind."""
    parts = []
    for kind in kinds:
        sources = conditioning_sources(plan.item, kind, reference_dirs)
        given = len(reference_dirs) if kind.source == "references" else 0
        if given and len(sources) < given:
            # Never train on fewer references than the folders give.
            raise DataError(
                f"'{plan.item.image}' has {len(sources)} of its {given} reference images (one "
                f"per reference folder; found: {name_list(sources) or 'none'}): add a file "
                f"named like it to each folder in data.concepts.N.reference_dirs (the check "
                "command lists every such file)"
            )
        if not sources or len(sources) > kind.most:
            found = f"{len(sources)} ({name_list(sources)})" if sources else "none"
            needs = "1" if kind.most == 1 else f"1 to {kind.most}"
            raise DataError(
                f"'{plan.item.image}' needs {needs} {kind.name} images and has {found}: add "
                "or remove them (the check command lists every such file)"
            )
        own = kind.source == "item"
        key = conditioning_key(
            kind.name,
            sources,
            settings=settings,
            size=plan.size if own else None,
            frames=plan.frames if own else 1,
            first_frame=_first_source_frame(plan.item, fps) if own else 0,
            caption=plan.item.caption if kind.with_caption else None,
        )
        parts.append(_Conditioning(kind, sources, cache_path(cache_dir, CONDITIONING, key)))
    return replace(plan, conditioning=tuple(parts))


@dataclass
class _Build:
    """One cache build: its encoders and settings, and what it has made so far."""

    encode_images: Encoder
    encode_prompts: PromptEncoder
    encode_conditioning: ConditioningEncoder | None
    metadata: dict[str, str]
    batch_size: int
    frames: int
    fps: float
    warn: Warn | None
    counts: CacheCounts = field(default_factory=CacheCounts)

    def latents(self, plans: list[_Plan], progress: Progress | None) -> dict[Path, Tensor]:
        """Encode the latents not cached yet; return those encoded now, by file (their masks
        are made from them without reading them back)."""
        # Keyed by file so an image listed twice (e.g. in two concepts) is encoded once.
        distinct = {plan.latent: plan for plan in plans}
        todo = [plan for path, plan in distinct.items() if not self._usable(path, "latent", plan)]
        self.counts.latents_reused += len(distinct) - len(todo)
        self.counts.latents_encoded += len(todo)
        encoded: dict[Path, Tensor] = {}
        if not todo:
            return encoded
        if progress is not None:
            progress(0, len(todo))
        # Stills (and 1-frame clips) batch by training size; longer clips one at a time.
        by_size: dict[Size, list[_Plan]] = {}
        clips = []
        for plan in todo:
            if plan.item.clip and self.frames > 1:
                clips.append(plan)
            else:
                by_size.setdefault(plan.size, []).append(plan)
        batches = [
            group[start : start + self.batch_size]
            for group in by_size.values()
            for start in range(0, len(group), self.batch_size)
        ]
        for batch in batches:
            pixels = torch.stack([_still_pixels(plan.item, plan.size, self.fps) for plan in batch])
            latents = self.encode_images(pixels)  # (B, C, h, w) or (B, C, F, h, w)
            if latents.dim() not in (4, 5) or latents.shape[0] != len(batch):
                raise ValueError(
                    f"image encoder returned shape {tuple(latents.shape)} for {len(batch)} "
                    "images; expected (B, C, h, w) or (B, C, F, h, w)"
                )
            for plan, latent in zip(batch, latents, strict=True):
                encoded[plan.latent] = self._write_latent(plan, latent, {})
            if progress is not None:
                progress(len(encoded), len(todo))
        for plan in clips:
            latent, extra = self._encode_clip(plan)
            encoded[plan.latent] = self._write_latent(plan, latent, extra)
            if progress is not None:
                progress(len(encoded), len(todo))
        return encoded

    def _encode_clip(self, plan: _Plan) -> tuple[Tensor, dict[str, str]]:
        item, frames = plan.item, self.frames
        info = clip_info(item.image)
        indices = clip_frame_indices(item.image, info, frames, self.fps, item.start)
        pixels = load_clip(item.image, indices, plan.size)  # (3, F, H, W)
        latents = self.encode_images(pixels.unsqueeze(0))  # (1, C, F', h, w)
        if latents.dim() != 5 or latents.shape[0] != 1:
            raise ValueError(
                f"image encoder returned shape {tuple(latents.shape)} for one clip of {frames} "
                "frames; expected (1, C, F', h, w): this model family trains images only, set "
                "data.frames=1"
            )
        extra = {"frames": str(frames), "source_frames": json.dumps(indices)}
        if item.start:
            extra["window_start"] = str(item.start)
        return latents[0], extra

    def _write_latent(self, plan: _Plan, latent: Tensor, extra: dict[str, str]) -> Tensor:
        latent = latent.float()
        metadata = {
            **self.metadata,
            **extra,
            "source_image": str(plan.item.image),
            "size": f"{plan.size[0]}x{plan.size[1]}",
        }
        write_atomic(plan.latent, {"latent": latent}, metadata)
        return latent

    def masks(self, plans: list[_Plan], encoded: dict[Path, Tensor]) -> None:
        """The masks not cached yet, on their latent's grid (read from its file's header when
        the latent was not encoded now)."""
        distinct = {plan.mask: plan for plan in plans if plan.mask is not None}
        for path, plan in distinct.items():
            if self._usable(path, "mask", plan):
                self.counts.masks_reused += 1
                continue
            latent = encoded.get(plan.latent)
            shape = tuple(latent.shape) if latent is not None else latent_shape(plan.latent)
            mask, coloured = _latent_mask(plan, shape, self.frames, self.fps)
            metadata = {
                **self.metadata,
                "source_mask": str(plan.item.mask),
                "source_image": str(plan.item.image),
                "mask_max": repr(float(mask.amax())),
                "mask_coloured": "1" if coloured else "0",
            }
            write_atomic(path, {"mask": mask}, metadata)
            self.counts.masks_made += 1

    def texts(self, captions: dict[Path, str]) -> None:
        """Encode the captions not cached yet, ``batch_size`` at a time, one file each."""
        todo = [
            (p, caption) for p, caption in captions.items() if not self._usable(p, "text", caption)
        ]
        self.counts.texts_reused += len(captions) - len(todo)
        self.counts.texts_encoded += len(todo)
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            encoding = self.encode_prompts([caption for _, caption in batch])
            rows = _rows(encoding, len(batch), "prompt encoder", "captions")
            for (path, caption), row in zip(batch, rows, strict=True):
                write_atomic(path, row, {**self.metadata, "caption": caption})

    def conditioning(self, plans: list[_Plan]) -> None:
        """Encode each item's conditioning not cached yet, one item and kind at a time (the
        sources of different items may differ in size and count)."""
        distinct = {part.file: (plan, part) for plan in plans for part in plan.conditioning}
        for path, (plan, part) in distinct.items():
            if self._usable(path, CONDITIONING, plan):
                self.counts.conditioning_reused += 1
                continue
            assert self.encode_conditioning is not None
            if part.kind.source == "item":
                # (3, H, W), the latent's crop; a clip window's own first frame
                pixels = [_still_pixels(plan.item, plan.size, self.fps)]
            else:
                pixels = [load_image(source, image_size(source)) for source in part.sources]
            frames = plan.frames if part.kind.source == "item" else 1
            caption = plan.item.caption if part.kind.with_caption else None
            extra = {"geometry": _geometry(plan)} if part.kind.with_geometry else {}
            try:
                encoding = self.encode_conditioning(
                    part.kind.name, pixels, frames, caption, **extra
                )
            except DataError as error:  # the family's refusal of a source: name the files
                sources = name_list(part.sources)
                raise DataError(
                    f"'{plan.item.image}' ({part.kind.name}: {sources}): {error}"
                ) from None
            (row,) = _rows(encoding, 1, f"conditioning encoder ('{part.kind.name}')", "item")
            metadata = {
                **self.metadata,
                CONDITIONING: part.kind.name,
                "sources": json.dumps([str(source) for source in part.sources]),
                "source_image": str(plan.item.image),
            }
            write_atomic(path, row, metadata)
            self.counts.conditioning_encoded += 1

    def _usable(self, path: Path, kind: str, of: _Plan | str) -> bool:
        """Whether a cache file exists and can be read; a damaged one is removed (and said)."""
        if not path.exists():
            return False
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = file.metadata() or {}
                names = set(file.keys())
            if not is_cache_file(metadata, names, kind):
                raise ValueError(f"not a {CACHE_FORMAT} {kind} file")
        except (OSError, SafetensorError, ValueError) as error:
            if self.warn is not None:
                what = f"'{of.item.image}'" if isinstance(of, _Plan) else f"caption {of!r}"
                self.warn(
                    f"cache file {path} ({kind} of {what}) is damaged ({error}): making it again"
                )
            path.unlink(missing_ok=True)
            return False
        return True


def _geometry(plan: _Plan) -> ItemGeometry:
    """The item's file size, its centred crop and its training size."""
    item = plan.item
    original = clip_info(item.image).size if item.clip else image_size(item.image)
    return ItemGeometry(original=original, crop=crop_box(original, plan.size), size=plan.size)


def _still_pixels(item: ConceptItem, size: Size, fps: float) -> Tensor:
    """(3, H, W): the image, or the first frame of a clip (of its window, for a window)."""
    if not item.clip:
        return load_image(item.image, size)
    frame = _first_source_frame(item, fps)
    return load_clip(item.image, [frame], size)[:, 0]  # (3, 1, H, W) → (3, H, W)


def _first_source_frame(item: ConceptItem, fps: float) -> int:
    """The source frame a clip's window begins at (0 for its first window and for stills)."""
    if not item.clip or not item.start:
        return 0
    info = clip_info(item.image)
    (frame,) = sample_frame_indices(1, source_fps=info.fps, fps=fps, start=item.start)
    if frame >= info.frames:
        raise DataError(
            f"clip '{item.image}' has {info.frames} frames, too few for its window from frame "
            f"{item.start} (it changed after the windows were counted): start the run again"
        )
    return frame


def _latent_mask(
    plan: _Plan, latent_shape: torch.Size | tuple[int, ...], frames: int, fps: float
) -> tuple[Tensor, bool]:
    """The item's mask on the grid of its (C, [F,] h, w) latent, after the image's geometry,
    and whether the mask file was coloured (known for mask images only)."""
    item = plan.item
    assert item.mask is not None
    grid = (latent_shape[-2], latent_shape[-1])
    if item.clip and frames > 1:
        info = clip_info(item.image)
        indices = clip_frame_indices(item.image, info, frames, fps, item.start)
        # The window's own mask frames: the same source frames as its latent's.
        full = load_clip_mask(item.mask, item.image, info, indices, plan.size)  # (1, F, H, W)
        return clip_mask_to_latent(full, grid, latent_shape[1]), False
    if item.clip:
        info = clip_info(item.image)
        first = [_first_source_frame(item, fps)]
        still = load_clip_mask(item.mask, item.image, info, first, plan.size)[:, 0]
        coloured = False
    else:
        still, notes = load_mask_with_notes(item.mask, image_size(item.image), plan.size)
        coloured = notes.coloured
    mask = mask_to_latent(still, grid)  # (1, H, W) → (1, h, w)
    if len(latent_shape) == 4:
        # Video latents of a still: the mask applies to every latent frame.
        mask = mask.unsqueeze(1).expand(1, latent_shape[1], *grid).contiguous()
    return mask, coloured


def _rows(
    encoding: Mapping[str, Tensor], count: int, encoder: str, of: str
) -> list[dict[str, Tensor]]:
    """Split a batch-first encoding into ``count`` per-sample dicts."""
    if not encoding:
        raise ValueError(f"{encoder} returned no tensors for {count} {of}")
    for name, value in encoding.items():
        if value.dim() == 0 or value.shape[0] != count:
            raise ValueError(
                f"{encoder} returned '{name}' with shape {tuple(value.shape)} for "
                f"{count} {of}; expected batch-first tensors ({count}, ...)"
            )
    return [{name: value[index] for name, value in encoding.items()} for index in range(count)]
