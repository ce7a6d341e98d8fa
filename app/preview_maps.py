"""The arrays behind the weight-map preview, computed exactly as training computes them.

An image and its mask go through the engine's own loaders (``load_image``, ``load_mask``: same
bucket, crop and resize as the latent cache), the mask is shrunk to the latent grid with
``mask_to_latent`` and turned into the target map m and the prior map p by the run's own
``Weighting`` (built from the same ``mask`` and ``prior`` sections the trainer reads).
So what the preview shows is what the loss uses, cell for cell.

No Tk here (tested without a display). torch is imported inside the functions: importing
``app`` must not load the training stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LEVEL_MIN_SHARE = 0.005
"""Mask grey levels covering less of the image than this are edge pixels, not tiers."""
LEVELS_SHOWN = 8
LEVEL_RESOLUTION_CAP = 1024
"""Grey levels are counted on the cropped mask at its own size, up to this many pixels a side."""

DATA_KEYS = (
    "resolution",
    "buckets",
    "bucket_max_aspect",
    "bucket_step",
    "bucket_max_side",
)
WINDOW_KEYS = ("frames", "fps", "frame_windows", "window_stride", "window_count")
"""The data fields that say how many frame windows a clip gives (the concept cards count them)."""
"""The data settings the preview's geometry depends on."""

TARGET_COLOUR = np.array([60, 220, 90], dtype=np.float32)  # green: learns the target
PRIOR_COLOUR = np.array([220, 60, 220], dtype=np.float32)  # magenta: kept like the base model


@dataclass(frozen=True)
class PreviewSource:
    """What one image contributes, loaded once per image and resolution."""

    image: np.ndarray
    """(H, W, 3) uint8, the crop training sees (its bucket's size)."""
    mask: np.ndarray
    """(H, W) float32 raw mask in [0, 1]; all ones when the image has no mask."""
    latent_mask: np.ndarray
    """(h, w) float32 raw mask on the latent grid (area-averaged)."""
    has_mask: bool
    levels: tuple[tuple[float, float], ...]
    """(raw grey level, share of the image) of the mask's main tiers, highest level first."""


@dataclass(frozen=True)
class LevelRow:
    raw: float
    target: float
    prior: float
    share: float


@dataclass(frozen=True)
class PreviewMaps:
    target: np.ndarray
    """(h, w) float32 m from ``process_masks``."""
    prior: np.ndarray
    """(h, w) float32 p from ``process_masks``."""
    levels: tuple[LevelRow, ...]

    @property
    def target_mean(self) -> float:
        return float(self.target.mean())

    @property
    def prior_mean(self) -> float:
        return float(self.prior.mean())

    @property
    def prior_share(self) -> float:
        """Share of the latent cells where prior preservation acts at all (p > 0)."""
        return float((self.prior > 0).mean())


def load_source(
    image_path: Path, mask_path: Path | None, size: tuple[int, int] | int, latent_scale: int
) -> PreviewSource:
    """The image and mask at the training ``size`` (W, H; or a square's side), as the cache
    loads them, and the mask on the latent grid of ``latent_scale`` px per cell."""
    from modules.data.buckets import crop_box
    from modules.data.images import image_size, load_image, load_mask, mask_to_latent

    width, height = (size, size) if isinstance(size, int) else size
    pixels = load_image(image_path, (width, height))  # (3, H, W) in [-1, 1]
    image = ((pixels + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    source = image_size(image_path)
    if mask_path is None:
        import torch

        mask = torch.ones(1, height, width)
        levels: tuple[tuple[float, float], ...] = ((1.0, 1.0),)
    else:
        mask = load_mask(mask_path, source, (width, height))  # (1, H, W)
        # The levels are counted on the training crop at its own size (capped).
        left, top, right, bottom = crop_box(source, (width, height))
        scale = min(1.0, LEVEL_RESOLUTION_CAP / max(right - left, bottom - top))
        native = (max(1, round((right - left) * scale)), max(1, round((bottom - top) * scale)))
        levels = mask_levels(load_mask(mask_path, source, native)[0].numpy())
    latent = mask_to_latent(mask, (height // latent_scale, width // latent_scale))  # (1, h, w)
    return PreviewSource(
        image=image,
        mask=mask[0].numpy(),
        latent_mask=latent[0].numpy(),
        has_mask=mask_path is not None,
        levels=levels,
    )


def mask_levels(mask: np.ndarray) -> tuple[tuple[float, float], ...]:
    """The main grey levels of a mask (the tiers a user painted) with their area shares."""
    codes = np.round(mask * 255).astype(np.int64).ravel()
    counts = np.bincount(codes, minlength=256)
    shares = counts / codes.size
    found = [(code / 255, float(shares[code])) for code in range(255, -1, -1)]
    main = [level for level in found if level[1] >= LEVEL_MIN_SHARE]
    main = sorted(main, key=lambda level: -level[1])[:LEVELS_SHOWN]
    return tuple(sorted(main, key=lambda level: -level[0]))


def compute_maps(source: PreviewSource, weighting: Any) -> PreviewMaps:
    """m and p of the image's latent mask, and of each tier level, made by ``weighting`` (a
    ``modules.loss.Weighting``: :meth:`PreviewSettings.weighting`)."""
    import torch

    weights = weighting.maps(torch.from_numpy(source.latent_mask))
    raw = torch.tensor([level for level, _ in source.levels], dtype=torch.float32)
    tiers = weighting.maps(raw)
    rows = tuple(
        LevelRow(raw=level, target=float(m), prior=float(p), share=share)
        for (level, share), m, p in zip(source.levels, tiers.target, tiers.prior, strict=True)
    )
    return PreviewMaps(target=weights.target.numpy(), prior=weights.prior.numpy(), levels=rows)


def upscale(values: np.ndarray, size: tuple[int, int] | int) -> np.ndarray:
    """(h, w) → (H, W) (``size`` is (W, H), or a square's side) by repeating cells (no
    smoothing: one latent cell stays a block)."""
    out_width, out_height = (size, size) if isinstance(size, int) else size
    height, width = values.shape
    rows = np.minimum(np.arange(out_height) * height // out_height, height - 1)
    cols = np.minimum(np.arange(out_width) * width // out_width, width - 1)
    return values[np.ix_(rows, cols)]


def overlay(source: PreviewSource, maps: PreviewMaps) -> np.ndarray:
    """The image tinted green by m and magenta by p, (H, W, 3) uint8."""
    size = (source.image.shape[1], source.image.shape[0])
    target = upscale(maps.target, size)[..., None]
    prior = upscale(maps.prior, size)[..., None]
    tint = target * TARGET_COLOUR + prior * PRIOR_COLOUR
    strength = np.clip(target + prior, 0, 1) * 0.55
    blended = source.image.astype(np.float32) * (1 - strength) + tint * 0.55
    return np.clip(blended, 0, 255).round().astype(np.uint8)


@dataclass(frozen=True)
class PreviewSettings:
    """The config values the preview depends on, each validated by its own section."""

    mask: Any
    """The ``MaskConfig``."""
    prior: Any
    """The ``PriorConfig``."""
    resolution: int
    model: Any
    """The ``ModelConfig``: its family gives the latent scale."""
    buckets: tuple[tuple[int, int], ...] | None = None
    """The bucket sizes (W, H) of the data settings and the family; None: the square crop."""
    pixels_per_cell: int = 8
    """The family's latent grid."""
    windows: Any = None
    """The ``DataConfig`` whose frame fields say a clip's windows, when ``data.frame_windows``
    is not ``head`` and clips have more than one frame (the concept cards count them); None:
    each clip trains one window."""

    @property
    def threshold(self) -> float | None:
        return self.prior.threshold

    @property
    def mask_enabled(self) -> bool:
        return self.mask.enabled

    @property
    def prior_weight(self) -> float:
        return self.prior.weight

    def weighting(self) -> Any:
        """The ``Weighting`` training builds from these sections (imports torch)."""
        from modules.loss import Weighting

        return Weighting.of(self.mask, self.prior)

    def training_size(self, source: tuple[int, int]) -> tuple[int, int]:
        """The size an image of ``source`` (W, H) trains at: its bucket, or the square."""
        from modules.data.buckets import place

        buckets = list(self.buckets) if self.buckets is not None else None
        return place([source], buckets, self.resolution).sizes[0]


def settings_from_values(values: dict[str, Any]) -> PreviewSettings | str:
    """The preview's settings from the form's values, or why they cannot be had yet.

    Only the sections the preview uses are validated, so a typo elsewhere (say in the run
    folder) does not freeze the preview while the sliders move.
    """
    from pydantic import ValidationError

    from modules.config.schema import DataConfig, MaskConfig, ModelConfig, PriorConfig
    from modules.data.buckets import data_buckets
    from modules.data.frame_windows import in_windows
    from modules.models.registry import family_spec

    parts = {
        "mask": (MaskConfig, values["mask"]),
        "prior": (PriorConfig, values["prior"]),
        "data": (DataConfig, {key: values["data"][key] for key in DATA_KEYS + WINDOW_KEYS}),
        "model": (ModelConfig, values["model"]),
    }
    found = {}
    for name, (model, data) in parts.items():
        try:
            found[name] = model.model_validate(data)
        except ValidationError as error:
            item = error.errors()[0]
            path = ".".join([name, *(str(part) for part in item["loc"])])
            return f"Fix {path} to update the preview: {item['msg']}"
    mask, prior, data, model = found["mask"], found["prior"], found["data"], found["model"]
    grid = family_spec(model.family).latent_grid(model.path)
    try:
        buckets = data_buckets(data, grid.pixel_multiple)
    except ValueError as error:
        return f"Fix data.bucket_max_side to update the preview: {error}"
    return PreviewSettings(
        mask=mask,
        prior=prior,
        resolution=data.resolution,
        model=model,
        buckets=tuple(buckets) if buckets is not None else None,
        pixels_per_cell=grid.pixels_per_cell,
        windows=data if in_windows(data) else None,
    )
