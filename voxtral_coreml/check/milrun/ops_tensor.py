"""MIL ops that move data without arithmetic: layout, reshaping, slicing, splitting, joining, gathering."""

import torch

from voxtral_coreml.pipeline.errors import VoxtralError

from .args import Kernel, OpArgs, Result


def _transpose(a: OpArgs) -> Result:
    """transpose(x, perm): output dim i is input dim perm[i]."""
    return a.tensor("x").permute(a.ints("perm"))


def _reshape(a: OpArgs) -> Result:
    """reshape(x, shape): -1 is inferred; 0 copies the input dim aligned from the right (1 past its rank).

    That is the iOS17 rule; iOS15/16 allow 0 only when len(shape) == rank, where both rules agree.
    """
    x, shape = a.tensor("x"), a.ints("shape")
    offset = x.dim() - len(shape)
    resolved = [(x.shape[i + offset] if i + offset >= 0 else 1) if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(resolved)


def _expand_dims(a: OpArgs) -> Result:
    """expand_dims(x, axes): axes index the output, whose rank is rank(x) + len(axes)."""
    x = a.tensor("x")
    out_rank = x.dim() + len(axes := a.ints("axes"))
    for axis in sorted(ax % out_rank for ax in axes):
        x = x.unsqueeze(axis)
    return x


def _squeeze(a: OpArgs) -> Result:
    """squeeze(x, axes=every size-1 dim)."""
    x = a.tensor("x")
    if "axes" not in a:
        return x.squeeze()
    return x.squeeze(tuple(a.ints("axes")))


def _ascending_slice(size: int, begin: int | None, end: int | None, stride: int) -> slice:
    """The elements of x[begin:end:stride] along a dim of `size`, as an ascending slice (torch slicing has no
    negative steps: a reversed slice is this one, flipped)."""
    start, stop, step = slice(begin, end, stride).indices(size)
    count = len(range(start, stop, step))
    if count == 0:
        return slice(0, 0)
    first, last = (start, start + step * (count - 1)) if step > 0 else (start + step * (count - 1), start)
    return slice(first, last + 1, abs(step))


def _index_slices(a: OpArgs, shape: torch.Size) -> tuple[tuple[slice, ...], tuple[int, ...], tuple[int, ...]]:
    """The region slice_by_index / slice_update address: ascending slices per dim, the dims whose elements run
    in reverse (a negative stride), and the dims squeeze_mask drops.

    A set begin/end mask means that bound is open (as None in x[b:e:s]); a set squeeze_mask takes the single
    element at begin.
    """
    rank = len(shape)
    begin, end = a.ints("begin"), a.ints("end")
    stride = a.ints("stride", [1] * rank)
    begin_mask = a.ints("begin_mask", [0] * rank)
    end_mask = a.ints("end_mask", [0] * rank)
    squeeze_mask = a.ints("squeeze_mask", [0] * rank)
    slices = tuple(
        slice(begin[d] % shape[d], begin[d] % shape[d] + 1)
        if squeeze_mask[d]
        else _ascending_slice(shape[d], None if begin_mask[d] else begin[d], None if end_mask[d] else end[d], stride[d])
        for d in range(rank)
    )
    flipped = tuple(d for d in range(rank) if stride[d] < 0 and not squeeze_mask[d])
    squeezed = tuple(d for d in range(rank) if squeeze_mask[d])
    return slices, flipped, squeezed


def _slice_by_index(a: OpArgs) -> Result:
    """slice_by_index(x, begin, end, stride=1, begin_mask, end_mask, squeeze_mask): numpy basic slicing."""
    x = a.tensor("x")
    slices, flipped, squeezed = _index_slices(a, x.shape)
    x = x[slices]
    if flipped:
        x = x.flip(flipped)
    return x.squeeze(squeezed) if squeezed else x


def _slice_update(a: OpArgs) -> Result:
    """slice_update(x, update, begin, end, stride, masks...): x with the region slice_by_index would read
    replaced by update (which lacks the squeezed dims); x itself is left as it was."""
    x, update = a.tensor("x"), a.tensor("update")
    slices, flipped, squeezed = _index_slices(a, x.shape)
    for dim in squeezed:
        update = update.unsqueeze(dim)
    if flipped:
        update = update.flip(flipped)
    region = x[slices].shape
    if update.shape != region:
        # torch would broadcast or clip silently; MIL requires the exact shape (a write past the end lands here).
        raise VoxtralError(f"slice_update: update of shape {tuple(update.shape)} for a region of shape {tuple(region)}")
    out = x.clone()
    out[slices] = update
    return out


def _slice_by_size(a: OpArgs) -> Result:
    """slice_by_size(x, begin, size): size -1 runs to the end of the dim."""
    x = a.tensor("x")
    for dim, (start, size) in enumerate(zip(a.ints("begin"), a.ints("size"), strict=True)):
        x = x.narrow(dim, start, x.shape[dim] - start if size == -1 else size)
    return x


def _split(a: OpArgs) -> Result:
    """split(x, num_splits | split_sizes, axis): num_splits alone means equal parts."""
    x, axis = a.tensor("x"), a.integer("axis")
    if "split_sizes" in a:
        sizes = a.ints("split_sizes")
    else:
        parts = a.integer("num_splits")
        sizes = [x.shape[axis] // parts] * parts
    return tuple(torch.split(x, sizes, dim=axis))


def _concat(a: OpArgs) -> Result:
    """concat(values, axis, interleave=False): interleave takes one slice of each input in turn; scalars
    (rank 0, e.g. a dynamic slice bound) join into a vector."""
    values, axis = a["values"], a.integer("axis")
    if values[0].dim() == 0:
        return torch.stack(values)
    if not a.flag("interleave", False):
        return torch.cat(values, dim=axis)
    axis %= values[0].dim()
    stacked = torch.stack(values, dim=axis + 1)
    return stacked.flatten(axis, axis + 1)


def _tile(a: OpArgs) -> Result:
    """tile(x, reps): like numpy.tile with len(reps) == rank(x)."""
    return a.tensor("x").repeat(a.ints("reps"))


def _gather(a: OpArgs) -> Result:
    """gather(x, indices, axis=0, batch_dims=0): x[..., indices, ...] along axis; indices may be negative."""
    x, indices, axis = a.tensor("x"), a.tensor("indices").long(), a.integer("axis", 0)
    if a.integer("batch_dims", 0) != 0:
        raise VoxtralError("gather with batch_dims != 0 is not supported by the MIL runtime")
    axis %= x.dim()
    flat = x.index_select(axis, indices.flatten() % x.shape[axis])
    return flat.reshape(*x.shape[:axis], *indices.shape, *x.shape[axis + 1 :])


def _gather_along_axis(a: OpArgs) -> Result:
    """gather_along_axis(x, indices, axis=0): out[..i..] = x[..indices[..i..]..] along axis (numpy's
    take_along_axis); indices may be negative."""
    x, axis = a.tensor("x"), a.integer("axis", 0)
    axis %= x.dim()
    return torch.gather(x, axis, a.tensor("indices").long() % x.shape[axis])


def _fill_like(a: OpArgs) -> Result:
    """fill_like(ref_tensor, value=0): a tensor of ref_tensor's shape, every element value."""
    value = a.get("value")
    return torch.full(a.tensor("ref_tensor").shape, 0.0 if value is None else value.item())


KERNELS: dict[str, Kernel] = {
    "transpose": _transpose,
    "reshape": _reshape,
    "expand_dims": _expand_dims,
    "squeeze": _squeeze,
    "slice_by_index": _slice_by_index,
    "slice_by_size": _slice_by_size,
    "split": _split,
    "concat": _concat,
    "tile": _tile,
    "gather": _gather,
    "gather_along_axis": _gather_along_axis,
    "slice_update": _slice_update,
    "fill_like": _fill_like,
}
