"""streaming@<model>-<recipe>-<form>-k<k>: a Realtime streaming package (convert), streamed against transformers'
own streaming (validate), into artifacts/streaming/ with DVC metrics (params: pipeline.streaming, recipes)."""

from voxtral_coreml.encoders.families import family_of_extracted
from voxtral_coreml.encoders.realtime.stream import validate_streaming
from voxtral_coreml.export.calibration import cached_inputs
from voxtral_coreml.export.recipes import Recipe
from voxtral_coreml.pipeline.atomic import atomic_path, write_json_atomic
from voxtral_coreml.pipeline.params import load_params, lookup
from voxtral_coreml.pipeline.paths import extracted_dir, streaming_dir, streaming_metrics_file
from voxtral_coreml.pipeline.runner import run, stage_args


def main() -> None:
    args = stage_args(__doc__, "model", "recipe", "form", "k")
    params, k = load_params(), int(args.k)
    recipe = Recipe.from_config(args.recipe, lookup(params, f"recipes.{args.recipe}"))
    streaming, family = {"form": args.form, "tokens_per_step": k}, family_of_extracted(extracted_dir(args.model))
    with atomic_path(streaming_dir(args.model, args.recipe, args.form, k)) as staging:  # package + manifest, or nothing
        staging.mkdir()
        package = staging / family.package_name(None, streaming)
        build = lookup(params, "build")
        family.convert_package(
            extracted_dir(args.model), package, recipe, model_name=args.model,
            attention=build["attention"], query_chunk=build["query_chunk"], streaming=streaming,
            **cached_inputs(args.model, recipe),
        )  # fmt: skip
        metrics = validate_streaming(
            staging, extracted_dir(args.model), float(lookup(params, f"recipes.{args.recipe}.psnr_gate_db")),
            lookup(params, "validation.backend"), lookup(params, "validation.audio"),
        )  # fmt: skip
    timings = metrics.pop("timings")
    print(f"{args.model}/{args.recipe} {args.form} k={k}: streamed PSNR {metrics['psnr_db']} dB, {timings}")
    entry = {"model": args.model, "recipe": args.recipe, **metrics}
    write_json_atomic(streaming_metrics_file(args.model, args.recipe, args.form, k), entry)


if __name__ == "__main__":
    run(main)
