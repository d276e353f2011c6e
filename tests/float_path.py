"""One simulated machine: the pipeline's float-producing stages for demo-mini and demo-realtime, run in this process.

`python float_path.py setup REPO` (in an empty working directory) writes params.yaml (REPO's, the pipeline cut to
demo-mini, fp16 and mixed, the fp32 mel), the extracted demo-mini and demo-realtime weights and the two packages
the validations read.

`python float_path.py run THREADS MKLDNN` then runs, in that directory, every stage whose outputs hold float
results: build (reference, parity; both families: transformers' Realtime modules have float32 parts of their own),
sensitivity (the mixed table), validate (metrics), streaming (demo-realtime's step package streamed against
transformers' own streaming), mel (package and metrics), report (report.md, chart, plot data). The caller sets what
a process must have before torch loads (ATEN_CPU_CAPABILITY, OMP_NUM_THREADS, MKL_ENABLE_INSTRUCTIONS); THREADS and
MKLDNN (on/off) are set here. It prints a JSON line with the sha256 of an fp32 canary (transformers' forward in fp32,
the path the old reference took), which shows that the float path really differs between two runs.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
from pathlib import Path

import torch
import yaml

MODEL = "demo-mini"
PIPELINE = {"models": [MODEL], "recipes": ["fp16", "mixed"], "mel": ["fp32"]}
REALTIME = "demo-realtime"
SETUP_STAGES = (
    ("stages.download", [REALTIME]),
    ("stages.extract", [REALTIME]),
    ("stages.sensitivity", [REALTIME, "fp16"]),
    ("stages.sensitivity", ["demo-mini", "mixed"]),
    ("stages.convert", ["demo-mini", "fp16"]),
    ("stages.convert", ["demo-mini", "mixed"]),
)
STAGES = (
    ("stages.build", ["demo-mini"]),
    ("stages.build", [REALTIME]),
    ("stages.streaming", [REALTIME, "fp16", "stateful", "1"]),
    ("stages.sensitivity", ["demo-mini", "mixed"]),
    ("stages.validate", ["demo-mini", "fp16"]),
    ("stages.validate", ["demo-mini", "mixed"]),
    ("stages.mel", ["fp32"]),
    ("stages.report", []),
)


def fp32_canary() -> str:
    """sha256 of transformers' fp32 embeddings of the speech window, features in fp32: the last bits of PyTorch's CPU
    kernels (BLAS, vectorized math, thread split)."""
    from voxtral_coreml.encoders.reference import TransformersReference
    from voxtral_coreml.features.logmel import builtin_speech_clip, load_audio, log_mel_windows
    from voxtral_coreml.pipeline.paths import extracted_dir
    from voxtral_coreml.sources.extract import load_extracted

    weights, dims, _ = load_extracted(extracted_dir(MODEL))
    mel = log_mel_windows(load_audio(builtin_speech_clip()))[:1]
    embeddings = TransformersReference({n: w.float() for n, w in weights.items()}, dims).audio_embeddings(mel)
    return hashlib.sha256(mel.numpy().tobytes() + embeddings.numpy().tobytes()).hexdigest()


def run_stages(stages: tuple[tuple[str, list[str]], ...]) -> None:
    for module, args in stages:
        sys.argv = [module, *args]
        importlib.import_module(module).main()


def setup(repo: Path) -> None:
    from conftest import write_checkpoint
    from voxtral_coreml.pipeline.paths import extracted_dir
    from voxtral_coreml.sources.extract import extract_audio_tower

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pipeline"].update(PIPELINE)
    params["pipeline"]["streaming"]["models"] = []  # the report's: one stateful step is run as a stage (STAGES)
    params["pipeline"]["coreai"]["models"] = []  # nor Core AI assets (test_coreai checks those)
    params["sensitivity"].update(frames=400, jobs=1)  # a shorter scan, no worker processes: the same kind of output
    Path("params.yaml").write_text(yaml.safe_dump(params))
    extract_audio_tower(write_checkpoint(Path("checkpoint")), extracted_dir(MODEL))
    run_stages(SETUP_STAGES)


def main() -> None:
    if sys.argv[1] == "setup":
        setup(Path(sys.argv[2]))
        return
    threads, mkldnn = int(sys.argv[2]), sys.argv[3] == "on"
    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = mkldnn
    run_stages(STAGES)
    print(json.dumps({"canary": fp32_canary(), "capability": torch.backends.cpu.get_cpu_capability()}))


if __name__ == "__main__":
    main()
