"""MilModel: a loaded ML program's main function, ready to predict on CPU with torch kernels."""

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from coremltools.converters.mil.mil import Program, Var
from coremltools.converters.mil.mil.types.symbolic import is_symbolic

from voxtral_coreml.errors import VoxtralError

from .dtypes import IO_NUMPY, dtype_name
from .package import read_package
from .plan import Plan, program_op_types


@dataclass(frozen=True)
class TensorInfo:
    """A model input or output as declared: shape (None for a flexible dim) and MIL dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str


def _info(name: str, var: Var, where: str) -> TensorInfo:
    dtype = dtype_name(var.dtype)
    if dtype not in IO_NUMPY:
        raise VoxtralError(f"{where}: {name!r} has dtype {dtype}; the MIL runtime handles {sorted(IO_NUMPY)}")
    shape = tuple(None if is_symbolic(d) else int(d) for d in var.shape)
    return TensorInfo(name, shape, dtype)


class MilModel:
    """The program, its materialized constants, its declared I/O, and its deployment target."""

    def __init__(self, program: Program, source: str, spec_version: int | None = None) -> None:
        if "main" not in program.functions:
            raise VoxtralError(f"{source}: the ML program has no 'main' function")
        main = program.functions["main"]
        self.program = program
        self.source = source
        self.spec_version = spec_version
        self.deployment_target: str = main.opset_version.name
        self.inputs = tuple(_info(name, var, source) for name, var in main.inputs.items())
        self.outputs = tuple(_info(var.name, var, source) for var in main.outputs)
        self._plan = Plan(main, source)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run main; outputs come back in their declared dtype (fp32 outputs as float32 arrays)."""
        unknown = sorted(set(inputs) - {info.name for info in self.inputs})
        if unknown:
            raise VoxtralError(f"{self.source}: unknown inputs {unknown}; expected {self._input_names()}")
        feeds = {info.name: self._feed(info, inputs) for info in self.inputs}
        with torch.inference_mode():
            results = self._plan.run(feeds)
        # A copy, so no output aliases an input array or a constant.
        return {out.name: np.array(results[out.name].numpy(), IO_NUMPY[out.dtype]) for out in self.outputs}

    def constant(self, name: str) -> np.ndarray:
        """A materialized constant the ops read (e.g. a decompressed weight), by MIL var name, as stored."""
        return self._plan.constant(name).numpy()

    @property
    def peak_live_intermediates(self) -> int:
        """The most op results a predict holds at once (intermediates are freed after their last use)."""
        return self._plan.peak_live_intermediates

    def _input_names(self) -> list[str]:
        return [info.name for info in self.inputs]

    def _feed(self, info: TensorInfo, inputs: dict[str, Any]) -> torch.Tensor:
        if info.name not in inputs:
            raise VoxtralError(f"{self.source}: missing input {info.name!r}; expected {self._input_names()}")
        array = inputs[info.name]
        expected = np.dtype(IO_NUMPY[info.dtype])
        if not isinstance(array, np.ndarray) or array.dtype != expected:
            got = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
            raise VoxtralError(
                f"{self.source}: input {info.name!r} must be a {expected} array ({info.dtype}), got {got}"
            )
        if len(array.shape) != len(info.shape) or any(
            want is not None and want != got for want, got in zip(info.shape, array.shape, strict=False)
        ):
            raise VoxtralError(f"{self.source}: input {info.name!r} has shape {array.shape}, expected {info.shape}")
        tensor = torch.from_numpy(np.array(array))
        return tensor.float() if info.dtype == "fp16" else tensor


def load_package(path: str | Path) -> MilModel:
    """Load an .mlpackage: rebuild its program, fold its constants and weight decompression once."""
    loaded = read_package(path)
    return MilModel(loaded.program, str(path), loaded.spec.specificationVersion)


def load_program(program: Program) -> MilModel:
    """Wrap an in-memory MIL program (e.g. from the MIL builder) without saving it."""
    return MilModel(program, "<MIL program>")


def op_counts(model: MilModel) -> Counter[str]:
    """Op types of the model's program with how often each occurs, const ops left out."""
    counts = program_op_types(model.program)
    del counts["const"]
    return counts
