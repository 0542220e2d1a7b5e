"""Pixel-level perturbations: pure functions of (key, image, parameters).

Every op takes one HWC float image in [0, 1] and returns one of the same shape, clipped to [0, 1].
They run on the accelerator inside the jitted train and eval steps, so they are jit- and vmap-safe:
shape-changing parameters (`factor`, `method`) are Python values; values that vary per image (`sigma`,
`box`) may be traced.

The batched `random_*` versions draw the parameters per image, as training does (docs/method.md),
and `perturb_batch` applies a `PerturbSpec`: which kinds, and how many rows of each.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from pivot_jax import conditions, corruptions

METHODS = conditions.METHODS
# Training perturbations: Gaussian noise, LR, MR, one common corruption (severity drawn per image), or
# "extras", per image one of the published extra corruptions (conditions.EXTRAS) at a severity from 1-5.
KINDS = ("noise", "lr", "mr", *conditions.CORRUPTIONS, "extras")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method: got {method!r}, expected one of {METHODS}")


def _check_factor(factor: int) -> None:
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor: got {factor!r}, expected a Python int >= 1")


def gaussian_noise(key: jax.Array, image: jax.Array, sigma) -> jax.Array:
    """`image + sigma * N(0, 1)`, clipped to [0, 1]."""
    noise = jax.random.normal(key, image.shape, image.dtype)
    return jnp.clip(image + sigma * noise, 0.0, 1.0)


def low_resolution(image: jax.Array, factor: int, method: str) -> jax.Array:
    """Keeps every `factor`-th pixel from (0, 0) and up-samples back to the image size.

    Sub-sampling is plain indexing (an anti-aliased resize would blur instead). The low-resolution
    image is up-sampled by exactly `factor` (each kept pixel owns an f x f block, as in block
    replication) and cropped to the original size when `factor` does not divide it.
    """
    _check_factor(factor)
    _check_method(method)
    if factor == 1:
        return image
    height, width, channels = image.shape
    small = image[::factor, ::factor]
    shape = (small.shape[0] * factor, small.shape[1] * factor, channels)
    # Up-sampling never anti-aliases, so `antialias` changes nothing; it is off to say so.
    large = jax.image.resize(small, shape, method=method, antialias=False)
    return jnp.clip(large[:height, :width], 0.0, 1.0).astype(image.dtype)


def box_mask(box: jax.Array, height: int, width: int) -> jax.Array:
    """[H, W, 1] mask of the pixels whose centre lies in `box` = (ymin, xmin, ymax, xmax) in [0, 1]."""
    box = jnp.asarray(box, jnp.float32)
    ys = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height
    xs = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width
    inside_y = (ys >= box[0]) & (ys <= box[2])
    inside_x = (xs >= box[1]) & (xs <= box[3])
    return (inside_y[:, None] & inside_x[None, :])[:, :, None]


def mixed_resolution(image: jax.Array, box, factor: int, method: str) -> jax.Array:
    """The original inside `box`, the low-resolution image outside it (region-of-interest coding)."""
    height, width, _ = image.shape
    return jnp.where(box_mask(box, height, width), image, low_resolution(image, factor, method))


def centered_box(fraction: float) -> tuple[float, float, float, float]:
    """The default box for data without boxes: centred, each side `fraction` of the image side."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"box fraction: got {fraction!r}, expected a value in (0, 1]")
    margin = (1.0 - fraction) / 2.0
    return (margin, margin, 1.0 - margin, 1.0 - margin)


# ---------------------------------------------------------------------------------------------
# Batched, per-image random versions (training).


def random_noise(key: jax.Array, images: jax.Array, max_sigma: float) -> jax.Array:
    """Gaussian noise with sigma ~ U[0, max_sigma] drawn per image."""
    sigma_key, noise_key = jax.random.split(key)
    sigmas = jax.random.uniform(sigma_key, (images.shape[0],), images.dtype, 0.0, max_sigma)
    keys = jax.random.split(noise_key, images.shape[0])
    return jax.vmap(gaussian_noise)(keys, images, sigmas)


def _select_variant(key: jax.Array, variants: list[jax.Array]) -> jax.Array:
    """Per image, one of the precomputed variants [n, H, W, C], chosen uniformly."""
    stacked = jnp.stack(variants)  # [V, n, H, W, C]
    choice = jax.random.randint(key, (stacked.shape[1],), 0, len(variants))
    return jnp.take_along_axis(stacked, choice[None, :, None, None, None], axis=0)[0]


def random_low_resolution(
    key: jax.Array, images: jax.Array, factors: Sequence[int], methods: Sequence[str]
) -> jax.Array:
    """LR with (factor, method) drawn per image from `factors` x `methods`.

    Factors and methods change the computation's shapes, so every combination is computed and one is
    selected per image; these ops are cheap next to the network.
    """
    variants = [
        jax.vmap(lambda x, f=f, m=m: low_resolution(x, f, m))(images)
        for f in factors
        for m in methods
    ]
    return _select_variant(key, variants)


def random_mixed_resolution(
    key: jax.Array,
    images: jax.Array,
    boxes: jax.Array,
    factors: Sequence[int],
    methods: Sequence[str],
) -> jax.Array:
    """MR with each image's own box and (factor, method) drawn per image."""
    lr = random_low_resolution(key, images, factors, methods)
    height, width = images.shape[1:3]
    masks = jax.vmap(lambda b: box_mask(b, height, width))(boxes)
    return jnp.where(masks, images, lr)


@dataclasses.dataclass(frozen=True)
class PerturbSpec:
    """Which perturbations training applies, and to how many of the first k rows each.

    `counts[i]` rows get `kinds[i]`, in order: with kinds ('lr', 'mr') and counts (16, 16), rows 0-15
    are low resolution and rows 16-31 mixed resolution.
    """

    kinds: tuple[str, ...] = ()
    counts: tuple[int, ...] = ()
    max_sigma: float = 0.15
    factors: tuple[int, ...] = (2, 4)
    methods: tuple[str, ...] = METHODS
    corruption_table: str = "auto"  # the corruptions' parameters: cifar10, imagenet, or auto (by size)
    frost_photos: str = ""  # the folder of the frost photographs, for the kind `frost`

    def __post_init__(self):
        if len(self.kinds) != len(self.counts):
            raise ValueError(f"perturb: {len(self.kinds)} kinds but {len(self.counts)} counts")
        for kind in self.kinds:
            if kind not in KINDS:
                raise ValueError(f"perturb.kinds: got {kind!r}, expected some of {KINDS}")
        for method in self.methods:
            _check_method(method)
        for factor in self.factors:
            _check_factor(factor)

    @property
    def k(self) -> int:
        return sum(self.counts)


def perturb_batch(key: jax.Array, images: jax.Array, boxes: jax.Array, spec: PerturbSpec) -> jax.Array:
    """Perturbs `images` [k, H, W, C] (boxes [k, 4]) as `spec` says; returns [k, H, W, C]."""
    if images.shape[0] != spec.k:
        raise ValueError(f"perturb_batch: {images.shape[0]} images for k = {spec.k}")
    outputs, start = [], 0
    for index, (kind, count) in enumerate(zip(spec.kinds, spec.counts)):
        part_key = jax.random.fold_in(key, index)
        part, part_boxes = images[start : start + count], boxes[start : start + count]
        start += count
        if kind == "noise":
            outputs.append(random_noise(part_key, part, spec.max_sigma))
        elif kind == "lr":
            outputs.append(random_low_resolution(part_key, part, spec.factors, spec.methods))
        elif kind != "mr":
            names = conditions.EXTRAS if kind == "extras" else (kind,)
            outputs.append(corruptions.random_corruption(part_key, part, names, spec.corruption_table,
                                                         spec.frost_photos))
        else:
            outputs.append(
                random_mixed_resolution(part_key, part, part_boxes, spec.factors, spec.methods)
            )
    return jnp.concatenate(outputs) if outputs else images[:0]


# ---------------------------------------------------------------------------------------------
# Fixed test-time perturbations, by the names of `pivot_jax.conditions`.


@dataclasses.dataclass(frozen=True)
class EvalPerturbation(conditions.EvalCondition):
    """A named test condition (`noise_0.15`, `lr4_bicubic`, `jpeg_compression_3`, ...) that can be
    applied to a batch. Corruptions use the `corruption_table` parameters and, with `to_uint8`, are
    stored as uint8 like the released corruption data sets."""

    corruption_table: str = "auto"
    to_uint8: bool = True
    frost_photos: str = ""  # the folder of the frost photographs, for frost_<severity>

    def apply(self, keys: jax.Array, images: jax.Array, boxes: jax.Array) -> jax.Array:
        """Perturbs a batch [n, H, W, C] with one key per image, so that an example's noise does not
        depend on the batch it lands in."""
        if self.kind == "clean":
            return images
        if self.kind == "noise":
            return jax.vmap(lambda k, x: gaussian_noise(k, x, self.sigma))(keys, images)
        if self.kind == "lr":
            return jax.vmap(lambda x: low_resolution(x, self.factor, self.method))(images)
        if self.kind == "corruption":
            corrupt = lambda k, x: corruptions.corrupt(k, x, self.corruption, self.severity, self.corruption_table,
                                                       self.to_uint8, self.frost_photos)
            return jax.vmap(corrupt)(keys, images)
        return jax.vmap(lambda x, b: mixed_resolution(x, b, self.factor, self.method))(images, boxes)
