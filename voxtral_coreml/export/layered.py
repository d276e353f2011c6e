"""Layer by layer: an encoder's Core ML program from three small conversions, its weights written a layer at a time.

ct.convert holds the whole program in memory, every weight and op, and runs each MIL pass over all of it: its time
and peak memory grow with the model. An encoder's layers are one program with different weights. Here the stem, the
head and one layer are converted on their own, the layer with random weights: the constants equal to one of its
parameters byte for byte are the layer's weights; the others (RoPE tables, masks, shapes) are stored once. The
package's program is then the stem, N copies of the layer and the head, each copy's weights taken from its own layer
while the weight file is written.

What it needs from a family: a module whose `stages()` are stem, each layer and head as one-tensor functions, built
from canonical weights (`*.layers.N.*` names) and dims (`n_layers`), as every family's offline module is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from voxtral_coreml.pipeline.errors import VoxtralError

from .mlprogram import convert_stage

log = logging.getLogger(__name__)

LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")  # canonical names and module state dict keys
PROBE_SEED = 1  # of the random weights the layer template is converted with
STEM_OUT, LAYER_OUT = "stem_output", "layer_output"  # the stage programs' fp16 boundaries, internal names
WEIGHTS_FILE = "weight.bin"

# (weights, dims) -> a family's offline module (build_ane_encoder, build_offline_encoder with the build settings)
BuildModule = Callable[[dict[str, torch.Tensor], Any], nn.Module]


def outside_layers(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The stem's and head's weights (read once from a LazyWeights)."""
    return {name: weights[name] for name in weights if LAYER_KEY.search(name) is None}


def one_layer(weights: Mapping[str, torch.Tensor], layer: int, outside: dict[str, torch.Tensor]) -> dict:
    """`outside` (the stem's and head's weights) and layer `layer`'s, renumbered 0: the weights of a one-layer
    encoder (only the layer's are read from a LazyWeights)."""
    picked = dict(outside)
    for name in weights:
        found = LAYER_KEY.search(name)
        if found is not None and int(found.group(1)) == layer:
            picked[f"{name[: found.start(1)]}0{name[found.end(1) :]}"] = weights[name]
    return picked


def probe(weights: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The one-layer weights with the layer's replaced by random ones: every tensor's bytes unique."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(w.shape, generator=generator) * 0.02).to(w.dtype) if LAYER_KEY.search(name) else w
        for name, w in weights.items()
    }


class StageModule(nn.Module):
    """Stage `index` of a module's `stages()` (stem, a layer, head) as a module torch.export traces."""

    def __init__(self, model: nn.Module, index: int) -> None:
        super().__init__()
        self.model = model
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.stages()[self.index](x)


@dataclass
class Part:
    """A converted stage: its program's block, the spec around it and its weight file (in the temporary package of
    `mlmodel`, which removes it when collected)."""

    mlmodel: Any
    spec: Any
    weights: Path

    @property
    def block(self):
        function = self.spec.mlProgram.functions["main"]
        return function.block_specializations[function.opset]

    @property
    def input_name(self) -> str:
        return self.spec.mlProgram.functions["main"].inputs[0].name


def _part(mlmodel) -> Part:
    return Part(mlmodel, mlmodel.get_spec(), Path(mlmodel.weights_dir) / WEIGHTS_FILE)


# MIL_pb2.DataType value -> (BlobReader method, BlobWriter method, the numpy dtype they take)
BLOB_IO = {
    10: ("read_fp16_data", "write_fp16_data", np.uint16),  # FLOAT16, as its bits
    11: ("read_float_data", "write_float_data", np.float32),  # FLOAT32
    21: ("read_int8_data", "write_int8_data", np.int8),  # INT8
    23: ("read_int32_data", "write_int32_data", np.int32),  # INT32
    31: ("read_uint8_data", "write_uint8_data", np.uint8),  # UINT8
}


def _blob_io(value, where: str) -> tuple[str, str, type]:
    data_type = value.type.tensorType.dataType
    if data_type not in BLOB_IO:
        raise VoxtralError(f"layered conversion: constant {where} has data type {data_type}, which it cannot copy")
    return BLOB_IO[data_type]


class Readers:
    """One BlobReader per weight file."""

    def __init__(self) -> None:
        self._open: dict[Path, Any] = {}

    def read(self, path: Path, value, where: str) -> np.ndarray:
        from coremltools.libmilstoragepython import _BlobStorageReader

        if path not in self._open:
            self._open[path] = _BlobStorageReader(str(path))
        reader, _, _ = _blob_io(value, where)
        return getattr(self._open[path], reader)(value.blobFileValue.offset)


def _const_value(op):
    return op.attributes["val"]


def _op_name(op) -> str:
    return op.attributes["name"].immediateValue.tensor.strings.values[0]


def _bytes(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().contiguous().view(torch.uint8).numpy()


def _fingerprint(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values).view(np.uint8)).hexdigest()


@dataclass
class LayerTemplate:
    """One layer's program: which of its constants hold which of the layer's parameters."""

    part: Part
    weight_of: dict[int, str]  # op index -> parameter name in the one-layer module's state dict


def layer_template(part: Part, params: dict[str, torch.Tensor], readers: Readers) -> LayerTemplate:
    """The layer converted with random weights (every parameter's bytes unique): a constant equal to a parameter byte
    for byte holds it; any other (RoPE tables, masks) is the same in every layer. Every parameter must be found: a
    MIL pass that folded one into something else (q * scale into q's weight) would otherwise give every copy of
    the layer layer 0's product."""
    by_bytes = {_fingerprint(_bytes(p)): n for n, p in params.items()}
    weight_of: dict[int, str] = {}
    others: dict[str, int] = {}  # the other blob constants' sizes, to name the one a pass rewrote
    for index, op in enumerate(part.block.operations):
        value = _const_value(op) if op.type == "const" else None
        if value is None or value.WhichOneof("value") != "blobFileValue":
            continue
        data = readers.read(part.weights, value, _op_name(op))
        name = by_bytes.get(_fingerprint(data))
        if name is None:
            others[_op_name(op)] = data.size
        else:
            weight_of[index] = name
    for name in sorted(set(params) - set(weight_of.values())):
        suspects = [op_name for op_name, size in others.items() if size == params[name].numel()]
        rewritten = f": the layer's constant {suspects[0]} has its size, other values" if suspects else ""
        raise VoxtralError(
            f"layered conversion: parameter {name} is in no constant of the layer{rewritten} (a MIL pass changed it)"
        )
    return LayerTemplate(part, weight_of)


class JoinedProgram:
    """The stem's, layers' and head's ops added to one block, their constants to one weight file (a blob that
    several parts share, such as a mask every layer reads, is written once)."""

    def __init__(self, block, weight_file: Path, readers: Readers) -> None:
        from coremltools.libmilstoragepython import _BlobStorageWriter

        self.block = block
        self.writer = _BlobStorageWriter(str(weight_file))
        self.readers = readers
        self._copied: dict[tuple[Path, int], int] = {}

    def _write(self, value, data: np.ndarray, where: str) -> int:
        _, writer, dtype = _blob_io(value, where)
        return getattr(self.writer, writer)(np.ascontiguousarray(data).reshape(-1).view(dtype))

    def add(self, part: Part, op, rename: Callable[[str], str], data: np.ndarray | None = None) -> None:
        new = self.block.operations.add()
        new.CopyFrom(op)
        if len(new.blocks):
            raise VoxtralError(f"layered conversion: op {_op_name(op)} has nested blocks")
        for output in new.outputs:
            output.name = rename(output.name)
        for argument in new.inputs.values():
            for binding in argument.arguments:
                if binding.name:
                    binding.name = rename(binding.name)
        names = new.attributes["name"].immediateValue.tensor.strings.values
        names[0] = rename(names[0])
        if new.type == "const" and _const_value(new).WhichOneof("value") == "blobFileValue":
            self._place(part, _const_value(new), _op_name(op), data)

    def _place(self, part: Part, value, where: str, data: np.ndarray | None) -> None:
        if data is not None:
            value.blobFileValue.offset = self._write(value, data, where)
            return
        key = (part.weights, value.blobFileValue.offset)
        if key not in self._copied:
            self._copied[key] = self._write(value, self.readers.read(part.weights, value, where), where)
        value.blobFileValue.offset = self._copied[key]


def renamer(prefix: str, kept: dict[str, str], layer: int | None = None) -> Callable[[str], str]:
    """A part's names in the joined program: `kept` as mapped, a layer's `layers_0_` as its own number, others
    prefixed (each part was converted alone, so `conv2d_0` exists in several)."""

    def rename(name: str) -> str:
        if name in kept:
            return kept[name]
        if layer is not None and "layers_0_" in name:
            return name.replace("layers_0_", f"layers_{layer}_")
        return f"{prefix}{name}"

    return rename


def layered_mlprogram(
    weights: Mapping[str, torch.Tensor],
    dims,
    build: BuildModule,
    target: str,
    names: tuple[str, str],
    example: torch.Tensor,
):
    """The encoder's mlprogram for `target` (an MLModel over a temporary package, as ct.convert returns) from
    `weights` of `dims.n_layers` layers: `build` makes the family's module, `names` are the program's input and
    output, `example` its input (float32)."""
    input_name, output_name = names
    single = dataclasses.replace(dims, n_layers=1)
    outside = outside_layers(weights)

    def layer_module(layer: int) -> nn.Module:
        return build(one_layer(weights, layer, outside), single)

    first = layer_module(0)
    dtype = next(iter(outside.values())).dtype
    hidden = torch.zeros(1, dims.d_model, 1, dims.n_positions, dtype=dtype)  # between the stages: (1, d, 1, S)

    def convert(index: int, model: nn.Module, x: torch.Tensor, into: str, out: str) -> Part:
        dtypes = {n: np.float32 if n in names else np.float16 for n in (into, out)}  # fp16 between the stages
        return _part(convert_stage(StageModule(model, index), x, into, dtypes[into], out, dtypes[out], target))

    stem = convert(0, first, example, input_name, STEM_OUT)
    head = convert(2, first, hidden, STEM_OUT, output_name)
    probed = build(probe(one_layer(weights, 0, outside), PROBE_SEED), single)
    readers = Readers()
    layer_params = {n: p for n, p in probed.state_dict().items() if LAYER_KEY.match(n)}
    template = layer_template(convert(1, probed, hidden, STEM_OUT, LAYER_OUT), layer_params, readers)
    del first, probed, layer_params  # the join holds one layer's weights at a time
    log.info("layered conversion: stem, head and the layer template converted; writing %d layers", dims.n_layers)
    with tempfile.TemporaryDirectory(prefix="layered-") as staging:  # beside ct's temporary packages: one disk
        weight_file = Path(staging) / WEIGHTS_FILE
        spec = join(stem, template, head, dims.n_layers, layer_module, names, weight_file, readers)
        return package_without_copy(spec, weight_file)


def package_without_copy(spec, weight_file: Path):
    """An MLModel over a temporary package of `spec`, its weight file moved in (coremltools would copy it)."""
    import coremltools as ct

    empty = weight_file.parent / "empty"
    empty.mkdir()
    mlmodel = ct.models.MLModel(spec, weights_dir=str(empty), skip_model_load=True)
    os.replace(weight_file, Path(mlmodel.weights_dir) / WEIGHTS_FILE)
    return mlmodel


def join(stem: Part, template: LayerTemplate, head: Part, n_layers: int, layer_module, names, weight_file, readers):
    """The spec of the program stem, n_layers x template, head; its weights written to `weight_file`."""
    from coremltools.proto import Model_pb2

    input_name, output_name = names
    spec = Model_pb2.Model()
    spec.CopyFrom(stem.spec)  # the stem's inputs and metadata
    del spec.description.output[:]
    spec.description.output.extend(head.spec.description.output)
    function = spec.mlProgram.functions["main"]
    block = function.block_specializations[function.opset]
    del block.operations[:]
    del block.outputs[:]
    block.outputs.extend(head.block.outputs)
    joined = JoinedProgram(block, weight_file, readers)
    for op in stem.block.operations:
        joined.add(stem, op, renamer("stem_", {input_name: input_name}))  # the stem's output: see `previous`
    previous = renamer("stem_", {})(stem.block.outputs[0])
    for layer in range(n_layers):
        module_state = layer_module(layer).state_dict()
        rename = renamer(f"layer{layer}_", {template.part.input_name: previous}, layer)
        for index, op in enumerate(template.part.block.operations):
            name = template.weight_of.get(index)
            data = None if name is None else _bytes(module_state[name])
            joined.add(template.part, op, rename, data)
        previous = rename(template.part.block.outputs[0])
        log.info("layered conversion: layer %d of %d written", layer + 1, n_layers)
    for op in head.block.operations:
        joined.add(head, op, renamer("head_", {head.input_name: previous, output_name: output_name}))
    del joined  # closes the weight file
    return spec
