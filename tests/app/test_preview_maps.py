"""The preview's arrays are the engine's: same loaders, same mask processing."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.preview_maps import (
    compute_maps,
    load_source,
    mask_levels,
    overlay,
    settings_from_values,
    upscale,
)
from modules.config import TrainConfig
from modules.data.images import image_size, load_mask, mask_to_latent
from modules.loss import Weighting, process_masks

FACE, BODY, HAIR = 255, 128, 80


@pytest.fixture
def tiered(tmp_path: Path) -> tuple[Path, Path]:
    """A 64×48 image with a tiered mask (face / body / hair / background)."""
    image = tmp_path / "person.png"
    Image.new("RGB", (64, 48), (90, 120, 200)).save(image)
    values = np.zeros((48, 64), dtype=np.uint8)
    values[4:44, 12:52] = BODY
    values[10:24, 24:40] = FACE
    values[4:10, 20:44] = HAIR
    mask = tmp_path / "person-masklabel.png"
    Image.fromarray(values, "L").save(mask)
    return image, mask


@pytest.mark.parametrize("threshold", [None, 0.2])
def test_maps_equal_process_masks_of_the_latent_mask(tiered, threshold):
    image, mask = tiered
    source = load_source(image, mask, size=32, latent_scale=4)
    maps = compute_maps(source, Weighting(gamma=0.6, min_weight=0.1, prior_threshold=threshold))
    latent = mask_to_latent(load_mask(mask, image_size(image), 32), (8, 8))
    expected = process_masks(latent, gamma=0.6, min_weight=0.1, prior_threshold=threshold)
    assert maps.target.shape == (8, 8)
    assert np.array_equal(maps.target, expected.target[0].numpy())
    assert np.array_equal(maps.prior, expected.prior[0].numpy())
    assert maps.target_mean == pytest.approx(float(expected.target.mean()))
    assert maps.prior_share == pytest.approx(float((expected.prior > 0).float().mean()))


def test_the_tier_table_reads_off_the_design_values(tiered):
    image, mask = tiered
    source = load_source(image, mask, size=32, latent_scale=4)
    maps = compute_maps(source, Weighting(gamma=0.7, min_weight=0.0, prior_threshold=None))
    rows = {round(row.raw * 255): row for row in maps.levels}
    assert sorted(rows) == [0, HAIR, BODY, FACE]
    # Design §10 with gamma 0.7: face 1 / 0, body ~0.62 / 0.38, hair ~0.44 / 0.56, background 0 / 1.
    assert (rows[FACE].target, rows[FACE].prior) == (1.0, 0.0)
    assert rows[BODY].target == pytest.approx(0.617, abs=0.002)
    assert rows[HAIR].target == pytest.approx(0.444, abs=0.002)
    assert rows[HAIR].prior == pytest.approx(1 - rows[HAIR].target)
    assert (rows[0].target, rows[0].prior) == (0.0, 1.0)
    assert sum(row.share for row in maps.levels) == pytest.approx(1.0)
    threshold = compute_maps(source, Weighting(gamma=0.7, min_weight=0.0, prior_threshold=0.35))
    hair = next(row for row in threshold.levels if round(row.raw * 255) == HAIR)
    assert (hair.target, hair.prior) == (0.0, 1.0)  # 0.31 < 0.35: all prior, no target


def test_an_image_without_a_mask_weighs_ones(tiered):
    image, _ = tiered
    source = load_source(image, None, size=32, latent_scale=4)
    maps = compute_maps(source, Weighting(gamma=0.7, min_weight=0.0, prior_threshold=None))
    assert not source.has_mask
    assert maps.target_mean == 1.0 and maps.prior_mean == 0.0 and maps.prior_share == 0.0


def test_mask_levels_drop_edge_pixels():
    mask = np.zeros((100, 100), dtype=np.float32)
    mask[:50] = 1.0
    mask[50, :20] = 0.5  # 0.2 % of the image: an edge, not a tier
    assert mask_levels(mask) == ((1.0, 0.5), (0.0, pytest.approx(0.498)))


def test_upscale_and_overlay():
    values = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    assert upscale(values, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]


def test_overlay_tints_by_the_maps(tiered):
    image, mask = tiered
    source = load_source(image, mask, size=32, latent_scale=4)
    maps = compute_maps(source, Weighting(gamma=1.0, min_weight=0.0, prior_threshold=None))
    tinted = overlay(source, maps)
    assert tinted.shape == (32, 32, 3) and tinted.dtype == np.uint8
    assert not np.array_equal(tinted, source.image)


def test_settings_come_from_the_sections_they_need():
    values = TrainConfig(mask={"enabled": True, "gamma": 0.5}, prior={"weight": 1}).model_dump()
    settings = settings_from_values(values)
    assert (settings.mask.gamma, settings.threshold, settings.resolution) == (0.5, None, 64)
    values["output"]["name"] = "bad name!"  # elsewhere: the preview does not care
    assert settings_from_values(values) == settings
    values["prior"]["threshold"] = 2.0
    assert settings_from_values(values).startswith("Fix prior.threshold to update the preview")


def test_the_preview_weighs_as_the_trainer_does():
    """One weighting, built from the same sections: every setting that shapes the maps
    reaches the preview (a setting the preview dropped would show other maps than training)."""
    sections = {
        "mask": {"enabled": True, "gamma": 0.6, "min_weight": 0.1, "normalize_per_sample": True},
        "prior": {"weight": 1, "threshold": 0.3},
    }
    config = TrainConfig(**sections)
    settings = settings_from_values(config.model_dump())
    assert settings.weighting() == Weighting.of(config.mask, config.prior)
    assert settings.weighting() == Weighting(0.6, 0.1, 0.3, True)


def test_importing_the_app_does_not_load_torch():
    import subprocess
    import sys

    code = (
        "import sys, app.main_window, app.run_panel, app.weight_preview; "
        "print('torch' in sys.modules)"
    )
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
    assert torch.is_tensor(torch.zeros(1))  # this test file itself may import it
