"""Tiered person masks: face, body and hair at the grey levels of ``mask.tiers``.

Stages, on a working copy whose long side is at most ``WORK_SIDE`` pixels:

1. faces: BlazeFace (short range, then full range when that finds none) gives face boxes and
   eye positions; for each face the face mesh (468 landmarks) is run on an upright crop;
2. segmentation: MediaPipe's selfie segmenter gives each pixel's chance of being a person, in
   each face's person box (a few face heights around it), not in the whole picture;
3. hair: the head region around each face (an ellipse reaching above the forehead, cut at the
   chin), within the person, less the face and skin-coloured pixels, is the first guess;
   ``cv2.grabCut`` on that region refines it by colour, the face's pixels teaching it skin.

The face tier is the mesh's outline and a band above it (the mesh stops below the hairline)
where GrabCut found no hair: the forehead.

The body tier is, in each face's person box, the person pixels in a connected region that
holds that face. A face is what says a person is there: the segmenter alone also answers for
cats, coffee cups, flags, sky and grass, more so the smaller the people are in the picture, so
body comes only from around the faces found, and an image without a face (a person seen from
behind, too small, or no person) is reported as "no person found" and gets no mask. The tier
map is made at the working size and resized to the image's with nearest-neighbour sampling, so
it holds exactly the configured levels and 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from modules.config.schema import MaskTiersConfig
from modules.masks.generated import GeneratedMask
from modules.masks.model_files import input_size, run_model

WORK_SIDE = 512
"""Long side of the working copy: enough for the 256 px segmenter and 192 px face crops."""
SEGMENTER = "selfie_segmentation.tflite"
FACE_DETECTORS = (
    ("face_detection_short_range.tflite", (8, 16), (2, 6)),
    ("face_detection_full_range_sparse.tflite", (4,), (1,)),
)
"""(model, anchor strides, anchors per cell): the short-range detector for faces that fill a
good part of the picture, the full-range one for smaller faces when it finds none."""
FACE_MESH = "face_landmark.tflite"
FACE_SCORE = 0.6
"""Least detector confidence for a face. MediaPipe uses 0.5 for the short-range model; 0.6
keeps a cat's face (0.49 on scikit-image's ``chelsea``) out with a margin."""
MESH_SCORE = 0.5
"""Least face-mesh presence for the crop to count as a face."""
MAX_FACES = 4
PERSON_PROBABILITY = 0.5
BODY_REACH = (3.0, 2.0, 8.0)
"""How far a person's body may reach from their face, in face heights (the face mesh's top of
the forehead to its chin, about 19 cm on an adult): to each side of the chin (arms, what they
hold: the astronaut's helmet reaches 2.7), above it (the head) and below it (a standing adult's
feet lie about 8 below the chin)."""
NO_PERSON = "no person found"
# Face-mesh landmarks used for the face's axis: the top of the forehead and the chin.
_TOP, _CHIN = 10, 152


@dataclass(frozen=True)
class _Face:
    """One face on the working copy, in its pixels."""

    landmarks: np.ndarray
    """(468, 2) x, y."""

    @property
    def up(self) -> np.ndarray:
        """Unit vector from the chin to the top of the forehead."""
        axis = self.landmarks[_TOP] - self.landmarks[_CHIN]
        return axis / max(float(np.linalg.norm(axis)), 1e-6)

    @property
    def height(self) -> float:
        return float(np.linalg.norm(self.landmarks[_TOP] - self.landmarks[_CHIN]))

    @property
    def width(self) -> float:
        across = np.array([-self.up[1], self.up[0]])
        spread = self.landmarks @ across
        return float(spread.max() - spread.min())


def generate_tiers(image: np.ndarray, tiers: MaskTiersConfig) -> GeneratedMask:
    """A tier mask for an RGB image (H, W, 3) uint8: face, body and hair at ``tiers``' levels,
    background 0; ``found`` False (and no mask) when no person's face is found."""
    height, width = _check_image(image)
    work = _working_copy(image)
    faces = find_faces(work)
    if not faces:
        return GeneratedMask(mask=None, found=False, note=NO_PERSON)
    person, body = people(work, faces)
    face, hair = face_and_hair(work, person, faces)
    levels = np.zeros(work.shape[:2], np.uint8)
    levels[body] = tiers.body
    levels[hair] = tiers.hair
    levels[face] = tiers.face
    mask = cv2.resize(levels, (width, height), interpolation=cv2.INTER_NEAREST)
    return GeneratedMask(mask=mask, found=True, note="")


def people(work: np.ndarray, faces: list[_Face]) -> tuple[np.ndarray, np.ndarray]:
    """Bool (H, W) person and body regions of the working copy, from the found faces only.

    The segmenter runs on each face's person box (:func:`person_box`), turned upright and
    framed as the selfies it was trained on, never on the whole picture: on a wide picture or a
    montage it answers for flags, sky and props beside the people, at a resolution too coarse
    to tell them apart.
    ``person`` is every pixel a box's segmentation gives a person (hair is sought there);
    ``body`` only the pieces of it that hold that box's face, within the box.
    """
    shape = work.shape[:2]
    person = np.zeros(shape, bool)
    body = np.zeros(shape, bool)
    for one in faces:
        edges = person_box(shape, one)
        if edges is None:
            continue
        top, bottom, left, right = edges
        box = (slice(top, bottom), slice(left, right))
        turns = _quarter_turns(one)  # the segmenter knows people upright
        upright = np.ascontiguousarray(np.rot90(work[box], turns))
        found = np.rot90(segment_person(upright), -turns)
        mesh = _fill(shape, cv2.convexHull(one.landmarks.astype(np.float32)))[box]
        person[box] |= found
        body[box] |= _connected_to(mesh, found) | (found & mesh)
    return person, body


def person_box(shape: tuple[int, int], face: _Face) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) on the working copy: where the body of the person with this
    face may lie, cut at the picture's edges (None when nothing of it is in the picture).

    ``BODY_REACH`` face heights to each side of the chin, above it and below it, "below" being
    the quarter turn nearest the face's own down: a person lying down reaches sideways. The box
    stays upright: turned with a tilted head, its corners would reach into what lies beside.
    """
    side, above, below = (reach * face.height for reach in BODY_REACH)
    down = np.array(_DOWN[_quarter_turns(face)], np.float64)
    across = np.array([-down[1], down[0]])
    chin = face.landmarks[_CHIN]
    corners = np.array(
        [chin + x * across + y * down for x in (-side, side) for y in (-above, below)]
    )  # (4, 2) x, y
    (left, top), (right, bottom) = corners.min(axis=0), corners.max(axis=0)
    top, bottom = max(0, math.floor(top)), min(shape[0], math.ceil(bottom))
    left, right = max(0, math.floor(left)), min(shape[1], math.ceil(right))
    return (top, bottom, left, right) if bottom - top > 1 and right - left > 1 else None


_DOWN = ((0, 1), (-1, 0), (0, -1), (1, 0))
"""The body's direction (x, y) from the chin for 0-3 quarter turns of the face."""


def _quarter_turns(face: _Face) -> int:
    """How many quarter turns anticlockwise (``np.rot90``) set this face upright, its tilt
    rounded to the nearest quarter turn."""
    down = -face.up
    return int(np.argmax([float(down @ np.array(way)) for way in _DOWN]))


def segment_person(work: np.ndarray) -> np.ndarray:
    """Bool (H, W): the pixels the segmenter gives a person's chance above one half."""
    square, box = _letterbox(work, 256)
    (probability,) = run_model(SEGMENTER, square[None].astype(np.float32) / 255.0)
    top, left, rows, cols = box
    chance = probability[0, top : top + rows, left : left + cols, 0]  # (rows, cols)
    chance = cv2.resize(chance, (work.shape[1], work.shape[0]), interpolation=cv2.INTER_LINEAR)
    person = (chance > PERSON_PROBABILITY).astype(np.uint8)
    # A small opening drops specks; a closing fills pin-holes at the edges of clothes.
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    person = cv2.morphologyEx(person, cv2.MORPH_OPEN, kernel)
    person = cv2.morphologyEx(person, cv2.MORPH_CLOSE, kernel)
    return person.astype(bool)


def find_faces(work: np.ndarray) -> list[_Face]:
    """The faces on the working copy that the detector and the face mesh both confirm."""
    for model, strides, per_cell in FACE_DETECTORS:
        detections = _detect(work, model, strides, per_cell)
        faces = [face for face in (_mesh(work, *found) for found in detections) if face]
        if faces:
            return faces
    return []


def face_and_hair(
    work: np.ndarray, person: np.ndarray, faces: list[_Face]
) -> tuple[np.ndarray, np.ndarray]:
    """Bool (H, W) face and hair regions of the working copy."""
    shape = work.shape[:2]
    ycrcb = cv2.cvtColor(work, cv2.COLOR_RGB2YCrCb)
    face = np.zeros(shape, bool)
    hair = np.zeros(shape, bool)
    for one in faces:
        mesh = _fill(shape, cv2.convexHull(one.landmarks.astype(np.float32)))
        skin = _skin(ycrcb, mesh)
        forehead = _fill(shape, _forehead_hull(one)) & person & ~mesh
        head = (_head(shape, one) | forehead) & person & ~mesh
        # Surely hair: the head beside and above the face and its raised forehead band, where it
        # is not skin-coloured.
        above = head & ~skin & ~forehead
        sure = cv2.erode(above.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        refined = _smooth(_refine_hair(work, head, sure, skin, mesh, person))
        # Hair grows from the scalp: pieces not joined to the sure seeds (a dark collar beside
        # the neck) are dropped.
        this_hair = _connected_to(sure, refined)
        # The forehead is what of the raised band is not hair.
        face |= mesh | (forehead & ~this_hair)
        hair |= this_hair
    return face, hair & ~face


def _check_image(image: np.ndarray) -> tuple[int, int]:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"expected an RGB image (H, W, 3) of uint8, got {image.shape} {image.dtype}"
        )
    return image.shape[0], image.shape[1]


def _working_copy(image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    scale = WORK_SIDE / max(height, width)
    if scale >= 1.0:
        return np.ascontiguousarray(image)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _letterbox(image: np.ndarray, side: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """``image`` scaled to fit a black ``side`` square, centred, and where it lies in it
    (top, left, rows, cols): the models take squares, and squashing would distort faces."""
    height, width = image.shape[:2]
    scale = side / max(height, width)
    rows, cols = max(1, round(height * scale)), max(1, round(width * scale))
    square = np.zeros((side, side, 3), np.uint8)
    top, left = (side - rows) // 2, (side - cols) // 2
    square[top : top + rows, left : left + cols] = cv2.resize(
        image, (cols, rows), interpolation=cv2.INTER_AREA
    )
    return square, (top, left, rows, cols)


def _anchors(side: int, strides: tuple[int, ...], per_cell: tuple[int, ...]) -> np.ndarray:
    """(N, 2) anchor centres in [0, 1], in the detector's output order: for each stride, the
    grid row by row, each cell's anchors together (BlazeFace's SSD anchors, all of size 1)."""
    centres = []
    for stride, count in zip(strides, per_cell, strict=True):
        cells = side // stride
        rows, cols = np.mgrid[0:cells, 0:cells]
        grid = np.stack([(cols + 0.5) / cells, (rows + 0.5) / cells], axis=-1)  # (c, c, 2)
        centres.append(np.repeat(grid.reshape(-1, 1, 2), count, axis=1).reshape(-1, 2))
    return np.concatenate(centres).astype(np.float32)


def _detect(
    work: np.ndarray, model: str, strides: tuple[int, ...], per_cell: tuple[int, ...]
) -> list[tuple[np.ndarray, float, np.ndarray, np.ndarray]]:
    """Faces as (centre xy, box side, right eye xy, left eye xy) on the working copy."""
    side, _ = input_size(model)  # square: 128 short range, 192 full range
    square, (top, left, rows, _) = _letterbox(work, side)
    regressors, scores = run_model(model, square[None].astype(np.float32) / 127.5 - 1.0)
    anchors = _anchors(side, strides, per_cell)
    logits = np.clip(scores[0, :, 0], -80.0, 80.0)  # exp stays finite in float32
    confidence = 1.0 / (1.0 + np.exp(-logits))
    keep = np.flatnonzero(confidence >= FACE_SCORE)
    if keep.size == 0:
        return []
    raw = regressors[0, keep] / side  # (n, 16): box cx, cy, w, h, then 6 keypoints x, y
    centres = raw[:, 0:2] + anchors[keep]
    sizes = np.maximum(raw[:, 2], raw[:, 3])
    eyes = raw[:, 4:8].reshape(-1, 2, 2) + anchors[keep, None, :]
    order = np.argsort(-confidence[keep])
    chosen: list[int] = []
    for index in order:  # non-maximum suppression on the centre distance
        near = any(
            np.linalg.norm(centres[index] - centres[other]) < 0.5 * max(sizes[index], sizes[other])
            for other in chosen
        )
        if not near:
            chosen.append(int(index))
        if len(chosen) == MAX_FACES:
            break
    offset = np.array([left, top], np.float32) / side
    unit = work.shape[0] / rows * side  # working pixels per unit of the square
    found = []
    for index in chosen:
        centre = (centres[index] - offset) * unit
        found.append(
            (
                centre,
                float(sizes[index] * unit),
                (eyes[index, 0] - offset) * unit,
                (eyes[index, 1] - offset) * unit,
            )
        )
    return found


def _mesh(
    work: np.ndarray, centre: np.ndarray, size: float, right_eye: np.ndarray, left_eye: np.ndarray
) -> _Face | None:
    """Run the face mesh on an upright crop around one detection; None when it sees no face."""
    eye_line = left_eye - right_eye  # the subject's right eye is on the picture's left
    angle = math.atan2(float(eye_line[1]), float(eye_line[0]))
    crop = 192
    scale = 1.5 * size / crop  # MediaPipe crops 1.5 times the detected box
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    # Crop pixel (u, v) → working pixel: rotate by the eye line's angle, scale, centre.
    to_work = np.array(
        [
            [cos, -sin, centre[0] - (cos - sin) * crop / 2],
            [sin, cos, centre[1] - (sin + cos) * crop / 2],
        ],
        np.float32,
    )
    patch = cv2.warpAffine(
        work,
        to_work,
        (crop, crop),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
    )
    points, presence = run_model(FACE_MESH, patch[None].astype(np.float32) / 255.0)
    if 1.0 / (1.0 + math.exp(-float(np.clip(presence.ravel()[0], -100, 100)))) < MESH_SCORE:
        return None
    uv = points.reshape(-1, 3)[:, :2]  # (468, 2) crop pixels
    landmarks = uv @ to_work[:, :2].T + to_work[:, 2]
    return _Face(landmarks=landmarks.astype(np.float32))


def _forehead_hull(face: _Face) -> np.ndarray:
    """The mesh's upper half moved up by a fifth of the face's height, with the mesh: the
    forehead up to a typical hairline."""
    relative = (face.landmarks - face.landmarks.mean(axis=0)) @ face.up
    upper = face.landmarks[relative > 0.1 * face.height]
    raised = upper + face.up * 0.2 * face.height
    return cv2.convexHull(np.concatenate([face.landmarks, raised]).astype(np.float32))


def _fill(shape: tuple[int, int], hull: np.ndarray) -> np.ndarray:
    canvas = np.zeros(shape, np.uint8)
    cv2.fillConvexPoly(canvas, np.round(hull).astype(np.int32).reshape(-1, 2), 1)
    return canvas.astype(bool)


def _head(shape: tuple[int, int], face: _Face) -> np.ndarray:
    """The head around a face: an ellipse over the face and above it, where hair grows, cut at
    the chin (below it lie the neck and the collar; long hair there counts as body)."""
    centre = face.landmarks.mean(axis=0) + face.up * 0.2 * face.height
    axes = (round(0.85 * face.width), round(0.85 * face.height))
    angle = math.degrees(math.atan2(-float(face.up[0]), float(face.up[1])))
    canvas = np.zeros(shape, np.uint8)
    cv2.ellipse(canvas, (round(centre[0]), round(centre[1])), axes, angle, 0, 360, 1, -1)
    rows, cols = np.indices(shape)
    height = (np.stack([cols, rows], axis=-1) - face.landmarks[_CHIN]) @ face.up  # (H, W)
    return canvas.astype(bool) & (height > 0.05 * face.height)


def _skin(ycrcb: np.ndarray, mesh: np.ndarray) -> np.ndarray:
    """Bool (H, W): pixels whose colour is close to the face's (its inner part, by the
    spread of its chroma and brightness)."""
    inner = cv2.erode(mesh.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    samples = ycrcb[inner if inner.sum() > 50 else mesh].astype(np.float32)  # (n, 3)
    low, high = np.percentile(samples, [10, 90], axis=0)
    # Brightness varies with light across the face, chroma far less: a wider margin for Y.
    # Brown hair's chroma lies within a few levels of skin's, hence the narrow chroma margin.
    margin = np.array([20.0, 2.0, 2.0])
    lower, upper = low - margin, high + margin
    return np.all((ycrcb >= lower) & (ycrcb <= upper), axis=-1)


def _smooth(region: np.ndarray) -> np.ndarray:
    """``region`` without specks and pin-holes a few pixels across."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    opened = cv2.morphologyEx(region.astype(np.uint8), cv2.MORPH_OPEN, kernel)
    return cv2.morphologyEx(opened, cv2.MORPH_CLOSE, kernel).astype(bool)


def _connected_to(seed: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Bool (H, W): the pixels of ``region`` in components that touch ``seed`` (grown by 1)."""
    grown = cv2.dilate(seed.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    count, labels = cv2.connectedComponents(region.astype(np.uint8))
    touching = np.unique(labels[grown & region])
    return np.isin(labels, touching[touching > 0]) if count > 1 else np.zeros_like(region)


def _refine_hair(
    work: np.ndarray,
    head: np.ndarray,
    sure: np.ndarray,
    skin: np.ndarray,
    face: np.ndarray,
    person: np.ndarray,
) -> np.ndarray:
    """Hair within ``head`` (the person's head around the face, less the face) by GrabCut:
    ``sure`` is surely hair, the rest of the head probably, its skin-coloured pixels probably
    not, the face and what lies outside the person surely not. The face teaches GrabCut what
    skin looks like. Without the sure seeds GrabCut tends to give brown hair next to skin
    wholly to the background after a few rounds."""
    if head.sum() < 20:
        return np.zeros_like(head)
    rows, cols = np.nonzero(head | face)
    top, bottom = max(rows.min() - 4, 0), min(rows.max() + 5, head.shape[0])
    left, right = max(cols.min() - 4, 0), min(cols.max() + 5, head.shape[1])
    box = (slice(top, bottom), slice(left, right))
    seeds = np.full((bottom - top, right - left), cv2.GC_BGD, np.uint8)
    seeds[head[box]] = cv2.GC_PR_FGD
    seeds[head[box] & skin[box]] = cv2.GC_PR_BGD
    seeds[face[box] | ~person[box]] = cv2.GC_BGD
    seeds[sure[box]] = cv2.GC_FGD
    if not np.isin(seeds, (cv2.GC_FGD, cv2.GC_PR_FGD)).any():
        return np.zeros_like(head)
    background, foreground = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    picture = np.ascontiguousarray(cv2.cvtColor(work[box], cv2.COLOR_RGB2BGR))
    cv2.setRNGSeed(0)  # GrabCut seeds its colour models at random: same input, same mask
    cv2.grabCut(picture, seeds, None, background, foreground, 3, cv2.GC_INIT_WITH_MASK)
    hair = np.zeros_like(head)
    hair[box] = np.isin(seeds, (cv2.GC_FGD, cv2.GC_PR_FGD))
    return hair & head
