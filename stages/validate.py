"""validate@<model>-<recipe>: run the package, compare with transformers, write DVC metrics."""

from voxtral_coreml.check.validate import load_reference, validate_package
from voxtral_coreml.pipeline.atomic import write_json_atomic
from voxtral_coreml.pipeline.params import load_params, lookup
from voxtral_coreml.pipeline.paths import metrics_file, package_dir, reference_file, timings_file
from voxtral_coreml.pipeline.runner import run, stage_args


def main() -> None:
    args = stage_args(__doc__, "model", "recipe")
    params = load_params()
    metrics, timings = validate_package(
        package_dir(args.model, args.recipe),
        load_reference(reference_file(args.model)),
        float(lookup(params, f"recipes.{args.recipe}.psnr_gate_db")),
        backend=lookup(params, "validation.backend"),
    )
    print(f"{args.model}/{args.recipe}: PSNR {metrics['psnr_db']} dB vs transformers ({metrics['backend']}), {timings}")
    write_json_atomic(metrics_file(args.model, args.recipe), {"model": args.model, "recipe": args.recipe, **metrics})
    write_json_atomic(timings_file(args.model, args.recipe), timings)


if __name__ == "__main__":
    run(main)
