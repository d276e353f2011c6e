"""Weight-decompression ops (constexpr_*), evaluated once at load time, as the iOS16/iOS18 op specs define.

The arithmetic (small integers times fp16 scales, LUT lookups) is exact; the op's declared output dtype (usually
fp16) then rounds the result once.
"""

import math

import torch

from .args import Kernel, OpArgs, Result


def _unpack_bits(packed: torch.Tensor, nbits: int, count: int) -> torch.Tensor:
    """count unsigned nbits-wide values packed LSB-first: the first fills byte 0 from its lowest bit upward,
    and a value that does not fit spills into the low bits of the next byte."""
    bits = (packed.to(torch.uint8).unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
    bits = bits.flatten()[: count * nbits].reshape(count, nbits)
    return (bits.to(torch.int64) << torch.arange(nbits)).sum(dim=1)


def _scatter(nonzero_data: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The dense tensor of mask's shape holding nonzero_data, in row-major order, where mask is set."""
    dense = torch.zeros(mask.shape, dtype=nonzero_data.dtype)
    dense[mask != 0] = nonzero_data
    return dense


def _lut_lookup(indices: torch.Tensor, lut: torch.Tensor, vector_axis: int | None) -> torch.Tensor:
    """iOS18 LUT decoding: lut is [*G, NUM_PALETTES, VECTOR_SIZE] with one G dim per indices dim.

    The table for index position i is lut[i // (indices.shape / G)]; a vector entry fills VECTOR_SIZE
    consecutive outputs along vector_axis.
    """
    groups, (palettes, vector) = lut.shape[:-2], lut.shape[-2:]
    rank = indices.dim()
    group = torch.zeros((), dtype=torch.int64)
    for dim, (size, n_groups) in enumerate(zip(indices.shape, groups, strict=True)):
        along = torch.arange(size) // (size // n_groups)
        group = group * n_groups + along.reshape([-1 if d == dim else 1 for d in range(rank)])
    values = lut.reshape(-1, palettes, vector)[group, indices.to(torch.int64)]
    if vector == 1:
        return values.squeeze(-1)
    axis = vector_axis % rank
    return values.movedim(-1, axis + 1).flatten(axis, axis + 1)


def _shift_scale(data: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """out[i] = scale[b] * (data[i] - offset[b]) with block b = i // (data.shape / scale.shape) per dim."""
    # Viewing data as [s0, block0, s1, block1, ...] lets each scale broadcast over its block without copies.
    blocked = [n for s, d in zip(scale.shape, data.shape, strict=True) for n in (s, d // s)]
    per_block = [n for s in scale.shape for n in (s, 1)]
    x = data.to(torch.float32).reshape(blocked)
    if offset is not None:
        x = x - offset.to(torch.float32).reshape(per_block)
    return (x * scale.reshape(per_block)).reshape(data.shape)


def _affine_dequantize(a: OpArgs) -> Result:
    """iOS16: scale * (quantized_data - zero_point); a vector scale / zero_point runs along axis."""
    data = a.tensor("quantized_data")
    axis = a.integer("axis") % data.dim()
    along = [-1 if d == axis else 1 for d in range(data.dim())]
    zero_point, scale = a.tensor("zero_point"), a.tensor("scale")
    return (data.to(torch.float32) - zero_point.to(torch.float32).reshape(along)) * scale.reshape(along)


def _lut_to_dense(a: OpArgs) -> Result:
    """iOS16 form (has shape): one LUT of 2^nbits entries, indices bit-packed in uint8; else iOS18's."""
    lut = a.tensor("lut")
    if "shape" not in a:
        return _lut_lookup(a.tensor("indices"), lut, a.maybe_integer("vector_axis"))
    shape = a.ints("shape")
    indices = _unpack_bits(a.tensor("indices"), int(math.log2(lut.numel())), math.prod(shape))
    return lut[indices].reshape(shape)


def _sparse_to_dense(a: OpArgs) -> Result:
    """iOS16 form (has shape): the mask is one bit per element, bit-packed in uint8; iOS18: a uint1 tensor."""
    mask = a.tensor("mask")
    if "shape" in a:
        shape = a.ints("shape")
        mask = _unpack_bits(mask, 1, math.prod(shape)).reshape(shape)
    return _scatter(a.tensor("nonzero_data"), mask)


def _blockwise_shift_scale(a: OpArgs) -> Result:
    """iOS18: scale * (data - offset) per block; int4/uint4/int8/uint8 (or float) data."""
    return _shift_scale(a.tensor("data"), a.tensor("scale"), a.get("offset"))


def _sparse_blockwise_shift_scale(a: OpArgs) -> Result:
    """iOS18: dequantize only the set elements; returns (data_mask, their dequantized values in order)."""
    mask = a.tensor("data_mask")
    dense = _shift_scale(_scatter(a.tensor("nonzero_data"), mask), a.tensor("scale"), a.get("offset"))
    return mask, dense[mask != 0]


def _lut_to_sparse(a: OpArgs) -> Result:
    """iOS18: LUT-decode only the set elements; returns (mask, values).

    With vector entries the mask widens by VECTOR_SIZE along vector_axis, as the values do.
    """
    mask, lut = a.tensor("indices_mask"), a.tensor("lut")
    vector_axis = a.maybe_integer("vector_axis")
    dense = _lut_lookup(_scatter(a.tensor("indices_nonzero_data"), mask), lut, vector_axis)
    if lut.shape[-1] > 1:
        mask = mask.repeat_interleave(lut.shape[-1], dim=vector_axis)
    return mask, dense[mask != 0]


KERNELS: dict[str, Kernel] = {
    "constexpr_affine_dequantize": _affine_dequantize,
    # fp16 -> fp32: the stored fp16 values are already exact in fp32.
    "constexpr_cast": lambda a: a.tensor("source_val"),
    "constexpr_lut_to_dense": _lut_to_dense,
    "constexpr_sparse_to_dense": _sparse_to_dense,
    "constexpr_blockwise_shift_scale": _blockwise_shift_scale,
    "constexpr_sparse_blockwise_shift_scale": _sparse_blockwise_shift_scale,
    "constexpr_lut_to_sparse": _lut_to_sparse,
}
