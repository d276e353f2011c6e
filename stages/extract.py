"""extract@<model>: stream the audio tower + projector into one canonical safetensors file."""

from voxtral_coreml.pipeline.params import load_params, lookup
from voxtral_coreml.pipeline.paths import checkpoint_dir, extracted_dir
from voxtral_coreml.pipeline.runner import run, stage_args
from voxtral_coreml.sources.download import checkpoint_root, public_source_info
from voxtral_coreml.sources.extract import extract_audio_tower


def main() -> None:
    model = stage_args(__doc__, "model").model
    source = lookup(load_params(), f"models.{model}.source")
    extract_audio_tower(
        checkpoint_root(checkpoint_dir(model)),
        extracted_dir(model),
        layout=source.get("layout", "auto"),
        source=public_source_info(checkpoint_dir(model)),
        family=source.get("family", "auto"),
    )


if __name__ == "__main__":
    run(main)
