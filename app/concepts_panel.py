"""The concepts editor: one card per concept folder, with the folder's image and mask counts
(with ``data.frame_windows`` other than ``head``, also its clips' windows; for an edit model its
pairs, and the first problem with them) and the histogram of the buckets its images train in.

Each card is built from the concept's fields (``ConceptConfig`` and its ``CaptionConfig``) like
every other form. Cards are rebuilt from their values when a concept is added or removed, so a
card's field paths (``data.concepts.N.*``) always match its position in the list.
"""

from __future__ import annotations

import tkinter as tk
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import customtkinter as ctk
from pydantic import ValidationError

from app import dialogs, engine_import
from app.field_specs import section_specs
from app.field_widgets import FieldRow, OnChange, SectionForm
from app.layout import follow_width
from app.style import ERROR_COLOUR, MUTED_COLOUR, heading_font
from modules.config.presets import merge_overlay
from modules.config.schema import CaptionConfig, ConceptConfig, DataConfig
from modules.data.concept import ConceptScan, DataError, count_of, scan_concept
from modules.data.conditioning import find_pairs, pair_problems, reference_kind
from modules.models.spec import ConditioningKind

if TYPE_CHECKING:
    from app.preview_maps import PreviewSettings

SCAN_DELAY_MS = 300
"""Typing a folder path rescans it once the typing pauses, not on every key."""
RETRY_MS = 250
"""How often a bucket histogram waiting for the image readers tries again."""


def describe_scan(scan: ConceptScan) -> str:
    return (
        f"{scan.images} images · {scan.masks_found} masks found · "
        f"{scan.images_without_mask} images without a mask · "
        f"{scan.masks_without_image} masks without an image"
    )


class ConceptCard(ctk.CTkFrame):
    def __init__(
        self,
        parent: tk.Misc,
        index: int,
        values: dict[str, Any],
        on_change: OnChange,
        on_remove: Callable[[int], None],
        on_scanned: Callable[[], None],
    ) -> None:
        super().__init__(parent, corner_radius=8)
        self.index = index
        self._on_scanned = on_scanned
        self.prefix = f"data.concepts.{index}"
        self._on_change = on_change
        self._pending_scan: str | None = None
        self.scan: ConceptScan | None = None
        self.kinds: tuple[ConditioningKind, ...] = ()
        """The model's conditioning kinds: with references, the scan keeps them apart and
        the card counts pairs."""

        header = ctk.CTkFrame(self, fg_color="transparent")
        header.grid(row=0, column=0, columnspan=2, sticky="ew", padx=10, pady=(8, 0))
        title = ctk.CTkLabel(header, text=f"Concept {index + 1}", font=heading_font())
        title.pack(side="left")
        self.remove_button = ctk.CTkButton(
            header, text="Remove", width=80, command=lambda: on_remove(self.index)
        )
        self.remove_button.pack(side="right")

        path_frame = ctk.CTkFrame(self, fg_color="transparent")
        path_frame.grid(row=1, column=0, columnspan=2, sticky="w", padx=10)
        specs = {spec.name: spec for spec in section_specs(ConceptConfig, self.prefix)}
        path_spec = specs["path"]
        self.path_row = FieldRow(path_frame, path_spec, 0, self._path_changed)
        self.browse_button = ctk.CTkButton(
            path_frame, text="Browse…", width=80, command=self._browse
        )
        self.browse_button.grid(row=0, column=2, padx=(8, 0), pady=(4, 0))
        path_frame.columnconfigure(0, minsize=210)

        self.counts = ctk.CTkLabel(self, text="", anchor="w", justify="left")
        self.counts.grid(row=2, column=0, columnspan=2, sticky="w", padx=10)
        self.buckets = ctk.CTkLabel(
            self, text="", anchor="w", justify="left", text_color=MUTED_COLOUR, wraplength=760
        )
        self.buckets.grid(row=4, column=0, columnspan=2, sticky="w", padx=10, pady=(0, 8))
        self._sizes: list[tuple[int, int]] | str | None = None
        """The scanned items' sizes (W, H), read once per scan; or why they cannot be."""
        self._clips: list[tuple[int, float] | None] = []
        """Per scanned item, a clip's frame count and rate (from its header, with the sizes);
        None for a still image."""

        self.form = SectionForm(
            self, ConceptConfig, self.prefix, on_change, exclude=("path", "caption")
        )
        self.form.grid(row=3, column=0, sticky="nw", padx=10, pady=(0, 10))
        caption_spec = specs["caption"]
        self.caption_form = SectionForm(
            self, CaptionConfig, caption_spec.path, on_change, title=caption_spec.title
        )
        self.caption_form.grid(row=3, column=1, sticky="nw", padx=(30, 10), pady=(0, 10))
        self.columnconfigure(1, weight=1)  # the header spans the card, stacked or not
        self.stacked = False
        """Whether the captions sit under the other fields (a narrow window), not beside them."""
        tk.Misc.bind(self, "<Configure>", self._reflow, add="+")
        follow_width(self.buckets, self, pad=24)
        self._load(values)

    def _reflow(self, event: tk.Event) -> None:
        needed = self.form.winfo_reqwidth() + self.caption_form.winfo_reqwidth() + 60
        stacked = event.width < needed
        if stacked != self.stacked:
            self.stacked = stacked
            if stacked:
                self.caption_form.grid(row=5, column=0, columnspan=2, padx=10, pady=(0, 10))
            else:
                self.caption_form.grid(row=3, column=1, columnspan=1, padx=(30, 10), pady=(0, 10))

    def _field_rows(self) -> list[FieldRow]:
        return [*self.form.all_rows(), *self.caption_form.all_rows()]

    def _load(self, values: dict[str, Any]) -> None:
        self.path_row.set(values.get("path", ""))
        full = merge_overlay(ConceptConfig(path="-").model_dump(), values)
        for row in self._field_rows():
            relative = row.path.removeprefix(self.prefix + ".").split(".")
            value: Any = full
            for part in relative:
                value = value[part]
            row.set(value)

    def rows(self) -> list[FieldRow]:
        return [self.path_row, *self._field_rows()]

    def values(self) -> dict[str, Any]:
        values: dict[str, Any] = {"path": self.path_row.get()}
        for row in self._field_rows():
            *parents, name = row.path.removeprefix(self.prefix + ".").split(".")
            node = values
            for part in parents:
                node = node.setdefault(part, {})
            node[name] = row.get()
        return values

    def _browse(self) -> None:
        folder = dialogs.ask_directory(self, "Concept folder")
        if folder is not None:
            self.path_row.set(str(folder))

    def _path_changed(self) -> None:
        self._on_change()
        if self._pending_scan is not None:
            self.after_cancel(self._pending_scan)
        self._pending_scan = self.after(SCAN_DELAY_MS, self.rescan)

    def rescan(self) -> None:
        """Count the folder's images and masks now (file names only: fast, no image decoding)."""
        self._pending_scan = None
        path = str(self.path_row.get()).strip()
        self.scan, self._sizes = None, None
        if not path:
            self.counts.configure(text="Choose a folder of images.", text_color=MUTED_COLOUR)
        else:
            try:
                references = reference_kind(self.kinds) is not None
                self.scan = scan_concept(ConceptConfig(path=path), references=references)
            except DataError as error:
                self.counts.configure(text=str(error), text_color=ERROR_COLOUR)
            else:
                self._show_counts()
        self._on_scanned()

    def set_kinds(self, kinds: tuple[ConditioningKind, ...]) -> None:
        """The model's conditioning kinds; the folder is scanned again when whether it takes
        references changes (its ``-ref`` files are then references, not images)."""
        changed = (reference_kind(kinds) is None) != (reference_kind(self.kinds) is None)
        self.kinds = kinds
        if changed:
            self.rescan()

    def _show_counts(self, extra: str = "") -> None:
        """The scan's counts (and ``extra``), the pairs for an edit model, and the first
        problem with them in the error colour."""
        assert self.scan is not None
        text, problems = describe_scan(self.scan) + extra, []
        kind = reference_kind(self.kinds)
        if kind is not None:
            folders = [Path(d).expanduser() for d in self.values().get("reference_dirs") or []]
            problems = pair_problems(
                self.scan,
                self.kinds,
                concept=self.prefix,
                field=self.prefix,
                reference_dirs=folders,
            )
            text += " · " + find_pairs(self.scan, kind, folders).describe()
        if problems:
            more = f" (and {len(problems) - 1} more: Check lists them)" if len(problems) > 1 else ""
            text += f"\n{problems[0]}{more}"
        self.counts.configure(text=text, text_color=ERROR_COLOUR if problems else MUTED_COLOUR)

    def show_buckets(self, settings: PreviewSettings | str) -> bool:
        """The bucket histogram of this concept for ``settings``; False while the image
        readers are still loading (call again later)."""
        if self.scan is None or not self.scan.items:
            self.buckets.configure(text="")
            return True
        if isinstance(settings, str):
            self.buckets.configure(text=f"Buckets: {settings}")
            self._show_counts()
            return True
        if not engine_import.ready():
            engine_import.start()
            self.buckets.configure(text="Buckets: loading the image readers…")
            return False
        from modules.data.buckets import histogram_text, place, size_label

        if self._sizes is None:
            self._read_sizes()
        if isinstance(self._sizes, str):
            self.buckets.configure(text=f"Buckets: {self._sizes}")
            self._show_counts()
            return True
        # Each window of a clip is an item of its own, in the histogram too.
        windows = count_windows(self._clips, settings.windows)
        self._show_counts(windows_text(windows, settings))
        buckets = list(settings.buckets) if settings.buckets is not None else None
        counted = [max(n, 1) if n is not None else 1 for n in windows]
        sizes = [size for size, n in zip(self._sizes, counted, strict=True) for _ in range(n)]
        placement = place(sizes, buckets, settings.resolution)
        names = [
            item.image.name
            for item, n in zip(self.scan.items, counted, strict=True)
            for _ in range(n)
        ]
        if buckets is None:
            square = size_label((settings.resolution, settings.resolution))
            text = f"Square crop {square} (buckets off): {histogram_text(placement, names)}"
        else:
            text = f"Buckets: {histogram_text(placement, names)}"
        self.buckets.configure(text=text)
        return True

    def _read_sizes(self) -> None:
        """The items' sizes, and the clips' frame counts and rates, from their headers."""
        from modules.data.images import image_size
        from modules.data.video import clip_info

        assert self.scan is not None
        sizes, clips = [], []
        try:
            for item in self.scan.items:
                if item.clip:
                    info = clip_info(item.image)
                    sizes.append(info.size)
                    clips.append((info.frames, info.fps))
                else:
                    sizes.append(image_size(item.image))
                    clips.append(None)
        except DataError as error:
            self._sizes, self._clips = str(error), []
        else:
            self._sizes, self._clips = sizes, clips


def count_windows(
    clips: list[tuple[int, float] | None], data: DataConfig | None
) -> list[int | None]:
    """Per item, the windows a clip of (frames, source rate) gives in ``data`` (None: clips
    are not cut into windows, nothing counted); None for a still image."""
    if data is None:
        return [None] * len(clips)
    from modules.data.frame_windows import windows_of

    return [len(windows_of(*clip, data)) if clip is not None else None for clip in clips]


def windows_text(windows: list[int | None], settings: PreviewSettings) -> str:
    """`` · 3 clips, 11 windows of 33 frames`` (and the clips too short for one), or nothing
    with ``frame_windows=head``."""
    data = settings.windows
    counted = [n for n in windows if n is not None]
    if data is None or not counted:
        return ""
    text = f" · {count_of(len(counted), 'clip')}, {count_of(sum(counted), 'window')} of "
    text += count_of(data.frames, "frame")
    short = sum(n == 0 for n in counted)
    if short:
        text += f" ({count_of(short, 'clip')} shorter than that: lower data.frames)"
    return text


class ConceptsPanel(ctk.CTkScrollableFrame):
    """The list of concept cards, an Add button, and the scans for the weight-map preview."""

    def __init__(self, parent: tk.Misc, on_change: OnChange) -> None:
        super().__init__(parent, fg_color="transparent")
        self._on_change = on_change
        self._listeners: list[Callable[[], None]] = []
        self._pending_buckets: str | None = None
        self.cards: list[ConceptCard] = []
        bar = ctk.CTkFrame(self, fg_color="transparent")
        bar.pack(fill="x", pady=(4, 8))
        self.add_button = ctk.CTkButton(bar, text="Add concept folder…", command=self._add)
        self.add_button.pack(side="left")
        hint = ctk.CTkLabel(
            bar,
            text="Images with name.txt captions and name-masklabel.png masks.",
            text_color=MUTED_COLOUR,
        )
        hint.pack(side="left", padx=12)
        self.empty = ctk.CTkLabel(self, text="No concepts yet.", text_color=MUTED_COLOUR)

    def on_scans_changed(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def show_buckets(self, settings: Callable[[], PreviewSettings | str]) -> None:
        """Every card's bucket histogram for the current ``settings`` (the data and model
        settings the weight-map preview uses); tried again while the image readers load."""
        if self._pending_buckets is not None:
            self.after_cancel(self._pending_buckets)
            self._pending_buckets = None
        current = settings()
        if not isinstance(current, str):
            from modules.models.registry import conditioning_kinds

            kinds = conditioning_kinds(current.model)
            for card in self.cards:
                card.set_kinds(kinds)
        done = [card.show_buckets(current) for card in self.cards]
        if not all(done):
            self._pending_buckets = self.after(RETRY_MS, lambda: self.show_buckets(settings))

    def values(self) -> list[dict[str, Any]]:
        return [card.values() for card in self.cards]

    def rows(self) -> list[FieldRow]:
        return [row for card in self.cards for row in card.rows()]

    def scans(self) -> list[tuple[ConceptConfig | None, ConceptScan | None]]:
        """Per card: its concept (None while invalid) and its scan (None while unreadable)."""
        found = []
        for card in self.cards:
            try:
                concept = ConceptConfig.model_validate(card.values())
            except ValidationError:
                concept = None
            found.append((concept, card.scan))
        return found

    def load(self, concepts: list[dict[str, Any]]) -> None:
        for card in self.cards:
            card.destroy()
        self.cards = []
        for index, values in enumerate(concepts):
            card = ConceptCard(self, index, values, self._on_change, self.remove, self._scanned)
            card.pack(fill="x", pady=(0, 10))
            card.rescan()
            self.cards.append(card)
        if self.cards:
            self.empty.pack_forget()
        else:
            self.empty.pack(anchor="w")
        self._on_change()
        self._scanned()

    def add(self, folder: Path | str) -> None:
        self.load([*self.values(), {"path": str(folder)}])

    def remove(self, index: int) -> None:
        values = self.values()
        del values[index]
        self.load(values)

    def _add(self) -> None:
        folder = dialogs.ask_directory(self, "Add concept folder")
        if folder is not None:
            self.add(folder)

    def _scanned(self) -> None:
        for listener in self._listeners:
            listener()
