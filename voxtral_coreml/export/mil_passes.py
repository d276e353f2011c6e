"""The MIL pass pipelines of every program this project writes: at conversion, and after compression (coremltools'
own compression APIs would run the default pipeline again instead)."""

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


def compressed_pipeline():
    """After a compression pass: the program was optimized when it was converted, and the pass only turned weight
    constants into constexpr ops, so only what it may leave behind is cleaned up (equal small constants such as
    zero points shared, unused ones dropped). The default pipeline again would give the same ops, minutes later at
    full size."""
    import coremltools as ct

    return ct.PassPipeline(
        pass_names=["common::dead_code_elimination", "common::const_deduplication"], pipeline_name="compressed"
    )
