"""The real window under Xvfb: widgets from the config, presets, validation, last-used config."""

import json
from pathlib import Path

import pytest

from app.field_specs import leaf_paths
from app.user_store import BUILTIN_PRESETS, UserStore
from modules.config import TrainConfig, load_preset
from modules.config.schema import MaskConfig, ModelConfig, PriorConfig
from modules.models.registry import SPECS
from tests.app.driving import settle

pytestmark = pytest.mark.ui

TAB_NAMES = [
    "Model",
    "Concepts",
    "Training",
    "LoRA",
    "Masked training",
    "Prior preservation",
    "Sampling",
    "Masks",
    "Run",
]


def set_text(row, text):
    row.control.text.set(text)


def test_tabs_and_the_top_bar(window):
    assert [window.tabs.get(i) for i in range(window.tabs.len())] == TAB_NAMES
    labels = {button.cget("text") for button in (window.save_button, window.save_as_button)}
    assert labels == {"Save", "Save as…"}
    assert window.form.row("model.family").control.menu.cget("values") == list(
        ModelConfig.model_fields["family"].annotation.__args__
    )


def test_every_field_has_exactly_one_widget_built_from_its_metadata(window):
    concepts = len(window.concepts.cards)
    assert concepts >= 1
    rows = window.form.rows()
    assert sorted(rows) == sorted(leaf_paths(TrainConfig, items=concepts))
    gamma = rows["mask.gamma"]
    field = MaskConfig.model_fields["gamma"]
    assert gamma.label.cget("text") == field.title
    assert field.description in gamma.tooltip.text
    assert gamma.control.slider.cget("from_") == 0.01 and gamma.control.slider.cget("to") == 10
    threshold = rows["prior.threshold"].control
    assert threshold.switch is not None and threshold.slider is not None
    assert rows["training.learning_rate"].control.slider is None
    assert rows["sampling.prompts"].control.textbox is not None
    assert rows["mask.enabled"].control.switch is not None


@pytest.mark.parametrize("preset", sorted(p.name for p in BUILTIN_PRESETS.glob("*.json")))
def test_a_loaded_preset_reads_back_as_the_same_config(window, preset):
    path = BUILTIN_PRESETS / preset
    label = f"{path.stem} (built-in)"
    assert label in window.preset_menu.cget("values")
    window.choose_preset(label)
    settle(window)
    assert window.form.validate().config == load_preset(path)
    assert window.preset_menu.get() == label
    assert path.stem in window.title()


def test_an_invalid_value_is_marked_and_blocks_start(window):
    row = window.form.row("mask.gamma")
    set_text(row, "0")
    settle(window)
    assert row.message == "Input should be greater than 0"
    assert row.error.winfo_ismapped()
    assert window.run_panel.start_button.cget("state") == "disabled"
    assert "mask.gamma: Input should be greater than 0" in window.run_panel.problems.cget("text")
    set_text(row, "0.8")
    settle(window)
    assert row.message is None
    assert window.run_panel.start_button.cget("state") == "normal"
    assert window.form.validation.config.mask.gamma == 0.8


def test_a_cross_field_rule_marks_the_field_it_names(window):
    window.form.row("prior.weight").set(1.0)
    window.form.row("mask.enabled").set(False)
    settle(window)
    assert "needs masks" in window.form.row("prior.weight").message
    assert window.run_panel.start_button.cget("state") == "disabled"


def test_the_optional_threshold_has_an_off_state(window):
    row = window.form.row("prior.threshold")
    row.set(None)
    settle(window)
    assert window.form.validation.config.prior.threshold is None
    assert row.control.entry.cget("state") == "disabled"
    row.control.enabled.set(True)
    settle(window)
    assert window.form.validation.config.prior.threshold == pytest.approx(0.1)
    row.control.slider.set(0.25)
    settle(window)
    assert row.control.text.get() == "0.25"
    assert window.form.validation.config.prior.threshold == 0.25
    set_text(row, "1.5")
    settle(window)
    assert row.message == "Input should be less than 1"


def test_a_bad_preset_shows_why_and_keeps_the_config(window, answers, tmp_path):
    before = window.form.validate().config
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema_version": 1, "mask": {"gama": 0.5}}))
    answers.preset = bad
    window.load_button.invoke()
    settle(window)
    ((_title, message),) = answers.errors
    assert "unknown field 'mask.gama'; did you mean 'gamma'?" in message
    assert window.form.validate().config == before


def test_save_as_then_save_writes_the_users_presets(window, answers, home):
    window.form.row("training.steps").set(123)
    answers.text = "my run"
    window.save_as_button.invoke()
    settle(window)
    path = home / "presets" / "my run.json"
    assert load_preset(path).training.steps == 123
    assert "my run" in window.preset_menu.cget("values") and window.preset_menu.get() == "my run"
    window.form.row("training.steps").set(77)
    window.save_button.invoke()  # now saves in place, no question asked
    settle(window)
    assert load_preset(path).training.steps == 77
    assert answers.questions == [] and answers.errors == []


def test_save_on_a_builtin_preset_asks_for_a_new_name(window, answers, home):
    window.choose_preset("demo-prior (built-in)")
    answers.text = None  # the user cancels the name question
    before = (BUILTIN_PRESETS / "demo-prior.json").read_text()
    window.save_button.invoke()
    settle(window)
    assert (BUILTIN_PRESETS / "demo-prior.json").read_text() == before
    assert not (home / "presets").exists()


def test_the_last_used_config_is_restored(open_window, home):
    first = open_window()
    first.form.row("mask.gamma").set(0.55)
    first.form.row("training.steps").set(321)
    settle(first)
    first.close()
    assert first.closed
    assert UserStore(home).load_last_used().training.steps == 321
    second = open_window()
    settle(second)
    config = second.form.validate().config
    assert (config.training.steps, config.mask.gamma) == (321, 0.55)


def test_a_preset_given_at_start_is_opened(open_window):
    path = BUILTIN_PRESETS / "demo-threshold.json"
    window = open_window(preset=path)
    assert window.form.validate().config == load_preset(path)
    assert window.form.validation.config.prior == PriorConfig(weight=1.0, threshold=0.1)


def test_concepts_editor_adds_counts_and_removes(window, answers, tmp_path, write_concept):
    folder = write_concept(tmp_path / "concept", images=3, masks=2, orphans=1)
    answers.directory = folder
    start = len(window.concepts.cards)
    window.concepts.add_button.invoke()
    settle(window, 0.5)
    card = window.concepts.cards[-1]
    assert len(window.concepts.cards) == start + 1
    text = card.counts.cget("text")
    assert text == ("3 images · 2 masks found · 1 images without a mask · 1 masks without an image")
    index = start
    window.form.row(f"data.concepts.{index}.type").set("prior_prediction")
    window.form.row(f"data.concepts.{index}.repeats").control.text.set("0")
    settle(window)
    assert "greater than or equal to 1" in window.form.row(f"data.concepts.{index}.repeats").message
    window.form.row(f"data.concepts.{index}.repeats").set(3)
    window.form.row(f"data.concepts.{index}.caption.prefix").set("sks")
    settle(window)
    concept = window.form.validation.config.data.concepts[index]
    assert (concept.type, concept.repeats, concept.caption.prefix) == ("prior_prediction", 3, "sks")
    assert concept.path == str(folder)
    card.remove_button.invoke()
    settle(window)
    assert len(window.concepts.cards) == start
    assert all(c.path != str(folder) for c in window.form.validation.config.data.concepts)


def test_a_missing_concept_folder_is_reported_on_its_card(window):
    window.concepts.add(Path("no/such/folder"))
    settle(window, 0.5)
    assert "does not exist" in window.concepts.cards[-1].counts.cget("text")


def test_typing_a_prompt_is_seen_by_validation(window):
    textbox = window.form.row("sampling.prompts").control.textbox
    before = window.form.validate().config.sampling.prompts
    textbox.insert("end", "\n  a photo of sks heart on grass  \n\n")
    settle(window)
    assert window.form.validation.config.sampling.prompts == [
        *before,
        "a photo of sks heart on grass",
    ]


def test_hovering_a_label_shows_its_description(window):
    window.tabs.set("Masked training")
    settle(window)
    row = window.form.row("mask.gamma")
    row.label.event_generate("<Enter>")
    settle(window, 0.8)
    shown = row.tooltip._window
    assert shown is not None and shown.winfo_ismapped()
    texts = [child.cget("text") for child in shown.winfo_children()]
    assert texts == [row.spec.tooltip()]
    row.label.event_generate("<Leave>")
    settle(window)
    assert row.tooltip._window is None


WAN_FIELDS = (
    "model.wan.flow_shift",
    "model.wan.expert",
    "model.wan.transformer_file",
    "data.frames",
    "data.fps",
)


def test_fields_of_another_family_are_hidden_and_keep_their_values(window):
    family = window.form.row("model.family")
    family.set("demo")
    settle(window)
    for path in WAN_FIELDS:
        row = window.form.row(path)
        assert not row.visible and row.label.winfo_manager() == "", path
    assert window.form.row("model.path").label.winfo_manager() == "grid"
    memory = window.form.row("model.memory.base_weights")  # every family's section
    assert memory.visible and memory.label.winfo_manager() == "grid"

    family.set("wan")
    window.form.row("model.wan.flow_shift").set(5.0)
    settle(window)
    for path in (*WAN_FIELDS, "model.memory.base_weights"):
        assert window.form.row(path).label.winfo_manager() == "grid", path
    family.set("demo")
    settle(window)
    assert not window.form.row("model.wan.flow_shift").visible
    assert window.form.validate().config.model.wan.flow_shift == 5.0  # hidden, still saved


def test_the_family_s_options_section_and_lora_presets_follow_the_family(window):
    family = window.form.row("model.family")
    targets = window.form.row("lora.targets")
    wan_form = next(
        sub for sub in window.section_forms["model"].subforms if sub.prefix == "model.wan"
    )
    family.set("wan")
    settle(window)
    assert wan_form.winfo_manager() == "grid"
    assert targets.control.menu.cget("values") == ["attention", "attention_ffn"]
    family.set("demo")
    settle(window)
    assert wan_form.winfo_manager() == ""  # the section's heading goes with its fields
    assert targets.control.menu.cget("values") == ["attention", "attention_ffn", "attention_conv"]


def test_every_family_is_on_the_menu_with_its_own_options_section(window):
    family = window.form.row("model.family")
    assert list(family.control.menu.cget("values")) == list(SPECS)
    subforms = {sub.prefix: sub for sub in window.section_forms["model"].subforms}
    with_options = [spec for spec in SPECS.values() if spec.options.model_fields]
    assert {"wan", "flux1", "flux2", "qwen_image"} <= {spec.name for spec in with_options}
    for spec in with_options:
        family.set(spec.name)
        settle(window)
        shown = [prefix for prefix, sub in subforms.items() if sub.winfo_manager() == "grid"]
        assert shown == ["model.memory", f"model.{spec.name}"]  # memory: every family's
        for field in spec.options.model_fields:
            assert window.form.row(f"model.{spec.name}.{field}").visible
        targets = window.form.row("lora.targets").control.menu.cget("values")
        assert list(targets) == list(spec.lora_targets)


def test_a_hidden_field_with_an_error_stays_in_view(window):
    window.form.row("model.family").set("demo")
    row = window.form.row("model.wan.flow_shift")
    row.set(0.5)
    settle(window)
    assert row.message is not None and "greater than or equal to 1" in row.message
    assert row.visible and row.label.winfo_manager() == "grid"
    assert window.run_panel.start_button.cget("state") == "disabled"
    row.set(3.0)
    settle(window)
    assert not row.visible


@pytest.mark.parametrize("kind", ["latin-1", "folder"])
def test_an_unreadable_preset_shows_why_and_keeps_the_config(window, answers, tmp_path, kind):
    before = (window.form.validate().config, window.preset_path)
    if kind == "folder":
        bad, why = tmp_path, "is a folder, not a preset file"
    else:
        bad, why = tmp_path / "latin1.json", "not UTF-8 text (byte 0xe9"
        bad.write_bytes('{"schema_version": 1, "description": "café"}'.encode("latin-1"))
    answers.preset = bad
    window.load_button.invoke()
    settle(window)
    ((_title, message),) = answers.errors
    assert message.startswith(str(bad)) and why in message
    assert (window.form.validate().config, window.preset_path) == before


def test_a_broken_last_used_config_is_set_aside_and_the_default_opens(open_window, answers, home):
    home.mkdir()
    broken = '{"schema_version": 1, "description": "café"}'.encode("latin-1")
    (home / "last-used.json").write_bytes(broken)
    window = open_window()
    settle(window)
    default = BUILTIN_PRESETS / "demo-prior.json"
    assert window.form.validate().config == load_preset(default)
    assert window.preset_menu.get() == "demo-prior (built-in)"
    (moved,) = home.glob("last-used.broken-*.json")
    assert moved.read_bytes() == broken and not (home / "last-used.json").exists()
    notice = (
        f"{home / 'last-used.json'}: not UTF-8 text (byte 0xe9 at position "
        f"{broken.index(0xE9)}, line 1): save the preset as UTF-8\nIt was set aside as {moved}."
    )
    assert notice in window.run_panel.log_text()
    ((title, message),) = answers.errors
    assert title == "Last-used config not restored" and notice in message


def test_the_model_tab_shows_the_memory_estimate_of_a_vram_preset(window):
    window.load_preset_file(BUILTIN_PRESETS / "wan22-a14b-16gb.json")
    settle(window)
    text = window.memory_estimate.cget("text")
    assert text.startswith("memory estimate (not measured): peak")
    assert "blocks_to_swap=auto swaps" in text
    assert window.form.row("model.memory.blocks_to_swap").get() == "auto"
    window.form.row("model.memory.blocks_to_swap").set(0)
    settle(window)
    assert window.form.validation.config.model.memory.blocks_to_swap == 0
    assert "is over model.memory.vram_gb=16" in window.memory_estimate.cget("text")


def test_the_model_tab_shows_the_detected_wan_form(window, tmp_path):
    """Read from the folder's JSON files as the pipelines tell the forms apart."""
    folder = tmp_path / "wan21-i2v"
    for part, config in (
        ("transformer", {"in_channels": 36, "image_dim": 1280, "patch_size": [1, 2, 2]}),
        ("vae", {"z_dim": 16}),
    ):
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text(json.dumps(config))
    (folder / "model_index.json").write_text('{"_class_name": "WanImageToVideoPipeline"}')
    window.load_preset_file(BUILTIN_PRESETS / "wan-prior.json")
    window.form.row("model.path").set(str(folder))
    settle(window)
    text = window.detected_model.cget("text")
    assert text == "Detected: WAN 2.1 image-to-video (CLIP image encoder); trains image-to-video"
    window.form.row("model.wan.task").set("text_to_video")
    settle(window)
    assert "model.wan.task=text_to_video" in window.detected_model.cget("text")
