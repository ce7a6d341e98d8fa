from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modules.config.schema import ConceptConfig
from modules.data import cache_files
from modules.data.cache_files import (
    LATENTS,
    MASKS,
    TEXTS,
    cache_path,
    latent_key,
    load_cached,
    mask_key,
    old_layout_files,
    text_key,
)
from modules.data.concept import ConceptItem, DataError, scan_concept
from modules.data.images import load_image, load_mask, mask_to_latent
from modules.data.latent_cache import build_cache
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


def files(cache: Path, kind: str = "") -> list[Path]:
    return sorted(path for path in (cache / kind).rglob("*") if path.is_file())


def test_keys_are_stable_and_ignore_settings_order(items: list[ConceptItem]) -> None:
    reordered = dict(reversed(list(SETTINGS.items())))
    size = (32, 32)
    assert latent_key(items[0], size=size, settings=SETTINGS) == latent_key(
        items[0], size=size, settings=reordered
    )
    assert text_key("a", settings=SETTINGS) == text_key("a", settings=reordered)


def test_each_key_changes_with_what_its_file_depends_on_only(
    items: list[ConceptItem], write_image, write_mask
) -> None:
    item = items[0]
    base = latent_key(item, size=(32, 32), settings=SETTINGS)
    assert latent_key(item, size=(32, 16), settings=SETTINGS) != base  # another bucket
    assert latent_key(item, size=(32, 32), settings={**SETTINGS, "model": "other"}) != base
    # The caption and the mask are not in the latent's key.
    assert (
        latent_key(dataclasses.replace(item, caption="other"), size=(32, 32), settings=SETTINGS)
        == base
    )
    assert (
        latent_key(dataclasses.replace(item, mask=None), size=(32, 32), settings=SETTINGS) == base
    )
    assert text_key("photo a", settings=SETTINGS) != text_key("photo b", settings=SETTINGS)
    mask = mask_key(item.mask, latent=base)
    assert mask_key(item.mask, latent=latent_key(item, size=(32, 16), settings=SETTINGS)) != mask
    write_mask(item.mask, 7)
    assert mask_key(item.mask, latent=base) != mask
    write_image(item.image, colour=(1, 2, 3))
    assert latent_key(item, size=(32, 32), settings=SETTINGS) != base


def test_build_writes_latents_captions_and_masks_apart(
    items: list[ConceptItem], tmp_path: Path, encoders: StandInEncoders
) -> None:
    cache = tmp_path / "cache"
    built = _build(items, cache, encoders)
    assert len(built.items) == 3
    for item, cached in zip(items, built.items, strict=True):
        key = latent_key(item, size=(32, 32), settings=SETTINGS)
        assert cached.latent == cache_path(cache, LATENTS, key) and cached.latent.is_file()
        assert cached.text == cache_path(cache, TEXTS, text_key(item.caption, settings=SETTINGS))
        assert cached.empty == cache_path(cache, TEXTS, text_key("", settings=SETTINGS))
        if item.mask is None:
            assert cached.mask is None
        else:
            assert cached.mask == cache_path(cache, MASKS, mask_key(item.mask, latent=key))
    # Three latents, two masks (c has none), three captions and the empty prompt once.
    assert [len(files(cache, kind)) for kind in (LATENTS, MASKS, TEXTS)] == [3, 2, 4]
    counts = built.counts
    assert (counts.latents_encoded, counts.masks_made, counts.texts_encoded) == (3, 2, 4)


def test_second_build_encodes_nothing(
    items: list[ConceptItem], tmp_path: Path, encoders: StandInEncoders
) -> None:
    first = _build(items, tmp_path / "cache", encoders)
    assert encoders.images_encoded == 3

    again = StandInEncoders()
    calls: list[tuple[int, int]] = []
    second = _build(items, tmp_path / "cache", again, progress=lambda *a: calls.append(a))

    assert second.items == first.items
    assert (again.image_calls, again.prompt_calls) == (0, 0)
    assert calls == []
    counts = second.counts
    assert (counts.latents_reused, counts.masks_reused, counts.texts_reused) == (3, 2, 4)
    assert (
        counts.describe()
        == "latents 3 reused, 0 encoded; captions 4 reused, 0 encoded; masks 2 reused, 0 made"
    )


def test_an_edited_mask_encodes_nothing_and_an_edited_caption_one_prompt(
    items: list[ConceptItem], tmp_path: Path, encoders: StandInEncoders, write_mask
) -> None:
    cache = tmp_path / "cache"
    _build(items, cache, encoders)
    write_mask(items[0].mask, 40)  # the user repaints a's mask
    again = StandInEncoders()
    built = _build(items, cache, again)
    assert (again.image_calls, again.prompt_calls) == (0, 0)
    assert (built.counts.latents_encoded, built.counts.masks_made) == (0, 1)
    assert torch.allclose(load_cached(built.items[0]).mask, torch.full((1, 8, 8), 40 / 255))

    edited = [dataclasses.replace(items[1], caption="a new caption"), items[0], items[2]]
    again = StandInEncoders()
    built = _build(edited, cache, again)
    assert (again.images_encoded, again.prompt_calls) == (0, 1)
    assert (built.counts.texts_encoded, built.counts.texts_reused) == (1, 3)
    torch.testing.assert_close(
        load_cached(built.items[0]).text["embeds"],
        encode_prompt_codes(["a new caption"])["embeds"][0],
    )


def test_batches_and_progress(
    items: list[ConceptItem], tmp_path: Path, encoders: StandInEncoders
) -> None:
    calls: list[tuple[int, int]] = []

    _build(items, tmp_path / "cache", encoders, batch_size=2, progress=lambda *a: calls.append(a))

    assert encoders.image_calls == 2
    assert encoders.prompt_calls == 2  # four distinct prompts (the empty one too), two a call
    assert calls == [(0, 3), (2, 3), (3, 3)]


def test_images_of_different_sizes_are_encoded_in_batches_of_one_size(
    items: list[ConceptItem], tmp_path: Path, encoders: StandInEncoders
) -> None:
    built = _build(items, tmp_path / "cache", encoders, sizes=[(32, 16), (16, 32), (32, 16)])
    assert encoders.image_calls == 2  # a and c together, b alone
    shapes = [load_cached(item).latent.shape for item in built.items]
    assert shapes == [(48, 4, 8), (48, 8, 4), (48, 4, 8)]
    assert load_cached(built.items[1]).mask.shape == (1, 8, 4)
    assert [item.size for item in built.items] == [(32, 16), (16, 32), (32, 16)]


def test_duplicate_items_are_encoded_once(
    items: list[ConceptItem], tmp_path: Path, encoders: StandInEncoders
) -> None:
    built = _build([items[0], items[0]], tmp_path / "cache", encoders)

    assert built.items[0] == built.items[1]
    assert encoders.images_encoded == 1


def test_cached_sample_holds_latent_mask_and_prompts(
    items: list[ConceptItem], tmp_path: Path, encoders: StandInEncoders
) -> None:
    built = _build(items, tmp_path / "cache", encoders)

    masked = load_cached(built.items[0])
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

    plain = load_cached(built.items[2])
    assert not plain.has_mask
    torch.testing.assert_close(plain.mask, torch.ones(1, 8, 8))


def test_video_latents_get_a_mask_per_frame(
    items: list[ConceptItem], tmp_path: Path, encoders: StandInEncoders
) -> None:
    def encode_video(images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images, 4).unsqueeze(2).expand(-1, -1, 2, -1, -1)  # (B,C,2,h,w)

    built = _build(items, tmp_path / "cache", encoders, encode_images=encode_video)

    sample = load_cached(built.items[0])
    assert sample.latent.shape == (48, 2, 8, 8)
    assert sample.mask.shape == (1, 2, 8, 8)
    torch.testing.assert_close(sample.mask[:, 0], sample.mask[:, 1])
    assert load_cached(built.items[2]).mask.shape == (1, 2, 8, 8)  # no mask: all ones


def test_build_leaves_no_temporary_files(
    items: list[ConceptItem], tmp_path: Path, encoders: StandInEncoders
) -> None:
    _build(items, tmp_path / "cache", encoders)

    assert len(files(tmp_path / "cache")) == 3 + 2 + 4
    assert all(path.suffix == ".safetensors" for path in files(tmp_path / "cache"))


def test_failed_write_leaves_neither_temporary_nor_final_file(
    items: list[ConceptItem],
    tmp_path: Path,
    encoders: StandInEncoders,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fail(source: str, target: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(cache_files.os, "replace", fail)

    with pytest.raises(OSError, match="disk full"):
        _build(items, tmp_path / "cache", encoders)

    assert files(tmp_path / "cache") == []


def test_encoder_with_wrong_batch_size_is_reported(
    items: list[ConceptItem], tmp_path: Path, encoders: StandInEncoders
) -> None:
    def first_only(images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images[:1], 4)

    with pytest.raises(ValueError, match="image encoder returned shape"):
        _build(items, tmp_path / "cache", encoders, encode_images=first_only)


def test_corrupt_cache_file_names_the_file_and_the_fix(
    items: list[ConceptItem], tmp_path: Path, encoders: StandInEncoders
) -> None:
    built = _build(items, tmp_path / "cache", encoders)
    built.items[0].latent.write_bytes(b"\x00" * 20)

    with pytest.raises(DataError, match=r"\.safetensors.*start the run again"):
        load_cached(built.items[0])


def test_a_damaged_cache_file_is_made_again_and_said(
    items: list[ConceptItem], tmp_path: Path, encoders: StandInEncoders
) -> None:
    cache = tmp_path / "cache"
    built = _build(items, cache, encoders)
    first = built.items[0]
    first.latent.write_bytes(first.latent.read_bytes()[:64])  # a copy cut short
    first.mask.write_bytes(b"\x00" * 20)
    first.text.write_bytes(b"\x00" * 20)
    said: list[str] = []
    again = _build(items, cache, StandInEncoders(), warn=said.append)
    assert again.items == built.items
    assert len(said) == 3
    assert all("is damaged" in line and "making it again" in line for line in said)
    assert "latent of" in said[0] and "caption 'photo a'" in said[2]
    assert load_cached(first).latent.shape == load_cached(again.items[2]).latent.shape


def test_image_deleted_after_the_scan_names_the_file(
    items: list[ConceptItem], tmp_path: Path, encoders: StandInEncoders
) -> None:
    items[1].image.unlink()

    with pytest.raises(DataError, match=r"b\.png.*scan the folder again"):
        _build(items, tmp_path / "cache", encoders)


def test_files_of_the_earlier_layout_are_found_not_read(
    items: list[ConceptItem], tmp_path: Path, encoders: StandInEncoders
) -> None:
    cache = tmp_path / "cache"
    old = cache / "ab" / ("ab" + "0" * 62 + ".safetensors")
    old.parent.mkdir(parents=True)
    old.write_bytes(b"old")
    built = _build(items, cache, encoders)
    assert old_layout_files(cache) == [old]
    assert built.counts.latents_encoded == 3
