"""The split cache through the trainer: editing a mask re-encodes no image and the new mask is
the one trained on; editing a caption encodes that caption only. The start-of-run line says so."""

from __future__ import annotations

import queue
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from modules.config import config_from_dict
from modules.data.images import image_size, load_mask, mask_to_latent
from modules.demo.dataset import write_demo_dataset
from modules.trainer import GenericTrainer, StatusMessage

pytestmark = pytest.mark.slow


@pytest.fixture
def concept(tmp_path):
    demo = write_demo_dataset(tmp_path / "demo", size=64)
    folder = tmp_path / "subject"
    shutil.copytree(demo.subject, folder)
    return folder


def setup(concept, tmp_path):
    config = config_from_dict(
        {
            "schema_version": 3,
            "data": {"concepts": [{"path": str(concept)}], "cache_dir": str(tmp_path / "cache")},
            "mask": {"enabled": True},
            "prior": {"weight": 1.0},
            "training": {"steps": 1},
            "output": {"run_dir": str(tmp_path / "run")},
        }
    )
    events: queue.Queue = queue.Queue()
    trainer = GenericTrainer(config, events)
    trainer.setup()
    texts = []
    while not events.empty():
        event = events.get()
        if isinstance(event, StatusMessage):
            texts.append(event.text)
    (line,) = [text for text in texts if text.startswith("Cache: ")]
    return trainer, line, texts


def test_an_edited_mask_is_trained_on_without_encoding_an_image(concept, tmp_path):
    _, first, _ = setup(concept, tmp_path)
    assert "latents 0 reused, 16 encoded" in first and "masks 0 reused, 16 made" in first
    image = sorted(p for p in concept.glob("*.png") if "masklabel" not in p.name)[0]
    mask_file = image.with_name(f"{image.stem}-masklabel.png")
    edited = np.zeros((64, 64), dtype=np.uint8)
    edited[8:40, 16:48] = 255
    Image.fromarray(edited, "L").save(mask_file)

    trainer, line, texts = setup(concept, tmp_path)
    assert "latents 16 reused, 0 encoded" in line and "masks 15 reused, 1 made" in line
    assert not any(text.startswith("Caching latents") for text in texts)
    expected = mask_to_latent(load_mask(mask_file, image_size(image), 64), (16, 16))
    samples = [trainer.built.dataset[i] for i in range(len(trainer.built.dataset))]
    found = [s["mask"] for s in samples if torch.equal(s["mask"], expected)]
    assert found, "the new mask is the one the dataset trains on"


def test_an_edited_caption_encodes_that_caption_only(concept, tmp_path):
    setup(concept, tmp_path)
    caption = sorted(concept.glob("*.txt"))[0]
    caption.write_text("a brand new caption of sks", encoding="utf-8")
    _, line, _ = setup(concept, tmp_path)
    assert "latents 16 reused, 0 encoded" in line and "captions" in line
    reused, encoded = line.split("captions ")[1].split(";")[0].split(", ")
    assert encoded == "1 encoded" and int(reused.split()[0]) >= 1
