"""The Masks tab: paint a concept image's ``-masklabel.png`` with tier brushes, or generate it.

The image with its mask as a coloured overlay (or the mask as grey levels), for an edit pair its
reference beside it (the difference mode makes the mask of where they differ), brushes for the
face, body and hair tiers (the levels of ``mask.tiers``), erase (0) and a free value, brush
size, fill, undo/redo, zoom (mouse wheel) and pan (right or middle drag). Generate runs the mask
generator (``modules.masks``) for this image or the whole concept in a background thread whose
results come back through a queue polled with ``after()``, as the trainer's do. The weight-map
preview beside the canvas is computed from the mask being edited, through the same loaders and
``process_masks`` as training. Save writes atomically; leaving an edited mask asks first.
"""

from __future__ import annotations

import queue
import tempfile
import threading
import tkinter as tk
from collections.abc import Callable
from pathlib import Path
from typing import Any

import customtkinter as ctk
import numpy as np
from PIL import Image, ImageTk

from app import dialogs
from app.layout import FlowFrame, follow_width
from app.mask_layer import MaskLayer
from app.preview_maps import PreviewMaps, PreviewSettings, compute_maps, load_source, upscale
from app.style import ERROR_COLOUR, MUTED_COLOUR, WARNING_COLOUR
from modules.data.concept import DataError, scan_concept

TIER_COLOURS = {"face": (255, 200, 40), "body": (60, 160, 255), "hair": (200, 90, 255)}
BRUSHES = ("face", "body", "hair", "erase", "value")
ZOOMS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
PREVIEW_DELAY_MS = 150
PREVIEW_SIDE = 220
UNSAVED = " *"
"""After the mask's name while it has edits not saved."""


class MasksTab(ctk.CTkFrame):
    MINIMUM = (560, 420)
    """The least size (logical pixels) that leaves the canvas room; below it the tab scrolls."""

    def __init__(
        self,
        master: tk.Misc,
        values: Callable[[], dict[str, Any]],
        preview_settings: Callable[[], PreviewSettings | str],
    ) -> None:
        super().__init__(master, fg_color="transparent")
        self._values, self._preview_settings = values, preview_settings
        self.layer: MaskLayer | None = None
        self.image_path: Path | None = None
        self.pixels: np.ndarray | None = None
        self.zoom = 1.0
        self.fitted = True
        """Whether the zoom follows the canvas's size (fits the image to it): until the user
        zooms, and again after Fit."""
        self.brush = "body"
        self.maps: PreviewMaps | None = None
        self._stroke: list[tuple[float, float]] = []
        self._preview_job: str | None = None
        self._photo: ImageTk.PhotoImage | None = None
        self._preview_photo: ctk.CTkImage | None = None
        self._results: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._cancel = threading.Event()
        self._worker: threading.Thread | None = None
        self._scratch = Path(tempfile.mkdtemp(prefix="maskprior-preview-"))
        self._build()

    # ------------------------------------------------------------------------------ layout

    def _build(self) -> None:
        self.columnconfigure(0, weight=1)
        self.rowconfigure(3, weight=1)
        # Each row of controls wraps onto further lines in a narrow window.
        top = FlowFrame(self)
        top.grid(row=0, column=0, columnspan=2, sticky="ew", pady=(0, 4))
        self.concept_menu = ctk.CTkOptionMenu(top, values=[""], command=self.choose_concept)
        top.add(self.concept_menu)
        self.image_menu = ctk.CTkOptionMenu(top, values=[""], command=self._choose_image_name)
        top.add(self.image_menu)
        top.add(ctk.CTkButton(top, text="Reload concepts", width=120, command=self.refresh))
        self.save_button = ctk.CTkButton(top, text="Save", width=80, command=self.save)
        top.add(self.save_button)
        self.mask_name = ctk.CTkLabel(top, text="", anchor="w")
        """The mask being edited, ``*`` after its name while it has unsaved edits."""
        top.add(self.mask_name)
        self.status = ctk.CTkLabel(top, text="", text_color=MUTED_COLOUR, anchor="w")
        self.status.configure(justify="left")
        top.add(self.status)
        follow_width(self.status, top, pad=8)

        self.tools = tools = FlowFrame(self, gap=4)
        tools.grid(row=1, column=0, columnspan=2, sticky="ew", pady=2)
        self.brush_buttons = ctk.CTkSegmentedButton(tools, values=list(BRUSHES))
        self.brush_buttons.configure(command=self.choose_brush)
        self.brush_buttons.set(self.brush)
        tools.add(self.brush_buttons)
        self.value_entry = ctk.CTkEntry(tools, width=52)
        self.value_entry.insert(0, "200")
        tools.add(self.value_entry)
        size = ctk.CTkFrame(tools, fg_color="transparent")
        ctk.CTkLabel(size, text="size").pack(side="left", padx=(0, 4))
        self.size_slider = ctk.CTkSlider(size, from_=1, to=100, width=140)
        self.size_slider.set(12)
        self.size_slider.pack(side="left")
        tools.add(size, space_before=6)
        self.tool_buttons: dict[str, ctk.CTkButton] = {}
        for text, command in (
            ("Fill region", lambda: self._fill_mode(True)),
            ("Fill all", self.fill_all),
            ("Undo", self.undo),
            ("Redo", self.redo),
            ("−", lambda: self.set_zoom(-1)),
            ("+", lambda: self.set_zoom(1)),
            ("Fit", self.fit),
        ):
            self.tool_buttons[text] = button = ctk.CTkButton(
                tools, text=text, width=48 if len(text) < 4 else 64, command=command
            )
            tools.add(button)
        self.grey = ctk.CTkCheckBox(tools, text="grey levels", command=self.redraw)
        tools.add(self.grey, space_before=6)

        generate = FlowFrame(self)
        generate.grid(row=2, column=0, columnspan=2, sticky="ew", pady=2)
        self.mode_menu = ctk.CTkOptionMenu(
            generate, values=["tiers", "subject", "difference"], width=110
        )
        generate.add(self.mode_menu)
        self.overwrite_menu = ctk.CTkOptionMenu(
            generate, values=["missing", "never", "all"], width=100
        )
        generate.add(self.overwrite_menu)
        self.generate_image_button = ctk.CTkButton(
            generate, text="Generate this image", command=self.generate_image
        )
        generate.add(self.generate_image_button)
        self.generate_concept_button = ctk.CTkButton(
            generate, text="Generate the concept", command=self.generate_concept
        )
        generate.add(self.generate_concept_button)
        self.cancel_button = ctk.CTkButton(
            generate, text="Cancel", width=80, command=self._cancel.set, state="disabled"
        )
        generate.add(self.cancel_button)
        self.progress = ctk.CTkLabel(generate, text="", anchor="w", justify="left")
        generate.add(self.progress)
        follow_width(self.progress, generate, pad=8)

        self.canvas = tk.Canvas(self, background="#202020", highlightthickness=0)
        self.canvas.grid(row=3, column=0, sticky="nsew")
        self.canvas.bind("<Configure>", lambda _e: self._fit_again(), add="+")
        side = ctk.CTkFrame(self, fg_color="transparent")
        side.grid(row=3, column=1, sticky="n", padx=8)
        ctk.CTkLabel(side, text="target m (green) and prior p (magenta)").pack(anchor="w")
        self.preview = ctk.CTkLabel(side, text="")
        self.preview.pack(anchor="w")
        self.preview_text = ctk.CTkLabel(side, text="", justify="left", anchor="w")
        self.preview_text.pack(anchor="w")
        self.reference_title = ctk.CTkLabel(side, text="", anchor="w", text_color=MUTED_COLOUR)
        self.reference_title.pack(anchor="w", pady=(8, 0))
        self.reference_view = ctk.CTkLabel(side, text="")
        self.reference_view.pack(anchor="w")
        self.reference_path: Path | None = None
        """The shown item's first reference image (an edit pair), or None."""
        self.reference_dirs: list[Path] = []
        """The concept's reference folders (``data.concepts.N.reference_dirs``)."""
        self._reference_photo: ctk.CTkImage | None = None
        self.box: tuple[int, int, int, int] | None = None
        self._filling = False
        self._bind_canvas()

    def _bind_canvas(self) -> None:
        canvas = self.canvas
        canvas.bind("<ButtonPress-1>", self._press)
        canvas.bind("<B1-Motion>", self._drag)
        canvas.bind("<ButtonRelease-1>", self._release)
        canvas.bind("<Shift-ButtonPress-1>", self._box_start)
        canvas.bind("<Shift-B1-Motion>", self._box_drag)
        for button in ("2", "3"):
            canvas.bind(f"<ButtonPress-{button}>", lambda e: canvas.scan_mark(e.x, e.y))
            canvas.bind(f"<B{button}-Motion>", lambda e: canvas.scan_dragto(e.x, e.y, gain=1))
        canvas.bind("<MouseWheel>", lambda e: self.set_zoom(1 if e.delta > 0 else -1))
        canvas.bind("<Button-4>", lambda e: self.set_zoom(1))
        canvas.bind("<Button-5>", lambda e: self.set_zoom(-1))
        top = self.winfo_toplevel()
        top.bind("<Control-z>", lambda e: self.undo(), add="+")
        top.bind("<Control-y>", lambda e: self.redo(), add="+")

    # ------------------------------------------------------------------- concept and image

    def tiers(self) -> dict[str, int]:
        return {name: int(level) for name, level in self._values()["mask"]["tiers"].items()}

    def refresh(self) -> None:
        """The concept menu from the config's concepts (keeps the current one if still there)."""
        paths = [str(c.get("path", "")) for c in self._values()["data"]["concepts"]]
        paths = [p for p in paths if p] or [""]
        self.concept_menu.configure(values=paths)
        current = self.concept_menu.get()
        if current not in paths:
            self.choose_concept(paths[0])

    def choose_concept(self, path: str) -> None:
        if not self.leave():
            self.concept_menu.set(str(self.image_path.parent) if self.image_path else "")
            return
        self.concept_menu.set(path)
        self.items, self.reference_dirs = {}, []
        if path:
            concept = self._concept_values(path)
            self.reference_dirs = [Path(d).expanduser() for d in concept.get("reference_dirs", [])]
            try:
                # An edit concept's references are shown beside their targets, not listed.
                scan = scan_concept(_concept(path), references=self._takes_references())
            except DataError as error:
                self._say(str(error), error=True)
                scan = None
            if scan is not None:
                self.items = {i.image.name: i for i in scan.items if not i.clip}
                if len(self.items) < len(scan.items):
                    self._say("Clips are listed out: their masks are made by Generate the concept")
        names = list(self.items) or [""]
        self.image_menu.configure(values=names)
        self.layer = None
        self.open_image(names[0], ask=False)

    def _choose_image_name(self, name: str) -> None:
        self.open_image(name)

    def open_image(self, name: str, ask: bool = True) -> bool:
        """Show image ``name`` of the concept (asks first when the current mask is edited)."""
        if ask and not self.leave():
            self.image_menu.set(self.image_path.name if self.image_path else "")
            return False
        self.image_menu.set(name)
        item = self.items.get(name)
        if item is None:
            self.layer, self.image_path, self.pixels = None, None, None
            self._show_reference(None)
            self.redraw()
            return False
        from modules.masks.mask_files import read_rgb

        try:
            self.layer = MaskLayer.open(item.image, item.mask)
            self.pixels = read_rgb(item.image)
        except (OSError, ValueError) as error:
            self.layer, self.pixels = None, None
            self._say(str(error), error=True)
            return False
        self.image_path, self.box = item.image, None
        self._show_reference(item)
        self._say("" if item.mask else f"no mask yet: Save writes {self.layer.path.name}")
        self.fit()
        self.schedule_preview()
        return True

    def _concept_values(self, path: str) -> dict[str, Any]:
        """The config's values of the concept at ``path`` (empty if it is not one)."""
        concepts = self._values()["data"]["concepts"]
        return next((c for c in concepts if str(c.get("path", "")) == path), {})

    def _takes_references(self) -> bool:
        """Whether the model takes reference images (an edit model), or the concept names
        reference folders; while the model settings are invalid, the folders decide."""
        settings = self._preview_settings()
        if isinstance(settings, str):
            return bool(self.reference_dirs)
        from modules.models.registry import conditioning_kinds

        kinds = conditioning_kinds(settings.model)
        return any(kind.source == "references" for kind in kinds) or bool(self.reference_dirs)

    def _show_reference(self, item: Any) -> None:
        """The item's first reference beside the canvas (in the concept's reference folders,
        else ``name-ref.png`` beside it), or nothing when it has none."""
        from modules.data.conditioning import conditioning_sources
        from modules.models.spec import ConditioningKind

        kind = ConditioningKind(name="reference", source="references", most=99)
        found = conditioning_sources(item, kind, self.reference_dirs) if item else ()
        self.reference_path = found[0] if found else None
        self._reference_photo = None
        if self.reference_path is None:
            self.reference_title.configure(text="")
            self.reference_view.configure(image="")
            return
        try:
            with Image.open(self.reference_path) as opened:
                picture = opened.convert("RGB")
        except (OSError, ValueError) as error:
            self.reference_title.configure(text=f"reference {self.reference_path.name}: {error}")
            self.reference_view.configure(image="")
            return
        scale = PREVIEW_SIDE / max(picture.size)
        small = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        picture = picture.resize(small, Image.Resampling.LANCZOS)
        self._reference_photo = ctk.CTkImage(light_image=picture, dark_image=picture, size=small)
        self.reference_title.configure(text=f"reference: {self.reference_path.name}")
        self.reference_view.configure(image=self._reference_photo)

    def leave(self) -> bool:
        """Whether the current mask may be left: not edited, or saved or dropped as asked
        (Cancel: stay with it, edits kept)."""
        if self.layer is None or not self.layer.dirty:
            return True
        question = (
            f"Save the edited mask {self.layer.path.name}?\n\n"
            "Yes: save it. No: drop the edits. Cancel: go on editing."
        )
        answer = dialogs.ask_yes_no_cancel(self, "Unsaved mask", question)
        if answer is None:
            return False
        if answer:
            return self.save()
        self.layer = None
        return True

    def save(self) -> bool:
        if self.layer is None:
            return True
        try:
            path = self.layer.save()
        except OSError as error:
            self._say(f"could not save {self.layer.path} ({error}); the file is as it was", True)
            return False
        self._say(f"saved {path}")
        self._show_name()
        return True

    def _show_name(self) -> None:
        """The mask's name, marked while it has unsaved edits."""
        if self.layer is None:
            self.mask_name.configure(text="")
            return
        edited = self.layer.dirty
        self.mask_name.configure(
            text=self.layer.path.name + (UNSAVED if edited else ""),
            text_color=WARNING_COLOUR if edited else MUTED_COLOUR,
        )

    # ------------------------------------------------------------------------------ editing

    def choose_brush(self, brush: str) -> None:
        self.brush = brush
        self.brush_buttons.set(brush)
        self._filling = False

    def brush_value(self) -> int:
        if self.brush == "erase":
            return 0
        if self.brush == "value":
            try:
                return int(np.clip(int(self.value_entry.get()), 0, 255))
            except ValueError:
                return 0
        return self.tiers()[self.brush]

    def image_point(self, x: int, y: int) -> tuple[float, float]:
        """Canvas widget coordinates → image pixels (zoom and pan undone)."""
        return self.canvas.canvasx(x) / self.zoom, self.canvas.canvasy(y) / self.zoom

    def _press(self, event: tk.Event) -> None:
        if self.layer is None:
            return
        point = self.image_point(event.x, event.y)
        if self._filling:
            self._filling = False
            self.layer.fill(point, self.brush_value())
            self._edited()
            return
        self.layer.begin()
        self._stroke = [point]
        self.layer.paint(self._stroke, self.radius(), self.brush_value())
        self.redraw()

    def _drag(self, event: tk.Event) -> None:
        if self.layer is None or not self._stroke:
            return
        point = self.image_point(event.x, event.y)
        self.layer.paint([self._stroke[-1], point], self.radius(), self.brush_value())
        self._stroke.append(point)
        self.redraw()

    def _release(self, _event: tk.Event) -> None:
        if self._stroke:
            self._stroke = []
            self._edited()

    def radius(self) -> int:
        return max(0, round(self.size_slider.get() / 2))

    def _fill_mode(self, on: bool) -> None:
        self._filling = on
        self._say("click a region to fill it with the brush's value")

    def fill_all(self) -> None:
        if self.layer is not None:
            self.layer.fill(None, self.brush_value())
            self._edited()

    def undo(self) -> None:
        if self.layer is not None and self.layer.can_undo:
            self.layer.undo()
            self._edited()

    def redo(self) -> None:
        if self.layer is not None and self.layer.can_redo:
            self.layer.redo()
            self._edited()

    def _box_start(self, event: tk.Event) -> None:
        x, y = self.image_point(event.x, event.y)
        self.box = (round(x), round(y), round(x), round(y))

    def _box_drag(self, event: tk.Event) -> None:
        if self.box is not None:
            x, y = self.image_point(event.x, event.y)
            self.box = (self.box[0], self.box[1], round(x), round(y))
            self.redraw()

    def _edited(self) -> None:
        self.redraw()
        self.schedule_preview()

    def set_zoom(self, direction: int) -> None:
        """The next zoom step in or out (``direction`` +1, -1) from the current zoom."""
        if direction > 0:
            self.zoom_to(next((z for z in ZOOMS if z > self.zoom * 1.001), ZOOMS[-1]))
        else:
            self.zoom_to(next((z for z in reversed(ZOOMS) if z < self.zoom / 1.001), ZOOMS[0]))

    def zoom_to(self, zoom: float) -> None:
        """Show the image at ``zoom`` (screen pixels per image pixel), no longer fitted."""
        self.fitted = False
        self.zoom = zoom
        self.redraw()

    def fit(self) -> None:
        """The whole image in view, as large as the canvas holds (and again as it resizes)."""
        self.fitted = True
        self.canvas.xview_moveto(0)
        self.canvas.yview_moveto(0)
        self._fit_again()

    def _fit_again(self) -> None:
        if not self.fitted or self.layer is None:
            self.redraw()
            return
        height, width = self.layer.levels.shape
        room_width, room_height = self.canvas.winfo_width(), self.canvas.winfo_height()
        if room_width > 1 and room_height > 1:
            # Not past the largest zoom step: a tiny image stays a picture, not a few blocks.
            self.zoom = min(room_width / width, room_height / height, ZOOMS[-1])
        self.redraw()

    # ------------------------------------------------------------------------------ drawing

    def shown(self) -> np.ndarray | None:
        """What the canvas shows, at the image's size: the mask in grey, or the overlay."""
        if self.layer is None or self.pixels is None:
            return None
        levels = self.layer.levels
        if self.grey.get():
            return np.repeat(levels[..., None], 3, axis=2)
        tint = np.zeros_like(self.pixels, dtype=np.float32)
        strength = np.zeros(levels.shape, np.float32)
        tiers = self.tiers()
        for name, colour in TIER_COLOURS.items():
            at = levels == tiers[name]
            tint[at], strength[at] = colour, 0.5
        other = (levels > 0) & (strength == 0)
        tint[other], strength[other] = (255, 255, 255), levels[other] / 255 * 0.5
        blend = self.pixels * (1 - strength[..., None]) + tint * strength[..., None]
        return np.clip(blend, 0, 255).astype(np.uint8)

    def redraw(self) -> None:
        self.canvas.delete("all")
        self._show_name()
        shown = self.shown()
        if shown is None:
            return
        height, width = shown.shape[:2]
        size = (max(1, round(width * self.zoom)), max(1, round(height * self.zoom)))
        picture = Image.fromarray(shown).resize(size, Image.Resampling.NEAREST)
        self._photo = ImageTk.PhotoImage(picture)
        self.canvas.create_image(0, 0, image=self._photo, anchor="nw")
        self.canvas.configure(scrollregion=(0, 0, *size))
        if self.box is not None:
            x0, y0, x1, y1 = (v * self.zoom for v in self.box)
            self.canvas.create_rectangle(x0, y0, x1, y1, outline="#ffdd00", dash=(4, 2))

    # ------------------------------------------------------------------------------ preview

    def schedule_preview(self) -> None:
        """The weight maps of the mask being edited, soon (one update per pause in painting)."""
        if self._preview_job is not None:
            self.after_cancel(self._preview_job)
        self._preview_job = self.after(PREVIEW_DELAY_MS, self.update_preview)

    def update_preview(self) -> None:
        self._preview_job = None
        settings = self._preview_settings()
        if self.layer is None or self.image_path is None or isinstance(settings, str):
            self.maps = None
            self.preview_text.configure(text=settings if isinstance(settings, str) else "")
            return
        edited = self._scratch / "edited-masklabel.png"
        Image.fromarray(self.layer.levels, "L").save(edited)
        with Image.open(self.image_path) as image:
            size = settings.training_size(image.size)
        source = load_source(self.image_path, edited, size, settings.pixels_per_cell)
        self.maps = compute_maps(source, settings.weighting())
        self._show_maps(source.image, self.maps)

    def _show_maps(self, image: np.ndarray, maps: PreviewMaps) -> None:
        from app.preview_maps import PRIOR_COLOUR, TARGET_COLOUR

        size = (image.shape[1], image.shape[0])
        target, prior = upscale(maps.target, size)[..., None], upscale(maps.prior, size)[..., None]
        tint = np.clip(target * TARGET_COLOUR + prior * PRIOR_COLOUR, 0, 255).astype(np.uint8)
        scale = PREVIEW_SIDE / max(size)
        small = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
        picture = Image.fromarray(tint).resize(small, Image.Resampling.NEAREST)
        self._preview_photo = ctk.CTkImage(light_image=picture, dark_image=picture, size=small)
        self.preview.configure(image=self._preview_photo)
        self.preview_text.configure(
            text=f"mean m {maps.target_mean:.3f}   mean p {maps.prior_mean:.3f}\n"
            f"prior acts on {maps.prior_share:.0%} of the latent cells"
        )

    # ----------------------------------------------------------------------------- generate

    @property
    def generating(self) -> bool:
        return self._worker is not None

    def generate_image(self) -> None:
        if self.layer is None or self.pixels is None or self.generating:
            return
        mode, pixels, box = self.mode_menu.get(), self.pixels, self.box
        tiers, reference = self.tiers(), self.reference_path
        if mode == "difference" and reference is None:
            self.progress.configure(
                text="difference: this image has no reference (name-ref.png beside it, or a "
                "file of its name in the concept's reference folders)",
                text_color=ERROR_COLOUR,
            )
            return

        def work() -> Any:
            from modules.config.schema import MaskTiersConfig
            from modules.masks import generate_subject, generate_tiers
            from modules.masks.subject import margin_box

            if mode == "tiers":
                return generate_tiers(pixels, MaskTiersConfig(**tiers))
            if mode == "difference":
                from modules.masks.difference import generate_difference
                from modules.masks.mask_files import read_rgb

                assert reference is not None
                return generate_difference(pixels, read_rgb(reference), MaskTiersConfig(**tiers))
            # The box dragged with Shift held, else one a twentieth inside the edges.
            return generate_subject(pixels, box=_ordered(box) or margin_box(pixels.shape, 0.05))

        self._start("image", work)

    def generate_concept(self) -> None:
        folder = self.concept_menu.get()
        if not folder or self.generating or not self.leave():
            return
        mode, overwrite, tiers = self.mode_menu.get(), self.overwrite_menu.get(), self.tiers()
        cancel, results, folders = self._cancel, self._results, list(self.reference_dirs)

        def work() -> Any:
            from modules.config.schema import MaskTiersConfig
            from modules.masks import masks_for_concept

            return masks_for_concept(
                Path(folder),
                mode=mode,
                overwrite=overwrite,
                tiers=MaskTiersConfig(**tiers),
                on_progress=lambda done, total, item: results.put(("progress", (done, total))),
                cancel=cancel,
                reference_dirs=folders,
            )

        self._start("concept", work)

    def _start(self, kind: str, work: Callable[[], Any]) -> None:
        self._cancel.clear()
        results = self._results

        def run() -> None:
            try:
                results.put((kind, work()))
            except Exception as error:  # shown to the user, never raised in the worker
                results.put(("error", f"{type(error).__name__}: {error}"))

        self._worker = threading.Thread(target=run, name="mask-generator", daemon=True)
        self._worker.start()
        self.cancel_button.configure(state="normal")
        self.progress.configure(text="generating ...", text_color=MUTED_COLOUR)
        self.after(50, self._poll)

    def _poll(self) -> None:
        while True:
            try:
                kind, payload = self._results.get_nowait()
            except queue.Empty:
                break
            if kind == "progress":
                done, total = payload
                self.progress.configure(text=f"{done}/{total}")
                continue
            self._worker = None
            self.cancel_button.configure(state="disabled")
            self._finished(kind, payload)
            return
        if self.winfo_exists():
            self.after(50, self._poll)

    def _finished(self, kind: str, payload: Any) -> None:
        if kind == "error":
            self.progress.configure(text=payload, text_color=ERROR_COLOUR)
        elif kind == "image":
            if payload.mask is None or self.layer is None:
                self.progress.configure(text=payload.note or "nothing found")
                return
            self.layer.replace(payload.mask)
            self.progress.configure(text="generated: Save to keep it, Undo to drop it")
            self._edited()
        else:
            sought = {"tiers": "person", "difference": "change"}.get(self.mode_menu.get())
            self.progress.configure(
                text=" ".join([payload.line(sought or "subject"), *payload.notes])
            )
            current = self.image_path.name if self.image_path else ""
            self.choose_concept(self.concept_menu.get())
            if current in self.items:
                self.open_image(current, ask=False)

    def _say(self, text: str, error: bool = False) -> None:
        self.status.configure(text=text, text_color=ERROR_COLOUR if error else MUTED_COLOUR)

    def destroy(self) -> None:
        self._cancel.set()
        for leftover in self._scratch.glob("*"):
            leftover.unlink(missing_ok=True)
        self._scratch.rmdir()
        super().destroy()


def _concept(path: str) -> Any:
    from modules.config.schema import ConceptConfig

    return ConceptConfig(path=path)


def _ordered(box: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
    if box is None:
        return None
    x0, y0, x1, y1 = box
    if abs(x1 - x0) < 4 or abs(y1 - y0) < 4:
        return None
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)
