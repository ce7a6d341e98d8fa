import pytest

from tests.wan.tiny_wan import write_video_concept


@pytest.fixture(scope="session")
def video_concept(tmp_path_factory):
    """Three 12-frame clips (mask video, mask frame folder, still mask) and a masked still."""
    return write_video_concept(tmp_path_factory.mktemp("data") / "subject")
