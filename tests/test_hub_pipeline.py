"""`dvc repro` with Hub models served by a local Hub: download, extract, build, convert, validate, report."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from hub_server import FakeRepo, HubServer
from layout_writers import write_mistral_checkpoint

from conftest import BIN, DEMO_DIMS, DEMO_LM, copy_project, run, write_checkpoint
from voxtral_coreml.encoders.dims import ENCODER_JSON
from voxtral_coreml.export.convert import MANIFEST
from voxtral_coreml.pipeline import paths
from voxtral_coreml.sources.layouts.mistral import canonical_name
from voxtral_coreml.sources.safetensors_io import read_header


def _use_hub_models(project: Path, repos: dict[str, FakeRepo]) -> None:
    """Build only these models, each from its repo pinned to its commit."""
    params_path = project / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    for model, repo in repos.items():
        source = {"kind": "hub", "repo_id": repo.repo_id, "revision": repo.commit}
        params["models"][model] = {"variant": "Mini", "source": source}
    params["pipeline"]["models"] = list(repos)
    params["pipeline"]["recipes"] = ["fp16"]  # the source is under test, not the recipes
    params["pipeline"]["mel"] = []
    params["pipeline"]["streaming"]["models"] = []  # Realtime streaming packages: not what this test is about
    params["pipeline"]["coreai"]["models"] = []  # Core AI assets are tested elsewhere
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))


def test_dvc_repro_builds_and_validates_packages_from_hub_repos(hub: HubServer, tmp_path: Path) -> None:
    # The same weights published in transformers' layout and in Mistral's own.
    hf = hub.add_repo(FakeRepo("org/voxtral-demo-hf", write_checkpoint(tmp_path / "repos" / "hf")))
    mistral_root = write_mistral_checkpoint(tmp_path / "repos" / "mistral", DEMO_DIMS, DEMO_LM)
    mistral = hub.add_repo(FakeRepo("org/voxtral-demo-mistral", mistral_root))
    project = copy_project(tmp_path / "project")
    _use_hub_models(project, {"hub-hf": hf, "hub-mistral": mistral})

    run([str(BIN / "dvc"), "repro"], project)

    hashes = set()
    for model, repo, layout in (("hub-hf", hf, "hf"), ("hub-mistral", mistral, "mistral")):
        assert json.loads((project / paths.extracted_dir(model) / ENCODER_JSON).read_text())["layout"] == layout
        manifest = json.loads((project / paths.package_dir(model, "fp16") / MANIFEST).read_text())
        assert manifest["source"]["repo_id"] == repo.repo_id
        assert manifest["source"]["commit"] == repo.commit
        assert manifest["outputs"][0]["shape"] == [1, 375, DEMO_DIMS.hidden_size]
        metrics = json.loads((project / paths.metrics_file(model, "fp16")).read_text())
        assert metrics["psnr_db"] >= metrics["gate_db"]
        hashes.add(manifest["weights_sha256"])
    assert len(hashes) == 1  # one set of weights, whatever the layout it was published in
    # Not even the language model's embeddings that Mistral stores under the audio prefix were fetched.
    fetched = read_header(project / paths.checkpoint_dir("hub-mistral") / "model.safetensors")
    assert fetched and all(canonical_name(name) for name in fetched)
