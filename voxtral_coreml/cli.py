"""`voxtral-coreml`: the pipeline's library as one-shot commands, for people who do not want a pipeline."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml

from .errors import VoxtralError
from .runner import run

BACKEND_HELP = "auto (.mlpackage: Core ML on macOS, else mil; .aimodel: coreai) | mil | coreml | coreai"
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def recipe_config(name: str) -> dict:
    path = CONF_DIR / "recipe" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONF_DIR / "recipe").glob("*.yaml"))
        raise VoxtralError(f"unknown recipe {name!r}; known: {', '.join(known) or 'none (conf/ not found)'}")
    return yaml.safe_load(path.read_text())


def _extract_to(checkpoint: Path, layout: str, workdir: Path) -> Path:
    from .extract import extract_audio_tower

    extracted = workdir / "extracted"
    extract_audio_tower(checkpoint, extracted, layout=layout, source={"kind": "local", "name": checkpoint.name})
    return extracted


def cmd_convert(args: argparse.Namespace) -> None:
    from .convert import infer_variant
    from .dims import EncoderDims, read_encoder_json
    from .formats import export_format
    from .recipes import Recipe

    fmt = export_format(args.format)
    recipe = Recipe.from_config(args.recipe, recipe_config(args.recipe))
    fmt.check_recipe(recipe)  # before any work
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix=".voxtral-", dir=out.parent if out.parent.exists() else None) as tmp:
        extracted = _extract_to(Path(args.checkpoint), args.layout, Path(tmp))
        dims = EncoderDims.from_json(read_encoder_json(extracted)["dims"], str(extracted))
        variant = args.variant or infer_variant(dims)
        package = out if out.suffix == fmt.suffix else out / fmt.file_name(variant)
        manifest = fmt.convert(
            extracted,
            package,
            recipe,
            model_name=Path(args.checkpoint).name,
            variant=variant,
            attention=args.attention,
            **{option: getattr(args, option) for option in fmt.options},
        )
    print(f"{package}: {manifest['outputs'][0]['shape']} ({manifest['size_bytes'] / 1e6:.1f} MB)")


def cmd_validate(args: argparse.Namespace) -> None:
    from .reference import compute_reference
    from .validate import find_package, validate_package

    package, manifest = find_package(Path(args.package))
    if args.gate is None and "recipe" not in manifest:
        raise VoxtralError(f"{package}: its manifest names no recipe to take the gate from; pass --gate")
    gate = args.gate if args.gate is not None else float(recipe_config(manifest["recipe"]["name"])["psnr_gate_db"])
    with tempfile.TemporaryDirectory(prefix=".voxtral-") as tmp:
        extracted = _extract_to(Path(args.checkpoint), args.layout, Path(tmp))
        reference, parity = compute_reference(extracted, args.audio, manifest.get("attention", "split_heads"), 256)
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
    from .formats import format_of
    from .validate import find_package

    package, manifest = find_package(Path(args.package))
    INSPECTORS[format_of(package.name).name](package, manifest, args.json)


def inspect_asset(package: Path, manifest: dict, as_json: bool) -> None:
    """A Core AI asset: functions, I/O, size, compression, minimum OS, storage types and op counts."""
    from .coreai_backend import asset_structure

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
    from .package_info import ane_report, package_structure

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


def cmd_encode(args: argparse.Namespace) -> None:
    from .encode import check_output_path, encode_audio, save_embeddings, summary

    out = Path(args.out) if args.out else None
    if out is not None:
        check_output_path(out)  # before the work, not after it
    encoding = encode_audio(args.audio, args.package, backend=args.backend)
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="voxtral-coreml", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="checkpoint directory -> .mlpackage or .aimodel + manifest.json")
    c.add_argument("--checkpoint", required=True, help="a Voxtral checkpoint directory")
    c.add_argument("--recipe", default="fp16", help="a recipe name from conf/recipe/")
    c.add_argument("--format", default="coreml", help="coreml (.mlpackage, default) | coreai (.aimodel, OS 27)")
    c.add_argument("--out", required=True, help="the .mlpackage / .aimodel to write (or a folder for it)")
    c.add_argument("--variant", choices=["Mini", "Small"], help="default: from the projector's width")
    c.add_argument("--layout", default="auto", help="checkpoint layout (default: detected)")
    c.add_argument("--attention", default="split_heads", help="attention core (see conf/config.yaml)")
    c.add_argument("--attention-precision", default="fp32", help="coreai: the attention cores' precision, fp32 | fp16")
    c.set_defaults(func=cmd_convert)

    v = sub.add_parser("validate", help="compare a package's embeddings with transformers")
    v.add_argument("package", help="the .mlpackage or .aimodel (manifest.json beside it)")
    v.add_argument("--checkpoint", required=True, help="the checkpoint it was converted from")
    v.add_argument("--audio", help="wav/flac to validate on (default: built-in speech)")
    v.add_argument("--backend", default="auto", help=BACKEND_HELP)
    v.add_argument("--gate", type=float, help="PSNR gate in dB (default: the recipe's)")
    v.add_argument("--layout", default="auto", help="checkpoint layout (default: detected)")
    v.add_argument("--json", action="store_true", help="print the metrics as JSON")
    v.set_defaults(func=cmd_validate)

    i = sub.add_parser("inspect", help="describe a package")
    i.add_argument("package")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("encode", help="audio of any length -> audio embeddings [N*375, H], one call per 30 s window")
    e.add_argument("audio", help="an audio file (wav, flac, ...): averaged to mono, resampled to 16 kHz")
    e.add_argument("--package", required=True, help="an encoder .mlpackage or .aimodel (manifest.json beside it)")
    e.add_argument("--out", help="write the embeddings to FILE.npy or FILE.safetensors (default: print a summary)")
    e.add_argument("--backend", default="auto", help=BACKEND_HELP)
    e.set_defaults(func=cmd_encode)

    h = sub.add_parser("publish", help="upload the pipeline's packages to a Hugging Face model repo")
    h.add_argument("--repo", required=True, help="org/name on the Hub (token: HF_TOKEN or `hf auth login`)")
    h.add_argument("--out", help="assemble the repository here and keep it (default: a temporary folder)")
    h.add_argument("--dry-run", action="store_true", help="assemble only, do not upload (needs --out)")
    h.add_argument("--private", action="store_true", help="create the repo as private if it does not exist")
    h.set_defaults(func=cmd_publish)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    run(lambda: args.func(args), debug=args.debug or None)


if __name__ == "__main__":
    main()
