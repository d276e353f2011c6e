"""sensitivity@<model>-<recipe>: a mixed recipe's per-weight sensitivity scan, or a torch-compressed recipe's
calibration (its compressed weights), run once per model and recipe.

Other recipes need neither: their files say so (an empty .safetensors), so every convert entry can depend on its
own files alone.
"""

from voxtral_coreml.encoders.families import family_of_extracted
from voxtral_coreml.export.recipes import Recipe
from voxtral_coreml.export.torch_compress import TORCH_KINDS, save_calibration
from voxtral_coreml.pipeline.atomic import atomic_path, write_json_atomic
from voxtral_coreml.pipeline.params import load_params, lookup
from voxtral_coreml.pipeline.paths import calibration_file, extracted_dir, sensitivity_file
from voxtral_coreml.pipeline.runner import run, stage_args


def main() -> None:
    args = stage_args(__doc__, "model", "recipe")
    params = load_params()
    recipe = Recipe.from_config(args.recipe, lookup(params, f"recipes.{args.recipe}"))
    state, info = {}, {"recipe": recipe.name, "kind": recipe.kind, "calibration": "not needed"}
    if recipe.kind in TORCH_KINDS:
        # jobs: not a DVC param; k-means runs single-threaded per tensor, so the result is the same for any number
        family = family_of_extracted(extracted_dir(args.model))
        state, info = family.calibrate(extracted_dir(args.model), recipe, jobs=lookup(params, "sensitivity.jobs"))
        table = {"recipe": recipe.name, "kind": recipe.kind, "scan": "not needed", "calibration": "see .safetensors"}
    elif not recipe.needs_scan:
        table = {"recipe": recipe.name, "kind": recipe.kind, "scan": "not needed"}
    else:
        from voxtral_coreml.export.sensitivity import scan_sensitivity

        settings = lookup(params, "sensitivity")
        table = scan_sensitivity(
            extracted_dir(args.model),
            recipe,
            frames=settings["frames"],
            audio=lookup(params, "validation.audio"),
            jobs=settings["jobs"],  # not a DVC param: the result is the same for any number of jobs
        )
    with atomic_path(calibration_file(args.model, args.recipe)) as staging:
        save_calibration(staging, state, info)
    write_json_atomic(sensitivity_file(args.model, args.recipe), table)


if __name__ == "__main__":
    run(main)
