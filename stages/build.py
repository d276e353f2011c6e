"""build@<model>: the ANE module with the extracted weights, and its parity with transformers (float64)."""

from voxtral_coreml.encoders.families import family_of_extracted
from voxtral_coreml.encoders.reference import check_parity, save_reference
from voxtral_coreml.pipeline.atomic import atomic_path, write_json_atomic
from voxtral_coreml.pipeline.params import load_params, lookup
from voxtral_coreml.pipeline.paths import extracted_dir, parity_file, reference_file
from voxtral_coreml.pipeline.runner import run, stage_args


def main() -> None:
    model = stage_args(__doc__, "model").model
    params = load_params()
    build = lookup(params, "build")
    tensors, parity = family_of_extracted(extracted_dir(model)).compute_reference(
        extracted_dir(model), lookup(params, "validation.audio"), build["attention"], build["query_chunk"]
    )
    print(f"{model}: ANE module vs transformers (float64): {parity}")
    check_parity(model, parity, build["parity_gate_db"])
    with atomic_path(reference_file(model)) as staging:
        save_reference(staging, tensors)
    write_json_atomic(parity_file(model), {"model": model, "attention": build["attention"], **parity})


if __name__ == "__main__":
    run(main)
