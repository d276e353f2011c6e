"""mel@<precision>: the mel front-end package into artifacts/mel/<precision>/, validated, with DVC metrics."""

from voxtral_coreml.features.mel_package import PACKAGE_NAME, convert_mel_package, validate_mel_package
from voxtral_coreml.pipeline.atomic import atomic_path, write_json_atomic
from voxtral_coreml.pipeline.params import load_params, lookup
from voxtral_coreml.pipeline.paths import mel_metrics_file, mel_package_dir
from voxtral_coreml.pipeline.runner import run, stage_args


def main() -> None:
    args = stage_args(__doc__, "precision")
    params = load_params()
    gate = float(lookup(params, f"mel.psnr_gate_db.{args.precision}"))
    # Package + manifest appear only once they pass the gate.
    with atomic_path(mel_package_dir(args.precision)) as staging:
        staging.mkdir()
        convert_mel_package(staging / PACKAGE_NAME, args.precision, lookup(params, "mel.min_target"))
        metrics = validate_mel_package(
            staging, lookup(params, "validation.audio"), gate, backend=lookup(params, "validation.backend")
        )
    timings = metrics.pop("timings")  # they differ from run to run: DVC metrics hold what a rerun reproduces
    psnr, backend = metrics["psnr_db"], metrics["backend"]
    print(f"mel/{args.precision}: PSNR {psnr} dB vs WhisperFeatureExtractor ({backend}), {timings}")
    write_json_atomic(mel_metrics_file(args.precision), {"precision": args.precision, **metrics})


if __name__ == "__main__":
    run(main)
