"""A ``transformer_file`` of another family or of another size is refused from its header,
before anything loads; the files the families read (original, ComfyUI and diffusers layouts)
pass. Real tiny transformers of each family, saved as safetensors."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    QwenImageTransformer2DModel,
    WanTransformer3DModel,
)
from safetensors.torch import save_file

from modules.config import ConfigError, config_from_dict
from modules.models.registry import family_spec
from modules.models.single_file_check import read_header, single_file_problem
from modules.trainer.preflight import preflight
from tests.flux1.tiny_flux1 import TRANSFORMER as FLUX1
from tests.flux2.tiny_flux2 import TRANSFORMER as FLUX2
from tests.qwen_image.tiny_qwen_image import TRANSFORMER as QWEN
from tests.wan.tiny_wan import TRANSFORMER as WAN
from tests.wan.tiny_wan import original_layout


def state(model_class, config, **changes) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in model_class(**{**config, **changes}).state_dict().items()}


def write(path, tensors, prefix=""):
    save_file({f"{prefix}{key}": value for key, value in tensors.items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One file of each family, in the layouts users have: WAN's original layout under
    ComfyUI's prefix (as ``original_layout`` writes it), Qwen-Image's ComfyUI file, FLUX.1 and
    FLUX.2 in diffusers' layout."""
    folder = tmp_path_factory.mktemp("files")
    return {
        "wan": write(
            folder / "wan.safetensors",
            original_layout(state(WanTransformer3DModel, WAN)),
        ),
        "qwen_image": write(
            folder / "qwen.safetensors",
            state(QwenImageTransformer2DModel, QWEN),
            "model.diffusion_model.",
        ),
        "flux1": write(folder / "flux1.safetensors", state(FluxTransformer2DModel, FLUX1)),
        "flux2": write(folder / "flux2.safetensors", state(Flux2Transformer2DModel, FLUX2)),
    }


def problem(family, file, folder):
    return single_file_problem(family_spec(family), file, str(folder))


def test_each_family_s_file_passes_on_its_own_folder(
    files, tiny_wan, tiny_qwen_image, tiny_flux1, tiny_flux2
):
    assert "blocks.0.self_attn.q.weight" in read_header(files["wan"])  # the prefix is gone
    folders = {
        "wan": tiny_wan,
        "qwen_image": tiny_qwen_image,
        "flux1": tiny_flux1,
        "flux2": tiny_flux2,
    }
    for family, folder in folders.items():
        assert problem(family, files[family], folder) is None, family


@pytest.mark.parametrize(
    ("family", "given", "named"),
    [
        ("wan", "qwen_image", "Qwen-Image"),
        ("qwen_image", "wan", "WAN"),
        ("flux1", "flux2", "FLUX.2"),  # FLUX.2's layout shares FLUX.1's block names
        ("flux2", "flux1", "FLUX.1"),
    ],
)
def test_another_family_s_file_is_named_with_the_family_to_use(
    files, family, given, named, tmp_path
):
    said = problem(family, files[given], tmp_path)
    assert said is not None and said.startswith(f"model.{family}.transformer_file: ")
    assert f"holds a {named} transformer" in said and f"model.family={given}" in said


def test_a_file_of_no_family_and_a_file_that_is_not_safetensors(tmp_path):
    other = write(tmp_path / "vae.safetensors", {"decoder.conv_in.weight": torch.zeros(4, 4)})
    said = problem("wan", other, tmp_path)
    assert "does not hold a WAN transformer (none of its 1 tensors" in said
    text = tmp_path / "notes.safetensors"
    text.write_text("not a checkpoint")
    assert "is not a safetensors file" in problem("wan", str(text), tmp_path)


def test_a_file_of_another_size_names_both_sizes(files, tiny_wan, tiny_flux2, tmp_path):
    wider = write(
        tmp_path / "wan-wide.safetensors",
        original_layout(state(WanTransformer3DModel, WAN, num_attention_heads=4)),
    )
    said = problem("wan", wider, tiny_wan)
    assert "of another size than model.path's (the file: width 48; " in said
    assert "transformer/config.json: width 24)" in said
    deeper = write(
        tmp_path / "flux2-deep.safetensors",
        state(Flux2Transformer2DModel, FLUX2, num_single_layers=FLUX2["num_single_layers"] + 2),
    )
    said = problem("flux2", deeper, tiny_flux2)
    assert f"single blocks {FLUX2['num_single_layers'] + 2}" in said


def test_the_preflight_refuses_it_before_anything_loads(files, tiny_wan, tmp_path):
    concept = tmp_path / "concept"
    concept.mkdir()
    config = config_from_dict(
        {
            "model": {
                "family": "wan",
                "path": str(tiny_wan),
                "wan": {"transformer_file": files["qwen_image"]},
            },
            "data": {"concepts": [{"path": str(concept)}]},
            "output": {"run_dir": str(tmp_path / "run")},
        }
    )
    with pytest.raises(
        ConfigError, match=r"model.wan.transformer_file: 'qwen.safetensors' holds a Qwen-Image"
    ):
        preflight(config, create_run_dir=False)
