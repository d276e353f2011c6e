"""MilModel: one function of a loaded ML program, ready to predict on CPU with torch kernels; MilState: the
buffers of a stateful function (Core ML's MLState), kept as torch tensors across predictions."""

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from coremltools.converters.mil.mil import Function, Program, Var, types
from coremltools.converters.mil.mil.types.symbolic import is_symbolic

from voxtral_coreml.export.package_info import default_function
from voxtral_coreml.pipeline.errors import VoxtralError

from .dtypes import IO_NUMPY, dtype_name
from .ops_state import StateBuffer
from .package import read_package
from .plan import Plan, function_op_types

MAIN = "main"


@dataclass(frozen=True)
class TensorInfo:
    """A model input, output or state as declared: shape (None for a flexible dim) and MIL dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str


def _info(name: str, var: Var, where: str) -> TensorInfo:
    dtype = dtype_name(var.dtype)
    if dtype not in IO_NUMPY:
        raise VoxtralError(f"{where}: {name!r} has dtype {dtype}; the MIL runtime handles {sorted(IO_NUMPY)}")
    shape = tuple(None if is_symbolic(d) else int(d) for d in var.shape)
    return TensorInfo(name, shape, dtype)


def _array(info: TensorInfo, value: Any, what: str, where: str) -> torch.Tensor:
    """A caller's array for `info`, checked for dtype and shape, as the runtime holds it (a copy)."""
    expected = np.dtype(IO_NUMPY[info.dtype])
    if not isinstance(value, np.ndarray) or value.dtype != expected:
        got = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
        raise VoxtralError(f"{where}: {what} {info.name!r} must be a {expected} array ({info.dtype}), got {got}")
    if len(value.shape) != len(info.shape) or any(
        want is not None and want != got for want, got in zip(info.shape, value.shape, strict=False)
    ):
        raise VoxtralError(f"{where}: {what} {info.name!r} has shape {value.shape}, expected {info.shape}")
    tensor = torch.from_numpy(np.array(value))
    return tensor.float() if info.dtype == "fp16" else tensor


class MilState:
    """A stateful function's buffers, zero-initialized as Core ML's makeState() allocates them.

    Pass it to every predict of the stream; read_state / write_state mirror coremltools' MLState.
    """

    def __init__(self, infos: tuple[TensorInfo, ...], where: str) -> None:
        self.infos = infos
        self._where = where
        self._buffers = {info.name: StateBuffer(torch.zeros(info.shape)) for info in infos}

    def read_state(self, name: str) -> np.ndarray:
        """A copy of the state's current contents, as float16."""
        return self._buffers[self._info(name).name].value.numpy().astype(np.float16)

    def write_state(self, name: str, value: np.ndarray) -> None:
        """Replace the state's contents (a float16 array of the state's shape)."""
        info = self._info(name)
        self._buffers[name] = StateBuffer(_array(info, value, "state", self._where))

    def _info(self, name: str) -> TensorInfo:
        for info in self.infos:
            if info.name == name:
                return info
        raise VoxtralError(f"{self._where}: no state named {name!r}; states: {[i.name for i in self.infos]}")

    def working_copy(self) -> dict[str, StateBuffer]:
        """Buffers a predict may write to; commit() makes them the state's, so a failed predict changes nothing."""
        return {name: StateBuffer(buffer.value) for name, buffer in self._buffers.items()}

    def commit(self, buffers: dict[str, StateBuffer]) -> None:
        self._buffers = buffers


class MilModel:
    """One function of the program, its materialized constants, declared I/O and states, deployment target."""

    def __init__(self, program: Program, source: str, spec_version: int | None = None, function: str = MAIN) -> None:
        if function not in program.functions:
            raise VoxtralError(
                f"{source}: the ML program has no {function!r} function (it has {sorted(program.functions)})"
            )
        self.function: Function = program.functions[function]
        self.function_name = function
        self.program = program
        self.source = source
        self.spec_version = spec_version
        self.deployment_target: str = self.function.opset_version.name
        declared = self.function.inputs.items()
        self.inputs = tuple(_info(n, v, source) for n, v in declared if not types.is_state(v.sym_type))
        self.states = tuple(_info(n, v, source) for n, v in declared if types.is_state(v.sym_type))
        self.outputs = tuple(_info(var.name, var, source) for var in self.function.outputs)
        self._plan = Plan(self.function, source)

    def make_state(self) -> MilState:
        """Fresh, zeroed buffers for this function's states (empty for a stateless function)."""
        return MilState(self.states, f"{self.source} ({self.function_name})")

    def predict(self, inputs: dict[str, np.ndarray], state: MilState | None = None) -> dict[str, np.ndarray]:
        """Run the function; outputs come back in their declared dtype (fp32 outputs as float32 arrays).

        A stateful function reads and updates `state` (from make_state()); the update is kept only when the
        whole prediction succeeds.
        """
        unknown = sorted(set(inputs) - {info.name for info in self.inputs})
        if unknown:
            raise VoxtralError(f"{self.source}: unknown inputs {unknown}; expected {self._input_names()}")
        feeds: dict[str, Any] = {info.name: self._feed(info, inputs) for info in self.inputs}
        buffers = self._state_buffers(state)
        feeds.update(buffers)
        with torch.inference_mode():
            results = self._plan.run(feeds)
        if state is not None:
            state.commit(buffers)
        # A copy, so no output aliases an input array, a constant or a state.
        return {out.name: np.array(results[out.name].numpy(), IO_NUMPY[out.dtype]) for out in self.outputs}

    def constant(self, name: str) -> np.ndarray:
        """A materialized constant the ops read (e.g. a decompressed weight), by MIL var name, as stored."""
        return self._plan.constant(name).numpy()

    @property
    def peak_live_intermediates(self) -> int:
        """The most op results a predict holds at once (intermediates are freed after their last use)."""
        return self._plan.peak_live_intermediates

    def _state_buffers(self, state: MilState | None) -> dict[str, StateBuffer]:
        if state is None:
            if self.states:
                raise VoxtralError(
                    f"{self.source}: function {self.function_name!r} keeps states {[s.name for s in self.states]}:"
                    " pass state=model.make_state()"
                )
            return {}
        if state.infos != self.states:
            raise VoxtralError(
                f"{self.source}: the state passed holds {[(i.name, i.shape) for i in state.infos]}, function"
                f" {self.function_name!r} keeps {[(i.name, i.shape) for i in self.states]}: use its make_state()"
            )
        return state.working_copy()

    def _input_names(self) -> list[str]:
        return [info.name for info in self.inputs]

    def _feed(self, info: TensorInfo, inputs: dict[str, Any]) -> torch.Tensor:
        if info.name not in inputs:
            raise VoxtralError(f"{self.source}: missing input {info.name!r}; expected {self._input_names()}")
        return _array(info, inputs[info.name], "input", self.source)


def load_package(path: str | Path, function_name: str | None = None) -> MilModel:
    """Load an .mlpackage: rebuild its program, fold its constants and weight decompression once.

    A multifunction package runs the function named (by default the one its spec names as default).
    """
    loaded = read_package(path)
    function = function_name or default_function(loaded.spec)
    return MilModel(loaded.program, str(path), loaded.spec.specificationVersion, function)


def load_program(program: Program, function_name: str = MAIN) -> MilModel:
    """Wrap an in-memory MIL program (e.g. from the MIL builder) without saving it."""
    return MilModel(program, "<MIL program>", function=function_name)


def op_counts(model: MilModel) -> Counter[str]:
    """Op types of the model's function with how often each occurs, const ops left out."""
    counts = function_op_types(model.function)
    del counts["const"]
    return counts
