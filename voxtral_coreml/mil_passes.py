"""The MIL pass pipeline of every program this project writes: at conversion, and again when compression
re-converts the program (coremltools' own compression APIs would run the default pipeline instead)."""

from __future__ import annotations


def pass_pipeline():
    import coremltools as ct

    pipeline = ct.PassPipeline.DEFAULT
    # This pass writes fp32 mean/variance constants into the batch_norm it creates, which breaks an fp16 graph
    # (coremltools 9.0); without it the LayerNorm affine stays a mul + add.
    pipeline.remove_passes(["common::fuse_elementwise_to_batchnorm"])
    return pipeline
