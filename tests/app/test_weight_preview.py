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
