"""sensitivity@<model>-<recipe>: a mixed recipe's per-weight sensitivity scan, run once per model and recipe.

Other recipes need no scan: their file says so, so every convert entry can depend on its own file alone.
"""

from voxtral_coreml.atomic import write_json_atomic
from voxtral_coreml.params import load_params, lookup
from voxtral_coreml.paths import extracted_dir, sensitivity_file
from voxtral_coreml.recipes import Recipe
from voxtral_coreml.runner import run, stage_args


def main() -> None:
    args = stage_args(__doc__, "model", "recipe")
    params = load_params()
    recipe = Recipe.from_config(args.recipe, lookup(params, f"recipes.{args.recipe}"))
    if recipe.kind != "mixed":
        table = {"recipe": recipe.name, "kind": recipe.kind, "scan": "not needed"}
    else:
        from voxtral_coreml.sensitivity import scan_sensitivity

        settings = lookup(params, "sensitivity")
        table = scan_sensitivity(
            extracted_dir(args.model),
            recipe,
            frames=settings["frames"],
            audio=lookup(params, "validation.audio"),
            jobs=settings["jobs"],  # not a DVC param: the result is the same for any number of jobs
        )
    write_json_atomic(sensitivity_file(args.model, args.recipe), table)


if __name__ == "__main__":
    run(main)
