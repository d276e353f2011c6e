"""Stateful and multifunction packages converted by coremltools from torch modules, run by the MIL runtime
across several calls and compared with the modules' own stateful results."""

import shutil
from pathlib import Path
from typing import Any

import coremltools as ct
import coremltools.optimize.coreml as cto
import numpy as np
import pytest
import torch
from torch import nn

from voxtral_coreml.check.milrun import MilModel, load_package, op_counts
from voxtral_coreml.export.package_info import SPEC_FILE, ane_report, package_structure
from voxtral_coreml.pipeline.errors import VoxtralError

C, L, K, CONTEXT = 8, 6, 4, 2  # channels, ring slots, tokens per call (4 does not divide 6: writes wrap), conv context
STEPS = 5  # 20 tokens through 6 slots: the ring wraps three times


class StreamingToy(nn.Module):
    """The streaming step in miniature: a causal conv's left context (the whole buffer rewritten each call), a
    ring buffer written at a position given as an int32 input (wrapping past the end), and attention of the new
    tokens over the slots written so far."""

    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj
        self.register_buffer("conv_state", torch.zeros(1, CONTEXT, C))
        self.register_buffer("ring", torch.zeros(1, L, C))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)  # [1, K, C]
        full = torch.cat([self.conv_state, h], dim=1)
        self.conv_state.copy_(full[:, K:])
        conv = full[:, 2:] + full[:, 1:-1] + full[:, :-2]  # a 3-tap causal sum over the context and the new tokens
        slots = torch.arange(L, dtype=torch.int32)
        age = torch.remainder(slots - pos, L)  # slot j receives new token age[j] when age[j] < K
        fresh = age < K
        incoming = torch.index_select(h, 1, torch.where(fresh, age, torch.zeros_like(age)))
        ring = torch.where(fresh.reshape(1, L, 1), incoming, self.ring)
        self.ring.copy_(ring)
        written = slots < pos + K  # before the first wrap only the slots below pos + K hold tokens
        scores = (h @ ring.transpose(1, 2)).masked_fill(torch.logical_not(written), float("-inf"))
        return torch.softmax(scores, dim=-1) @ ring + conv


class SliceWriteToy(nn.Module):
    """A cache written with a plain slice at a run-time position (`cache[:, i:i+K] = new`): slice_update."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("cache", torch.zeros(1, 2 * K, C))

    def forward(self, x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        i = slot[0].item()
        torch._check(i >= 0)
        torch._check(i + K <= 2 * K)
        self.cache[:, i : i + K] = x * 2
        return self.cache.sum(dim=1) + 0


class Offline(nn.Module):
    """The stateless companion of a multifunction package: the same projection over a whole window."""

    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def convert(module: nn.Module, example: tuple[torch.Tensor, ...], names: list[str], precision: Any) -> Any:
    """torch.export (the path that keeps run-time write positions dynamic) then ct.convert with every mutated
    buffer as an fp16 state, iOS18."""
    program = torch.export.export(module.eval(), example).run_decompositions({})
    inputs = [
        ct.TensorType(name=name, shape=tuple(t.shape), dtype=np.int32 if t.dtype == torch.int32 else np.float32)
        for name, t in zip(names, example, strict=True)
    ]
    states = [
        ct.StateType(wrapped_type=ct.TensorType(shape=tuple(b.shape), dtype=np.float16), name=name)
        for name, b in module.named_buffers()
    ]
    return ct.convert(
        program,
        inputs=inputs,
        states=states or None,
        outputs=[ct.TensorType(name="out", dtype=np.float32)],
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=precision,
    )


def chunks(seed: int, count: int = STEPS) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, (1, K, C)).astype(np.float32) for _ in range(count)]


def torch_stream(module: nn.Module, xs: list[np.ndarray]) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """The module's own stateful results: outputs per call, then its buffers."""
    for buffer in module.buffers():
        buffer.zero_()
    with torch.no_grad():
        outs = [module(torch.from_numpy(x), torch.tensor([K * t], dtype=torch.int32)).numpy() for t, x in enumerate(xs)]
    return outs, {name: b.numpy().copy() for name, b in module.named_buffers()}


def runtime_stream(model: MilModel, xs: list[np.ndarray]) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    state = model.make_state()
    outs = [model.predict({"x": x, "pos": np.array([K * t], np.int32)}, state=state)["out"] for t, x in enumerate(xs)]
    return outs, {info.name: state.read_state(info.name) for info in model.states}


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The toy converted at fp32 and fp16 compute precision, and an offline package sharing its projection."""
    torch.manual_seed(0)
    proj = nn.Linear(C, C)
    module = StreamingToy(proj)
    example = (torch.zeros(1, K, C), torch.zeros(1, dtype=torch.int32))
    root = tmp_path_factory.mktemp("stateful")
    packages = {}
    for name, precision in (("fp32", ct.precision.FLOAT32), ("fp16", ct.precision.FLOAT16)):
        packages[name] = root / f"step_{name}.mlpackage"
        convert(module, example, ["x", "pos"], precision).save(str(packages[name]))
    packages["offline"] = root / "offline.mlpackage"
    convert(Offline(proj), (torch.zeros(1, 3 * K, C),), ["x"], ct.precision.FLOAT16).save(str(packages["offline"]))
    return {"module": module, "packages": packages, "root": root}


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_converted_program_keeps_its_state_in_core_ml_state_ops(toy) -> None:
    model = load_package(toy["packages"]["fp16"])
    assert {(s.name, s.shape, s.dtype) for s in model.states} == {("conv_state", (1, CONTEXT, C), "fp16"),
                                                                  ("ring", (1, L, C), "fp16")}  # fmt: skip
    assert [info.name for info in model.inputs] == ["x", "pos"]
    counts = op_counts(model)
    assert counts["read_state"] == 2 and counts["coreml_update_state"] == 2
    assert {"floor_div", "select", "less", "gather", "logical_not", "softmax"} <= set(counts)


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-3), ("fp16", 4e-3)])
def test_stream_matches_the_torch_module_call_by_call(toy, precision, tolerance) -> None:
    """Outputs and final buffers agree with torch's through three wraps of the ring; fp32 compute differs only
    by the fp16 state storage."""
    xs = chunks(seed=1)
    want, want_buffers = torch_stream(toy["module"], xs)
    got, got_buffers = runtime_stream(load_package(toy["packages"][precision]), xs)
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert relative_error(g, w) < tolerance, f"call {step}"
    for name, buffer in want_buffers.items():
        assert relative_error(got_buffers[name].astype(np.float32), buffer) < tolerance, name


def test_state_carries_information_between_calls(toy) -> None:
    """A call's output depends on the earlier calls (through the state), and a fresh state restarts the stream."""
    model = load_package(toy["packages"]["fp16"])
    xs, other = chunks(seed=1), chunks(seed=2)
    stream, _ = runtime_stream(model, xs)
    diverted, _ = runtime_stream(model, other[:2] + xs[2:])
    assert not np.array_equal(stream[2], diverted[2])
    again, _ = runtime_stream(model, xs)  # a new make_state(): the same outputs as the first stream
    for first, second in zip(stream, again, strict=True):
        np.testing.assert_array_equal(first, second)


def test_slice_write_at_a_run_time_position(tmp_path: Path) -> None:
    """`cache[:, i:i+K] = new` (torch.export) becomes a slice_update whose bounds come from the input."""
    module = SliceWriteToy()
    path = tmp_path / "slice.mlpackage"
    example = (torch.zeros(1, K, C), torch.zeros(1, dtype=torch.int32))
    convert(module, example, ["x", "slot"], ct.precision.FLOAT32).save(str(path))
    model = load_package(path)
    assert op_counts(model)["slice_update"] == 1
    state = model.make_state()
    for t, x in enumerate(chunks(seed=3, count=4)):
        slot = np.array([K * (t % 2)], np.int32)
        with torch.no_grad():
            want = module(torch.from_numpy(x), torch.from_numpy(slot)).numpy()
        got = model.predict({"x": x, "slot": slot}, state=state)["out"]
        assert relative_error(got, want) < 2e-3
    np.testing.assert_allclose(state.read_state("cache"), module.cache.numpy(), rtol=1e-3)


def weight_bytes(package: Path) -> int:
    return sum(f.stat().st_size for f in (package / "Data" / "com.apple.CoreML" / "weights").iterdir())


def package_bytes(package: Path) -> int:
    return sum(f.stat().st_size for f in package.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def multifunction(toy) -> Path:
    desc = ct.utils.MultiFunctionDescriptor()
    desc.add_function(str(toy["packages"]["offline"]), src_function_name="main", target_function_name="offline")
    desc.add_function(str(toy["packages"]["fp16"]), src_function_name="main", target_function_name="step")
    desc.default_function_name = "step"
    path = toy["root"] / "multi.mlpackage"
    ct.utils.save_multifunction(desc, str(path))
    return path


def test_multifunction_functions_run_by_name(toy, multifunction) -> None:
    """Each function of the multifunction package computes exactly what its single-function source does."""
    offline, step = (load_package(multifunction, function_name=name) for name in ("offline", "step"))
    assert (offline.function_name, offline.states) == ("offline", ())
    assert load_package(multifunction).function_name == "step"  # the package's default function
    window = np.random.default_rng(4).uniform(-1, 1, (1, 3 * K, C)).astype(np.float32)
    np.testing.assert_array_equal(
        offline.predict({"x": window})["out"], load_package(toy["packages"]["offline"]).predict({"x": window})["out"]
    )
    xs = chunks(seed=5)
    for got, want in zip(runtime_stream(step, xs)[0], runtime_stream(load_package(toy["packages"]["fp16"]), xs)[0],
                         strict=True):  # fmt: skip
        np.testing.assert_array_equal(got, want)
    with pytest.raises(VoxtralError, match=r"multi\.mlpackage: the ML program has no 'prefill' function \(it has"
                       r" \['offline', 'step'\]\)"):  # fmt: skip
        load_package(multifunction, function_name="prefill")


def test_multifunction_stores_shared_weights_once(toy, multifunction) -> None:
    offline, step = weight_bytes(toy["packages"]["offline"]), weight_bytes(toy["packages"]["fp16"])
    assert weight_bytes(multifunction) == max(offline, step)  # the projection once, not once per function
    assert package_bytes(multifunction) < package_bytes(toy["packages"]["offline"]) + package_bytes(
        toy["packages"]["fp16"]
    )


def test_int8_functions_share_their_quantized_weights(toy) -> None:
    """Compressed the same way (int8, iOS18), the two functions' quantized weights are stored once, and each
    function decompresses and computes exactly what its source package does."""
    config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(weight_threshold=0))
    root = toy["root"] / "int8"
    root.mkdir()
    sources = {}
    for name in ("offline", "fp16"):
        sources[name] = root / f"{name}.mlpackage"
        cto.linear_quantize_weights(ct.models.MLModel(str(toy["packages"][name]), skip_model_load=True), config).save(
            str(sources[name])
        )
    desc = ct.utils.MultiFunctionDescriptor()
    desc.add_function(str(sources["offline"]), src_function_name="main", target_function_name="offline")
    desc.add_function(str(sources["fp16"]), src_function_name="main", target_function_name="step")
    desc.default_function_name = "step"
    multi = root / "multi.mlpackage"
    ct.utils.save_multifunction(desc, str(multi))
    assert weight_bytes(multi) == weight_bytes(sources["fp16"]) < weight_bytes(toy["packages"]["fp16"])
    offline = load_package(multi, function_name="offline")
    assert "constexpr_blockwise_shift_scale" in op_counts(offline)
    window = np.random.default_rng(6).uniform(-1, 1, (1, 3 * K, C)).astype(np.float32)
    np.testing.assert_array_equal(
        offline.predict({"x": window})["out"], load_package(sources["offline"]).predict({"x": window})["out"]
    )
    xs = chunks(seed=7)
    got, _ = runtime_stream(load_package(multi), xs)
    for g, w in zip(got, runtime_stream(load_package(sources["fp16"]), xs)[0], strict=True):
        np.testing.assert_array_equal(g, w)


def test_package_structure_describes_states_and_functions(toy, multifunction) -> None:
    states = [
        {"name": "conv_state", "shape": [1, CONTEXT, C], "dtype": "float16", "bytes": CONTEXT * C * 2},
        {"name": "ring", "shape": [1, L, C], "dtype": "float16", "bytes": L * C * 2},
    ]
    single = package_structure(toy["packages"]["fp16"])
    assert single["states"] == states and "functions" not in single
    assert [i["name"] for i in single["inputs"]] == ["x", "pos"]
    assert package_structure(toy["packages"]["offline"])["states"] == []

    multi = package_structure(multifunction)
    assert multi["default_function"] == "step" and multi["spec_version"] == 9
    assert set(multi["functions"]) == {"offline", "step"}
    assert multi["functions"]["step"] == {key: single[key] for key in ("inputs", "outputs", "states", "ops")}
    assert multi["functions"]["offline"]["states"] == [] and multi["functions"]["offline"]["ops"].get("linear") == 1
    assert {key: multi[key] for key in ("inputs", "states", "ops")} == {
        key: single[key] for key in ("inputs", "states", "ops")
    }  # the top level describes the default function
    assert ane_report(multifunction)["ops"] == single["ops"]


def test_a_default_function_the_program_lacks_is_named(multifunction, tmp_path: Path) -> None:
    broken = tmp_path / "broken.mlpackage"
    shutil.copytree(multifunction, broken)
    spec = ct.utils.load_spec(str(broken))
    spec.description.defaultFunctionName = "prefill"
    (broken / SPEC_FILE).write_bytes(spec.SerializeToString())
    with pytest.raises(VoxtralError, match=r"broken\.mlpackage: the ML program has no 'prefill' function"):
        package_structure(broken)
    with pytest.raises(VoxtralError, match=r"broken\.mlpackage: the ML program has no 'prefill' function"):
        load_package(broken)
    assert load_package(broken, function_name="offline").function_name == "offline"
    spec.description.defaultFunctionName = "step"
    spec.description.functions.add().name = "prefill"
    (broken / SPEC_FILE).write_bytes(spec.SerializeToString())
    with pytest.raises(VoxtralError, match=r"broken\.mlpackage: the spec describes functions \['prefill'\] its ML"):
        package_structure(broken)
