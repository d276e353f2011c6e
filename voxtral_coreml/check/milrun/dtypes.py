"""How MIL dtypes are held as torch tensors, how ops compute on them, and the rounding to each declared dtype."""

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from coremltools.converters.mil.mil import types

from voxtral_coreml.pipeline.errors import VoxtralError

# Float values are stored as float32 (an fp16 value as the float32 number it equals: exact). Ops compute in float64
# and each result is rounded to its declared dtype, fp16 or fp32: float64 kernels agree across CPUs to ~1e-15, so
# the rounded results (and the metrics computed from them) are the same on any machine (stable.py).
STORAGE: dict[str, torch.dtype] = {
    "fp16": torch.float32,
    "fp32": torch.float32,
    "bool": torch.bool,
    "int4": torch.int8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    # Sub-byte unsigned types arrive unpacked, one value per byte, from coremltools' blob reader.
    "uint1": torch.uint8,
    "uint2": torch.uint8,
    "uint3": torch.uint8,
    "uint4": torch.uint8,
    "uint6": torch.uint8,
    "uint8": torch.uint8,
    # torch's uint16/uint32 support few ops; widening keeps every value exact.
    "uint16": torch.int32,
    "uint32": torch.int64,
}

# What predict accepts and returns for each I/O dtype a Core ML model can declare.
IO_NUMPY: dict[str, type] = {
    "fp16": np.float16,
    "fp32": np.float32,
    "int32": np.int32,
    "bool": np.bool_,
}

Coercer = Callable[[torch.Tensor], torch.Tensor]


def dtype_name(builtin: Any) -> str:
    """The MIL spelling ("fp16", "int32", ...) of a coremltools builtin type."""
    return types.builtin_to_string(builtin)


def compute_form(value: Any) -> Any:
    """What a computing op reads: stored float32 values widened to float64 (exact); anything else as it is."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        return value.to(torch.float64)
    return value


def round_fp16(t: torch.Tensor) -> torch.Tensor:
    """Round a result to fp16 (ties to even; from float64 through float32, as torch converts), stored as float32,
    as the device stores an fp16 result."""
    return t.to(torch.float16).to(torch.float32)


def unchanged(t: torch.Tensor) -> torch.Tensor:
    return t


def coercer(dtype: str, where: str, rounding: Coercer = round_fp16) -> Coercer:
    """The conversion that gives an op's result its declared dtype (fp16 results are rounded by `rounding`)."""
    if dtype == "fp16":
        return rounding
    storage = STORAGE.get(dtype)
    if storage is None:
        raise VoxtralError(f"{where}: MIL dtype {dtype!r} is not supported by the MIL runtime")
    return lambda t: t.to(storage)


def to_runtime(value: Any) -> Any:
    """A const op's value as the runtime holds it: strings stay strings, numbers become tensors."""
    if isinstance(value, str):
        return value
    array = np.asarray(value)
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    elif array.dtype == np.uint16:
        array = array.astype(np.int32)
    elif array.dtype == np.uint32:
        array = array.astype(np.int64)
    if not array.flags.writeable:  # the loader's arrays can be read-only views of the weight file's bytes
        array = array.copy()
    # (np.ascontiguousarray would turn a scalar into shape [1]; a 0-d array is always contiguous.)
    return torch.from_numpy(array if array.flags.c_contiguous else np.ascontiguousarray(array))
