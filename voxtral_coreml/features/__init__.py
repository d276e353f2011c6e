"""Features: log-mel as Voxtral computes it, and the mel front-end as its own package."""
