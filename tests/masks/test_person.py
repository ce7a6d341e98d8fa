"""Tier masks of real photographs with the real models: where each tier lands."""

import numpy as np
import pytest

from modules.config.schema import MaskTiersConfig
from modules.masks import GeneratedMask, generate_tiers
from tests.masks.photos import photo, require_models

# Points (x, y) on scikit-image's 512 × 512 astronaut photograph.
FACE = [(225, 125), (200, 140), (250, 140), (225, 160)]  # nose, cheeks, chin
HAIR = [(225, 30), (180, 60), (270, 60)]  # crown, both sides above the temples
BODY = [(150, 400), (250, 330), (80, 300)]  # the suit
BACKGROUND = [(20, 20), (340, 60), (490, 150), (400, 300)]  # flag, wall, wall, shuttle


@pytest.fixture(scope="module")
def astronaut_mask() -> GeneratedMask:
    require_models()
    return generate_tiers(photo("astronaut"), MaskTiersConfig())


def levels_at(mask: np.ndarray, points: list[tuple[int, int]]) -> list[int]:
    return [int(mask[y, x]) for x, y in points]


def test_each_tier_lands_on_its_part_of_the_astronaut(astronaut_mask):
    mask = astronaut_mask.mask
    assert astronaut_mask.found and astronaut_mask.note == ""
    assert mask.shape == (512, 512) and mask.dtype == np.uint8
    assert levels_at(mask, FACE) == [255] * len(FACE)
    assert levels_at(mask, HAIR) == [80] * len(HAIR)
    assert levels_at(mask, BODY) == [128] * len(BODY)
    assert levels_at(mask, BACKGROUND) == [0] * len(BACKGROUND)
    assert set(np.unique(mask)) <= {0, 80, 128, 255}


def test_tier_shares_of_the_astronaut_lie_within_bounds(astronaut_mask):
    mask = astronaut_mask.mask
    share = {level: float((mask == level).mean()) for level in (0, 80, 128, 255)}
    assert 0.02 < share[255] < 0.06  # the face: about 3 %
    assert 0.015 < share[80] < 0.06  # the hair: about 3 %
    assert 0.35 < share[128] < 0.60  # the suit: about half
    assert 0.35 < share[0] < 0.60  # flag, wall and shuttle


def test_the_configured_levels_are_the_ones_written():
    require_models()
    tiers = MaskTiersConfig(face=200, body=100, hair=50)
    mask = generate_tiers(photo("astronaut"), tiers).mask
    assert levels_at(mask, FACE) == [200] * len(FACE)
    assert levels_at(mask, BODY) == [100] * len(BODY)
    assert levels_at(mask, HAIR) == [50] * len(HAIR)
    assert set(np.unique(mask)) == {0, 50, 100, 200}


@pytest.mark.parametrize("name", ["coffee", "rocket", "chelsea"])
def test_a_photograph_without_a_person_is_reported_not_masked(name):
    require_models()
    result = generate_tiers(photo(name), MaskTiersConfig())
    assert (result.found, result.mask, result.note) == (False, None, "no person found")


def test_a_large_image_gets_a_mask_of_its_own_size():
    require_models()
    import cv2

    large = cv2.resize(photo("astronaut"), (1200, 1000), interpolation=cv2.INTER_LINEAR)
    mask = generate_tiers(large, MaskTiersConfig()).mask
    assert mask.shape == (1000, 1200)
    assert mask[int(125 * 1000 / 512), int(225 * 1200 / 512)] == 255  # the nose


def test_a_non_rgb_array_is_refused_with_the_shape_it_had():
    with pytest.raises(ValueError, match=r"expected an RGB image .*\(4, 4\)"):
        generate_tiers(np.zeros((4, 4), np.uint8), MaskTiersConfig())


@pytest.mark.parametrize("degrees", [25, -40])
def test_a_tilted_head_gets_its_face_and_hair(degrees):
    require_models()
    import cv2

    turn = cv2.getRotationMatrix2D((225, 125), degrees, 1.0)  # about the nose
    mask = generate_tiers(
        cv2.warpAffine(photo("astronaut"), turn, (512, 512)), MaskTiersConfig()
    ).mask
    assert mask[125, 225] == 255
    assert 0.02 < float((mask == 255).mean()) < 0.05
    assert 0.015 < float((mask == 80).mean()) < 0.05
