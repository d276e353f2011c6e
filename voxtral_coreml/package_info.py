"""What a saved package is, read from its spec alone (works on any OS, no Core ML needed)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .errors import VoxtralError

# The spec version each deployment target writes.
SPEC_VERSION = {"iOS16": 7, "iOS17": 8, "iOS18": 9}
SPEC_FILE = Path("Data") / "com.apple.CoreML" / "model.mlmodel"


def _array_description(feature) -> dict[str, object]:
    from coremltools.proto.FeatureTypes_pb2 import ArrayFeatureType

    array = feature.type.multiArrayType
    dtype = ArrayFeatureType.ArrayDataType.Name(array.dataType).lower()  # FLOAT32 -> float32
    return {"name": feature.name, "shape": list(array.shape), "dtype": dtype}


def package_structure(package: Path) -> dict[str, object]:
    """I/O, spec version and the op inventory, read from the package's spec (works on any OS)."""
    import coremltools as ct

    spec_path = package / SPEC_FILE
    if not spec_path.is_file():
        raise VoxtralError(f"{package}: missing {spec_path.relative_to(package)}")
    try:
        spec = ct.utils.load_spec(str(package))
    except Exception as e:  # protobuf raises several types for damaged bytes
        raise VoxtralError(f"{package}: the model spec cannot be read ({type(e).__name__}: {e})") from None
    if not spec.HasField("mlProgram"):
        raise VoxtralError(f"{package}: not an mlprogram")
    main = spec.mlProgram.functions["main"]
    ops = Counter(op.type for op in main.block_specializations[main.opset].operations if op.type != "const")
    return {
        "inputs": [_array_description(f) for f in spec.description.input],
        "outputs": [_array_description(f) for f in spec.description.output],
        "spec_version": spec.specificationVersion,
        "ops": dict(sorted(ops.items())),
    }
