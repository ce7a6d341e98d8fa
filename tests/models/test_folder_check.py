"""Every family reads ``model.path``'s JSON files before it builds anything and refuses another
family's folder, another variant's part or a single file by name: on tiny folders written by
the real pipelines' ``save_pretrained``, through the family's ``load`` and the torch-free check
the pre-flight runs."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from modules.config.schema import ModelConfig
from modules.models import ModelLoadError, get_family, load_model
from modules.models.folder_check import model_folder_problem, pipeline_owners
from modules.models.registry import SPECS
from modules.models.wan import WanOptions
from tests.cli.test_cli import REPO

CPU = torch.device("cpu")


def load(family, path):
    config = ModelConfig(family=family, path=str(path))
    return load_model(get_family(config), config, dtype=torch.float32, device=CPU)


@pytest.fixture(scope="module")
def folders(tiny_flux1, tiny_flux2, tiny_wan, tiny_qwen_image):
    return {"flux1": tiny_flux1, "flux2": tiny_flux2, "wan": tiny_wan, "qwen": tiny_qwen_image}


@pytest.mark.parametrize(
    ("family", "folder", "message"),
    [
        # The worst: FLUX.2 read a FLUX.1 folder, cached latents with its VAE, then built a
        # default-size Mistral 3 from the CLIP config until the machine ran out of memory.
        ("flux2", "flux1", "model.path holds a FLUX.1 folder (FluxPipeline), not FLUX.2: use "
         "model.family=flux1"),
        # TypeError: 'int' object is not subscriptable (FLUX.1's patch_size read as WAN's).
        ("wan", "flux1", "model.path holds a FLUX.1 folder (FluxPipeline), not WAN: use "
         "model.family=flux1"),
        # A TypeError inside diffusers.
        ("qwen_image", "wan", "model.path holds a WAN folder (WanPipeline), not Qwen-Image: use "
         "model.family=wan"),
        ("flux1", "flux2", "model.path holds a FLUX.2 klein folder (Flux2KleinPipeline), not "
         "FLUX.1: use model.family=flux2"),
        ("demo", "qwen", "model.path holds a Qwen-Image folder (QwenImagePipeline), not a demo "
         "model: use model.family=qwen_image"),
    ],
)  # fmt: skip
def test_another_family_s_folder_is_refused_by_name_before_loading(
    folders, family, folder, message
):
    path = folders[folder]
    assert model_folder_problem(family, str(path)) == message
    with pytest.raises(ModelLoadError) as refused:
        load(family, path)
    assert str(refused.value) == message


def test_each_family_accepts_its_own_folders(folders, tiny_wan_a14b):
    for family, folder in (
        ("flux1", "flux1"),
        ("flux2", "flux2"),
        ("wan", "wan"),
        ("qwen_image", "qwen"),
    ):
        assert model_folder_problem(family, str(folders[folder])) is None, family
    expert = WanOptions(expert="high_noise")
    assert model_folder_problem("wan", str(tiny_wan_a14b), expert) is None
    assert model_folder_problem("demo", "") is None  # the built-in model


def test_a_folder_without_model_index_is_told_by_its_transformer(folders, tmp_path):
    bare = shutil.copytree(folders["flux1"], tmp_path / "bare")
    (bare / "model_index.json").unlink()
    message = (
        "model.path holds a FLUX.1 folder (its transformer is a FluxTransformer2DModel), not "
        "FLUX.2: use model.family=flux1"
    )
    assert model_folder_problem("flux2", str(bare)) == message
    assert model_folder_problem("flux1", str(bare)) is None


def test_a_part_of_another_variant_is_named(folders, tmp_path):
    """A klein folder whose text encoder is FLUX.2 dev's Mistral 3 (a mixed download)."""
    from tests.flux2.tiny_flux2 import build_tiny_flux2

    dev = build_tiny_flux2(tmp_path / "dev", variant="dev")
    mixed = shutil.copytree(folders["flux2"], tmp_path / "mixed")
    shutil.rmtree(mixed / "text_encoder")
    shutil.copytree(dev / "text_encoder", mixed / "text_encoder")
    problem = model_folder_problem("flux2", str(mixed))
    assert problem is not None
    assert f"{mixed / 'text_encoder'} holds a Mistral3ForConditionalGeneration (FLUX.2 dev's)" in (
        problem
    )
    assert "not FLUX.2 klein's Qwen3ForCausalLM" in problem
    with pytest.raises(ModelLoadError, match="the folder mixes parts of different models"):
        load("flux2", mixed)


def test_a_pipeline_the_family_does_not_train_is_named(folders, tmp_path):
    fill = shutil.copytree(folders["flux1"], tmp_path / "fill")
    index = json.loads((fill / "model_index.json").read_text())
    (fill / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxFillPipeline"}))
    problem = model_folder_problem("flux1", str(fill))
    assert problem is not None and "FLUX.1 Fill folder, an inpainting model" in problem
    (fill / "model_index.json").write_text(json.dumps({**index, "_class_name": "OtherPipeline"}))
    assert (
        "names OtherPipeline, not a FLUX.1 pipeline (FluxPipeline or FluxKontextPipeline)"
        in str(model_folder_problem("flux1", str(fill)))
    )


@pytest.mark.parametrize("family", ["flux1", "flux2", "qwen_image", "wan"])
def test_a_safetensors_file_is_named_as_a_file_with_the_transformer_file_fix(
    family, folders, tmp_path
):
    file = tmp_path / "model.safetensors"
    shutil.copy(folders["flux1"] / "transformer" / "diffusion_pytorch_model.safetensors", file)
    problem = model_folder_problem(family, str(file))
    assert problem is not None
    assert f"model.path: {file} is a file, not a folder" in problem
    assert f"set model.{family}.transformer_file={file}" in problem
    assert "not found" not in problem and "does not exist" not in problem
    with pytest.raises(ModelLoadError, match="is a file, not a folder"):
        load(family, file)


def test_empty_and_missing_paths(tmp_path):
    assert "flux2 family has no built-in weights" in str(model_folder_problem("flux2", ""))
    assert f"'{tmp_path / 'nowhere'}' does not exist" in str(
        model_folder_problem("qwen_image", str(tmp_path / "nowhere"))
    )


def test_the_wan_expert_is_checked_from_the_folder(tiny_wan, tiny_wan_a14b):
    assert "set model.wan.expert=high_noise or" in str(
        model_folder_problem("wan", str(tiny_wan_a14b), WanOptions())
    )
    assert "no expert to choose" in str(
        model_folder_problem("wan", str(tiny_wan), WanOptions(expert="low_noise"))
    )


def test_every_pipeline_has_one_family_and_every_folder_family_declares_its_parts():
    owners = [kind.pipeline for spec in SPECS.values() for kind in spec.folders]
    assert len(owners) == len(set(owners)) == len(pipeline_owners())
    for spec in SPECS.values():
        if spec.needs_path:
            assert spec.folders and spec.parts and spec.example, spec.name


def test_the_check_imports_neither_torch_nor_diffusers(tiny_flux1):
    script = (
        "import sys\n"
        "from modules.models.folder_check import model_folder_problem\n"
        f"print(model_folder_problem('flux2', {str(tiny_flux1)!r}))\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "model.path holds a FLUX.1 folder (FluxPipeline), not FLUX.2: use model.family=flux1",
        "[]",
    ]


def test_a_grid_lookup_on_another_family_s_folder_keeps_the_usual_grid(tiny_flux1):
    """The Model tab's weight preview reads the grid of whatever folder is typed in: FLUX.1's
    int ``patch_size`` read as WAN's list raised a TypeError there."""
    wan = SPECS["wan"]
    assert wan.latent_grid(str(tiny_flux1)) == wan.grid
