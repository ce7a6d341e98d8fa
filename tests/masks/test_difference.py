"""Masks from edit pairs (``masks --mode difference``): where a target differs from its
reference, on a real photograph with a known rectangle recoloured."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from modules.cli.main import main
from modules.config.schema import MaskTiersConfig
from modules.masks import masks_for_concept
from modules.masks.difference import generate_difference
from tests.masks.photos import photo

SIDE = 256
BOX = (slice(60, 160), slice(80, 200))  # rows, columns of the recoloured rectangle


def reference_photo(side: int = SIDE) -> np.ndarray:
    return cv2.resize(photo("astronaut"), (side, side), interpolation=cv2.INTER_AREA)


def recoloured(image: np.ndarray) -> np.ndarray:
    """``image`` with ``BOX`` tinted strongly magenta (an edit of that region only)."""
    edited = image.copy()
    tint = np.array([230, 30, 200], np.float32)
    edited[BOX] = (0.25 * edited[BOX] + 0.75 * tint).astype(np.uint8)
    return edited


def box_mask(shape: tuple[int, int]) -> np.ndarray:
    inside = np.zeros(shape, bool)
    inside[BOX] = True
    return inside


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def written(path: Path) -> np.ndarray:
    with Image.open(path) as mask:
        return np.asarray(mask.convert("L"))


def test_the_changed_level_covers_the_recoloured_rectangle_and_little_else(tmp_path: Path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    reference = reference_photo()
    Image.fromarray(reference).save(folder / "a-ref.jpg", quality=92)  # JPEG noise: unchanged
    Image.fromarray(recoloured(reference)).save(folder / "a.png")
    tiers = MaskTiersConfig(face=250, body=100)
    summary = masks_for_concept(folder, mode="difference", tiers=tiers)
    assert [path.name for path in summary.written] == ["a-masklabel.png"]
    assert summary.total == 1 and not summary.failed  # the reference is not an item
    mask = written(folder / "a-masklabel.png")
    assert set(np.unique(mask)) == {0, 100, 250}  # the tier levels and the background only
    changed, inside = mask == 250, box_mask(mask.shape)
    assert iou(changed, inside) >= 0.9
    assert (changed & ~inside).sum() < 0.01 * mask.size  # little else
    near = mask == 100
    assert near.any() and not (near & inside).any()  # a band around the change, outside it
    ring = np.zeros(mask.shape, bool)
    ring[40:180, 60:220] = True
    assert (mask[~ring] == 0).all()  # far from the edit: held to the base model


def test_a_reference_of_another_size_is_aligned_to_its_target():
    small = reference_photo(SIDE // 2)
    target = recoloured(cv2.resize(small, (SIDE, SIDE), interpolation=cv2.INTER_LINEAR))
    found = generate_difference(target, small)
    assert found.found and found.mask is not None and found.mask.shape == (SIDE, SIDE)
    assert iou(found.mask == 255, box_mask(found.mask.shape)) >= 0.9
    same = generate_difference(target, target)
    assert not same.found and same.mask is None


def test_the_command_reads_reference_folders_names_what_it_cannot_do(tmp_path: Path, capsys):
    folder, refs = tmp_path / "targets", tmp_path / "refs"
    folder.mkdir()
    refs.mkdir()
    reference = reference_photo()
    Image.fromarray(reference).save(refs / "a.png")
    Image.fromarray(recoloured(reference)).save(folder / "a.png")
    Image.fromarray(reference).save(folder / "b.png")  # no reference in the folder
    wide = cv2.resize(reference, (SIDE, SIDE // 2), interpolation=cv2.INTER_AREA)
    Image.fromarray(wide).save(refs / "c.png")  # of another aspect ratio: stretched
    Image.fromarray(recoloured(reference)).save(folder / "c.png")
    code = main(["masks", str(folder), "--mode", "difference", "--reference-dir", str(refs)])
    out, err = capsys.readouterr()
    assert code == 1  # b failed
    assert f"failed: {folder / 'b.png'}: no reference image to compare with: add" in err
    assert f"'{refs / 'b.png'}'" in err
    assert f"warning: reference '{refs / 'c.png'}' is 256x128 and its target 'c.png' 256x256" in err
    assert "crop the reference to the target's aspect ratio" in err
    assert (folder / "a-masklabel.png").is_file() and (folder / "c-masklabel.png").is_file()
    assert "2 written, 0 kept, 0 with no change found, 1 failed" in out

    # The overwrite policy of every mode: an existing (painted) mask is kept.
    painted = np.full((SIDE, SIDE), 77, np.uint8)
    Image.fromarray(painted).save(folder / "a-masklabel.png")
    assert main(["masks", str(folder), "--mode", "difference", "--reference-dir", str(refs)]) == 1
    assert (written(folder / "a-masklabel.png") == 77).all()
    assert "0 written, 2 kept" in capsys.readouterr().out


@pytest.mark.parametrize("option", [["--threshold", "250"], ["--near", "0.2"]])
def test_threshold_and_band_are_the_users_to_choose(tmp_path: Path, capsys, option):
    folder = tmp_path / "pairs"
    folder.mkdir()
    reference = reference_photo()
    Image.fromarray(reference).save(folder / "a-ref.png")
    Image.fromarray(recoloured(reference)).save(folder / "a.png")
    assert main(["masks", str(folder), "--mode", "difference"]) == 0
    default = written(folder / "a-masklabel.png")
    args = ["masks", str(folder), "--mode", "difference", "--overwrite", "all", *option]
    assert main(args) == 0
    chosen = written(folder / "a-masklabel.png")
    if option[0] == "--threshold":  # nothing changes by 250 levels: the mask is kept
        assert "0 written, 1 kept, 0 with no change found" in capsys.readouterr().out
        assert (chosen == default).all()
    else:
        assert (chosen == 128).sum() > 2 * (default == 128).sum()  # a wider band
