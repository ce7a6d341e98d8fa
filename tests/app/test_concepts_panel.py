"""The concept card counts a folder's clip windows (data.frame_windows) from the clips' headers."""

import numpy as np
import pytest

from app import engine_import
from tests.app.driving import pump, settle
from tests.data.video_files import write_frames, write_video

pytestmark = pytest.mark.ui


def test_the_concept_card_shows_the_windows_of_its_clips(window, tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    frames = np.full((40, 16, 16, 3), 90, dtype=np.uint8)
    write_video(folder / "walk.mp4", frames, fps=16)  # 40 frames at 16 fps
    write_frames(folder / "wave", frames[:12])  # 12 frames, counted at data.fps
    window.concepts.add(folder)
    card = window.concepts.cards[-1]
    counts = "2 images · 0 masks found · 2 images without a mask · 0 masks without an image"
    window.form.row("data.frames").set(9)
    window.form.row("data.frame_windows").set("chunk")
    assert engine_import.wait(120)
    pump(window, lambda: "windows" in card.counts.cget("text"), 30, "the windows")
    # walk.mp4: frames 0, 9, 18, 27 (36 + 9 > 40); wave: 0 only (9 + 9 > 12).
    assert card.counts.cget("text") == counts + " · 2 clips, 5 windows of 9 frames"
    assert card.buckets.cget("text").startswith("Buckets: 64x64: 5;")  # windows counted
    window.form.row("data.frame_windows").set("uniform")
    window.form.row("data.window_count").set(3)
    window.form.row("data.frames").set(13)
    settle(window)
    # walk.mp4: 3 starts spread over 0..27; wave: none (12 < 13 frames).
    pump(window, lambda: "of 13 frames" in card.counts.cget("text"), 30, "13 frames")
    assert card.counts.cget("text") == (
        counts + " · 2 clips, 3 windows of 13 frames (1 clip shorter than that: lower data.frames)"
    )
    window.form.row("data.frame_windows").set("head")
    settle(window)
    pump(window, lambda: card.counts.cget("text") == counts, 30, "no windows with head")


def test_the_concept_card_counts_pairs_and_names_the_first_problem(window, tmp_path, monkeypatch):
    from PIL import Image

    from app.style import ERROR_COLOUR, MUTED_COLOUR
    from modules.models import registry
    from tests.data.conditioned_family import SPEC_TWO

    monkeypatch.setitem(registry.SPECS, "demo", SPEC_TWO)  # a model taking up to 2 references
    folder, refs = tmp_path / "pairs", tmp_path / "refs"
    folder.mkdir()
    refs.mkdir()
    for name in ("a", "a-ref", "b", "b-ref", "b-ref1", "x-ref"):
        Image.new("RGB", (32, 32), (90, 90, 90)).save(folder / f"{name}.png")
    window.concepts.add(folder)
    card = window.concepts.cards[-1]
    window.concepts.show_buckets(window._preview_settings)
    pump(window, lambda: "pairs" in card.counts.cget("text"), 30, "the pairs")
    text = card.counts.cget("text")
    assert text.startswith("2 images · ")  # the references are not images to train
    assert "· 2 pairs, 1 to 2 references each · 1 reference without a target (x-ref.png)" in text
    assert text.endswith(
        f"\n{card.prefix}: reference 'x-ref.png' has no target 'x.png' beside "
        "it: add the target, or rename or remove the reference"
    )
    assert card.counts.cget("text_color") == ERROR_COLOUR

    (folder / "x-ref.png").unlink()
    for name in ("a", "b"):
        Image.new("RGB", (24, 40), (10, 90, 90)).save(refs / f"{name}.png")
    (row,) = [row for row in card.rows() if row.path.endswith(".reference_dirs")]
    row.set([str(refs)])
    window.concepts.show_buckets(window._preview_settings)
    pump(window, lambda: "2 pairs, 1 reference each" in card.counts.cget("text"), 30, "folders")
    assert card.counts.cget("text_color") == MUTED_COLOUR
