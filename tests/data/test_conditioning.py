"""The conditioning slot in the data layer: reference images found beside their items, encoded
by the family, cached as their own kind and carried batch-first (tests/data/conditioned_family)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from modules.config.schema import ConceptConfig
from modules.data.cache_files import load_cached
from modules.data.concept import ConceptItem, DataError, scan_concept
from modules.data.conditioning import conditioning_sources, missing_conditioning
from modules.data.dataset import ConceptDataset, collate
from modules.data.latent_cache import build_cache
from modules.models.base import ConditionedFamily, ModelFamily
from modules.models.demo.family import DemoFamily
from modules.models.spec import ConditioningKind
from tests.data.conditioned_family import REFERENCE, TOKENS_KEY, ReferenceFamily
from tests.data.stand_ins import StandInEncoders

SETTINGS = {"family": "demo", "model": "built-in", "codec": 1}


@pytest.fixture
def folder(tmp_path: Path, write_image) -> Path:
    """a, b, c with one reference each beside them; c's reference has a's bytes."""
    folder = tmp_path / "pairs"
    folder.mkdir()
    for name, colour in (("a", (250, 0, 0)), ("b", (0, 250, 0)), ("c", (0, 0, 250))):
        write_image(folder / f"{name}.png", colour=colour)
    rng = np.random.default_rng(0)
    write_image(folder / "a-ref.png", pixels=rng.integers(0, 255, (24, 40, 3), dtype=np.uint8))
    write_image(folder / "b-ref.png", pixels=rng.integers(0, 255, (40, 24, 3), dtype=np.uint8))
    (folder / "c-ref.png").write_bytes((folder / "a-ref.png").read_bytes())
    return folder


def scan(folder: Path) -> list[ConceptItem]:
    return list(scan_concept(ConceptConfig(path=str(folder)), references=True).items)


def build(items, cache: Path, family: ReferenceFamily, **kwargs):
    encoders = StandInEncoders()
    return build_cache(
        items,
        resolution=32,
        cache_dir=cache,
        settings=kwargs.pop("settings", SETTINGS),
        encode_images=encoders.encode_images,
        encode_prompts=encoders.encode_prompts,
        conditioning=(REFERENCE,),
        encode_conditioning=lambda kind, images, frames, caption: family.encode_conditioning(
            None, kind, images
        ),
        **kwargs,
    )


def conditioning_files(cache: Path) -> list[Path]:
    return sorted(path for path in (cache / "conditioning").rglob("*") if path.is_file())


def test_references_beside_an_item_are_its_sources_not_items(folder: Path, write_image) -> None:
    write_image(folder / "a-ref1.png")
    write_image(folder / "a-ref2.png")
    items = scan(folder)
    assert [item.image.name for item in items] == ["a.png", "b.png", "c.png"]
    kind = ConditioningKind("reference", "references", most=3)
    assert [p.name for p in conditioning_sources(items[0], kind)] == [
        "a-ref.png",
        "a-ref1.png",
        "a-ref2.png",
    ]
    # In reference folders: the file of the item's name in each, in the folders' order.
    second = folder.parent / "second"
    second.mkdir()
    write_image(second / "a.png")
    assert conditioning_sources(items[0], kind, [second]) == (second / "a.png",)
    # A family without references trains every image, as before.
    plain = scan_concept(ConceptConfig(path=str(folder))).items
    assert len(plain) == 8


def test_the_cache_writes_one_file_per_source_and_reuses_it(tmp_path: Path, folder: Path) -> None:
    items, family, cache = scan(folder), ReferenceFamily(), tmp_path / "cache"
    built = build(items, cache, family)
    # c's reference has a's bytes: one file for both, keyed by the source's content.
    assert len(conditioning_files(cache)) == 2
    assert built.items[0].conditioning == built.items[2].conditioning
    assert built.items[0].conditioning != built.items[1].conditioning
    assert (built.counts.conditioning_encoded, built.counts.conditioning_reused) == (2, 0)
    assert family.calls == 2
    assert "conditioning 0 reused, 2 encoded" in built.counts.describe()

    again = build(items, cache, family)
    assert again.items == built.items
    assert (again.counts.conditioning_encoded, again.counts.conditioning_reused) == (0, 2)
    assert family.calls == 2  # nothing encoded again
    loaded = load_cached(again.items[1])
    expected = family.encode_conditioning(None, "reference", [_pixels(folder / "b-ref.png")])
    assert loaded.conditioning[TOKENS_KEY].shape == (16, 64)  # stored without the batch dim
    assert torch.equal(loaded.conditioning[TOKENS_KEY], expected[TOKENS_KEY][0])


def test_a_changed_reference_or_another_encoder_makes_it_again(
    tmp_path: Path, folder: Path, write_image
) -> None:
    items, family, cache = scan(folder), ReferenceFamily(), tmp_path / "cache"
    built = build(items, cache, family)
    write_image(folder / "b-ref.png", colour=(9, 9, 9))  # an edited reference
    changed = build(items, cache, family)
    assert (changed.counts.conditioning_encoded, changed.counts.conditioning_reused) == (1, 1)
    assert changed.items[1].conditioning != built.items[1].conditioning
    assert changed.items[0].conditioning == built.items[0].conditioning
    assert changed.counts.latents_encoded == 0  # the target's latent does not depend on it

    other = build(items, cache, family, settings={**SETTINGS, "model": "another"})
    assert other.counts.conditioning_encoded == 2
    assert not set(other.items[0].conditioning) & set(built.items[0].conditioning)


def test_a_damaged_conditioning_file_is_made_again_and_said(tmp_path: Path, folder: Path) -> None:
    items, family, cache = scan(folder), ReferenceFamily(), tmp_path / "cache"
    built = build(items, cache, family)
    (damaged,) = built.items[1].conditioning
    damaged.write_bytes(damaged.read_bytes()[:40])  # a copy cut short
    said: list[str] = []
    again = build(items, cache, family, warn=said.append)
    assert again.counts.conditioning_encoded == 1
    assert len(said) == 1 and "is damaged" in said[0] and "making it again" in said[0]
    assert "conditioning of" in said[0] and "b.png" in said[0]
    assert load_cached(again.items[1]).conditioning[TOKENS_KEY].shape == (16, 64)


def test_the_batch_carries_the_conditioning_batch_first(tmp_path: Path, folder: Path) -> None:
    items, family = scan(folder), ReferenceFamily()
    built = build(items, tmp_path / "cache", family)
    dataset = ConceptDataset([(ConceptConfig(path=str(folder)), built.items)])
    batch = collate([dataset[1], dataset[0], dataset[2]], torch.Generator().manual_seed(0))
    tokens = batch.conditioning[TOKENS_KEY]
    assert tokens.shape == (3, 16, 64)
    for row, item in zip(tokens, [built.items[1], built.items[0], built.items[2]], strict=True):
        assert torch.equal(row, load_cached(item).conditioning[TOKENS_KEY])
    assert not torch.equal(tokens[0], tokens[1])


def test_a_family_without_conditioning_has_an_empty_slot(tmp_path: Path, folder: Path) -> None:
    encoders = StandInEncoders()
    items = list(scan_concept(ConceptConfig(path=str(folder))).items)
    built = build_cache(
        items,
        resolution=32,
        cache_dir=tmp_path / "cache",
        settings=SETTINGS,
        encode_images=encoders.encode_images,
        encode_prompts=encoders.encode_prompts,
    )
    assert all(item.conditioning == () for item in built.items)
    assert not (tmp_path / "cache" / "conditioning").exists()
    assert "conditioning" not in built.counts.describe()
    dataset = ConceptDataset([(ConceptConfig(path=str(folder)), built.items)])
    assert collate([dataset[0], dataset[1]]).conditioning == {}
    # The Protocol: the demo family is a family and not a conditioned one; the test family both.
    assert isinstance(DemoFamily(), ModelFamily)
    assert not isinstance(DemoFamily(), ConditionedFamily)
    assert isinstance(ReferenceFamily(), ConditionedFamily)


def test_every_missing_or_extra_reference_is_named(folder: Path, write_image) -> None:
    (folder / "b-ref.png").unlink()
    (folder / "c-ref.png").unlink()
    write_image(folder / "a-ref1.png")
    problems = missing_conditioning(scan(folder), (REFERENCE,), concept="data.concepts.0")
    assert len(problems) == 3
    assert "'a.png' has 2 reference images (a-ref.png, a-ref1.png)" in problems[0]
    assert "at most 1" in problems[0]
    for line, name in zip(problems[1:], ("b", "c"), strict=True):
        assert line.startswith(f"data.concepts.0: '{name}.png' has no reference image")
        assert f"add '{folder / f'{name}-ref.png'}' beside it" in line
    refs = folder.parent / "refs"
    refs.mkdir()
    write_image(refs / "a.png")
    in_folders = missing_conditioning(
        scan(folder), (REFERENCE,), concept="data.concepts.0", reference_dirs=[refs]
    )
    assert [line.split("'")[3] for line in in_folders] == [str(refs / "b.png"), str(refs / "c.png")]


def test_an_item_without_its_reference_is_refused_by_the_cache_by_name(
    tmp_path: Path, folder: Path
) -> None:
    (folder / "b-ref.png").unlink()
    with pytest.raises(DataError, match=r"b\.png' needs 1 reference images and has none"):
        build(scan(folder), tmp_path / "cache", ReferenceFamily())


def _pixels(path: Path) -> torch.Tensor:
    from modules.data.images import image_size, load_image

    return load_image(path, image_size(path))


def test_preparing_the_data_fills_the_slot_through_the_family(tmp_path: Path, folder: Path):
    """The run's own path (``prepare_dataset``, as the run factory calls it with the family's
    declared kinds): references are scanned apart, encoded by the family, batched."""
    from modules.config.schema import DataConfig
    from modules.data.preparation import prepare_dataset
    from tests.data.conditioned_family import SPEC

    family = ReferenceFamily()
    model = family.load("", dtype=torch.float32, device=torch.device("cpu"))
    data = DataConfig(
        concepts=[ConceptConfig(path=str(folder))],
        resolution=32,
        buckets=False,
        cache_dir=str(tmp_path / "cache"),
    )
    prepared = prepare_dataset(
        data, family=family, model=model, conditioning=SPEC.conditioning, batch_size=3
    )
    assert [item.image.name for item in prepared.scans[0].items] == ["a.png", "b.png", "c.png"]
    assert family.calls == 2  # a's and c's references have the same bytes: one file
    batch = collate([prepared.dataset[i] for i in range(3)])
    assert batch.conditioning[TOKENS_KEY].shape == (3, 16, 64)
    assert torch.equal(batch.conditioning[TOKENS_KEY][0], batch.conditioning[TOKENS_KEY][2])
    # Without the kinds (a family that declares none) the references would be items.
    plain = prepare_dataset(
        data.model_copy(update={"cache_dir": str(tmp_path / "plain")}),
        family=DemoFamily(),
        model=model,
    )
    assert len(plain.scans[0].items) == 6


def test_a_kind_with_geometry_gets_the_items_size_and_crop(tmp_path: Path, write_image) -> None:
    """SDXL's size and crop conditioning: the file's size, the centred crop the bucket took
    and the training size reach the encoder, and only for a kind that asks for them."""
    folder = tmp_path / "wide"
    folder.mkdir()
    write_image(folder / "w.png", size=(96, 48))  # 2:1, trained square: the sides are cut
    items = list(scan_concept(ConceptConfig(path=str(folder))).items)
    seen: list[dict] = []

    def encode(kind, images, frames, caption, **extra):
        seen.append(extra)
        return {"geometry_code": torch.zeros(1, 1)}

    encoders = StandInEncoders()
    for with_geometry in (True, False):
        kind = ConditioningKind("size", "item", with_geometry=with_geometry)
        build_cache(
            items,
            resolution=32,
            cache_dir=tmp_path / f"cache-{with_geometry}",
            settings=SETTINGS,
            encode_images=encoders.encode_images,
            encode_prompts=encoders.encode_prompts,
            conditioning=(kind,),
            encode_conditioning=encode,
        )
    geometry = seen[0]["geometry"]
    assert geometry.original == (96, 48) and geometry.size == (32, 32)
    assert geometry.crop == (24.0, 0.0, 72.0, 48.0)  # the centred 48 x 48 of the 96 x 48 file
    assert seen[1] == {}


def test_an_encoders_refusal_of_a_reference_names_the_item_and_its_files(folder: Path) -> None:
    def refuse(kind, images, frames, caption):
        raise DataError("a reference of 40 x 24 px is too small: use 64 px a side")

    encoders = StandInEncoders()
    with pytest.raises(DataError) as raised:
        build_cache(
            scan(folder)[:1],
            resolution=32,
            cache_dir=folder.parent / "cache",
            settings=SETTINGS,
            encode_images=encoders.encode_images,
            encode_prompts=encoders.encode_prompts,
            conditioning=(REFERENCE,),
            encode_conditioning=refuse,
        )
    message = str(raised.value)
    assert "a.png" in message and "a-ref.png" in message and "64 px" in message
