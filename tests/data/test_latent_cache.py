from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modules.config.schema import ConceptConfig
from modules.data import latent_cache
from modules.data.concept import ConceptItem, DataError, scan_concept
from modules.data.images import load_image, load_mask, mask_to_latent
from modules.data.latent_cache import build_cache, cache_key, load_cached
from tests.data.stand_ins import StandInEncoders, encode_prompt_codes

SETTINGS = {"family": "demo", "model": "built-in", "codec": 1}


@pytest.fixture
def items(tmp_path: Path, write_image, write_mask) -> list[ConceptItem]:
    folder = tmp_path / "concept"
    folder.mkdir()
    for name, colour in (("a", (250, 0, 0)), ("b", (0, 250, 0)), ("c", (0, 0, 250))):
        write_image(folder / f"{name}.png", colour=colour)
        (folder / f"{name}.txt").write_text(f"photo {name}", encoding="utf-8")
    values = np.zeros((32, 32), dtype=np.uint8)
    values[:16, :16] = 255
    values[16:, :] = 128
    write_mask(folder / "a-masklabel.png", values)
    write_mask(folder / "b-masklabel.png", 80)
    return list(scan_concept(ConceptConfig(path=str(folder))).items)


def _build(items: list[ConceptItem], cache_dir: Path, encoders: StandInEncoders, **kwargs):
    return build_cache(
        items,
        resolution=kwargs.pop("resolution", 32),
        cache_dir=cache_dir,
        settings=kwargs.pop("settings", SETTINGS),
        encode_images=kwargs.pop("encode_images", encoders.encode_images),
        encode_prompts=encoders.encode_prompts,
        **kwargs,
    )


def test_key_is_stable_and_ignores_settings_order(items: list[ConceptItem]) -> None:
    reordered = dict(reversed(list(SETTINGS.items())))

    assert cache_key(items[0], resolution=32, settings=SETTINGS) == cache_key(
        items[0], resolution=32, settings=reordered
    )


def test_key_changes_with_every_input(items: list[ConceptItem], write_image, write_mask) -> None:
    item = items[0]
    base = cache_key(item, resolution=32, settings=SETTINGS)

    assert cache_key(item, resolution=64, settings=SETTINGS) != base
    assert cache_key(item, resolution=32, settings={**SETTINGS, "model": "other"}) != base
    assert (
        cache_key(dataclasses.replace(item, caption="other"), resolution=32, settings=SETTINGS)
        != base
    )
    assert cache_key(dataclasses.replace(item, mask=None), resolution=32, settings=SETTINGS) != base

    write_mask(item.mask, 7)
    after_mask_edit = cache_key(item, resolution=32, settings=SETTINGS)
    assert after_mask_edit != base

    write_image(item.image, colour=(1, 2, 3))
    assert cache_key(item, resolution=32, settings=SETTINGS) not in (base, after_mask_edit)


def test_build_writes_one_file_per_item_under_its_key_prefix(
    items: list[ConceptItem], tmp_path: Path, encoders: StandInEncoders
) -> None:
    paths = _build(items, tmp_path / "cache", encoders)

    assert len(paths) == 3
    for item, path in zip(items, paths, strict=True):
        key = cache_key(item, resolution=32, settings=SETTINGS)
        assert path == tmp_path / "cache" / key[:2] / f"{key}.safetensors"
        assert path.is_file()


def test_second_build_encodes_nothing(
    items: list[ConceptItem], tmp_path: Path, encoders: StandInEncoders
) -> None:
    first = _build(items, tmp_path / "cache", encoders)
    assert encoders.images_encoded == 3

    again = StandInEncoders()
    calls: list[tuple[int, int]] = []
    second = _build(items, tmp_path / "cache", again, progress=lambda *a: calls.append(a))

    assert second == first
    assert (again.image_calls, again.prompt_calls) == (0, 0)
    assert calls == []


def test_only_changed_items_are_encoded_again(
    items: list[ConceptItem], tmp_path: Path, encoders: StandInEncoders
) -> None:
    _build(items, tmp_path / "cache", encoders)
    changed = [items[0], dataclasses.replace(items[1], caption="new caption"), items[2]]

    again = StandInEncoders()
    _build(changed, tmp_path / "cache", again)

    assert again.images_encoded == 1


def test_batches_and_progress(
    items: list[ConceptItem], tmp_path: Path, encoders: StandInEncoders
) -> None:
    calls: list[tuple[int, int]] = []

    _build(items, tmp_path / "cache", encoders, batch_size=2, progress=lambda *a: calls.append(a))

    assert encoders.image_calls == 2
    assert encoders.prompt_calls == 3  # the empty prompt once, then one call per batch
    assert calls == [(0, 3), (2, 3), (3, 3)]


def test_duplicate_items_are_encoded_once(
    items: list[ConceptItem], tmp_path: Path, encoders: StandInEncoders
) -> None:
    paths = _build([items[0], items[0]], tmp_path / "cache", encoders)

    assert paths[0] == paths[1]
    assert encoders.images_encoded == 1


def test_cached_sample_holds_latent_mask_and_prompts(
    items: list[ConceptItem], tmp_path: Path, encoders: StandInEncoders
) -> None:
    paths = _build(items, tmp_path / "cache", encoders)

    masked = load_cached(paths[0])
    image = load_image(items[0].image, 32)
    torch.testing.assert_close(masked.latent, F.pixel_unshuffle(image.unsqueeze(0), 4)[0])
    assert masked.latent.dtype == torch.float32
    assert masked.latent.shape == (48, 8, 8)
    full = load_mask(items[0].mask, (32, 32), 32)
    torch.testing.assert_close(masked.mask, mask_to_latent(full, (8, 8)))
    assert masked.mask[0, 0, 0] == 1.0 and masked.mask[0, 7, 0] == pytest.approx(128 / 255)
    assert masked.has_mask
    assert masked.source == str(items[0].image)
    expected_text = encode_prompt_codes(["photo a"])
    for name, value in expected_text.items():
        torch.testing.assert_close(masked.text[name], value[0])
    for name, value in encode_prompt_codes([""]).items():
        torch.testing.assert_close(masked.empty_text[name], value[0])
    assert all(t.is_contiguous() for t in (masked.latent, masked.mask, *masked.text.values()))

    plain = load_cached(paths[2])
    assert not plain.has_mask
    torch.testing.assert_close(plain.mask, torch.ones(1, 8, 8))


def test_video_latents_get_a_mask_per_frame(
    items: list[ConceptItem], tmp_path: Path, encoders: StandInEncoders
) -> None:
    def encode_video(images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images, 4).unsqueeze(2).expand(-1, -1, 2, -1, -1)  # (B,C,2,h,w)

    paths = _build(items, tmp_path / "cache", encoders, encode_images=encode_video)

    sample = load_cached(paths[0])
    assert sample.latent.shape == (48, 2, 8, 8)
    assert sample.mask.shape == (1, 2, 8, 8)
    torch.testing.assert_close(sample.mask[:, 0], sample.mask[:, 1])


def test_build_leaves_no_temporary_files(
    items: list[ConceptItem], tmp_path: Path, encoders: StandInEncoders
) -> None:
    _build(items, tmp_path / "cache", encoders)

    files = [path for path in (tmp_path / "cache").rglob("*") if path.is_file()]
    assert len(files) == 3
    assert all(path.suffix == ".safetensors" for path in files)


def test_failed_write_leaves_neither_temporary_nor_final_file(
    items: list[ConceptItem],
    tmp_path: Path,
    encoders: StandInEncoders,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fail(source: str, target: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(latent_cache.os, "replace", fail)

    with pytest.raises(OSError, match="disk full"):
        _build(items, tmp_path / "cache", encoders)

    assert [path for path in (tmp_path / "cache").rglob("*") if path.is_file()] == []


def test_encoder_with_wrong_batch_size_is_reported(
    items: list[ConceptItem], tmp_path: Path, encoders: StandInEncoders
) -> None:
    def first_only(images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images[:1], 4)

    with pytest.raises(ValueError, match="image encoder returned shape"):
        _build(items, tmp_path / "cache", encoders, encode_images=first_only)


def test_corrupt_cache_file_names_the_file_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "ab" / "abcd.safetensors"
    path.parent.mkdir()
    path.write_bytes(b"\x00" * 20)

    with pytest.raises(DataError, match=r"abcd\.safetensors.*start the run again"):
        load_cached(path)


def test_a_damaged_cache_file_is_encoded_again_and_said(
    items: list[ConceptItem], tmp_path: Path, encoders: StandInEncoders
) -> None:
    cache = tmp_path / "cache"
    paths = _build(items, cache, encoders)
    paths[0].write_bytes(paths[0].read_bytes()[:64])  # a copy cut short
    paths[1].write_bytes(b"\x00" * 20)
    said: list[str] = []
    again = _build(items, cache, encoders, warn=said.append)
    assert again == paths
    assert len(said) == 2
    assert all("is damaged" in line and "encoding it again" in line for line in said)
    assert load_cached(paths[0]).latent.shape == load_cached(paths[2]).latent.shape


def test_image_deleted_after_the_scan_names_the_file(
    items: list[ConceptItem], tmp_path: Path, encoders: StandInEncoders
) -> None:
    items[1].image.unlink()

    with pytest.raises(DataError, match=r"b\.png.*scan the folder again"):
        _build(items, tmp_path / "cache", encoders)
