"""Sweeps as a Hydra multirun (stages/sweep.py) in scratch copies of the project, and the size-vs-PSNR report
(voxtral_coreml/report/tradeoff.py): Pareto front, chart and plot data."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
import yaml

from conftest import DVC, copy_project, run
from voxtral_coreml.export.sweep import content_key
from voxtral_coreml.pipeline.paths import (
    SWEEP_RESULT_FILE,
    report_file,
    sweep_results_dir,
    sweeps_dir,
    tradeoff_chart_file,
    tradeoff_data_dir,
)
from voxtral_coreml.report.tradeoff import (
    Point,
    collect_points,
    pareto_front,
    plot_data_name,
    write_chart,
    write_plot_data,
)

SWEEP = [sys.executable, "-m", "stages.sweep"]
# 2 recipes x 2 settings, cheap at demo size: the threshold decides whether the 64x64 attention weights are
# compressed (2048) or stay fp16 (8192), so all four packages differ.
GRID = ["model=demo-mini", "recipe=pal6,pal4g", "recipe.weight_threshold=2048,8192"]
GRID_LABELS = [f"{recipe} weight_threshold={t}" for recipe in ("pal4g", "pal6") for t in (2048, 8192)]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def results(repo: Path) -> dict[str, dict]:
    """Result key (folder name) -> result.json, for every complete result."""
    folder = repo / sweep_results_dir()
    return {f.parent.name: json.loads(f.read_text()) for f in sorted(folder.glob(f"*/{SWEEP_RESULT_FILE}"))}


def file_states(root: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (inode, mtime in ns) of every file and folder under root: a rebuild changes them."""
    return {p.relative_to(root).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def overlapping(jobs: list[dict]) -> bool:
    """Whether two of the jobs ran at the same time."""
    spans = sorted((job["started"], job["finished"]) for job in jobs)
    return any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans))


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A scratch project after one multirun over GRID with the joblib launcher (2 jobs at once), and its log."""
    repo = copy_project(tmp_path_factory.mktemp("sweep") / "repo")
    first = run([*SWEEP, "-m", *GRID, "hydra/launcher=local"], repo)
    return repo, first.stdout + first.stderr


def test_multirun_runs_in_parallel_and_stores_each_result_under_its_content_key(swept: tuple[Path, str]) -> None:
    repo, log = swept
    found = results(repo)
    assert sorted(r["label"] for r in found.values()) == GRID_LABELS
    for key, result in found.items():
        assert key == result["key"] == content_key(result["config"])
        assert (repo / sweep_results_dir() / key / result["package"]).is_dir()
        assert result["passed_gate"]
    assert log.count("building: ") == 4 and "cached: " not in log
    jobs = [r["job"] for r in found.values()]
    assert len({job["pid"] for job in jobs}) == 2  # hydra/launcher=local: n_jobs=2 worker processes ...
    assert overlapping(jobs)  # ... converting at the same time
    sizes = {r["label"]: r["size_bytes"] for r in found.values()}
    assert sizes["pal6 weight_threshold=2048"] < sizes["pal6 weight_threshold=8192"]  # the setting took effect


def test_repeating_a_multirun_builds_nothing(swept: tuple[Path, str]) -> None:
    repo, _ = swept
    before = results(repo)
    states = {name: file_states(repo / sweeps_dir() / name) for name in ("models", "references", "results")}
    again = run([*SWEEP, "-m", *GRID, "hydra/launcher=local"], repo)
    log = again.stdout + again.stderr
    assert log.count("cached: ") == 4 and "building: " not in log
    assert all(f"cached: {key}" in log for key in before)
    assert results(repo) == before
    assert {name: file_states(repo / sweeps_dir() / name) for name in states} == states


def test_multirun_renders_the_sweeps_report(swept: tuple[Path, str]) -> None:
    repo, _ = swept
    report = (repo / report_file(sweeps_dir())).read_text()
    for label in GRID_LABELS:
        assert f"| demo-mini | {label} | sweep: `{sweep_results_dir()}/" in report
    assert (repo / tradeoff_chart_file(sweeps_dir())).read_bytes().startswith(PNG_SIGNATURE)
    records = json.loads((repo / tradeoff_data_dir(sweeps_dir()) / "demo-mini.json").read_text())
    assert sorted(r["label"] for r in records) == GRID_LABELS


def test_submitit_launcher_runs_a_job_through_the_local_executor(tmp_path: Path) -> None:
    repo = copy_project(tmp_path / "repo")
    launched = run([*SWEEP, "-m", "model=demo-mini", "recipe=pal4", "hydra/launcher=submitit_local"], repo)
    (result,) = results(repo).values()
    assert result["label"] == "pal4" and result["passed_gate"]
    # submitit ran the job in a process of its own, which logged the build, and pickled its return value.
    assert "Submitit 'local' sweep output dir" in launched.stdout + launched.stderr
    (returned,) = (repo / sweeps_dir() / "runs").glob("*/.submitit/*/*_0_result.pkl")
    job_log = returned.with_name(returned.name.replace("_result.pkl", "_log.out")).read_text()
    assert "building: " in job_log and "Job completed successfully" in job_log


def test_slurm_launcher_config_composes_with_the_plugin_schema(tmp_path: Path) -> None:
    repo = copy_project(tmp_path / "repo")
    shown = run(
        [*SWEEP, "hydra/launcher=slurm", "hydra.launcher.partition=cpu", "--cfg", "hydra", "-p", "hydra.launcher"], repo
    )
    launcher = yaml.safe_load(shown.stdout)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher["partition"] == "cpu" and launcher["gpus_per_node"] == 0 and launcher["array_parallelism"] == 32


def point(label: str, size_mb: float, psnr_db: float, model: str = "m", origin: str = "pipeline") -> Point:
    return Point(model, label, origin, f"where/{label}", round(size_mb * 1e6), psnr_db, 30.0, 4.0, "a" * 64)


def test_pareto_front_keeps_what_nothing_smaller_beats() -> None:
    points = [
        point("fp16", 1.0, 70.0),
        point("int8", 0.5, 48.0),
        point("pal6", 0.4, 37.0),
        point("pal6-worse", 0.4, 36.0),  # as small as pal6 and worse: off
        point("mixed", 0.35, 37.5),  # smaller and better than pal6: pal6 is off too
        point("mixed-again", 0.35, 37.5),  # equal points dominate each other nowhere: both stay
        point("big-worse", 1.2, 60.0),  # larger than fp16 and worse: off
        point("pal4", 0.3, 24.0),
    ]
    front = [p.label for p in pareto_front(points)]
    assert front == ["pal4", "mixed", "mixed-again", "int8", "fp16"]


def test_chart_and_plot_data_show_each_model_with_its_front(tmp_path: Path) -> None:
    points = [
        point("fp16", 0.57, 72.8, "demo-mini"),
        point("pal6", 0.36, 37.1, "demo-mini"),
        point("mixed", 0.34, 37.2, "demo-mini"),
        point("pal4g group_size=8", 0.33, 25.0, "demo-mini", "sweep"),
        point("fp16", 0.75, 71.1, "demo-small"),
    ]
    chart = tmp_path / "tradeoff.png"
    write_chart(chart, points)
    data = chart.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 2 * height  # one chart per model, side by side
    write_plot_data(tmp_path / "tradeoff", points)
    assert sorted(p.name for p in (tmp_path / "tradeoff").iterdir()) == ["demo-mini.json", "demo-small.json"]
    records = json.loads((tmp_path / "tradeoff" / "demo-mini.json").read_text())
    assert [(r["label"], r["pareto"]) for r in records] == [
        ("pal4g group_size=8", True),
        ("mixed", True),
        ("pal6", False),
        ("fp16", True),
    ]
    assert records[0]["origin"] == "sweep" and records[0]["size_mb"] == 0.33


def test_dvc_plots_show_renders_one_scatter_chart_per_model(tmp_path: Path) -> None:
    repo = copy_project(tmp_path / "repo")
    points = [point("fp16", 0.57, 72.8, "demo-mini"), point("int8", 0.41, 48.6, "demo-mini")]
    points += [point("fp16", 0.75, 71.1, "demo-small")]
    write_plot_data(repo / tradeoff_data_dir(), points)
    write_chart(repo / tradeoff_chart_file(), points)
    shown = json.loads(run([DVC, "plots", "show", "--json", "-o", str(tmp_path / "html")], repo).stdout)["data"]
    for model, count in (("demo-mini", 2), ("demo-small", 1)):
        (plot,) = shown[f"{tradeoff_data_dir()}/{plot_data_name(model)}"]
        spec = plot["content"]
        assert plot["type"] == "vega" and spec["mark"]["type"] == "point"
        assert spec["encoding"]["x"]["field"] == "size_mb" and spec["encoding"]["y"]["field"] == "psnr_db"
        assert len(spec["data"]["values"]) == count
    assert shown[str(tradeoff_chart_file())][0]["type"] == "image"


def write_result(root: Path, key: str, label: str, weights_sha256: str, size_bytes: int, psnr_db: float) -> None:
    folder = root / key
    folder.mkdir(parents=True)
    manifest = {"weights_sha256": weights_sha256, "compression": {"average_bits": 4.0}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    metrics = {"size_bytes": size_bytes, "psnr_db": psnr_db, "gate_db": 20.0}
    result = {"config": {"model": {"name": "demo-mini"}}, "label": label, "manifest": "manifest.json"}
    (folder / SWEEP_RESULT_FILE).write_text(json.dumps({**result, "metrics": metrics}))


def test_sweep_points_of_other_weights_get_a_chart_of_their_own(tmp_path: Path) -> None:
    write_result(tmp_path, "k1", "pal4", "a" * 64, 300_000, 24.0)
    write_result(tmp_path, "k2", "pal4", "a" * 64, 300_000, 24.0)  # the same package under another key: once
    write_result(tmp_path, "k3", "pal4 model.source.seed=7", "b" * 64, 300_000, 23.0)
    points = collect_points([], [], tmp_path)
    assert sorted((p.model, p.label) for p in points) == [
        ("demo-mini (aaaaaaaa)", "pal4"),
        ("demo-mini (bbbbbbbb)", "pal4 model.source.seed=7"),
    ]
    assert plot_data_name("demo-mini (aaaaaaaa)") == "demo-mini-aaaaaaaa.json"
