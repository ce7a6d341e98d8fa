"""Subject masks: GrabCut from a box, and a user's ONNX model (a tiny one built here)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modules.masks import generate_subject
from modules.masks.subject import margin_box
from tests.masks.photos import photo


def red_disc_on_texture(size: int = 200) -> np.ndarray:
    """A red disc (radius size / 4, centred) on green-grey noise."""
    rng = np.random.default_rng(0)
    image = np.empty((size, size, 3), np.uint8)
    image[...] = rng.integers(60, 120, (size, size, 1))
    image[..., 1] += 40
    rows, cols = np.indices((size, size))
    disc = (rows - size / 2) ** 2 + (cols - size / 2) ** 2 < (size / 4) ** 2
    image[disc] = np.array([200, 30, 30]) + rng.integers(0, 20, (int(disc.sum()), 3))
    return image


def corners(mask: np.ndarray) -> list[int]:
    return [int(mask[y, x]) for y in (0, -1) for x in (0, -1)]


def test_grabcut_from_a_box_keeps_the_subject_and_drops_the_corners():
    image = red_disc_on_texture()
    result = generate_subject(image, box=(30, 30, 170, 170))
    assert result.found and result.mask.shape == (200, 200)
    assert result.mask[100, 100] == 255 and result.mask[100, 60] == 255
    assert corners(result.mask) == [0, 0, 0, 0]
    disc_share = np.pi / 16
    assert abs(float((result.mask == 255).mean()) - disc_share) < 0.05


def test_grabcut_writes_the_requested_level_on_a_real_photograph():
    coffee = photo("coffee")  # a cup on a saucer, 600 × 400
    result = generate_subject(coffee, box=margin_box(coffee.shape, 0.1), value=180)
    assert result.found and set(np.unique(result.mask)) <= {0, 180}
    assert result.mask[200, 300] == 180  # the cup
    assert corners(result.mask) == [0, 0, 0, 0]


def test_a_box_or_a_model_is_needed():
    with pytest.raises(ValueError, match="needs a box"):
        generate_subject(red_disc_on_texture())


def redness_model(path, *, logits: bool, side: int | None = 64) -> str:
    """An ONNX model whose map is how much redder than green a pixel is (a 1 × 1 conv),
    through a sigmoid unless ``logits``. ``side`` None makes its input size dynamic."""
    weight = numpy_helper.from_array(np.array([[[[4.0]], [[-4.0]], [[0.0]]]], np.float32), "w")
    dims = [1, 3, side, side] if side else [1, 3, "height", "width"]
    nodes = [helper.make_node("Conv", ["image", "w"], ["score"])]
    if not logits:
        nodes.append(helper.make_node("Sigmoid", ["score"], ["map"]))
    graph = helper.make_graph(
        nodes,
        "redness",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)],
        [
            helper.make_tensor_value_info(
                "score" if logits else "map", TensorProto.FLOAT, [1, 1, dims[2], dims[3]]
            )
        ],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


@pytest.mark.parametrize(("logits", "side"), [(False, 64), (True, 64), (False, None)])
def test_an_onnx_model_finds_the_subject(tmp_path, logits, side):
    model = redness_model(tmp_path / "redness.onnx", logits=logits, side=side)
    result = generate_subject(red_disc_on_texture(), model_path=model, value=200)
    assert result.found and result.mask[100, 100] == 200
    assert corners(result.mask) == [0, 0, 0, 0]
    assert abs(float((result.mask == 200).mean()) - np.pi / 16) < 0.05


def test_an_onnx_model_with_a_box_keeps_only_what_lies_inside(tmp_path):
    model = redness_model(tmp_path / "redness.onnx", logits=False)
    result = generate_subject(red_disc_on_texture(), model_path=model, box=(0, 0, 100, 200))
    assert result.mask[100, 80] == 255 and result.mask[100, 120] == 0


def test_a_missing_onnx_file_is_named(tmp_path):
    with pytest.raises(OSError, match=r"absent\.onnx' does not exist"):
        generate_subject(red_disc_on_texture(), model_path=str(tmp_path / "absent.onnx"))


def test_nothing_found_is_reported(tmp_path):
    model = redness_model(tmp_path / "redness.onnx", logits=False)
    grey = np.full((64, 64, 3), 90, np.uint8)
    result = generate_subject(grey, model_path=model)
    assert (result.found, result.mask, result.note) == (False, None, "no subject found")
