"""`make bench`: full-dimension measurements of the pipeline against baselines run alongside."""
