"""Where code lives: the demo task in its own package, what the UI and the CLI share in modules
both import, and each family's LoRA layout with its family. Read from the source (no imports
run), so a misplaced import fails here by file and line."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCTION = ("modules/config", "modules/data", "modules/loss", "modules/lora", "modules/masks")
"""Packages every run uses; none of them may need the demo task."""


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, at any depth (lazy imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.lineno, node.module)]
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _sources(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (REPO / folder).rglob("*.py"))


def test_the_demo_task_is_one_package_of_its_own():
    demo = REPO / "modules/demo"
    for name in ("world", "dataset", "classifier", "subject_judge", "half_weights", "data_folder"):
        assert (demo / f"{name}.py").is_file(), name
    for name in ("classifier", "subject_judge"):
        assert (demo / f"{name}.safetensors").is_file(), name
    leftovers = [
        path.relative_to(REPO).as_posix()
        for folder in ("modules/data", "modules/models")
        for path in (REPO / folder).iterdir()
        if path.is_file()
        and (path.stem in ("world", "half_weights") or path.stem.startswith("demo_"))
    ]
    assert leftovers == []


def test_no_production_package_imports_the_demo_task():
    found = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in _sources(*PRODUCTION, "modules/trainer", "modules/models")
        for line, module in _imports(path)
        if module == "modules.demo" or module.startswith("modules.demo.")
    ]
    assert found == []


def test_the_ui_imports_nothing_from_the_command_line():
    found = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in _sources("app")
        for line, module in _imports(path)
        if module == "modules.cli" or module.startswith("modules.cli.")
    ]
    assert found == []


def test_the_lora_package_holds_no_family_s_layout():
    """WAN's ComfyUI names and LoRA loader live in ``modules.models.wan``, as every other
    family's do in its own package; the shared LoRA code takes them from the family."""
    assert (REPO / "modules/models/wan/comfyui.py").is_file()
    found = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in _sources("modules/lora")
        for line, module in _imports(path)
        if "Wan" in module or module.startswith("modules.models.")
    ]
    found += [
        f"{path.relative_to(REPO)} names WAN"
        for path in _sources("modules/lora")
        if "WanLoraLoaderMixin" in path.read_text()
    ]
    assert found == []
