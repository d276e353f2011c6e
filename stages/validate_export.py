"""validate-<format>@<model>-<recipe>: run a package of another export format with its own runtime, compare
with transformers, write DVC metrics."""

from voxtral_coreml.check.validate import load_reference, validate_package
from voxtral_coreml.export.formats import export_format
from voxtral_coreml.pipeline.atomic import write_json_atomic
from voxtral_coreml.pipeline.params import load_params, lookup
from voxtral_coreml.pipeline.paths import export_timings_file, reference_file
from voxtral_coreml.pipeline.runner import run, stage_args


def main() -> None:
    args = stage_args(__doc__, "format", "model", "recipe")
    params = load_params()
    fmt = export_format(args.format, "the format")
    metrics, timings = validate_package(
        fmt.artifacts_dir(args.model, args.recipe),
        load_reference(reference_file(args.model)),
        float(lookup(params, f"recipes.{args.recipe}.psnr_gate_db")),
        backend="auto",  # the format's own runtime
    )
    where = f"{args.format}/{args.model}/{args.recipe}"
    print(f"{where}: PSNR {metrics['psnr_db']} dB vs transformers ({metrics['backend']}), {timings}")
    record = {"format": args.format, "model": args.model, "recipe": args.recipe, **metrics}
    write_json_atomic(fmt.metrics_path(args.model, args.recipe), record)
    write_json_atomic(export_timings_file(args.format, args.model, args.recipe), timings)


if __name__ == "__main__":
    run(main)
