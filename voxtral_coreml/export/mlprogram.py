"""torch.export + ct.convert with this project's settings: every program it converts goes through here."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .mil_passes import pass_pipeline


def convert_module(module: nn.Module, examples: tuple, inputs: list, outputs: list, target: str, states=None):
    """`module` traced on `examples` (fake tensors: no forward pass on the weights) and converted to an fp16
    mlprogram for `target` (an MLModel over a temporary package; not loaded: loading compiles, which needs macOS)."""
    import coremltools as ct

    with torch.no_grad():
        exported = torch.export.export(module, examples).run_decompositions({})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # coremltools warns about the untested torch version on every call
        return ct.convert(
            exported,
            inputs=inputs,
            outputs=outputs,
            states=states,
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16,
            minimum_deployment_target=getattr(ct.target, target),
            pass_pipeline=pass_pipeline(),
            skip_model_load=True,
        )


def convert_stage(
    module: nn.Module, example: torch.Tensor, input_name: str, input_dtype, output_name: str, output_dtype, target: str
):
    """A one-tensor module: `input_name` of `example`'s shape -> `output_name`, in the given numpy dtypes."""
    import coremltools as ct

    inputs = [ct.TensorType(name=input_name, shape=tuple(example.shape), dtype=input_dtype)]
    return convert_module(module, (example,), inputs, [ct.TensorType(name=output_name, dtype=output_dtype)], target)
