from __future__ import annotations

import pytest
import torch

from modules.demo.classifier import (
    WorldClassifier,
    images_to_tensor,
    load_classifier,
    save_classifier,
    score_prompt_match,
)
from modules.demo.world import WorldSpec, scene
from scripts.train_demo_classifier import ClassifierRun, evaluate, train_classifier


def _scenes(count: int, split: str = "heldout") -> tuple[torch.Tensor, list]:
    scenes = [scene(i, split) for i in range(count)]
    return images_to_tensor([s.image for s in scenes]), [s.labels for s in scenes]


def test_forward_gives_one_logit_per_class_and_head() -> None:
    classifier = WorldClassifier(width=8)
    images, _ = _scenes(3)
    assert images.shape == (3, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    logits = classifier(images)
    assert {k: tuple(v.shape) for k, v in logits.items()} == {
        "background": (3, 5),
        "shape": (3, 6),
        "colour": (3, 8),
    }
    # Other sizes are resized to the classifier's scale instead of failing.
    assert classifier(torch.zeros(2, 3, 128, 128))["shape"].shape == (2, 6)


def test_save_and_load_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    classifier = WorldClassifier(WorldSpec(shapes=("circle", "star")), width=8).eval()
    path = tmp_path / "judge.safetensors"
    save_classifier(classifier, path)
    loaded = load_classifier(path)
    assert loaded.vocab == classifier.vocab and loaded.width == 8
    images, _ = _scenes(2)
    expected, got = classifier(images), loaded(images)
    for name in expected:
        # Stored in float16: equal to that precision.
        torch.testing.assert_close(got[name], expected[name], atol=2e-2, rtol=2e-2)


def test_missing_weights_name_the_script(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="scripts.train_demo_classifier"):
        load_classifier(tmp_path / "none.safetensors")


def test_score_counts_attributes_and_the_full_match() -> None:
    classifier = WorldClassifier(width=8)
    images, labels = _scenes(4)
    scores = score_prompt_match(classifier, images, labels)
    assert set(scores) == {"background", "shape", "colour", "prompt_match"}
    assert scores["prompt_match"] <= min(scores["background"], scores["shape"], scores["colour"])
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        score_prompt_match(classifier, images, labels[:3])


def test_a_briefly_trained_classifier_beats_chance() -> None:
    run = ClassifierRun(steps=60, batch_size=32, width=8, learning_rate=1e-2)
    classifier = train_classifier(run)
    scores = evaluate(classifier, WorldSpec(), "heldout", 128)
    # Chance: 1/5 backgrounds, 1/8 colours.
    assert scores["background"] > 0.3 and scores["colour"] > 0.4
