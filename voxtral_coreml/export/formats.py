"""Export formats: a format's name -> how its packages are written, checked, run and described.

    coreml   `.mlpackage` (Core ML, macOS 13 / iOS 16 on): convert.py; run by the MIL runtime or Core ML
    coreai   `.aimodel` (Core AI, macOS / iOS 27): coreai_export.py (realtime/coreai.py); run by Apple's Core AI
             runtime (coreai-core)

Every format shares the encoder's I/O contract and manifest.json; the validation, `encode` and `inspect` find a
package's format by its name's suffix. A new format is one entry here and its own modules; each encoder family
(families.py) converts with its own `convert_package` (Core ML) and `convert_asset` (Core AI).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from voxtral_coreml.check.backends import BACKENDS as COREML_BACKENDS
from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.pipeline.paths import export_dir, export_metrics_file, metrics_file, package_dir

from .format_recipes import check_recipe_kind

if TYPE_CHECKING:
    from .recipes import Recipe

Predictor = Callable[[dict[str, np.ndarray]], dict[str, Any]]


@dataclass(frozen=True)
class FormatOption:
    """A conversion option of one format: `convert` keyword, conf's <format>.<option>, the CLI's --<option>."""

    choices: tuple[str, ...]
    help: str


@dataclass(frozen=True)
class ExportFormat:
    name: str
    suffix: str  # of the package's file or folder name
    target_key: str  # manifest.json's deployment_target key: the format's own target name
    targets: tuple[str, ...]  # what that key may hold
    backends: tuple[str, ...]  # what runs its packages (besides "auto")
    convert: Callable[..., dict]  # (family module, extracted_dir, package, recipe, *, model_name, ...) -> manifest
    resolve_backend: Callable[[str, str], str]  # (backend asked for, where it came from) -> the one that runs
    predictor: Callable[[str, Path], contextlib.AbstractContextManager[Predictor]]  # (backend, package)
    structure: Callable[[Path], dict]  # I/O (name, shape, dtype), op counts, ...
    check_target: Callable[[Path, dict, dict], None]  # (package, manifest, structure): the target is the program's
    runtime: Callable[[str], str]  # backend -> the runtime it stands for, as `encode` reports it
    run: Callable[[str, Path, torch.Tensor], tuple[torch.Tensor, dict]]  # one window -> embeddings, timings
    # (backend, package, manifest's streaming entry) -> a streaming step with make_state() and predict(inputs, state)
    step_model: Callable[[str, Path, dict], contextlib.AbstractContextManager[Any]]
    streaming_forms: tuple[str, ...] | None  # the Realtime streaming forms it can hold (None: every form)
    artifacts_dir: Callable[[str, str], Path]  # (model, recipe) -> the pipeline's package folder (package + manifest)
    metrics_path: Callable[[str, str], Path]  # (model, recipe) -> the pipeline's validation metrics
    pipeline_key: str | None  # params.yaml's pipeline.<key> lists its models and recipes (None: pipeline's own)
    publish_folder: str  # where its packages go under <Variant>/ in a published repository ("": beside the variant)
    options: dict[str, FormatOption] = dataclasses.field(default_factory=dict)  # its own conversion options

    def package_name(self, family: ModuleType, variant: str, options: dict | None = None) -> str:
        """The family's package name (`options`: its streaming form) with this format's suffix."""
        return Path(family.package_name(variant, **(options or {}))).with_suffix(self.suffix).name

    def check_recipe(self, recipe: Recipe) -> None:
        """Refuses a recipe the format has no equivalent of, before any work."""
        check_recipe_kind(self.name, recipe.name, recipe.kind)


def _coreml_convert(family: ModuleType, *args: Any, **kwargs: Any) -> dict:
    return family.convert_package(*args, **kwargs)


def _coreml_backend(backend: str, setting: str) -> str:
    from voxtral_coreml.check.backends import resolve_backend

    return resolve_backend(backend, setting)


@contextlib.contextmanager
def _coreml_predictor(backend: str, package: Path) -> Iterator[Predictor]:
    from voxtral_coreml.check.backends import load_predictor

    yield load_predictor(backend, package)


def _coreml_structure(package: Path) -> dict:
    from .package_info import package_structure

    return package_structure(package)


def _coreml_step_model(backend: str, package: Path, info: dict) -> contextlib.AbstractContextManager[Any]:
    from voxtral_coreml.encoders.realtime.stream import load_streaming_model

    return contextlib.nullcontext(load_streaming_model(backend, package))


def _coreml_check_target(package: Path, manifest: dict, structure: dict) -> None:
    from .package_info import SPEC_VERSION

    target = manifest["deployment_target"]["coreml"]  # read_manifest checked it
    if structure["spec_version"] != SPEC_VERSION[target]:
        raise VoxtralError(
            f"{package}: spec version {structure['spec_version']} does not match target {target} "
            f"(expects {SPEC_VERSION[target]})"
        )


def _coreml_runtime(backend: str) -> str:
    return {"mil": "this project's MIL runtime", "coreml": "Core ML"}[backend]


def _coreml_run(backend: str, package: Path, mel: torch.Tensor) -> tuple[torch.Tensor, dict]:
    from voxtral_coreml.check.backends import run_package

    return run_package(backend, package, mel)


def _coreai_convert(family: ModuleType, *args: Any, **kwargs: Any) -> dict:
    return family.convert_asset(*args, **kwargs)


def _coreai_backend(backend: str, setting: str) -> str:
    if backend not in ("auto", "coreai"):
        raise VoxtralError(f"{setting}: a Core AI asset runs on the coreai backend (or auto), not {backend!r}")
    return "coreai"


def _coreai_predictor(backend: str, package: Path) -> contextlib.AbstractContextManager[Predictor]:
    from voxtral_coreml.check.coreai_backend import asset_predictor

    return asset_predictor(package)


def _coreai_structure(package: Path) -> dict:
    from voxtral_coreml.check.coreai_backend import asset_structure

    return asset_structure(package)


def _coreai_step_model(backend: str, package: Path, info: dict) -> contextlib.AbstractContextManager[Any]:
    from voxtral_coreml.check.coreai_backend import asset_predictor

    return asset_predictor(package, tuple(info["states"]))


def _coreai_check_target(package: Path, manifest: dict, structure: dict) -> None:
    wanted = manifest["deployment_target"]["ios"]
    if structure["minimum_os"] != wanted:
        raise VoxtralError(f"{package}: the program needs OS {structure['minimum_os']}, the manifest says {wanted}")


def _coreai_runtime(backend: str) -> str:
    from voxtral_coreml.check.coreai_backend import runtime_name

    return runtime_name()


def _coreai_run(backend: str, package: Path, mel: torch.Tensor) -> tuple[torch.Tensor, dict]:
    from voxtral_coreml.check.coreai_backend import run_asset

    return run_asset(package, mel)


COREML_RUNNERS = tuple(b for b in COREML_BACKENDS if b != "auto")
ATTENTION_PRECISION = FormatOption(
    ("fp32", "fp16"),
    "the attention cores' precision (coreai-core's Linux runtime accumulates fp16 products in fp16)",
)
FORMATS: dict[str, ExportFormat] = {
    "coreml": ExportFormat(
        "coreml", ".mlpackage", "coreml", ("iOS16", "iOS17", "iOS18"), COREML_RUNNERS, _coreml_convert,
        _coreml_backend, _coreml_predictor, _coreml_structure, _coreml_check_target, _coreml_runtime, _coreml_run,
        _coreml_step_model, None, package_dir, metrics_file, None, "",  # Core ML's folders predate other formats
    ),
    "coreai": ExportFormat(
        "coreai", ".aimodel", "coreai", ("v27",), ("coreai",), _coreai_convert,
        _coreai_backend, _coreai_predictor, _coreai_structure, _coreai_check_target, _coreai_runtime, _coreai_run,
        _coreai_step_model, ("stateful",), partial(export_dir, "coreai"), partial(export_metrics_file, "coreai"),
        "coreai", "coreai", {"attention_precision": ATTENTION_PRECISION},
    ),
}  # fmt: skip
DEFAULT_FORMAT = "coreml"
SUFFIXES = tuple(f.suffix for f in FORMATS.values())
BACKENDS = ("auto", *(backend for f in FORMATS.values() for backend in f.backends))  # every format's


def export_format(name: str, setting: str = "--format") -> ExportFormat:
    if name not in FORMATS:
        raise VoxtralError(f"{setting}: unknown format {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def format_of(package_name: str) -> ExportFormat | None:
    """The format a package's name says (by its suffix), or None."""
    return next((f for f in FORMATS.values() if package_name.endswith(f.suffix)), None)
