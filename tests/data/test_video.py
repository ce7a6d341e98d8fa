"""Clips: frame sampling at a rate, video and frame-folder reading, per-frame masks, and the
reduction of masks to the latent grid in space and time (hand-computed values)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modules.config.schema import ConceptConfig
from modules.data.concept import DataError, list_frames, scan_concept
from modules.data.video import (
    clip_frame_indices,
    clip_info,
    clip_mask_to_latent,
    load_clip,
    load_clip_mask,
    reduce_frames,
    sample_frame_indices,
)
from tests.data.video_files import write_frames, write_video


def grey_frames(count: int, size: int = 16, step: int = 10) -> np.ndarray:
    """(F, H, W, 3) flat frames whose grey level is ``step * index``: frame i is recognisable."""
    levels = (np.arange(count) * step).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (count, size, size, 3)).copy()


def frame_levels(clip: torch.Tensor) -> list[int]:
    """Grey level of each frame of a (3, F, R, R) clip in [-1, 1]."""
    return [round(float((clip[:, f].mean() + 1) * 127.5)) for f in range(clip.shape[1])]


# ------------------------------------------------------------------------------ frame sampling


def test_frames_at_half_the_source_rate_take_every_second_frame():
    assert sample_frame_indices(9, source_fps=30, fps=15) == [0, 2, 4, 6, 8, 10, 12, 14, 16]


def test_frames_at_16_fps_from_30_fps_round_to_the_frame_on_screen():
    # k * 30 / 16 = 0, 1.875, 3.75, 5.625, 7.5, 9.375, 11.25, 13.125, 15 (halves round up)
    assert sample_frame_indices(9, source_fps=30, fps=16) == [0, 2, 4, 6, 8, 9, 11, 13, 15]


def test_fps_zero_or_an_unknown_source_rate_take_consecutive_frames():
    assert sample_frame_indices(5, source_fps=30, fps=0) == [0, 1, 2, 3, 4]
    assert sample_frame_indices(5, source_fps=0, fps=16) == [0, 1, 2, 3, 4]


def test_a_rate_above_the_source_repeats_frames():
    assert sample_frame_indices(5, source_fps=8, fps=16) == [0, 1, 1, 2, 2]


def test_a_clip_too_short_names_the_file_and_the_fix(tmp_path: Path):
    path = write_video(tmp_path / "short.mp4", grey_frames(10), fps=30)
    info = clip_info(path)
    assert (info.frames, info.fps, info.size) == (10, 30.0, (16, 16))
    with pytest.raises(DataError, match=r"short\.mp4' has 10 frames .*data\.frames=9.*lower"):
        clip_frame_indices(path, info, frames=9, fps=15)  # needs source frames 0..16
    assert clip_frame_indices(path, info, frames=5, fps=15) == [0, 2, 4, 6, 8]


# ---------------------------------------------------------------------------------- reading


def test_video_frames_are_read_at_the_sampled_indices(tmp_path: Path):
    path = write_video(tmp_path / "v.mp4", grey_frames(20), fps=30)
    clip = load_clip(path, [0, 2, 4, 6, 8], size=16)
    assert clip.shape == (3, 5, 16, 16)
    levels = frame_levels(clip)  # mp4v is lossy: flat frames come back within a few levels
    assert all(abs(got - want) <= 4 for got, want in zip(levels, [0, 20, 40, 60, 80], strict=True))


def test_a_frame_folder_plays_in_numeric_order(tmp_path: Path):
    folder = write_frames(tmp_path / "clip", grey_frames(12))  # frame1.png ... frame12.png
    assert [p.name for p in list_frames(folder)][:3] == ["frame1.png", "frame2.png", "frame3.png"]
    info = clip_info(folder)
    assert (info.frames, info.fps) == (12, 0.0)
    clip = load_clip(folder, clip_frame_indices(folder, info, frames=5, fps=16), size=16)
    assert frame_levels(clip) == [0, 10, 20, 30, 40]  # PNG: exact, consecutive frames


# ------------------------------------------------------------------------------------ masks


def test_mask_video_frames_follow_the_clip(tmp_path: Path):
    clip = write_video(tmp_path / "c.mp4", grey_frames(12), fps=16)
    masks = np.zeros((12, 16, 16), dtype=np.uint8)
    masks[1::2] = 255  # odd frames fully masked
    mask = write_video(tmp_path / "c-masklabel.mp4", masks, fps=16)
    weights = load_clip_mask(mask, clip, clip_info(clip), [0, 1, 2, 3], size=8)
    assert weights.shape == (1, 4, 8, 8)
    per_frame = weights.mean(dim=(0, 2, 3))
    assert torch.allclose(per_frame, torch.tensor([0.0, 1.0, 0.0, 1.0]), atol=0.03)


def test_mask_folder_and_still_mask(tmp_path: Path):
    clip = write_frames(tmp_path / "c", grey_frames(6))
    values = np.zeros((6, 16, 16), dtype=np.uint8)
    values[:, :8] = 255  # top half
    values[5] = 0
    mask_folder = write_frames(tmp_path / "c-masklabel", values, prefix="m")
    info = clip_info(clip)
    weights = load_clip_mask(mask_folder, clip, info, [0, 5], size=16)
    assert torch.equal(weights[0, 0, :8], torch.ones(8, 16))
    assert torch.equal(weights[0, 0, 8:], torch.zeros(8, 16))
    assert torch.equal(weights[0, 1], torch.zeros(16, 16))

    Image.fromarray(values[0]).save(tmp_path / "still.png")
    still = load_clip_mask(tmp_path / "still.png", clip, info, [0, 1, 2], size=16)
    assert still.shape == (1, 3, 16, 16)
    assert all(torch.equal(still[0, f], weights[0, 0]) for f in range(3))


def test_mask_video_with_another_frame_count_or_size_is_an_error(tmp_path: Path):
    clip = write_video(tmp_path / "c.mp4", grey_frames(12), fps=16)
    info = clip_info(clip)
    short = write_video(tmp_path / "short-masklabel.mp4", np.zeros((8, 16, 16), np.uint8))
    with pytest.raises(DataError, match=r"has 8 frames but its clip 'c\.mp4' has 12: re-export"):
        load_clip_mask(short, clip, info, [0], size=16)
    big = write_video(tmp_path / "big-masklabel.mp4", np.zeros((12, 32, 32), np.uint8))
    with pytest.raises(DataError, match=r"is 32×32 but its clip 'c\.mp4' is 16×16"):
        load_clip_mask(big, clip, info, [0], size=16)
    folder = write_frames(tmp_path / "few-masklabel", np.zeros((3, 16, 16), np.uint8))
    with pytest.raises(DataError, match="has 3 frames but its clip"):
        load_clip_mask(folder, clip, info, [0], size=16)


def test_reduce_frames_averages_the_frames_of_each_latent_frame():
    """WAN's causal VAE: latent frame 0 is frame 0, then frames 1-4, then frames 5-8."""
    mask = torch.arange(9, dtype=torch.float32).view(1, 9, 1, 1)  # frame i has weight i
    reduced = reduce_frames(mask, latent_frames=3)
    assert reduced.flatten().tolist() == [0.0, 2.5, 6.5]  # mean(1..4), mean(5..8)
    assert torch.equal(reduce_frames(mask[:, :1], latent_frames=1), mask[:, :1])
    with pytest.raises(ValueError, match="do not reduce"):
        reduce_frames(mask[:, :8], latent_frames=3)


def test_clip_mask_to_latent_is_area_in_space_then_mean_in_time():
    # 5 frames of 4×4: frame 0 all ones; frames 1-4 have only the top-left 2×2 block at 1.
    mask = torch.zeros(1, 5, 4, 4)
    mask[:, 0] = 1.0
    mask[:, 1:, :2, :2] = 1.0
    mask[:, 4, :2, :2] = 0.0  # the last frame loses its block: 3 of 4 frames keep it
    latent = clip_mask_to_latent(mask, (2, 2), latent_frames=2)
    assert latent.shape == (1, 2, 2, 2)
    assert latent[0, 0].flatten().tolist() == [1.0, 1.0, 1.0, 1.0]
    assert latent[0, 1].flatten().tolist() == [0.75, 0.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------- scan


def test_scan_lists_clips_with_their_masks_and_captions(tmp_path: Path):
    folder = tmp_path / "concept"
    folder.mkdir()
    write_video(folder / "walk.mp4", grey_frames(6))
    write_video(folder / "walk-masklabel.mp4", np.zeros((6, 16, 16), np.uint8))
    write_frames(folder / "spin", grey_frames(6))
    write_frames(folder / "spin-masklabel", np.zeros((6, 16, 16), np.uint8))
    write_video(folder / "pan.mp4", grey_frames(6))
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "pan-masklabel.png")
    Image.fromarray(grey_frames(1)[0]).save(folder / "still.png")
    (folder / "notes").mkdir()  # a folder without images is not a clip
    (folder / "spin.txt").write_text("spinning", encoding="utf-8")
    scan = scan_concept(ConceptConfig(path=str(folder)))
    by_name = {item.image.name: item for item in scan.items}
    assert sorted(by_name) == ["pan.mp4", "spin", "still.png", "walk.mp4"]
    assert by_name["walk.mp4"].mask == folder / "walk-masklabel.mp4"
    assert by_name["spin"].mask == folder / "spin-masklabel"
    assert by_name["pan.mp4"].mask == folder / "pan-masklabel.png"
    assert by_name["spin"].caption == "spinning"
    assert [by_name[n].clip for n in ("walk.mp4", "spin", "pan.mp4", "still.png")] == [
        True,
        True,
        True,
        False,
    ]
    assert (scan.images, scan.videos, scan.masks_found) == (4, 3, 3)
    assert scan.describe() == "4 items (3 clips, 1 image): 3 with a mask, 1 without."


def test_a_still_image_with_a_video_mask_is_an_error(tmp_path: Path):
    Image.fromarray(grey_frames(1)[0]).save(tmp_path / "a.png")
    write_video(tmp_path / "a-masklabel.mp4", np.zeros((4, 16, 16), np.uint8))
    with pytest.raises(
        DataError, match=r"a-masklabel\.mp4' is a video or a folder but 'a\.png' is a still"
    ):
        scan_concept(ConceptConfig(path=str(tmp_path)))


def test_two_items_with_one_name_is_an_error(tmp_path: Path):
    Image.fromarray(grey_frames(1)[0]).save(tmp_path / "a.png")
    write_video(tmp_path / "a.mp4", grey_frames(4))
    with pytest.raises(DataError, match=r"two items named 'a'.*rename one"):
        scan_concept(ConceptConfig(path=str(tmp_path)))
