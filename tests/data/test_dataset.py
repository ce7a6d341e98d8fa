from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from modules.config.schema import CaptionConfig, ConceptConfig
from modules.data.concept import scan_concept
from modules.data.dataset import Batch, ConceptDataset, MaskCoverage, collate
from modules.data.latent_cache import CachedItem, build_cache
from modules.demo.dataset import write_demo_dataset
from tests.data.stand_ins import PROMPT_LENGTH, StandInEncoders


@pytest.fixture
def concepts(
    tmp_path: Path, write_image, write_mask, encoders: StandInEncoders
) -> list[tuple[ConceptConfig, list[CachedItem]]]:
    """A standard concept (2 images, one masked, repeats 3) and a prior_prediction concept."""
    subject, prior = tmp_path / "subject", tmp_path / "prior"
    subject.mkdir()
    prior.mkdir()
    write_image(subject / "a.png")
    write_mask(subject / "a-masklabel.png", 128)
    write_image(subject / "b.png")
    write_image(prior / "p.png")
    write_mask(prior / "p-masklabel.png", 0)  # ignored: prior_prediction learns whole images
    configs = [
        ConceptConfig(
            path=str(subject),
            repeats=3,
            loss_weight=2.0,
            caption=CaptionConfig(default="sks heart", dropout=0.5),
        ),
        ConceptConfig(path=str(prior), type="prior_prediction", caption=CaptionConfig(default="x")),
    ]
    result = []
    for config in configs:
        paths = build_cache(
            list(scan_concept(config).items),
            resolution=16,
            cache_dir=tmp_path / "cache",
            settings={"family": "test"},
            encode_images=encoders.encode_images,
            encode_prompts=encoders.encode_prompts,
        ).items
        result.append((config, paths))
    return result


def test_repeats_multiply_the_samples(concepts) -> None:
    dataset = ConceptDataset(concepts)

    assert len(dataset) == 2 * 3 + 1
    weights = [dataset[i]["loss_weight"] for i in range(len(dataset))]
    assert weights == [2.0] * 6 + [1.0]


def test_the_share_of_the_draws_is_items_times_repeats(concepts) -> None:
    assert ConceptDataset(concepts).share_line() == (
        "Share of the draws (items x repeats): subject (loss weight 2) 6 (86%), "
        "prior (prior prediction) 1 (14%)"
    )
    assert ConceptDataset(concepts[:1]).share_line() is None


def test_sample_fields(concepts) -> None:
    dataset = ConceptDataset(concepts)

    masked, plain, prior = dataset[0], dataset[1], dataset[6]

    assert masked["latent"].shape == (48, 4, 4)
    torch.testing.assert_close(masked["mask"], torch.full((1, 4, 4), 128 / 255))
    assert masked["has_mask"] is True
    assert masked["is_prior_prediction"] is False
    assert masked["caption_dropout"] == 0.5
    assert set(masked["text"]) == set(masked["empty_text"]) == {"embeds", "attention_mask"}
    assert plain["has_mask"] is False
    torch.testing.assert_close(plain["mask"], torch.ones(1, 4, 4))
    assert prior["is_prior_prediction"] is True
    assert prior["has_mask"] is False
    torch.testing.assert_close(prior["mask"], torch.ones(1, 4, 4))  # its zero mask is ignored


def test_collate_shapes_and_dtypes(concepts) -> None:
    dataset = ConceptDataset(concepts)
    samples = [dataset[i] for i in (0, 1, 6)]

    batch = collate(samples, torch.Generator().manual_seed(0))

    assert isinstance(batch, Batch)
    assert batch.latents.shape == (3, 48, 4, 4)
    assert batch.masks.shape == (3, 1, 4, 4)
    assert batch.text["embeds"].shape == (3, PROMPT_LENGTH, 1)
    assert batch.text["attention_mask"].shape == (3, PROMPT_LENGTH)
    assert batch.prior_prediction.tolist() == [False, False, True]
    assert batch.prior_prediction.dtype == torch.bool
    assert batch.loss_weight.tolist() == [2.0, 2.0, 1.0]
    assert batch.loss_weight.dtype == torch.float32
    assert batch.has_mask.tolist() == [True, False, False]
    assert batch.caption_dropped.dtype == torch.bool


def test_collate_pads_sequences_and_attention_masks_with_zeros() -> None:
    def sample(length: int) -> dict:
        text = {
            "embeds": torch.ones(length, 2),
            "attention_mask": torch.ones(length, dtype=torch.bool),
            "pooled": torch.ones(3),
        }
        return {
            "latent": torch.zeros(4, 2, 2),
            "mask": torch.ones(1, 2, 2),
            "text": text,
            "empty_text": text,
            "is_prior_prediction": False,
            "loss_weight": 1.0,
            "has_mask": True,
            "caption_dropout": 0.0,
        }

    batch = collate([sample(3), sample(5)])

    assert batch.text["embeds"].shape == (2, 5, 2)
    assert batch.text["embeds"][0, 3:].abs().sum() == 0
    assert batch.text["attention_mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert batch.text["pooled"].shape == (2, 3)


def test_caption_dropout_is_deterministic_with_a_seeded_generator(concepts) -> None:
    dataset = ConceptDataset(concepts)
    samples = [dataset[i] for i in range(len(dataset))] * 4  # 24 with dropout 0.5, 4 with 0

    first = collate(samples, torch.Generator().manual_seed(7))
    second = collate(samples, torch.Generator().manual_seed(7))
    other = collate(samples, torch.Generator().manual_seed(8))

    assert torch.equal(first.caption_dropped, second.caption_dropped)
    assert torch.equal(first.text["embeds"], second.text["embeds"])
    assert not torch.equal(first.caption_dropped, other.caption_dropped)
    dropped = first.caption_dropped
    assert 0 < int(dropped.sum()) < 24
    assert not dropped[[i for i, s in enumerate(samples) if s["caption_dropout"] == 0]].any()
    empty = samples[0]["empty_text"]["embeds"]
    for row in dropped.nonzero().flatten().tolist():
        torch.testing.assert_close(first.text["embeds"][row], empty)
    for row in (~dropped).nonzero().flatten().tolist():
        torch.testing.assert_close(first.text["embeds"][row], samples[row]["text"]["embeds"])


def test_caption_dropout_of_one_always_uses_the_empty_prompt(concepts) -> None:
    sample = {**ConceptDataset(concepts)[0], "caption_dropout": 1.0}

    batch = collate([sample, sample], torch.Generator().manual_seed(0))

    assert batch.caption_dropped.all()


def test_mask_coverage_counts_distinct_standard_images(concepts) -> None:
    coverage = ConceptDataset(concepts).mask_coverage()

    assert coverage == MaskCoverage(images=2, without_mask=1)
    assert coverage.warning() == "1 of 2 images have no mask: trained with an all-ones mask"
    assert MaskCoverage(images=2, without_mask=0).warning() is None


def test_works_with_a_data_loader(concepts) -> None:
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(
        ConceptDataset(concepts),
        batch_size=4,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        collate_fn=functools.partial(collate, generator=generator),
    )

    batches = list(loader)

    assert [batch.latents.shape[0] for batch in batches] == [4, 3]


def test_demo_dataset_end_to_end(tmp_path: Path, encoders: StandInEncoders) -> None:
    demo = write_demo_dataset(tmp_path / "demo")
    entries = []
    for config in demo.concepts():
        items = list(scan_concept(config).items)
        paths = build_cache(
            items,
            resolution=32,
            cache_dir=tmp_path / "cache",
            settings={"family": "test"},
            encode_images=encoders.encode_images,
            encode_prompts=encoders.encode_prompts,
        ).items
        entries.append((config, paths))
    dataset = ConceptDataset(entries)

    batch = collate([dataset[i] for i in range(len(dataset))], torch.Generator().manual_seed(0))

    assert batch.latents.shape == (32, 48, 8, 8)
    assert batch.prior_prediction.sum() == 16
    assert dataset.mask_coverage().warning() is None
    subject_masks = batch.masks[~batch.prior_prediction]
    # Area averaging to the 8×8 latent grid keeps full-weight cells and creates soft edges.
    assert subject_masks.max() == 1.0 and subject_masks.min() == 0.0
    assert ((subject_masks > 0) & (subject_masks < 1)).any()
