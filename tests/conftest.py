import pytest
import torch

from modules.models.demo import DemoFamily, build_demo_model


@pytest.fixture(scope="session")
def demo_family():
    return DemoFamily()


@pytest.fixture
def demo_model():
    """A fresh random demo model (seed 0): real diffusers WAN transformer + T5 text encoder."""
    return build_demo_model(seed=0)


@pytest.fixture
def demo_inputs(demo_family, demo_model):
    generator = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, 48, 8, 8, generator=generator)
    timesteps = torch.tensor([0.3, 0.8])
    text = demo_family.encode_prompts(demo_model, ["a red star", "a blue ring on stripes"])
    return noisy, timesteps, text
