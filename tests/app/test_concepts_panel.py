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
