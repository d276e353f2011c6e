"""What a saved package is, read from its spec alone (works on any OS, no Core ML needed)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from voxtral_coreml.pipeline.errors import VoxtralError

# The spec version each deployment target writes.
SPEC_VERSION = {"iOS16": 7, "iOS17": 8, "iOS18": 9}
SPEC_FILE = Path("Data") / "com.apple.CoreML" / "model.mlmodel"


def _array_description(feature) -> dict[str, object]:
    from coremltools.proto.FeatureTypes_pb2 import ArrayFeatureType

    array = feature.type.multiArrayType
    dtype = ArrayFeatureType.ArrayDataType.Name(array.dataType).lower()  # FLOAT32 -> float32
    return {"name": feature.name, "shape": list(array.shape), "dtype": dtype}


def _state_description(feature) -> dict[str, object]:
    """A state's name, shape and dtype (always float16 in Core ML), and the bytes the app's MLState holds."""
    import numpy as np
    from coremltools.proto.FeatureTypes_pb2 import ArrayFeatureType

    array = feature.type.stateType.arrayType
    dtype = ArrayFeatureType.ArrayDataType.Name(array.dataType).lower()
    shape = list(array.shape)
    return {"name": feature.name, "shape": shape, "dtype": dtype, "bytes": math.prod(shape) * np.dtype(dtype).itemsize}


def default_function(spec) -> str:
    """The function an app gets without naming one: the spec's default in a multifunction package, else main."""
    return spec.description.defaultFunctionName or "main"


def _function_structure(description, function) -> dict[str, object]:
    """One function's I/O, states and op inventory (description: the spec's, or a multifunction entry)."""
    operations = function.block_specializations[function.opset].operations
    ops = Counter(op.type for op in operations if op.type != "const")
    return {
        "inputs": [_array_description(f) for f in description.input],
        "outputs": [_array_description(f) for f in description.output],
        "states": [_state_description(f) for f in description.state],
        "ops": dict(sorted(ops.items())),
    }


def package_structure(package: Path) -> dict[str, object]:
    """I/O, states, spec version and the op inventory of the default function, read from the package's spec
    (works on any OS); a multifunction package adds its default function's name and every function's structure."""
    import coremltools as ct

    spec_path = package / SPEC_FILE
    if not spec_path.is_file():
        raise VoxtralError(f"{package}: missing {spec_path.relative_to(package)}")
    try:
        spec = ct.utils.load_spec(str(package))
    except Exception as e:  # protobuf raises several types for damaged bytes
        raise VoxtralError(f"{package}: the model spec cannot be read ({type(e).__name__}: {e})") from None
    if not spec.HasField("mlProgram"):
        raise VoxtralError(f"{package}: not an mlprogram")
    default = default_function(spec)
    if default not in spec.mlProgram.functions:
        raise VoxtralError(f"{package}: the ML program has no {default!r} function")
    described = {f.name: f for f in spec.description.functions} or {default: spec.description}
    missing = sorted(set(described) - set(spec.mlProgram.functions))
    if missing:
        raise VoxtralError(f"{package}: the spec describes functions {missing} its ML program lacks")
    functions = {name: _function_structure(described[name], spec.mlProgram.functions[name]) for name in described}
    structure: dict[str, object] = {**functions[default], "spec_version": spec.specificationVersion}
    if spec.description.functions:
        structure.update(default_function=default, functions=functions)
    return structure


ATTENTION_OPS = frozenset({"einsum", "matmul", "softmax"})
LAYOUT_OPS = frozenset({"transpose", "reshape", "expand_dims", "squeeze"})
HEAD_OPS = frozenset({"split", "concat"})  # cutting q, k, v into heads and joining them back


def _tensor(value_type) -> tuple[str, list[int]]:
    from coremltools.proto.MIL_pb2 import DataType

    tensor = value_type.tensorType
    return DataType.Name(tensor.dataType).lower(), [d.constant.size for d in tensor.dimensions]


def _immediate(op) -> object:
    """A const op's small value (a string or ints), or None for blob-stored weights."""
    value = op.attributes["val"]
    if not value.HasField("immediateValue"):
        return None
    tensor = value.immediateValue.tensor
    if tensor.HasField("strings"):
        return list(tensor.strings.values)
    return list(tensor.ints.values) if tensor.HasField("ints") else None


class _Graph:
    """The default function's ops with their outputs' types, producers and consumers."""

    def __init__(self, spec) -> None:
        main = spec.mlProgram.functions[default_function(spec)]
        self.ops = list(main.block_specializations[main.opset].operations)
        self.types = {i.name: _tensor(i.type) for i in main.inputs}
        self.producer = {}
        self.consumers: dict[str, list] = {}
        for op in self.ops:
            for out in op.outputs:
                self.types[out.name] = _tensor(out.type)
                self.producer[out.name] = op
            for argument in op.inputs.values():
                for arg in argument.arguments:
                    self.consumers.setdefault(arg.name, []).append(op)

    def input_names(self, op, key: str) -> list[str]:
        return [a.name for a in op.inputs[key].arguments] if key in op.inputs else []

    def const_value(self, op, key: str) -> object:
        names = self.input_names(op, key)
        producer = self.producer.get(names[0]) if names else None
        return _immediate(producer) if producer is not None and producer.type == "const" else None

    def neighbours(self, op) -> list:
        ups = [self.producer[n] for arg in op.inputs.values() for n in (a.name for a in arg.arguments)
               if n in self.producer]  # fmt: skip
        downs = [c for out in op.outputs for c in self.consumers.get(out.name, [])]
        return ups + downs


def _matrix_flops(graph: _Graph, op) -> int:
    """Multiply-adds x 2 of the ops that do the arithmetic: conv, einsum, matmul, linear."""
    if op.type not in ("conv", "matmul", "linear", "einsum"):
        return 0  # (write_state, for one, has no outputs at all)
    out_numel = math.prod(graph.types[op.outputs[0].name][1])
    if op.type == "conv":
        weight = graph.types[graph.input_names(op, "weight")[0]][1]
        return 2 * out_numel * math.prod(weight[1:])
    if op.type in ("matmul", "linear"):
        x = graph.types[graph.input_names(op, "x")[0]][1]
        transposed = graph.const_value(op, "transpose_x") == [1]
        return 2 * out_numel * (x[-2] if transposed else x[-1])
    equation = graph.const_value(op, "equation")  # einsum
    values = graph.input_names(op, "values")
    if not equation or len(values) != 2:
        return 0
    inputs, output = str(equation[0]).replace(" ", "").split("->")
    sizes = {}
    for letters, name in zip(inputs.split(","), values, strict=True):
        sizes.update(zip(letters, graph.types[name][1], strict=True))
    contracted = [size for letter, size in sizes.items() if letter not in output]
    return 2 * out_numel * math.prod(contracted)


def _inside_attention(graph: _Graph) -> set[str]:
    """Layout ops connected to an attention op through layout and head ops only: part of the attention."""
    inside: set[str] = set()
    frontier = [op for op in graph.ops if op.type in ATTENTION_OPS]
    seen = {op.outputs[0].name for op in frontier}
    while frontier:
        op = frontier.pop()
        for other in graph.neighbours(op):
            key = other.outputs[0].name
            if other.type in LAYOUT_OPS | HEAD_OPS and key not in seen:
                seen.add(key)
                inside.add(key)
                frontier.append(other)
    return inside


def ane_report(package: Path) -> dict[str, object]:
    """What decides how well a package suits the Neural Engine, read from its spec (no weights loaded)."""
    import coremltools as ct

    structure = package_structure(package)  # validates the package first
    graph = _Graph(ct.utils.load_spec(str(package)))
    compute = [op for op in graph.ops if op.type != "const" and op.outputs]  # write_state has no output
    inside = _inside_attention(graph)
    layout_outside = Counter(op.type for op in compute if op.type in LAYOUT_OPS and op.outputs[0].name not in inside)
    fp32 = Counter(op.type for op in compute if any(graph.types[o.name][0] == "float32" for o in op.outputs))
    high_rank = sum(1 for op in compute if any(len(graph.types[o.name][1]) > 4 for o in op.outputs))
    weights = package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    return {
        "ops_total": sum(structure["ops"].values()),
        "ops": structure["ops"],
        "layout_ops_outside_attention": dict(sorted(layout_outside.items())),
        "ops_with_rank_over_4": high_rank,
        "fp32_ops": dict(sorted(fp32.items())),
        "gflops_per_window": round(sum(_matrix_flops(graph, op) for op in compute) / 1e9, 3),
        "weight_bytes": weights.stat().st_size if weights.is_file() else 0,
    }
