"""Reusable cores of the paper's experiments (the ``python/`` recipes and ``cex demo`` wrap them)."""
