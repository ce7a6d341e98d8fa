"""The world classifier: an objective prompt-match score for the demo model's samples.

A small CNN trained on the synthetic world (``modules.demo.world``, ``judge`` split) with three
heads: the background kind, and the shape and colour of the main (largest) object. A sample
generated for a scene's caption matches the prompt on an attribute when the classifier reads
that attribute back; the prompt-match score is the fraction of samples that match on all three.

Weights are small (about 150k parameters) and saved as float16 safetensors with the label
vocabularies in the metadata, so a file trained on another world spec cannot be misread.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from modules.demo.half_weights import read_half, save_half
from modules.demo.world import SceneLabels, WorldSpec
from modules.models.base import eval_mode

HEADS = ("background", "shape", "colour")
SHIPPED_WEIGHTS = Path(__file__).with_name("classifier.safetensors")
_INPUT_SIZE = 64


class WorldClassifier(nn.Module):
    """Four conv blocks (64 → 4 pixels) and one linear head per attribute."""

    def __init__(self, spec: WorldSpec | None = None, width: int = 24) -> None:
        super().__init__()
        spec = spec if spec is not None else WorldSpec()
        self.vocab: dict[str, tuple[str, ...]] = {
            "background": spec.backgrounds,
            "shape": spec.shapes,
            "colour": spec.colours,
        }
        self.width = width
        channels = [3, width, width * 2, width * 8 // 3, width * 4]
        blocks: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(channels):
            blocks += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.trunk = nn.Sequential(nn.Linear(channels[-1] * 4, 128), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(self.vocab[name])) for name in HEADS})

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """(B, 3, H, W) in [-1, 1] → logits per head, (B, classes)."""
        if images.shape[-1] != _INPUT_SIZE or images.shape[-2] != _INPUT_SIZE:
            # Scores compare models at one scale: samples of other sizes are resized to it.
            images = F.interpolate(images, size=(_INPUT_SIZE, _INPUT_SIZE), mode="area")
        hidden = self.trunk(self.features(images))
        return {name: head(hidden) for name, head in self.heads.items()}


def images_to_tensor(images: Sequence[Image.Image]) -> Tensor:
    """PIL RGB images → (B, 3, H, W) float32 in [-1, 1], the range the families use."""
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1


def label_targets(labels: Sequence[SceneLabels], classifier: WorldClassifier) -> dict[str, Tensor]:
    """Class indices (B,) per head: the background, the main object's shape and colour."""
    values = {
        "background": [label.background for label in labels],
        "shape": [label.main.shape for label in labels],
        "colour": [label.main.colour for label in labels],
    }
    targets = {}
    for name in HEADS:
        vocab = classifier.vocab[name]
        unknown = sorted(set(values[name]) - set(vocab))
        if unknown:
            raise ValueError(
                f"labels name {name} {unknown}, which the classifier does not know "
                f"({', '.join(vocab)}); train it on a world spec that includes them"
            )
        targets[name] = torch.tensor([vocab.index(v) for v in values[name]])
    return targets


@torch.no_grad()
def score_prompt_match(
    classifier: WorldClassifier, images: Tensor, labels: Sequence[SceneLabels]
) -> dict[str, float]:
    """Per-attribute accuracy and ``prompt_match``: the fraction right on all three.

    ``images`` (B, 3, H, W) in [-1, 1]; ``labels`` are what each image was asked to show.
    """
    if images.shape[0] != len(labels):
        raise ValueError(f"{images.shape[0]} images but {len(labels)} labels; pass one each")
    with eval_mode(classifier):
        logits = classifier(images.float())
    targets = label_targets(labels, classifier)
    right = {name: logits[name].argmax(dim=1) == targets[name] for name in HEADS}
    scores = {name: float(hits.float().mean()) for name, hits in right.items()}
    scores["prompt_match"] = float(torch.stack(list(right.values())).all(dim=0).float().mean())
    return scores


def save_classifier(classifier: WorldClassifier, path: str | Path) -> None:
    """float16 safetensors; the vocabularies and width travel in the metadata."""
    save_half(
        classifier, path, {"vocab": json.dumps(classifier.vocab), "width": str(classifier.width)}
    )


def load_classifier(path: str | Path | None = None) -> WorldClassifier:
    """Load a saved classifier (default: the shipped one) in eval mode, float32."""
    metadata, state = read_half(
        path if path is not None else SHIPPED_WEIGHTS,
        needs="vocab",
        what="classifier",
        script="scripts.train_demo_classifier",
    )
    vocab = json.loads(metadata["vocab"])
    spec = WorldSpec(
        backgrounds=tuple(vocab["background"]),
        shapes=tuple(vocab["shape"]),
        colours=tuple(vocab["colour"]),
    )
    classifier = WorldClassifier(spec, width=int(metadata.get("width", 24)))
    classifier.load_state_dict(state)
    return classifier.eval()
