"""The weight-map preview: image, raw mask, target map m, prior map p and an overlay, side by
side, recomputed by ``process_masks`` whenever gamma, minimum weight or threshold change.

The two previews (Masked training and Prior preservation tabs) share one image selection. The
maps are at latent resolution (one block per latent cell), as the loss sees them.
"""

from __future__ import annotations

import tkinter as tk
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import customtkinter as ctk
import numpy as np
from matplotlib import colormaps
from PIL import Image

from app import engine_import
from app.preview_maps import (
    PreviewMaps,
    PreviewSettings,
    PreviewSource,
    compute_maps,
    load_source,
    overlay,
    upscale,
)
from app.style import ERROR_COLOUR, MUTED_COLOUR, WARNING_COLOUR, heading_font, mono_font

PANEL_PX = 176
SOURCES_KEPT = 8
RETRY_MS = 250
_VIRIDIS = (colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


@dataclass(frozen=True)
class PreviewImage:
    label: str
    image: Path
    mask: Path | None
    prior_prediction: bool


def coloured(values: np.ndarray, size: tuple[int, int] | int) -> Image.Image:
    """A [0, 1] map as a viridis image of ``size`` (W, H), each latent cell a block."""
    codes = np.clip(np.round(upscale(values, size) * 255), 0, 255).astype(np.uint8)
    return Image.fromarray(_VIRIDIS[codes])


def _photo(image: Image.Image) -> ctk.CTkImage:
    """The picture scaled to fit a PANEL_PX square, its aspect ratio kept (a bucket's)."""
    scale = PANEL_PX / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.NEAREST)
    return ctk.CTkImage(light_image=image, dark_image=image, size=size)


class WeightPreview(ctk.CTkFrame):
    PANELS = ("Image", "Raw mask", "Target weight m", "Prior weight p", "Overlay")

    def __init__(
        self,
        parent: tk.Misc,
        selection: tk.StringVar,
        settings: Callable[[], PreviewSettings | str],
    ) -> None:
        super().__init__(parent)
        self.selection = selection
        self._settings = settings
        self._images: dict[str, PreviewImage] = {}
        self._sources: OrderedDict[tuple, PreviewSource] = OrderedDict()
        self._pending: str | None = None
        self.source: PreviewSource | None = None
        self.maps: PreviewMaps | None = None
        self.current: PreviewImage | None = None

        title = ctk.CTkLabel(self, text="Weight-map preview", font=heading_font())
        title.grid(row=0, column=0, sticky="w", padx=12, pady=(8, 0))
        picker = ctk.CTkFrame(self, fg_color="transparent")
        picker.grid(row=1, column=0, sticky="w", padx=12, pady=(4, 4))
        ctk.CTkLabel(picker, text="Image").pack(side="left", padx=(0, 8))
        self.previous_button = ctk.CTkButton(
            picker, text="◀", width=32, command=lambda: self._step(-1)
        )
        self.previous_button.pack(side="left")
        self.menu = ctk.CTkOptionMenu(picker, values=[""], variable=selection, width=300)
        self.menu.pack(side="left", padx=4)
        self.next_button = ctk.CTkButton(picker, text="▶", width=32, command=lambda: self._step(1))
        self.next_button.pack(side="left")
        self.info = ctk.CTkLabel(picker, text="", text_color=MUTED_COLOUR)
        self.info.pack(side="left", padx=12)

        panels = ctk.CTkFrame(self, fg_color="transparent")
        panels.grid(row=2, column=0, sticky="w", padx=12)
        self.captions: list[ctk.CTkLabel] = []
        self.pictures: list[ctk.CTkLabel] = []
        for column, name in enumerate(self.PANELS):
            caption = ctk.CTkLabel(panels, text=name)
            caption.grid(row=0, column=column, padx=4)
            picture = ctk.CTkLabel(panels, text="", width=PANEL_PX, height=PANEL_PX)
            picture.grid(row=1, column=column, padx=4)
            self.captions.append(caption)
            self.pictures.append(picture)
        legend = Image.fromarray(np.repeat(_VIRIDIS[None, :, :], 10, axis=0))
        legend = legend.resize((PANEL_PX, 10))
        self.legend = ctk.CTkLabel(
            panels,
            text="",
            image=ctk.CTkImage(legend, legend, size=(PANEL_PX, 10)),
        )
        self.legend.grid(row=2, column=2, columnspan=2)
        legend_text = ctk.CTkLabel(
            panels, text="m and p: 0 (dark) … 1 (yellow)", text_color=MUTED_COLOUR
        )
        legend_text.grid(row=3, column=2, columnspan=2)
        overlay_text = ctk.CTkLabel(panels, text="green: m   magenta: p", text_color=MUTED_COLOUR)
        overlay_text.grid(row=3, column=4)

        self.stats = ctk.CTkLabel(self, text="", anchor="w", justify="left", font=heading_font(13))
        self.stats.grid(row=3, column=0, sticky="w", padx=12, pady=(6, 0))
        self.table = ctk.CTkLabel(self, text="", anchor="w", justify="left", font=mono_font())
        self.table.grid(row=4, column=0, sticky="w", padx=12, pady=(4, 0))
        self.notes = ctk.CTkLabel(
            self, text="", anchor="w", justify="left", text_color=WARNING_COLOUR, wraplength=900
        )
        self.notes.grid(row=5, column=0, sticky="w", padx=12, pady=(4, 10))
        selection.trace_add("write", lambda *_: self.request_refresh())

    # ------------------------------------------------------------------------------ inputs

    def set_images(self, images: list[PreviewImage]) -> None:
        self._images = {image.label: image for image in images}
        labels = list(self._images) or [""]
        self.menu.configure(values=labels)
        if self.selection.get() not in self._images:
            self.selection.set(labels[0])
        self.request_refresh()

    def _step(self, delta: int) -> None:
        labels = list(self._images)
        if labels:
            index = labels.index(self.selection.get()) if self.selection.get() in labels else 0
            self.selection.set(labels[(index + delta) % len(labels)])

    def request_refresh(self) -> None:
        """Recompute once the current burst of changes (a slider drag) has been handled."""
        if self._pending is None:
            self._pending = self.after_idle(self.refresh)

    # ----------------------------------------------------------------------------- compute

    def refresh(self) -> None:
        self._pending = None
        image = self._images.get(self.selection.get())
        if image is None:
            self._show_message("No images: add a concept folder on the Concepts tab.")
            return
        if not engine_import.ready():
            problem = engine_import.error()
            if problem:
                self._show_message(problem, ERROR_COLOUR)
                return
            engine_import.start()
            self._show_message("Loading the loss code…")
            self._pending = self.after(RETRY_MS, self.refresh)
            return
        settings = self._settings()
        if isinstance(settings, str):
            self.notes.configure(text=settings, text_color=ERROR_COLOUR)
            return
        source = self._source(image, settings)
        if source is None:
            return
        self.current, self.source = image, source
        self.maps = compute_maps(source, settings.weighting())
        self._render(image, source, self.maps, settings)

    def _source(self, image: PreviewImage, settings: PreviewSettings) -> PreviewSource | None:
        from modules.data.concept import DataError
        from modules.data.images import image_size

        mask = None if image.prior_prediction else image.mask
        try:
            size = settings.training_size(image_size(image.image))
        except (DataError, OSError) as error:
            self._show_message(f"{image.image.name}: {error}", ERROR_COLOUR)
            return None
        scale = settings.pixels_per_cell
        key = (image.image, mask, size, scale)
        if key not in self._sources:
            try:
                self._sources[key] = load_source(image.image, mask, size, scale)
            except (DataError, OSError) as error:
                self._show_message(f"{image.image.name}: {error}", ERROR_COLOUR)
                return None
            while len(self._sources) > SOURCES_KEPT:
                self._sources.popitem(last=False)
        return self._sources[key]

    # ------------------------------------------------------------------------------ render

    def _render(
        self,
        image: PreviewImage,
        source: PreviewSource,
        maps: PreviewMaps,
        settings: PreviewSettings,
    ) -> None:
        size = (source.image.shape[1], source.image.shape[0])  # (W, H): the bucket
        height, width = maps.target.shape
        pictures = (
            Image.fromarray(source.image),
            Image.fromarray(np.round(source.mask * 255).astype(np.uint8)),
            coloured(maps.target, size),
            coloured(maps.prior, size),
            Image.fromarray(overlay(source, maps)),
        )
        for label, picture in zip(self.pictures, pictures, strict=True):
            label.configure(image=_photo(picture), text="")
        self.captions[0].configure(text=f"Image ({size[0]}×{size[1]})")
        self.captions[2].configure(text=f"Target weight m ({width}×{height})")
        self.captions[3].configure(text=f"Prior weight p ({width}×{height})")
        mode = (
            "continuous: p = 1 − m"
            if settings.threshold is None
            else f"threshold: p = 1 where the raw mask < {settings.threshold:g}"
        )
        self.stats.configure(
            text=(
                f"mean m {maps.target_mean:.3f}    mean p {maps.prior_mean:.3f}    "
                f"prior preservation on {maps.prior_share:.0%} of the image (p > 0)    "
                f"mode: {mode}"
            )
        )
        lines = ["raw mask   target m   prior p   share of image"]
        lines += [
            f"{row.raw:8.3f}   {row.target:8.3f}   {row.prior:7.3f}   {row.share:13.1%}"
            for row in maps.levels
        ]
        self.table.configure(text="\n".join(lines))
        self.info.configure(text=self._describe(image, source))
        self.notes.configure(text=self._notes(image, source, settings), text_color=WARNING_COLOUR)

    @staticmethod
    def _describe(image: PreviewImage, source: PreviewSource) -> str:
        if image.prior_prediction:
            return "prior-prediction concept"
        return "with mask" if source.has_mask else "no mask"

    @staticmethod
    def _notes(image: PreviewImage, source: PreviewSource, settings: PreviewSettings) -> str:
        notes = []
        if not settings.mask_enabled:
            notes.append("Masked training is off: training ignores these maps (plain loss).")
        if settings.prior_weight == 0:
            notes.append("Prior weight is 0: the prior map is not used.")
        if image.prior_prediction:
            notes.append(
                "Prior-prediction concept: masks are ignored; the whole image learns the "
                "base model's prediction."
            )
        elif not source.has_mask:
            notes.append("This image has no mask: it trains with an all-ones mask.")
        return "  ".join(notes)

    def _show_message(self, text: str, colour: tuple[str, str] = MUTED_COLOUR) -> None:
        self.notes.configure(text=text, text_color=colour)
