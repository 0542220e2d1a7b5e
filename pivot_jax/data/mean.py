"""The training split's mean, subtracted from every input (after perturbing) as the paper does."""

from __future__ import annotations

import ml_collections
import numpy as np

from pivot_jax.data.sources import ArraySource, Split
from pivot_jax.errors import DataError


def input_mean(split: Split, data: ml_collections.ConfigDict, max_examples: int = 0) -> np.ndarray:
    """The training split's mean in [0, 1] units: [H, W, C] per pixel, [C] per channel, or 0."""
    shape = (data.image_size, data.image_size, data.channels) if data.mean == "pixel" else (data.channels,)
    if data.mean == "none":
        return np.zeros(shape, np.float32)
    count = min(max_examples, split.num_examples) if max_examples else split.num_examples
    source = split.source
    if isinstance(source, ArraySource) and source.images.dtype != object:
        images = source.images[:count]
        axes = (0,) if data.mean == "pixel" else (0, 1, 2)
        # Sum in float64 over chunks: exact and memory-light.
        total = sum(images[i : i + 8192].astype(np.float64).sum(axis=axes) for i in range(0, count, 8192))
        per = count if data.mean == "pixel" else count * images.shape[1] * images.shape[2]
        return (total / per / 255.0).astype(np.float32).reshape(shape)
    if data.mean == "pixel":
        raise DataError("config.data.mean 'pixel' needs images of one size; use 'channel'")
    # Streamed, variable-size images: the mean over the examples of each image's channel mean.
    step = max(1, split.num_examples // count)
    from pivot_jax import runtime

    chosen = range(0, split.num_examples, step)[:count]
    means = [source[i]["image"].reshape(-1, data.channels).mean(axis=0)
             for i in runtime.progress(chosen, desc="Training mean")]
    return (np.mean(means, axis=0) / 255.0).astype(np.float32)
