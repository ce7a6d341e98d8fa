from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modules.config.schema import ConceptConfig
from modules.data.concept import scan_concept
from modules.demo import world
from modules.demo.dataset import (
    BODY_COLOUR,
    CORE_LEVEL,
    HELDOUT_SUBJECT_IMAGES,
    HELDOUT_WORLD_IMAGES,
    MARKER,
    PRIOR_IMAGES,
    RIM_LEVEL,
    STRIPE_COLOUR,
    SUBJECT_IMAGES,
    SUBJECT_PRESENT,
    main,
    subject_presence,
    subject_scene,
    write_demo_dataset,
)

FILES = (SUBJECT_IMAGES + HELDOUT_SUBJECT_IMAGES) * 3 + (PRIOR_IMAGES + HELDOUT_WORLD_IMAGES) * 2


def _contents(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _tensor(images: list[Image.Image]) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1], as the family's sampler returns them."""
    arrays = [torch.from_numpy(np.asarray(image, dtype=np.float32)) for image in images]
    return torch.stack(arrays).permute(0, 3, 1, 2) / 127.5 - 1


def test_same_seed_writes_the_same_bytes(tmp_path: Path) -> None:
    write_demo_dataset(tmp_path / "one")
    write_demo_dataset(tmp_path / "two")

    one, two = _contents(tmp_path / "one"), _contents(tmp_path / "two")
    assert len(one) == FILES + 1
    assert one == two
    assert Image.open(tmp_path / "one" / "subject" / "subject_00.png").size == (64, 64)


def test_another_seed_draws_other_subject_images(tmp_path: Path) -> None:
    write_demo_dataset(tmp_path / "one")
    write_demo_dataset(tmp_path / "two", seed=1)

    one, two = _contents(tmp_path / "one"), _contents(tmp_path / "two")
    assert one["subject/subject_00.png"] != two["subject/subject_00.png"]


def test_subject_scene_is_deterministic_and_takes_a_background() -> None:
    one = subject_scene(np.random.default_rng(3), background="checkered")
    two = subject_scene(np.random.default_rng(3), background="checkered")

    assert one.image.tobytes() == two.image.tobytes()
    assert one.mask.tobytes() == two.mask.tobytes()
    assert one.caption == "a sks heart on a checkered background"
    assert (one.image.mode, one.mask.mode, one.image.size) == ("RGB", "L", (64, 64))
    with pytest.raises(ValueError, match="use one of"):
        subject_scene(np.random.default_rng(3), background="grass")


@pytest.mark.parametrize("size", [64, 128])
def test_masks_carry_core_and_rim_and_the_core_is_the_striped_heart(size: int) -> None:
    rng = np.random.default_rng(0)
    for _ in range(12):
        item = subject_scene(rng, size)
        mask, pixels = np.asarray(item.mask), np.asarray(item.image)
        levels, counts = np.unique(mask, return_counts=True)
        assert levels.tolist() == [0, RIM_LEVEL, CORE_LEVEL]
        assert counts.min() >= 20 * (size // 64) ** 2  # each level covers a visible area
        # Fully inside the frame: the border rows and columns are background.
        assert not mask[[0, -1]].any() and not mask[:, [0, -1]].any()

        core = pixels[mask == CORE_LEVEL]  # (n, 3)
        body = (core == BODY_COLOUR).all(axis=1)
        stripe = (core == STRIPE_COLOUR).all(axis=1)
        assert (body | stripe).all()
        assert 0.2 < stripe.mean() < 0.6  # both colours show: the stripes are visible
        # The heart covers 0.2-0.28 of the side as a radius: its area sits in that band.
        assert 0.05 < body.size / size**2 < 0.2


def test_the_rim_is_a_band_a_few_pixels_wide() -> None:
    mask = np.asarray(subject_scene(np.random.default_rng(1)).mask)
    rows = [row for row in mask if (row == CORE_LEVEL).any()]
    # Along a row through the heart, the rim runs from the first marked pixel to the core.
    widths = [int(np.argmax(row == CORE_LEVEL) - np.argmax(row > 0)) for row in rows]
    assert 2 <= np.median(widths) <= 3


def test_folders_scan_as_a_masked_subject_and_an_unmasked_prior(tmp_path: Path) -> None:
    demo = write_demo_dataset(tmp_path)
    subject_config, prior_config = demo.concepts()

    subject, prior = scan_concept(subject_config), scan_concept(prior_config)

    assert (subject.images, subject.masks_found, subject.masks_without_image) == (16, 16, 0)
    kinds = {f"a sks heart on a {kind} background" for kind in world.BACKGROUNDS}
    assert {item.caption for item in subject.items} == kinds
    assert (prior.images, prior.masks_found) == (PRIOR_IMAGES, 0)
    assert prior_config.type == "prior_prediction"
    assert all("sks" not in item.caption and "heart" not in item.caption for item in prior.items)
    assert {item.caption for item in prior.items} == {
        world.scene(1_000_000 + i, "train").caption for i in range(PRIOR_IMAGES)
    }


def test_heldout_folders_hold_new_subject_scenes_and_world_scenes(tmp_path: Path) -> None:
    demo = write_demo_dataset(tmp_path)

    subject = scan_concept(ConceptConfig(path=str(demo.heldout_subject)))
    scenes = scan_concept(ConceptConfig(path=str(demo.heldout_world)))

    assert (subject.images, subject.masks_found) == (HELDOUT_SUBJECT_IMAGES, 8)
    assert all(item.caption.startswith("a sks heart on a ") for item in subject.items)
    trained = {path.read_bytes() for path in demo.subject.glob("subject_??.png")}
    assert not {path.read_bytes() for path in demo.heldout_subject.glob("*.png")} & trained
    assert (scenes.images, scenes.masks_found) == (HELDOUT_WORLD_IMAGES, 0)
    assert all("sks" not in item.caption and "heart" not in item.caption for item in scenes.items)
    first = world.scene(2_000_000, "train")
    assert Image.open(demo.heldout_world / "world_00.png").tobytes() == first.image.tobytes()


def test_presence_tells_subject_scenes_from_world_scenes(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    subjects = _tensor([subject_scene(rng).image for _ in range(32)])
    scenes = _tensor([world.scene(i, "train").image for i in range(32)])
    demo = write_demo_dataset(tmp_path)
    heldout = _tensor([Image.open(p) for p in sorted(demo.heldout_world.glob("*.png"))])
    noise = 0.1 * torch.randn(subjects.shape, generator=torch.Generator().manual_seed(0))

    present, absent = subject_presence(subjects), subject_presence(torch.cat([scenes, heldout]))
    noisy = subject_presence(subjects + noise)

    assert present.shape == (32,) and absent.shape == (40,)
    assert present.min() > SUBJECT_PRESENT and noisy.min() > SUBJECT_PRESENT
    assert absent.max() < SUBJECT_PRESENT
    assert noisy.min() >= 0 and noisy.max() <= 1 and absent.min() >= 0 and absent.max() <= 1


def test_presence_refuses_other_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        subject_presence(torch.zeros(3, 8, 8))


def test_complete_dataset_is_not_written_again(tmp_path: Path) -> None:
    write_demo_dataset(tmp_path)
    image = tmp_path / "subject" / "subject_03.png"
    image.write_bytes(b"edited by hand")

    write_demo_dataset(tmp_path)

    assert image.read_bytes() == b"edited by hand"


def test_half_written_dataset_is_regenerated(tmp_path: Path) -> None:
    write_demo_dataset(tmp_path)
    expected = _contents(tmp_path)
    (tmp_path / MARKER).unlink()  # as if the last run stopped before the marker
    (tmp_path / "heldout-world" / "world_07.png").unlink()

    write_demo_dataset(tmp_path)

    assert _contents(tmp_path) == expected


def test_other_settings_regenerate(tmp_path: Path) -> None:
    write_demo_dataset(tmp_path)

    write_demo_dataset(tmp_path, size=96)

    for folder in ("subject", "heldout-subject"):
        assert Image.open(tmp_path / folder / "subject_00.png").size == (96, 96)
    for folder, name in (("prior", "prior_00.png"), ("heldout-world", "world_00.png")):
        assert Image.open(tmp_path / folder / name).size == (96, 96)


def test_too_small_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 32"):
        write_demo_dataset(tmp_path, size=16)


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([str(tmp_path / "demo")])

    assert (tmp_path / "demo" / MARKER).is_file()
    out = capsys.readouterr().out
    for folder in ("subject", "prior", "heldout-subject", "heldout-world"):
        assert str(tmp_path / "demo" / folder) + ":" in out
    assert "16 images with masks" in out


def test_is_current_follows_the_marker(tmp_path: Path) -> None:
    from modules.demo.dataset import is_current

    assert not is_current(tmp_path)
    write_demo_dataset(tmp_path)
    assert is_current(tmp_path)
    (tmp_path / MARKER).write_text('{"version": 1}', encoding="utf-8")  # an older dataset
    assert not is_current(tmp_path)


def test_the_crescent_task_writes_the_same_layout_with_its_own_trigger(tmp_path: Path) -> None:
    from modules.demo.dataset import CRESCENT_COLOUR, DOT_COLOUR, is_current

    heart = _contents(write_demo_dataset(tmp_path / "heart").root)
    demo = write_demo_dataset(tmp_path / "crescent", task="crescent")
    crescent = _contents(demo.root)

    assert set(crescent) == set(heart)  # same folders and names
    assert crescent["prior/prior_00.png"] == heart["prior/prior_00.png"]
    assert crescent["subject/subject_00.png"] != heart["subject/subject_00.png"]
    subject = scan_concept(ConceptConfig(path=str(demo.subject)))
    kinds = {f"a zwx crescent on a {kind} background" for kind in world.BACKGROUNDS}
    assert {item.caption for item in subject.items} == kinds and subject.masks_found == 16
    assert is_current(demo.root, task="crescent") and not is_current(demo.root)
    mask = np.asarray(Image.open(demo.subject / "subject_00-masklabel.png"))
    pixels = np.asarray(Image.open(demo.subject / "subject_00.png"))[mask == CORE_LEVEL]
    dots = (pixels == DOT_COLOUR).all(axis=1)
    assert ((pixels == CRESCENT_COLOUR).all(axis=1) | dots).all() and 0.05 < dots.mean() < 0.4


def test_the_crescent_is_new_to_the_world() -> None:
    from modules.demo.dataset import CRESCENT_COLOUR, DOT_COLOUR, TASKS

    assert "crescent" in TASKS and "crescent" not in world.SHAPES
    for colour in (CRESCENT_COLOUR, DOT_COLOUR):
        assert min(np.linalg.norm(np.subtract(colour, c)) for c in world.COLOURS.values()) > 90


def test_colour_presence_follows_the_task() -> None:
    rng = np.random.default_rng(5)
    crescents = _tensor([subject_scene(rng, task="crescent").image for _ in range(16)])
    hearts = _tensor([subject_scene(rng).image for _ in range(16)])

    assert subject_presence(crescents, "crescent").min() > SUBJECT_PRESENT
    assert subject_presence(crescents).max() < SUBJECT_PRESENT
    assert subject_presence(hearts, "crescent").max() < SUBJECT_PRESENT
    with pytest.raises(ValueError, match="use one of"):
        write_demo_dataset(Path("unused"), task="moon")
