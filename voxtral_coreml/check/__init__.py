"""Validate: package checks against the contract and transformers, backends (the MIL runtime, Core ML)."""
