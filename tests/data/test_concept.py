from __future__ import annotations

from pathlib import Path

import pytest

from modules.config.schema import CaptionConfig, ConceptConfig
from modules.data.concept import DataError, scan_concept


@pytest.fixture
def folder(tmp_path: Path, write_image, write_mask) -> Path:
    write_image(tmp_path / "a.png")
    write_mask(tmp_path / "a-masklabel.png")
    (tmp_path / "a.txt").write_text("  a cat on a sofa\n", encoding="utf-8")
    write_image(tmp_path / "b.jpg")
    write_image(tmp_path / "C.JPEG")
    write_mask(tmp_path / "C-masklabel.png")
    (tmp_path / "C.txt").write_text("   \n", encoding="utf-8")  # blank: the default applies
    write_image(tmp_path / "d.webp")
    write_mask(tmp_path / "gone-masklabel.png")  # its image was deleted
    (tmp_path / "notes.md").write_text("not an image", encoding="utf-8")
    (tmp_path / "._a.png").write_bytes(b"macOS metadata")
    return tmp_path


def test_scan_counts_images_masks_and_orphan_masks(folder: Path) -> None:
    scan = scan_concept(ConceptConfig(path=str(folder)))

    assert [item.image.name for item in scan.items] == ["a.png", "b.jpg", "C.JPEG", "d.webp"]
    assert [item.mask.name if item.mask else None for item in scan.items] == [
        "a-masklabel.png",
        None,
        "C-masklabel.png",
        None,
    ]
    assert scan.images == 4
    assert scan.masks_found == 2
    assert scan.images_without_mask == 2
    assert scan.masks_without_image == 1
    assert [path.name for path in scan.orphan_masks] == ["gone-masklabel.png"]
    assert scan.describe() == (
        "4 images: 2 with a mask, 2 without. 1 masks have no image (gone-masklabel.png)."
    )


def test_captions_join_prefix_with_file_text_or_default(folder: Path) -> None:
    caption = CaptionConfig(prefix="sks", default="a photo")
    scan = scan_concept(ConceptConfig(path=str(folder), caption=caption))

    captions = {item.image.name: item.caption for item in scan.items}
    assert captions == {
        "a.png": "sks, a cat on a sofa",
        "b.jpg": "sks, a photo",
        "C.JPEG": "sks, a photo",
        "d.webp": "sks, a photo",
    }


def test_captions_without_prefix_or_default(folder: Path) -> None:
    scan = scan_concept(ConceptConfig(path=str(folder)))

    captions = {item.image.name: item.caption for item in scan.items}
    assert captions["a.png"] == "a cat on a sofa"
    assert captions["b.jpg"] == ""

    prefixed = scan_concept(ConceptConfig(path=str(folder), caption=CaptionConfig(prefix="sks")))
    assert {item.image.name: item.caption for item in prefixed.items}["b.jpg"] == "sks"


def test_caption_extension_is_configurable(tmp_path: Path, write_image) -> None:
    write_image(tmp_path / "a.png")
    (tmp_path / "a.caption").write_text("from .caption", encoding="utf-8")
    (tmp_path / "a.txt").write_text("from .txt", encoding="utf-8")

    scan = scan_concept(
        ConceptConfig(path=str(tmp_path), caption=CaptionConfig(extension=".caption"))
    )

    assert scan.items[0].caption == "from .caption"


def test_caption_with_byte_order_mark(tmp_path: Path, write_image) -> None:
    write_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("\ufeffa dog".encode())

    assert scan_concept(ConceptConfig(path=str(tmp_path))).items[0].caption == "a dog"


def test_caption_that_is_not_utf8_names_the_file(tmp_path: Path, write_image) -> None:
    write_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"caf\xe9")

    with pytest.raises(DataError, match=r"a\.txt.*save it as UTF-8"):
        scan_concept(ConceptConfig(path=str(tmp_path)))


def test_missing_folder_names_the_folder_and_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"

    with pytest.raises(DataError, match="nowhere' does not exist: fix the concept's path"):
        scan_concept(ConceptConfig(path=str(missing)))


def test_folder_without_images(tmp_path: Path, write_mask) -> None:
    write_mask(tmp_path / "a-masklabel.png")

    with pytest.raises(DataError, match="has no images .*add images or remove the concept"):
        scan_concept(ConceptConfig(path=str(tmp_path)))


def test_two_masks_for_one_image_is_an_error(tmp_path: Path, write_image, write_mask) -> None:
    write_image(tmp_path / "a.png")
    write_mask(tmp_path / "a-masklabel.png")
    write_image(tmp_path / "a-masklabel.jpg")

    with pytest.raises(DataError, match="two masks for image 'a'.*keep one"):
        scan_concept(ConceptConfig(path=str(tmp_path)))


def test_unsupported_files_and_broken_links_are_listed_not_trained(tmp_path):
    from PIL import Image

    from modules.config.schema import ConceptConfig
    from modules.data.concept import scan_concept

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.gif")
    Image.new("RGB", (8, 8)).save(tmp_path / "c.tiff")
    (tmp_path / "d.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "notes.md").write_text("not an image format: not listed")
    (tmp_path / "a.txt").write_text("")  # an empty caption

    scan = scan_concept(ConceptConfig(path=str(tmp_path)))
    assert [item.image.name for item in scan.items] == ["a.png"]
    assert [path.name for path in scan.unsupported] == ["b.gif", "c.tiff"]
    assert [path.name for path in scan.broken_links] == ["d.png"]
    assert scan.items[0].caption_source == "empty"
    assert scan.describe().endswith("3 files not read (b.gif, c.tiff, d.png).")  # links last
