from __future__ import annotations

import json

from modules.demo.classifier import load_classifier
from modules.models.demo.family import build_demo_model
from scripts.score_demo_model import GRID_GAP, GRID_PROMPTS, GRID_SCALE, main, markdown, score


def test_scores_every_row_and_draws_a_three_row_grid() -> None:
    numbers, grid = score(build_demo_model(seed=0), load_classifier(), count=GRID_PROMPTS, steps=2)
    assert list(numbers["draws"]) == [
        "held-out pairs | 1",
        "held-out pairs | 4",
        "train pairs, new scenes | 1",
        "train pairs, new scenes | 4",
    ]
    assert len(numbers["lost"]) == 5
    for row in [*numbers["draws"].values(), *numbers["lost"].values()]:
        assert set(row) == {"background", "shape", "colour", "prompt_match"}
        assert all(0.0 <= value <= 1.0 for value in row.values())
    # The judge alone on the clean scenes needs no model: it must know most of them.
    assert numbers["lost"]["clean scene (the judge alone, no model)"]["background"] >= 0.75
    side = 64 * GRID_SCALE
    assert grid.size == (GRID_PROMPTS * side, 3 * side + 2 * GRID_GAP)
    table = markdown(numbers)
    assert table.count("\n| held-out pairs |") == 2 and "| pure noise (a normal sample) |" in table


def test_the_same_weights_give_the_same_numbers(tmp_path, capsys) -> None:
    args = ["--count", "2", "--steps", "2", "--grid", str(tmp_path / "g.png")]
    main([*args, "--json", str(tmp_path / "a.json")])
    main([*args, "--json", str(tmp_path / "b.json")])
    first, second = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert first == second and first["model"] == "built-in"
    assert (tmp_path / "g.png").is_file()
    assert "wrote" in capsys.readouterr().out
