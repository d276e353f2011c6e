"""Publish the packages the pipeline built as one Hugging Face model repository.

Not a DVC stage: publishing needs a token and the network, so it is an explicit command
(`voxtral-coreml publish --repo org/name`, `make publish REPO=org/name`) run after `dvc repro`. It refuses
outputs that are not the ones dvc.lock records, so what is published is what the pipeline reproduces.

Repository layout, one folder per package (the same folder as artifacts/packages/<model>/<recipe>/):

    README.md                                    model card
    <Variant>/<recipe>/VoxtralEncoder<Variant>.mlpackage/
    <Variant>/<recipe>/manifest.json
    <Variant>/coreai/<recipe>/VoxtralEncoder<Variant>.aimodel/   Core AI assets (pipeline.coreai), beside them
    <Variant>/coreai/<recipe>/manifest.json                      (artifacts/coreai/<model>/<recipe>/)
    MelSpectrogram/<precision>/VoxtralMelSpectrogram.mlpackage/  (the mel front-end, for every model)
    MelSpectrogram/<precision>/manifest.json

so an app downloads one package with `snapshot_download(repo, allow_patterns=["Mini/fp16/*"])`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from voxtral_coreml.export.convert import MANIFEST
from voxtral_coreml.export.formats import DEFAULT_FORMAT, FORMATS, format_of
from voxtral_coreml.pipeline.atomic import atomic_path
from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.pipeline.params import PARAMS_FILE, load_params, lookup
from voxtral_coreml.pipeline.paths import mel_package_dir
from voxtral_coreml.report.markdown import shape_text, table_head, table_row
from voxtral_coreml.sources.layouts import read_json

from . import __version__

log = logging.getLogger(__name__)

CARD = "README.md"
TAGS = ["coreml", "mlprogram", "apple-neural-engine", "audio", "speech", "voxtral"]
# What each validation backend ran, for the card's statement of what was measured.
BACKEND_MEANING = {
    "mil": (
        "this project's MIL runtime on Linux: the package's own program and weights, executed op by op with "
        "PyTorch kernels, every fp16 result rounded to fp16 (not Core ML itself)"
    ),
    "coreml": "Core ML on macOS (CPU and Neural Engine), running the package",
    "coreai": (
        "Apple's Core AI runtime (coreai-core's CPU runtime on Linux, the Core AI framework on macOS 27), running "
        "the asset"
    ),
}


@dataclass(frozen=True)
class Entry:
    """One package of the pipeline: where it is, what it is, and how it measured."""

    model: str
    recipe: str
    variant: str
    license: str
    folder: Path  # artifacts/packages/<model>/<recipe>: the package and its manifest.json
    manifest: dict
    metrics: dict
    format: str = DEFAULT_FORMAT  # formats.py's name; its publish_folder is where it goes under <Variant>/

    @property
    def repo_folder(self) -> str:
        return "/".join(p for p in (self.variant, FORMATS[self.format].publish_folder, self.recipe) if p)


def collect_entries(root: Path = Path(".")) -> list[Entry]:
    """Every model x recipe of params.yaml's pipeline, read from root's artifacts/ (one per variant and recipe)."""
    params = load_params(root / PARAMS_FILE)
    pipeline = lookup(params, "pipeline")
    variants = {model: lookup(params, f"models.{model}.variant") for model in pipeline["models"]}
    for variant in sorted(set(variants.values())):
        if len(same := [m for m, v in variants.items() if v == variant]) > 1:
            raise VoxtralError(
                f"{PARAMS_FILE}: pipeline.models {same} are all variant {variant}, so they would publish the same "
                "folders; publish them to separate repositories"
            )
    entries = []
    for fmt in FORMATS.values():
        built = pipeline if fmt.pipeline_key is None else pipeline.get(fmt.pipeline_key) or {}
        for model in built.get("models", []):
            variant, license_id = (lookup(params, f"models.{model}.{key}") for key in ("variant", "license"))
            for recipe in built.get("recipes", []):
                folder = root / fmt.artifacts_dir(model, recipe)
                manifest, metrics = read_json(folder / MANIFEST), read_json(root / fmt.metrics_path(model, recipe))
                entries.append(Entry(model, recipe, variant, license_id, folder, manifest, metrics, fmt.name))
    if not entries:
        raise VoxtralError(f"{PARAMS_FILE}: pipeline.models or pipeline.recipes is empty; nothing to publish")
    return entries


MEL_REPO_FOLDER = "MelSpectrogram"


def collect_mel_folders(root: Path = Path(".")) -> dict[str, Path]:
    """Repository folder -> the mel front-end package folder, for each precision of params.yaml's pipeline.mel."""
    precisions = lookup(load_params(root / PARAMS_FILE), "pipeline.mel")
    folders = {f"{MEL_REPO_FOLDER}/{p}": root / mel_package_dir(p) for p in precisions}
    for folder in folders.values():
        read_json(folder / MANIFEST)  # built and complete
    return folders


def check_up_to_date(root: Path = Path(".")) -> None:
    """Refuse outputs that dvc.lock does not describe (stale, edited, or never built)."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            changed = repo.status()
    except NotDvcRepoError:
        raise VoxtralError(
            f"{root.resolve()}: not the pipeline's repository (no .dvc/ here or above); run publish in the checkout "
            "where `dvc repro` built the packages"
        ) from None
    if changed:
        raise VoxtralError(
            f"{root.resolve() / 'dvc.lock'}: the outputs of {', '.join(sorted(changed))} do not match it; "
            "run `dvc repro` (or `dvc repro --pull`) first"
        )


def source_label(source: dict) -> str:
    """Where a package's weights came from, in one line (the resolved commit for Hub sources)."""
    kind = source.get("kind")
    if kind == "hub":
        return f"{source.get('repo_id')}@{source.get('commit') or source.get('revision')}"
    if kind == "synthetic":
        return f"synthetic random weights (seed {source.get('seed')})"
    return f"local checkpoint {source.get('name')}"


def card_license(entries: list[Entry]) -> str:
    licenses = sorted({e.license for e in entries})
    if len(licenses) != 1:
        listed = ", ".join(licenses)
        raise VoxtralError(f"{PARAMS_FILE}: the models have different licenses ({listed}); publish them separately")
    return licenses[0]


def _front_matter(entries: list[Entry]) -> str:
    from huggingface_hub import ModelCardData

    sources = [e.manifest["source"] for e in entries]
    base_models = sorted({s["repo_id"] for s in sources if s.get("kind") == "hub"})
    data = ModelCardData(
        license=card_license(entries),
        library_name="coreml",
        tags=TAGS,
        pipeline_tag="feature-extraction",
        base_model=base_models or None,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def _package_table(entries: list[Entry]) -> list[str]:
    header = ["folder", "model", "output", "size (MB)", "minimum OS", "PSNR vs transformers (dB)", "cosine min"]
    header += ["max abs err", "checked with"]
    lines = table_head(header)
    for e in entries:
        target, m = e.manifest["deployment_target"], e.metrics
        key = format_of(e.manifest["package"]).target_key
        os_versions = f"iOS {target['ios']} / macOS {target['macos']} ({target[key]})"
        shape = shape_text(e.manifest["outputs"][0]["shape"])
        cells = [f"`{e.repo_folder}/`", e.model, shape, f"{e.manifest['size_bytes'] / 1e6:.1f}", os_versions]
        lines.append(table_row([*cells, m["psnr_db"], m["cosine_min"], m["max_abs_err"], m["backend"]]))
    return lines


def _sources(entries: list[Entry]) -> list[str]:
    lines = []
    for e in entries:
        source = e.manifest["source"]
        revision = f" (requested revision `{source['revision']}`)" if source.get("kind") == "hub" else ""
        lines.append(f"- `{e.repo_folder}/`: {source_label(source)}{revision}, license {e.license}")
    if any(e.manifest["source"].get("kind") == "synthetic" for e in entries):
        lines += ["", "**Synthetic weights are not Voxtral's**: they exercise the pipeline and nothing else."]
    return lines


def _measured(entries: list[Entry]) -> list[str]:
    backends = sorted({e.metrics["backend"] for e in entries})
    return [
        "Measured, per package, on one 30 s window of speech: the `audio_embeddings` against transformers'",
        "`VoxtralForConditionalGeneration.get_audio_features` in fp32 (PSNR, minimum cosine similarity per",
        "frame, maximum absolute error), computed with:",
        "",
        *[f"- `{b}`: {BACKEND_MEANING.get(b, b)}" for b in backends],
        "",
        "Checked: each package's structure (input and output names, shapes and dtypes, spec version for the",
        "deployment target, op inventory) read from its spec with coremltools.",
        "",
        "Not measured: the packages running on an Apple device (iPhone, iPad or Mac) or on the Neural Engine;",
        "latency, memory and power; accuracy on downstream tasks (transcription, understanding) with the",
        "language model.",
    ]


def _mel_front_end(mel_folders: list[str]) -> str:
    if not mel_folders:
        return "the mel front-end package `VoxtralMelSpectrogram.mlpackage` (voxtral-coreml's `mel` stage builds it;"
    return f"the mel front-end package `{mel_folders[0]}/VoxtralMelSpectrogram.mlpackage` of this repository ("


def _microphone_to_embeddings(input_name: str, output_name: str, mel_folders: list[str]) -> list[str]:
    """What an app does between its microphone and the embeddings (README.md, "From a microphone to the
    embeddings", says the same for readers of the project)."""
    return [
        "1. Record mono float32 PCM at 16 kHz (resample other rates, average channels).",
        "2. Zero-pad the clip to a multiple of 30 s (480,000 samples) and cut it into 30 s windows; Voxtral's",
        "   processor does the same (a 0.1 s clip is one window, mostly silence).",
        f"3. Per window, the log-mel features `{input_name}` `[1, 128, 3000]`: {_mel_front_end(mel_folders)}",
        "   `audio` `[1, 480000]` -> `mel_spectrogram`, no weights, any model) computes them, or your own code:",
        "   STFT with n_fft 400, hop 160, a periodic Hann window and reflect padding, power, 128 Slaney mel",
        "   filters (0-8 kHz), `log10(max(mel, 1e-10))`, a floor at the maximum - 8, then `(x + 4) / 4`, keeping",
        "   3000 of the 3001 frames. Voxtral's processor takes that maximum over the whole clip; the package takes",
        "   it per window, which is the same for clips up to 30 s and close for longer ones.",
        f"4. Per window, this package: `{input_name}` -> `{output_name}` `[1, 375, H]`; concatenate the windows'",
        "   embeddings in order (`[N * 375, H]`, no overlap) and give them to the language model.",
        "",
        "Which package for which device: an iPhone's Neural Engine refuses (or the app is killed for) models",
        "above about 1 GB, and the fp16 Mini encoder is about 1.3 GB, so phones need a compressed recipe",
        "(`int8` about half of it, `pal6` about 0.38, `pal4g` about a quarter with iOS 18); Macs run fp16.",
        "The first load on the Neural Engine compiles the model (minutes for an encoder this size); later",
        "loads are cached.",
    ]


def render_card(entries: list[Entry], repo_id: str, mel_folders: list[str] | None = None) -> str:
    """The model card; `mel_folders`: the repository's mel front-end folders (MelSpectrogram/<precision>)."""
    first = entries[0]
    package = first.manifest["package"]
    name = package.removesuffix(".mlpackage")
    dims = first.manifest["inputs"][0]["shape"]
    return "\n".join(
        [
            _front_matter(entries),
            "# Voxtral audio encoder for Core ML",
            "",
            "The audio encoder and multimodal projector of Voxtral (Mistral AI's speech LLM) as Core ML",
            "mlprogram packages laid out for the Apple Neural Engine. The language model is not included: run it",
            "on the GPU (e.g. with MLX) and feed it these embeddings.",
            "",
            f"- input `{first.manifest['inputs'][0]['name']}` float32 `{dims}`: one 30 s window of log-mel",
            "  features (WhisperFeatureExtractor: 16 kHz, n_fft 400, hop 160, 128 mels)",
            f"- output `{first.manifest['outputs'][0]['name']}` float32 `[1, 375, H]`: the language model's",
            "  input embeddings for that window; one call per window, concatenate the windows' embeddings",
            "",
            f"Built by voxtral-coreml {__version__} with a reproducible DVC pipeline: each folder's",
            "`manifest.json` records the I/O contract, deployment target, source and revision, `weights_sha256`,",
            "op inventory and the versions of coremltools, torch and voxtral-coreml.",
            "",
            "## Packages",
            "",
            *_package_table(entries),
            "",
            "## From a microphone to the embeddings",
            "",
            *_microphone_to_embeddings(
                first.manifest["inputs"][0]["name"], first.manifest["outputs"][0]["name"], mel_folders or []
            ),
            "",
            "## Sources",
            "",
            *_sources(entries),
            "",
            "## What was measured, and what was not",
            "",
            *_measured(entries),
            "",
            "## Download",
            "",
            "```python",
            "from huggingface_hub import snapshot_download",
            "",
            f'root = snapshot_download("{repo_id}", allow_patterns=["{first.repo_folder}/*"])',
            f"# root/{first.repo_folder}/{package} and root/{first.repo_folder}/{MANIFEST}",
            "```",
            "",
            "## Compile and load (macOS, iOS)",
            "",
            "Xcode compiles a `.mlpackage` added to an app target; by hand, on a Mac:",
            "",
            "```bash",
            f"xcrun coremlcompiler compile {first.repo_folder}/{package} out/",
            f"# out/{name}.mlmodelc",
            "```",
            "",
            "```swift",
            "import CoreML",
            "",
            "let config = MLModelConfiguration()",
            "config.computeUnits = .cpuAndNeuralEngine",
            f'let url = Bundle.main.url(forResource: "{name}", withExtension: "mlmodelc")!',
            "// or, for a downloaded package: let url = try await MLModel.compileModel(at: packageURL)",
            "let model = try MLModel(contentsOf: url, configuration: config)",
            f"let mel = try MLMultiArray(shape: {dims}, dataType: .float32)  // fill with log-mel features",
            f'let input = try MLDictionaryFeatureProvider(dictionary: ["{first.manifest["inputs"][0]["name"]}": mel])',
            "let output = try model.prediction(from: input)",
            f'let embeddings = output.featureValue(for: "{first.manifest["outputs"][0]["name"]}")!.multiArrayValue!',
            "```",
            "",
            *[line for fmt, usage in USAGE.items() for line in usage([e for e in entries if e.format == fmt])],
        ]
    )


def _coreai_usage(assets: list[Entry]) -> list[str]:
    """How to use the Core AI assets, if any were published."""
    if not assets:
        return []
    first = assets[0]
    return [
        "## Core AI assets (iOS / macOS 27)",
        "",
        "The `<Variant>/coreai/<recipe>/` folders hold the same encoder as Core AI `.aimodel` assets (coreai-torch,",
        "compressed with coreai-opt), with the same input and output. They need iOS / macOS 27. In Python",
        "(coreai-core; on Linux it runs a CPU runtime):",
        "",
        "```python",
        "import asyncio",
        "from coreai.authoring import AIModelAsset",
        "from coreai.runtime import NDArray",
        "",
        f'asset = AIModelAsset.load("{first.repo_folder}/{first.manifest["package"]}")',
        "async def encode(mel):  # float32 [1, 128, 3000]",
        "    async with asset.executable() as model:",
        '        outputs = await model.load_function("main")({"mel_spectrogram": NDArray(mel)})',
        '        return outputs["audio_embeddings"].numpy()',
        "```",
        "",
    ]


# format (formats.py) -> how an app uses its packages, after the card's Core ML sections: a card section per format.
USAGE = {"coreai": _coreai_usage}


def assemble_repository(
    entries: list[Entry], out_dir: Path, repo_id: str, mel_folders: dict[str, Path] | None = None
) -> None:
    """The repository's files in `out_dir`, which appears whole or not at all (and never replaces a folder)."""
    if out_dir.exists():
        raise VoxtralError(f"{out_dir}: already exists; assemble into a new folder")
    mel_folders = mel_folders or {}
    with atomic_path(out_dir) as staging:
        for entry in entries:
            shutil.copytree(entry.folder, staging / entry.repo_folder)
        for repo_folder, folder in mel_folders.items():
            shutil.copytree(folder, staging / repo_folder)
        (staging / CARD).write_text(render_card(entries, repo_id, sorted(mel_folders)))


def commit_message(entries: list[Entry]) -> str:
    sources = sorted({source_label(e.manifest["source"]) for e in entries})
    return f"voxtral-coreml {__version__}: Core ML packages of {', '.join(sources)}"


def upload_repository(folder: Path, repo_id: str, message: str, private: bool = False) -> str:
    """Create the repo if needed and make it mirror `folder` in one commit; returns the commit URL."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    from voxtral_coreml.sources.hub import LOGIN_HINT, hub_endpoint

    if get_token() is None:  # the client finds it (HF_TOKEN or the stored login); it is never passed around here
        raise VoxtralError(f"{repo_id}: no Hugging Face token to publish with; {LOGIN_HINT}")
    api = HfApi(endpoint=hub_endpoint())
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=message,
            delete_patterns="*",  # files no longer built would contradict the card
        )
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "no response"
        raise VoxtralError(f"{repo_id}: the Hub refused the upload ({status}: {str(e).splitlines()[0]})") from None
    return commit.commit_url


def publish(
    repo_id: str,
    root: Path = Path("."),
    out: Path | None = None,
    dry_run: bool = False,
    private: bool = False,
) -> str | None:
    """Assemble the repository from root's pipeline outputs and upload it (unless `dry_run`)."""
    check_up_to_date(root)
    entries, mel_folders = collect_entries(root), collect_mel_folders(root)
    with tempfile.TemporaryDirectory(prefix=".voxtral-publish-") as tmp:
        folder = out or Path(tmp) / "repo"
        assemble_repository(entries, folder, repo_id, mel_folders)
        log.info("assembled %s: %s", folder, ", ".join(e.repo_folder for e in entries))
        if dry_run:
            return None
        url = upload_repository(folder, repo_id, commit_message(entries), private)
    log.info("published %s", url)
    return url
