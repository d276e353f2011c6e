"""`make bench`: full-dimension benchmarks -> artifacts/bench/summary.json and summary.md.

Every measurement is its own process: wall time from the parent, peak RSS from the kernel (`wait4`), bytes
read from the child's /proc/self/io. Baselines (the naive conversion, the PyTorch reference forward) run in the
same invocation, so ratios compare like with like on a noisy machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from voxtral_coreml.check.backends import COMPUTE_UNITS
from voxtral_coreml.encoders.attention import ATTENTION_CORES
from voxtral_coreml.export.convert import tree_size
from voxtral_coreml.export.formats import export_format
from voxtral_coreml.pipeline.atomic import remove_path, write_json_atomic, write_text_atomic
from voxtral_coreml.pipeline.paths import ARTIFACTS, calibration_file, checkpoint_dir, extracted_dir, package_dir

ROOT = Path(__file__).resolve().parent.parent
BENCH = (ROOT / ARTIFACTS / "bench").resolve()
# The stages and tasks run here, so their artifacts/ stays apart from the pipeline's: the report stage hashes
# artifacts/metrics and artifacts/reference whole, and a benchmark model there would change dvc.lock.
WORKSPACE = BENCH / "workspace"
SHARED = ("params.yaml", "conf")  # what a stage reads relative to its working directory
MODELS = ("synthetic-mini", "synthetic-small", "synthetic-realtime")
STAGES = ("download", "extract", "build")
# mixed is left out: its sensitivity scan at full size takes about 1.5 hours on 2 cores (README, Compression).
RECIPES = {
    "synthetic-mini": ("fp16", "int8", "pal6", "pal4g"),
    "synthetic-small": ("fp16",),
    "synthetic-realtime": ("fp16",),
}
# Data-aware recipes at full size: calibration (the sensitivity stage) then conversion. skm6g's k-means takes about
# 2 hours on 2 cores, its promotion trials about half an hour more.
CALIBRATED_RECIPES = {"synthetic-mini": ("gptq4", "skm6g")}
STREAMING_K = (1, 4)  # tokens per step of the Realtime streaming packages measured
# Core AI assets: export time, peak RSS and size beside Core ML's. Not validated here: coreai-core's Linux CPU runtime
# is a reference executor, slow on fp16 (a demo window takes seconds with fp32 attention; a full one was not measured).
COREAI_RECIPES = {
    "synthetic-mini": ("fp16", "int8", "pal4g"),
    "synthetic-small": ("fp16",),
    "synthetic-realtime": ("fp16",),  # the offline window
}
GB = 1024**3


@dataclass
class Measurement:
    name: str
    wall_s: float
    peak_rss_gb: float
    reported: dict = field(default_factory=dict)

    def row(self) -> dict:
        return {"wall_s": round(self.wall_s, 2), "peak_rss_gb": round(self.peak_rss_gb, 3), **self.reported}


def prepare_workspace() -> None:
    WORKSPACE.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        link = WORKSPACE / name
        if not link.is_symlink():
            link.symlink_to(ROOT / name)


def measure(name: str, argv: list[str], cwd: Path = WORKSPACE) -> Measurement:
    """Run `argv` in a child process in `cwd`; its last stdout line, if JSON, is what it reports about itself."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = BENCH / "logs" / f"{name.replace('/', '_')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"== {name}", flush=True)
    started = time.perf_counter()
    with open(log, "w") as err:
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, cwd=cwd, env=env)
        stdout = child.stdout.read() if child.stdout else ""
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if child.returncode != 0:
        raise SystemExit(f"{name} failed ({child.returncode}); see {log}")
    last = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    reported = json.loads(last) if last.startswith("{") else {}
    result = Measurement(name, wall, usage.ru_maxrss * 1024 / GB, reported)  # ru_maxrss is in KiB
    print(f"   {result.wall_s:.1f} s, {result.peak_rss_gb:.2f} GB peak RSS", flush=True)
    return result


def stage(name: str, *args: str) -> Measurement:
    """A pipeline stage script, exactly as dvc runs it, plus the bytes it read."""
    return measure(f"{name}/{'-'.join(args)}", [sys.executable, "-m", "benchmarks.stage_io", f"stages.{name}", *args])


def task(name: str, *args: str) -> Measurement:
    return measure(name, [sys.executable, "-m", "benchmarks.tasks", *args])


def gb(path: Path) -> float:
    """Size of a workspace output, in GB."""
    return round(tree_size(WORKSPACE / path) / GB, 3)


def model_benchmarks(model: str, recipes: tuple[str, ...] | None = None, coreai: bool = True) -> dict[str, dict]:
    rows = {stage_name: stage(stage_name, model).row() for stage_name in STAGES}
    rows["download"]["checkpoint_gb"] = gb(checkpoint_dir(model))
    rows["extract"]["extracted_gb"] = gb(extracted_dir(model))
    for recipe in recipes or RECIPES[model]:
        rows |= convert_and_validate(model, recipe)
    if coreai:
        rows.update(coreai_benchmarks(model, COREAI_RECIPES[model]))
    return rows


def convert_and_validate(model: str, recipe: str) -> dict[str, dict]:
    """The convert stage (wall time, peak RSS, package size) and the package validated against transformers."""
    convert = {**stage("convert", model, recipe).row(), "package_gb": gb(package_dir(model, recipe))}
    validate = task(f"validate/{model}-{recipe}", "validate", model, "--recipe", recipe).row()
    return {f"convert_{recipe}": convert, f"validate_{recipe}": validate}


def coreai_benchmarks(model: str, recipes: tuple[str, ...]) -> dict[str, dict]:
    """The convert-coreai stage per recipe: wall time, peak RSS, bytes read and the asset's size."""
    rows = {}
    for recipe in recipes:
        rows[f"coreai_convert_{recipe}"] = stage("export", "coreai", model, recipe).row()
        rows[f"coreai_convert_{recipe}"]["asset_gb"] = gb(export_format("coreai").artifacts_dir(model, recipe))
    return rows


def forward_pair(model: str, rounds: int = 2) -> dict[str, Measurement]:
    """The MIL runtime's and the PyTorch reference's forward, alternated, each one's fastest round kept: a burst of
    load on a shared machine then hits both or neither, not one side of the ratio."""
    runs: dict[str, list[Measurement]] = {"mil_forward": [], "reference_forward": []}
    for round_index in range(rounds):
        for name in runs:
            runs[name].append(task(f"{name}_{round_index}", name, model))
    return {name: min(measured, key=lambda m: m.reported["forward_s"]) for name, measured in runs.items()}


def coreml_latencies(model: str) -> dict[str, dict]:  # pragma: no cover
    """macOS only (never run in CI): per recipe and compute-unit setting, each in a fresh process so first load is
    a first load."""
    return {
        f"{recipe}/{units}": task(
            f"coreml/{model}-{recipe}-{units}", "coreml_latency", model, "--recipe", recipe, "--compute-units", units
        ).row()
        for recipe in RECIPES[model]
        for units in COMPUTE_UNITS
    }


def calibrated_benchmarks(model: str, recipes: tuple[str, ...]) -> dict[str, dict]:
    """Per data-aware recipe: its calibration (wall time, peak RSS, the device it ran on) and its conversion from the
    calibrated weights, validated; the same model's fp16 conversion is the baseline (model_benchmarks)."""
    from voxtral_coreml.export.torch_compress import calibration_info

    rows = {}
    for recipe in recipes:
        rows[f"calibrate_{recipe}"] = stage("sensitivity", model, recipe).row()
        rows[f"calibrate_{recipe}"]["device"] = calibration_info(WORKSPACE / calibration_file(model, recipe))["device"]
        rows |= convert_and_validate(model, recipe)
    return rows


def realtime_benchmarks(model: str = "synthetic-realtime") -> dict:
    """The streaming step (stateful) per k: conversion, size, ops, GFLOPs and state per step; the MIL runtime's
    time per step against transformers' streaming step, alternated as forward_pair does."""
    rows: dict[str, dict] = {}
    for k in STREAMING_K:
        out = BENCH / "work" / f"stream-k{k}"
        rows[f"convert_stateful_k{k}"] = task(f"stream_convert_k{k}", "stream_convert", model, "--k", str(k), "--out",
                                              str(out)).row()  # fmt: skip
        times = {"mil_step": [], "reference_step": []}
        for round_index in range(2):
            for name in times:
                times[name].append(task(f"{name}_k{k}_{round_index}", name, model, "--k", str(k), "--out", str(out)))
        for name, measured in times.items():
            rows[f"{name}_k{k}"] = min(measured, key=lambda m: m.reported["step_s"]).row()
    return rows


def noop_repro() -> Measurement:
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "repro", "-q"], check=True, cwd=ROOT)  # builds the demo if it is not built yet
    return measure("noop_repro", [dvc, "repro"], cwd=ROOT)


def summarize(per_model: dict[str, dict], extra: dict[str, Measurement], attention: dict[str, dict]) -> dict:
    mini = per_model["synthetic-mini"]
    naive = extra["naive"]
    fp16_gb = mini["convert_fp16"]["package_gb"]
    summary = {
        "convert_fp16_s": mini["convert_fp16"]["wall_s"],
        "convert_fp16_peak_rss_gb": mini["convert_fp16"]["peak_rss_gb"],
        "naive_convert_s": round(naive.wall_s, 2),
        "naive_peak_rss_gb": round(naive.peak_rss_gb, 3),
        "convert_vs_naive_time": round(mini["convert_fp16"]["wall_s"] / naive.wall_s, 3),
        "convert_vs_naive_rss": round(mini["convert_fp16"]["peak_rss_gb"] / naive.peak_rss_gb, 3),
        "extract_peak_rss_gb": max(per_model[m]["extract"]["peak_rss_gb"] for m in per_model),
        "noop_repro_s": round(extra["noop_repro"].wall_s, 2),
        "milrun_forward_s": extra["mil_forward"].reported["forward_s"],
        "reference_forward_s": extra["reference_forward"].reported["forward_s"],
        "milrun_vs_reference": round(
            extra["mil_forward"].reported["forward_s"] / extra["reference_forward"].reported["forward_s"], 3
        ),
        "attention_ops": {name: result["ops_total"] for name, result in attention.items()},
        "attention_convert_s": {name: result["wall_s"] for name, result in attention.items()},
        "naive_ops_total": naive.reported["ops_total"],
        "size_ratio_int8": round(mini["convert_int8"]["package_gb"] / fp16_gb, 4),
        "size_ratio_4bit": round(mini["convert_pal4g"]["package_gb"] / fp16_gb, 4),
        "psnr_db": {recipe: mini[f"validate_{recipe}"]["psnr_db"] for recipe in RECIPES["synthetic-mini"]},
        "hub_bytes_sent_over_tensor_bytes": extra["hub_fetch"].reported["sent_over_tensor_bytes"],
        "hub_fetch": extra["hub_fetch"].row(),
        **coreai_summary(mini, COREAI_RECIPES["synthetic-mini"]),
        "models": per_model,
    }
    return summary


def package_facts(model: str, recipe: str) -> dict:
    """MIL ops and GFLOPs per window, from the package's manifest."""
    from voxtral_coreml.check.validate import find_package

    _, manifest = find_package(WORKSPACE / package_dir(model, recipe))
    return {"ops_total": manifest["ane"]["ops_total"], "gflops_per_window": manifest["ane"]["gflops_per_window"]}


def conversion_floor_gb(model: str = "demo-mini") -> float:
    """Peak RSS of a conversion whose weights weigh nothing (a demo model): Python, torch, coremltools and
    torch.export's machinery, what every conversion holds besides its weights."""
    for stage_name in STAGES:
        stage(stage_name, model)
    return stage("convert", model, "fp16").peak_rss_gb


def weights_and_floor(per_model: dict[str, dict], floor_gb: float) -> dict:
    """The conversion floor, and the weights each conversion reads and writes: a layered conversion (layered.py)
    holds one layer, but its reading, writing and hashing of the weights grow with them."""
    realtime, mini = (per_model[m]["extract"]["extracted_gb"] for m in ("synthetic-realtime", "synthetic-mini"))
    return {
        "conversion_floor_gb": round(floor_gb, 3),
        "weights_gb_realtime_vs_mini": [realtime, mini],
        "weights_realtime_over_mini": round(realtime / mini, 3),
    }


def realtime_summary(per_model: dict[str, dict], streaming: dict[str, dict], floor_gb: float) -> dict:
    realtime, mini = per_model["synthetic-realtime"], per_model["synthetic-mini"]
    summary = {
        "convert_fp16_s": realtime["convert_fp16"]["wall_s"],
        "convert_fp16_peak_rss_gb": realtime["convert_fp16"]["peak_rss_gb"],
        **package_facts("synthetic-realtime", "fp16"),
        "package_gb": realtime["convert_fp16"]["package_gb"],
        "convert_fp16_vs_mini_time": round(realtime["convert_fp16"]["wall_s"] / mini["convert_fp16"]["wall_s"], 3),
        "convert_fp16_vs_mini_rss": round(
            realtime["convert_fp16"]["peak_rss_gb"] / mini["convert_fp16"]["peak_rss_gb"], 3
        ),
        **weights_and_floor(per_model, floor_gb),
        "psnr_db_fp16": realtime["validate_fp16"]["psnr_db"],
        "streaming": streaming,
    }
    for k in STREAMING_K:
        summary[f"mil_step_vs_reference_step_k{k}"] = round(
            streaming[f"mil_step_k{k}"]["step_s"] / streaming[f"reference_step_k{k}"]["step_s"], 3
        )
    return summary


def coreai_summary(rows: dict[str, dict], recipes: tuple[str, ...]) -> dict:
    """Core AI export beside Core ML's conversion (fp16), and each asset's size over its Core ML package's."""
    coreai, coreml = rows["coreai_convert_fp16"], rows["convert_fp16"]
    return {
        "coreai_convert_fp16_s": coreai["wall_s"],
        "coreai_convert_fp16_peak_rss_gb": coreai["peak_rss_gb"],
        "coreai_vs_coreml_convert_time": round(coreai["wall_s"] / coreml["wall_s"], 3),
        "coreai_vs_coreml_convert_rss": round(coreai["peak_rss_gb"] / coreml["peak_rss_gb"], 3),
        "coreai_asset_gb": {recipe: rows[f"coreai_convert_{recipe}"]["asset_gb"] for recipe in recipes},
        "coreai_asset_over_coreml_package": {
            recipe: round(rows[f"coreai_convert_{recipe}"]["asset_gb"] / rows[f"convert_{recipe}"]["package_gb"], 4)
            for recipe in recipes
            if f"convert_{recipe}" in rows
        },
    }


def markdown(summary: dict) -> str:
    lines = ["# Benchmarks (full dimensions, this machine)", ""]
    lines += ["| model | stage | wall (s) | peak RSS (GB) | read (GB) |", "| --- | --- | --- | --- | --- |"]
    for model, rows in summary["models"].items():
        for name, row in rows.items():
            read = row.get("read_gb", "")
            lines.append(f"| {model} | {name} | {row['wall_s']} | {row['peak_rss_gb']} | {read} |")
    lines += ["", "| figure | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in summary.items() if not isinstance(v, dict)]
    lines += ["", "| attention core | MIL ops | convert (s) |", "| --- | --- | --- |"]
    lines += [
        f"| {name} | {ops} | {summary['attention_convert_s'][name]} |" for name, ops in summary["attention_ops"].items()
    ]
    lines.append(f"| naive (transformers + jit.trace) | {summary['naive_ops_total']} | {summary['naive_convert_s']} |")
    return "\n".join(lines) + "\n"


def calibrated_summary(rows: dict[str, dict], recipes: tuple[str, ...]) -> dict:
    """Calibration time, peak RSS and device per data-aware recipe; every compressed recipe's conversion time over
    the fp16 conversion's in the same run (the k-means recipes: at most 2x is the goal)."""
    fp16_s = rows["convert_fp16"]["wall_s"]
    return {
        **{f"calibrate_{r}": rows[f"calibrate_{r}"] for r in recipes},
        "convert_vs_fp16_time": {
            name.removeprefix("convert_"): round(row["wall_s"] / fp16_s, 3)
            for name, row in rows.items()
            if name.startswith("convert_") and name != "convert_fp16"
        },
        "psnr_db": {r: rows[f"validate_{r}"]["psnr_db"] for r in recipes},
    }


def calibrated_only() -> None:
    """`make bench-calibrated`: the data-aware recipes at full size against the fp16 conversion of the same run."""
    model = "synthetic-mini"
    rows = model_benchmarks(model, ("fp16",)) | calibrated_benchmarks(model, CALIBRATED_RECIPES[model])
    summary = {**calibrated_summary(rows, CALIBRATED_RECIPES[model]), "rows": rows}
    write_json_atomic(BENCH / "calibrated.json", summary)
    print(json.dumps(summary, indent=1))


def realtime_only() -> None:
    """`make bench-realtime`: Realtime's figures against synthetic-mini's fp16 conversion in the same run, without
    the rest of `make bench` (its k-means recipes, Core AI exports and baselines take hours on a 2-core machine)."""
    per_model = {
        model: model_benchmarks(model, ("fp16",), coreai=False) for model in ("synthetic-mini", "synthetic-realtime")
    }
    summary = realtime_summary(per_model, realtime_benchmarks(), conversion_floor_gb())
    summary["models"] = per_model
    write_json_atomic(BENCH / "realtime.json", summary)
    lines = ["# Voxtral Realtime at full size (this machine)", "", "| figure | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in summary.items() if not isinstance(v, dict)]
    lines += ["", "| streaming step | wall (s) | peak RSS (GB) | reported |", "| --- | --- | --- | --- |"]
    for name, row in summary["streaming"].items():
        extra = {k: v for k, v in row.items() if k not in ("wall_s", "peak_rss_gb")}
        lines.append(f"| {name} | {row['wall_s']} | {row['peak_rss_gb']} | {extra} |")
    write_text_atomic(BENCH / "realtime.md", "\n".join(lines) + "\n")
    print(json.dumps(summary, indent=1))


def main() -> None:
    remove_path(BENCH / "work")  # outputs of the tasks below, from an earlier run
    prepare_workspace()
    if sys.argv[1:] == ["realtime"]:
        realtime_only()
        return
    if sys.argv[1:] == ["calibrated"]:
        calibrated_only()
        return
    per_model = {model: model_benchmarks(model) for model in MODELS}
    mini = "synthetic-mini"
    per_model[mini] |= calibrated_benchmarks(mini, CALIBRATED_RECIPES[mini])
    extra = {
        "naive": task("naive", "naive", mini, "--out", str(BENCH / "work" / "naive.mlpackage")),
        **forward_pair(mini),
        "noop_repro": noop_repro(),
        "hub_fetch": task("hub_fetch", "hub_fetch", "synthetic-small", "--out", str(BENCH / "work" / "hub-fetch")),
    }
    attention = {
        core: task(f"attention_{core}", "attention", mini, "--attention", core, "--out",
                   str(BENCH / "work" / core / "VoxtralEncoderMini.mlpackage")).row()
        for core in ATTENTION_CORES
    }  # fmt: skip
    summary = summarize(per_model, extra, attention)
    summary["calibrated"] = calibrated_summary(per_model[mini], CALIBRATED_RECIPES[mini])
    summary["realtime"] = realtime_summary(per_model, realtime_benchmarks(), conversion_floor_gb())
    if sys.platform == "darwin":
        summary["coreml"] = coreml_latencies(mini)
    write_json_atomic(BENCH / "summary.json", summary)
    write_text_atomic(BENCH / "summary.md", markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
