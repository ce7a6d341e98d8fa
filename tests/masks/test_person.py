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


def tile(rows: list[list[str]], side: int = 512) -> np.ndarray:
    """A montage of scikit-image photographs, each scaled to a ``side`` square; a name ending
    in ``~`` is mirrored."""
    import cv2

    def one(name: str) -> np.ndarray:
        pixels = cv2.resize(photo(name.rstrip("~")), (side, side), interpolation=cv2.INTER_AREA)
        return pixels[:, ::-1] if name.endswith("~") else pixels

    return np.concatenate([np.concatenate([one(name) for name in row], axis=1) for row in rows])


def body_shares(mask: np.ndarray, rows: int, cols: int) -> list[list[float]]:
    """The body tier's share of each tile of a montage."""
    tiles = [np.hsplit(band, cols) for band in np.vsplit(mask, rows)]
    return [[round(float((t == 128).mean()), 3) for t in band] for band in tiles]


@pytest.mark.parametrize(
    ("rows", "people"),
    [
        # Two astronauts under a coffee cup and a rocket's sky: both found.
        ([["coffee", "rocket"], ["astronaut", "astronaut~"]], [[False, False], [True, True]]),
        # Beside a coffee cup: the mirrored astronaut's face is too small to be found there.
        ([["astronaut", "coffee", "astronaut~"]], [[True, False, False]]),
        # The cameraman in profile is not found at half size; the cat is no person.
        ([["astronaut", "camera"]], [[True, False]]),
        ([["astronaut", "chelsea", "astronaut"]], [[True, False, True]]),
    ],
)
def test_in_a_montage_only_the_people_found_get_a_body(rows, people):
    """The segmenter, asked about a whole montage, answers "person" for the coffee cup, the
    rocket's sky, the grass and the flags beside the people: body comes only from each found
    face's own surroundings."""
    require_models()
    result = generate_tiers(tile(rows), MaskTiersConfig())
    shares = body_shares(result.mask, len(rows), len(rows[0]))
    for band, found_band in zip(shares, people, strict=True):
        for share, found in zip(band, found_band, strict=True):
            if found:  # as the astronaut alone: about half the picture
                assert 0.35 < share < 0.60, shares
            else:
                assert share < 0.01, shares


def test_a_montage_of_people_found_has_each_ones_face_and_hair():
    require_models()
    mask = generate_tiers(tile([["astronaut", "chelsea", "astronaut"]]), MaskTiersConfig()).mask
    left, cat, right = np.hsplit(mask, 3)
    for astronaut in (left, right):
        assert levels_at(astronaut, FACE[:1]) == [255] and levels_at(astronaut, HAIR[:1]) == [80]
        assert 0.02 < float((astronaut == 255).mean()) < 0.06
    assert not np.isin(cat, (80, 255)).any()  # the cat's face is no person's


@pytest.mark.parametrize("turns", [1, 3])
def test_a_person_lying_on_their_side_gets_their_body_and_not_the_wall(turns):
    """The segmenter knows people upright: lying down, it is asked about them turned upright."""
    require_models()
    turned = np.ascontiguousarray(np.rot90(photo("astronaut"), turns))
    mask = np.rot90(generate_tiers(turned, MaskTiersConfig()).mask, -turns)
    assert levels_at(mask, FACE[:1] + BODY) == [255] + [128] * len(BODY)
    assert levels_at(mask, BACKGROUND) == [0] * len(BACKGROUND)


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
