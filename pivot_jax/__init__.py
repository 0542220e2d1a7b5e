"""pivot_jax: image classifiers robust to pixel-level degradation, trained with the pivot loss."""

__version__ = "0.1.0"
