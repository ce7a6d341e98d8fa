from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from modules.demo.classifier import images_to_tensor
from modules.demo.dataset import subject_scene
from modules.demo.subject_judge import (
    CLASSES,
    SubjectJudge,
    judge_subject,
    load_judge,
    save_judge,
    share_showing,
)
from scripts.train_subject_judge import HELDOUT_STREAM, JudgeRun, batch, evaluate, train_judge

HELDOUT_BOUND = 0.95


def test_shipped_judge_is_right_on_held_out_renderings() -> None:
    judge = load_judge()

    scores = evaluate(judge, 600)

    print(f"subject judge, 600 held-out renderings: {scores}")
    assert min(scores[name] for name in CLASSES) >= HELDOUT_BOUND, scores


@pytest.mark.parametrize("task", ["heart", "crescent"])
def test_shipped_judge_sees_each_dataset_subject_as_its_own(task: str) -> None:
    judge = load_judge()
    rng = np.random.default_rng(11)
    images = images_to_tensor([subject_scene(rng, task=task).image for _ in range(24)])
    other = "crescent" if task == "heart" else "heart"

    assert share_showing(judge, images, task) >= 0.95
    assert share_showing(judge, images, other) == 0.0


def test_shipped_judge_metadata_names_what_it_was_trained_on() -> None:
    from safetensors import safe_open

    from modules.demo.subject_judge import SHIPPED_WEIGHTS

    with safe_open(str(SHIPPED_WEIGHTS), framework="pt") as handle:
        trained_on = json.loads(handle.metadata()["trained_on"])
    assert trained_on["renderer"] == "scripts.train_subject_judge"
    assert trained_on["stream"] != HELDOUT_STREAM
    assert load_judge().classes == CLASSES == ("none", "heart", "crescent")


@pytest.mark.slow
def test_base_model_samples_of_world_prompts_show_no_subject() -> None:
    from modules.demo.world import scene
    from modules.models.demo.family import DemoFamily

    family = DemoFamily()
    model = family.load("", dtype=torch.float32, device=torch.device("cpu"))
    prompts = [scene(3_000_000 + i, "train").caption for i in range(16)]
    with torch.no_grad():
        images = family.sample(
            model,
            family.encode_prompts(model, prompts),
            size=(64, 64),
            steps=12,
            generator=torch.Generator().manual_seed(1234),
        )
    predicted = judge_subject(load_judge(), images)
    assert (predicted == 0).float().mean() >= 15 / 16, predicted.tolist()


def test_held_out_stream_is_not_the_training_stream() -> None:
    trained, _ = batch(0, 0, range(6))
    heldout, labels = batch(0, HELDOUT_STREAM, range(6))
    assert not torch.equal(trained, heldout)
    assert labels.tolist() == [0, 1, 2, 0, 0, 1]


def test_save_and_load_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    judge = SubjectJudge(width=4).eval()
    path = tmp_path / "judge.safetensors"
    save_judge(judge, path, {"steps": 0})
    loaded = load_judge(path)
    images, _ = batch(0, 1, range(4))
    assert loaded.classes == judge.classes and loaded.width == 4
    torch.testing.assert_close(loaded(images), judge(images), atol=2e-2, rtol=2e-2)


def test_refusals(tmp_path) -> None:
    judge = SubjectJudge(width=4)
    with pytest.raises(FileNotFoundError, match="scripts.train_subject_judge"):
        load_judge(tmp_path / "none.safetensors")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        judge_subject(judge, torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="knows"):
        share_showing(judge, torch.zeros(1, 3, 64, 64), task="moon")


def test_a_briefly_trained_judge_beats_chance_and_is_deterministic() -> None:
    run = JudgeRun(steps=40, batch_size=24, width=6, learning_rate=1e-2)
    one, two = train_judge(run), train_judge(run)
    for a, b in zip(one.state_dict().values(), two.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # Chance on the 1:2 mix is 0.67 by always answering "none".
    assert evaluate(one, 120)["all"] > 0.7
