"""Compression recipes: each kind maps onto one `coremltools.optimize.coreml` config, applied to a converted program.

    fp16       nothing to do: conversion already stores fp16 weights
    linear     linear_quantize_weights (mode, dtype, granularity, block_size: coremltools' own fields)
    palettize  palettize_weights, k-means (nbits, granularity, group_size: coremltools' own fields)
    mixed      palettize_weights per tensor, each weight's nbits chosen by the sensitivity scan (sensitivity.py)

Only the weights of conv/linear/matmul ops with more than `weight_threshold` elements are compressed (coremltools'
meaning of the word): biases, norms, the positions table and small weights stay fp16.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from voxtral_coreml.pipeline.errors import VoxtralError

from .kmeans import KmeansLuts, LutsAhead, cluster_luts, kmeans_workers, lut_groups
from .mil_passes import compressed_pipeline
from .package_info import SPEC_VERSION

if TYPE_CHECKING:
    from coremltools.models import MLModel

    from .recipes import Recipe

log = logging.getLogger(__name__)

PALETTE_NBITS = (1, 2, 3, 4, 6, 8)  # what constexpr_lut_to_dense holds
LINEAR_NBITS = {"int8": 8, "int4": 4}
FP16_BITS = 16  # what every tensor a recipe leaves alone is stored as
WEIGHT_CONSUMERS = {"conv", "linear", "matmul"}  # the ops whose `weight` input a recipe compresses
# Grouped LUTs, blockwise scales and int4 exist only as iOS18's constexpr ops.
IOS18_FEATURES = {"per_grouped_channel", "per_block", "int4", "uint4"}
IOS18_SWITCHES = ("enable_per_channel_scale", "lut_dtype")
# A compressed copy of a weight keeps its direction (4-bit palettization: cosine ~0.99); unrelated tensors are ~0.
MATCH_COSINE = 0.9
MATCH_SAMPLES = 4096


@dataclass(frozen=True)
class Param:
    check: Callable[[Any], bool]
    expected: str


def _choice(*values: object) -> Param:
    return Param(lambda v: v in values, f"one of {', '.join(map(str, values))}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


NON_NEGATIVE_INT = Param(lambda v: _is_int(v) and v >= 0, "a non-negative integer")
POSITIVE_INT = Param(lambda v: _is_int(v) and v > 0, "a positive integer")
BIT_WIDTHS = Param(
    lambda v: isinstance(v, list) and len(set(v)) >= 2 and all(b in PALETTE_NBITS for b in v),
    f"a list of at least two bit widths from {', '.join(map(str, PALETTE_NBITS))}",
)
NUMBER = Param(lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number")
BOOL = Param(lambda v: isinstance(v, bool), "true or false")
CALIBRATION_KEYS = {
    "clips": POSITIVE_INT,
    "seconds": NUMBER,
    "first": NON_NEGATIVE_INT,
    "device": _choice("cpu", "cuda", "mps"),
}


def _is_calibration(v: Any) -> bool:
    if not isinstance(v, dict) or set(v) != set(CALIBRATION_KEYS):
        return False
    return all(p.check(v[k]) for k, p in CALIBRATION_KEYS.items()) and 0 < v["seconds"] <= 30


CALIBRATION = Param(_is_calibration, "{clips, seconds (at most 30), first, device (cpu, cuda or mps)}")


def _is_promote(v: Any) -> bool:
    if v is None:
        return True
    if not isinstance(v, dict) or set(v) != {"n_bits", "share"}:
        return False
    return v["n_bits"] in PALETTE_NBITS and NUMBER.check(v["share"]) and 0 < v["share"] <= 1


PROMOTE = Param(_is_promote, f"null or {{n_bits (one of {', '.join(map(str, PALETTE_NBITS))}), share (0 to 1]}}")
# Data-aware and torch-side recipes (torch_compress.py): coremltools.optimize.torch's own config fields.
PALETTIZER_PARAMS = {
    "weight_threshold": NON_NEGATIVE_INT,
    "n_bits": _choice(*PALETTE_NBITS),
    "granularity": _choice("per_tensor", "per_grouped_channel"),
    "enable_per_channel_scale": BOOL,
    "lut_dtype": _choice(None, "int8"),
}

KIND_PARAMS: dict[str, dict[str, Param]] = {
    "fp16": {},
    "linear": {
        "weight_threshold": NON_NEGATIVE_INT,
        "mode": _choice("linear_symmetric", "linear"),
        "dtype": _choice(*LINEAR_NBITS),
        "granularity": _choice("per_channel", "per_block"),
    },
    "palettize": {
        "weight_threshold": NON_NEGATIVE_INT,
        "nbits": _choice(*PALETTE_NBITS),
        "granularity": _choice("per_tensor", "per_grouped_channel"),
    },
    "mixed": {"weight_threshold": NON_NEGATIVE_INT, "candidate_bits": BIT_WIDTHS, "target_bits": NUMBER},
    "gptq": {
        "weight_threshold": NON_NEGATIVE_INT,
        "weight_dtype": _choice("uint4", "uint8"),
        "granularity": _choice("per_channel", "per_block"),
        "quantization_scheme": _choice("symmetric", "affine"),
        "use_activation_order_heuristic": BOOL,
        "hessian_dampening": NUMBER,
        "calibration": CALIBRATION,
    },
    "skm": {**PALETTIZER_PARAMS, "calibration": CALIBRATION, "promote": PROMOTE},
    "ptp": PALETTIZER_PARAMS,
}
GRANULARITY_PARAMS = {"per_block": "block_size", "per_grouped_channel": "group_size"}  # required with that one only


def validate_params(recipe: str, kind: str, params: dict[str, Any]) -> None:
    """Raise VoxtralError naming the recipe and key for an unknown kind, a missing or unknown key, or a bad value."""
    if kind not in KIND_PARAMS:
        raise VoxtralError(f"recipe '{recipe}': unsupported kind {kind!r}; choose one of {', '.join(KIND_PARAMS)}")
    schema = dict(KIND_PARAMS[kind])
    extra = GRANULARITY_PARAMS.get(params.get("granularity", ""))
    if extra:
        schema[extra] = POSITIVE_INT
    for key, spec in schema.items():
        if key not in params:
            raise VoxtralError(f"recipe '{recipe}': missing key '{key}' (kind {kind})")
        if not spec.check(params[key]):
            raise VoxtralError(f"recipe '{recipe}': {key} {params[key]!r} is not {spec.expected}")
    unknown = sorted(set(params) - set(schema))
    if unknown:
        raise VoxtralError(f"recipe '{recipe}': unknown key '{unknown[0]}' for kind {kind}")
    if kind == "mixed":
        target, candidates = params["target_bits"], params["candidate_bits"]
        if not min(candidates) <= target <= max(candidates):
            raise VoxtralError(f"recipe '{recipe}': target_bits {target} is outside candidate_bits {candidates}")
    if params.get("promote") and params["promote"]["n_bits"] <= params["n_bits"]:
        raise VoxtralError(f"recipe '{recipe}': promote.n_bits {params['promote']['n_bits']} is not above n_bits")


def required_target(params: dict[str, Any]) -> tuple[str, str]:
    """(the oldest Core ML target that holds this compression, the feature that needs it)."""
    for key in ("granularity", "dtype", "weight_dtype"):
        if params.get(key) in IOS18_FEATURES:
            return "iOS18", f"{key} {params[key]}"
    for key in IOS18_SWITCHES:  # per-channel scales on LUTs and int8 LUTs are iOS18's constexpr ops
        if params.get(key):
            return "iOS18", f"{key} {params[key]}"
    return "iOS16", "per-tensor and per-channel compression"


@contextmanager
def deterministic_kmeans() -> Iterator[None]:
    """coremltools' k-means is scikit-learn's KMeans(k-means++, n_init=1, random_state=0): seeded, but its Lloyd step
    splits the weights into chunks per OpenMP thread and adds the threads' partial centroids in lock order, so the
    rounding, and now and then a label, depends on the core count and on scheduling. One thread makes each LUT a
    function of the weights alone, whatever the core count."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


def kmeans_backend() -> str:
    """coremltools clusters large fp16 tensors with kmeans1d when it is installed: different (optimal) LUTs."""
    from coremltools._deps import _HAS_KMEANS1D

    return "kmeans1d" if _HAS_KMEANS1D else "scikit-learn"


def palettized(weight: torch.Tensor, nbits: int) -> torch.Tensor:
    """The weight as a per-tensor `palettize_weights` stores it (coremltools' own k-means on the fp16 values),
    decompressed to the weight's dtype (exact: LUT entries are fp16)."""
    from coremltools.optimize.coreml._quantization_passes import palettize_weights

    values = weight.detach().to(torch.float16).numpy()
    with deterministic_kmeans():
        lut_params = palettize_weights.blockwise_compress(values, "KMEANS", nbits, [0] * values.ndim)
    return torch.from_numpy(palettize_weights.decompress(lut_params).astype(np.float32)).to(weight.dtype)


def compressible_weights(model: torch.nn.Module, weight_threshold: int) -> dict[str, torch.nn.Parameter]:
    """Module name -> weight for the conv/linear weights a recipe compresses (biases and norms are rank 1)."""
    return {
        name.removesuffix(".weight"): p
        for name, p in model.named_parameters()
        if name.endswith(".weight") and p.dim() > 1 and p.numel() > weight_threshold
    }


def _feeds_a_weight(op, name: str) -> bool:
    return op.op_type in WEIGHT_CONSUMERS and op.params_name_mapping.get("weight") == name


def program_weights(mlmodel: MLModel, weight_threshold: int) -> dict[str, np.ndarray]:
    """Const op name -> value for the consts that feed a conv/linear/matmul `weight` and exceed the threshold."""
    import coremltools.optimize.coreml as cto

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metadata = cto.get_weights_metadata(mlmodel, weight_threshold)
    return {
        name: meta.val
        for name, meta in metadata.items()
        # get_weights_metadata keeps a weight of exactly weight_threshold elements, which the compression skips
        if meta.val.size > weight_threshold and any(_feeds_a_weight(op, name) for op in meta.child_ops)
    }


def _direction(values: np.ndarray) -> np.ndarray:
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    sample = flat[np.linspace(0, flat.size - 1, min(flat.size, MATCH_SAMPLES)).astype(np.int64)]
    return sample / (np.linalg.norm(sample) or 1.0)


def weight_op_names(mlmodel: MLModel, model: torch.nn.Module, weight_threshold: int) -> dict[str, str]:
    """Module name ("layers.0.fc1") -> the Core ML const op holding its weight, the key `op_name_configs` takes.

    Matched by shape and direction, not by name: names follow torch.export's attribute paths, which differ between
    a whole conversion (`p_layers_0_fc1_weight`) and a layered one's stages. Works on compressed programs
    once decompressed (`decompress_mlmodel`)."""
    consts = {name: (v.shape, _direction(v)) for name, v in program_weights(mlmodel, weight_threshold).items()}
    names: dict[str, str] = {}
    for op, weight in compressible_weights(model, weight_threshold).items():
        direction = _direction(weight.detach().numpy())
        scores = {c: abs(float(d @ direction)) for c, (shape, d) in consts.items() if shape == tuple(weight.shape)}
        best = max(scores, key=scores.__getitem__, default=None)
        if best is None or scores[best] < MATCH_COSINE:
            raise VoxtralError(f"no Core ML weight matches module weight '{op}' {list(weight.shape)}")
        names[op] = best
        del consts[best]
    if consts:
        raise VoxtralError(f"Core ML weight '{next(iter(consts))}' matches no module weight")
    return names


def program_lut_groups(mlmodel: MLModel, configs: dict[str, Any]) -> list[tuple[np.ndarray, int]]:
    """(values, nbits) of each LUT group of the weights `configs` (const op name -> k-means OpPalettizerConfig)
    names, with the block sizes coremltools' pass infers for each."""
    from coremltools.optimize._utils import infer_block_sizes

    groups = []
    for op in mlmodel._mil_program.functions["main"].operations:
        if op.name in configs:
            values = op.outputs[0].val
            block_sizes, axis = infer_block_sizes(op, configs[op.name], values, return_channel_axis=True)
            if block_sizes is not None:
                groups += [(group, configs[op.name].nbits) for group in lut_groups(values, block_sizes, axis)]
    return groups


def module_lut_groups(module: Callable[[], torch.nn.Module], recipe: Recipe) -> list[tuple[np.ndarray, int]]:
    """(values, nbits) of the LUT groups a `palettize` recipe will cluster, from the weights of `module()` as the
    program stores them (fp16, output channels first); other kinds: none (and the module is not asked for)."""
    if recipe.kind != "palettize":
        return []
    p = recipe.params
    group = {"per_tensor": 0, "per_channel": 1}.get(p["granularity"], p.get("group_size", 0))
    groups = []
    for weight in compressible_weights(module(), p["weight_threshold"]).values():
        values = weight.detach().to(torch.float16).numpy()
        groups += [(g, p["nbits"]) for g in lut_groups(values, [group] + [0] * (values.ndim - 1), 0)]
    return groups


@contextmanager
def clustering_ahead(
    module: Callable[[], torch.nn.Module], recipe: Recipe, jobs: int | None = None
) -> Iterator[LutsAhead]:
    """Clusters the LUT groups of `module()` (module_lut_groups) in the background while the caller converts it
    (`compress_mlmodel`'s `ahead`), on the CPUs the conversion leaves (one less than `jobs`)."""
    with LutsAhead(module_lut_groups(module, recipe), (jobs or kmeans_workers()) - 1) as ahead:
        yield ahead


def _palettizer_fields(recipe: Recipe, nbits: int) -> dict[str, Any]:
    if recipe.needs_scan:
        return {"weight_threshold": recipe.params["weight_threshold"], "granularity": "per_tensor", "nbits": nbits}
    return {**recipe.params, "nbits": nbits}


def _op_config(recipe: Recipe, nbits: int, luts: KmeansLuts | None = None):
    """The op's coremltools config. k-means: "kmeans" mode, or "custom" mode handing over the LUTs `cluster_luts`
    computed (the same LUTs)."""
    import coremltools.optimize.coreml as cto

    if recipe.kind == "linear":
        return cto.OpLinearQuantizerConfig(**recipe.params)
    fields = _palettizer_fields(recipe, nbits)
    if luts is None:
        return cto.OpPalettizerConfig(mode="kmeans", **fields)
    return cto.OpPalettizerConfig(mode="custom", lut_function=luts.lut_function(fields.pop("nbits")), **fields)


def _bits_per_weight(recipe: Recipe, weights: dict[str, np.ndarray], bits_per_op: dict[str, int] | None):
    if not recipe.needs_scan:
        if bits_per_op is not None:
            raise ValueError(f"recipe '{recipe.name}' ({recipe.kind}) takes no per-op bits")
        nbits = LINEAR_NBITS[recipe.params["dtype"]] if recipe.kind == "linear" else recipe.params["nbits"]
        return dict.fromkeys(weights, nbits)
    if bits_per_op is None:
        raise VoxtralError(f"recipe '{recipe.name}': mixed palettization needs per-op bits from the sensitivity scan")
    missing = sorted(set(weights) - set(bits_per_op))
    unknown = sorted(set(bits_per_op) - set(weights))
    if missing or unknown:
        which = f"no bits for weight '{missing[0]}'" if missing else f"'{unknown[0]}' is not a compressible weight"
        raise VoxtralError(f"recipe '{recipe.name}': {which} of this program")
    for name, nbits in bits_per_op.items():
        if nbits not in recipe.params["candidate_bits"]:
            raise VoxtralError(f"recipe '{recipe.name}': {nbits} bits for '{name}' is not in candidate_bits")
    return dict(bits_per_op)


def _check_program_target(mlmodel: MLModel, recipe: Recipe) -> None:
    target, feature = required_target(recipe.params)
    if mlmodel.get_spec().specificationVersion < SPEC_VERSION[target]:
        raise VoxtralError(f"recipe '{recipe.name}': {feature} needs a program converted for {target} or later")


def _with_program(mlmodel: MLModel) -> MLModel:
    """`mlmodel` with its MIL program in memory, which ct.convert leaves on it and a layered conversion does not (it
    would hold every weight): compression reads the program's ops."""
    if mlmodel._mil_program is None:
        from coremltools.converters.mil.frontend.milproto.load import load

        spec = mlmodel.get_spec()
        mlmodel._mil_program = load(spec, spec.specificationVersion, mlmodel.weights_dir)
    return mlmodel


def _run_pass(mlmodel: MLModel, graph_pass, config=None) -> MLModel:
    """What `ct.optimize.coreml.palettize_weights` and its siblings do, but re-converted with this project's
    `compressed_pipeline`: theirs is coremltools' default, all of it again, whose batch-norm fusion breaks the fp16
    program (mil_passes.py)."""
    from coremltools.converters.mil.converter import mil_convert
    from coremltools.converters.mil.mil.passes.pass_pipeline import PassOption
    from coremltools.models.utils import _apply_graph_pass

    if config is not None:
        graph_pass.set_options([PassOption("config", config)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = _apply_graph_pass(mlmodel, graph_pass, return_pymil_prog=True)
        spec = mlmodel.get_spec()
        return mil_convert(
            program,
            convert_to="mlprogram",
            convert_from="milinternal",
            specification_version=spec.specificationVersion,
            compute_units=mlmodel.compute_unit,
            model_description=spec.description,
            skip_model_load=True,  # loading compiles the model, which only macOS can do
            pass_pipeline=compressed_pipeline(),
        )


def decompress_mlmodel(mlmodel: MLModel) -> MLModel:
    """The program with every constexpr weight turned back into a const: what a package's weights decode to."""
    from coremltools.optimize.coreml._quantization_passes import WeightDecompressor

    return _run_pass(mlmodel, WeightDecompressor(op_selector=lambda op: True))


def compress_mlmodel(
    mlmodel: MLModel,
    recipe: Recipe,
    bits_per_op: dict[str, int] | None = None,
    jobs: int | None = None,
    ahead: LutsAhead | None = None,
) -> tuple[MLModel, dict[str, Any]]:
    """The program compressed as `recipe` says, and what the manifest should record about it.

    `bits_per_op` (mixed only) maps Core ML const op names to bit widths; `weight_op_names` turns the sensitivity
    scan's module names into them. `jobs`: k-means worker processes (default `kmeans_workers()`); `ahead`: LUTs
    clustered while the program was converted (`clustering_ahead`). The package's bytes depend on neither."""
    import coremltools.optimize.coreml as cto
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    info: dict[str, Any] = {
        "recipe": recipe.name,
        "kind": recipe.kind,
        "params": dict(recipe.params),
        "deployment_target": recipe.min_target,
    }
    if recipe.kind == "fp16":
        if bits_per_op is not None:
            raise ValueError(f"recipe '{recipe.name}' (fp16) takes no per-op bits")
        return mlmodel, {**info, "bits_per_op": {}, "average_bits": float(FP16_BITS)}
    if recipe.kind not in ("linear", "palettize", "mixed"):
        raise ValueError(f"recipe '{recipe.name}' ({recipe.kind}) compresses the module before conversion")
    _check_program_target(mlmodel, recipe)
    mlmodel = _with_program(mlmodel)
    threshold = recipe.params["weight_threshold"]
    weights = program_weights(mlmodel, threshold)
    if not weights:
        raise VoxtralError(f"recipe '{recipe.name}': no weight has more than weight_threshold {threshold} elements")
    bits = _bits_per_weight(recipe, weights, bits_per_op)
    configs = {name: _op_config(recipe, bits[name]) for name in weights}
    if recipe.kind != "linear":
        known = ahead.collect() if ahead is not None else {}
        luts = cluster_luts(program_lut_groups(mlmodel, configs), jobs or kmeans_workers(), known)
        configs = {name: _op_config(recipe, bits[name], luts) for name in weights}
    # No global config: only the listed weights are touched (the positions table is a big const too).
    graph_pass = "linear_quantize_weights" if recipe.kind == "linear" else "palettize_weights"
    with deterministic_kmeans():
        compressed = _run_pass(
            mlmodel, PASS_REGISTRY[f"compression::{graph_pass}"], cto.OptimizationConfig(op_name_configs=configs)
        )
    if recipe.kind != "linear":
        log.info("k-means: %d LUT groups clustered by the pass itself (not ahead)", luts.missed)
    left = program_weights(compressed, threshold)
    if left:
        # coremltools skips a weight it cannot split (a group or block size that does not divide it) with a warning.
        name = next(iter(left))
        raise VoxtralError(f"recipe '{recipe.name}': weight '{name}' {list(left[name].shape)} was left uncompressed")
    info["bits_per_op"] = bits
    sizes = stored_tensor_sizes(mlmodel)
    info["compressed_average_bits"] = round(average_bits(bits, {name: v.size for name, v in weights.items()}), 4)
    # Over every stored tensor, the ones left fp16 (small weights, biases, norms, positions) included.
    info["average_bits"] = round(average_bits({name: bits.get(name, FP16_BITS) for name in sizes}, sizes), 4)
    if recipe.kind != "linear":
        info["kmeans"] = kmeans_backend()
    log.info(
        "recipe %s: %d weights at %.2f bits on average, %.2f bits over all %d tensors",
        recipe.name, len(bits), info["compressed_average_bits"], info["average_bits"], len(sizes),
    )  # fmt: skip
    return compressed, info


def stored_tensor_sizes(mlmodel: MLModel) -> dict[str, int]:
    """Const op name -> element count of every float tensor the program stores (weights, biases, norms, positions)."""
    sizes = {}
    for op in mlmodel._mil_program.functions["main"].operations:
        value = op.outputs[0].val if op.op_type == "const" else None
        if isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.size > 1:
            sizes[op.name] = value.size
    return sizes


def average_bits(bits: dict[str, int], sizes: dict[str, int]) -> float:
    """Parameter-weighted average bit width."""
    return math.fsum(bits[n] * sizes[n] for n in bits) / math.fsum(sizes[n] for n in bits)
