"""The mask being edited: painting, fill, undo/redo and atomic saves, without a display."""

import numpy as np
import pytest
from PIL import Image

from app.mask_layer import MaskLayer


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), (10, 20, 30)).save(path)
    return path


def test_a_stroke_paints_its_value_under_the_brush_only(image):
    layer = MaskLayer.open(image, None)
    assert layer.levels.shape == (48, 64) and not layer.levels.any()
    layer.begin()
    layer.paint([(10, 10), (40, 10)], radius=3, value=128)
    assert set(np.unique(layer.levels)) == {0, 128}
    assert (layer.levels[7:14, 10:41] == 128).all()  # under the stroke
    assert not layer.levels[20:].any() and not layer.levels[:, 50:].any()  # elsewhere
    assert layer.dirty


def test_undo_restores_the_bytes_and_redo_reapplies(image):
    layer = MaskLayer.open(image, None)
    before = layer.levels.copy()
    layer.begin()
    layer.paint([(5, 5), (30, 30)], radius=2, value=255)
    painted = layer.levels.copy()
    layer.undo()
    assert layer.levels.tobytes() == before.tobytes() and not layer.dirty
    layer.redo()
    assert np.array_equal(layer.levels, painted)
    layer.begin()  # a new edit drops the redo history
    layer.paint([(0, 0)], radius=1, value=80)
    assert not layer.can_redo


def test_fill_a_region_or_the_whole_mask(image):
    layer = MaskLayer.open(image, None)
    layer.begin()
    layer.paint([(32, 0), (32, 47)], radius=1, value=255)  # a wall down the middle
    layer.fill((5, 5), 128)
    assert (layer.levels[:, :30] == 128).all() and (layer.levels[:, 35:] == 0).all()
    layer.fill(None, 80)
    assert (layer.levels == 80).all()
    layer.undo()
    assert (layer.levels[:, :30] == 128).all()


def test_save_and_open_round_trip_exactly(image):
    layer = MaskLayer.open(image, None)
    layer.replace(np.arange(48 * 64, dtype=np.uint8).reshape(48, 64))
    path = layer.save()
    assert path == image.with_name("photo-masklabel.png") and not layer.dirty
    with Image.open(path) as saved:
        assert saved.mode == "L"
    again = MaskLayer.open(image, path)
    assert np.array_equal(again.levels, layer.levels)


def test_a_failed_save_keeps_the_old_file(image, monkeypatch):
    layer = MaskLayer.open(image, None)
    layer.fill(None, 200)
    path = layer.save()
    old = path.read_bytes()
    layer.fill(None, 10)

    def broken(*_args, **_kwargs):
        raise OSError("the disk is full")

    monkeypatch.setattr("modules.atomic.os.replace", broken)  # the rename fails
    with pytest.raises(OSError):
        layer.save()
    assert path.read_bytes() == old and layer.dirty
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(["photo.png", path.name])


def test_a_mask_of_another_size_is_named(image, tmp_path):
    wrong = tmp_path / "photo-masklabel.png"
    Image.new("L", (10, 10)).save(wrong)
    with pytest.raises(ValueError, match="10x10 and its image 64x48"):
        MaskLayer.open(image, wrong)
