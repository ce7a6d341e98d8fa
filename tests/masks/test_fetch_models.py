"""scripts/fetch_mask_models.py: extract the models from a mediapipe wheel, once, atomically.

The wheel here is rebuilt from the fetched model files (the real bytes, at the paths the real
wheel holds them), so the test needs no network."""

import subprocess
import sys
import zipfile

from modules.masks.model_files import LICENCE_FILE, MODEL_DIR, MODEL_FILES, WHEEL_LICENCE
from tests.masks.photos import REPO, require_models


def fetch(*args):
    return subprocess.run(
        [sys.executable, "scripts/fetch_mask_models.py", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def wheel(path, *, leave_out=()):
    with zipfile.ZipFile(path, "w") as archive:
        for name, inside in {**MODEL_FILES, LICENCE_FILE: WHEEL_LICENCE}.items():
            if name not in leave_out:
                archive.write(MODEL_DIR / name, inside)
        archive.writestr("mediapipe/__init__.py", "")
    return path


def test_the_models_are_extracted_once_and_checked(tmp_path):
    require_models()
    target = tmp_path / "models"
    result = fetch("--wheel", wheel(tmp_path / "mediapipe.whl"), "--dir", target)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in target.iterdir()) == sorted([*MODEL_FILES, LICENCE_FILE])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mediapipe.whl", "models"]
    again = fetch("--dir", target)  # present: no download
    assert again.returncode == 0 and "mask models present" in again.stdout


def test_a_wheel_without_a_model_leaves_no_folder(tmp_path):
    require_models()
    broken = wheel(tmp_path / "mediapipe.whl", leave_out=("face_landmark.tflite",))
    result = fetch("--wheel", broken, "--dir", tmp_path / "models")
    assert result.returncode != 0 and "face_landmark.tflite" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mediapipe.whl"]
