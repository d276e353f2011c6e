"""Voxtral Realtime (Voxtral-Mini-4B-Realtime-2602): the causal streaming encoder family.

dims -> layouts (HF, Mistral) -> model (ANE offline window and streaming step) -> reference (transformers)
-> export (offline and streaming packages). Registered in `voxtral_coreml.encoders.families`.
"""
