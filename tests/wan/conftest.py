import pytest

from tests.wan.tiny_wan import build_tiny_wan_i2v, write_video_concept


@pytest.fixture(scope="session")
def video_concept(tmp_path_factory):
    """Three 12-frame clips (mask video, mask frame folder, still mask) and a masked still."""
    return write_video_concept(tmp_path_factory.mktemp("data") / "subject")


@pytest.fixture(scope="session")
def clip_concept(tmp_path_factory):
    """The three masked clips of ``video_concept`` without the still (image-to-video)."""
    return write_video_concept(tmp_path_factory.mktemp("data") / "clips", still=False)


@pytest.fixture(scope="session")
def tiny_wan_i2v21(tmp_path_factory):
    """A tiny WAN 2.1 I2V folder: 36 input channels, image cross-attention, CLIP encoder."""
    return build_tiny_wan_i2v(tmp_path_factory.mktemp("wan") / "i2v21", version="2.1", seed=3)


@pytest.fixture(scope="session")
def tiny_wan_i2v22(tmp_path_factory):
    """A tiny WAN 2.2 I2V A14B folder: two 36-channel experts, boundary_ratio 0.9."""
    return build_tiny_wan_i2v(tmp_path_factory.mktemp("wan") / "i2v22", version="2.2", seed=4)
