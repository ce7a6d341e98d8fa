"""A concept folder's masks: the overwrite policy, clips, cancelling, leftovers of a crash."""

import subprocess
import sys
import threading

import cv2
import numpy as np
import pytest
from PIL import Image

from modules.config.schema import ConceptConfig, MaskTiersConfig
from modules.data.concept import DataError, scan_concept
from modules.data.video import clip_info, load_clip_mask
from modules.masks import masks_for_concept
from modules.masks.model_files import check_models
from tests.masks.photos import REPO, photo, require_models
from tests.masks.unwritable import unwritable

TIERS = (0, 80, 128, 255)


def save(path, pixels):
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def concept(tmp_path):
    """astro.png (no mask), painted.png (a painted mask), broken.png (an undecodable mask)
    and coffee.jpg (no person)."""
    require_models()
    astronaut = cv2.resize(photo("astronaut"), (256, 256), interpolation=cv2.INTER_AREA)
    for name in ("astro", "painted", "broken"):
        save(tmp_path / f"{name}.png", astronaut)
    save(tmp_path / "painted-masklabel.png", np.full((256, 256), 200, np.uint8))
    (tmp_path / "broken-masklabel.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    save(tmp_path / "coffee.jpg", photo("coffee"))
    return tmp_path


def snapshot(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def test_missing_writes_absent_masks_keeps_painted_ones_and_reports_broken_ones(concept):
    before = snapshot(concept)
    summary = masks_for_concept(concept)
    after = snapshot(concept)
    assert {name: after[name] for name in before} == before  # nothing existing replaced
    assert [p.name for p in summary.written] == ["astro-masklabel.png"]
    assert [p.name for p in summary.kept] == ["painted-masklabel.png"]
    assert [p.name for p in summary.no_person] == ["coffee.jpg"]
    assert [p.name for p, _ in summary.failed] == ["broken-masklabel.png"]
    assert "does not decode" in summary.failed[0][1] and "overwrite all" in summary.failed[0][1]
    assert not summary.cancelled
    assert not (concept / "coffee-masklabel.png").exists()
    levels = np.asarray(Image.open(concept / "astro-masklabel.png"))
    assert levels.shape == (256, 256) and set(np.unique(levels)) <= set(TIERS)
    assert summary.line().startswith("1 written, 1 kept, 1 with no person found, 1 failed")


def test_missing_names_a_mask_of_the_wrong_size(concept):
    save(concept / "painted-masklabel.png", np.full((128, 256), 200, np.uint8))
    summary = masks_for_concept(concept)
    reasons = dict((p.name, why) for p, why in summary.failed)
    assert "the mask is 256x128 and the image 256x256" in reasons["painted-masklabel.png"]


def test_never_leaves_every_existing_mask_byte_for_byte(concept):
    before = snapshot(concept)
    summary = masks_for_concept(concept, overwrite="never")
    after = snapshot(concept)
    assert {name: after[name] for name in before} == before
    assert set(after) - set(before) == {"astro-masklabel.png"}
    assert sorted(p.name for p in summary.kept) == ["broken-masklabel.png", "painted-masklabel.png"]


def test_all_replaces_every_mask(concept):
    summary = masks_for_concept(concept, overwrite="all", tiers=MaskTiersConfig(body=100))
    assert len(summary.written) == 3 and summary.kept == []
    painted = np.asarray(Image.open(concept / "painted-masklabel.png"))
    assert 100 in painted and 200 not in painted


def test_progress_is_reported_and_cancel_stops_between_items(concept):
    cancel = threading.Event()
    seen = []

    def progress(done, total, item):
        seen.append((done, total, item.name))
        cancel.set()

    summary = masks_for_concept(concept, on_progress=progress, cancel=cancel)
    assert summary.cancelled and seen == [(1, 4, "astro.png")]
    assert [p.name for p in summary.written] == ["astro-masklabel.png"]


def test_leftovers_of_an_interrupted_run_are_removed(concept):
    (concept / ".astro-masklabel.png.k3j2.tmp").write_bytes(b"half")
    (concept / ".walk-masklabel.x1.tmp").mkdir()
    (concept / ".notes.txt").write_text("not ours")
    summary = masks_for_concept(concept, mode="tiers")
    assert sorted(p.name for p in summary.removed_leftovers) == [
        ".astro-masklabel.png.k3j2.tmp",
        ".walk-masklabel.x1.tmp",
    ]
    assert sorted(p.name for p in concept.iterdir() if p.name.startswith(".")) == [".notes.txt"]


def counted(summary) -> int:
    return len(summary.written) + len(summary.kept) + len(summary.no_person) + len(summary.failed)


@pytest.mark.parametrize("overwrite", ["never", "missing", "all"])
def test_every_item_is_counted_once_and_a_kept_hand_mask_as_kept(concept, overwrite):
    """A hand-painted mask of an image in which no person is found (a person seen from behind,
    painted as the README advises) is left as it was by "all", and counted as kept."""
    hand = save(concept / "coffee-masklabel.png", np.full((400, 600), 128, np.uint8)).read_bytes()
    summary = masks_for_concept(concept, overwrite=overwrite)
    assert (concept / "coffee-masklabel.png").read_bytes() == hand
    assert "coffee-masklabel.png" in [p.name for p in summary.kept]
    assert summary.no_person == []
    assert counted(summary) == 4  # the images
    if overwrite == "all":
        assert [p.name for p in summary.kept_unfound] == ["coffee.jpg"]
        assert summary.line().startswith("3 written, 1 kept, 0 with no person found, 0 failed")


def test_a_cancelled_batch_says_how_many_it_left(concept):
    cancel = threading.Event()
    summary = masks_for_concept(concept, on_progress=lambda *_: cancel.set(), cancel=cancel)
    assert summary.cancelled and counted(summary) == 1
    assert summary.total == 4 and summary.not_done == 3
    assert summary.line().endswith("- cancelled, 3 not done")


def test_a_folder_that_cannot_be_written_is_refused_before_anything_is_detected(concept):
    seen = []
    with unwritable(concept), pytest.raises(DataError) as refused:
        masks_for_concept(concept, on_progress=lambda done, total, item: seen.append(item))
    assert seen == []  # refused up front, not item after item
    assert f"'{concept}' cannot be written" in str(refused.value)
    assert "make the folder writable" in str(refused.value)
    assert not list(concept.glob(".*"))  # the write check left nothing behind


def test_an_unwritable_folder_whose_masks_are_all_there_is_only_read(concept):
    for name in ("astro", "broken"):
        save(concept / f"{name}-masklabel.png", np.full((256, 256), 200, np.uint8))
    save(concept / "coffee-masklabel.png", np.full((400, 600), 128, np.uint8))
    with unwritable(concept):
        summary = masks_for_concept(concept)
    assert len(summary.kept) == 4 and summary.written == summary.failed == []


def moving_astronaut(frames: int) -> list[np.ndarray]:
    small = cv2.resize(photo("astronaut"), (256, 256), interpolation=cv2.INTER_AREA)
    return [np.roll(small, 3 * k, axis=1) for k in range(frames)]


def read_back(folder, name):
    """The clip's mask through the trainer's own readers, at the clip's size: (F, H, W) levels."""
    (item,) = [
        i for i in scan_concept(ConceptConfig(path=str(folder))).items if i.image.name == name
    ]
    info = clip_info(item.image)
    weights = load_clip_mask(item.mask, item.image, info, list(range(info.frames)), info.size)
    return item.mask, info, (weights[0].numpy() * 255).round()


def near_tiers(levels: np.ndarray, tolerance: int = 3) -> float:
    """Share of values within ``tolerance`` grey levels of a tier level or 0."""
    distance = np.min([np.abs(levels - tier) for tier in TIERS], axis=0)
    return float((distance <= tolerance).mean())


def test_a_frame_folder_clip_gets_a_folder_of_mask_frames(tmp_path):
    require_models()
    (tmp_path / "walk").mkdir()
    for index, frame in enumerate(moving_astronaut(5)):
        save(tmp_path / "walk" / f"f{index + 1}.jpg", frame)
    summary = masks_for_concept(tmp_path)
    assert [p.name for p in summary.written] == ["walk-masklabel"]
    mask, info, levels = read_back(tmp_path, "walk")
    assert mask.is_dir() and len(list(mask.iterdir())) == 5 and info.frames == 5
    assert levels.shape == (5, 256, 256) and near_tiers(levels) > 0.99
    assert levels[0, 62, 112] == 255 and levels[4, 62, 112 + 12] == 255  # the nose, moving


def test_a_video_clip_gets_a_lossless_mask_video(tmp_path):
    require_models()
    writer = cv2.VideoWriter(
        str(tmp_path / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (256, 256)
    )
    for frame in moving_astronaut(5):
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    summary = masks_for_concept(tmp_path)
    assert [p.name for p in summary.written] == ["clip-masklabel.mkv"]
    mask, info, levels = read_back(tmp_path, "clip.mp4")
    assert mask.name == "clip-masklabel.mkv" and clip_info(mask).frames == info.frames == 5
    assert near_tiers(levels, tolerance=0) > 0.999  # FFV1 keeps every level exactly
    assert levels[2, 62, 112 + 6] == 255 and levels[2, 200, 60] == 128


def test_a_missing_model_says_to_run_setup(tmp_path):
    with pytest.raises(RuntimeError, match=r"run `bash scripts/setup.sh`"):
        check_models(tmp_path)


def test_a_background_thread_runs_a_batch_without_torch_or_tk(concept):
    """As the mask editor calls it: from a worker thread, in a process without the training
    stack (a fresh interpreter, so imports made by other tests do not count)."""
    script = (
        "import sys, threading; from pathlib import Path; from modules.masks import "
        "masks_for_concept; out = {}; worker = threading.Thread(target=lambda: out.update("
        f"s=masks_for_concept(Path({str(concept)!r})))); worker.start(); worker.join(); "
        "print(len(out['s'].written), 'torch' in sys.modules, 'tkinter' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "False", "False"]
