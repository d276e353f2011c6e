"""Fuzzing the parsers of files that come from elsewhere: safetensors headers, checkpoint configs (transformers'
and MLX's), manifests and indexes.

Every input either parses or raises VoxtralError (a one-line message naming the file): never another
exception type, never a hang. Bounded to fit CI: EXAMPLES inputs per parser, each under HANG_S seconds.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from voxtral_coreml.check.milrun.package import _root_model_path
from voxtral_coreml.check.validate import read_manifest
from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.sources.hub import _read_weight_map
from voxtral_coreml.sources.layouts.hf import hf_dims
from voxtral_coreml.sources.layouts.mlx_quant import module_params, quantization_section
from voxtral_coreml.sources.safetensors_io import DTYPES, TensorSpec, encode_header, read_header

EXAMPLES = 500  # per parser: 8 parsers, 4 000 generated inputs in all
HANG_S = 5  # one input taking longer than this is a hang
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # a loaded CI machine is slow, not hung: HANG_S decides that
    derandomize=True,  # CI runs the same inputs every time; a failure is reproducible
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
DEEP = b"[" * 100_000 + b"]" * 100_000  # nesting past Python's recursion limit
HUGE_NUMBER = b'{"a": {"dtype": "F32", "shape": [1' + b"0" * 5000 + b'], "data_offsets": [0, 4]}}'  # past int()'s limit


@contextlib.contextmanager
def no_hang(seconds: int = HANG_S) -> Iterator[None]:
    def hung(signum: int, frame: object) -> None:
        raise TimeoutError(f"a parser took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def parses_or_refuses(parse: Callable[[], object]) -> object | None:
    """parse(): its result, or None when it raised VoxtralError; any other exception fails the test."""
    with no_hang():
        try:
            return parse()
        except VoxtralError as e:
            assert str(e) and "\n" not in str(e)  # one line, as the CLI prints it
            return None


# ---------------------------------------------------------------- strategies

# JSON numbers as parsers meet them: small, negative, past 64 bits, floats, bools (which Python counts as ints).
numbers = st.one_of(
    st.integers(-3, 4096), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True), st.booleans()
)
json_values = st.recursive(
    st.none() | numbers | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=24,
)


def json_bytes(value: object) -> bytes:
    # allow_nan: Python's json reads NaN/Infinity back, so a file may hold them.
    return json.dumps(value, allow_nan=True).encode()


def one_of_or_junk(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly plausible values, sometimes anything at all."""
    return st.one_of(valid, valid, valid, json_values)


tensor_entries = st.fixed_dictionaries(
    {
        "dtype": one_of_or_junk(st.sampled_from([*DTYPES, "F8_E4M3", "f32", ""])),
        "shape": one_of_or_junk(st.lists(numbers, max_size=4)),
        "data_offsets": one_of_or_junk(st.lists(numbers, min_size=0, max_size=3)),
    }
)
headers = st.dictionaries(
    st.sampled_from(["__metadata__", "audio_tower.a", "audio_tower.b", "x"]) | st.text(max_size=8),
    one_of_or_junk(tensor_entries),
    max_size=5,
)


def _valid_safetensors() -> bytes:
    specs = [TensorSpec("audio_tower.a", torch.float16, (4, 2)), TensorSpec("audio_tower.b", torch.float32, (3,))]
    return encode_header(specs, {"format": "pt"}) + bytes(range(28))


VALID_SAFETENSORS = _valid_safetensors()


@st.composite
def damaged_safetensors(draw: st.DrawFn) -> bytes:
    """A valid file, then truncated, with bytes overwritten, or with another header length."""
    data = bytearray(VALID_SAFETENSORS)
    damage = draw(st.sampled_from(["truncate", "overwrite", "length"]))
    if damage == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if damage == "overwrite":
        at = draw(st.integers(0, len(data) - 1))
        patch = draw(st.binary(min_size=1, max_size=8))
        data[at : at + len(patch)] = patch
        return bytes(data)
    length = draw(st.integers(0, 2**64 - 1) | st.integers(0, len(data)))
    return struct.pack("<Q", length) + bytes(data[8:])


# ---------------------------------------------------------------- safetensors


def read_safetensors(path: Path, content: bytes) -> object | None:
    path.write_bytes(content)
    return parses_or_refuses(lambda: read_header(path))


@FUZZ
@given(content=st.binary(max_size=256))
@example(content=b"")
@example(content=struct.pack("<Q", 2**64 - 1))
@example(content=struct.pack("<Q", len(DEEP)) + DEEP)
@example(content=struct.pack("<Q", len(HUGE_NUMBER)) + HUGE_NUMBER)
def test_fuzz_safetensors_arbitrary_bytes(tmp_path: Path, content: bytes) -> None:
    read_safetensors(tmp_path / "model.safetensors", content)


@FUZZ
@given(content=damaged_safetensors())
def test_fuzz_safetensors_damaged_file(tmp_path: Path, content: bytes) -> None:
    read_safetensors(tmp_path / "model.safetensors", content)


@FUZZ
@given(header=headers, data_size=st.integers(0, 64))
@example(header={"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, data_size=4)
def test_fuzz_safetensors_header(tmp_path: Path, header: dict, data_size: int) -> None:
    raw = json_bytes(header)
    tensors = read_safetensors(tmp_path / "model.safetensors", struct.pack("<Q", len(raw)) + raw + bytes(data_size))
    if tensors is not None:  # what parses is sound: inside the data, no overlap, sizes that match
        spans = sorted((t.begin, t.end) for t in tensors.values() if t.nbytes)
        assert all(8 + len(raw) <= begin <= end <= 8 + len(raw) + data_size for begin, end in spans)
        assert all(a_end <= b_begin for (_, a_end), (b_begin, _) in itertools.pairwise(spans))


# ---------------------------------------------------------------- checkpoint configs

audio_configs = st.dictionaries(
    st.sampled_from(
        [
            "hidden_size",
            "d_model",
            "num_hidden_layers",
            "encoder_layers",
            "num_attention_heads",
            "intermediate_size",
            "num_mel_bins",
            "encoder_attention_heads",
        ]
    ),
    numbers,
    max_size=8,
)
hf_configs = st.fixed_dictionaries(
    {},
    optional={
        "audio_config": one_of_or_junk(audio_configs),
        "text_config": one_of_or_junk(st.fixed_dictionaries({}, optional={"hidden_size": numbers})),
        "quantization": one_of_or_junk(st.dictionaries(st.sampled_from(["bits", "group_size", "mode"]), numbers)),
    },
)


@FUZZ
@given(config=one_of_or_junk(hf_configs))
@example(
    config={
        "audio_config": {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 0, "intermediate_size": 8},
        "text_config": {"hidden_size": 8},
    }
)
def test_fuzz_checkpoint_config(tmp_path: Path, config: object) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(json_bytes(config))
    parses_or_refuses(lambda: hf_dims(path))


quantization_entries = st.one_of(
    st.booleans(),
    st.dictionaries(st.sampled_from(["bits", "group_size", "mode"]), one_of_or_junk(st.sampled_from([2, 4, 64]))),
    json_values,
)
mlx_configs = st.dictionaries(
    st.sampled_from(["quantization", "quantization_config"]),
    one_of_or_junk(
        st.dictionaries(
            st.sampled_from(["bits", "group_size", "mode", "quant_method", "audio_tower.layers.0.fc1"]),
            quantization_entries,
        )
    ),
)


@FUZZ
@given(config=mlx_configs, module=st.sampled_from(["audio_tower.layers.0.fc1", "audio_tower.conv1"]))
def test_fuzz_mlx_quantization_config(tmp_path: Path, config: dict, module: str) -> None:
    path = tmp_path / "config.json"
    parsed = parses_or_refuses(lambda: module_params(quantization_section(config, path), module, path))
    if parsed is not None:
        assert parsed.bits in (1, 2, 3, 4, 5, 6, 8) and parsed.group_size in (32, 64, 128)


# ---------------------------------------------------------------- manifests and indexes

io_entries = st.fixed_dictionaries(
    {
        "name": one_of_or_junk(st.text(max_size=8)),
        "dtype": one_of_or_junk(st.just("float32")),
        "shape": one_of_or_junk(st.lists(st.integers(-1, 3000), max_size=3)),
    }
)
manifests = st.fixed_dictionaries(
    {},
    optional={
        "package": one_of_or_junk(st.sampled_from(["X.mlpackage", "../X.mlpackage", "/X.mlpackage", "a\\X.mlpackage"])),
        "inputs": one_of_or_junk(st.lists(io_entries, max_size=2)),
        "outputs": one_of_or_junk(st.lists(io_entries, max_size=2)),
        "deployment_target": one_of_or_junk(
            st.fixed_dictionaries(
                {"coreml": one_of_or_junk(st.sampled_from(["iOS16", "iOS18", "iOS99"]))},
                optional={"ios": json_values, "macos": json_values},
            )
        ),
        "size_bytes": numbers,
        "dims": json_values,
        "recipe": one_of_or_junk(st.fixed_dictionaries({}, optional={"name": json_values})),
        "source": json_values,
    },
)


@FUZZ
@given(manifest=one_of_or_junk(manifests))
def test_fuzz_package_manifest(tmp_path: Path, manifest: object) -> None:
    path = tmp_path / "manifest.json"
    path.write_bytes(json_bytes(manifest))
    parsed = parses_or_refuses(lambda: read_manifest(path))
    if parsed is not None:  # the package it names is beside it, whatever the manifest says
        assert (path.parent / parsed["package"]).parent == path.parent


coreml_manifests = st.fixed_dictionaries(
    {},
    optional={
        "rootModelIdentifier": one_of_or_junk(st.just("root")),
        "itemInfoEntries": one_of_or_junk(
            st.dictionaries(
                st.sampled_from(["root", "other"]),
                one_of_or_junk(
                    st.fixed_dictionaries(
                        {},
                        optional={
                            "path": one_of_or_junk(
                                st.sampled_from(
                                    [
                                        "com.apple.CoreML/model.mlmodel",
                                        "../../evil",
                                        "/etc/passwd",
                                        "a/../../b",
                                        "",
                                        ".",
                                    ]
                                )
                            )
                        },
                    )
                ),
            )
        ),
    },
)


@FUZZ
@given(manifest=one_of_or_junk(coreml_manifests))
@example(manifest={"rootModelIdentifier": "r", "itemInfoEntries": {"r": {"path": "../../evil"}}})
@example(manifest={"rootModelIdentifier": "r", "itemInfoEntries": {"r": {"path": "/etc/passwd"}}})
def test_fuzz_coreml_package_manifest(tmp_path: Path, manifest: object) -> None:
    package = tmp_path / "X.mlpackage"
    package.mkdir(exist_ok=True)
    (package / "Manifest.json").write_bytes(json_bytes(manifest))
    spec = parses_or_refuses(lambda: _root_model_path(package))
    if spec is not None:  # a hostile manifest cannot point outside the package
        assert spec.resolve().is_relative_to((package / "Data").resolve())


indexes = st.fixed_dictionaries(
    {},
    optional={
        "metadata": json_values,
        "weight_map": one_of_or_junk(
            st.dictionaries(
                st.text(max_size=8),
                one_of_or_junk(
                    st.sampled_from(
                        [
                            "model-1.safetensors",
                            "../evil.safetensors",
                            "/evil.safetensors",
                            "a\\b.safetensors",
                            "./x.safetensors",
                            "x.bin",
                            "missing.safetensors",
                        ]
                    )
                ),
                max_size=4,
            )
        ),
    },
)
REPO_FILES = frozenset({"model-1.safetensors", "model.safetensors.index.json"})


@FUZZ
@given(index=one_of_or_junk(indexes))
@example(index={"weight_map": {"a": "../evil.safetensors"}})
def test_fuzz_remote_safetensors_index(tmp_path: Path, index: object) -> None:
    path = tmp_path / "model.safetensors.index.json"
    path.write_bytes(json_bytes(index))
    repo = SimpleNamespace(label=lambda name: f"org/repo/{name}", files=REPO_FILES, commit="0" * 40)
    weight_map = parses_or_refuses(lambda: _read_weight_map(repo, path))
    if weight_map is not None:  # only the repo's own shard files, by their plain names
        assert set(weight_map.values()) <= REPO_FILES


@pytest.mark.parametrize("content", [b"\xff\xfe garbage", DEEP, b"NaN", b'"text"'])
def test_fuzz_targets_refuse_non_objects(tmp_path: Path, content: bytes) -> None:
    """The handful of inputs every JSON reader must refuse, whatever hypothesis draws."""
    path = tmp_path / "file.json"
    path.write_bytes(content)
    repo = SimpleNamespace(label=lambda name: name, files=REPO_FILES, commit="0" * 40)
    for parse in (lambda: hf_dims(path), lambda: read_manifest(path), lambda: _read_weight_map(repo, path)):
        with no_hang(), pytest.raises(VoxtralError):
            parse()
