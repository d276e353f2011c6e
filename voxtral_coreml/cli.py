"""`voxtral-coreml`: the pipeline's library as one-shot commands, for people who do not want a pipeline."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

from voxtral_coreml.pipeline.conf import build_settings, format_settings, recipe_config, recipe_names
from voxtral_coreml.pipeline.errors import VoxtralError
from voxtral_coreml.pipeline.runner import EXIT_USER_ERROR, run

from . import __version__

VARIANTS = ("Mini", "Small")
BACKEND_HELP = "auto: .mlpackage on Core ML on macOS, else mil; .aimodel on coreai"


def _extract_to(checkpoint: Path, layout: str, workdir: Path, family: str = "auto") -> Path:
    from voxtral_coreml.sources.extract import extract_audio_tower

    extracted = workdir / "extracted"
    source = {"kind": "local", "name": checkpoint.name}
    extract_audio_tower(checkpoint, extracted, layout=layout, source=source, family=family)
    return extracted


def _streaming_options(args: argparse.Namespace) -> dict:
    """convert's streaming flags as convert_package's keyword (Realtime only), checked before any work."""
    if args.streaming == "none":
        return {}
    from voxtral_coreml.encoders.families import family_module

    if args.family != "auto" and family_module(args.family).CANNOT_STREAM:
        raise VoxtralError(f"--streaming: {family_module(args.family).CANNOT_STREAM}")
    return {"streaming": {"form": args.streaming, "tokens_per_step": args.tokens_per_step}}


def refuse_existing(package: Path) -> None:
    """Nothing is overwritten: checked before any work, and again once the variant names the package."""
    from voxtral_coreml.export.convert import MANIFEST

    for path in (package, package.parent / MANIFEST):
        if path.exists():
            raise VoxtralError(f"{path}: already exists; remove it or choose another --out")


def cmd_convert(args: argparse.Namespace) -> None:
    from voxtral_coreml.encoders.dims import read_encoder_json
    from voxtral_coreml.encoders.families import family_module, family_of
    from voxtral_coreml.export.formats import export_format
    from voxtral_coreml.export.recipes import Recipe
    from voxtral_coreml.export.torch_compress import TORCH_KINDS

    fmt = export_format(args.format)
    recipe = Recipe.from_config(args.recipe, recipe_config(args.recipe))
    fmt.check_recipe(recipe)  # before any work
    options = _streaming_options(args)
    forms = fmt.streaming_forms
    if options and forms is not None and args.streaming not in forms:
        raise VoxtralError(f"--streaming {args.streaming}: --format {fmt.name} streams in the form {', '.join(forms)}")
    out = Path(args.out)
    if out.suffix == fmt.suffix:
        refuse_existing(out)
    with tempfile.TemporaryDirectory(prefix=".voxtral-", dir=out.parent if out.parent.exists() else None) as tmp:
        extracted = _extract_to(Path(args.checkpoint), args.layout, Path(tmp), args.family)
        meta = read_encoder_json(extracted)
        family = family_module(family_of(meta))
        if options and family.CANNOT_STREAM:
            raise VoxtralError(f"{args.checkpoint}: --streaming: {family.CANNOT_STREAM}")
        variant = family.choose_variant(args.variant, extracted, out)
        package = out if out.suffix == fmt.suffix else out / fmt.package_name(family, variant, options)
        refuse_existing(package)
        # A data-aware recipe calibrates here, on espeak-ng speech (the pipeline caches it in its sensitivity stage).
        calibrated = {"calibrated": family.calibrate(extracted, recipe)[0]} if recipe.kind in TORCH_KINDS else {}
        manifest = fmt.convert(
            family,
            extracted,
            package,
            recipe,
            model_name=Path(args.checkpoint).name,
            variant=variant,
            attention=args.attention,
            query_chunk=args.query_chunk,
            **calibrated,
            **options,
            **{option: getattr(args, option) for option in fmt.options},
        )
    print(f"{package}: {manifest['outputs'][0]['shape']} ({manifest['size_bytes'] / 1e6:.1f} MB)")


def check_same_encoder(package: Path, manifest: dict, extracted: Path, checkpoint: str) -> None:
    """A package validated against another model's checkpoint would fail deep inside the reference (or pass
    meaninglessly): its dimensions must be the checkpoint's."""
    from voxtral_coreml.encoders.dims import read_encoder_json
    from voxtral_coreml.encoders.families import family_module, family_of

    meta = read_encoder_json(extracted)
    if family_of(meta) != family_of(manifest):
        raise VoxtralError(
            f"{package}: a {family_of(manifest)} package; {checkpoint} holds a {family_of(meta)} encoder: validate "
            "against the checkpoint it was converted from"
        )
    dims_of = family_module(family_of(meta)).dims_from_json
    theirs = dims_of(meta["dims"], checkpoint)
    ours = dims_of(manifest.get("dims") or {}, str(package))
    if ours != theirs:
        raise VoxtralError(
            f"{package}: converted from an encoder of projector width {ours.hidden_size}, {ours.n_layers} layers, "
            f"d_model {ours.d_model}; {checkpoint} holds width {theirs.hidden_size}, {theirs.n_layers} layers, "
            f"d_model {theirs.d_model}: validate against the checkpoint it was converted from"
        )


def validation_gate(args: argparse.Namespace, package: Path, manifest: dict) -> float:
    if args.gate is not None:
        return args.gate
    if "recipe" not in manifest:
        raise VoxtralError(f"{package}: its manifest names no recipe to take the gate from; pass --gate")
    return float(recipe_config(manifest["recipe"]["name"])["psnr_gate_db"])


def cmd_validate(args: argparse.Namespace) -> None:
    from voxtral_coreml.check.validate import find_package, validate_package
    from voxtral_coreml.encoders.families import family_of_extracted

    package, manifest = find_package(Path(args.package))
    gate = validation_gate(args, package, manifest)
    if args.audio is not None and not Path(args.audio).is_file():
        raise VoxtralError(f"{args.audio}: no such audio file")
    build = build_settings()  # what a manifest that predates `query_chunk` was built with
    attention = manifest.get("attention", build["attention"])
    query_chunk = manifest.get("query_chunk", build["query_chunk"])
    with tempfile.TemporaryDirectory(prefix=".voxtral-") as tmp:
        extracted = _extract_to(Path(args.checkpoint), args.layout, Path(tmp))
        check_same_encoder(package, manifest, extracted, args.checkpoint)
        reference, parity = family_of_extracted(extracted).compute_reference(
            extracted, args.audio, attention, query_chunk
        )
        metrics, timings = validate_package(package, reference, gate, backend=args.backend)
    metrics["ane_module_vs_transformers"] = parity
    metrics["timings"] = timings
    if args.json:
        print(json.dumps(metrics, indent=2, sort_keys=True))
    else:
        print(
            f"{package}: PSNR {metrics['psnr_db']} dB vs transformers (gate {gate} dB), "
            f"cosine_min {metrics['cosine_min']}, max_abs_err {metrics['max_abs_err']}, backend {metrics['backend']}"
        )


def cmd_inspect(args: argparse.Namespace) -> None:
    from voxtral_coreml.check.validate import find_package
    from voxtral_coreml.export.formats import format_of

    package, manifest = find_package(Path(args.package))
    INSPECTORS[format_of(package.name).name](package, manifest, args.json)


def inspect_asset(package: Path, manifest: dict, as_json: bool) -> None:
    """A Core AI asset: functions, I/O, size, compression, minimum OS, storage types and op counts."""
    from voxtral_coreml.check.coreai_backend import asset_structure

    structure = asset_structure(package)
    if as_json:
        print(json.dumps({"package": str(package), "manifest": manifest, "structure": structure}, indent=2))
        return
    print(f"{package}")
    print(f"  functions: {', '.join(structure['functions'])} ({structure['description'] or 'no description'})")
    for io in structure["inputs"] + structure["outputs"]:
        print(f"  {io['name']}: {io['dtype']} {io['shape']}")
    print(f"  minimum OS: iOS / macOS {structure['minimum_os']}  producer: {structure['producer']}")
    compression = {k: v for k, v in manifest.get("compression", {}).items() if v is not None}
    recipe = manifest["recipe"]["name"] if "recipe" in manifest else "none"
    print(f"  recipe: {recipe} ({', '.join(f'{k} {v}' for k, v in compression.items())})")
    print(f"  size: {manifest['size_bytes'] / 1e6:.1f} MB")
    print(f"  weights by storage type: {', '.join(f'{t} {n}' for t, n in structure['storage_types'].items())}")
    ops = structure["ops"]
    print(f"  ops: {sum(ops.values())} ({', '.join(f'{op} {n}' for op, n in ops.items())})")


def inspect_package(package: Path, manifest: dict, as_json: bool) -> None:
    """A Core ML package: I/O, target, size, and what decides how well it suits the Neural Engine."""
    from voxtral_coreml.export.package_info import ane_report, package_structure

    structure = package_structure(package)
    info = {"package": str(package), "manifest": manifest, "structure": structure, "ane": ane_report(package)}
    if as_json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return
    ane = info["ane"]
    print(f"{package}")
    for io in structure["inputs"] + structure["outputs"]:
        print(f"  {io['name']}: {io['dtype']} {io['shape']}")
    target = manifest["deployment_target"]
    print(f"  deployment target: {target['coreml']} (iOS {target['ios']}, macOS {target['macos']})")
    recipe = manifest["recipe"]["name"] if "recipe" in manifest else "none"  # the mel front-end has none
    print(f"  recipe: {recipe}  size: {manifest['size_bytes'] / 1e6:.1f} MB")
    print(f"  weights: {ane['weight_bytes'] / 1e6:.1f} MB  compute: {ane['gflops_per_window']} GFLOP per window")
    print(f"  ops: {ane['ops_total']} ({', '.join(f'{op} {n}' for op, n in ane['ops'].items())})")
    outside = ane["layout_ops_outside_attention"]
    print(f"  layout ops outside attention: {sum(outside.values())} {outside or ''}".rstrip())
    print(f"  ops computing in fp32: {sum(ane['fp32_ops'].values())} {ane['fp32_ops'] or ''}".rstrip())
    print(f"  ops with rank > 4 tensors: {ane['ops_with_rank_over_4']}")


INSPECTORS = {"coreml": inspect_package, "coreai": inspect_asset}  # format -> its description


def _check_tokens_per_step(args: argparse.Namespace) -> None:
    """--tokens-per-step is the package's build parameter: named here only to be checked against it."""
    if args.tokens_per_step is None:
        return
    from voxtral_coreml.check.validate import find_package

    package, manifest = find_package(Path(args.package))
    built = manifest.get("streaming", {}).get("tokens_per_step")
    if not args.stream or built != args.tokens_per_step:
        raise VoxtralError(
            f"{package}: --tokens-per-step {args.tokens_per_step} needs --stream and a streaming package built with "
            f"that many tokens per step (this one: {built or 'not a streaming package'})"
        )


def cmd_encode(args: argparse.Namespace) -> None:
    from .encode import check_output_path, encode_audio, save_embeddings, summary

    out = Path(args.out) if args.out else None
    if out is not None:
        check_output_path(out)  # before the work, not after it
    _check_tokens_per_step(args)
    encoding = encode_audio(args.audio, args.package, backend=args.backend, stream=args.stream)
    if out is not None:
        save_embeddings(out, encoding.embeddings)
        print(f"{out}: audio_embeddings {list(encoding.embeddings.shape)}")
    print(summary(encoding))


def cmd_publish(args: argparse.Namespace) -> None:
    from .publish import publish

    if args.dry_run and args.out is None:
        raise VoxtralError("--dry-run needs --out: the folder to assemble the repository in")
    url = publish(args.repo, out=Path(args.out) if args.out else None, dry_run=args.dry_run, private=args.private)
    print(url or f"assembled {args.out} (not uploaded)")


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line and exit 2, like every other error (`--help` shows the usage)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    from voxtral_coreml.encoders.attention import ATTENTION_CORES
    from voxtral_coreml.encoders.families import FAMILIES
    from voxtral_coreml.export.formats import DEFAULT_FORMAT, FORMATS
    from voxtral_coreml.sources.layouts import LAYOUTS

    build = build_settings()  # conf/conversion.yaml: the pipeline's own defaults
    c = sub.add_parser("convert", help="checkpoint directory -> .mlpackage or .aimodel + manifest.json")
    c.add_argument("--checkpoint", required=True, help="a Voxtral checkpoint directory")
    c.add_argument("--recipe", default="fp16", choices=recipe_names(), help="a recipe of conf/recipe/")
    c.add_argument(
        "--format", default=DEFAULT_FORMAT, choices=list(FORMATS), help="coreml: .mlpackage; coreai: .aimodel (OS 27)"
    )
    c.add_argument(
        "--out", required=True, help="the .mlpackage / .aimodel to write (or a folder for it); never overwritten"
    )
    c.add_argument(
        "--variant",
        choices=VARIANTS,
        help="default: from the projector's width (3072: Mini, 5120: Small) or --out's name",
    )
    c.add_argument("--layout", default="auto", choices=["auto", *LAYOUTS], help="checkpoint layout (auto: detected)")
    c.add_argument("--attention", default=build["attention"], choices=ATTENTION_CORES, help="attention core")
    c.add_argument("--query-chunk", type=int, default=build["query_chunk"], help="queries per chunk (chunked core)")
    c.add_argument("--family", default="auto", choices=["auto", *FAMILIES], help="encoder family (auto: detected)")
    c.add_argument(
        "--streaming",
        default="none",
        choices=["none", "stateful", "explicit", "multifunction"],
        help="Realtime only: a streaming step with Core ML states (iOS 18), with the state as inputs/outputs "
        "(iOS 16), or the offline window and the stateful step as two functions of one package (iOS 18), instead "
        "of the offline window alone (default: none)",
    )
    c.add_argument(
        "--tokens-per-step", type=int, default=1, help="streaming: tokens (80 ms each) per call (default: 1)"
    )
    for fmt in FORMATS.values():  # each format's own options, defaults from conf/ (conversion.yaml's <format>:)
        for option, spec in fmt.options.items():
            flag = "--" + option.replace("_", "-")
            default = format_settings(fmt.name)[option]
            c.add_argument(flag, default=default, choices=spec.choices, help=f"{fmt.name} only: {spec.help}")
    c.set_defaults(func=cmd_convert)


def _add_validate(sub: argparse._SubParsersAction) -> None:
    from voxtral_coreml.export.formats import BACKENDS
    from voxtral_coreml.sources.layouts import LAYOUTS

    v = sub.add_parser("validate", help="compare a package's embeddings with transformers")
    v.add_argument("package", help="the .mlpackage or .aimodel (manifest.json beside it)")
    v.add_argument("--checkpoint", required=True, help="the checkpoint it was converted from")
    v.add_argument("--audio", help="wav/flac to validate on (default: built-in speech)")
    v.add_argument("--backend", default="auto", choices=BACKENDS, help=BACKEND_HELP)
    v.add_argument("--gate", type=float, help="PSNR gate in dB (default: the recipe's)")
    v.add_argument("--layout", default="auto", choices=["auto", *LAYOUTS], help="checkpoint layout (auto: detected)")
    v.add_argument("--json", action="store_true", help="print the metrics as JSON")
    v.set_defaults(func=cmd_validate)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("inspect", help="describe a package")
    i.add_argument("package", help="the .mlpackage or .aimodel (manifest.json beside it) or its folder")
    i.add_argument("--json", action="store_true", help="print everything as JSON")
    i.set_defaults(func=cmd_inspect)


def _add_encode(sub: argparse._SubParsersAction) -> None:
    from voxtral_coreml.export.formats import BACKENDS

    e = sub.add_parser("encode", help="audio of any length -> audio embeddings [N*375, H], one call per 30 s window")
    e.add_argument("audio", help="an audio file (wav, flac, ...): averaged to mono, resampled to 16 kHz")
    e.add_argument("--package", required=True, help="an encoder .mlpackage or .aimodel (manifest.json beside it)")
    e.add_argument("--out", help="write the embeddings to FILE.npy or FILE.safetensors (default: print a summary)")
    e.add_argument("--backend", default="auto", choices=BACKENDS, help=BACKEND_HELP)
    e.add_argument(
        "--stream",
        action="store_true",
        help="Realtime streaming package: feed the clip as a microphone would, K x 80 ms per call, and print "
        "per-step timings",
    )
    e.add_argument("--tokens-per-step", type=int, help="check the streaming package's K (a build parameter)")
    e.set_defaults(func=cmd_encode)


def _add_publish(sub: argparse._SubParsersAction) -> None:
    h = sub.add_parser("publish", help="upload the pipeline's packages to a Hugging Face model repo")
    h.add_argument("--repo", required=True, help="org/name on the Hub (token: HF_TOKEN or `hf auth login`)")
    h.add_argument("--out", help="assemble the repository here and keep it (default: a temporary folder)")
    h.add_argument("--dry-run", action="store_true", help="assemble only, do not upload (needs --out)")
    h.add_argument("--private", action="store_true", help="create the repo as private if it does not exist")
    h.set_defaults(func=cmd_publish)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="voxtral-coreml", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_SubParser)
    for add in (_add_convert, _add_validate, _add_inspect, _add_encode, _add_publish):
        add(sub)
    return p


class _DefaultsFormatter(argparse.HelpFormatter):
    """Each option's default after its help, where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return f"{action.help} (default: %(default)s)"


class _SubParser(_Parser):
    """A command's parser: its --help shows each option's default."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(formatter_class=_DefaultsFormatter, **kwargs)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # The parser reads conf/ (recipe names, build defaults): inside run(), so a problem there is one line too.
    run(lambda: _dispatch(argv), debug="--debug" in argv or None)


def _dispatch(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
