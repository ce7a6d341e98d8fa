"""The subject judge: does an image show a demo LoRA task's subject (sks heart, zwx crescent)?

A small CNN trained on the subject's own renderings (``scripts.train_subject_judge``): the
striped heart at sizes from well below the smallest the dataset draws up to its largest, at any
position and tilt, on the world's backgrounds and clutter, against world scenes and near misses
(a subject's colours in blobs, its pattern on other shapes, its shape in flat colours). Unlike
the colour-area test (``modules.demo.dataset.subject_presence``) it judges pattern and
shape, so a small but correct subject counts as present.

Classes are ``("none", "heart", "crescent")``: one class per subject task plus "none", in one
network rather than one judge per task, so the tasks' near misses of each other (a heart in the
crescent's dots) are told apart by the same features, one file ships, and one forward pass
scores a sample for every task. Weights are float16 safetensors; the classes and what the
file was trained on travel in the metadata.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.demo.half_weights import read_half, save_half
from modules.models.base import eval_mode

CLASSES = ("none", "heart", "crescent")
SHIPPED_WEIGHTS = Path(__file__).with_name("subject_judge.safetensors")
_INPUT_SIZE = 64


class SubjectJudge(nn.Module):
    """Four conv blocks (64 → 4 pixels), global max pooling (a small subject anywhere counts
    as much as a large one), one linear layer to the classes."""

    def __init__(self, classes: tuple[str, ...] = CLASSES, width: int = 16) -> None:
        super().__init__()
        self.classes = tuple(classes)
        self.width = width
        channels = [3, width, width * 2, width * 3, width * 4]
        blocks: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(channels):
            blocks += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
        self.features = nn.Sequential(*blocks, nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels[-1], len(self.classes))

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, classes) logits."""
        if images.shape[-2:] != (_INPUT_SIZE, _INPUT_SIZE):
            images = F.interpolate(images, size=(_INPUT_SIZE, _INPUT_SIZE), mode="area")
        return self.head(self.features(images))


@torch.no_grad()
def judge_subject(judge: SubjectJudge, images: Tensor) -> Tensor:
    """(B,) class indices into ``judge.classes`` for (B, 3, H, W) images in [-1, 1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"judge_subject takes (B, 3, H, W) images, got {tuple(images.shape)}")
    with eval_mode(judge):
        return judge(images.detach().float().clamp(-1, 1).cpu()).argmax(dim=1)


def share_showing(judge: SubjectJudge, images: Tensor, task: str = "heart") -> float:
    """The share of ``images`` the judge reads as showing ``task``'s subject."""
    if task not in judge.classes or task == "none":
        raise ValueError(f"task {task!r}: this judge knows {judge.classes[1:]}")
    return float((judge_subject(judge, images) == judge.classes.index(task)).float().mean())


def save_judge(judge: SubjectJudge, path: str | Path, trained_on: dict) -> None:
    """float16 safetensors; classes, width and ``trained_on`` (the run) in the metadata."""
    metadata = {
        "classes": json.dumps(judge.classes),
        "width": str(judge.width),
        "trained_on": json.dumps(trained_on, sort_keys=True),
    }
    save_half(judge, path, metadata)


def load_judge(path: str | Path | None = None) -> SubjectJudge:
    """Load a saved judge (default: the shipped one) in eval mode, float32."""
    metadata, state = read_half(
        path if path is not None else SHIPPED_WEIGHTS,
        needs="classes",
        what="subject judge",
        script="scripts.train_subject_judge",
    )
    judge = SubjectJudge(tuple(json.loads(metadata["classes"])), int(metadata["width"]))
    judge.load_state_dict(state)
    return judge.eval()
