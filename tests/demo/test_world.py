from __future__ import annotations

import numpy as np
import pytest

from modules.demo.world import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_PAIRS,
    SHAPES,
    WorldSpec,
    render_scene,
    scene,
)
from modules.models.demo.family import MAX_PROMPT_BYTES

SCENES = 120


def _pairs(split: str, count: int = SCENES) -> list[list[tuple[str, str]]]:
    return [[(o.shape, o.colour) for o in scene(i, split).labels.objects] for i in range(count)]


def test_same_index_gives_the_same_bytes() -> None:
    for split in ("train", "heldout", "judge"):
        one, two = scene(7, split), scene(7, split)
        assert one.image.tobytes() == two.image.tobytes()
        assert one.caption == two.caption and one.labels == two.labels
        assert np.array_equal(one.labels.masks, two.labels.masks)
    assert scene(7, "train").image.tobytes() != scene(8, "train").image.tobytes()
    assert scene(7, "train").image.tobytes() != scene(7, "train", WorldSpec(seed=1)).image.tobytes()


def test_render_scene_takes_a_seed_or_a_generator() -> None:
    by_seed = render_scene(WorldSpec(), 3)
    by_rng = render_scene(WorldSpec(), np.random.default_rng(3))
    assert by_seed.image.tobytes() == by_rng.image.tobytes() and by_seed.caption == by_rng.caption


def test_training_never_shows_a_held_out_pair_and_held_out_always_does() -> None:
    train = [pair for pairs in _pairs("train") for pair in pairs]
    assert not set(train) & HELD_OUT_PAIRS
    heldout = _pairs("heldout")
    assert all(pairs[0] in HELD_OUT_PAIRS for pairs in heldout)
    # Seconds of held-out scenes are training pairs: only the main object is unseen.
    assert not {pair for pairs in heldout for pair in pairs[1:]} & HELD_OUT_PAIRS
    judge = {pair for pairs in _pairs("judge", 400) for pair in pairs}
    assert judge & HELD_OUT_PAIRS and judge - HELD_OUT_PAIRS


def test_held_out_pairs_cover_every_shape_once_with_distinct_colours() -> None:
    shapes, colours = zip(*HELD_OUT_PAIRS, strict=True)
    assert sorted(shapes) == sorted(SHAPES) and len(set(colours)) == len(colours)


def test_splits_draw_different_scenes() -> None:
    train = {scene(i, "train").image.tobytes() for i in range(50)}
    judge = {scene(i, "judge").image.tobytes() for i in range(50)}
    assert not train & judge


def test_scenes_vary_over_the_whole_world() -> None:
    labels = [scene(i, "judge").labels for i in range(400)]
    assert {label.background for label in labels} == set(BACKGROUNDS)
    assert {label.main.shape for label in labels} == set(SHAPES)
    assert {label.main.colour for label in labels} == set(COLOURS)
    assert {len(label.objects) for label in labels} == {1, 2}


def test_caption_names_the_labels_main_first() -> None:
    for i in range(SCENES):
        item = scene(i, "train")
        labels, caption = item.labels, item.caption
        assert f"{labels.background} background" in caption
        named = [f"{o.colour} {o.shape}" for o in labels.objects]
        positions = [caption.index(name) for name in named]
        assert positions == sorted(positions)
        # Nothing else is named: no other colour word appears.
        others = set(COLOURS) - {o.colour for o in labels.objects}
        assert not any(f" {colour} " in f" {caption} " for colour in others)


def test_main_object_and_background_survive_the_prompt_truncation() -> None:
    # The demo text encoder reads MAX_PROMPT_BYTES tokens, one of them the end token.
    for split in ("train", "heldout"):
        for i in range(SCENES):
            item = scene(i, split)
            kept = item.caption.encode()[: MAX_PROMPT_BYTES - 1].decode()
            main = item.labels.main
            assert f"{main.colour} {main.shape}" in kept and item.labels.background in kept


def test_main_object_is_clearly_the_largest() -> None:
    for i in range(SCENES):
        objects = scene(i, "judge").labels.objects
        if len(objects) == 2:
            assert objects[0].radius >= 1.15 * objects[1].radius


def test_masks_cover_exactly_the_visible_object_pixels() -> None:
    for i in range(SCENES):
        item = scene(i, "judge")
        pixels = np.asarray(item.image)
        masks = item.labels.masks
        assert masks.shape == (len(item.labels.objects), 64, 64) and masks.dtype == bool
        assert not (masks.sum(axis=0) > 1).any()  # visible parts never overlap
        for obj, mask in zip(item.labels.objects, masks, strict=True):
            assert mask.sum() > 20
            assert (pixels[mask] == COLOURS[obj.colour]).all()
            x0, y0, x1, y1 = obj.box
            outside = mask.copy()
            outside[y0:y1, x0:x1] = False
            assert not outside.any()


def test_main_object_is_never_hidden() -> None:
    for i in range(SCENES):
        item = scene(i, "judge")
        main = item.labels.main
        full_area = np.pi * main.radius**2
        # A triangle fills 41 % of its circle, a ring 70 %; overlap may nick a little more.
        assert item.labels.masks[0].sum() > 0.25 * full_area


def test_bad_arguments_name_the_fix() -> None:
    with pytest.raises(ValueError, match="split 'test': use one of"):
        scene(0, "test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"WorldSpec.shapes: unknown or empty \['hexagon'\]"):
        WorldSpec(shapes=("circle", "hexagon"))
    with pytest.raises(ValueError, match="WorldSpec.size: 16 is too small"):
        WorldSpec(size=16)
