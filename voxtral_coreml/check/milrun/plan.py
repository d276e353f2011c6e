"""A MIL function compiled to a flat list of kernel calls over numbered slots, with constants folded once."""

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from coremltools.converters.mil.mil import Block, Function, Operation, Program, Var

from voxtral_coreml.pipeline.errors import VoxtralError

from . import ops_constexpr, ops_elementwise, ops_nn, ops_state, ops_tensor
from .args import Kernel, OpArgs
from .dtypes import Coercer, coercer, compute_form, dtype_name, round_fp16, to_runtime, unchanged

KERNELS: dict[str, Kernel] = {
    **ops_elementwise.KERNELS,
    **ops_nn.KERNELS,
    **ops_tensor.KERNELS,
    **ops_constexpr.KERNELS,
    **ops_state.KERNELS,
}
SUPPORTED_OPS: frozenset[str] = frozenset({"const", *KERNELS})

# A slot number, or several for a tuple input (concat's values, einsum's values).
Ref = int | tuple[int, ...]

# Ops that only move values: they run on the stored values (no float64 copy), and fed fp16 (already rounded) values
# their results need no rounding (it is idempotent).
MOVES_VALUES = frozenset(
    {"reshape", "transpose", "expand_dims", "squeeze", "slice_by_index", "slice_by_size", "split", "concat",
     "identity", "tile", "gather", "gather_along_axis", "slice_update", "select", "read_state",
     "coreml_update_state"}
)  # fmt: skip
# The inputs whose values such an op moves (indices, masks and conditions are not among them).
VALUE_INPUTS = ("x", "values", "update", "a", "b", "input", "value")


@dataclass(frozen=True, slots=True)
class Step:
    """One op: read its inputs from slots (in float64 where it computes), run its kernel, give each result its
    declared dtype."""

    op_type: str
    name: str
    kernel: Kernel
    inputs: tuple[tuple[str, Ref], ...]
    outputs: tuple[int, ...]
    coercers: tuple[Coercer, ...]
    computes: bool
    free: tuple[int, ...] = ()

    def run(self, env: list[Any]) -> None:
        read = compute_form if self.computes else unchanged
        args = OpArgs({name: read(env[r]) if type(r) is int else [read(env[i]) for i in r] for name, r in self.inputs})
        result = self.kernel(args)
        results = result if isinstance(result, tuple) else (result,)
        for slot, coerce, value in zip(self.outputs, self.coercers, results, strict=True):
            env[slot] = coerce(value)
        for slot in self.free:
            env[slot] = None


def function_op_types(function: Function) -> Counter[str]:
    """Every op type in one function, counting ops inside nested blocks too."""
    counts: Counter[str] = Counter()

    def visit(block: Block) -> None:
        for op in block.operations:
            counts[op.op_type] += 1
            for inner in op.blocks:
                visit(inner)

    visit(function)
    return counts


def program_op_types(program: Program) -> Counter[str]:
    """Every op type in every function of a program, counting ops inside nested blocks too."""
    return sum((function_op_types(function) for function in program.functions.values()), Counter())


class Plan:
    """The runnable form of one function: slot template with constants filled in, and the steps in order."""

    def __init__(self, function: Function, where: str) -> None:
        self._where = where
        self._slot_of: dict[Var, int] = {}
        self._template: list[Any] = []
        self._constant: set[int] = set()
        self._steps: list[Step] = []
        self._inputs = {name: self._new_slot(var) for name, var in function.inputs.items()}
        for op in function.operations:
            self._compile(op)
        self._outputs = {var.name: self._slot_of[var] for var in function.outputs}
        self._kept = self._keep_used_constants()
        self._steps = self._with_frees()

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        env = list(self._template)
        for name, slot in self._inputs.items():
            env[slot] = feeds[name]
        for step in self._steps:
            try:
                step.run(env)
            except Exception as exc:
                raise VoxtralError(f"{self._where}: op {step.op_type} {step.name!r} failed: {exc}") from exc
        return {name: env[slot] for name, slot in self._outputs.items()}

    def constant(self, name: str) -> torch.Tensor:
        """A materialized constant the steps read (e.g. a decompressed weight), by its MIL var name."""
        if name not in self._kept:
            raise VoxtralError(f"{self._where}: no materialized constant named {name!r}")
        return self._template[self._kept[name]]

    @property
    def peak_live_intermediates(self) -> int:
        """The most op results held at once during a run; small when frees work."""
        inputs = set(self._inputs.values())
        live, peak = 0, 0
        for step in self._steps:
            live += len(step.outputs)
            peak = max(peak, live)
            live -= sum(1 for slot in step.free if slot not in inputs)
        return peak

    def _new_slot(self, var: Var, value: Any = None) -> int:
        self._slot_of[var] = len(self._template)
        self._template.append(value)
        return self._slot_of[var]

    def _ref(self, value: Var | list[Var] | tuple[Var, ...]) -> Ref:
        if isinstance(value, list | tuple):
            return tuple(self._slot_of[v] for v in value)
        return self._slot_of[value]

    def _compile(self, op: Operation) -> None:
        if op.op_type == "const":
            self._constant.add(self._new_slot(op.outputs[0], to_runtime(op.outputs[0].val)))
            return
        kernel = KERNELS.get(op.op_type)
        if kernel is None:
            raise VoxtralError(
                f"{self._where}: op type {op.op_type!r} (op {op.name!r}) is not supported by the MIL runtime"
            )
        where = f"{self._where}: op {op.op_type} {op.name!r}"
        step = Step(
            op_type=op.op_type,
            name=op.name,
            kernel=kernel,
            inputs=tuple((name, self._ref(var)) for name, var in op.inputs.items()),
            outputs=tuple(self._new_slot(var) for var in op.outputs),
            coercers=tuple(coercer(dtype_name(var.dtype), where, _rounding(op)) for var in op.outputs),
            computes=op.op_type not in MOVES_VALUES,
        )
        if all(slot in self._constant for _, ref in step.inputs for slot in _slots(ref)):
            self._fold(step, where)
        else:
            self._steps.append(step)

    def _fold(self, step: Step, where: str) -> None:
        """Run an op whose inputs are all constant (constexpr_* weights above all) once, now."""
        try:
            with torch.inference_mode():
                step.run(self._template)
        except Exception as exc:
            raise VoxtralError(f"{where}: evaluating it at load time failed: {exc}") from exc
        self._constant.update(step.outputs)

    def _keep_used_constants(self) -> dict[str, int]:
        """Drop constants only folding needed (packed indices, LUTs, ...); name the ones that stay."""
        used = {slot for step in self._steps for _, ref in step.inputs for slot in _slots(ref)}
        used.update(self._outputs.values())
        for slot in self._constant - used:
            self._template[slot] = None
        kept = self._constant & used
        return {var.name: slot for var, slot in self._slot_of.items() if slot in kept}

    def _with_frees(self) -> list[Step]:
        """Attach to each step the slots no later step reads, so a run holds only live intermediates."""
        last_use: dict[int, int] = {}
        for index, step in enumerate(self._steps):
            for slot in step.outputs:
                last_use[slot] = index
            for _, ref in step.inputs:
                for slot in _slots(ref):
                    last_use[slot] = index
        for slot in self._inputs.values():
            last_use.setdefault(slot, 0)
        keep = self._constant | set(self._outputs.values())
        frees: dict[int, list[int]] = {}
        for slot, index in last_use.items():
            if slot not in keep:
                frees.setdefault(index, []).append(slot)
        return [
            Step(s.op_type, s.name, s.kernel, s.inputs, s.outputs, s.coercers, s.computes, tuple(frees.get(i, ())))
            for i, s in enumerate(self._steps)
        ]


def _slots(ref: Ref) -> tuple[int, ...]:
    return (ref,) if isinstance(ref, int) else ref


def _rounding(op: Operation) -> Coercer:
    """How an fp16 result of `op` is rounded: not at all (moved fp16 values), or to the nearest fp16."""
    data = [op.inputs[name] for name in VALUE_INPUTS if name in op.inputs]
    data_vars = [v for value in data for v in (value if isinstance(value, list | tuple) else [value])]
    if op.op_type in MOVES_VALUES and data_vars and all(dtype_name(v.dtype) == "fp16" for v in data_vars):
        return unchanged
    return round_fp16
