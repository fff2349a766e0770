"""The benchmark: what the platform costs beyond the training itself (``python -m experiments.bench``)."""
