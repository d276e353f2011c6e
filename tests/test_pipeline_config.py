"""conf/ is the single source of truth, and dvc.yaml agrees with the library about where outputs live."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import DVC, REPO, copy_project, run
from voxtral_coreml.encoders.attention import ATTENTION_CORES
from voxtral_coreml.pipeline import paths
from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.pipeline.params import compose_params, load_params, lookup


def test_params_yaml_is_the_composition_of_conf(tmp_path: Path) -> None:
    composed = tmp_path / "params.yaml"
    compose_params(composed, REPO / "conf")
    assert (REPO / "params.yaml").read_text() == composed.read_text(), "run `make params` and commit params.yaml"


def test_overrides_compose_like_dvc_exp_run_set_param(tmp_path: Path) -> None:
    composed = tmp_path / "params.yaml"
    default = load_params(REPO / "params.yaml")["build"]["attention"]
    other = next(core for core in ATTENTION_CORES if core != default)  # an override that changes something
    compose_params(composed, REPO / "conf", ["pipeline.models=[demo-mini]", f"build.attention={other}"])
    params = load_params(composed)
    assert params["pipeline"]["models"] == ["demo-mini"] and params["pipeline"]["coreai"]["models"] == ["demo-mini"]
    assert params["build"]["attention"] == other


def test_invalid_override_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(VoxtralError, match="no_such_key") as err:
        compose_params(tmp_path / "params.yaml", REPO / "conf", ["build.no_such_key=1"])
    assert "\n" not in str(err.value)
    assert not (tmp_path / "params.yaml").exists()


def test_unknown_keys_name_what_exists() -> None:
    params = load_params(REPO / "params.yaml")
    with pytest.raises(VoxtralError, match=r"no 'nope' under models \(known: demo-mini, demo-realtime, demo-small"):
        lookup(params, "models.nope.source")


def _stage_outputs() -> dict[str, list[str]]:
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        return {stage.addressing: [str(out.def_path) for out in stage.outs] for stage in repo.index.stages}


def test_dvc_yaml_outputs_are_the_library_paths() -> None:
    outputs = _stage_outputs()
    pipeline = load_params(REPO / "params.yaml")["pipeline"]
    for model in pipeline["models"]:
        assert outputs[f"download@{model}"] == [str(paths.checkpoint_dir(model))]
        assert outputs[f"extract@{model}"] == [str(paths.extracted_dir(model))]
        assert outputs[f"build@{model}"] == [str(paths.reference_file(model)), str(paths.parity_file(model))]
        for recipe in pipeline["recipes"]:
            assert outputs[f"convert@{model}-{recipe}"] == [str(paths.package_dir(model, recipe))]
            assert outputs[f"validate@{model}-{recipe}"] == [str(paths.metrics_file(model, recipe))]
    for model in pipeline["coreai"]["models"]:
        for recipe in pipeline["coreai"]["recipes"]:
            assert outputs[f"convert-coreai@{model}-{recipe}"] == [str(paths.export_dir("coreai", model, recipe))]
            metrics = paths.export_metrics_file("coreai", model, recipe)
            assert outputs[f"validate-coreai@{model}-{recipe}"] == [str(metrics)]
    for precision in pipeline["mel"]:
        assert outputs[f"mel@{precision}"] == [
            str(paths.mel_package_dir(precision)),
            str(paths.mel_metrics_file(precision)),
        ]
    report_outputs = [paths.report_file(), paths.tradeoff_chart_file(), paths.tradeoff_data_dir()]
    assert outputs["report"] == [str(path) for path in report_outputs]


def test_an_empty_mel_list_leaves_the_mel_stage_out(tmp_path: Path) -> None:
    repo = copy_project(tmp_path / "repo")
    run([sys.executable, "-m", "voxtral_coreml.pipeline.params", "pipeline.mel=[]"], repo)
    stages = run([DVC, "stage", "list", "--name-only"], repo).stdout.split()
    assert "report" in stages and not any(stage.startswith("mel") for stage in stages)
