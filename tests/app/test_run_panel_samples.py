"""The Run tab's samples: the base sample (written once per run) beside each sampling's LoRA
sample, base left as in the side-by-side files, fed through the trainer's event queue."""

from pathlib import Path

import pytest
from PIL import Image

from modules.trainer.events import SamplePair, SampleSaved

pytestmark = pytest.mark.ui

PROMPT = "a sks heart on a plain background"


def write(path: Path, colour: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)
    return path


def headers(panel) -> dict[str, int]:
    """Column headers of the samples frame → their grid column."""
    found = {}
    for widget in panel.samples_frame.winfo_children():
        if widget.winfo_manager() == "grid" and widget.grid_info()["row"] == 1:
            found[widget.cget("text")] = widget.grid_info()["column"]
    return found


def drain(panel, events) -> None:
    for event in events:
        panel.trainer.events.put(event)
    panel.drain()


def test_each_sampling_shows_the_cached_base_beside_the_lora_sample(window, tmp_path):
    panel = window.run_panel
    base = write(tmp_path / "samples/base/00.png", (0, 0, 255))
    lora2 = write(tmp_path / "samples/step000002-0-lora.png", (255, 0, 0))
    lora4 = write(tmp_path / "samples/step000004-0-lora.png", (0, 255, 0))
    pair = tmp_path / "samples/pair.png"  # the side-by-side file is not shown itself
    drain(
        panel,
        [
            SampleSaved(base, 2, PROMPT, with_lora=False),
            SampleSaved(lora2, 2, PROMPT, with_lora=True),
            SamplePair(pair, 2, PROMPT, base_path=base, lora_path=lora2),
        ],
    )
    assert panel.samples == {(PROMPT, False): base, (PROMPT, True): lora2}
    assert headers(panel) == {"base": 0, "with LoRA": 1}
    assert panel.samples_title.cget("text") == "Latest samples (step 2)"

    # The next sampling writes only the LoRA sample; its pair brings the base back in view.
    drain(
        panel,
        [
            SampleSaved(lora4, 4, PROMPT, with_lora=True),
            SamplePair(pair, 4, PROMPT, base_path=base, lora_path=lora4),
        ],
    )
    assert panel.samples == {(PROMPT, False): base, (PROMPT, True): lora4}
    assert headers(panel) == {"base": 0, "with LoRA": 1}
    assert len(panel._sample_images) == 2


def test_without_the_base_only_the_lora_column_is_shown(window, tmp_path):
    panel = window.run_panel
    lora = write(tmp_path / "samples/step000003-0-lora.png", (255, 0, 0))
    drain(panel, [SampleSaved(lora, 3, PROMPT, with_lora=True)])
    assert panel.samples == {(PROMPT, True): lora}
    assert headers(panel) == {"with LoRA": 0}
