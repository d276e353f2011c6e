"""Download and extract: checkpoint sources, the Hub, byte ranges, layouts, safetensors, synthetic models."""
