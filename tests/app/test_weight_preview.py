"""The preview in the real window follows the sliders, exactly as process_masks computes."""

import numpy as np
import pytest

from app import engine_import
from app.user_store import BUILTIN_PRESETS
from modules.data.images import image_size, load_mask, mask_to_latent
from modules.loss.masked_loss import process_masks
from tests.app.driving import pump, settle

pytestmark = pytest.mark.ui


def expected_maps(image, gamma, min_weight, threshold, resolution=64, scale=4):
    side = resolution // scale
    latent = mask_to_latent(
        load_mask(image.mask, image_size(image.image), resolution), (side, side)
    )
    weights = process_masks(latent, gamma=gamma, min_weight=min_weight, prior_threshold=threshold)
    return weights.target[0].numpy(), weights.prior[0].numpy()


def test_moving_gamma_and_threshold_updates_both_maps(window):
    window.choose_preset("demo-threshold (built-in)")
    assert engine_import.wait(120)
    window.tabs.set("Masked training")
    masked, prior_tab = window.previews
    pump(window, lambda: masked.maps is not None, 60, "the first preview")
    image = masked.current
    assert image.mask is not None and image.image.parent.name == "subject"

    window.form.row("mask.gamma").control.slider.set(0.5)
    window.tabs.set("Prior preservation")
    window.form.row("prior.threshold").control.slider.set(0.4)
    settle(window)
    assert window.form.row("mask.gamma").control.text.get() == "0.5"
    assert window.form.row("prior.threshold").control.text.get() == "0.4"
    target, prior = expected_maps(image, gamma=0.5, min_weight=0.0, threshold=0.4)
    for preview in (masked, prior_tab):
        assert preview.current == image
        assert np.array_equal(preview.maps.target, target)
        assert np.array_equal(preview.maps.prior, prior)
    stats = prior_tab.stats.cget("text")
    assert f"mean m {target.mean():.3f}" in stats and f"mean p {prior.mean():.3f}" in stats
    assert f"{(prior > 0).mean():.0%} of the image" in stats
    assert "raw mask   target m   prior p" in prior_tab.table.cget("text")

    # Threshold off: continuous mode, p = 1 - m.
    window.form.row("prior.threshold").control.switch.toggle()
    window.form.row("mask.min_weight").control.slider.set(0.2)
    settle(window)
    target, prior = expected_maps(image, gamma=0.5, min_weight=0.2, threshold=None)
    assert np.array_equal(masked.maps.target, target)
    assert np.array_equal(masked.maps.prior, prior)
    assert "continuous" in masked.stats.cget("text")


def test_picking_another_image_and_an_invalid_gamma(window):
    window.choose_preset("demo-prior (built-in)")
    preview = window.previews[0]
    pump(window, lambda: preview.maps is not None, 120, "the first preview")
    first = preview.current
    preview.next_button.invoke()
    settle(window)
    assert preview.current != first and window.previews[1].current == preview.current
    maps = preview.maps
    window.form.row("mask.gamma").control.text.set("-1")
    settle(window)
    assert preview.maps is maps  # kept, with the reason it is not updated
    assert "Fix mask.gamma" in preview.notes.cget("text")


def test_demo_presets_write_their_dataset_for_the_preview(window):
    assert (BUILTIN_PRESETS.parent / "demo-data" / "subject").is_dir()
    assert window.concepts.cards[0].scan is not None


def _wide_concept(folder):
    """A 16:9 and a 2:3 image, each with a mask on a box."""
    from PIL import Image

    folder.mkdir()
    for name, (width, height) in (("wide", (160, 90)), ("tall", (96, 144))):
        Image.new("RGB", (width, height), (30, 120, 200)).save(folder / f"{name}.png")
        mask = Image.new("L", (width, height), 0)
        mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
        mask.save(folder / f"{name}-masklabel.png")
    return folder


def test_the_preview_and_the_concept_card_show_the_buckets(window, tmp_path):
    window.choose_preset("demo-prior (built-in)")
    assert engine_import.wait(120)
    folder = _wide_concept(tmp_path / "wide")
    window.concepts.cards[0].path_row.set(str(folder))
    card = window.concepts.cards[0]
    pump(window, lambda: "80x48" in card.buckets.cget("text"), 30, "the histogram")
    assert card.buckets.cget("text").startswith("Buckets: 48x80: 1, 80x48: 1; the largest crop")
    window.tabs.set("Masked training")
    preview = window.previews[0]
    preview.selection.set("1: wide.png")
    settle(window)
    pump(window, lambda: preview.current and preview.current.image.name == "wide.png", 30, "wide")
    # The 16:9 image trains in the 80x48 bucket: the preview shows that crop, on its grid.
    assert preview.source.image.shape == (48, 80, 3) and preview.maps.target.shape == (12, 20)
    latent = mask_to_latent(
        load_mask(folder / "wide-masklabel.png", image_size(folder / "wide.png"), (80, 48)),
        (12, 20),
    )
    weights = process_masks(latent, gamma=0.7, min_weight=0.0, prior_threshold=None)
    assert np.array_equal(preview.maps.target, weights.target[0].numpy())
    assert "Image (80×48)" in preview.captions[0].cget("text")
    # Buckets off: the square crop, said on the card, and the preview follows.
    window.form.row("data.buckets").set(False)
    settle(window)
    pump(window, lambda: "Square crop" in card.buckets.cget("text"), 30, "the square crop")
    assert card.buckets.cget("text").startswith("Square crop 64x64 (buckets off): 64x64: 2")
    pump(window, lambda: preview.maps.target.shape == (16, 16), 30, "the square preview")
