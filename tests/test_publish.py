"""The Hub repository assembled from the demo pipeline, and its upload to a local Hub by the real client."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import yaml
from hub_server import HubServer
from huggingface_hub import HfApi, ModelCard, constants, snapshot_download

from conftest import clone, run, tree_digests
from voxtral_coreml import __version__
from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.pipeline.params import load_params
from voxtral_coreml.publish import (
    CARD,
    Entry,
    assemble_repository,
    check_up_to_date,
    collect_entries,
    collect_mel_folders,
    commit_message,
    publish,
    render_card,
)

REPO_ID = "voxtral-coreml/demo-encoders"
TOKEN = "hf_publishTestToken0123456789"  # distinctive, to be searched for everywhere it must not be
COMMIT_SHA = "0123456789abcdef0123456789abcdef01234567"
CLI = [sys.executable, "-m", "voxtral_coreml.cli"]  # run in demo_repo: its copy of this checkout's library


@pytest.fixture(scope="module")
def packages(demo_repo: Path) -> dict[str, Path]:
    """Repository folder (<Variant>/<recipe>, <Variant>/coreai/<recipe>) -> the pipeline's folder it copies, for
    every Core ML package and Core AI asset of the demo pipeline."""
    params = load_params(demo_repo / "params.yaml")
    pipeline, artifacts = params["pipeline"], demo_repo / "artifacts"
    folders = {}
    for model in pipeline["models"]:
        variant = params["models"][model]["variant"]
        folders |= {f"{variant}/{recipe}": artifacts / "packages" / model / recipe for recipe in pipeline["recipes"]}
        coreai = pipeline["coreai"]["recipes"] if model in pipeline["coreai"]["models"] else []
        assets = {f"{variant}/coreai/{recipe}": artifacts / "coreai" / model / recipe for recipe in coreai}
        folders |= assets
    return folders


@pytest.fixture(scope="module")
def entries(demo_repo: Path) -> list[Entry]:
    return collect_entries(demo_repo)


@pytest.fixture(scope="module")
def assembled(entries: list[Entry], demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("publish") / "repo"
    assemble_repository(entries, out, REPO_ID, collect_mel_folders(demo_repo))
    return out


@pytest.fixture
def writable_hub(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """The local Hub accepting TOKEN, the client holding it in HF_TOKEN, on the LFS upload path."""
    hub.write_tokens.add(TOKEN)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    # hf_xet would take the Xet path, which needs a CAS server: the switch, for subprocesses and in-process.
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    return hub


def package_files(root: Path, folder: str) -> dict[str, str]:
    return {k: v for k, v in tree_digests(root).items() if k.startswith(f"{folder}/")}


def test_the_repository_holds_each_package_with_its_manifest(
    assembled: Path, demo_repo: Path, packages: dict[str, Path]
) -> None:
    files = set(tree_digests(assembled))
    assert CARD in files
    assert any("/coreai/" in folder for folder in packages)  # Core AI assets beside the Core ML packages
    for folder, pipeline_folder in packages.items():
        assert f"{folder}/manifest.json" in files
        package = json.loads((assembled / folder / "manifest.json").read_text())["package"]  # per family and format
        inside = "main.mlirb" if package.endswith(".aimodel") else "Manifest.json"
        assert f"{folder}/{package}/{inside}" in files
        built = tree_digests(pipeline_folder)
        assert {k.removeprefix(f"{folder}/"): v for k, v in package_files(assembled, folder).items()} == built
    mel = package_files(assembled, "MelSpectrogram/fp32")  # the front-end, once for every model
    assert {k.removeprefix("MelSpectrogram/fp32/"): v for k, v in mel.items()} == tree_digests(
        demo_repo / "artifacts" / "mel" / "fp32"
    )
    assert len(files) == 1 + len(mel) + sum(len(package_files(assembled, f)) for f in packages)


def test_an_existing_folder_is_never_replaced(entries: list[Entry], assembled: Path) -> None:
    before = tree_digests(assembled)
    with pytest.raises(VoxtralError, match="already exists; assemble into a new folder"):
        assemble_repository(entries, assembled, REPO_ID)
    assert tree_digests(assembled) == before


def test_the_model_card(assembled: Path, entries: list[Entry]) -> None:
    card = ModelCard.load(assembled / CARD)
    assert card.data.license == "apache-2.0"
    assert card.data.library_name == "coreml"
    assert {"coreml", "mlprogram", "apple-neural-engine"} <= set(card.data.tags)
    assert card.data.base_model is None  # synthetic weights derive from no Hub model
    text = card.text
    for entry in entries:
        m = entry.metrics
        shape = ",".join(str(d) for d in entry.manifest["outputs"][0]["shape"])
        row = f"| `{entry.repo_folder}/` | {entry.model} | [{shape}] |"
        assert row in text
        measured = f"| {m['psnr_db']} | {m['cosine_min']} | {m['max_abs_err']} | {m['backend']} |"
        target = entry.manifest["deployment_target"]
        assert f"| iOS {target['ios']} / macOS {target['macos']} ({target[entry.format]}) {measured}" in text
        assert m["backend"] == {"coreml": "mil", "coreai": "coreai"}[entry.format]
        assert f"- `{entry.repo_folder}/`: synthetic random weights (seed {entry.manifest['source']['seed']})" in text
    assert "Synthetic weights are not Voxtral's" in text
    assert "`mil`: this project's MIL runtime on Linux: the package's own program" in text
    assert "(not Core ML itself)" in text
    assert "`coreai`: Apple's Core AI runtime (coreai-core's CPU runtime on Linux" in text
    assert 'asset = AIModelAsset.load("Mini/coreai/fp16/VoxtralEncoderMini.aimodel")' in text
    assert "Not measured: the packages running on an Apple device" in text and "latency" in text
    assert f'snapshot_download("{REPO_ID}", allow_patterns=["Mini/fp16/*"])' in text
    assert "xcrun coremlcompiler compile Mini/fp16/VoxtralEncoderMini.mlpackage out/" in text
    assert "let model = try MLModel(contentsOf: url, configuration: config)" in text
    # Everything between a microphone and the embeddings: the front-end, its arithmetic, windows, which recipe.
    steps = ("`MelSpectrogram/fp32/VoxtralMelSpectrogram.mlpackage` of this repository", "log10(max(mel, 1e-10))",
             "the maximum - 8", "(x + 4) / 4", "480,000 samples", "concatenate the windows'", "above about 1 GB",
             "about 1.3 GB")  # fmt: skip
    for step in steps:
        assert step in " ".join(text.split()), step
    assert f"voxtral-coreml {__version__}" in text


def test_hub_sources_are_named_with_their_resolved_commit(entries: list[Entry]) -> None:
    source = {"kind": "hub", "repo_id": "mistralai/Voxtral-Mini-3B-2507", "revision": "main", "commit": COMMIT_SHA}
    hub_entry = dataclasses.replace(entries[0], manifest={**entries[0].manifest, "source": source})
    text = render_card([hub_entry], REPO_ID)
    front = yaml.safe_load(text.split("---")[1])
    assert front["base_model"] == ["mistralai/Voxtral-Mini-3B-2507"]
    assert f"mistralai/Voxtral-Mini-3B-2507@{COMMIT_SHA} (requested revision `main`), license apache-2.0" in text
    assert "Synthetic" not in text
    message = commit_message([hub_entry])
    assert message == f"voxtral-coreml {__version__}: Core ML packages of mistralai/Voxtral-Mini-3B-2507@{COMMIT_SHA}"


def test_two_models_of_one_variant_cannot_share_a_repository(demo_repo: Path, tmp_path: Path) -> None:
    params = yaml.safe_load((demo_repo / "params.yaml").read_text())
    params["pipeline"]["models"] = ["demo-mini", "synthetic-mini"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(VoxtralError, match=r"\['demo-mini', 'synthetic-mini'\] are all variant Mini"):
        collect_entries(tmp_path)


def test_outputs_dvc_lock_does_not_describe_are_refused(demo_repo: Path, tmp_path: Path) -> None:
    fresh = clone(demo_repo, tmp_path / "fresh")  # dvc.lock, but no artifacts
    with pytest.raises(VoxtralError, match=r"dvc\.lock: the outputs of .*convert@demo-mini-fp16.* do not match"):
        check_up_to_date(fresh)


def test_upload_through_the_real_client(writable_hub: HubServer, demo_repo: Path, assembled: Path) -> None:
    hub = writable_hub
    url = publish(REPO_ID, demo_repo)
    repo = hub.repos[REPO_ID]
    assert url == f"{hub.endpoint}/{REPO_ID}/commit/{repo.commit}"
    published = tree_digests(repo.root)
    assert published.pop(".gitattributes") and published == tree_digests(assembled)
    weights = sorted(f for f in tree_digests(assembled) if f.endswith((".bin", ".mlmodel")))
    assert sorted(f for f in repo.lfs if ".aimodel/" not in f) == weights  # asset files go as LFS when binary
    [commit] = hub.commits
    assert commit.summary == commit_message(collect_entries(demo_repo))
    assert hub.errors == []

    puts = [h for h in hub.log if h.method == "PUT"]
    assert len(puts) == len(repo.lfs) and all(h.server == "cdn" and h.status == 200 for h in puts)
    assert not any(h.authorized for h in hub.log if h.server == "cdn")  # storage never sees the token
    assert all(h.authorized for h in hub.log if h.server == "hub" and h.method == "POST")

    # What an app does: one package, byte for byte what the pipeline built.
    local = Path(snapshot_download(REPO_ID, allow_patterns=["Mini/fp16/*"], endpoint=hub.endpoint))
    assert set(tree_digests(local)) == set(package_files(assembled, "Mini/fp16"))
    assert tree_digests(local / "Mini" / "fp16") == tree_digests(demo_repo / "artifacts/packages/demo-mini/fp16")


def test_republishing_mirrors_the_folder(writable_hub: HubServer, demo_repo: Path) -> None:
    hub = writable_hub
    publish(REPO_ID, demo_repo)
    HfApi(endpoint=hub.endpoint).upload_file(
        path_or_fileobj=b"{}", path_in_repo="Old/fp16/manifest.json", repo_id=REPO_ID, commit_message="stale"
    )
    publish(REPO_ID, demo_repo)
    assert [c.summary for c in hub.commits][-1].startswith("voxtral-coreml")
    assert ("deletedFile", "Old/fp16/manifest.json") in hub.commits[-1].operations
    assert not any(f.startswith("Old/") for f in hub.repos[REPO_ID].files())
    commits = len(hub.commits)
    publish(REPO_ID, demo_repo)  # nothing changed: no empty commit
    assert len(hub.commits) == commits


def test_the_command_takes_the_token_from_the_environment_and_never_shows_it(
    writable_hub: HubServer, demo_repo: Path, tmp_path: Path
) -> None:
    out = tmp_path / "repo"
    # The environment is the fixtures' (HF_TOKEN, HF_ENDPOINT, HF_HOME); --debug: not even debug logs show it.
    result = run([*CLI, "--debug", "publish", "--repo", REPO_ID, "--out", str(out)], demo_repo, check=False)
    assert result.returncode == 0, result.stderr
    repo = writable_hub.repos[REPO_ID]
    assert result.stdout.strip().splitlines()[-1] == f"{writable_hub.endpoint}/{REPO_ID}/commit/{repo.commit}"
    assert TOKEN not in result.stdout + result.stderr
    for root in (out, writable_hub.repos[REPO_ID].root, demo_repo / "artifacts"):
        assert not [p for p in root.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]


def test_without_a_token_the_command_says_how_to_get_one(hub: HubServer, demo_repo: Path) -> None:
    result = run([*CLI, "publish", "--repo", REPO_ID], demo_repo, check=False)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: {REPO_ID}: no Hugging Face token to publish with; set HF_TOKEN or run `hf auth login`")
    )
    assert REPO_ID not in hub.repos
