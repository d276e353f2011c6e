"""Numbers that mean the same everywhere: float64 math, rounding, and how close embeddings are."""
