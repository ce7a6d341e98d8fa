"""The main window: a top bar (presets, Load, Save, Save as, model family) and the tabs.

The window wires the pieces together and owns nothing a piece can own itself: the forms are
built from the config model, the config form validates, the run panel talks to the trainer
thread, the user store keeps files.
"""

from __future__ import annotations

import tkinter as tk
from pathlib import Path

import customtkinter as ctk
from pydantic import BaseModel

from app import dialogs, engine_import
from app.concepts_panel import ConceptsPanel
from app.config_form import ConfigForm, Validation
from app.field_specs import section_specs
from app.field_widgets import FieldRow, SectionForm
from app.layout import FitScrollFrame, FlowFrame, elide, window_size
from app.masks_tab import MasksTab
from app.preview_maps import PreviewSettings, settings_from_values
from app.run_panel import RunPanel
from app.style import MUTED_COLOUR
from app.tooltip import Tooltip
from app.trainer_thread import TrainerThread
from app.user_store import PresetEntry, UserStore
from app.weight_preview import PreviewImage, WeightPreview
from modules.config import ConfigError, TrainConfig, load_preset
from modules.config.presets import read_description
from modules.models.memory_estimate import estimate_lines
from modules.models.registry import family_spec, folder_summary

TITLE = "MaskPrior Trainer"
TABS: dict[str, tuple[str, ...]] = {
    "Model": ("model",),
    "Concepts": ("data",),
    "Training": ("training", "output"),
    "LoRA": ("lora",),
    "Masked training": ("mask",),
    "Prior preservation": ("prior",),
    "Sampling": ("sampling", "drift"),
    "Masks": (),
    "Run": (),
}
"""Which config sections each tab shows. A section added to the config and not listed here
lands on the Model tab (family options are its likely kind), so no field is ever left out."""
TOP_BAR_FIELDS = {"model": ("family",)}
LIST_EDITORS = {"data": ("concepts",)}
DEFAULT_PRESET = "demo-prior"
TAB_FONT_SIZES = (13, 12, 11, 10)
"""The tab names' font sizes, largest first: the first whose names fit the window is used."""


class MainWindow(ctk.CTk):
    def __init__(self, store: UserStore | None = None, preset: Path | None = None) -> None:
        super().__init__()
        self.title(TITLE)
        self.fit_to_screen()
        self.store = store if store is not None else UserStore()
        self.trainer = TrainerThread()
        self.form = ConfigForm(self)
        self.preset_path: Path | None = None
        self.preset_description: str | None = None
        self.closed = False
        self._closing = False
        self.signalled = 0
        """The signal that closed the window (0: none), for the exit status."""
        self.preview_selection = tk.StringVar(self)
        self.columnconfigure(0, weight=1)
        self.rowconfigure(1, weight=1)
        self._build_top_bar()
        self._build_tabs()
        self.form.on_validated(self._validated)
        self.protocol("WM_DELETE_WINDOW", self.close)
        engine_import.start()
        self._load_initial(preset)

    # -------------------------------------------------------------------------------- build

    def fit_to_screen(self) -> None:
        """Open at a size the screen holds (less room for the window frame and a taskbar)."""
        size = window_size(
            self.winfo_screenwidth(), self.winfo_screenheight(), self._get_window_scaling()
        )
        self.minsize(size.min_width, size.min_height)
        self.geometry(size.geometry())

    def _build_top_bar(self) -> None:
        bar = ctk.CTkFrame(self, corner_radius=0)
        bar.grid(row=0, column=0, sticky="ew")
        bar.columnconfigure(0, weight=1)
        # The controls wrap onto a second line in a narrow window rather than leave it.
        self.top_controls = controls = FlowFrame(bar)
        controls.grid(row=0, column=0, sticky="ew", padx=12, pady=(8, 6))
        controls.add(ctk.CTkLabel(controls, text="Preset"))
        self.preset_menu = ctk.CTkOptionMenu(
            controls, values=[""], width=260, command=self.choose_preset, dynamic_resizing=False
        )
        controls.add(self.preset_menu)
        self.load_button = ctk.CTkButton(controls, text="Load…", width=80, command=self.load_dialog)
        self.save_button = ctk.CTkButton(controls, text="Save", width=80, command=self.save)
        self.save_as_button = ctk.CTkButton(
            controls, text="Save as…", width=90, command=self.save_as
        )
        for button in (self.load_button, self.save_button, self.save_as_button):
            controls.add(button)
        family_frame = ctk.CTkFrame(controls, fg_color="transparent")
        controls.add(family_frame, space_before=22)
        self.top_rows: list[FieldRow] = []
        for section, names in TOP_BAR_FIELDS.items():
            model = TrainConfig.model_fields[section].annotation
            for spec in section_specs(model, section):
                if spec.name in names:
                    column = 2 * len(self.top_rows)
                    row = FieldRow(family_frame, spec, 0, self.form.changed, column=column)
                    self.top_rows.append(row)
        self.form.add_rows(self.top_rows)
        # The preset's description: one line under the controls, cut to the window's width;
        # the whole text on hover.
        self.preset_label = ctk.CTkLabel(
            bar,
            text="",
            text_color=MUTED_COLOUR,
            anchor="w",
            justify="left",
            font=ctk.CTkFont(size=12),
        )
        self.preset_label.grid(row=1, column=0, sticky="ew", padx=14, pady=(0, 6))
        self.preset_tooltip = Tooltip(self.preset_label, "")
        tk.Misc.bind(bar, "<Configure>", lambda _e: self._show_description(), add="+")
        self._refresh_preset_menu()

    def _show_description(self) -> None:
        text = self.preset_description or ""
        self.preset_tooltip.text = text
        if not text:
            self.preset_label.grid_remove()
            return
        room = self.preset_label.master.winfo_width() - 28
        font = self.preset_label.cget("font")
        shown = elide(text, font, self.preset_label._reverse_widget_scaling(room))
        if self.preset_label.cget("text") != shown:
            self.preset_label.configure(text=shown)
        self.preset_label.grid()

    def _build_tabs(self) -> None:
        self._tab_font = ctk.CTkFont(size=TAB_FONT_SIZES[0])
        self.tabs = ctk.CTkTabview(self, anchor="nw", command=self._tab_shown)
        self.tabs.grid(row=1, column=0, sticky="nsew", padx=8, pady=(0, 8))
        self.section_forms: dict[str, SectionForm] = {}
        placed = {section for sections in TABS.values() for section in sections}
        extra = tuple(name for name in TrainConfig.model_fields if name not in placed)
        self.previews: list[WeightPreview] = []
        for name, sections in TABS.items():
            tab = self.tabs.add(name)
            tab.columnconfigure(0, weight=1)
            tab.rowconfigure(0, weight=1)
            if name == "Run":
                # Below its minimum size the tab scrolls, rather than squeeze the charts.
                self.run_pane = FitScrollFrame(tab, RunPanel.MINIMUM)
                self.run_pane.grid(row=0, column=0, sticky="nsew")
                self.run_panel = RunPanel(
                    self.run_pane.inner,
                    self.trainer,
                    self._config_for_run,
                    before_start=self._before_start,
                )
                _fill(self.run_pane.inner, self.run_panel)
                continue
            if name == "Masks":
                self.masks_pane = FitScrollFrame(tab, MasksTab.MINIMUM)
                self.masks_pane.grid(row=0, column=0, sticky="nsew")
                self.masks = MasksTab(
                    self.masks_pane.inner, self.form.values, self._preview_settings
                )
                _fill(self.masks_pane.inner, self.masks)
                continue
            if name == "Model":
                sections = sections + extra
            if name == "Concepts":
                # The data fields stay in view; the concept cards below them scroll.
                holder = ctk.CTkFrame(tab, fg_color="transparent")
                holder.grid(row=0, column=0, sticky="ew")
                for section in sections:
                    self._add_section(holder, section)
                self.concepts = ConceptsPanel(tab, self.form.changed)
                tab.rowconfigure(0, weight=0)
                tab.rowconfigure(1, weight=1)
                self.concepts.grid(row=1, column=0, sticky="nsew")
                self.form.add_list("data.concepts", self.concepts.values, self.concepts.rows)
                self.concepts.on_scans_changed(self._update_preview_images)
                self.concepts.on_scans_changed(
                    lambda: self.concepts.show_buckets(self._preview_settings)
                )
                continue
            scroll = ctk.CTkScrollableFrame(tab, fg_color="transparent")
            scroll.grid(row=0, column=0, sticky="nsew")
            for section in sections:
                self._add_section(scroll, section)
            if name == "Model":
                self._add_memory_estimate()
            if name in ("Masked training", "Prior preservation"):
                preview = WeightPreview(scroll, self.preview_selection, self._preview_settings)
                preview.pack(anchor="w", fill="x", pady=(12, 0))
                self.previews.append(preview)
        self.run_panel.on_run_end(self._run_ended)
        tk.Misc.bind(self.tabs, "<Configure>", lambda _e: self._fit_tab_names(), add="+")

    def _fit_tab_names(self) -> None:
        """A smaller font for the tab names where the window is too narrow for all of them."""
        names = self.tabs._segmented_button  # customtkinter offers no other way to it
        if names.cget("font") is not self._tab_font:
            names.configure(font=self._tab_font)
        room = self.tabs.winfo_width() - 16
        for size in TAB_FONT_SIZES:
            if self._tab_font.cget("size") != size:
                self._tab_font.configure(size=size)
                names.update_idletasks()
            if names.winfo_reqwidth() <= room:
                return

    def _tab_shown(self) -> None:
        if self.tabs.get() == "Masks":
            self.masks.refresh()

    def _add_memory_estimate(self) -> None:
        """A read-only line under the Memory section: the config's estimated peak GPU memory."""
        memory = next(f for f in self.section_forms["model"].subforms if f.prefix == "model.memory")
        self.memory_estimate = ctk.CTkLabel(
            memory, text="", justify="left", anchor="w", wraplength=640
        )
        row = memory.grid_size()[1]
        self.memory_estimate.grid(row=row, column=0, columnspan=2, sticky="w", pady=(4, 0))
        wan = next(f for f in self.section_forms["model"].subforms if f.prefix == "model.wan")
        self.detected_model = ctk.CTkLabel(wan, text="", justify="left", anchor="w", wraplength=640)
        row = wan.grid_size()[1]
        self.detected_model.grid(row=row, column=0, columnspan=2, sticky="w", pady=(4, 0))

    def _show_memory_estimate(self, validation: Validation) -> None:
        config = validation.config
        lines = [] if config is None else estimate_lines(config)
        self.memory_estimate.configure(text="\n".join(lines))
        # The folder's detected form (WAN: text- or image-to-video), under its family's options.
        self.detected_model.configure(text=(config and folder_summary(config.model)) or "")

    def _add_section(self, parent: tk.Misc, section: str) -> None:
        model: type[BaseModel] = TrainConfig.model_fields[section].annotation
        exclude = TOP_BAR_FIELDS.get(section, ()) + LIST_EDITORS.get(section, ())
        title = TrainConfig.model_fields[section].title
        form = SectionForm(parent, model, section, self.form.changed, exclude=exclude, title=title)
        form.pack(anchor="w", fill="x", padx=8, pady=(0, 10))
        self.section_forms[section] = form
        self.form.add_rows(form.all_rows())

    # ----------------------------------------------------------------------------- presets

    def _refresh_preset_menu(self) -> None:
        self.preset_entries: dict[str, PresetEntry] = {e.label: e for e in self.store.presets()}
        self.preset_menu.configure(values=list(self.preset_entries) or [""])

    def choose_preset(self, label: str) -> None:
        entry = self.preset_entries.get(label)
        if entry is not None:
            self.load_preset_file(entry.path)

    def load_dialog(self) -> None:
        path = dialogs.ask_open_preset(self, self.store.presets_dir)
        if path is not None:
            self.load_preset_file(path)

    def load_preset_file(self, path: Path) -> bool:
        """Load a preset into the window; a bad file shows why and keeps the current config."""
        try:
            config = load_preset(path)
        except ConfigError as error:
            dialogs.show_error(self, "Could not load the preset", str(error))
            self._show_preset_name()
            return False
        self.preset_path = Path(path)
        self.preset_description = read_description(path)
        self.apply_config(config)
        return True

    def apply_config(self, config: TrainConfig) -> None:
        """Show ``config`` in every widget."""
        self._write_demo_data(config)
        self.form.load(config)
        self.concepts.load([concept.model_dump() for concept in config.data.concepts])
        self._show_preset_name()

    def _write_demo_data(self, config: TrainConfig) -> None:
        # A demo preset points at demo-data/, written on first use: writing it now (a fraction
        # of a second, once) gives the concept counts and the preview something to show.
        from modules.demo.data_folder import ensure_demo_data

        try:
            ensure_demo_data(config)
        except OSError as error:
            self.run_panel.log(f"Could not write the demo dataset: {error}", "warning")

    def _show_preset_name(self) -> None:
        path = self.preset_path
        if path is None:
            name = "unsaved"
        else:
            name = f"{path.stem} (built-in)" if self.store.is_builtin(path) else path.stem
        self.preset_menu.set(name)
        self._show_description()
        self.title(f"{TITLE} — {name}")

    def save(self) -> None:
        if self.preset_path is None or self.store.is_builtin(self.preset_path):
            self.save_as()
            return
        config = self._valid_config("Save")
        if config is not None:
            self.store.save(config, self.preset_path, self.preset_description)
            self.run_panel.log(f"Saved preset {self.preset_path}")

    def save_as(self) -> None:
        config = self._valid_config("Save as")
        if config is None:
            return
        name = dialogs.ask_text(self, "Save preset as", "Name of your preset:")
        if name is None:
            return
        try:
            path = self.store.preset_path(name)
        except ConfigError as error:
            dialogs.show_error(self, "Save as", str(error))
            return
        if path.exists() and not dialogs.ask_yes_no(
            self, "Save as", f"A preset named '{path.stem}' exists. Replace it?"
        ):
            return
        # A new preset starts without the old one's description, which no longer fits it.
        self.store.save(config, path)
        self.preset_path = path
        self.preset_description = None
        self._refresh_preset_menu()
        self._show_preset_name()
        self.run_panel.log(f"Saved preset {path}")

    def _valid_config(self, action: str) -> TrainConfig | None:
        validation = self.form.validate()
        if validation.config is None:
            problems = "\n".join(validation.blockers)
            dialogs.show_error(self, action, f"Fix the marked fields first:\n{problems}")
        return validation.config

    def _load_initial(self, preset: Path | None) -> None:
        if preset is not None and self.load_preset_file(preset):
            return
        try:
            config = self.store.load_last_used()
        except ConfigError as error:
            notice = f"The last-used config was not restored; the default preset is open.\n{error}"
            self.run_panel.log(notice, "warning")
            dialogs.show_error(self, "Last-used config not restored", notice)
            config = None
        if config is not None:
            self.apply_config(config)
            self.preset_menu.set("(last used)")
            self.title(f"{TITLE} — last used")
            return
        default = self.store.builtin_dir / f"{DEFAULT_PRESET}.json"
        if not (default.is_file() and self.load_preset_file(default)):
            self.apply_config(TrainConfig())

    # ------------------------------------------------------------------------ form, preview

    def _validated(self, validation: Validation) -> None:
        self.run_panel.set_validation(validation)
        self._show_family_fields()
        self._show_memory_estimate(validation)
        self._update_preview_images()
        self.concepts.show_buckets(self._preview_settings)

    def _show_family_fields(self) -> None:
        """Show only the fields of the chosen model family; a field with an error stays in
        view whatever the family, so nothing that blocks a run is hidden."""
        family = str(self.form.row("model.family").get())
        for row in self.form.rows().values():
            row.set_visible(row.spec.applies_to(family) or row.message is not None)
        for form in self.section_forms.values():
            form.show_family(family)
        # Each family has its own LoRA target presets; the menu offers only those.
        self.form.row("lora.targets").control.offer(tuple(family_spec(family).lora_targets))

    def _preview_settings(self) -> PreviewSettings | str:
        return settings_from_values(self.form.values())

    def _update_preview_images(self) -> None:
        images = []
        for index, (concept, scan) in enumerate(self.concepts.scans()):
            if scan is None:
                continue
            prior = concept is not None and concept.type == "prior_prediction"
            images += [
                PreviewImage(f"{index + 1}: {item.image.name}", item.image, item.mask, prior)
                for item in scan.items
            ]
        for preview in self.previews:
            preview.set_images(images)

    # --------------------------------------------------------------------------------- run

    def _config_for_run(self) -> TrainConfig | None:
        return self.form.validate().config

    def _before_start(self, config: TrainConfig) -> None:
        self.store.save_last_used(config)

    def _run_ended(self, _event: object) -> None:
        if self._closing:
            self._finish_close()

    # ------------------------------------------------------------------------------- close

    def close(self) -> None:
        """Window close: while training, ask; then stop (the trainer saves the LoRA) and close
        when the trainer reports that it has ended."""
        if self._closing:
            return
        if not self.masks.leave():
            return
        if self.run_panel.state != "idle":
            question = "Training is running. Stop it, save the LoRA and close?"
            if not dialogs.ask_yes_no(self, "Close MaskPrior Trainer", question):
                return
            self._closing = True
            self.run_panel.stop()
            return
        self._finish_close()

    def close_for_signal(self, signum: int) -> None:
        """A polite signal: stop the run (the trainer saves the LoRA) and close, not asking."""
        if self.signalled:
            return
        from modules.signals import signal_name

        self.signalled = signum
        self.run_panel.log(
            f"{signal_name(signum)}: stopping, saving the LoRA and closing", "warning"
        )
        if self.run_panel.state == "idle":
            self._finish_close()
            return
        self._closing = True
        self.run_panel.stop()

    def _finish_close(self) -> None:
        config = self.form.validate().config
        if config is not None:
            self.store.save_last_used(config)
        self.closed = True
        self.destroy()

    def destroy(self) -> None:
        self.form.cancel()
        # customtkinter leaves after() callbacks scheduled (DPI checks, redraws); cancelled
        # here, they do not fire on the destroyed widgets and print "invalid command name".
        # (Tcl's own cancel: tkinter's after_cancel also deletes the callback's command, which
        # the widget owning it deletes again when destroyed.)
        for pending in self.tk.splitlist(self.tk.call("after", "info")):
            self.tk.call("after", "cancel", pending)
        super().destroy()


def _fill(parent: tk.Misc, child: tk.Misc) -> None:
    parent.rowconfigure(0, weight=1)
    parent.columnconfigure(0, weight=1)
    child.grid(row=0, column=0, sticky="nsew", padx=4, pady=4)
