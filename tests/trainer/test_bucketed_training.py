"""Training with aspect-ratio buckets: a concept of 2:3, 16:9 and 1:1 images (and, for WAN, a
16:9 clip) trains on the demo family, a tiny WAN and a tiny Qwen-Image, every batch from one
bucket, the buckets reported at the start and the samples at the most common bucket's size."""

from __future__ import annotations

import queue
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modules.config import config_from_dict
from modules.models.demo.family import DemoFamily
from modules.models.qwen_image.family import QwenImageFamily
from modules.models.wan.family import WanFamily
from modules.trainer import GenericTrainer, StatusMessage
from tests.data.video_files import write_video
from tests.qwen_image.tiny_qwen_image import build_tiny_qwen_image
from tests.wan.tiny_wan import build_tiny_wan

pytestmark = pytest.mark.slow

SHAPES = {"portrait": (96, 144), "wide": (160, 90), "square": (96, 96)}


def mixed_concept(folder: Path, *, clip: bool = False) -> Path:
    """Two images of each shape, each with a mask on a box around its centre."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (width, height) in SHAPES.items():
        for index in range(2):
            pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
            mask = np.zeros((height, width), dtype=np.uint8)
            mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
            Image.fromarray(pixels).save(folder / f"{name}{index}.png")
            Image.fromarray(mask, "L").save(folder / f"{name}{index}-masklabel.png")
            (folder / f"{name}{index}.txt").write_text(f"a photo of sks {name}")
    if clip:
        frames = rng.integers(0, 255, (12, 90, 160, 3), dtype=np.uint8)
        write_video(folder / "clip.mp4", frames)
        (folder / "clip.txt").write_text("a video of sks")
    return folder


def train(monkeypatch, family_class, model, concept, tmp_path, *, sampling=None, **data):
    shapes = []
    original = family_class.predict

    def spy(self, loaded, noisy, timesteps, text):
        if torch.is_grad_enabled():  # the student's forward: the batch as trained
            shapes.append(tuple(noisy.shape))
        return original(self, loaded, noisy, timesteps, text)

    monkeypatch.setattr(family_class, "predict", spy)
    steps = data.pop("steps", 3)
    config = config_from_dict(
        {
            "schema_version": 3,
            "model": model,
            "data": {
                "concepts": [{"path": str(concept)}],
                "cache_dir": str(tmp_path / "c"),
                **data,
            },
            "mask": {"enabled": True, "normalize_per_sample": True},
            "prior": {"weight": 1.0},
            "lora": {"rank": 2, "alpha": 2},
            "training": {"steps": steps, "batch_size": 2, "learning_rate": 1e-3},
            "output": {"run_dir": str(tmp_path / "run"), "save_every": 0},
            "sampling": {"prompts": ["a photo of sks"], "every": 3, "steps": 2, **(sampling or {})},
        }
    )
    events: queue.Queue = queue.Queue()
    finished = GenericTrainer(config, events).run()
    assert finished.error is None, finished.error
    texts = []
    while not events.empty():
        event = events.get()
        if isinstance(event, StatusMessage):
            texts.append(event.text)
    return shapes, texts


def test_the_demo_family_trains_every_bucket_in_batches_of_one_bucket(monkeypatch, tmp_path):
    concept = mixed_concept(tmp_path / "concept")
    shapes, texts = train(
        monkeypatch, DemoFamily, {"family": "demo"}, concept, tmp_path, resolution=64
    )
    # One pass: a batch of two per bucket; the student sees (B, C, h, w) of each bucket once.
    grids = {shape[-2:] for shape in shapes}
    assert grids == {(20, 12), (12, 20), (16, 16)}  # 80x48, 48x80 and 64x64 px on the 4 px grid
    assert all(shape[0] == 2 for shape in shapes)
    (line,) = [t for t in texts if t.startswith("Buckets")]
    assert "3 used by 6 items" in line and "80x48: 2" in line and "48x80: 2" in line
    assert "the largest crop cuts" in line
    sample = Image.open(tmp_path / "run/samples/step000003-0-lora.png")
    assert sample.size == (48, 80)  # a tie of two each: the first of the fullest buckets


def test_sampling_width_and_height_set_the_sample_size(tmp_path):
    concept = mixed_concept(tmp_path / "concept")
    run = config_from_dict(
        {
            "schema_version": 3,
            "data": {"concepts": [{"path": str(concept)}], "cache_dir": str(tmp_path / "c")},
            "training": {"steps": 1},
            "output": {"run_dir": str(tmp_path / "run"), "save_every": 0},
            "sampling": {"prompts": ["x"], "every": 1, "steps": 1, "width": 96, "height": 32},
        }
    )
    assert GenericTrainer(run).run().error is None
    assert Image.open(tmp_path / "run/samples/step000001-0-lora.png").size == (96, 32)


def test_a_tiny_wan_buckets_images_and_a_clip(monkeypatch, tmp_path):
    wan = build_tiny_wan(tmp_path / "wan")
    concept = mixed_concept(tmp_path / "concept", clip=True)
    model = {"family": "wan", "path": str(wan)}
    shapes, texts = train(
        monkeypatch,
        WanFamily,
        model,
        concept,
        tmp_path,
        resolution=48,
        frames=5,
        steps=4,
        sampling={"every": 4, "frames": 5},
    )
    # 64x32, 32x64 and 48x48 px stills (1 latent frame) and the 16:9 clip (2 latent frames).
    assert {shape[2:] for shape in shapes} == {(1, 4, 8), (1, 8, 4), (1, 6, 6), (2, 4, 8)}
    (line,) = [t for t in texts if t.startswith("Buckets")]
    assert "64x32: 3" in line  # two wide images and the clip
    # A 5-frame sample clip at the most common bucket, animated, beside a still of frame 0.
    clip = Image.open(tmp_path / "run/samples/step000004-0-lora.webp")
    assert clip.n_frames == 5 and clip.size == (64, 32)
    first = Image.open(tmp_path / "run/samples/step000004-0-lora.png")
    assert first.size == (64, 32)
    assert (tmp_path / "run/samples/base/00.webp").is_file()


def test_a_tiny_qwen_image_trains_in_buckets(monkeypatch, tmp_path):
    qwen = build_tiny_qwen_image(tmp_path / "qwen")
    concept = mixed_concept(tmp_path / "concept")
    model = {"family": "qwen_image", "path": str(qwen), "qwen_image": {"text_tokens": 16}}
    shapes, texts = train(monkeypatch, QwenImageFamily, model, concept, tmp_path, resolution=48)
    assert {shape[-2:] for shape in shapes} == {(4, 8), (8, 4), (6, 6)}
    assert any(t.startswith("Buckets (3 used by 6 items)") for t in texts)
