"""One simulated machine: the pipeline's float-producing stages for demo-mini, run in this process.

`python float_path.py WORKDIR THREADS MKLDNN` runs, in WORKDIR (params.yaml, artifacts/extracted/demo-mini and the
packages the validations read), the stages whose outputs hold float results: build (reference, parity),
sensitivity (a mixed recipe's table), validate (metrics), mel (package and metrics), report (report.md, chart, plot
data). The caller sets what a process must have before torch loads (ATEN_CPU_CAPABILITY, OMP_NUM_THREADS,
MKL_ENABLE_INSTRUCTIONS); THREADS and MKLDNN (on/off) are set here, in-process. It prints a JSON line with the
sha256 of an fp32 canary (a transformers forward in fp32, the path the old reference took), which shows that the
float path really differs between two runs.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys

import torch

STAGES = (
    ("stages.build", ["demo-mini"]),
    ("stages.sensitivity", ["demo-mini", "mixed"]),
    ("stages.validate", ["demo-mini", "fp16"]),
    ("stages.validate", ["demo-mini", "mixed"]),
    ("stages.mel", ["fp32"]),
    ("stages.report", []),
)


def fp32_canary() -> str:
    """sha256 of transformers' fp32 embeddings of the speech window, features in fp32: the last bits of PyTorch's CPU
    kernels (BLAS, vectorized math, thread split)."""
    from voxtral_coreml.extract import load_extracted
    from voxtral_coreml.features import builtin_speech_clip, load_audio, log_mel_windows
    from voxtral_coreml.reference import TransformersReference

    weights, dims, _ = load_extracted("artifacts/extracted/demo-mini")
    mel = log_mel_windows(load_audio(builtin_speech_clip()))[:1]
    embeddings = TransformersReference({n: w.float() for n, w in weights.items()}, dims).audio_embeddings(mel)
    return hashlib.sha256(mel.numpy().tobytes() + embeddings.numpy().tobytes()).hexdigest()


def main() -> None:
    threads, mkldnn = int(sys.argv[1]), sys.argv[2] == "on"
    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = mkldnn
    for module, args in STAGES:
        sys.argv = [module, *args]
        importlib.import_module(module).main()
    print(json.dumps({"canary": fp32_canary(), "capability": torch.backends.cpu.get_cpu_capability()}))


if __name__ == "__main__":
    main()
