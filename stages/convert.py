"""convert@<model>-<recipe>: torch.export + ct.convert into artifacts/packages/<model>/<recipe>/."""

from voxtral_coreml.encoders.families import family_of_extracted
from voxtral_coreml.export.recipes import Recipe
from voxtral_coreml.export.torch_compress import TORCH_KINDS, load_calibration
from voxtral_coreml.pipeline.atomic import atomic_path
from voxtral_coreml.pipeline.params import load_params, lookup
from voxtral_coreml.pipeline.paths import calibration_file, extracted_dir, package_dir, sensitivity_file
from voxtral_coreml.pipeline.runner import run, stage_args
from voxtral_coreml.sources.layouts import read_json


def main() -> None:
    args = stage_args(__doc__, "model", "recipe")
    params = load_params()
    recipe = Recipe.from_config(args.recipe, lookup(params, f"recipes.{args.recipe}"))
    variant = lookup(params, f"models.{args.model}.variant")
    sensitivity = read_json(sensitivity_file(args.model, args.recipe)) if recipe.kind == "mixed" else None
    calibrated = load_calibration(calibration_file(args.model, args.recipe)) if recipe.kind in TORCH_KINDS else None
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
            sensitivity=sensitivity,
            calibrated=calibrated,
        )


if __name__ == "__main__":
    run(main)
