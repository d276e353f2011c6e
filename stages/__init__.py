"""One thin script per DVC stage: read a slice of params.yaml, call the library, write the outputs."""
