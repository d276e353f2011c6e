"""What every stage shares: params.yaml and conf/, output paths, atomic writes, one-line errors."""
