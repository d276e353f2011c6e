"""download@<model>: materialize the model's checkpoint from its source (params: models.<model>.source)."""

import argparse

from voxtral_coreml.params import load_params, lookup
from voxtral_coreml.paths import checkpoint_dir
from voxtral_coreml.runner import run
from voxtral_coreml.sources import materialize_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    model = parser.parse_args().model
    source = lookup(load_params(), f"models.{model}.source")
    materialize_checkpoint(model, source, checkpoint_dir(model))


if __name__ == "__main__":
    run(main)
