"""download@<model>: materialize the model's checkpoint from its source (params: models.<model>.source)."""

from voxtral_coreml.pipeline.params import load_params, lookup
from voxtral_coreml.pipeline.paths import checkpoint_dir
from voxtral_coreml.pipeline.runner import run, stage_args
from voxtral_coreml.sources.download import materialize_checkpoint


def main() -> None:
    model = stage_args(__doc__, "model").model
    source = lookup(load_params(), f"models.{model}.source")
    materialize_checkpoint(model, source, checkpoint_dir(model))


if __name__ == "__main__":
    run(main)
