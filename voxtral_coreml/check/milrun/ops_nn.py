"""The heavy MIL ops: convolution, matrix products, normalization, softmax, reductions."""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from voxtral_coreml.pipeline.errors import VoxtralError

from .args import Kernel, OpArgs, Result

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv_pads(
    a: OpArgs, spatial: list[int], kernel: list[int], strides: list[int], dilations: list[int]
) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dim for MIL pad_type valid / custom / same / same_lower.

    same: total = max(0, (ceil(d/s) - 1) * s + dilated_kernel - d), the odd pixel after (as torch and TF do);
    same_lower puts it before.
    """
    pad_type = a.text("pad_type", "valid")
    if pad_type == "valid":
        return [(0, 0)] * len(spatial)
    if pad_type == "custom":
        pad = a.ints("pad")
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(len(spatial))]
    if pad_type not in ("same", "same_lower"):
        raise VoxtralError(f"conv pad_type {pad_type!r} is not a MIL pad type")
    pads = []
    for d, k, s, dil in zip(spatial, kernel, strides, dilations, strict=True):
        total = max(0, (-(-d // s) - 1) * s + (k - 1) * dil + 1 - d)
        small, large = total // 2, total - total // 2
        pads.append((small, large) if pad_type == "same" else (large, small))
    return pads


def _conv(a: OpArgs) -> Result:
    """conv(x [N, C_in, *D], weight [C_out, C_in/groups, *K], bias?, strides, pad_type, pad, dilations,
    groups), for 1 to 3 spatial dims."""
    x, weight = a.tensor("x"), a.tensor("weight")
    n_spatial = weight.dim() - 2
    strides = a.ints("strides", [1] * n_spatial)
    dilations = a.ints("dilations", [1] * n_spatial)
    pads = _conv_pads(a, list(x.shape[2:]), list(weight.shape[2:]), strides, dilations)
    if all(before == after for before, after in pads):
        padding = [before for before, _ in pads]
    else:
        # F.pad lists (before, after) pairs from the last dim backwards.
        x = F.pad(x, [p for pair in reversed(pads) for p in pair])
        padding = [0] * n_spatial
    return _CONV[n_spatial](x, weight, a.get("bias"), strides, padding, dilations, a.integer("groups", 1))


def _linear(a: OpArgs) -> Result:
    """linear(x [*, D_in], weight [D_out, D_in], bias? [D_out]) = x @ weight^T + bias."""
    return F.linear(a.tensor("x"), a.tensor("weight"), a.get("bias"))


def _matmul(a: OpArgs) -> Result:
    """matmul(x, y, transpose_x=False, transpose_y=False): batched and broadcast like numpy.matmul."""
    x, y = a.tensor("x"), a.tensor("y")
    if a.flag("transpose_x", False) and x.dim() > 1:
        x = x.mT
    if a.flag("transpose_y", False) and y.dim() > 1:
        y = y.mT
    return torch.matmul(x, y)


def _einsum(a: OpArgs) -> Result:
    """einsum(values=(x, y), equation): the equation's own subscripts; size-1 batch dims broadcast."""
    x, y = a["values"]
    return torch.einsum(a.text("equation"), x, y)


def _softmax(a: OpArgs) -> Result:
    """softmax(x, axis=-1)."""
    return torch.softmax(a.tensor("x"), dim=a.integer("axis", -1))


def _layer_norm(a: OpArgs) -> Result:
    """layer_norm(x, axes=all, gamma?, beta?, epsilon=1e-5) = (x - mean) / sqrt(var + eps) * gamma + beta,
    with the biased variance over axes.

    gamma and beta have shape x.shape[sorted axes]; they are laid out with ones on the other dims.
    """
    x = a.tensor("x")
    axes = sorted(ax % x.dim() for ax in a.ints("axes", list(range(x.dim()))))
    var, mean = torch.var_mean(x, dim=axes, correction=0, keepdim=True)
    out = (x - mean) * torch.rsqrt(var + a.number("epsilon", 1e-5))
    param_shape = [x.shape[i] if i in axes else 1 for i in range(x.dim())]
    if (gamma := a.get("gamma")) is not None:
        out = out * gamma.reshape(param_shape)
    if (beta := a.get("beta")) is not None:
        out = out + beta.reshape(param_shape)
    return out


def _batch_norm(a: OpArgs) -> Result:
    """batch_norm(x [N, C, *D], mean, variance, gamma?, beta?, epsilon=1e-5), per channel (dim 1)."""
    return F.batch_norm(
        a.tensor("x"),
        a.tensor("mean"),
        a.tensor("variance"),
        a.get("gamma"),
        a.get("beta"),
        training=False,
        eps=a.number("epsilon", 1e-5),
    )


def _reduce(fn: Callable[..., torch.Tensor]) -> Kernel:
    """reduce_*(x, axes=all, keep_dims=False)."""

    def kernel(a: OpArgs) -> Result:
        x = a.tensor("x")
        return fn(x, dim=a.ints("axes", list(range(x.dim()))), keepdim=a.flag("keep_dims", False))

    return kernel


KERNELS: dict[str, Kernel] = {
    "conv": _conv,
    "linear": _linear,
    "matmul": _matmul,
    "einsum": _einsum,
    "softmax": _softmax,
    "layer_norm": _layer_norm,
    "batch_norm": _batch_norm,
    "reduce_mean": _reduce(torch.mean),
    "reduce_sum": _reduce(torch.sum),
    "reduce_max": _reduce(torch.amax),
    "reduce_min": _reduce(torch.amin),
}
