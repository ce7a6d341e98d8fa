from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modules.data.concept import scan_concept
from modules.data.demo_dataset import (
    ANTENNA_LEVEL,
    CORE_LEVEL,
    MARKER,
    PRIOR_IMAGES,
    RIM_LEVEL,
    SUBJECT_IMAGES,
    main,
    write_demo_dataset,
)


def _contents(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_same_seed_writes_the_same_bytes(tmp_path: Path) -> None:
    write_demo_dataset(tmp_path / "one", size=64)
    write_demo_dataset(tmp_path / "two", size=64)

    one, two = _contents(tmp_path / "one"), _contents(tmp_path / "two")
    assert len(one) == SUBJECT_IMAGES * 3 + PRIOR_IMAGES * 2 + 1
    assert one == two


def test_another_seed_draws_other_images(tmp_path: Path) -> None:
    write_demo_dataset(tmp_path / "one", size=64)
    write_demo_dataset(tmp_path / "two", seed=1, size=64)

    one, two = _contents(tmp_path / "one"), _contents(tmp_path / "two")
    assert one["subject/subject_00.png"] != two["subject/subject_00.png"]


def test_masks_carry_the_three_weight_levels(tmp_path: Path) -> None:
    demo = write_demo_dataset(tmp_path)

    for index in range(SUBJECT_IMAGES):
        mask = np.asarray(Image.open(demo.subject / f"subject_{index:02d}-masklabel.png"))
        levels, counts = np.unique(mask, return_counts=True)
        assert levels.tolist() == [0, ANTENNA_LEVEL, RIM_LEVEL, CORE_LEVEL]
        assert counts.min() >= 20  # each level covers a visible area, not a stray pixel


def test_folders_scan_as_a_masked_subject_and_an_unmasked_prior(tmp_path: Path) -> None:
    demo = write_demo_dataset(tmp_path)
    subject_config, prior_config = demo.concepts()

    subject, prior = scan_concept(subject_config), scan_concept(prior_config)

    assert (subject.images, subject.masks_found, subject.masks_without_image) == (16, 16, 0)
    assert subject.items[0].caption.startswith("a photo of sks star, on a ")
    assert (prior.images, prior.masks_found) == (PRIOR_IMAGES, 0)
    assert prior_config.type == "prior_prediction"
    assert all(item.caption.startswith("a photo of ") for item in prior.items)
    assert all("sks" not in item.caption for item in prior.items)


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
    (tmp_path / "prior" / "prior_07.png").unlink()

    write_demo_dataset(tmp_path)

    assert _contents(tmp_path) == expected


def test_other_settings_regenerate(tmp_path: Path) -> None:
    write_demo_dataset(tmp_path, size=64)

    write_demo_dataset(tmp_path, size=96)

    assert Image.open(tmp_path / "subject" / "subject_00.png").size == (96, 96)


def test_too_small_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 32"):
        write_demo_dataset(tmp_path, size=16)


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([str(tmp_path / "demo"), "--size", "64"])

    assert (tmp_path / "demo" / MARKER).is_file()
    assert "16 images with masks" in capsys.readouterr().out
