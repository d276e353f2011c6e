"""convert-<format>@<model>-<recipe>: the encoder in another export format (coreai) into artifacts/<format>/."""

from voxtral_coreml.encoders.families import family_of_extracted
from voxtral_coreml.export.formats import export_format
from voxtral_coreml.export.recipes import Recipe
from voxtral_coreml.pipeline.atomic import atomic_path
from voxtral_coreml.pipeline.params import load_params, lookup
from voxtral_coreml.pipeline.paths import extracted_dir
from voxtral_coreml.pipeline.runner import run, stage_args


def main() -> None:
    args = stage_args(__doc__, "format", "model", "recipe")
    params = load_params()
    fmt = export_format(args.format, "the format")
    recipe = Recipe.from_config(args.recipe, lookup(params, f"recipes.{args.recipe}"))
    fmt.check_recipe(recipe)
    variant = lookup(params, f"models.{args.model}.variant")
    build = lookup(params, "build")
    family = family_of_extracted(extracted_dir(args.model))
    with atomic_path(fmt.artifacts_dir(args.model, args.recipe)) as staging:  # asset + manifest, or nothing
        staging.mkdir()
        fmt.convert(
            family,
            extracted_dir(args.model),
            staging / fmt.package_name(family, variant),
            recipe,
            model_name=args.model,
            variant=variant,
            attention=build["attention"],
            query_chunk=build["query_chunk"],
            **{option: lookup(params, f"{fmt.name}.{option}") for option in fmt.options},
        )


if __name__ == "__main__":
    run(main)
