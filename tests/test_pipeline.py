"""The demo pipeline end to end in a scratch copy of the project: outputs, caching, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import DVC, cli, copy_project, run, tree_digests
from voxtral_coreml.pipeline import paths
from voxtral_coreml.pipeline.paths import MANIFEST
from voxtral_coreml.sources.download import checkpoint_root

DEMO_H = {"demo-mini": 96, "demo-small": 160}


def test_demo_builds_a_package_per_model_with_its_own_width(demo_repo: Path) -> None:
    report = (demo_repo / "artifacts" / "report.md").read_text()
    for model, hidden in DEMO_H.items():
        assert f"| {model} | fp16 | [1,375,{hidden}] |" in report
        folder = demo_repo / "artifacts" / "packages" / model / "fp16"
        manifest = json.loads((folder / MANIFEST).read_text())
        assert (folder / manifest["package"]).is_dir()
        assert manifest["outputs"] == [{"name": "audio_embeddings", "shape": [1, 375, hidden], "dtype": "float32"}]
        assert manifest["inputs"] == [{"name": "mel_spectrogram", "shape": [1, 128, 3000], "dtype": "float32"}]
        assert manifest["deployment_target"]["coreml"] == "iOS16"
        assert len(manifest["weights_sha256"]) == 64


def test_report_shows_size_vs_psnr_per_model_with_its_chart_and_plot_data(demo_repo: Path) -> None:
    report = (demo_repo / "artifacts" / "report.md").read_text()
    assert "![package size vs PSNR per model](tradeoff.png)" in report
    assert (demo_repo / "artifacts" / "tradeoff.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    recipes = yaml.safe_load((demo_repo / "params.yaml").read_text())["pipeline"]["recipes"]
    for model in DEMO_H:
        assert f"| {model} | fp16 | pipeline: `artifacts/packages/{model}/fp16` |" in report
        records = json.loads((demo_repo / "artifacts" / "tradeoff" / f"{model}.json").read_text())
        assert sorted(r["label"] for r in records) == sorted(recipes)
        most_accurate = max(records, key=lambda r: r["psnr_db"])
        smallest = min(records, key=lambda r: r["size_mb"])
        assert most_accurate["pareto"] and smallest["pareto"]  # nothing beats either on its own axis


def test_dvc_metrics_show_lists_every_package(demo_repo: Path) -> None:
    shown = json.loads(run([DVC, "metrics", "show", "--json"], demo_repo).stdout)
    files = next(iter(shown.values()))["data"]
    for model in DEMO_H:
        metrics = files[f"artifacts/metrics/{model}/fp16.json"]["data"]
        assert metrics["psnr_db"] >= metrics["gate_db"]
        assert {"psnr_db", "cosine_min", "max_abs_err", "size_bytes", "backend"} <= set(metrics)
        assert "timings" not in metrics and "load_s" not in metrics  # not reproducible, so not DVC metrics
    mel = files["artifacts/metrics/mel/fp32.json"]["data"]
    assert mel["psnr_db"] >= mel["gate_db"] == 60.0 and mel["compute_precision"] == "fp32"


def test_demo_builds_core_ai_assets_validated_by_apples_runtime(demo_repo: Path) -> None:
    shown = json.loads(run([DVC, "metrics", "show", "--json"], demo_repo).stdout)
    files = next(iter(shown.values()))["data"]
    coreai = yaml.safe_load((demo_repo / "params.yaml").read_text())["pipeline"]["coreai"]
    recipes = coreai["recipes"]
    assert coreai["models"] == [*DEMO_H, "demo-realtime"]  # every family: Realtime's offline window too
    assert "fp16" in recipes and "int8" in recipes and {"pal4g", "pal4", "int4b"} & set(recipes)
    report = (demo_repo / "artifacts" / "report.md").read_text()
    assert "## Core AI assets (`.aimodel`, iOS / macOS 27)" in report
    for model, hidden in {**DEMO_H, "demo-realtime": 96}.items():
        for recipe in recipes:
            metrics = files[f"artifacts/metrics/coreai/{model}/{recipe}.json"]["data"]
            assert metrics["backend"] == "coreai" and metrics["deployment_target"] == "v27"
            assert metrics["psnr_db"] >= metrics["gate_db"]
            assert f"| {model} | {recipe} | [1,375,{hidden}] |" in report.split("## Core AI assets")[1]
        assert files[f"artifacts/metrics/coreai/{model}/fp16.json"]["data"]["psnr_db"] >= 50


def test_demo_builds_the_mel_front_end_once_for_all_models(demo_repo: Path) -> None:
    folder = demo_repo / "artifacts" / "mel" / "fp32"
    manifest = json.loads((folder / MANIFEST).read_text())
    assert sorted(p.name for p in folder.iterdir()) == ["VoxtralMelSpectrogram.mlpackage", MANIFEST]
    assert manifest["outputs"] == [{"name": "mel_spectrogram", "shape": [1, 128, 3000], "dtype": "float32"}]
    report = (demo_repo / "artifacts" / "report.md").read_text()
    assert "## Mel front-end (`VoxtralMelSpectrogram.mlpackage`)" in report
    assert "| fp32 | 0.9 | iOS16 | mil |" in report


def test_second_repro_runs_nothing(demo_repo: Path) -> None:
    result = run([DVC, "repro"], demo_repo)
    assert "Running stage" not in result.stdout
    assert "Data and pipelines are up to date." in run([DVC, "status"], demo_repo).stdout


def test_changing_one_model_invalidates_only_its_entries(tmp_path: Path, demo_repo: Path) -> None:
    params_path = demo_repo / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params["models"]["demo-small"]["source"]["seed"] = 99
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = json.loads(run([DVC, "status", "--json"], demo_repo).stdout)
    finally:
        params_path.write_text(original)
    assert status  # something changed ...
    assert all("demo-small" in stage or stage == "report" for stage in status), status  # ... only demo-small's


def test_unknown_model_fails_at_its_stage_with_one_line_and_no_output(tmp_path: Path) -> None:
    repo = copy_project(tmp_path / "repo")
    result = run(["python", "-m", "stages.download", "no-such-model"], repo, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: params.yaml: no 'no-such-model' under models")
    assert "Traceback" not in result.stderr
    assert not (repo / "artifacts").exists() or not any((repo / "artifacts").rglob("*"))


def test_unknown_recipe_is_named(demo_repo: Path) -> None:
    result = run(["python", "-m", "stages.convert", "demo-mini", "int3"], demo_repo, check=False)
    assert result.returncode == 2
    assert "no 'int3' under recipes (known: fp16" in result.stderr
    assert not (demo_repo / "artifacts" / "packages" / "demo-mini" / "int3").exists()


def test_hub_model_fails_clearly_without_the_hub(tmp_path: Path) -> None:
    repo = copy_project(tmp_path / "repo")
    result = run(["python", "-m", "stages.download", "mini"], repo, check=False)  # conftest: an unreachable Hub
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "mistralai/Voxtral-Mini-3B-2507" in last and "Connection refused" in last  # not the real Hub


@pytest.mark.parametrize("recipe", ["fp16", "pal6"])
def test_the_cli_builds_the_pipelines_package_byte_for_byte(tmp_path: Path, demo_repo: Path, recipe: str) -> None:
    """One place for each default: `voxtral-coreml convert` reads the recipes and build settings from conf/, the
    pipeline from params.yaml composed from it."""
    checkpoint = checkpoint_root(demo_repo / paths.checkpoint_dir("demo-mini"))
    out = tmp_path / "VoxtralEncoderMini.mlpackage"
    result = cli("convert", "--checkpoint", str(checkpoint), "--recipe", recipe, "--out", str(out))
    assert result.returncode == 0, result.stderr
    pipeline_folder = demo_repo / paths.package_dir("demo-mini", recipe)
    assert tree_digests(out) == tree_digests(pipeline_folder / out.name)
    ours, theirs = (json.loads((folder / MANIFEST).read_text()) for folder in (tmp_path, pipeline_folder))
    assert {k: ours[k] for k in ("attention", "query_chunk")} == {k: theirs[k] for k in ("attention", "query_chunk")}
