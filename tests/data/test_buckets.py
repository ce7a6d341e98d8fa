"""Aspect-ratio buckets: the sizes, the choice of bucket, the crop, and a mask that lands on
exactly the latent cells of its image in every bucket shape."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modules.config.schema import ConceptConfig
from modules.data.batches import BucketBatchSampler
from modules.data.buckets import (
    BucketRule,
    bucket_sizes,
    crop_box,
    crop_fraction,
    nearest_bucket,
    place,
)
from modules.data.cache_files import load_cached
from modules.data.concept import scan_concept
from modules.data.images import load_image, load_mask
from modules.data.latent_cache import build_cache
from tests.data.stand_ins import StandInEncoders


@pytest.mark.parametrize(("resolution", "step"), [(64, 16), (640, 16), (1024, 64), (512, 32)])
def test_sizes_are_multiples_of_the_step_within_the_area_and_the_aspect_range(resolution, step):
    sizes = bucket_sizes(BucketRule(resolution=resolution, step=step, max_aspect=4.0))
    assert (resolution, resolution) in sizes
    for width, height in sizes:
        assert width % step == 0 and height % step == 0
        assert width * height <= resolution * resolution
        assert max(width, height) / min(width, height) <= 4.0
        assert (height, width) in sizes  # every landscape size has its portrait twin
    # Each size is as large as the step allows: one more step on the short side overflows.
    for width, height in sizes:
        short, long = sorted((width, height))
        assert (short + step) * long > resolution * resolution


def test_wan_s_native_sizes_are_buckets_of_640():
    sizes = bucket_sizes(BucketRule(resolution=640, step=16, max_aspect=4.0))
    assert {(832, 480), (480, 832), (640, 640)} <= set(sizes)
    assert nearest_bucket((832, 480), sizes) == (832, 480)  # WAN's own clips: no crop at all
    assert nearest_bucket((1080, 1920), sizes)[0] == 480  # 9:16 phone video: 480 wide
    assert crop_fraction((1920, 1080), nearest_bucket((1920, 1080), sizes)) < 0.01


def test_the_side_limit_and_the_aspect_range_bound_the_sizes():
    sizes = bucket_sizes(BucketRule(resolution=512, step=32, max_aspect=2.0, max_side=640))
    assert max(max(size) for size in sizes) <= 640
    assert max(max(w, h) / min(w, h) for w, h in sizes) <= 2.0
    with pytest.raises(ValueError, match="no bucket size"):
        bucket_sizes(BucketRule(resolution=512, step=32, max_aspect=2.0, max_side=16))


def test_nearest_bucket_goes_by_aspect_ratio():
    sizes = [(64, 64), (80, 48), (48, 80), (128, 32)]
    assert nearest_bucket((1600, 900), sizes) == (80, 48)
    assert nearest_bucket((400, 600), sizes) == (48, 80)
    assert nearest_bucket((500, 500), sizes) == (64, 64)
    assert nearest_bucket((10000, 100), sizes) == (128, 32)  # beyond the range: the widest


def test_the_square_crop_is_the_centred_square_and_others_cut_one_way():
    assert crop_box((300, 200), (64, 64)) == (50.0, 0.0, 250.0, 200.0)
    assert crop_box((200, 300), (64, 64)) == (0.0, 50.0, 200.0, 250.0)
    assert crop_box((160, 90), (160, 90)) == (0.0, 0.0, 160.0, 90.0)
    left, top, right, bottom = crop_box((1600, 900), (80, 48))  # 16:9 into 5:3
    assert (top, bottom) == (0.0, 900.0) and math.isclose((right - left) / 900, 80 / 48)
    assert crop_fraction((1600, 900), (80, 48)) == pytest.approx(1 - (80 / 48) / (16 / 9))
    assert place([(300, 200)], None, 64).sizes == [(64, 64)]  # buckets off: the square


def _box_concept(folder: Path, size: tuple[int, int], box: tuple[int, int, int, int]) -> Path:
    """An image of ``size``, white with a red ``box`` (left, top, right, bottom), and a mask
    that is 1 on the same box."""
    folder.mkdir(parents=True)
    width, height = size
    pixels = np.full((height, width, 3), 255, dtype=np.uint8)
    mask = np.zeros((height, width), dtype=np.uint8)
    left, top, right, bottom = box
    pixels[top:bottom, left:right] = (255, 0, 0)
    mask[top:bottom, left:right] = 255
    Image.fromarray(pixels).save(folder / "photo.png")
    Image.fromarray(mask, "L").save(folder / "photo-masklabel.png")
    return folder


SOURCES = {"2:3": (384, 576), "16:9": (640, 360), "1:1": (480, 480)}


@pytest.mark.parametrize("shape", list(SOURCES))
def test_a_mask_box_lands_on_the_latent_cells_of_its_image_in_every_bucket(shape, tmp_path):
    source = SOURCES[shape]
    width, height = source
    box = (width // 2 - 64, height // 2 - 48, width // 2 + 80, height // 2 + 64)
    folder = _box_concept(tmp_path / "concept", source, box)
    items = list(scan_concept(ConceptConfig(path=str(folder))).items)
    buckets = bucket_sizes(BucketRule(resolution=64, step=16, max_aspect=4.0))
    encoders = StandInEncoders()  # 4 px per latent cell, the latent is the pixels themselves
    for bucket in buckets:
        built = build_cache(
            items,
            resolution=64,
            cache_dir=tmp_path / "cache",
            settings={"family": "test"},
            encode_images=encoders.encode_images,
            encode_prompts=encoders.encode_prompts,
            sizes=[bucket],
        )
        sample = load_cached(built.items[0])
        rows, columns = bucket[1] // 4, bucket[0] // 4
        assert sample.latent.shape == (48, rows, columns) and sample.mask.shape == (
            1,
            rows,
            columns,
        )
        # The red box on the latent grid: the share of each 4x4 cell that is red (green ~ -1).
        green = sample.latent.view(3, 16, rows, columns)[1]  # (16 pixels, rows, columns)
        red_share = ((1 - green) / 2).mean(dim=0)  # 1 inside the box, 0 outside
        mask = sample.mask[0]
        inside, outside = red_share > 0.999, red_share < 0.001
        assert inside.any() and outside.any()
        assert bool((mask[inside] > 0.999).all()) and bool((mask[outside] < 0.001).all())
        # The soft edge cells agree too (LANCZOS for the image, area averaging for the mask).
        assert torch.allclose(mask, red_share, atol=0.2), bucket
        # And the box is where the crop puts it: centred crop, then scaled to the bucket.
        left, _, right, _ = crop_box(source, bucket)
        scale = bucket[0] / (right - left)
        expected_left = (box[0] - left) * scale / 4
        assert abs(int(inside.any(dim=0).nonzero()[0]) - math.ceil(expected_left)) <= 1


def test_image_and_mask_loaders_take_the_same_crop_at_any_size(tmp_path):
    folder = _box_concept(tmp_path / "c", (640, 360), (100, 50, 300, 200))
    image = load_image(folder / "photo.png", (80, 48))
    mask = load_mask(folder / "photo-masklabel.png", (640, 360), (80, 48))
    assert image.shape == (3, 48, 80) and mask.shape == (1, 48, 80)
    red = (image[1] < -0.99) & (image[0] > 0.99)
    full = mask[0] > 0.99
    assert bool(full[red].all()) and float(red[full].float().mean()) > 0.75  # edges blend
    assert not bool((mask[0] > 0)[image[1] > 0.99].any())  # white stays outside the mask


def test_bucketed_batches_are_one_bucket_each_none_dropped_and_fixed_by_the_seed():
    shapes = [(4, 8, 4)] * 5 + [(4, 4, 8)] * 3 + [(4, 6, 6)] * 2

    def passes(seed, count=3):
        sampler = BucketBatchSampler(shapes, 2, torch.Generator().manual_seed(seed))
        return [list(sampler) for _ in range(count)]

    first = passes(0)
    assert first == passes(0) and first != passes(1)
    for batches in first:
        assert all(len({shapes[i] for i in batch}) == 1 for batch in batches)
        assert sorted(i for batch in batches for i in batch) == list(range(len(shapes)))
        assert sorted(len(batch) for batch in batches) == [1, 1, 2, 2, 2, 2]
    assert first[0] != first[1]  # each pass reshuffles
    assert len(BucketBatchSampler(shapes, 2, torch.Generator())) == 6
