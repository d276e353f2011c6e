"""convert@<model>-<recipe>: torch.export + ct.convert into artifacts/packages/<model>/<recipe>/."""

from voxtral_coreml.encoders.families import family_of_extracted
from voxtral_coreml.export.calibration import cached_inputs
from voxtral_coreml.export.recipes import Recipe
from voxtral_coreml.pipeline.atomic import atomic_path
from voxtral_coreml.pipeline.params import load_params, lookup
from voxtral_coreml.pipeline.paths import extracted_dir, package_dir
from voxtral_coreml.pipeline.runner import run, stage_args


def main() -> None:
    args = stage_args(__doc__, "model", "recipe")
    params = load_params()
    recipe = Recipe.from_config(args.recipe, lookup(params, f"recipes.{args.recipe}"))
    variant = lookup(params, f"models.{args.model}.variant")
    build = lookup(params, "build")
    family = family_of_extracted(extracted_dir(args.model))
    with atomic_path(package_dir(args.model, args.recipe)) as staging:  # package + manifest, or nothing
        staging.mkdir()
        family.convert_package(
            extracted_dir(args.model),
            staging / family.package_name(variant),
            recipe,
            model_name=args.model,
            variant=variant,
            attention=build["attention"],
            query_chunk=build["query_chunk"],
            **cached_inputs(args.model, recipe),  # the sensitivity stage's scan or calibration, if the recipe has one
        )


if __name__ == "__main__":
    run(main)
