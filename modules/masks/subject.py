"""Subject masks for what is not a person: GrabCut from a box, or the user's ONNX model.

GrabCut (OpenCV) separates the subject inside a box from the background around it by colour;
it needs no model. An ONNX segmentation model the user has (a background-removal model such as
U²-Net, IS-Net or MODNet exported to ONNX) is run with onnxruntime on the CPU. Assumptions
about the model, read from its first input and output:

- the input is NCHW float32 (1, 3, H, W), RGB; a fixed H and W in the model are used, dynamic
  ones get ``ONNX_SIDE``; pixels are scaled to [0, 1] and normalised with the ImageNet mean
  and standard deviation, as these models are trained;
- the first output is a one-channel map (1, 1, H, W), (1, H, W) or (H, W): probabilities in
  [0, 1], or logits (any value outside [0, 1] means logits, and a sigmoid is applied).

Nothing is downloaded: the model file is the user's.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from modules.masks.generated import GeneratedMask

GRABCUT_ROUNDS = 5
GRABCUT_SIDE = 384
"""GrabCut runs on a copy whose long side is at most this (its cost grows with the pixels)."""
ONNX_SIDE = 320
"""Input side for a model whose input size is dynamic (U²-Net's)."""
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
MIN_SHARE = 0.002
"""Least share of the picture a subject must cover to count as found."""
NO_SUBJECT = "no subject found"

_sessions: dict[str, Any] = {}
_lock = threading.Lock()


def generate_subject(
    image: np.ndarray,
    *,
    box: tuple[int, int, int, int] | None = None,
    model_path: str | None = None,
    value: int = 255,
) -> GeneratedMask:
    """A mask of the subject of an RGB image (H, W, 3) uint8 at grey level ``value``.

    With ``model_path`` the ONNX model decides (``box``, when given, then keeps only what lies
    inside it); otherwise GrabCut separates what is inside ``box`` (x0, y0, x1, y1; pixels,
    x1 and y1 exclusive) from what is around it. One of the two is needed.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB image (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if not 0 <= value <= 255:
        raise ValueError(f"value must be a grey level 0-255, got {value}")
    if model_path is None and box is None:
        raise ValueError("generate_subject needs a box (x0, y0, x1, y1) or an ONNX model_path")
    height, width = image.shape[:2]
    if box is not None:
        box = _clip_box(box, width, height)
    if model_path:
        subject = _onnx_subject(image, model_path)
    else:
        assert box is not None  # checked above
        subject = _grabcut(image, box)
    if box is not None and model_path:
        x0, y0, x1, y1 = box
        inside = np.zeros_like(subject)
        inside[y0:y1, x0:x1] = subject[y0:y1, x0:x1]
        subject = inside
    if subject.mean() < MIN_SHARE:
        return GeneratedMask(mask=None, found=False, note=NO_SUBJECT)
    mask = np.where(subject, np.uint8(value), np.uint8(0))
    return GeneratedMask(mask=mask, found=True, note="")


def margin_box(shape: tuple[int, ...], margin: float) -> tuple[int, int, int, int]:
    """The box ``margin`` (a fraction of each side) inside the picture's edges: for a subject
    that is centred and clear of the edges, GrabCut then takes the border as background."""
    if not 0.0 < margin < 0.5:
        raise ValueError(f"box margin must lie between 0 and 0.5 (a fraction), got {margin}")
    height, width = shape[:2]
    dx, dy = max(1, round(width * margin)), max(1, round(height * margin))
    return dx, dy, width - dx, height - dy


def _clip_box(box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (int(v) for v in box)
    x0, x1 = sorted((max(0, min(x0, width)), max(0, min(x1, width))))
    y0, y1 = sorted((max(0, min(y0, height)), max(0, min(y1, height))))
    if x1 - x0 < 2 or y1 - y0 < 2:
        raise ValueError(f"box {box} leaves no area inside the {width}×{height} image")
    return x0, y0, x1, y1


def _grabcut(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Bool (H, W): GrabCut's foreground from ``box``, run on a reduced copy."""
    height, width = image.shape[:2]
    scale = min(1.0, GRABCUT_SIDE / max(height, width))
    small = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))))
    x0, y0, x1, y1 = (round(v * scale) for v in box)
    seeds = np.zeros(small.shape[:2], np.uint8)
    background, foreground = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    rect = (x0, y0, max(1, x1 - x0), max(1, y1 - y0))
    bgr = np.ascontiguousarray(cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    if rect[2] >= small.shape[1] and rect[3] >= small.shape[0]:
        raise ValueError("the box covers the whole image: GrabCut needs background around it")
    cv2.setRNGSeed(0)  # GrabCut seeds its colour models at random: same input, same mask
    cv2.grabCut(bgr, seeds, rect, background, foreground, GRABCUT_ROUNDS, cv2.GC_INIT_WITH_RECT)
    subject = np.isin(seeds, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.uint8)
    # Back to full size; linear then a threshold gives smoother edges than nearest.
    full = cv2.resize(subject * 255, (width, height), interpolation=cv2.INTER_LINEAR)
    return full >= 128


def _onnx_subject(image: np.ndarray, model_path: str) -> np.ndarray:
    """Bool (H, W): the model's map above one half, at the image's size."""
    session = _session(model_path)
    entry = session.get_inputs()[0]
    shape = entry.shape
    if len(shape) != 4 or shape[1] not in (3, "3"):
        raise ValueError(
            f"ONNX model '{model_path}' takes {shape}; expected NCHW RGB (1, 3, H, W): use a "
            "segmentation model with that input"
        )
    side_h = shape[2] if isinstance(shape[2], int) and shape[2] > 0 else ONNX_SIDE
    side_w = shape[3] if isinstance(shape[3], int) and shape[3] > 0 else ONNX_SIDE
    height, width = image.shape[:2]
    resized = cv2.resize(image, (side_w, side_h), interpolation=cv2.INTER_AREA)
    pixels = (resized.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD  # (h, w, 3)
    batch = np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])  # (1, 3, h, w)
    with _lock:
        output = session.run(None, {entry.name: batch})[0]
    plane = np.asarray(output, np.float32).squeeze()
    if plane.ndim != 2:
        raise ValueError(
            f"ONNX model '{model_path}' gives an output of shape {np.shape(output)}; expected a "
            "one-channel map (1, 1, H, W)"
        )
    if plane.min() < 0.0 or plane.max() > 1.0:  # logits
        plane = 1.0 / (1.0 + np.exp(-np.clip(plane, -80.0, 80.0)))
    full = cv2.resize(plane, (width, height), interpolation=cv2.INTER_LINEAR)
    return full > 0.5


def _session(model_path: str) -> Any:
    """An onnxruntime session for the model, built once per process."""
    path = Path(model_path).expanduser()
    key = str(path.resolve())
    with _lock:
        session = _sessions.get(key)
        if session is not None:
            return session
        if not path.is_file():
            raise OSError(f"ONNX model '{path}' does not exist: give the path of a .onnx file")
        try:
            import onnxruntime
        except ImportError as error:
            raise OSError(
                "the subject mode's ONNX models need onnxruntime: pip install onnxruntime "
                "(pinned in requirements.txt; bash scripts/setup.sh installs it)"
            ) from error
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 2
        try:
            session = onnxruntime.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        # onnxruntime's binding errors (InvalidProtobuf, Fail, ...) derive from Exception only.
        except Exception as error:
            raise OSError(
                f"ONNX model '{path}' does not load ({error}): give a valid .onnx model file"
            ) from error
        _sessions[key] = session
        return session
