"""The MIL pass pipeline of every program this project writes: at conversion, and again when compression
re-converts the program (coremltools' own compression APIs would run the default pipeline instead)."""

from __future__ import annotations


def pass_pipeline():
    import coremltools as ct

    pipeline = ct.PassPipeline.DEFAULT
    # This pass writes fp32 mean/variance constants into the batch_norm it creates, which breaks an fp16 graph
    # (coremltools 9.0); without it the LayerNorm affine stays a mul + add.
    pipeline.remove_passes(["common::fuse_elementwise_to_batchnorm"])
    # This one rewrites in-place state updates and fails (KeyError) on a state written from a slice, as the
    # Realtime step's conv contexts are (coremltools 9.0); it changes nothing in a program without states.
    pipeline.remove_passes(["common::canonicalize_inplace_pattern"])
    return pipeline
