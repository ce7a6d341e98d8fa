"""The Masks tab in the real window: paint with a tier brush, undo, paint again, save; the
preview follows the edited mask; unsaved edits are marked; leaving asks (Cancel stays); zoom and
fit to the view; Generate in the background."""

import numpy as np
import pytest
from PIL import Image

from app.preview_maps import compute_maps, load_source
from tests.app.driving import pump, settle


@pytest.fixture
def masks(window, tmp_path):
    folder = tmp_path / "concept"
    folder.mkdir()
    pixels = np.zeros((80, 96, 3), np.uint8)
    pixels[20:60, 30:70] = (220, 40, 40)  # a red block on black: a subject for GrabCut
    Image.fromarray(pixels).save(folder / "a.png")
    Image.new("RGB", (96, 80), (90, 90, 90)).save(folder / "b.png")
    Image.fromarray(np.full((80, 96), 255, np.uint8), "L").save(folder / "b-masklabel.png")
    window.concepts.add(folder)
    window.tabs.set("Masks")
    window._tab_shown()
    settle(window, 0.3)
    tab = window.masks
    tab.choose_concept(str(folder))
    tab.open_image("a.png", ask=False)
    tab.zoom_to(1.0)  # canvas pixels are image pixels in these tests
    settle(window)
    return tab


def stroke(tab, points):
    tab.canvas.event_generate("<ButtonPress-1>", x=points[0][0], y=points[0][1])
    for x, y in points[1:]:
        tab.canvas.event_generate("<B1-Motion>", x=x, y=y)
    tab.canvas.event_generate("<ButtonRelease-1>", x=points[-1][0], y=points[-1][1])


def test_paint_undo_paint_save_and_the_preview_follows(window, masks):
    tab = masks
    body = window.form.validation.config.mask.tiers.body
    tab.choose_brush("body")
    tab.size_slider.set(6)  # radius 3
    empty = tab.layer.levels.copy()
    stroke(tab, [(10, 10), (50, 10)])
    settle(window)
    assert (tab.layer.levels == body).any()
    tab.undo()
    assert tab.layer.levels.tobytes() == empty.tobytes()
    stroke(tab, [(10, 40), (60, 40)])
    tab.save()
    saved = np.asarray(Image.open(tab.layer.path))
    assert (saved[37:44, 10:61] == body).all()  # exactly the tier under the stroke
    assert set(np.unique(saved)) == {0, body} and not saved[:30].any()  # nothing elsewhere
    # The preview's maps are process_masks of the edited mask, as training loads it.
    pump(window, lambda: tab.maps is not None and tab._preview_job is None, 10, "the preview")
    tab.update_preview()
    settings = window._preview_settings()
    size = settings.training_size((96, 80))
    source = load_source(tab.image_path, tab.layer.path, size, settings.pixels_per_cell)
    from modules.loss import Weighting

    mask, prior = settings.mask, settings.prior
    weighting = Weighting(mask.gamma, mask.min_weight, prior.threshold)
    expected = compute_maps(source, weighting)
    assert np.array_equal(tab.maps.target, expected.target)
    assert np.array_equal(tab.maps.prior, expected.prior)
    assert tab.maps.target.max() > 0


def test_leaving_an_edited_mask_asks(window, masks, answers):
    tab = masks
    stroke(tab, [(5, 5), (20, 5)])
    answers.yes = False  # drop the edits
    assert tab.open_image("b.png")
    assert answers.questions and "a-masklabel.png" in answers.questions[-1]
    assert not (tab.image_path.parent / "a-masklabel.png").exists()
    tab.zoom_to(1.0)  # opened fitted to the view
    stroke(tab, [(5, 5), (20, 5)])
    answers.yes = True  # save them
    assert tab.open_image("a.png")
    saved = np.asarray(Image.open(tab.image_path.parent / "b-masklabel.png"))
    assert (saved[2:9, 5:21] == window.form.validation.config.mask.tiers.body).all()


def test_painting_at_zoom_hits_the_same_pixels(window, masks):
    tab = masks
    tab.set_zoom(1)
    tab.set_zoom(1)
    assert tab.zoom == 2.0
    tab.choose_brush("erase")
    tab.fill_all()
    tab.choose_brush("face")
    tab.size_slider.set(2)  # radius 1
    stroke(tab, [(40, 40)])  # canvas (40, 40) is image pixel (20, 20) at zoom 2
    face = window.form.validation.config.mask.tiers.face
    assert tab.layer.levels[20, 20] == face and tab.layer.levels[40, 40] == 0


def test_generate_for_this_image_runs_in_the_background(window, masks):
    tab = masks
    tab.mode_menu.set("subject")
    tab.generate_image()
    assert tab.generating
    pump(window, lambda: not tab.generating, 60, "the generator")
    levels = tab.layer.levels
    assert levels[40, 50] == 255 and levels[2, 2] == 0  # the red block in, a corner out
    assert tab.layer.dirty and tab.layer.can_undo  # an edit, not saved


def test_unsaved_edits_are_marked_until_saved(window, masks):
    tab = masks
    assert tab.mask_name.cget("text") == "a-masklabel.png"
    stroke(tab, [(10, 10), (30, 10)])
    assert tab.mask_name.cget("text") == "a-masklabel.png *"
    tab.save()
    assert tab.mask_name.cget("text") == "a-masklabel.png"
    tab.undo()  # back to the empty mask, which is not the saved one
    assert tab.mask_name.cget("text").endswith(" *")
    tab.redo()  # the saved mask again
    assert not tab.mask_name.cget("text").endswith(" *")


def test_cancel_keeps_the_edited_mask_and_stays(window, masks, answers):
    tab = masks
    stroke(tab, [(5, 5), (20, 5)])
    edited = tab.layer.levels.copy()
    answers.cancel = True
    assert not tab.open_image("b.png")
    assert "Cancel" in answers.questions[-1]
    assert tab.image_path.name == "a.png" and tab.image_menu.get() == "a.png"
    assert tab.layer.dirty and (tab.layer.levels == edited).all()
    assert not (tab.image_path.parent / "a-masklabel.png").exists()
    window.close()  # closing the window asks too, and Cancel keeps it open
    assert not window.closed and tab.layer.dirty
    answers.cancel = False
    answers.yes = True
    assert tab.open_image("b.png")
    assert (np.asarray(Image.open(tab.image_path.parent / "a-masklabel.png")) == edited).all()


def test_the_canvas_fits_the_image_to_the_view(window, masks):
    tab = masks
    folder = tab.image_path.parent
    Image.new("RGB", (1600, 1200), (30, 90, 200)).save(folder / "large.png")
    tab.choose_concept(str(folder))
    assert tab.open_image("large.png", ask=False)
    settle(window)
    room = tab.canvas.winfo_width(), tab.canvas.winfo_height()
    assert room[0] < 1600 and room[1] < 1200  # a photo larger than the view
    x0, y0, x1, y1 = tab.canvas.bbox("all")
    assert x1 - x0 <= room[0] and y1 - y0 <= room[1]  # all of it in view ...
    assert max((x1 - x0) / room[0], (y1 - y0) / room[1]) > 0.98  # ... as large as it fits
    # Painting where the canvas shows image pixel (800, 600) paints that pixel.
    tab.choose_brush("face")
    tab.size_slider.set(2)
    stroke(tab, [(round(800 * tab.zoom), round(600 * tab.zoom))])
    assert tab.layer.levels[600, 800] == window.form.validation.config.mask.tiers.face
    # Zooming leaves the fit; Fit comes back to it, and a small image is enlarged to the view.
    tab.set_zoom(1)
    assert not tab.fitted and tab.canvas.bbox("all")[2] > room[0]
    tab.tool_buttons["Fit"].invoke()
    assert tab.fitted and tab.canvas.bbox("all")[2] <= room[0]
    assert tab.open_image("b.png", ask=False)  # 96 x 80
    settle(window)
    assert tab.zoom > 1 and tab.canvas.bbox("all")[3] <= room[1]


def test_an_edit_pair_shows_its_reference_and_makes_its_difference_mask(
    window, tmp_path, monkeypatch
):
    from modules.models import registry
    from tests.data.conditioned_family import SPEC

    monkeypatch.setitem(registry.SPECS, "demo", SPEC)  # a model that takes references
    folder = tmp_path / "pairs"
    folder.mkdir()
    reference = np.full((60, 120, 3), 90, np.uint8)  # wider than its target: own size kept
    Image.fromarray(reference).save(folder / "a-ref.png")
    edited = np.full((80, 96, 3), 90, np.uint8)
    edited[20:60, 30:70] = (220, 40, 200)  # the edit: a recoloured block
    Image.fromarray(edited).save(folder / "a.png")
    Image.new("RGB", (96, 80), (90, 90, 90)).save(folder / "b.png")
    window.concepts.add(folder)
    window.tabs.set("Masks")
    window._tab_shown()
    settle(window, 0.3)
    tab = window.masks
    tab.choose_concept(str(folder))
    assert sorted(tab.items) == ["a.png", "b.png"]  # the reference is not an image to mask
    tab.open_image("a.png", ask=False)
    settle(window)
    assert tab.reference_path == folder / "a-ref.png"
    assert tab.reference_title.cget("text") == "reference: a-ref.png"
    assert tab._reference_photo is not None and tab._reference_photo.cget("size") == (220, 110)
    assert tab.reference_view.winfo_ismapped()

    tab.mode_menu.set("difference")
    tab.generate_image()
    pump(window, lambda: not tab.generating, 60, "the generator")
    levels, tiers = tab.layer.levels, window.form.validation.config.mask.tiers
    assert levels[40, 50] == tiers.face and levels[2, 2] == 0  # the block changed, a corner not
    assert tab.layer.dirty

    assert tab.save() and (folder / "a-masklabel.png").is_file()
    tab.open_image("b.png", ask=False)  # no reference: none shown, difference says why
    assert tab.reference_path is None and tab.reference_title.cget("text") == ""
    tab.generate_image()
    assert not tab.generating and "has no reference" in tab.progress.cget("text")
