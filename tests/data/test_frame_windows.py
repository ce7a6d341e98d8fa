"""Frame windows (data.frame_windows): the window starts of each mode, and a long clip trained
as windows, each with its own frames, mask frames, first frame and cache entries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from modules.cli.main import main
from modules.config.schema import ConceptConfig, DataConfig
from modules.data.cache_files import load_cached
from modules.data.concept import DataError
from modules.data.frame_windows import (
    frames_at_rate,
    in_windows,
    sample_frame_indices,
    window_lines,
    window_starts,
    windows_of,
)
from modules.data.latent_cache import build_cache
from modules.data.preparation import PreparedData, prepare_dataset
from modules.data.video import clip_mask_to_latent
from modules.models.base import LoadedModel
from modules.models.spec import ConditioningKind
from tests.data.stand_ins import encode_prompt_codes
from tests.data.test_video_cache import SETTINGS, StandInFamily, VideoEncoder
from tests.data.video_files import moving_square, write_video

# ------------------------------------------------------------------------------ window starts


@pytest.mark.parametrize("mode", ["head", "chunk", "slide", "uniform"])
def test_a_clip_of_exactly_one_window_gives_one_and_one_frame_less_none(mode):
    assert window_starts(33, 33, mode, stride=4, count=5) == [0]
    assert window_starts(32, 33, mode, stride=4, count=5) == []


def test_each_mode_gives_its_starts():
    assert window_starts(40, 9, "head") == [0]
    assert window_starts(40, 9, "chunk") == [0, 9, 18, 27]  # 36 + 9 > 40
    assert window_starts(18, 9, "chunk") == [0, 9]  # two exactly
    assert window_starts(17, 9, "chunk") == [0]
    assert window_starts(40, 9, "slide", stride=8) == [0, 8, 16, 24]  # last start 31
    assert window_starts(41, 9, "slide", stride=8) == [0, 8, 16, 24, 32]
    # uniform: round(i * 31 / 3) for i = 0..3, the last window ending at the clip's end.
    assert window_starts(40, 9, "uniform", count=4) == [0, 10, 21, 31]
    assert window_starts(40, 9, "uniform", count=1) == [0]


def test_one_frame_clips_train_their_first_frame_in_every_mode():
    assert in_windows(DataConfig(frames=9, frame_windows="slide"))
    assert not in_windows(DataConfig(frames=9, frame_windows="head"))
    assert not in_windows(DataConfig(frames=1, frame_windows="chunk"))


def test_uniform_gives_fewer_windows_when_the_clip_has_fewer_starts():
    assert window_starts(11, 9, "uniform", count=5) == [0, 1, 2]
    assert window_starts(11, 9, "uniform", count=3) == [0, 1, 2]


@pytest.mark.parametrize(
    ("source_frames", "source_fps", "fps"),
    [(40, 30, 15), (40, 30, 16), (41, 24, 16), (40, 8, 16), (40, 16, 0), (7, 0, 16), (1, 30, 7)],
)
def test_frames_at_rate_counts_the_frames_whose_source_is_in_the_clip(
    source_frames, source_fps, fps
):
    available = frames_at_rate(source_frames, source_fps=source_fps, fps=fps)
    inside = sample_frame_indices(available, source_fps=source_fps, fps=fps)
    beyond = sample_frame_indices(available + 1, source_fps=source_fps, fps=fps)
    assert inside[-1] < source_frames <= beyond[-1]


def test_a_window_takes_the_source_frames_the_clip_shows_from_its_start():
    # 30 fps sampled at 16: the window from frame 4 continues the head's frames.
    head = sample_frame_indices(9, source_fps=30, fps=16)
    assert sample_frame_indices(5, source_fps=30, fps=16, start=4) == head[4:]
    assert sample_frame_indices(3, source_fps=0, fps=16, start=5) == [5, 6, 7]
    # 40 source frames at 30 fps show 20 frames at 15: chunks of 9 from 0 and 9 (the second
    # ends at source frame 34: 34 frames are one too few).
    assert frames_at_rate(40, source_fps=30, fps=15) == 20
    assert window_starts(20, 9, "chunk") == [0, 9]
    chunks = DataConfig(frames=9, fps=15, frame_windows="chunk")
    assert windows_of(40, 30, chunks) == [0, 9] and windows_of(34, 30, chunks) == [0]
    assert sample_frame_indices(9, source_fps=30, fps=15, start=9)[-1] == 34


def test_the_report_names_each_clip_with_several_windows_or_sums_up_many():
    counts = [(Path("walk.mp4"), 4), (Path("wave.mp4"), 1), (Path("run"), 2)]
    assert window_lines(counts, 33) == [
        "walk.mp4: 4 windows of 33 frames",
        "run: 2 windows of 33 frames",
    ]
    assert window_lines([(Path("wave.mp4"), 1)], 33) == []
    many = [(Path(f"c{n}.mp4"), 3) for n in range(10)]
    (line,) = window_lines(many, 9)
    assert line.startswith(
        "10 clips give 30 windows of 9 frames (c0.mp4 3, c1.mp4 3, c2.mp4 3, ..."
    )


# -------------------------------------------------------------- a long clip through the cache

SIDE, FRAMES, CLIP = 48, 9, 40
"""A 48 x 48 clip of 40 frames trained as windows of 9 frames (3 latent frames of the stand-in
encoder: frame 0, then frames 1-4 and 5-8 averaged)."""
SQUARE_COLOUR = torch.tensor([225.0, 184.0, 159.0])[:, None, None] / 127.5 - 1
"""The square's colour in ``moving_square(seed=0)``, in [-1, 1]."""
FIRST_FRAME = ConditioningKind(name="first_frame", source="item")


def encode_first_frame(
    kind: str, images: list[Tensor], frames: int, caption: str | None = None
) -> dict[str, Tensor]:
    """A stand-in conditioning encoder: the item's first frame as it is given, and its frames."""
    (image,) = images
    return {"first_frame": image[None], "frames": torch.tensor([frames])}


@pytest.fixture(scope="module")
def walk(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """``walk.mp4``: a square moving 2 pixels a frame (wrapping at 32), with its mask video
    ``walk-masklabel.mp4``; and the masks as drawn, (40, 48, 48) in {0, 255}."""
    folder = tmp_path_factory.mktemp("walk")
    video, masks = moving_square(CLIP, size=SIDE)
    write_video(folder / "walk.mp4", video, fps=16)
    write_video(folder / "walk-masklabel.mp4", masks, fps=16)
    return folder, masks


def prepare(folder: Path, cache: Path, mode: str) -> PreparedData:
    data = DataConfig(
        concepts=[ConceptConfig(path=str(folder))],
        resolution=SIDE,
        buckets=False,
        cache_dir=str(cache),
        frames=FRAMES,
        fps=16,
        frame_windows=mode,
    )
    model = LoadedModel(denoiser=torch.nn.Identity(), identity="none")
    return prepare_dataset(data, family=StandInFamily(), model=model)


def test_a_long_clip_trains_as_windows_each_with_its_own_mask_frames(walk, tmp_path: Path):
    folder, masks = walk
    head = prepare(folder, tmp_path / "cache", "head")
    prepared = prepare(folder, tmp_path / "cache", "chunk")
    assert "walk.mp4: 4 windows of 9 frames" in prepared.report_lines()
    assert len(prepared.dataset) == 4 and len(head.dataset) == 1
    # The first window is the head: its latent and mask are reused, the three others made.
    assert prepared.counts.latents_reused == 1 and prepared.counts.latents_encoded == 3
    assert prepared.counts.masks_reused == 1 and prepared.counts.masks_made == 3
    lefts = []
    for number, start in enumerate([0, 9, 18, 27]):
        sample = prepared.dataset[number]
        latent, mask = sample["latent"], sample["mask"]  # (48, 3, 12, 12), (1, 3, 12, 12)
        assert latent.shape == (48, 3, 12, 12) and mask.shape == (1, 3, 12, 12)
        # The window's mask frames, as drawn, on the latent grid.
        drawn = torch.from_numpy(masks[start : start + FRAMES]).float()[None] / 255
        expected = clip_mask_to_latent(drawn, (12, 12), 3)  # (1, 3, 12, 12)
        assert torch.allclose(mask, expected, atol=0.1)
        # Latent frame 0 is the window's first frame; its mask frame covers the square there.
        frame = latent_to_frame(latent)  # (3, 48, 48)
        square = ((frame - SQUARE_COLOUR).abs().amax(dim=0) < 0.2).float()  # (48, 48)
        lefts.append(int(torch.nonzero(square.amax(dim=0))[0]))
        on_grid = F.interpolate(square[None, None], size=(12, 12), mode="area")[0, 0]
        assert torch.allclose(mask[0, 0], on_grid, atol=0.2)
    # The square moved: the clip's first mask frames would not have fitted the later windows.
    assert lefts == [(2 * start) % 32 for start in (0, 9, 18, 27)] == [0, 18, 4, 22]
    # An `item` conditioning (image-to-video's first frame) is each window's own first frame,
    # for its 9 frames, in a file of its own; the windows' latents are the ones cached above.
    built = build_cache(
        prepared.items[0],
        resolution=SIDE,
        cache_dir=tmp_path / "cache",
        settings=SETTINGS,
        encode_images=VideoEncoder(),
        encode_prompts=encode_prompt_codes,
        frames=FRAMES,
        fps=16,
        conditioning=[FIRST_FRAME],
        encode_conditioning=encode_first_frame,
    )
    assert built.counts.latents_reused == 4 and built.counts.conditioning_encoded == 4
    for number, cached in enumerate(built.items):
        sample = load_cached(cached)
        assert torch.equal(sample.latent, prepared.dataset[number]["latent"])
        assert torch.equal(sample.conditioning["first_frame"], latent_to_frame(sample.latent))
        assert int(sample.conditioning["frames"]) == FRAMES


def latent_to_frame(latent: Tensor) -> Tensor:
    """The stand-in encoder's latent frame 0, (48, F', 12, 12), back in pixels (3, 48, 48)."""
    return F.pixel_shuffle(latent[:, 0][None], 4)[0]


def test_slide_windows_and_a_clip_too_short_for_any(walk, tmp_path: Path):
    folder, _ = walk
    data = dict(
        concepts=[ConceptConfig(path=str(folder))],
        resolution=SIDE,
        buckets=False,
        cache_dir=str(tmp_path / "cache"),
        fps=16,
    )
    model = LoadedModel(denoiser=torch.nn.Identity(), identity="none")
    family = StandInFamily()
    slide = DataConfig(**data, frames=FRAMES, frame_windows="slide", window_stride=16)
    prepared = prepare_dataset(slide, family=family, model=model)
    assert prepared.windows == ["walk.mp4: 2 windows of 9 frames"]  # from 0 and 16; 32 + 9 > 40
    first, second = (prepared.dataset[n]["latent"] for n in range(len(prepared.dataset)))
    assert not torch.equal(first, second)
    short = DataConfig(**data, frames=41, frame_windows="uniform")
    with pytest.raises(DataError, match=r"walk\.mp4' has 40 frames .*data\.frames=41"):
        prepare_dataset(short, family=family, model=model)


def test_check_says_the_windows(walk, tiny_wan, tmp_path, capsys):
    folder, _ = walk
    preset = tmp_path / "preset.json"
    data = {
        "schema_version": 4,
        "model": {"family": "wan", "path": str(tiny_wan)},
        "data": {"concepts": [{"path": str(folder)}], "resolution": 48, "frames": FRAMES},
        "output": {"run_dir": str(tmp_path / "run")},
    }
    preset.write_text(json.dumps(data))
    assert main(["check", str(preset), "--set", "data.frame_windows=chunk"]) == 0
    assert "walk.mp4: 4 windows of 9 frames" in capsys.readouterr().out.splitlines()
    assert main(["check", str(preset)]) == 0  # head: nothing said
    assert "windows of" not in capsys.readouterr().out
