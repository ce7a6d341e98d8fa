"""Edit pairs in both layouts: references beside their targets (``a-ref.png``) or in reference
folders (``data.concepts.N.reference_dirs``), counted, with every stray or missing file named,
and wired through the data preparation (tests/data/conditioned_family)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from modules.config.schema import ConceptConfig, DataConfig
from modules.data.concept import DataError, scan_concept
from modules.data.conditioning import find_pairs, pair_problems
from modules.data.latent_cache import build_cache
from modules.data.preparation import prepare_dataset
from tests.data.conditioned_family import REFERENCE, TOKENS_KEY, TWO_REFERENCES, ReferenceFamily
from tests.data.stand_ins import StandInEncoders

SETTINGS = {"family": "demo", "model": "built-in", "codec": 1}


def noise(seed: int, height: int = 24, width: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


@pytest.fixture
def targets(tmp_path: Path, write_image) -> Path:
    folder = tmp_path / "targets"
    folder.mkdir()
    for name, colour in (("a", (250, 0, 0)), ("b", (0, 250, 0)), ("c", (0, 0, 250))):
        write_image(folder / f"{name}.png", colour=colour)
    return folder


@pytest.fixture
def folders(tmp_path: Path, write_image, targets: Path) -> list[Path]:
    """Two reference folders, each with a file of every target's name (of other sizes)."""
    made = []
    for number in (1, 2):
        folder = tmp_path / f"refs{number}"
        folder.mkdir()
        for seed, name in enumerate("abc"):
            write_image(folder / f"{name}.png", pixels=noise(10 * number + seed))
        made.append(folder)
    return made


def scan(folder: Path, reference_dirs: list[Path] | None = None):
    concept = ConceptConfig(path=str(folder), reference_dirs=[str(d) for d in reference_dirs or []])
    return scan_concept(concept, references=True)


def test_beside_a_reference_without_its_target_is_named_not_trained(targets, write_image):
    write_image(targets / "a-ref.png")
    write_image(targets / "b-ref.png")
    write_image(targets / "b-ref1.png")
    write_image(targets / "x-ref.png")  # its target x.png is missing
    found = scan(targets)
    assert [item.image.name for item in found.items] == ["a.png", "b.png", "c.png"]
    assert [path.name for path in found.orphan_references] == ["x-ref.png"]
    pairs = find_pairs(found, TWO_REFERENCES)
    assert [len(refs) for refs in pairs.references] == [1, 2, 0]
    assert pairs.describe() == (
        "2 pairs, 1 to 2 references each · 1 target without a reference · "
        "1 reference without a target (x-ref.png)"
    )
    problems = pair_problems(found, (TWO_REFERENCES,), concept="C", field="data.concepts.0")
    assert len(problems) == 2, problems
    assert problems[0].startswith("C: 'c.png' has no reference image: add")
    assert problems[1] == (
        "C: reference 'x-ref.png' has no target 'x.png' beside it: add the target, or rename "
        "or remove the reference"
    )
    # One reference each for a model that takes one: b's two are refused by name.
    one = pair_problems(found, (REFERENCE,), concept="C", field="data.concepts.0")
    assert any("'b.png' has 2 reference images (b-ref.png, b-ref1.png)" in p for p in one)
    assert any("at most 1: remove the extra ones" in p for p in one)


def test_reference_folders_count_pairs_and_name_every_stray_file(targets, folders, write_image):
    found = scan(targets, folders)
    kinds = (TWO_REFERENCES,)
    assert find_pairs(found, TWO_REFERENCES, folders).describe() == "3 pairs, 2 references each"
    assert pair_problems(found, kinds, concept="C", field="F", reference_dirs=folders) == []

    (folders[1] / "b.png").unlink()  # b would train on one reference of two
    write_image(folders[0] / "z.png")  # a reference of no target
    problems = pair_problems(found, kinds, concept="C", field="F", reference_dirs=folders)
    assert len(problems) == 2, problems
    assert f"'b.png' has no reference image '{folders[1] / 'b.png'}'" in problems[0]
    assert f"reference '{folders[0] / 'z.png'}' has no target" in problems[1]
    assert "add 'z' (png, jpg, webp) to the concept folder" in problems[1]

    # More folders than the model takes, and a folder that is not there: by field.
    over = pair_problems(found, (REFERENCE,), concept="C", field="F", reference_dirs=folders)
    assert over == [
        "F.reference_dirs: 2 reference folders and this model takes at most 1 reference image "
        "per target: keep one folder"
    ]
    gone = targets.parent / "gone"
    missing = pair_problems(found, kinds, concept="C", field="F", reference_dirs=[gone])
    assert missing == [
        f"F.reference_dirs.0: '{gone}' does not exist: fix the path (a folder holding each "
        "target's reference under the target's name) or remove it"
    ]


def test_the_cache_never_trains_on_fewer_references_than_the_folders_give(
    tmp_path: Path, targets, folders
):
    (folders[1] / "c.png").unlink()
    family, encoders = ReferenceFamily(), StandInEncoders()
    with pytest.raises(DataError, match=r"c\.png' has 1 of its 2 reference images"):
        build_cache(
            list(scan(targets, folders).items),
            resolution=32,
            cache_dir=tmp_path / "cache",
            settings=SETTINGS,
            encode_images=encoders.encode_images,
            encode_prompts=encoders.encode_prompts,
            conditioning=(TWO_REFERENCES,),
            encode_conditioning=lambda kind, images, frames, caption: family.encode_conditioning(
                None, kind, images
            ),
            reference_dirs=folders,
        )
    assert family.calls == 0


def test_preparing_the_data_reads_each_concepts_reference_folders(tmp_path: Path, targets, folders):
    family = ReferenceFamily()
    model = family.load("", dtype=torch.float32, device=torch.device("cpu"))
    concept = ConceptConfig(path=str(targets), reference_dirs=[str(d) for d in folders])
    data = DataConfig(
        concepts=[concept], resolution=32, buckets=False, cache_dir=str(tmp_path / "cache")
    )
    prepared = prepare_dataset(data, family=family, model=model, conditioning=(TWO_REFERENCES,))
    assert family.calls == 3
    from modules.data.images import image_size, load_image

    row = prepared.dataset[1]["conditioning"][TOKENS_KEY]  # b's, both folders' b.png in order
    pixels = [load_image(d / "b.png", image_size(d / "b.png")) for d in folders]
    expected = family.encode_conditioning(None, "reference", pixels)[TOKENS_KEY][0]
    assert row.shape == (32, 64)  # two references of 16 tokens each
    assert torch.equal(row, expected)


def test_a_reference_folder_inside_the_concept_folder_is_not_a_clip(targets, write_image):
    """Reference files of the targets' names in a sub-folder would otherwise read as a folder
    of frames (a clip named 'refs')."""
    inside = targets / "refs"
    inside.mkdir()
    for seed, name in enumerate("abc"):
        write_image(inside / f"{name}.png", pixels=noise(seed))
    found = scan(targets, [inside])
    assert [item.image.name for item in found.items] == ["a.png", "b.png", "c.png"]
    assert not any(item.clip for item in found.items)
    assert [item.image.name for item in scan(targets).items][-1] == "refs"  # without: a clip
