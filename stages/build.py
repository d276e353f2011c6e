"""build@<model>: the ANE module with the extracted weights, and its parity with transformers (fp32)."""

import argparse

from voxtral_coreml.atomic import atomic_path, write_json_atomic
from voxtral_coreml.params import load_params, lookup
from voxtral_coreml.paths import extracted_dir, parity_file, reference_file
from voxtral_coreml.reference import check_parity, compute_reference, save_reference
from voxtral_coreml.runner import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    model = parser.parse_args().model
    params = load_params()
    build = lookup(params, "build")
    tensors, parity = compute_reference(
        extracted_dir(model), lookup(params, "validation.audio"), build["attention"], build["query_chunk"]
    )
    print(f"{model}: ANE module vs transformers (fp32): {parity}")
    check_parity(model, parity, build["parity_gate_db"])
    with atomic_path(reference_file(model)) as staging:
        save_reference(staging, tensors)
    write_json_atomic(parity_file(model), {"model": model, "attention": build["attention"], **parity})


if __name__ == "__main__":
    run(main)
