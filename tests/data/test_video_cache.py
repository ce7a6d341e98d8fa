"""The cache with clips: 5-D latents, masks per latent frame, keys that follow the frame count,
the rate and every frame file, and batches that never mix frame counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from modules.config.schema import ConceptConfig, DataConfig
from modules.data.batches import BucketBatchSampler
from modules.data.cache_files import CachedItem, latent_key, load_cached, mask_key
from modules.data.concept import DataError, scan_concept
from modules.data.dataset import collate
from modules.data.latent_cache import build_cache
from modules.data.preparation import prepare_dataset
from modules.models.base import LoadedModel
from tests.data.stand_ins import encode_prompt_codes
from tests.data.video_files import write_frames, write_video

SETTINGS = {"family": "stand-in-video", "model": "none", "codec": 1}


class VideoEncoder:
    """A parameter-free stand-in for a WAN-like VAE, counting the pixels it sees.

    (B, 3, F, R, R) → (B, 48, F', R/4, R/4): frame 0 alone, then each 4 frames averaged (the
    causal 4x temporal compression), then a 4x pixel unshuffle. Images are 1-frame videos.
    """

    def __init__(self) -> None:
        self.inputs: list[tuple[int, ...]] = []

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.inputs.append(tuple(pixels.shape))
        video = pixels.unsqueeze(2) if pixels.dim() == 4 else pixels  # (B, 3, F, R, R)
        rest = video[:, :, 1:]
        if rest.shape[2]:
            rest = rest.unflatten(2, (-1, 4)).mean(dim=3)  # (B, 3, (F-1)/4, R, R)
        frames = torch.cat([video[:, :, :1], rest], dim=2)  # (B, 3, F', R, R)
        b, c, f, h, w = frames.shape
        flat = frames.transpose(1, 2).reshape(b * f, c, h, w)  # (B F', 3, R, R)
        packed = F.pixel_unshuffle(flat, 4)  # (B F', 48, R/4, R/4)
        return packed.view(b, f, 48, h // 4, w // 4).transpose(1, 2)  # (B, 48, F', h, w)


def flat(count: int, level: int = 100, size: int = 16) -> np.ndarray:
    return np.full((count, size, size, 3), level, dtype=np.uint8)


@pytest.fixture
def concept(tmp_path: Path) -> Path:
    """``clip/`` (12 frames) whose mask frames are 128, then 255 (frames 1-4), then 0; and
    ``pan.mp4`` with one still mask (left half); and ``still.png`` without a mask."""
    folder = tmp_path / "concept"
    folder.mkdir()
    write_frames(folder / "clip", flat(12))
    levels = [128] + [255] * 4 + [0] * 7
    masks = np.stack([np.full((16, 16), v, dtype=np.uint8) for v in levels])
    write_frames(folder / "clip-masklabel", masks)
    write_video(folder / "pan.mp4", flat(12), fps=16)
    half = np.zeros((16, 16), np.uint8)
    half[:, :8] = 255
    Image.fromarray(half).save(folder / "pan-masklabel.png")
    Image.fromarray(flat(1)[0]).save(folder / "still.png")
    return folder


def build(folder: Path, cache: Path, encoder: VideoEncoder, **kwargs) -> list[CachedItem]:
    items = list(scan_concept(ConceptConfig(path=str(folder))).items)
    return build_cache(
        items,
        resolution=16,
        cache_dir=cache,
        settings=SETTINGS,
        encode_images=encoder,
        encode_prompts=encode_prompt_codes,
        **kwargs,
    ).items


def test_clips_cache_5d_latents_with_masks_per_latent_frame(concept: Path, tmp_path: Path):
    encoder = VideoEncoder()
    paths = build(concept, tmp_path / "cache", encoder, frames=9, fps=16)
    clip, pan, still = (load_cached(path) for path in paths)  # scan order: clip, pan, still
    assert clip.latent.shape == (48, 3, 4, 4) and pan.latent.shape == (48, 3, 4, 4)
    assert still.latent.shape == (48, 1, 4, 4)  # a still image is a 1-frame video
    # Latent frame 0 = frame 0 (128/255); then frames 1-4 (all 255); then frames 5-8 (all 0).
    assert torch.allclose(clip.mask[0, :, 0, 0], torch.tensor([128 / 255, 1.0, 0.0]))
    assert clip.mask.shape == (1, 3, 4, 4) and clip.has_mask
    # The still mask applies to every frame: left half 1, right half 0 on the latent grid.
    expected = torch.tensor([1.0, 1.0, 0.0, 0.0]).expand(3, 4, 4)
    assert torch.equal(pan.mask[0], expected)
    assert torch.equal(still.mask, torch.ones(1, 1, 4, 4)) and not still.has_mask
    # Stills are batched as images; each clip is encoded alone as (1, 3, F, R, R).
    assert sorted(encoder.inputs) == [(1, 3, 9, 16, 16), (1, 3, 9, 16, 16), (1, 3, 16, 16)]


def test_one_frame_trains_a_clip_as_its_first_frame(concept: Path, tmp_path: Path):
    encoder = VideoEncoder()
    clip, _, _ = (load_cached(p) for p in build(concept, tmp_path / "c", encoder, frames=1))
    assert clip.latent.shape == (48, 1, 4, 4)
    assert torch.allclose(clip.mask, torch.full((1, 1, 4, 4), 128 / 255))
    assert encoder.inputs == [(3, 3, 16, 16)]  # all three items in one still batch


def test_keys_follow_frames_fps_and_every_frame_file(concept: Path):
    scan = scan_concept(ConceptConfig(path=str(concept)))
    clip, _, still = scan.items

    def key(item, **kwargs):
        return latent_key(item, size=(16, 16), settings=SETTINGS, **kwargs)

    base = key(clip, frames=9, fps=16)
    assert key(clip, frames=5, fps=16) != base
    assert key(clip, frames=9, fps=8) != base
    assert key(still, frames=9, fps=16) == key(still)  # stills ignore clip settings
    Image.fromarray(flat(1, level=7)[0]).save(concept / "clip" / "frame12.png")
    assert key(clip, frames=9, fps=16) != base  # a frame's content changed
    masks = concept / "clip-masklabel"
    before = mask_key(masks, latent=base)
    (masks / "frame3.png").unlink()
    assert mask_key(masks, latent=base) != before  # the mask's key follows every mask frame


def test_a_second_build_reuses_every_clip(concept: Path, tmp_path: Path):
    first = build(concept, tmp_path / "cache", VideoEncoder(), frames=5, fps=16)
    encoder, calls = VideoEncoder(), []
    second = build(concept, tmp_path / "cache", encoder, frames=5, fps=16, progress=calls.append)
    assert second == first and encoder.inputs == [] and calls == []


def test_a_clip_shorter_than_the_frames_is_reported(concept: Path, tmp_path: Path):
    with pytest.raises(DataError, match=r"clip/?' has 12 frames .*data\.frames=17"):
        build(concept, tmp_path / "cache", VideoEncoder(), frames=17, fps=16)


class StandInFamily:
    name = "stand-in-video"

    def __init__(self) -> None:
        self.encoder = VideoEncoder()

    def encode_images(self, model: LoadedModel, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def encode_prompts(self, model: LoadedModel, prompts: list[str]) -> dict[str, torch.Tensor]:
        return encode_prompt_codes(prompts)


def test_batches_of_stills_and_clips_are_refused_before_training(concept: Path, tmp_path: Path):
    data = DataConfig(
        concepts=[ConceptConfig(path=str(concept))],
        resolution=16,
        cache_dir=str(tmp_path / "cache"),
        frames=5,
        buckets=False,
    )
    model = LoadedModel(denoiser=torch.nn.Identity(), identity="none")
    family = StandInFamily()
    prepared = prepare_dataset(data, family=family, model=model, batch_size=1)
    assert len(prepared.dataset) == 3
    with pytest.raises(DataError, match=r"batch_size=2: .*2 items with 2.*set training\.batch"):
        prepare_dataset(data, family=family, model=model, batch_size=2)
    samples = [prepared.dataset[0], prepared.dataset[2]]  # a clip and the still
    with pytest.raises(ValueError, match="mixes latent shapes"):
        collate(samples)


def test_with_buckets_stills_and_clips_train_in_batches_of_their_own(concept: Path, tmp_path):
    data = DataConfig(
        concepts=[ConceptConfig(path=str(concept))],
        resolution=16,
        cache_dir=str(tmp_path / "cache"),
        frames=5,
    )
    model = LoadedModel(denoiser=torch.nn.Identity(), identity="none")
    prepared = prepare_dataset(data, family=StandInFamily(), model=model, batch_size=2)
    shapes = prepared.dataset.latent_shapes()
    assert sorted(shapes) == [(48, 1, 4, 4), (48, 2, 4, 4), (48, 2, 4, 4)]
    sampler = BucketBatchSampler(shapes, 2, torch.Generator().manual_seed(0))
    for batch in sampler:
        assert len({shapes[i] for i in batch}) == 1
        collate([prepared.dataset[i] for i in batch])
    assert sorted(len(batch) for batch in sampler) == [1, 2]  # none dropped
