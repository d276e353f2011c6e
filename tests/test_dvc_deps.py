"""dvc.yaml's code deps are what each stage runs: its script, stages/__init__.py, and the library (`voxtral_coreml`)
whole, checked against the modules the script imports, transitively (read from the source, lazy imports inside
functions included): a script that imported another stage's script or a top-level file would name it too.

The library is one dep, not the phase folders a stage imports (they were ~10 entries per stage): DVC parses and
rewrites dvc.lock after every stage it runs, checks out or pulls, and half of dvc.lock was code deps. Measured on the
demo's dvc.lock: 180 KB and 1.13 s to parse and rewrite with phase folders, 95 KB and 0.57 s with one library dep
(a file per module before that: 420 KB)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

LIBRARY = "voxtral_coreml"
PROJECT_PACKAGES = ("stages", LIBRARY)
MODULE_NAME = re.compile(r"voxtral_coreml(\.\w+)+")  # a module loaded by name (importlib.import_module)


def module_file(module: str) -> Path | None:
    """The file of a project module (a package's __init__.py), or None for anything else."""
    if module.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of `path` names (absolute, relative, `from x import submodule`), and every
    project module a string names whole: what a registry loads by name with importlib (families.py's FAMILIES)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{node.module}" if node.module else anchor
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # a submodule, if it is one
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_NAME.fullmatch(node.value):
            found.add(node.value)
    return found


def files_of(module: str) -> list[Path]:
    """What importing (or `python -m`) `module` runs first: a/__init__.py, a/b/__init__.py, then a/b/c.py."""
    parts = module.split(".")
    return [f for i in range(1, len(parts) + 1) if (f := module_file(".".join(parts[:i]))) is not None]


def project_files_used(module: str) -> set[Path]:
    """Every project file that `python -m module` runs or imports, transitively."""
    seen: set[Path] = set()
    todo = files_of(module)
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += [f for imported in imported_modules(path) for f in files_of(imported) if f not in seen]
    return seen


def stage_definitions() -> dict[str, dict]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


def code_deps(stage: dict) -> set[str]:
    return {dep for dep in stage["deps"] if dep.split("/")[0] in PROJECT_PACKAGES}


def dep_of(path: Path) -> str:
    """The dep that covers a project file: the library for any of its files, or the file itself."""
    parts = path.relative_to(REPO).parts
    return LIBRARY if parts[0] == LIBRARY else "/".join(parts)


@pytest.mark.parametrize("name", sorted(stage_definitions()))
def test_stage_deps_are_the_code_it_imports(name: str) -> None:
    stage = stage_definitions()[name]
    used = project_files_used(re.search(r"-m (stages\.\w+)", stage["cmd"]).group(1))
    expected = sorted({dep_of(f) for f in used})
    listing = "".join(f"\n  - {dep}" for dep in expected)  # to paste
    assert sorted(code_deps(stage)) == expected, f"dvc.yaml stage {name}: its code deps are:{listing}"


def test_a_dep_is_the_library_or_a_file_outside_it() -> None:
    assert dep_of(REPO / "voxtral_coreml" / "export" / "convert.py") == "voxtral_coreml"
    assert dep_of(REPO / "voxtral_coreml" / "encode.py") == "voxtral_coreml"
    assert dep_of(REPO / "stages" / "convert.py") == "stages/convert.py"


def test_every_stage_depends_on_its_script_and_the_library() -> None:
    for name, stage in stage_definitions().items():
        script = re.search(r"-m stages\.(\w+)", stage["cmd"]).group(1)
        assert code_deps(stage) == {"stages/__init__.py", f"stages/{script}.py", LIBRARY}, name


def test_the_import_reader_follows_lazy_relative_and_package_imports() -> None:
    used = {str(f.relative_to(REPO)) for f in project_files_used("stages.sensitivity")}
    assert "voxtral_coreml/export/sensitivity.py" in used  # imported inside main()
    assert "voxtral_coreml/__init__.py" in used and "stages/__init__.py" in used
    assert "voxtral_coreml/sources/layouts/hf.py" in used  # through layouts/__init__.py's relative imports


def test_the_import_reader_follows_the_family_registry() -> None:
    """families.py loads each family by name: the convert stage runs their modules, so a change there reruns it."""
    used = {str(f.relative_to(REPO)) for f in project_files_used("stages.convert")}
    assert {
        "voxtral_coreml/export/convert.py",
        "voxtral_coreml/encoders/family_2507.py",
        "voxtral_coreml/encoders/realtime/export.py",
    } <= used


def test_the_report_stage_imports_neither_torch_nor_transformers() -> None:
    """It reads JSON and draws a chart: importing the model stack would cost it 10 s for nothing."""
    code = "import sys, stages.report; print(sorted({'torch', 'transformers', 'coremltools'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
