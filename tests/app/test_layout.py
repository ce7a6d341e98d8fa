"""The window's size from its screen, and one-line texts cut to a width (no display needed)."""

import pytest

from app.layout import ELLIPSIS, PREFERRED_SIZE, SCREEN_MARGIN, elide, window_size


@pytest.mark.parametrize(
    ("screen", "scaling"),
    [
        ((1920, 1080), 1.0),
        ((1400, 900), 1.0),
        ((1024, 700), 1.0),
        ((640, 480), 1.0),
        ((2880, 1800), 2.0),
        ((1366, 768), 1.25),
    ],
)
def test_the_window_fits_its_screen_with_room_for_frame_and_taskbar(screen, scaling):
    size = window_size(*screen, scaling)
    width, height = round(size.width * scaling), round(size.height * scaling)
    assert width <= screen[0] - SCREEN_MARGIN[0] and height <= screen[1] - SCREEN_MARGIN[1]
    assert size.x >= 0 and size.x + width <= screen[0]
    assert size.y >= 0 and size.y + height <= screen[1]
    assert size.min_width <= size.width and size.min_height <= size.height
    if screen == (1920, 1080):
        assert (size.width, size.height) == PREFERRED_SIZE  # room for all of it
    if screen == (1400, 900):
        assert (size.width, size.height) == (1368, 804)


class Font:
    """Ten pixels a character."""

    @staticmethod
    def measure(text: str) -> int:
        return 10 * len(text)


def test_a_long_text_is_cut_at_a_word_to_the_width():
    text = "Demo family, masked prior preservation in\ncontinuous mode."
    assert elide(text, Font, 1000) == "Demo family, masked prior preservation in continuous mode."
    cut = elide(text, Font, 260)
    assert cut == "Demo family, masked prior" + ELLIPSIS and Font.measure(cut) <= 260
    assert elide(text, Font, 259) == "Demo family, masked" + ELLIPSIS
    assert elide(text, Font, 120) == "Demo family" + ELLIPSIS  # the comma goes with the cut
    assert elide(text, Font, 30) == ELLIPSIS
