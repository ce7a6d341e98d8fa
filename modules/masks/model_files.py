"""The model files the person-mask generator runs, and their interpreters (built once).

The models are MediaPipe's Apache-2.0 ``.tflite`` files (selfie segmentation, face detection,
face mesh), taken from the ``mediapipe`` wheel on PyPI by ``scripts/fetch_mask_models.py``
(run by ``scripts/setup.sh``) into ``modules/masks/models/`` with the wheel's licence. They run
with LiteRT (``ai-edge-litert``); mediapipe itself is never installed or imported, and nothing
is downloaded while masks are made.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

MEDIAPIPE_VERSION = "0.10.21"
"""The mediapipe release the model files come from."""
MODEL_DIR = Path(__file__).resolve().parent / "models"
MODEL_FILES = {
    "selfie_segmentation.tflite": (
        "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite"
    ),
    "face_detection_short_range.tflite": (
        "mediapipe/modules/face_detection/face_detection_short_range.tflite"
    ),
    "face_detection_full_range_sparse.tflite": (
        "mediapipe/modules/face_detection/face_detection_full_range_sparse.tflite"
    ),
    "face_landmark.tflite": "mediapipe/modules/face_landmark/face_landmark.tflite",
}
"""File name in ``MODEL_DIR`` → its path inside the mediapipe wheel."""
LICENCE_FILE = "LICENSE"
"""The wheel's licence (Apache 2.0), kept next to the models under this name."""
WHEEL_LICENCE = f"mediapipe-{MEDIAPIPE_VERSION}.dist-info/LICENSE"
"""The licence's path inside the wheel."""
THREADS = 2
"""CPU threads per interpreter."""

_lock = threading.Lock()
_interpreters: dict[str, Any] = {}


class MaskModelsMissing(RuntimeError):
    """The model files are not in ``modules/masks/models/``; the message says how to get them."""


def missing_models(folder: Path = MODEL_DIR) -> list[str]:
    """The model files absent from ``folder`` (empty when everything is there)."""
    return [name for name in MODEL_FILES if not (folder / name).is_file()]


def check_models(folder: Path = MODEL_DIR) -> None:
    """Raise :class:`MaskModelsMissing` naming the absent files and the fix."""
    missing = missing_models(folder)
    if missing:
        raise MaskModelsMissing(
            f"mask model files missing in '{folder}' ({', '.join(missing)}): run "
            "`bash scripts/setup.sh` (or `python scripts/fetch_mask_models.py`) to fetch them once"
        )


def load_interpreter(path: Path, threads: int | None = None) -> Any:
    """A LiteRT interpreter for ``path`` with its tensors allocated, on ``threads`` CPU threads
    (``THREADS`` when None)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=threads or THREADS)
    interpreter.allocate_tensors()
    return interpreter


def run_model(name: str, pixels: np.ndarray) -> list[np.ndarray]:
    """Run the model ``name`` on one float32 (1, H, W, 3) input; its outputs in model order.

    Interpreters are built on first use and kept for the process. One lock serialises the runs:
    an interpreter must not be invoked from two threads at once.
    """
    with _lock:
        interpreter = _interpreter(name)
        (entry,) = interpreter.get_input_details()
        interpreter.set_tensor(entry["index"], pixels.astype(np.float32))
        interpreter.invoke()
        outputs = interpreter.get_output_details()
        return [interpreter.get_tensor(out["index"]).copy() for out in outputs]


def input_size(name: str) -> tuple[int, int]:
    """(height, width) the model ``name`` takes."""
    with _lock:
        shape = _interpreter(name).get_input_details()[0]["shape"]
    return int(shape[1]), int(shape[2])


def _interpreter(name: str) -> Any:
    # Called with _lock held.
    interpreter = _interpreters.get(name)
    if interpreter is None:
        check_models()
        interpreter = load_interpreter(MODEL_DIR / name)
        _interpreters[name] = interpreter
    return interpreter
