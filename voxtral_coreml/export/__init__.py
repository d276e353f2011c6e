"""Convert: the package contract and manifest, conversion, recipes, compression, MIL passes, bytes."""
