import pytest
import torch

from modules.models.demo.family import DemoFamily, build_demo_model
from tests.flux1.tiny_flux1 import build_tiny_flux1
from tests.flux2.tiny_flux2 import build_tiny_flux2
from tests.qwen_image.tiny_qwen_image import build_tiny_qwen_image
from tests.wan.tiny_wan import build_tiny_wan


def pytest_sessionstart(session: pytest.Session) -> None:
    """With the tests spread over processes (pytest-xdist's ``-n``), write the demo dataset the
    demo presets name once, before the workers start: two runs finding it missing at once
    would each write it while the other reads it. A current one costs one file read."""
    if not session.config.pluginmanager.hasplugin("dsession"):
        return  # one process (or a worker): the first run that needs it writes it
    from modules.demo.data_folder import DEMO_DATA_ROOT
    from modules.demo.dataset import write_demo_dataset

    write_demo_dataset(DEMO_DATA_ROOT)


SECONDS_GUESSED = {"slow": 10.0, "ui": 4.0}
"""A test's rough cost by its mark (else :data:`SECONDS_UNIT`), to hand out the long files first."""
SECONDS_UNIT = 0.5


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In a pytest-xdist worker, the files in order of their guessed cost, dearest first (a
    file's tests keep their order): with whole files handed out in this order
    (``--dist loadfile --no-loadscope-reorder``, as scripts/test.sh runs), a long file is not
    left to run alone at the end while the other worker waits."""
    if not hasattr(config, "workerinput"):
        return
    cost: dict[object, float] = {}
    for item in items:
        marks = [SECONDS_GUESSED[m.name] for m in item.iter_markers() if m.name in SECONDS_GUESSED]
        cost[item.path] = cost.get(item.path, 0.0) + max(marks, default=SECONDS_UNIT)
    items.sort(key=lambda item: -cost[item.path])  # stable: ties keep the collected order


@pytest.fixture(scope="session")
def demo_family():
    return DemoFamily()


@pytest.fixture
def demo_model():
    """A fresh random demo model (seed 0): real diffusers UNet + T5 text encoder, as built in."""
    return build_demo_model(seed=0)


@pytest.fixture
def demo_inputs(demo_family, demo_model):
    generator = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, 48, 8, 8, generator=generator)
    timesteps = torch.tensor([0.3, 0.8])
    text = demo_family.encode_prompts(demo_model, ["a red star", "a blue ring on stripes"])
    return noisy, timesteps, text


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory):
    """A tiny WAN 2.1 T2V folder in the diffusers layout (read-only for the tests)."""
    return build_tiny_wan(tmp_path_factory.mktemp("wan") / "t2v")


@pytest.fixture(scope="session")
def tiny_wan_a14b(tmp_path_factory):
    """A tiny WAN 2.2 A14B folder: transformer/ (high noise), transformer_2/ (low noise)."""
    return build_tiny_wan(tmp_path_factory.mktemp("wan") / "a14b", a14b=True, seed=1)


@pytest.fixture(scope="session")
def tiny_wan_ti2v(tmp_path_factory):
    """A tiny WAN 2.2 TI2V 5B folder: 48-channel VAE with 16x spatial compression."""
    return build_tiny_wan(tmp_path_factory.mktemp("wan") / "ti2v", ti2v=True, seed=2)


@pytest.fixture(scope="session")
def tiny_flux1(tmp_path_factory):
    """A tiny FLUX.1 dev folder as ``FluxPipeline.save_pretrained`` writes it (read-only)."""
    return build_tiny_flux1(tmp_path_factory.mktemp("flux1") / "dev")


@pytest.fixture(scope="session")
def tiny_flux2(tmp_path_factory):
    """A tiny FLUX.2 klein folder (``Flux2KleinPipeline``, Qwen3 text encoder; read-only)."""
    return build_tiny_flux2(tmp_path_factory.mktemp("flux2") / "klein")


@pytest.fixture(scope="session")
def tiny_qwen_image(tmp_path_factory):
    """A tiny Qwen-Image folder (``QwenImagePipeline``; read-only)."""
    return build_tiny_qwen_image(tmp_path_factory.mktemp("qwen_image") / "tiny")
