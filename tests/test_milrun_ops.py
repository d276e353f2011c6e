"""The MIL runtime against independent numpy / torch computations, on MIL-builder programs and packages."""

import copy
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import coremltools as ct
import coremltools.optimize.coreml as cto
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Program, types
from coremltools.optimize.coreml._quantization_passes import WeightDecompressor
from torch import nn

from voxtral_coreml.check.milrun import (
    SUPPORTED_OPS,
    TensorInfo,
    load_package,
    load_program,
    op_counts,
    program_op_types,
)
from voxtral_coreml.check.milrun import plan as milrun_plan
from voxtral_coreml.check.milrun.package import read_package
from voxtral_coreml.pipeline.errors import VoxtralError

IOS16, IOS17, IOS18 = ct.target.iOS16, ct.target.iOS17, ct.target.iOS18


def rand(*shape: int, seed: int = 0, low: float = -2.0, high: float = 2.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def save(program: Program | ct.models.MLModel, path: Path) -> Path:
    """Save a MIL-builder program (untouched by graph passes) or a converted model as an .mlpackage."""
    if isinstance(program, Program):
        program = ct.convert(
            program,
            convert_to="mlprogram",
            pass_pipeline=ct.PassPipeline.EMPTY,
            compute_precision=ct.precision.FLOAT32,
            minimum_deployment_target=program.functions["main"].opset_version,
        )
    program.save(str(path))
    return path


@pytest.fixture(params=["program", "package"])
def execute(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Any]:
    """Run a program in memory, or saved and reloaded as an .mlpackage; one output comes back bare."""

    def run(program: Program, **feeds: np.ndarray) -> Any:
        if request.param == "program":
            model = load_program(program)
        else:
            model = load_package(save(program, tmp_path / f"op{len(list(tmp_path.iterdir()))}.mlpackage"))
        results = model.predict(feeds)
        outputs = [results[info.name] for info in model.outputs]
        return outputs[0] if len(outputs) == 1 else outputs

    return run


def run_program(program: Program, **feeds: np.ndarray) -> Any:
    model = load_program(program)
    results = [model.predict(feeds)[info.name] for info in model.outputs]
    return results[0] if len(results) == 1 else results


# ---------------------------------------------------------------------------------------------- conv


# (case, x shape, weight shape, conv kwargs, (before, after) pads per spatial dim worked out by hand)
CONV_CASES = [
    ("valid", (1, 4, 6, 7), (5, 4, 3, 3), {"pad_type": "valid"}, [(0, 0), (0, 0)]),
    (
        "custom-strided",
        (1, 4, 6, 7),
        (5, 4, 3, 2),
        {"pad_type": "custom", "pad": [0, 1, 2, 0], "strides": [2, 1]},
        [(0, 1), (2, 0)],
    ),
    # same, 7x9 by a 4x3 kernel at stride 2: out 4x5, total pad 3 (1 before, 2 after) and 2 (1, 1).
    (
        "same-strided-even",
        (1, 4, 7, 9),
        (6, 4, 4, 3),
        {"pad_type": "same", "strides": [2, 2]},
        [(1, 2), (1, 1)],
    ),
    # same_lower puts the odd pixel before: total pad 3 for a 4-tall kernel at stride 1.
    ("same-lower", (1, 4, 7, 9), (6, 4, 4, 3), {"pad_type": "same_lower"}, [(2, 1), (1, 1)]),
    (
        "dilated-grouped",
        (1, 4, 9, 9),
        (6, 2, 3, 3),
        {"pad_type": "custom", "pad": [1, 1, 2, 2], "dilations": [2, 1], "groups": 2},
        [(1, 1), (2, 2)],
    ),
    ("depthwise", (1, 4, 5, 6), (4, 1, 3, 3), {"pad_type": "same", "groups": 4}, [(1, 1), (1, 1)]),
    # The encoder's conv2: kernel (1, 3), stride (1, 2), pad (0, 1).
    (
        "encoder-conv2",
        (1, 4, 1, 12),
        (4, 4, 1, 3),
        {"pad_type": "custom", "pad": [0, 0, 1, 1], "strides": [1, 2]},
        [(0, 0), (1, 1)],
    ),
    ("conv1d-same-strided", (2, 3, 10), (4, 3, 3), {"pad_type": "same", "strides": [3]}, [(1, 1)]),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("case", "x_shape", "w_shape", "kwargs", "pads"), CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv(execute, case, x_shape, w_shape, kwargs, pads, bias) -> None:
    weight, b = rand(*w_shape, seed=1), rand(w_shape[0], seed=2)
    extra = {"bias": b} if bias else {}

    @mb.program(input_specs=[mb.TensorSpec(shape=x_shape)], opset_version=IOS16)
    def prog(x):
        return mb.conv(x=x, weight=weight, **kwargs, **extra)

    x = rand(*x_shape)
    padded = F.pad(torch.from_numpy(x), [p for pair in reversed(pads) for p in pair])
    conv = {1: F.conv1d, 2: F.conv2d}[len(w_shape) - 2]
    expected = conv(
        padded,
        torch.from_numpy(weight),
        torch.from_numpy(b) if bias else None,
        stride=kwargs.get("strides", 1),
        dilation=kwargs.get("dilations", 1),
        groups=kwargs.get("groups", 1),
    )
    got = execute(prog, x=x)
    assert got.shape == prog.functions["main"].outputs[0].shape  # agrees with coremltools' shape inference
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- products and einsum


@pytest.mark.parametrize(
    ("x_shape", "y_shape", "tx", "ty"),
    [
        ((2, 3, 4), (4, 5), False, False),
        ((2, 4, 3), (4, 5), True, False),
        ((2, 3, 4), (5, 4), False, True),
        ((1, 4, 3), (2, 5, 4), True, True),
    ],
)
def test_matmul(x_shape, y_shape, tx, ty) -> None:
    y = rand(*y_shape, seed=1)

    @mb.program(input_specs=[mb.TensorSpec(shape=x_shape)], opset_version=IOS16)
    def prog(x):
        return mb.matmul(x=x, y=y, transpose_x=tx, transpose_y=ty)

    x = rand(*x_shape)
    expected = np.matmul(np.swapaxes(x, -1, -2) if tx else x, np.swapaxes(y, -1, -2) if ty else y)
    np.testing.assert_allclose(run_program(prog, x=x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_linear(bias) -> None:
    weight, b = rand(5, 4, seed=1), rand(5, seed=2)
    extra = {"bias": b} if bias else {}

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3, 4))], opset_version=IOS16)
    def prog(x):
        return mb.linear(x=x, weight=weight, **extra)

    x = rand(2, 3, 4)
    np.testing.assert_allclose(run_program(prog, x=x), x @ weight.T + (b if bias else 0), rtol=1e-5, atol=1e-5)


EINSUM_CASES = [
    # The encoder's two per-head products, then broadcasting of size-1 B / H dims, then the rank-3 form.
    ("bkhc,bchq->bkhq", (2, 5, 3, 4), (2, 4, 3, 6)),
    ("bchk,bkhq->bchq", (1, 4, 1, 5), (1, 5, 1, 6)),
    ("bkhc,bchq->bkhq", (1, 5, 1, 4), (2, 4, 3, 6)),
    ("nchw,nwhu->nchu", (2, 3, 3, 4), (1, 4, 1, 5)),
    ("chw,whr->chr", (5, 3, 4), (4, 3, 6)),
    ("chw,whr->chr", (5, 1, 4), (4, 3, 6)),
]


@pytest.mark.parametrize(("equation", "x_shape", "y_shape"), EINSUM_CASES)
def test_einsum(execute, equation, x_shape, y_shape) -> None:
    @mb.program(input_specs=[mb.TensorSpec(shape=x_shape), mb.TensorSpec(shape=y_shape)], opset_version=IOS16)
    def prog(x, y):
        return mb.einsum(values=(x, y), equation=equation)

    x, y = rand(*x_shape), rand(*y_shape, seed=1)
    # numpy's einsum does not broadcast size-1 labelled dims, so spell the broadcast out.
    out_shape = prog.functions["main"].outputs[0].shape
    if len(x_shape) == 4:
        xb = np.broadcast_to(x, (out_shape[0], x_shape[1], out_shape[2], x_shape[3]))
        yb = np.broadcast_to(y, (out_shape[0], y_shape[1], out_shape[2], y_shape[3]))
    else:
        xb = np.broadcast_to(x, (x_shape[0], out_shape[1], x_shape[2]))
        yb = np.broadcast_to(y, (y_shape[0], out_shape[1], y_shape[2]))
    np.testing.assert_allclose(execute(prog, x=x, y=y), np.einsum(equation, xb, yb), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- normalization, softmax


@pytest.mark.parametrize("axis", [0, 1, -1, -3, None])
def test_softmax(axis) -> None:
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3, 4, 5))], opset_version=IOS16)
    def prog(x):
        return mb.softmax(x=x) if axis is None else mb.softmax(x=x, axis=axis)

    x = rand(2, 3, 4, 5, high=6.0)
    ax = -1 if axis is None else axis
    e = np.exp(x - x.max(axis=ax, keepdims=True))
    np.testing.assert_allclose(run_program(prog, x=x), e / e.sum(axis=ax, keepdims=True), rtol=1e-5, atol=1e-6)


def np_layer_norm(x: np.ndarray, axes: tuple[int, ...], eps: float) -> np.ndarray:
    mean = x.mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True) + eps)


@pytest.mark.parametrize(
    ("axes", "affine", "eps"),
    [
        ([-1], True, 1e-5),
        ([1], True, 0.5),  # the encoder's channel norm; a large epsilon shows it is honoured
        ([2, 1], True, 1e-5),  # unsorted axes: gamma is laid out in sorted-axis order
        ([1], False, 1e-3),
        ([0, 1, 2, 3], False, 1e-5),  # (coremltools cannot build the axes-omitted default)
    ],
)
def test_layer_norm(axes, affine, eps) -> None:
    shape = (2, 3, 4, 5)
    norm_axes = tuple(sorted(a % 4 for a in axes))
    gamma = rand(*[shape[a] for a in norm_axes], seed=1)
    beta = rand(*[shape[a] for a in norm_axes], seed=2)
    kwargs: dict[str, Any] = {"axes": axes, "epsilon": np.float32(eps)}
    if affine:
        kwargs.update(gamma=gamma, beta=beta)

    @mb.program(input_specs=[mb.TensorSpec(shape=shape)], opset_version=IOS16)
    def prog(x):
        return mb.layer_norm(x=x, **kwargs)

    x = rand(*shape, low=-0.5, high=0.5)
    expected = np_layer_norm(x, norm_axes, eps)
    if affine:
        param_shape = [shape[a] if a in norm_axes else 1 for a in range(4)]
        expected = expected * gamma.reshape(param_shape) + beta.reshape(param_shape)
    np.testing.assert_allclose(run_program(prog, x=x), expected, rtol=1e-4, atol=1e-5)


def test_batch_norm() -> None:
    mean, var, gamma, beta = rand(3, seed=1), rand(3, seed=2, low=0.1), rand(3, seed=3), rand(3, seed=4)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3, 4, 5))], opset_version=IOS16)
    def prog(x):
        return mb.batch_norm(x=x, mean=mean, variance=var, gamma=gamma, beta=beta, epsilon=np.float32(0.1))

    x = rand(2, 3, 4, 5)
    c = (1, 3, 1, 1)
    expected = (x - mean.reshape(c)) / np.sqrt(var.reshape(c) + 0.1) * gamma.reshape(c) + beta.reshape(c)
    np.testing.assert_allclose(run_program(prog, x=x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("op", "axes", "keep_dims", "reference"),
    [
        ("reduce_mean", [1], True, np.mean),
        ("reduce_mean", [-1, 0], False, np.mean),
        ("reduce_sum", [2], False, np.sum),
        ("reduce_sum", None, False, np.sum),
        ("reduce_max", [1, 2], True, np.max),
        ("reduce_min", [0], False, np.min),
    ],
)
def test_reductions(op, axes, keep_dims, reference) -> None:
    kwargs: dict[str, Any] = {"keep_dims": keep_dims}
    if axes is not None:
        kwargs["axes"] = axes

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3, 4))], opset_version=IOS16)
    def prog(x):
        return getattr(mb, op)(x=x, **kwargs)

    x = rand(2, 3, 4)
    expected = reference(x, axis=None if axes is None else tuple(axes), keepdims=keep_dims)
    np.testing.assert_allclose(run_program(prog, x=x), expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------- elementwise

_erf = np.vectorize(math.erf)


@pytest.mark.parametrize(
    ("mode", "reference"),
    [
        ("EXACT", lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2)))),
        (
            "TANH_APPROXIMATION",
            lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
        ),
        ("SIGMOID_APPROXIMATION", lambda x: x / (1 + np.exp(-1.702 * x))),
    ],
)
def test_gelu(mode, reference) -> None:
    @mb.program(input_specs=[mb.TensorSpec(shape=(64,))], opset_version=IOS16)
    def prog(x):
        return mb.gelu(x=x, mode=mode)

    x = rand(64, low=-4, high=4)
    np.testing.assert_allclose(run_program(prog, x=x), reference(x.astype(np.float64)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("op", "reference"),
    [
        ("add", np.add),
        ("sub", np.subtract),
        ("mul", np.multiply),
        ("real_div", np.divide),
        ("pow", np.power),
        ("maximum", np.maximum),
        ("minimum", np.minimum),
    ],
)
def test_binary_broadcasting(op, reference) -> None:
    y = rand(3, 1, seed=1, low=0.5, high=2.0)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3, 4))], opset_version=IOS16)
    def prog(x):
        return getattr(mb, op)(x=x, y=y)

    x = rand(2, 3, 4, low=0.1, high=3.0)
    np.testing.assert_allclose(run_program(prog, x=x), reference(x, y), rtol=1e-5, atol=1e-6)


UNARY_CASES = [
    ("sqrt", {}, np.sqrt),
    ("rsqrt", {"epsilon": np.float32(0.25)}, lambda x: 1 / np.sqrt(x + 0.25)),
    ("rsqrt", {}, lambda x: 1 / np.sqrt(x + 1e-12)),
    ("inverse", {"epsilon": np.float32(0.5)}, lambda x: 1 / (x + 0.5)),
    ("inverse", {}, lambda x: 1 / (x + 1e-4)),
    ("log", {"epsilon": np.float32(0.5)}, lambda x: np.log(x + 0.5)),
    ("log", {}, np.log),
    ("exp", {}, np.exp),
    ("erf", {}, _erf),
    ("tanh", {}, np.tanh),
    ("sigmoid", {}, lambda x: 1 / (1 + np.exp(-x))),
    ("silu", {}, lambda x: x / (1 + np.exp(-x))),
    ("square", {}, np.square),
    ("abs", {}, np.abs),
    ("relu", {}, lambda x: np.maximum(x, 0)),
    (
        "clip",
        {"alpha": np.float32(-0.5), "beta": np.float32(1.0)},
        lambda x: np.minimum(np.maximum(x, -0.5), 1.0),
    ),
    ("identity", {}, lambda x: x),
]


@pytest.mark.parametrize(("op", "kwargs", "reference"), UNARY_CASES, ids=[f"{c[0]}{len(c[1])}" for c in UNARY_CASES])
def test_unary(op, kwargs, reference) -> None:
    positive = op in ("sqrt", "rsqrt", "log", "inverse")

    @mb.program(input_specs=[mb.TensorSpec(shape=(3, 5))], opset_version=IOS16)
    def prog(x):
        return getattr(mb, op)(x=x, **kwargs)

    x = rand(3, 5, low=0.05 if positive else -3.0, high=3.0)
    np.testing.assert_allclose(run_program(prog, x=x), reference(x.astype(np.float64)), rtol=1e-5, atol=1e-6)


def test_cast_between_fp32_fp16_int32_bool() -> None:
    @mb.program(input_specs=[mb.TensorSpec(shape=(6,))], opset_version=IOS16)
    def prog(x):
        as_int = mb.cast(x=x, dtype="int32")
        as_half = mb.cast(x=x, dtype="fp16")
        return (
            as_int,
            mb.cast(x=as_half, dtype="fp32"),
            mb.cast(x=as_int, dtype="fp32"),
            mb.cast(x=x, dtype="bool"),
        )

    x = np.array([-2.7, -0.5, 0.0, 0.5, 1 / 3, 70000.7], np.float32)
    as_int, via_half, int_back, as_bool = run_program(prog, x=x)
    np.testing.assert_array_equal(as_int, x.astype(np.int32))  # truncation toward zero
    assert as_int.dtype == np.int32
    with np.errstate(over="ignore"):  # 70000.7 is past fp16's range: it becomes inf
        np.testing.assert_array_equal(via_half, x.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(int_back, x.astype(np.int32).astype(np.float32))
    np.testing.assert_array_equal(as_bool, x != 0)


def test_fp16_results_are_rounded_after_every_op() -> None:
    """Each fp16 op result is rounded as the device stores it; numpy's float16 arithmetic is the reference."""
    c = np.full((64,), 1.1, np.float16)

    @mb.program(input_specs=[mb.TensorSpec(shape=(64,))], opset_version=IOS16)
    def prog(x):
        h = mb.cast(x=x, dtype="fp16")
        return mb.cast(x=mb.add(x=mb.mul(x=h, y=c), y=h), dtype="fp32")

    x = rand(64, low=1.0, high=2.0)
    h = x.astype(np.float16)
    expected = ((h * c) + h).astype(np.float32)  # float16 * and + round each result
    unrounded = h.astype(np.float32) * c.astype(np.float32) + h.astype(np.float32)
    assert not np.array_equal(expected, unrounded)  # so skipping the rounding would fail this test
    np.testing.assert_array_equal(run_program(prog, x=x), expected)


def test_fp16_inputs_and_outputs() -> None:
    @mb.program(input_specs=[mb.TensorSpec(shape=(8,), dtype=types.fp16)], opset_version=IOS16)
    def prog(x):
        return mb.mul(x=x, y=np.full((8,), 3.0, np.float16))

    x = rand(8).astype(np.float16)
    got = run_program(prog, x=x)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, x * np.float16(3))


# ------------------------------------------------------------------------------------ tensor layout


@pytest.mark.parametrize("perm", [[0, 3, 2, 1], [3, 1, 0, 2], [0, 1, 2, 3]])
def test_transpose(perm) -> None:
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3, 4, 5))], opset_version=IOS16)
    def prog(x):
        return mb.transpose(x=x, perm=perm)

    x = rand(2, 3, 4, 5)
    np.testing.assert_array_equal(run_program(prog, x=x), np.transpose(x, perm))


@pytest.mark.parametrize(
    ("opset", "x_shape", "shape", "expected_shape"),
    [
        (IOS16, (2, 3, 4), [6, -1], (6, 4)),
        (IOS16, (2, 3, 4), [0, -1, 2], (2, 6, 2)),
        (IOS16, (2, 3, 4), [0, 0, 0], (2, 3, 4)),
        # iOS17: zeros align with x's dims from the right; one past its rank means 1.
        (IOS17, (2, 50), [1, 0, -1, 0], (1, 1, 2, 50)),
    ],
)
def test_reshape(opset, x_shape, shape, expected_shape) -> None:
    @mb.program(input_specs=[mb.TensorSpec(shape=x_shape)], opset_version=opset)
    def prog(x):
        return mb.reshape(x=x, shape=shape)

    x = rand(*x_shape)
    np.testing.assert_array_equal(run_program(prog, x=x), x.reshape(expected_shape))


def test_expand_dims_and_squeeze() -> None:
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))], opset_version=IOS16)
    def prog(x):
        expanded = mb.expand_dims(x=x, axes=[0, -1])
        return expanded, mb.squeeze(x=expanded, axes=[-1]), mb.squeeze(x=expanded)

    x = rand(2, 3)
    expanded, squeezed_last, squeezed_all = run_program(prog, x=x)
    np.testing.assert_array_equal(expanded, x[None, :, :, None])
    np.testing.assert_array_equal(squeezed_last, x[None])
    np.testing.assert_array_equal(squeezed_all, x)


SLICE_CASES = [
    ({"begin": [1, 0, 2], "end": [5, 3, 4]}, np.s_[1:5, 0:3, 2:4]),
    ({"begin": [0, 0, 0], "end": [6, 3, 5], "stride": [2, 1, 3]}, np.s_[0:6:2, 0:3, 0:5:3]),
    (
        {"begin": [-1, 2, 4], "end": [0, 0, 0], "stride": [-2, -1, -1], "end_mask": [False, True, True]},
        np.s_[-1:0:-2, 2::-1, 4::-1],
    ),
    (
        {
            "begin": [3, 0, 1],
            "end": [-1, 2, 5],
            "begin_mask": [True, False, False],
            "end_mask": [False, True, False],
        },
        np.s_[:-1, 0:, 1:5],
    ),
    ({"begin": [2, 0, -1], "end": [3, 3, 0], "squeeze_mask": [True, False, True]}, np.s_[2, 0:3, -1]),
]


@pytest.mark.parametrize(("kwargs", "index"), SLICE_CASES)
def test_slice_by_index(execute, kwargs, index) -> None:
    @mb.program(input_specs=[mb.TensorSpec(shape=(6, 3, 5))], opset_version=IOS16)
    def prog(x):
        return mb.slice_by_index(x=x, **kwargs)

    x = rand(6, 3, 5)
    np.testing.assert_array_equal(execute(prog, x=x), x[index])


def test_slice_by_size() -> None:
    @mb.program(input_specs=[mb.TensorSpec(shape=(4, 5, 6))], opset_version=IOS16)
    def prog(x):
        return mb.slice_by_size(x=x, begin=[1, 0, 2], size=[2, -1, 3])

    x = rand(4, 5, 6)
    np.testing.assert_array_equal(run_program(prog, x=x), x[1:3, 0:, 2:5])


def test_split() -> None:
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 6, 4))], opset_version=IOS16)
    def prog(x):
        return (*mb.split(x=x, split_sizes=[1, 3, 2], axis=1), *mb.split(x=x, num_splits=2, axis=-1))

    x = rand(2, 6, 4)
    a, b, c, left, right = run_program(prog, x=x)
    for got, want in zip((a, b, c), np.split(x, [1, 4], axis=1), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(left, x[..., :2])
    np.testing.assert_array_equal(right, x[..., 2:])


@pytest.mark.parametrize(("axis", "interleave"), [(1, False), (-1, False), (1, True), (-3, True)])
def test_concat(axis, interleave) -> None:
    const = rand(2, 3, 4, seed=1)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3, 4))], opset_version=IOS16)
    def prog(x):
        return mb.concat(values=(x, const, x), axis=axis, interleave=interleave)

    x = rand(2, 3, 4)
    if interleave:
        expected = np.stack([x, const, x], axis=axis % 3 + 1).reshape(prog.functions["main"].outputs[0].shape)
        # out[i * 3 + j] along axis is input j's slice i.
        np.testing.assert_array_equal(np.take(expected, [1], axis=axis), np.take(const, [0], axis=axis))
    else:
        expected = np.concatenate([x, const, x], axis=axis)
    np.testing.assert_array_equal(run_program(prog, x=x), expected)


def test_tile_and_gather() -> None:
    indices = np.array([[2, -1], [0, 1]], np.int32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 4, 3))], opset_version=IOS16)
    def prog(x):
        return (
            mb.tile(x=x, reps=[2, 1, 3]),
            mb.gather(x=x, indices=indices, axis=1),
            mb.gather(x=x, indices=[1, 0]),
        )

    x = rand(2, 4, 3)
    tiled, gathered, gathered0 = run_program(prog, x=x)
    np.testing.assert_array_equal(tiled, np.tile(x, (2, 1, 3)))
    np.testing.assert_array_equal(gathered, np.take(x, indices, axis=1))
    np.testing.assert_array_equal(gathered0, x[[1, 0]])


# ------------------------------------------------------------ integer arithmetic, comparisons, masks


@pytest.mark.parametrize("dtype", [types.int32, types.fp32, types.fp16])
def test_floor_div(dtype) -> None:
    """Rounds toward negative infinity (python's //), for ints as for floats; -7 // 2 is -4, not -3. An fp16
    quotient past 2048 is rounded as fp16 stores it (8188 // 3 = 2729 is stored as 2728)."""
    np_dtype = types.nptype_from_builtin(dtype)
    y = np.array([2, -3, 4, 3], np_dtype)

    @mb.program(input_specs=[mb.TensorSpec(shape=(3, 4), dtype=dtype)], opset_version=IOS16)
    def prog(x):
        return mb.floor_div(x=x, y=y)

    x = np.array([[-7, 7, -1, 10], [0, -9, 9, -11], [749, -750, 1500, 8188]], np_dtype)
    got = run_program(prog, x=x)
    assert got.dtype == np_dtype
    np.testing.assert_array_equal(got, np.floor_divide(x, y))


COMPARISONS = [
    ("equal", np.equal),
    ("not_equal", np.not_equal),
    ("less", np.less),
    ("less_equal", np.less_equal),
    ("greater", np.greater),
    ("greater_equal", np.greater_equal),
]


@pytest.mark.parametrize(("op", "reference"), COMPARISONS, ids=[c[0] for c in COMPARISONS])
@pytest.mark.parametrize("dtype", [types.int32, types.fp32])
def test_comparisons(op, reference, dtype) -> None:
    np_dtype = types.nptype_from_builtin(dtype)
    y = np.arange(5, dtype=np_dtype) - 2  # broadcast along the last dim

    @mb.program(input_specs=[mb.TensorSpec(shape=(3, 5), dtype=dtype)], opset_version=IOS16)
    def prog(x):
        return getattr(mb, op)(x=x, y=y)

    x = np.array([[-2, -1, 0, 1, 2], [0, 0, 0, 0, 0], [2, 1, 0, -1, -2]], np_dtype)
    got = run_program(prog, x=x)
    assert got.dtype == np.bool_
    np.testing.assert_array_equal(got, reference(x, y))


@pytest.mark.parametrize(
    ("op", "reference"),
    [("logical_and", np.logical_and), ("logical_or", np.logical_or), ("logical_xor", np.logical_xor)],
)
def test_logical_binary(op, reference) -> None:
    y = np.array([True, False], np.bool_)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 2), dtype=types.bool)], opset_version=IOS16)
    def prog(x):
        return getattr(mb, op)(x=x, y=y)

    x = np.array([[True, True], [False, False]])
    np.testing.assert_array_equal(run_program(prog, x=x), reference(x, y))


def test_logical_not() -> None:
    @mb.program(input_specs=[mb.TensorSpec(shape=(3,), dtype=types.bool)], opset_version=IOS16)
    def prog(x):
        return mb.logical_not(x=x)

    x = np.array([True, False, True])
    np.testing.assert_array_equal(run_program(prog, x=x), ~x)


def test_select_broadcasts_cond_a_and_b() -> None:
    b = rand(1, 4, seed=1)

    @mb.program(
        input_specs=[mb.TensorSpec(shape=(3, 1), dtype=types.bool), mb.TensorSpec(shape=(3, 4))],
        opset_version=IOS16,
    )
    def prog(cond, a):
        return mb.select(cond=cond, a=a, b=b), mb.select(cond=cond, a=np.float32(-1e4), b=a)

    cond, a = np.array([[True], [False], [True]]), rand(3, 4)
    picked, filled = run_program(prog, cond=cond, a=a)
    np.testing.assert_array_equal(picked, np.where(cond, a, b))
    np.testing.assert_array_equal(filled, np.where(cond, np.float32(-1e4), a))


def test_cast_to_narrow_integers_wraps_like_c() -> None:
    """iOS18 programs route gather indices through int16; int-to-int casts keep the low bits."""

    @mb.program(input_specs=[mb.TensorSpec(shape=(4,), dtype=types.int32)], opset_version=IOS17)
    def prog(x):
        return (
            mb.cast(x=mb.cast(x=x, dtype="int16"), dtype="int32"),
            mb.cast(x=mb.cast(x=x, dtype="int8"), dtype="int32"),
            mb.cast(x=mb.cast(x=x, dtype="uint8"), dtype="int32"),
            mb.cast(x=mb.cast(x=x, dtype="uint16"), dtype="int32"),
        )

    x = np.array([-3, 749, 40000, 300], np.int32)
    as_int16, as_int8, as_uint8, as_uint16 = run_program(prog, x=x)
    np.testing.assert_array_equal(as_uint16, x.astype(np.uint16))  # held as int32: -3 must still wrap to 65533
    np.testing.assert_array_equal(as_int16, x.astype(np.int16))
    np.testing.assert_array_equal(as_int8, x.astype(np.int8))
    np.testing.assert_array_equal(as_uint8, x.astype(np.uint8))


def test_fill_like() -> None:
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))], opset_version=IOS16)
    def prog(x):
        return mb.fill_like(ref_tensor=x, value=np.float32(-2.5)), mb.fill_like(ref_tensor=x)

    filled, zeros = run_program(prog, x=rand(2, 3))
    np.testing.assert_array_equal(filled, np.full((2, 3), -2.5, np.float32))
    np.testing.assert_array_equal(zeros, np.zeros((2, 3), np.float32))


def test_gather_along_axis() -> None:
    """numpy's take_along_axis: indices match x's shape but along axis, where they may be fewer (and negative)."""
    along1 = np.array([[[0, 1, 2, 3], [-1, 0, 3, 1], [2, 2, 2, 2]]] * 2, np.int32)  # 3 picks of 4 rows
    along_last = np.swapaxes(along1, 1, 2)  # 3 picks of 4 columns

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 4, 4))], opset_version=IOS16)
    def prog(x):
        return mb.gather_along_axis(x=x, indices=along1, axis=1), mb.gather_along_axis(x=x, indices=along_last, axis=-1)

    x = rand(2, 4, 4)
    got1, got_last = run_program(prog, x=x)
    np.testing.assert_array_equal(got1, np.take_along_axis(x, along1 % 4, axis=1))
    np.testing.assert_array_equal(got_last, np.take_along_axis(x, along_last % 4, axis=-1))


@pytest.mark.parametrize(("kwargs", "index"), SLICE_CASES)
def test_slice_update(execute, kwargs, index) -> None:
    """The region slice_by_index reads (every SLICE_CASES form) is replaced; the rest of x is kept."""
    update = rand(*np.zeros((6, 3, 5))[index].shape, seed=1)

    @mb.program(input_specs=[mb.TensorSpec(shape=(6, 3, 5))], opset_version=IOS18)
    def prog(x):
        return mb.slice_update(x=x, update=update, **kwargs)

    x = rand(6, 3, 5)
    expected = x.copy()
    expected[index] = update
    np.testing.assert_array_equal(execute(prog, x=x), expected)


def test_slice_update_at_a_position_given_at_run_time() -> None:
    """The streaming write: begin/end computed from an int32 input, as torch.export converts
    `cache[..., i:i+k] = new`."""

    @mb.program(
        input_specs=[mb.TensorSpec(shape=(1, 2, 8)), mb.TensorSpec(shape=(1, 2, 3)), mb.TensorSpec((1,), types.int32)],
        opset_version=IOS18,
    )
    def prog(cache, new, idx):
        i = mb.slice_by_index(x=idx, begin=[0], end=[1], squeeze_mask=[True])
        begin = mb.concat(values=(np.int32(0), np.int32(0), i), axis=0)
        end = mb.concat(values=(np.int32(1), np.int32(2), mb.add(x=i, y=np.int32(3))), axis=0)
        return mb.slice_update(x=cache, update=new, begin=begin, end=end)

    model = load_program(prog)
    cache, new = rand(1, 2, 8), rand(1, 2, 3, seed=1)
    for i in (0, 2, 5):
        expected = cache.copy()
        expected[..., i : i + 3] = new
        got = model.predict({"cache": cache, "new": new, "idx": np.array([i], np.int32)})
        np.testing.assert_array_equal(got[model.outputs[0].name], expected)


def test_concat_of_scalars_is_a_vector() -> None:
    @mb.program(input_specs=[mb.TensorSpec((2,), types.int32)], opset_version=IOS16)
    def prog(x):
        first = mb.slice_by_index(x=x, begin=[0], end=[1], squeeze_mask=[True])
        return mb.concat(values=(np.int32(7), first, np.int32(9)), axis=0)

    got = run_program(prog, x=np.array([4, 5], np.int32))
    assert got.shape == (3,)
    np.testing.assert_array_equal(got, [7, 4, 9])


# -------------------------------------------------------------------------------------- states (iOS18)


def accumulator() -> Program:
    """acc += x; returns (acc before, acc after * 2): the read before the write must see the old contents."""

    @mb.program(
        input_specs=[mb.TensorSpec((1, 4), types.fp16), mb.StateTensorSpec((1, 4), types.fp16)],
        opset_version=IOS18,
    )
    def prog(x, acc):
        before = mb.read_state(input=acc)
        after = mb.coreml_update_state(state=acc, value=mb.add(x=before, y=x))
        return mb.identity(x=before), mb.mul(x=after, y=np.float16(2))

    return prog


@pytest.mark.parametrize("form", ["program", "package"])
def test_state_ops_keep_values_across_predictions(form, tmp_path: Path) -> None:
    prog = accumulator()
    model = load_program(prog) if form == "program" else load_package(save(prog, tmp_path / "acc.mlpackage"))
    assert model.states == (TensorInfo("acc", (1, 4), "fp16"),)
    assert [info.name for info in model.inputs] == ["x"]
    state = model.make_state()
    np.testing.assert_array_equal(state.read_state("acc"), np.zeros((1, 4), np.float16))  # Core ML zero-fills
    xs = [rand(1, 4, seed=s).astype(np.float16) for s in range(4)]
    acc = np.zeros((1, 4), np.float16)
    for x in xs:
        results = model.predict({"x": x}, state=state)
        before, doubled = (results[o.name] for o in model.outputs)
        np.testing.assert_array_equal(before, acc)
        acc = acc + x  # float16 addition rounds each sum, as the device's fp16 state does
        np.testing.assert_array_equal(doubled, acc * np.float16(2))
        np.testing.assert_array_equal(state.read_state("acc"), acc)
    fresh = model.make_state()  # a new state starts from zeros, the old one is untouched
    np.testing.assert_array_equal(model.predict({"x": xs[0]}, state=fresh)[model.outputs[1].name], xs[0] * 2)
    np.testing.assert_array_equal(state.read_state("acc"), acc)


def test_state_write_read_and_errors() -> None:
    model = load_program(accumulator())
    state = model.make_state()
    state.write_state("acc", np.full((1, 4), 3.0, np.float16))
    x = np.ones((1, 4), np.float16)
    np.testing.assert_array_equal(model.predict({"x": x}, state=state)[model.outputs[0].name], 3.0)
    with pytest.raises(VoxtralError, match=r"keeps states \['acc'\]: pass state=model.make_state\(\)"):
        model.predict({"x": x})
    with pytest.raises(VoxtralError, match=r"state 'acc' must be a float16 array \(fp16\), got float32"):
        state.write_state("acc", np.zeros((1, 4), np.float32))
    with pytest.raises(VoxtralError, match=r"state 'acc' has shape \(4,\), expected \(1, 4\)"):
        state.write_state("acc", np.zeros(4, np.float16))
    with pytest.raises(VoxtralError, match=r"no state named 'kv'; states: \['acc'\]"):
        state.read_state("kv")
    stateless = load_program(accumulator_free())
    with pytest.raises(VoxtralError, match=r"the state passed holds \[\('acc', \(1, 4\)\)\].*keeps \[\]"):
        stateless.predict({"x": rand(2)}, state=state)
    assert stateless.make_state().infos == ()


def accumulator_free() -> Program:
    @mb.program(input_specs=[mb.TensorSpec((2,))], opset_version=IOS18)
    def prog(x):
        return mb.relu(x=x)

    return prog


def test_a_failed_prediction_leaves_the_state_unchanged() -> None:
    """The state is committed only after the last op ran: a stream can retry a step that raised."""

    @mb.program(
        input_specs=[
            mb.TensorSpec((2,), types.fp16),
            mb.TensorSpec((1,), types.int32),
            mb.StateTensorSpec((2,), types.fp16),
        ],
        opset_version=IOS18,
    )
    def prog(x, i, acc):
        updated = mb.coreml_update_state(state=acc, value=mb.add(x=mb.read_state(input=acc), y=x))
        # A position past the end fails after the state was written.
        return mb.slice_update(x=updated, update=np.zeros(1, np.float16), begin=i, end=mb.add(x=i, y=1), name="poke")

    model = load_program(prog)
    state = model.make_state()
    x = np.ones(2, np.float16)
    model.predict({"x": x, "i": np.array([0], np.int32)}, state=state)
    with pytest.raises(
        VoxtralError,
        match=r"op slice_update 'poke' failed: slice_update: update of shape \(1,\) for a region of shape \(0,\)",
    ):
        model.predict({"x": x, "i": np.array([5], np.int32)}, state=state)
    np.testing.assert_array_equal(state.read_state("acc"), [1, 1])


# ------------------------------------------------------------------------- weight decompression ops


def pack_lsb_first(values: np.ndarray, nbits: int) -> np.ndarray:
    """Written from the iOS16 spec text: bits fill each byte from its LSB up, spilling into the next byte."""
    bits = [(int(v) >> k) & 1 for v in values.ravel() for k in range(nbits)]
    bits += [0] * (-len(bits) % 8)
    return np.array([sum(bit << k for k, bit in enumerate(bits[i : i + 8])) for i in range(0, len(bits), 8)], np.uint8)


def decompressed(program: Program, execute: Callable[..., Any], shape: tuple[int, ...]) -> np.ndarray:
    """The weight a program adds to its zero input, i.e. the decompressed constant itself."""
    return execute(program, x=np.zeros(shape, np.float32))


@pytest.mark.parametrize("nbits", [1, 2, 4, 6, 8])
def test_ios16_lut_to_dense(execute, nbits) -> None:
    shape = (3, 7)  # 21 entries: packed indices end mid-byte
    rng = np.random.default_rng(nbits)
    indices = rng.integers(0, 2**nbits, shape)
    lut = rng.normal(size=2**nbits).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=shape)], opset_version=IOS16)
    def prog(x):
        w = mb.constexpr_lut_to_dense(indices=pack_lsb_first(indices, nbits), lut=lut, shape=np.array(shape, np.uint32))
        return mb.add(x=x, y=w)

    np.testing.assert_array_equal(decompressed(prog, execute, shape), lut[indices])


def test_ios16_sparse_to_dense(execute) -> None:
    shape = (3, 5)
    dense = rand(*shape) * (np.random.default_rng(1).random(shape) > 0.5)

    @mb.program(input_specs=[mb.TensorSpec(shape=shape)], opset_version=IOS16)
    def prog(x):
        w = mb.constexpr_sparse_to_dense(
            nonzero_data=dense[dense != 0],
            mask=pack_lsb_first(dense != 0, 1),
            shape=np.array(shape, np.uint32),
        )
        return mb.add(x=x, y=w)

    np.testing.assert_array_equal(decompressed(prog, execute, shape), dense)


@pytest.mark.parametrize(
    ("dtype", "axis", "per_channel"),
    [
        (np.int8, 0, True),
        (np.uint8, 1, True),
        (np.int8, -1, True),
        (np.uint8, 0, False),
    ],
)
def test_ios16_affine_dequantize(execute, dtype, axis, per_channel) -> None:
    shape = (3, 4)
    info = np.iinfo(dtype)
    data = np.random.default_rng(2).integers(info.min, info.max + 1, shape).astype(dtype)
    n = shape[axis] if per_channel else 1
    scale = rand(n, seed=3, low=0.01, high=0.1)
    zero_point = np.random.default_rng(4).integers(info.min, info.max + 1, n).astype(dtype)
    if not per_channel:
        scale, zero_point = scale[0], zero_point[0]

    @mb.program(input_specs=[mb.TensorSpec(shape=shape)], opset_version=IOS16)
    def prog(x):
        w = mb.constexpr_affine_dequantize(quantized_data=data, zero_point=zero_point, scale=scale, axis=axis)
        return mb.add(x=x, y=w)

    along = [-1 if d == axis % 2 else 1 for d in range(2)] if per_channel else [1, 1]
    expected = (data.astype(np.float32) - np.reshape(zero_point, along)) * np.reshape(scale, along)
    np.testing.assert_allclose(decompressed(prog, execute, shape), expected, rtol=1e-6)


def test_constexpr_cast(execute) -> None:
    source = rand(2, 3).astype(np.float16)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))], opset_version=IOS16)
    def prog(x):
        return mb.add(x=x, y=mb.constexpr_cast(source_val=source, output_dtype="fp32"))

    np.testing.assert_array_equal(decompressed(prog, execute, (2, 3)), source.astype(np.float32))


@pytest.mark.parametrize(
    ("dtype", "offset"),
    [
        (types.np_int4_dtype, False),
        (types.np_uint4_dtype, True),
        (np.int8, False),
        (np.uint8, True),
    ],
)
def test_ios18_blockwise_shift_scale(execute, dtype, offset) -> None:
    shape, scale_shape = (4, 6), (2, 3)  # blocks of 2x2
    lo, hi = {"int4": (-8, 8), "uint4": (0, 16), "int8": (-128, 128), "uint8": (0, 256)}[
        types.builtin_to_string(types.numpy_type_to_builtin_type(dtype))
    ]
    rng = np.random.default_rng(5)
    data = rng.integers(lo, hi, shape).astype(dtype)
    scale = rand(*scale_shape, seed=6, low=0.01, high=0.1)
    shift = rng.integers(lo, hi, scale_shape).astype(dtype)
    extra = {"offset": shift} if offset else {}

    @mb.program(input_specs=[mb.TensorSpec(shape=shape)], opset_version=IOS18)
    def prog(x):
        return mb.add(x=x, y=mb.constexpr_blockwise_shift_scale(data=data, scale=scale, **extra))

    expected = data.astype(np.float32)
    if offset:
        expected = expected - np.kron(shift.astype(np.float32), np.ones((2, 2), np.float32))
    expected = expected * np.kron(scale, np.ones((2, 2), np.float32))
    np.testing.assert_allclose(decompressed(prog, execute, shape), expected, rtol=1e-6)


def test_ios18_lut_to_dense_grouped_and_vector(execute) -> None:
    rng = np.random.default_rng(7)
    # Scalar LUTs in a 2x3 grid of groups over a [4, 6] weight: each 2x2 block has its own 4 entries.
    indices = rng.integers(0, 4, (4, 6))
    lut = rng.normal(size=(2, 3, 4, 1)).astype(np.float32)
    # One LUT of 2-vectors, filled along axis 0: indices [2, 3] give a [4, 3] weight.
    vec_indices = rng.integers(0, 2, (2, 3))
    vec_lut = rng.normal(size=(1, 1, 2, 2)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(4, 6)), mb.TensorSpec(shape=(4, 3))], opset_version=IOS18)
    def prog(x, z):
        grouped = mb.constexpr_lut_to_dense(indices=indices.astype(types.np_uint2_dtype), lut=lut)
        vector = mb.constexpr_lut_to_dense(indices=vec_indices.astype(types.np_uint1_dtype), lut=vec_lut, vector_axis=0)
        return mb.add(x=x, y=grouped), mb.add(x=z, y=vector)

    grouped, vector = execute(prog, x=np.zeros((4, 6), np.float32), z=np.zeros((4, 3), np.float32))
    expected = np.empty((4, 6), np.float32)
    for i in range(4):
        for j in range(6):
            expected[i, j] = lut[i // 2, j // 2, indices[i, j], 0]
    np.testing.assert_array_equal(grouped, expected)
    expected_vector = np.empty((4, 3), np.float32)
    for i in range(2):
        for j in range(3):
            expected_vector[2 * i : 2 * i + 2, j] = vec_lut[0, 0, vec_indices[i, j]]
    np.testing.assert_array_equal(vector, expected_vector)


def test_ios18_sparse_ops(execute) -> None:
    rng = np.random.default_rng(8)
    mask = rng.random((4, 6)) > 0.4
    values = rand(int(mask.sum()), seed=9)
    q = rng.integers(-128, 128, int(mask.sum())).astype(np.int8)
    scale = rand(2, 1, seed=10, low=0.01, high=0.1)  # per block of 2 rows
    lut_idx = rng.integers(0, 4, int(mask.sum())).astype(types.np_uint2_dtype)
    lut = rng.normal(size=(1, 1, 4, 1)).astype(np.float32)
    uint1_mask = mask.astype(types.np_uint1_dtype)

    @mb.program(input_specs=[mb.TensorSpec(shape=(4, 6))], opset_version=IOS18)
    def prog(x):
        plain = mb.constexpr_sparse_to_dense(nonzero_data=values, mask=uint1_mask)
        q_mask, q_values = mb.constexpr_sparse_blockwise_shift_scale(data_mask=uint1_mask, nonzero_data=q, scale=scale)
        l_mask, l_values = mb.constexpr_lut_to_sparse(indices_mask=uint1_mask, indices_nonzero_data=lut_idx, lut=lut)
        quantized = mb.constexpr_sparse_to_dense(nonzero_data=q_values, mask=q_mask)
        palettized = mb.constexpr_sparse_to_dense(nonzero_data=l_values, mask=l_mask)
        return mb.add(x=x, y=plain), mb.add(x=x, y=quantized), mb.add(x=x, y=palettized)

    plain, quantized, palettized = execute(prog, x=np.zeros((4, 6), np.float32))
    expected_plain = np.zeros((4, 6), np.float32)
    expected_plain[mask] = values
    np.testing.assert_array_equal(plain, expected_plain)
    dense_q = np.zeros((4, 6), np.float32)
    dense_q[mask] = q
    np.testing.assert_allclose(quantized, dense_q * np.repeat(scale, 2, axis=0), rtol=1e-6)
    expected_pal = np.zeros((4, 6), np.float32)
    expected_pal[mask] = lut[0, 0, lut_idx.astype(np.int64), 0]
    np.testing.assert_array_equal(palettized, expected_pal)


# ------------------------------------------------------------------------ runtime behaviour, errors


def test_unknown_op_names_type_and_op(tmp_path: Path) -> None:
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))], opset_version=IOS16)
    def prog(x):
        return mb.cumsum(x=mb.relu(x=x), axis=0, name="running_total")

    with pytest.raises(VoxtralError, match=r"'cumsum' \(op 'running_total'\)"):
        load_program(prog)
    path = save(prog, tmp_path / "unknown.mlpackage")
    with pytest.raises(VoxtralError, match=r"unknown\.mlpackage.*'cumsum' \(op 'running_total'\)"):
        load_package(path)


def test_op_types_count_nested_blocks() -> None:
    @mb.program(
        input_specs=[mb.TensorSpec(shape=(1,), dtype=types.bool), mb.TensorSpec(shape=(2,))],
        opset_version=IOS16,
    )
    def prog(p, x):
        return mb.cond(pred=mb.squeeze(x=p), _true_fn=lambda: mb.add(x=x, y=1.0), _false_fn=lambda: mb.mul(x=x, y=2.0))

    counts = program_op_types(prog)
    assert (counts["cond"], counts["add"], counts["mul"], counts["squeeze"]) == (1, 1, 1, 1)
    assert "cond" not in SUPPORTED_OPS
    with pytest.raises(VoxtralError, match=r"'cond' \(op 'cond_0'\)"):
        load_program(prog)


def test_intermediates_are_freed_after_last_use() -> None:
    @mb.program(input_specs=[mb.TensorSpec(shape=(4,))], opset_version=IOS16)
    def prog(x):
        y = x
        for _ in range(30):
            y = mb.add(x=mb.relu(x=y), y=x)
        return y

    model = load_program(prog)
    assert model.peak_live_intermediates <= 2
    x = rand(4)
    expected = x
    for _ in range(30):
        expected = np.maximum(expected, 0) + x
    np.testing.assert_allclose(model.predict({"x": x})[model.outputs[0].name], expected, rtol=1e-6)


def test_constant_subgraphs_are_folded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"add": 0, "constexpr_cast": 0}
    for op in calls:
        kernel = milrun_plan.KERNELS[op]

        def counting(a, kernel=kernel, op=op):
            calls[op] += 1
            return kernel(a)

        monkeypatch.setitem(milrun_plan.KERNELS, op, counting)

    @mb.program(input_specs=[mb.TensorSpec(shape=(3,))], opset_version=IOS16)
    def prog(x):
        w = mb.constexpr_cast(source_val=np.ones(3, np.float16), output_dtype="fp32")
        folded = mb.add(x=w, y=np.full(3, 2.0, np.float32))  # constant: evaluated at load time
        return mb.add(x=x, y=folded)

    model = load_program(prog)
    assert calls == {"add": 1, "constexpr_cast": 1}
    for _ in range(3):
        np.testing.assert_array_equal(model.predict({"x": np.zeros(3, np.float32)})[model.outputs[0].name], 3.0)
    assert calls == {"add": 4, "constexpr_cast": 1}


def test_a_failing_op_is_named() -> None:
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))], opset_version=IOS16)
    def prog(x):
        return mb.gather(x=x, indices=np.zeros((2, 1), np.int32), axis=1, batch_dims=1, name="batched_pick")

    model = load_program(prog)
    with pytest.raises(VoxtralError, match=r"op gather 'batched_pick' failed: gather with batch_dims != 0"):
        model.predict({"x": rand(2, 3)})


def test_predict_checks_inputs() -> None:
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))], opset_version=IOS16)
    def prog(x):
        return mb.relu(x=x)

    model = load_program(prog)
    assert model.inputs == (TensorInfo("x", (2, 3), "fp32"),)
    assert model.deployment_target == "iOS16"
    with pytest.raises(VoxtralError, match="missing input 'x'"):
        model.predict({})
    with pytest.raises(VoxtralError, match=r"unknown inputs \['y'\]"):
        model.predict({"x": rand(2, 3), "y": rand(2, 3)})
    with pytest.raises(VoxtralError, match=r"must be a float32 array.*got float64"):
        model.predict({"x": rand(2, 3).astype(np.float64)})
    with pytest.raises(VoxtralError, match=r"has shape \(3, 2\), expected \(2, 3\)"):
        model.predict({"x": rand(3, 2)})


# ------------------------------------------------------------------- packages of an encoder in small


class ChannelNorm(nn.Module):
    """LayerNorm over dim 1 of (B, C, 1, S), written as mean / var arithmetic like the ANE module."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.bias = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centered = x - x.mean(dim=1, keepdim=True)
        normed = centered * torch.rsqrt(centered.pow(2).mean(dim=1, keepdim=True) + 1e-5)
        return normed * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class Layer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.head_dim = d // heads
        self.norm1, self.norm2 = ChannelNorm(d), ChannelNorm(d)
        self.q, self.k, self.v, self.o = (nn.Conv2d(d, d, 1, bias=name != "k") for name in "qkvo")
        self.fc1, self.fc2 = nn.Conv2d(d, ffn, 1), nn.Conv2d(ffn, d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        q, k, v = self.q(y) * self.head_dim**-0.5, self.k(y), self.v(y)
        heads = []
        for qh, kh, vh in zip(
            q.split(self.head_dim, 1), k.split(self.head_dim, 1), v.split(self.head_dim, 1), strict=True
        ):
            weights = torch.einsum("bchq,bkhc->bkhq", qh, kh.transpose(1, 3)).softmax(dim=1)
            heads.append(torch.einsum("bkhq,bchk->bchq", weights, vh))
        x = x + self.o(torch.cat(heads, dim=1))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyEncoder(nn.Module):
    """The encoder + projector's structure at toy width: (B, C, 1, S) layout, 1x1 convs, per-head einsums."""

    def __init__(self, n_mels: int, frames: int, d: int = 32, heads: int = 2, layers: int = 2, hidden: int = 48):
        super().__init__()
        self.conv1 = nn.Conv2d(n_mels, d, (1, 3), padding=(0, 1))
        self.conv2 = nn.Conv2d(d, d, (1, 3), stride=(1, 2), padding=(0, 1))
        self.positions = nn.Parameter(0.1 * torch.randn(1, d, 1, frames // 2))
        self.layers = nn.ModuleList(Layer(d, heads, 2 * d) for _ in range(layers))
        self.norm = ChannelNorm(d)
        self.proj1 = nn.Conv2d(d, hidden, (1, 4), stride=(1, 4), bias=False)
        self.proj2 = nn.Conv2d(hidden, hidden, 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(mel.unsqueeze(2)))
        x = F.gelu(self.conv2(x)) + self.positions
        for layer in self.layers:
            x = layer(x)
        return self.proj2(F.gelu(self.proj1(self.norm(x)))).squeeze(2).permute(0, 2, 1)


def convert(
    module: nn.Module,
    mel: torch.Tensor,
    precision: ct.precision,
    target: ct.target,
    io_dtype: type = np.float32,
) -> ct.models.MLModel:
    program = torch.export.export(module, (mel,)).run_decompositions({})
    return ct.convert(
        program,
        inputs=[ct.TensorType(name="mel_spectrogram", shape=tuple(mel.shape), dtype=io_dtype)],
        outputs=[ct.TensorType(name="audio_embeddings", dtype=io_dtype)],
        convert_to="mlprogram",
        compute_precision=precision,
        minimum_deployment_target=target,
    )


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float32) - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The toy encoder on the real [1, 128, 3000] input, as fp32- and fp16-precision packages."""
    torch.manual_seed(0)
    module = TinyEncoder(n_mels=128, frames=3000).eval()
    mel = torch.randn(1, 128, 3000)
    with torch.no_grad():
        reference = module(mel).numpy()
    folder = tmp_path_factory.mktemp("encoder")
    return {
        "mel": mel.numpy(),
        "reference": reference,
        "fp32": save(convert(module, mel, ct.precision.FLOAT32, IOS16), folder / "fp32.mlpackage"),
        "fp16": save(convert(module, mel, ct.precision.FLOAT16, IOS16), folder / "fp16.mlpackage"),
    }


def test_encoder_fp32_package_matches_torch(encoder) -> None:
    model = load_package(encoder["fp32"])
    assert model.inputs == (TensorInfo("mel_spectrogram", (1, 128, 3000), "fp32"),)
    assert model.outputs == (TensorInfo("audio_embeddings", (1, 375, 48), "fp32"),)
    assert (model.deployment_target, model.spec_version) == ("iOS16", 7)
    out = model.predict({"mel_spectrogram": encoder["mel"]})["audio_embeddings"]
    assert out.dtype == np.float32
    assert relative_error(out, encoder["reference"]) < 1e-5


def test_encoder_fp16_package_matches_torch_to_fp16_precision(encoder) -> None:
    model = load_package(encoder["fp16"])
    counts = op_counts(model)
    assert set(counts) <= SUPPORTED_OPS
    assert counts["einsum"] == 8 and counts["softmax"] == 4 and counts["conv"] >= 12  # 2 layers x 2 heads
    out = model.predict({"mel_spectrogram": encoder["mel"]})["audio_embeddings"]
    error = relative_error(out, encoder["reference"])
    fp32_error = relative_error(
        load_package(encoder["fp32"]).predict({"mel_spectrogram": encoder["mel"]})["audio_embeddings"],
        encoder["reference"],
    )
    assert 1e-4 < error < 5e-3  # fp16 storage shows, and stays at fp16's precision
    assert error > 10 * fp32_error


def test_package_errors_name_the_package(encoder, tmp_path: Path) -> None:
    with pytest.raises(VoxtralError, match=r"not an \.mlpackage directory"):
        load_package(tmp_path / "absent.mlpackage")

    missing = Path(shutil.copytree(encoder["fp32"], tmp_path / "missing.mlpackage"))
    (missing / "Data/com.apple.CoreML/weights/weight.bin").unlink()
    with pytest.raises(VoxtralError, match=r"missing\.mlpackage: cannot rebuild.*weight\.bin"):
        load_package(missing)

    truncated = Path(shutil.copytree(encoder["fp32"], tmp_path / "truncated.mlpackage"))
    spec_file = truncated / "Data/com.apple.CoreML/model.mlmodel"
    spec_file.write_bytes(spec_file.read_bytes()[: spec_file.stat().st_size // 2])
    with pytest.raises(VoxtralError, match=r"truncated\.mlpackage: model spec model\.mlmodel is missing or corrupt"):
        load_package(truncated)

    short_weights = Path(shutil.copytree(encoder["fp32"], tmp_path / "short.mlpackage"))
    weights = short_weights / "Data/com.apple.CoreML/weights/weight.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(VoxtralError, match=r"short\.mlpackage: cannot rebuild"):
        load_package(short_weights)

    no_manifest = Path(shutil.copytree(encoder["fp32"], tmp_path / "nomanifest.mlpackage"))
    (no_manifest / "Manifest.json").unlink()
    with pytest.raises(VoxtralError, match=r"nomanifest\.mlpackage: unreadable Manifest\.json"):
        load_package(no_manifest)


def test_flipping_weight_bytes_changes_predictions(encoder, tmp_path: Path) -> None:
    """Predictions read the package's weight.bin: corrupting one weight there changes them."""
    package = Path(shutil.copytree(encoder["fp32"], tmp_path / "flipped.mlpackage"))
    model = load_package(package)
    conv1 = next(op for op in model.program.functions["main"].operations if op.op_type == "conv")
    weight_name = conv1.inputs["weight"].name
    before = model.constant(weight_name)
    # The blob metadata at the const's offset: sentinel, dtype, size in bytes, then the data's own offset.
    spec = ct.utils.load_spec(str(package))
    const = next(
        op
        for op in spec.mlProgram.functions["main"].block_specializations["CoreML6"].operations
        if op.type == "const" and op.outputs[0].name == weight_name
    )
    weights = package / "Data/com.apple.CoreML/weights/weight.bin"
    blob = bytearray(weights.read_bytes())
    meta = const.attributes["val"].blobFileValue.offset
    data_offset = int(np.frombuffer(bytes(blob[meta + 16 : meta + 24]), np.uint64)[0])
    blob[data_offset + 3] ^= 0x40  # the exponent byte of the first fp32 weight
    weights.write_bytes(bytes(blob))

    flipped = load_package(package)
    changed = flipped.constant(weight_name) != before
    assert changed.sum() == 1 and changed.ravel()[0]
    mel = {"mel_spectrogram": encoder["mel"]}
    delta = np.abs(flipped.predict(mel)["audio_embeddings"] - model.predict(mel)["audio_embeddings"]).max()
    assert delta > 1e-3


# ------------------------------------------------------------------------------ compressed packages


@pytest.fixture(scope="module")
def small_encoder() -> dict[str, Any]:
    """A toy encoder small enough to compress quickly, converted for iOS16 and iOS18 at fp16 precision."""
    torch.manual_seed(1)
    module = TinyEncoder(n_mels=16, frames=64, layers=1, hidden=32).eval()
    mel = torch.randn(1, 16, 64)
    return {
        "module": module,
        "mel": mel,
        IOS16: convert(module, mel, ct.precision.FLOAT16, IOS16),
        IOS18: convert(module, mel, ct.precision.FLOAT16, IOS18),
    }


def quantize(**kwargs: Any) -> Callable[[ct.models.MLModel], ct.models.MLModel]:
    config = cto.OptimizationConfig(cto.OpLinearQuantizerConfig(weight_threshold=0, **kwargs))
    return lambda model: cto.linear_quantize_weights(model, config)


def palettize(**kwargs: Any) -> Callable[[ct.models.MLModel], ct.models.MLModel]:
    config = cto.OptimizationConfig(cto.OpPalettizerConfig(mode="kmeans", weight_threshold=0, **kwargs))
    return lambda model: cto.palettize_weights(model, config)


def prune(
    then: Callable[..., Any] | None = None, **then_kwargs: Any
) -> Callable[[ct.models.MLModel], ct.models.MLModel]:
    """50% magnitude pruning, optionally followed by joint quantization or palettization of what is left."""
    config = cto.OptimizationConfig(cto.OpMagnitudePrunerConfig(target_sparsity=0.5, weight_threshold=0))

    def apply(model: ct.models.MLModel) -> ct.models.MLModel:
        pruned = cto.prune_weights(model, config)
        if then is None:
            return pruned
        joint = cto.OptimizationConfig(then(weight_threshold=0, **then_kwargs))
        compress = cto.linear_quantize_weights if then is cto.OpLinearQuantizerConfig else cto.palettize_weights
        return compress(pruned, joint, joint_compression=True)

    return apply


# (name, base target, compression, the constexpr op types it must produce)
COMPRESSIONS = [
    (
        "int8-per-channel",
        IOS16,
        quantize(mode="linear_symmetric", granularity="per_channel", dtype="int8"),
        {"constexpr_affine_dequantize"},
    ),
    (
        "uint8-per-tensor",
        IOS16,
        quantize(mode="linear", granularity="per_tensor", dtype="uint8"),
        {"constexpr_affine_dequantize"},
    ),
    *[
        (
            f"lut{n}-per-tensor",
            IOS16,
            palettize(nbits=n, granularity="per_tensor"),
            {"constexpr_lut_to_dense"},
        )
        for n in (2, 4, 6, 8)
    ],
    ("sparse", IOS16, prune(), {"constexpr_sparse_to_dense"}),
    (
        "int4-per-block",
        IOS18,
        quantize(mode="linear_symmetric", granularity="per_block", block_size=8, dtype="int4"),
        {"constexpr_blockwise_shift_scale"},
    ),
    (
        "uint4-per-block",
        IOS18,
        quantize(mode="linear", granularity="per_block", block_size=8, dtype="uint4"),
        {"constexpr_blockwise_shift_scale"},
    ),
    (
        "int8-per-channel-ios18",
        IOS18,
        quantize(mode="linear_symmetric", granularity="per_channel", dtype="int8"),
        {"constexpr_blockwise_shift_scale"},
    ),
    *[
        (
            f"lut{n}-grouped",
            IOS18,
            palettize(nbits=n, granularity="per_grouped_channel", group_size=8),
            {"constexpr_lut_to_dense"},
        )
        for n in (2, 4, 8)
    ],
    ("lut4-vector", IOS18, palettize(nbits=4, cluster_dim=2), {"constexpr_lut_to_dense"}),
    (
        "lut4-channel-scale",
        IOS18,
        palettize(nbits=4, enable_per_channel_scale=True),
        {"constexpr_lut_to_dense", "constexpr_blockwise_shift_scale"},
    ),
    ("sparse-ios18", IOS18, prune(), {"constexpr_sparse_to_dense"}),
    (
        "sparse-int8",
        IOS18,
        prune(cto.OpLinearQuantizerConfig, mode="linear_symmetric", dtype="int8"),
        {"constexpr_sparse_blockwise_shift_scale", "constexpr_sparse_to_dense"},
    ),
    (
        "sparse-lut4",
        IOS18,
        prune(cto.OpPalettizerConfig, nbits=4, mode="kmeans"),
        {"constexpr_lut_to_sparse", "constexpr_sparse_to_dense"},
    ),
]


def coremltools_decompressed(path: Path) -> Program:
    """The package's program with every constexpr op replaced by coremltools' own numpy decompression."""
    program = read_package(path).program
    WeightDecompressor(op_selector=lambda op: True).apply(program)
    return program


def with_program_weights(module: TinyEncoder, program: Program) -> TinyEncoder:
    """A copy of the torch module carrying the program's weights: conv weights in forward order, positions."""
    module = copy.deepcopy(module)
    main = program.functions["main"]
    queries = [layer.q for layer in module.layers]
    convs = [
        module.conv1,
        module.conv2,
        *(conv for layer in module.layers for conv in (layer.q, layer.k, layer.v, layer.o, layer.fc1, layer.fc2)),
        module.proj1,
        module.proj2,
    ]
    conv_ops = [op for op in main.operations if op.op_type == "conv"]
    assert len(conv_ops) == len(convs)
    with torch.no_grad():
        for op, conv in zip(conv_ops, convs, strict=True):
            weight = torch.from_numpy(op.inputs["weight"].val.astype(np.float32))
            if any(conv is q for q in queries):
                weight = weight / module.layers[0].head_dim ** -0.5  # conversion folds q's scaling into q's conv
            assert np.corrcoef(weight.ravel(), conv.weight.ravel())[0, 1] > 0.8  # the right conv
            conv.weight.copy_(weight)
        positions = next(
            var
            for op in main.operations
            if op.op_type == "add"
            for var in op.inputs.values()
            if var.val is not None and var.shape == tuple(module.positions.shape)
        )
        module.positions.copy_(torch.from_numpy(positions.val.astype(np.float32)))
    return module


@pytest.mark.parametrize(("name", "target", "compress", "op_types"), COMPRESSIONS, ids=[c[0] for c in COMPRESSIONS])
def test_compressed_package(small_encoder, tmp_path: Path, name, target, compress, op_types) -> None:
    path = save(compress(small_encoder[target]), tmp_path / f"{name}.mlpackage")
    model = load_package(path)
    counts = op_counts(model)
    assert op_types <= set(counts), counts
    assert set(counts) <= SUPPORTED_OPS

    # Every weight a compute op reads equals coremltools' own decompression of it, bit for bit.
    reference = coremltools_decompressed(path)
    expected = {
        op.outputs[0].name: op.outputs[0].val for op in reference.functions["main"].operations if op.op_type == "const"
    }
    decompressed = {
        var.name
        for op in model.program.functions["main"].operations
        if not op.op_type.startswith("constexpr_")
        for var in op.inputs.values()
        if not isinstance(var, list | tuple) and var.op is not None and var.op.op_type.startswith("constexpr_")
    }
    assert len(decompressed) >= 10  # the 10 conv weights (and the positions, where compressible)
    for var_name in decompressed:
        np.testing.assert_array_equal(model.constant(var_name), expected[var_name].astype(np.float32), var_name)

    # And the model computes what torch computes with those weights, to fp16 precision.
    with torch.no_grad():
        want = with_program_weights(small_encoder["module"], reference)(small_encoder["mel"]).numpy()
    got = model.predict({"mel_spectrogram": small_encoder["mel"].numpy()})["audio_embeddings"]
    assert relative_error(got, want) < 5e-3


# Which test checks each supported op's semantics against an independent computation. Together with
# test_pipeline.py's walk over the demo's packages (every op there is in SUPPORTED_OPS), this keeps every op
# that ships covered by a per-op test.
OP_SEMANTICS_TESTS = {
    "conv": test_conv, "matmul": test_matmul, "linear": test_linear, "einsum": test_einsum,
    "softmax": test_softmax, "layer_norm": test_layer_norm, "batch_norm": test_batch_norm,
    "gelu": test_gelu, "cast": test_cast_between_fp32_fp16_int32_bool, "transpose": test_transpose,
    "reshape": test_reshape, "expand_dims": test_expand_dims_and_squeeze, "squeeze": test_expand_dims_and_squeeze,
    "slice_by_index": test_slice_by_index, "slice_by_size": test_slice_by_size, "split": test_split,
    "concat": test_concat, "tile": test_tile_and_gather, "gather": test_tile_and_gather, "const": test_conv,
    **dict.fromkeys(("reduce_mean", "reduce_sum", "reduce_max", "reduce_min"), test_reductions),
    **dict.fromkeys(("add", "sub", "mul", "real_div", "pow", "maximum", "minimum"), test_binary_broadcasting),
    **dict.fromkeys(
        ("sqrt", "rsqrt", "inverse", "log", "exp", "erf", "tanh", "sigmoid", "silu", "square", "abs", "relu",
         "identity", "clip"),
        test_unary,
    ),
    "constexpr_lut_to_dense": test_ios18_lut_to_dense_grouped_and_vector,
    "constexpr_sparse_to_dense": test_ios16_sparse_to_dense,
    "constexpr_affine_dequantize": test_ios16_affine_dequantize,
    "constexpr_cast": test_constexpr_cast,
    "constexpr_blockwise_shift_scale": test_ios18_blockwise_shift_scale,
    "constexpr_sparse_blockwise_shift_scale": test_ios18_sparse_ops,
    "constexpr_lut_to_sparse": test_ios18_sparse_ops,
    "floor_div": test_floor_div, "select": test_select_broadcasts_cond_a_and_b, "fill_like": test_fill_like,
    **dict.fromkeys((c[0] for c in COMPARISONS), test_comparisons),
    **dict.fromkeys(("logical_and", "logical_or", "logical_xor"), test_logical_binary),
    "logical_not": test_logical_not, "gather_along_axis": test_gather_along_axis, "slice_update": test_slice_update,
    **dict.fromkeys(("read_state", "coreml_update_state"), test_state_ops_keep_values_across_predictions),
}  # fmt: skip


def test_every_supported_op_has_a_semantics_test() -> None:
    assert set(OP_SEMANTICS_TESTS) == SUPPORTED_OPS
    unary_ops = {case[0] for case in UNARY_CASES}
    assert {op for op, test in OP_SEMANTICS_TESTS.items() if test is test_unary} <= unary_ops
