"""``check`` (the preflight ``train`` runs too) on edit pairs, with the test family that takes
references registered as ``demo`` (tests/data/conditioned_family): pairs counted in both
layouts, every problem named with its fix, caption dropout refused where the encoding reads
the caption, reference folders of a model without references said to be ignored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from modules.cli.main import main
from modules.models import registry
from modules.models.demo import SPEC as DEMO_SPEC
from tests.data.conditioned_family import SPEC, SPEC_TWO, SPEC_WITH_CAPTION


def image(path: Path, size=(32, 32), colour=(200, 30, 30)) -> None:
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def pairs(tmp_path: Path) -> tuple[Path, list[Path]]:
    """Targets a, b, c with ``-ref`` files beside them, and two reference folders."""
    targets = tmp_path / "targets"
    targets.mkdir()
    folders = [tmp_path / "refs1", tmp_path / "refs2"]
    for folder in folders:
        folder.mkdir()
    for name in "abc":
        image(targets / f"{name}.png")
        image(targets / f"{name}-ref.png", size=(48, 24))
        for folder in folders:
            image(folder / f"{name}.png", size=(24, 40))
    return targets, folders


def check(tmp_path: Path, capsys, concept: dict, **sections) -> tuple[int, str, str]:
    preset = tmp_path / "preset.json"
    preset.write_text(
        json.dumps(
            {
                "schema_version": 1,
                "data": {"concepts": [concept], "cache_dir": str(tmp_path / "cache")},
                "output": {"run_dir": str(tmp_path / "run")},
                **sections,
            }
        )
    )
    code = main(["check", str(preset)])
    out, err = capsys.readouterr()
    return code, out, err


def test_check_counts_pairs_in_both_layouts(tmp_path, capsys, monkeypatch, pairs):
    targets, folders = pairs
    monkeypatch.setitem(registry.SPECS, "demo", SPEC_TWO)
    code, out, err = check(tmp_path, capsys, {"path": str(targets)})
    assert code == 0, err
    assert f"data.concepts.0 ({targets}): 3 pairs, 1 reference each" in out
    assert "OK (3 items in 1 concepts)" in out

    code, out, err = check(
        tmp_path, capsys, {"path": str(targets), "reference_dirs": [str(f) for f in folders]}
    )
    assert code == 0, err
    assert f"data.concepts.0 ({targets}): 3 pairs, 2 references each" in out
    assert (
        "3 reference images beside the targets (a-ref.png, b-ref.png, c-ref.png) are not read"
        in out
    )
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_check_names_missing_stray_and_extra_references_with_the_fix(
    tmp_path, capsys, monkeypatch, pairs
):
    targets, folders = pairs
    monkeypatch.setitem(registry.SPECS, "demo", SPEC)
    (targets / "b-ref.png").unlink()
    image(targets / "c-ref1.png")
    image(targets / "x-ref.png")
    code, _, err = check(tmp_path, capsys, {"path": str(targets)})
    assert code == 2
    named = f"data.concepts.0 ({targets})"
    assert f"{named}: 'b.png' has no reference image: add '{targets / 'b-ref.png'}'" in err
    assert f"{named}: 'c.png' has 2 reference images (c-ref.png, c-ref1.png)" in err
    assert "takes at most 1: remove the extra ones" in err
    assert f"{named}: reference 'x-ref.png' has no target 'x.png' beside it" in err
    assert "Traceback" not in err

    concept = {"path": str(targets), "reference_dirs": [str(f) for f in folders]}
    code, _, err = check(tmp_path, capsys, concept)
    assert code == 2
    assert (
        "data.concepts.0.reference_dirs: 2 reference folders and this model takes at most " in err
    )
    assert "keep one folder" in err


def test_caption_dropout_is_refused_where_the_encoding_reads_the_caption(
    tmp_path, capsys, monkeypatch, pairs
):
    targets, _ = pairs
    concept = {"path": str(targets), "caption": {"dropout": 0.2}}
    monkeypatch.setitem(registry.SPECS, "demo", SPEC)
    assert check(tmp_path, capsys, concept)[0] == 0  # its encoding does not read the caption
    monkeypatch.setitem(registry.SPECS, "demo", SPEC_WITH_CAPTION)
    code, _, err = check(tmp_path, capsys, concept)
    assert code == 2
    assert (
        "data.concepts.0.caption.dropout=0.2: this model encodes the caption together with the "
        "reference images, so a dropped caption has no encoding; set it to 0"
    ) in err


def test_reference_folders_of_a_model_without_references_are_said_to_be_ignored(
    tmp_path, capsys, pairs
):
    targets, folders = pairs
    code, out, err = check(
        tmp_path, capsys, {"path": str(targets), "reference_dirs": [str(folders[0])]}
    )
    assert code == 0, err
    assert (
        "warning: data.concepts.0.reference_dirs is set but this demo model takes no reference "
        "images: the folders are ignored"
    ) in out
    assert "OK (6 items in 1 concepts)" in out  # a-ref.png ... are images like the others


def test_sampling_references_are_checked_before_the_model_loads(
    tmp_path, capsys, monkeypatch, pairs
):
    targets, folders = pairs
    concept = {"path": str(targets)}
    ref = str(folders[0] / "a.png")
    gone = tmp_path / "gone.png"

    def sampling(references):
        return {"sampling": {"prompts": ["one", "two"], "references": references}}

    monkeypatch.setitem(registry.SPECS, "demo", SPEC)
    assert check(tmp_path, capsys, concept, **sampling([ref, ref]))[0] == 0
    code, _, err = check(tmp_path, capsys, concept, **sampling([ref]))
    assert code == 2 and "sampling.references: 1 entries for 2 prompts" in err
    code, _, err = check(tmp_path, capsys, concept, **sampling([ref, f"{ref};{ref}"]))
    assert code == 2 and "sampling.references: prompt 2 has 2 references" in err
    code, _, err = check(tmp_path, capsys, concept, **sampling([ref, str(gone)]))
    assert code == 2
    assert f"sampling.references: '{gone}' (prompt 2) is not a file" in err

    monkeypatch.setitem(registry.SPECS, "demo", DEMO_SPEC)  # a model without references
    code, out, _ = check(tmp_path, capsys, concept, **sampling([ref, ref]))
    assert code == 0
    assert "warning: sampling.references is set but this demo model takes no reference" in out


@pytest.mark.parametrize("layout", ["beside", "folders"])
def test_train_runs_on_pairs_in_either_layout(tmp_path, capsys, monkeypatch, pairs, layout):
    """The CLI's train on the test family: each target's references from the layout, counted
    at the start, cached as their own kind, and a sample edits the first pair's references."""
    from tests.data.conditioned_family import ReferenceFamily

    targets, folders = pairs
    monkeypatch.setitem(registry.SPECS, "demo", SPEC_TWO)
    encoded: list[tuple[int, ...]] = []
    original = ReferenceFamily.encode_conditioning

    def spy(self, model, kind, images, **kwargs):
        encoded.append(tuple(image.shape[-1] for image in images))  # the widths: own sizes
        return original(self, model, kind, images, **kwargs)

    monkeypatch.setattr(ReferenceFamily, "encode_conditioning", spy)
    concept = {"path": str(targets)}
    if layout == "folders":
        concept["reference_dirs"] = [str(folder) for folder in folders]
    preset = tmp_path / "preset.json"
    preset.write_text(
        json.dumps(
            {
                "schema_version": 1,
                "data": {"concepts": [concept], "resolution": 32, "cache_dir": str(tmp_path / "c")},
                "lora": {"rank": 2, "alpha": 2},
                "training": {"steps": 2, "batch_size": 1},
                "sampling": {"prompts": ["an edit"], "every": 2, "steps": 1, "with_base": False},
                "output": {"run_dir": str(tmp_path / "run")},
            }
        )
    )
    assert main(["train", str(preset)]) == 0, capsys.readouterr().err
    out = capsys.readouterr()
    counted = "2 references each" if layout == "folders" else "1 reference each"
    assert f"3 pairs, {counted}" in out.out + out.err
    widths = (24, 24) if layout == "folders" else (48,)  # refs1/a.png, refs2/a.png or a-ref.png
    assert encoded == [widths, widths]  # a, b, c's alike: cached once; then the sample's
    assert len(list((tmp_path / "c" / "conditioning").rglob("*.safetensors"))) == 1
    assert list((tmp_path / "run" / "samples").glob("step000002-0-lora.png"))
