"""A demo preset started with your own data: the drift meter's demo folders are written, and a
warning says that the demo's held-out subject is not yours (``check`` and ``train`` alike)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modules.cli import main as cli_main
from modules.config import apply_overrides, load_preset
from modules.demo import data_folder
from modules.demo.data_folder import ensure_demo_data
from tests.cli.test_cli import REPO


@pytest.fixture
def own_data(tmp_path, monkeypatch):
    """Work in an empty folder whose demo-data/ was never written, with one image of ours."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data_folder, "DEMO_DATA_ROOT", tmp_path / "demo-data")
    folder = tmp_path / "mine"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "a.png")
    (folder / "a.txt").write_text("a photo of mine")
    return folder


def demo_preset_with(folder: Path, tmp_path: Path):
    config = load_preset(REPO / "presets/demo-prior.json")
    return apply_overrides(
        config,
        [
            f'data.concepts=[{{"path": "{folder}"}}]',
            f"data.cache_dir={tmp_path / 'cache'}",
            f"output.run_dir={tmp_path / 'run'}",
        ],
    )


def test_check_writes_the_drift_meters_demo_folders_and_says_they_are_not_yours(
    own_data, tmp_path, capsys
):
    config = demo_preset_with(own_data, tmp_path)
    assert config.drift.subject_path.startswith("demo-data/")

    assert cli_main.check(config, "demo-prior.json") == cli_main.EXIT_OK

    out = capsys.readouterr()
    assert (tmp_path / "demo-data" / "heldout-subject").is_dir()
    assert (tmp_path / "demo-data" / "heldout-world").is_dir()
    assert "named by drift.subject_path, drift.world_path" in out.out
    assert "warning: drift.subject_path=demo-data/heldout-subject is the demo dataset's" in out.out
    assert "demo-prior.json: OK (1 items in 1 concepts)" in out.out


def test_the_demo_concepts_write_the_dataset_without_the_warning(own_data, tmp_path, capsys):
    config = load_preset(REPO / "presets/demo-prior.json")
    assert ensure_demo_data(config) == []
    assert (tmp_path / "demo-data" / "subject").is_dir()
    assert "named by data.concepts[0].path" in capsys.readouterr().out


def test_a_drift_meter_that_is_off_writes_nothing(own_data, tmp_path):
    config = apply_overrides(demo_preset_with(own_data, tmp_path), ["drift.every=0"])
    assert ensure_demo_data(config) == []
    assert not (tmp_path / "demo-data").exists()
