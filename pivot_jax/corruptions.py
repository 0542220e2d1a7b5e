"""The common corruptions (Hendrycks & Dietterich, ICLR 2019) as pure per-image JAX ops.

Each op takes a key, one HWC float image in [0, 1] (1 or 3 channels) and its parameter `c` for a
severity, and returns an image of the same shape clipped to [0, 1]. They are jit- and vmap-safe; `c`
is a Python value (severities are picked with `lax.switch` when they vary per image). The parameters
per severity are the published ones: `PARAMS["cifar10"]` for 32x32 data (CIFAR-10-C) and
`PARAMS["imagenet"]` for ImageNet-size data (ImageNet-C); docs/method.md lists them and says where
an op departs from the published scripts.

The released data sets store uint8 images, cast with `np.uint8`, which rounds down: `to_uint8`
does the same, so that accuracies are comparable with theirs. Grayscale images are treated as the
grey RGB image with the same values (the colour ops convert back with ITU-R 601 luma, as PIL's "L").
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

from pivot_jax.conditions import CORRUPTIONS, NEEDS_PHOTOS, SEVERITIES
from pivot_jax.errors import ConfigError

TABLES = ("cifar10", "imagenet")
PARAMS = {
    "cifar10": {
        "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
        "shot_noise": (500, 250, 100, 75, 50),
        "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
        "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),
        "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
        "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
        "pixelate": (0.95, 0.90, 0.85, 0.75, 0.65),
        "jpeg_compression": (80, 65, 58, 50, 40),
        "contrast": (0.75, 0.50, 0.40, 0.30, 0.15),
        "brightness": (0.05, 0.10, 0.15, 0.20, 0.30),
        "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
        "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
        "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
        "zoom_blur": tuple(tuple(np.arange(1, end, 0.01)) for end in (1.06, 1.11, 1.16, 1.21, 1.26)),
        "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
                 (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
        "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
        "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
        # (alpha, sigma, affine spread) in pixels: the published 32 * (...).
        "elastic_transform": tuple(tuple(32 * v for v in c) for c in (
            (0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))),
        # (mean, spread, sigma, threshold, strength, mud): liquid at severities 1-3, mud at 4-5.
        "spatter": ((0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
                    (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)),
    },
    "imagenet": {
        "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
        "shot_noise": (60, 25, 12, 5, 3),
        "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
        "speckle_noise": (0.15, 0.20, 0.35, 0.45, 0.60),
        "gaussian_blur": (1, 2, 3, 4, 6),
        "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
        "pixelate": (0.60, 0.50, 0.40, 0.30, 0.25),
        "jpeg_compression": (25, 18, 15, 10, 7),
        "contrast": (0.40, 0.30, 0.20, 0.10, 0.05),
        "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
        "saturate": ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)),
        "glass_blur": ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),
        "motion_blur": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
        "snow": ((0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
                 (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)),
        "zoom_blur": tuple(tuple(np.arange(1, end, step)) for end, step in
                           ((1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03))),
        "fog": ((1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)),
        "frost": ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)),
        # The published 244 * (...) (its comment: 244 should have been 224, and it is kept so).
        "elastic_transform": tuple(tuple(244 * v for v in c) for c in (
            (2, 0.7, 0.1), (2, 0.08, 0.2), (0.05, 0.01, 0.02), (0.07, 0.01, 0.02), (0.12, 0.01, 0.02))),
        "spatter": ((0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0), (0.65, 0.3, 2, 0.68, 0.5, 0),
                    (0.65, 0.3, 1, 0.65, 1.5, 1), (0.67, 0.4, 1, 0.65, 1.5, 1)),
    },
}
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's RGB -> "L"


def _clip(x):
    return jnp.clip(x, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Noise.


def gaussian_noise(key, image, c):
    return _clip(image + c * jax.random.normal(key, image.shape, image.dtype))


@functools.lru_cache(maxsize=None)
def _poisson_cdf_table(c: float) -> np.ndarray:
    """[256, K]: the CDF of Poisson(level / 255 * c) at 0..K-1 for each of the 256 pixel levels, K far
    enough into the tail that the rest is below float32's resolution."""
    import scipy.special

    lam = np.arange(256) / 255.0 * c
    k = np.arange(int(c + 12 * np.sqrt(c) + 20))
    with np.errstate(divide="ignore", invalid="ignore"):
        log_pmf = k[None, :] * np.log(lam[:, None]) - lam[:, None] - scipy.special.gammaln(k + 1)[None, :]
    pmf = np.where(lam[:, None] > 0, np.exp(log_pmf), (k[None, :] == 0).astype(float))
    return np.minimum(np.cumsum(pmf, axis=1), 1.0).astype(np.float32)


def shot_noise(key, image, c):
    """Poisson(x * c) / c, sampled by inverting the Poisson CDF of the pixel's level (the published
    op's input is a uint8 image, so x is one of 256 levels): one uniform and a binary search per value,
    much faster on the device than a rejection sampler's loop."""
    table = jnp.asarray(_poisson_cdf_table(float(c)))
    level = jnp.clip(jnp.round(image * 255.0), 0, 255).astype(jnp.int32)
    u = jax.random.uniform(key, image.shape, jnp.float32)
    low, high = jnp.zeros(image.shape, jnp.int32), jnp.full(image.shape, table.shape[1] - 1, jnp.int32)
    for _ in range(int(np.ceil(np.log2(table.shape[1])))):  # the first k with CDF(k) >= u
        middle = (low + high) // 2
        below = table[level, middle] < u
        low, high = jnp.where(below, middle + 1, low), jnp.where(below, high, middle)
    return _clip(high.astype(image.dtype) / c)


def impulse_noise(key, image, c):
    """Salt and pepper: each value is replaced with probability c, by 1 or 0 with equal odds. One
    uniform per value decides both (below c / 2: pepper, from c / 2 to c: salt), the same distribution
    as the published two draws at half the random numbers, which bound this op's speed."""
    u = jax.random.uniform(key, image.shape, jnp.float32)
    return jnp.where(u < c, (u >= c / 2).astype(image.dtype), image)


def speckle_noise(key, image, c):
    return _clip(image + image * c * jax.random.normal(key, image.shape, image.dtype))


# ---------------------------------------------------------------------------------------------
# Blur.


@functools.lru_cache(maxsize=None)
def _row_band_matrices(kernel_bytes: bytes, size: int, width: int) -> np.ndarray:
    """[K, width + K - 1, width]: kernel row dy as a banded matrix, so that a padded image row times
    it is that row's 1-D correlation."""
    kernel = np.frombuffer(kernel_bytes, np.float32).reshape(size, size)
    bands = np.zeros((size, width + size - 1, width), np.float32)
    for dx in range(size):
        bands[:, np.arange(width) + dx, np.arange(width)] = kernel[:, dx : dx + 1]
    return bands


def _per_channel_filter(image, kernel: np.ndarray, pad_mode: str):
    """2-D correlation of every channel with `kernel` (odd square), the border padded by `pad_mode`.
    As matrix products (one banded matrix per kernel row), which the CPU runs far faster than a
    depthwise convolution."""
    size, (height, width) = kernel.shape[0], image.shape[:2]
    radius = size // 2
    padded = jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode=pad_mode)
    bands = jnp.asarray(_row_band_matrices(np.asarray(kernel, np.float32).tobytes(), size, width))
    rows = jnp.stack([padded[dy : dy + height] for dy in range(size)], 1)  # [H, K, W + K - 1, C]
    rows = jnp.moveaxis(rows, -1, 1).reshape(height * image.shape[-1], -1)  # [H * C, K * (W + K - 1)]
    out = jnp.matmul(rows, bands.reshape(-1, width), precision=jax.lax.Precision.HIGHEST)  # one GEMM
    return jnp.moveaxis(out.reshape(height, image.shape[-1], width), 1, -1)


@functools.lru_cache(maxsize=None)
def _filter_matrix(size: int, taps: tuple[float, ...], border: str = "nearest") -> np.ndarray:
    """[size, size] matrix of a 1-D correlation with `taps`, out = M @ x, whose border follows
    SciPy's mode `border`: 'nearest' repeats the edge sample, 'reflect' mirrors (dcba|abcd|dcba)."""
    radius = len(taps) // 2
    matrix = np.zeros((size, size))
    for i in range(size):
        for k, tap in enumerate(taps):
            j = i + k - radius
            if border == "nearest":
                j = min(max(j, 0), size - 1)
            else:
                j = (-j - 1 if j < 0 else j) % (2 * size)
                j = 2 * size - 1 - j if j >= size else j
            matrix[i, j] += tap
    return matrix.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _gaussian_taps(sigma: float, radius: int) -> np.ndarray:
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


def _skimage_gaussian(x, sigma: float):
    """scikit-image's `gaussian(x, sigma)` of an image [H, W, C] (or a layer [H, W]): border 'nearest',
    kernel truncated at 4 sigma; separable, one matrix product per axis."""
    if x.ndim == 2:
        return _skimage_gaussian(x[..., None], sigma)[..., 0]
    taps = tuple(_gaussian_taps(float(sigma), int(4.0 * sigma + 0.5)))
    rows = jnp.asarray(_filter_matrix(x.shape[0], taps))
    cols = jnp.asarray(_filter_matrix(x.shape[1], taps))
    hp = jax.lax.Precision.HIGHEST
    return jnp.einsum("gh,hwc->gwc", rows, jnp.einsum("vw,hwc->hvc", cols, x, precision=hp), precision=hp)


def gaussian_blur(key, image, c):
    """scikit-image's `gaussian(sigma=c)`: border 'nearest', kernel truncated at 4 sigma."""
    del key
    return _clip(_skimage_gaussian(image, c))


@functools.lru_cache(maxsize=None)
def defocus_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The published disk: a 17x17 (or (2r+1)^2 for r > 8) aliased disk normalised to 1, blurred by a
    3x3 (5x5) Gaussian of sigma `alias_blur` with reflect-101 borders, as OpenCV's GaussianBlur."""
    if radius <= 8:
        grid, size = np.arange(-8, 9), 3
    else:
        grid, size = np.arange(-int(radius), int(radius) + 1), 5
    xx, yy = np.meshgrid(grid, grid)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    taps = _gaussian_taps(float(alias_blur), size // 2)
    padded = np.pad(disk, size // 2, mode="reflect")  # numpy's "reflect" is reflect-101
    blurred = sum(taps[i] * padded[i : i + disk.shape[0]] for i in range(size))
    return sum(taps[j] * blurred[:, j : j + disk.shape[1]] for j in range(size)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _defocus_support(radius: float, alias_blur: float) -> np.ndarray:
    """The published 17x17 disk cut to its non-zero centre (5x5 for CIFAR-10-C's radii up to 1.5): the
    same correlation, since the cut taps are exactly 0, at a fraction of the products."""
    kernel = defocus_kernel(radius, alias_blur)
    centre = kernel.shape[0] // 2
    rows, cols = np.nonzero(kernel)
    reach = int(max(np.abs(rows - centre).max(), np.abs(cols - centre).max()))
    return kernel[centre - reach : centre + reach + 1, centre - reach : centre + reach + 1]


def defocus_blur(key, image, c):
    del key
    return _clip(_per_channel_filter(image, _defocus_support(*c), "reflect"))


def glass_blur(key, image, c):
    """Gaussian blur (sigma c[0]), stored as uint8 (rounded down), then `c[2]` passes of local pixel
    shuffling: every pixel (h, w) from the bottom-right, `c[1]` from the border, takes the value of the
    pixel at an offset drawn from [-c[1], c[1]) in each axis, in the published order (each step sees
    the previous ones); then the blur again.

    The published code writes this as a swap, `x[h, w], x[h', w'] = x[h', w'], x[h, w]`, but on NumPy
    arrays its right side holds views, so the second assignment writes x[h', w'] back onto itself: it
    is a copy, and the released sets were made with it. This op copies too."""
    sigma, delta, passes = c
    height, width = image.shape[:2]
    rows, cols = np.arange(height - delta, delta, -1), np.arange(width - delta, delta, -1)
    hs = np.tile(np.repeat(rows, len(cols)), passes)
    ws = np.tile(np.tile(cols, len(rows)), passes)
    offsets = jax.random.randint(key, (len(hs), 2), -delta, delta)  # (dx, dy) per swap
    pixels = jnp.floor(gaussian_blur(None, image, sigma) * 255.0 + 1e-3) / 255.0

    def swap(i, x):
        h, w = jnp.asarray(hs)[i], jnp.asarray(ws)[i]
        return x.at[h, w].set(x[h + offsets[i, 1], w + offsets[i, 0]])

    return gaussian_blur(None, jax.lax.fori_loop(0, len(hs), swap, pixels), sigma)


@functools.lru_cache(maxsize=None)
def clipped_zoom_matrix(size: int, zoom: float) -> np.ndarray:
    """[size, size] weights of the published `clipped_zoom` along one axis: the centre
    ceil(size / zoom) pixels, SciPy's order-1 `zoom` of them by `zoom` (output round(ch * zoom),
    sample i at input coordinate i * (ch - 1) / (out - 1)), and the centre `size` of the result."""
    crop = int(np.ceil(size / zoom))
    top = (size - crop) // 2
    out = int(round(crop * zoom))
    trim = (out - size) // 2
    matrix = np.zeros((size, size))
    for i in range(size):
        x = (i + trim) * (crop - 1) / (out - 1) if out > 1 else 0.0
        low = min(int(np.floor(x)), crop - 1)
        frac = x - low
        matrix[i, top + low] += 1 - frac
        if frac > 0:
            matrix[i, top + low + 1] += frac
    return matrix.astype(np.float32)


def _clipped_zoom(image, zoom: float):
    """The published `clipped_zoom` of an HWC image, as separable matrix products."""
    rows = jnp.asarray(clipped_zoom_matrix(image.shape[0], float(zoom)))
    cols = jnp.asarray(clipped_zoom_matrix(image.shape[1], float(zoom)))
    return jnp.einsum("gh,hwc,vw->gvc", rows, image, cols, precision=jax.lax.Precision.HIGHEST)


def zoom_blur(key, image, c):
    """The mean of the image and its centre zoomed by each factor of `c` (the published clipped zoom,
    bilinear)."""
    del key
    total = image
    for zoom in c:
        total = total + _clipped_zoom(image, zoom)
    return _clip(total / (len(c) + 1))


@functools.lru_cache(maxsize=None)
def motion_blur_kernel(radius: float, sigma: float) -> np.ndarray:
    """ImageMagick's one-sided motion-blur weights: 2 ceil(radius) + 1 taps, exp(-i^2 / 2 sigma^2)
    for i = 0, 1, ..., normalised to 1."""
    taps = np.arange(int(2 * np.ceil(radius) + 1), dtype=np.float64)
    weights = np.exp(-(taps**2) / (2.0 * max(float(sigma), 1e-12) ** 2))
    return (weights / weights.sum()).astype(np.float32)


def _motion_blur(image, radius, sigma, angle):
    """ImageMagick's MotionBlurImage, as the published scripts call it through Wand: tap i reads the
    pixel at (column + ceil(i cos(angle) - 0.5), row + ceil(i sin(angle) - 0.5)), edge pixels repeated
    past the border; stored as 8-bit (the published PNG round trip), rounded down as ImageMagick 6
    (Q16) writes it: measured against its `-motion-blur`, the 8-bit result is the floor of the exact
    sum to within 0.002 of a level."""
    height, width = image.shape[:2]
    radians = jnp.deg2rad(angle)
    total = jnp.zeros_like(image)
    for i, weight in enumerate(motion_blur_kernel(float(radius), float(sigma))):
        columns = jnp.clip(jnp.arange(width) + jnp.ceil(i * jnp.cos(radians) - 0.5).astype(jnp.int32), 0, width - 1)
        rows = jnp.clip(jnp.arange(height) + jnp.ceil(i * jnp.sin(radians) - 0.5).astype(jnp.int32), 0, height - 1)
        total = total + weight * image[rows][:, columns]
    return jnp.floor(total * 255.0 + 2e-3) / 255.0


def motion_blur(key, image, c):
    """ImageMagick's motion blur of radius c[0] and sigma c[1], at an angle drawn from U(-45, 45) degrees."""
    return _motion_blur(image, c[0], c[1], jax.random.uniform(key, (), jnp.float32, -45.0, 45.0))


# ---------------------------------------------------------------------------------------------
# Weather.


def snow(key, image, c):
    """The published snow: a layer of N(c[0], c[1]) noise, zoomed by c[2] (the clipped zoom),
    zeroed below c[3], stored as 8-bit, motion-blurred (radius c[4], sigma c[5], angle U(-135, -45)),
    added with its 180-degree rotation to the image, which is first brightened towards
    max(x, 1.5 grey + 0.5) with weight 1 - c[6] (grey: OpenCV's RGB -> GRAY weights)."""
    mean, spread, zoom, threshold, radius, sigma, keep = c
    layer_key, angle_key = jax.random.split(key)
    height, width = image.shape[:2]
    layer = _clipped_zoom(mean + spread * jax.random.normal(layer_key, (height, width, 1), jnp.float32), zoom)
    layer = jnp.floor(_clip(jnp.where(layer < threshold, 0.0, layer)) * 255.0) / 255.0  # the 8-bit "L" image
    angle = jax.random.uniform(angle_key, (), jnp.float32, -135.0, -45.0)
    layer = _motion_blur(layer, radius, sigma, angle)
    rgb = jnp.repeat(image, 3, -1) if image.shape[-1] == 1 else image
    grey = jnp.sum(rgb * jnp.asarray(LUMA, image.dtype), -1, keepdims=True)
    brightened = keep * image + (1 - keep) * jnp.maximum(image, grey * 1.5 + 0.5)
    return _clip(brightened + layer + jnp.rot90(layer, 2))


def plasma_fractal(key, mapsize: int, decay: float):
    """The published diamond-square height map, [mapsize, mapsize] in [0, 1] (mapsize a power of
    two): at each level every square's centre, then every diamond's, gets the mean of its four
    corners / 4 plus wibble * U(-wibble, wibble), wibble starting at 100 and divided by `decay` per
    level. The uniforms of level l's squares and diamonds come from fold_in(key, 3 l + 0, 1, 2)."""
    assert mapsize & (mapsize - 1) == 0, mapsize
    heights = jnp.zeros((mapsize, mapsize), jnp.float32)
    step, wibble, level = mapsize, 100.0, 0
    while step >= 2:
        half = step // 2

        def wibbled(total, part, shape):
            u = jax.random.uniform(jax.random.fold_in(key, 3 * level + part), shape, jnp.float32, -1.0, 1.0)
            return total / 4 + wibble * wibble * u

        corners = heights[0::step, 0::step]
        squares = corners + jnp.roll(corners, -1, axis=0)
        squares = squares + jnp.roll(squares, -1, axis=1)
        heights = heights.at[half::step, half::step].set(wibbled(squares, 0, squares.shape))
        centres, corners = heights[half::step, half::step], heights[0::step, 0::step]
        left = centres + jnp.roll(centres, 1, axis=0) + corners + jnp.roll(corners, -1, axis=1)
        heights = heights.at[0::step, half::step].set(wibbled(left, 1, left.shape))
        top = centres + jnp.roll(centres, 1, axis=1) + corners + jnp.roll(corners, -1, axis=0)
        heights = heights.at[half::step, 0::step].set(wibbled(top, 2, top.shape))
        step, wibble, level = half, wibble / decay, level + 1
    heights = heights - heights.min()
    return heights / heights.max()


def fog(key, image, c):
    """Adds c[0] times a plasma fractal (decay c[1]; the smallest power-of-two map that covers the
    image, its top-left corner), then rescales by max / (max + c[0]), max the image's largest value."""
    strength, decay = c
    height, width = image.shape[:2]
    mapsize = 1 << max(int(np.ceil(np.log2(max(height, width)))), 1)
    haze = plasma_fractal(key, mapsize, float(decay))[:height, :width, None]
    peak = image.max()
    return _clip((image + strength * haze) * peak / (peak + strength))


# The published scripts' photographs of frost: they draw from the first five of their six files, and
# CIFAR-10-C shrinks them to a fifth first (OpenCV's bilinear resize), ImageNet-C uses them whole.
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")
FROST_SCALE = {"cifar10": 0.2, "imagenet": 1.0}
FROST_SOURCE = "https://github.com/hendrycks/robustness/tree/master/ImageNet-C/create_c"


@dataclasses.dataclass(frozen=True, eq=False)
class FrostPhotos:
    """The frost photographs at one table's scale, padded to one shape so that a crop is one
    `dynamic_slice`: `bank` uint8 [5, H, W, 3] (RGB), `sizes` [5, 2] each photo's own height, width."""

    bank: np.ndarray
    sizes: np.ndarray

    def check_fits(self, height: int, width: int) -> None:
        """A ValueError unless every photo is larger than a `height` x `width` image on both sides (the
        published crop starts at randint(0, side - size), so a photo must exceed the image by one)."""
        small = [f"{name} {h}x{w}" for name, (h, w) in zip(FROST_FILES, self.sizes) if h <= height or w <= width]
        if small:
            raise ValueError(f"config.perturb.frost_photos: the photographs at this table's scale ({', '.join(small)}) "
                             f"must be larger than the {height}x{width} images on both sides")


@functools.lru_cache(maxsize=8)
def load_frost_photos(folder: str, table: str) -> FrostPhotos:
    """The photographs in `folder` (the published frost1.png ... frost5.jpg) at `table`'s scale, read as
    the published scripts read them (OpenCV: alpha dropped, BGR to RGB; `cv2.resize` by the scale)."""
    import cv2

    if not folder:
        raise ConfigError("config.perturb.frost_photos: frost needs the published photographs; got no folder, "
                          f"expected the folder holding {', '.join(FROST_FILES)} (from {FROST_SOURCE})")
    missing = [name for name in FROST_FILES if not (pathlib.Path(folder) / name).is_file()]
    if missing:
        raise ConfigError(f"config.perturb.frost_photos: got {folder!r}, which lacks {', '.join(missing)}; expected "
                          f"the folder holding {', '.join(FROST_FILES)} (from {FROST_SOURCE})")
    photos = []
    for name in FROST_FILES:
        photo = cv2.imread(str(pathlib.Path(folder) / name), cv2.IMREAD_COLOR_RGB)
        if photo is None:
            raise ConfigError(f"config.perturb.frost_photos: cannot decode {pathlib.Path(folder) / name}")
        scale = FROST_SCALE[table]
        photos.append(photo if scale == 1 else cv2.resize(photo, (0, 0), fx=scale, fy=scale))
    sizes = np.array([photo.shape[:2] for photo in photos], np.int32)
    bank = np.zeros((len(photos), *sizes.max(0), 3), np.uint8)
    for index, photo in enumerate(photos):
        bank[index, : photo.shape[0], : photo.shape[1]] = photo
    return FrostPhotos(bank, sizes)


def frost(key, image, c, photos: FrostPhotos):
    """clip(c[0] x + c[1] frost), frost an image-sized crop of one of the photographs (uniform) at a
    uniform position (rows and columns from 0 to the photo's side minus the image's, excluded)."""
    height, width = image.shape[:2]
    photos.check_fits(height, width)
    pick_key, row_key, column_key = jax.random.split(key, 3)
    index = jax.random.randint(pick_key, (), 0, len(photos.sizes))
    photo_height, photo_width = jnp.asarray(photos.sizes)[index]
    row = jax.random.randint(row_key, (), 0, photo_height - height)
    column = jax.random.randint(column_key, (), 0, photo_width - width)
    crop = jax.lax.dynamic_slice(jnp.asarray(photos.bank), (index, row, column, 0), (1, height, width, 3))[0]
    rgb = jnp.repeat(image, 3, -1) if image.shape[-1] == 1 else image
    out = _clip(c[0] * rgb + c[1] * crop.astype(image.dtype) / 255.0)
    return out if image.shape[-1] == 3 else jnp.sum(out * jnp.asarray(LUMA, image.dtype), -1, keepdims=True)


def _windows(plane, radius: int, mode: str, **pad):
    """`window(dy, dx)`: `plane` [H, W] shifted by (dy, dx), |dy|, |dx| <= radius, its border padded by
    `mode` (numpy's: 'edge' is OpenCV's BORDER_REPLICATE, 'reflect' its BORDER_REFLECT_101)."""
    height, width = plane.shape
    padded = jnp.pad(plane, radius, mode=mode, **pad)
    return lambda dy, dx: padded[radius + dy : radius + dy + height, radius + dx : radius + dx + width]


def _canny(plane, low: int, high: int):
    """OpenCV's `Canny(plane, low, high)` (3x3 Sobel on replicated borders, L1 magnitude) of an 8-bit
    [H, W] int32 plane, as a boolean edge map: OpenCV's non-maximum suppression in its fixed-point
    direction sectors (tan 22.5 degrees as 13573 / 2^15) and its tie rules, then hysteresis: a pixel
    above `high` is an edge, one above `low` is an edge where 8-connected to one."""
    pixel = _windows(plane, 1, "edge")
    dx = pixel(-1, 1) + 2 * pixel(0, 1) + pixel(1, 1) - pixel(-1, -1) - 2 * pixel(0, -1) - pixel(1, -1)
    dy = pixel(1, -1) + 2 * pixel(1, 0) + pixel(1, 1) - pixel(-1, -1) - 2 * pixel(-1, 0) - pixel(-1, 1)
    magnitude = jnp.abs(dx) + jnp.abs(dy)
    neighbour = _windows(magnitude, 1, "constant")  # OpenCV's magnitude rows are zero past the border
    tg22x = jnp.abs(dx) * 13573
    tg67x = tg22x + (jnp.abs(dx) << 16)
    along_y = jnp.abs(dy) << 15
    flip = (dx ^ dy) < 0  # the gradient's signs differ: the other diagonal
    diagonal_before = jnp.where(flip, neighbour(-1, 1), neighbour(-1, -1))
    diagonal_after = jnp.where(flip, neighbour(1, -1), neighbour(1, 1))
    local_maximum = jnp.where(
        along_y < tg22x, (magnitude > neighbour(0, -1)) & (magnitude >= neighbour(0, 1)),
        jnp.where(along_y > tg67x, (magnitude > neighbour(-1, 0)) & (magnitude >= neighbour(1, 0)),
                  (magnitude > diagonal_before) & (magnitude > diagonal_after)))
    candidate = local_maximum & (magnitude > low)
    weak = candidate & (magnitude <= high)

    def grow(state):
        edges, _ = state
        touching = _windows(edges, 1, "constant")
        near = functools.reduce(jnp.logical_or, [touching(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
        grown = edges | (weak & near)
        return grown, jnp.any(grown != edges)

    edges, _ = jax.lax.while_loop(lambda state: state[1], grow, (candidate & (magnitude > high), jnp.array(True)))
    return edges


# OpenCV's 5x5 chamfer mask for DIST_L2: steps of 1, 1.4 and 2.1969, added in float32.
_CHAMFER_STEPS = ([(dy, dx, 1.0) for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0))]
                  + [(dy, dx, 1.4) for dy in (-1, 1) for dx in (-1, 1)]
                  + [(dy, dx, 2.1969) for dy, dx in ((1, 2), (2, 1), (-1, 2), (-2, 1), (1, -2), (2, -1), (-1, -2), (-2, -1))])


def _chamfer_distance(edges, limit: int):
    """OpenCV's `distanceTransform(DIST_L2, 5)` to the nearest edge pixel, capped at `limit`
    (THRESH_TRUNC): the chamfer distance, the shortest path of mask steps summed in float32, found by
    relaxing every step `limit` times (a path shorter than `limit` has fewer steps than that)."""
    far = jnp.float32(limit + 1)
    distance = jnp.where(edges, 0.0, far).astype(jnp.float32)

    def relax(_, distance):
        shifted = _windows(distance, 2, "constant", constant_values=far)
        return functools.reduce(jnp.minimum, [shifted(dy, dx) + jnp.float32(step) for dy, dx, step in _CHAMFER_STEPS],
                                distance)

    return jnp.minimum(jax.lax.fori_loop(0, limit, relax, distance), jnp.float32(limit))


def _blurred_levels(plane):
    """`cv2.blur(plane, (3, 3)).astype(np.uint8)` of a float32 plane in [0, 32): OpenCV sums the nine
    values in float64 and scales the sum by 1/9 before storing float32, which the cast then rounds
    down. The values (multiples of 2^-23) are summed exactly as integers, and the float32 rounding
    of sum / 9 is decided in integers: it lifts a mean to the next level when within half a float32
    step below it."""
    units = (plane * jnp.float32(1 << 23)).astype(jnp.int32)
    total = _box_sum(units)  # at most 9 * 32 * 2^23 < 2^31
    denominator = 9 << 23
    level = total // denominator
    below_next = denominator - (total - level * denominator)
    exponent = jnp.where(level > 0, 31 - jax.lax.clz(jnp.maximum(level, 1)), -1)  # floor(log2(mean)) or -1
    # mean = level + 1 - below_next / denominator rounds up when below_next / denominator < 2^(exponent - 24),
    # that is when 8 below_next < 9 * 2^(exponent + 2) (exponent + 2 >= 1; both sides below 2^31).
    return level + (8 * below_next < 9 << (exponent + 2))


def _box_sum(plane):
    """The sum over each 3x3 window, borders BORDER_REFLECT_101 (cv2.blur's, times 9)."""
    window = _windows(plane, 1, "reflect")
    return sum(window(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def _equalize_histogram(plane):
    """OpenCV's `equalizeHist` of an 8-bit int32 plane: level i maps to round(255 / (n - n_first) times
    the count of pixels above the lowest level and at most i), in float32, halves to even."""
    counts = jnp.bincount(plane.ravel(), length=256)
    first = jnp.argmax(counts > 0)
    above_first = jnp.cumsum(counts) - jnp.cumsum(counts)[first]
    scale = jnp.float32(255.0) / (plane.size - counts[first]).astype(jnp.float32)
    lut = jnp.where(jnp.arange(256) > first, jnp.round(above_first.astype(jnp.float32) * scale), 0).astype(jnp.int32)
    return jnp.where(counts[first] == plane.size, plane, lut[plane])  # one level only: unchanged


_SPATTER_EMBOSS = ((-2, -1, 0), (-1, 1, 1), (0, 1, 2))
_WATER = np.array([175, 238, 238], np.float64) / 255.0  # the published "pale turquoise" (its B, G, R order)
_MUD = np.array([63, 42, 20], np.float64) / 255.0


def spatter(key, image, c):
    """The published spatter. A layer of N(c[0], c[1]) noise, blurred (scikit-image's Gaussian, sigma
    c[2]) and zeroed below c[3]. Liquid (c[5] = 0): the layer as 8-bit, its Canny edges (50, 150), the
    distance to them (capped at 20, box-blurred, 8-bit), equalised, embossed and box-blurred as 8-bit
    with OpenCV, times the layer, scaled to a maximum of c[4], adds water's colour. Mud (c[5] = 1):
    where the layer is above c[3], blurred by sigma c[4], kept from 0.8 up, blends in mud's colour.
    The scripts treat the RGB image as OpenCV's BGR, so the water colour's first value, 175, goes to
    red; a grey image is spattered as grey RGB and converted back with ITU-R 601 luma."""
    mean, spread, sigma, threshold, strength, mud = c
    height, width = image.shape[:2]
    layer = _skimage_gaussian(mean + spread * jax.random.normal(key, (height, width), jnp.float32), sigma)
    layer = jnp.where(layer < threshold, 0.0, layer)
    rgb = jnp.repeat(image, 3, -1) if image.shape[-1] == 1 else image
    if mud:
        m = _skimage_gaussian((layer > threshold).astype(jnp.float32), strength)
        m = jnp.where(m < 0.8, 0.0, m)[..., None]
        out = _clip(rgb * (1 - m) + jnp.asarray(_MUD, jnp.float32) * m)
    else:
        liquid = (jnp.floor(layer * 255.0).astype(jnp.int32)) % 256  # numpy's astype(np.uint8)
        distance = _equalize_histogram(_blurred_levels(_chamfer_distance(_canny(liquid, 50, 150), 20)))
        window = _windows(distance, 1, "reflect")
        embossed = sum(k * window(dy - 1, dx - 1) for dy, row in enumerate(_SPATTER_EMBOSS) for dx, k in enumerate(row))
        embossed = jnp.clip(embossed, 0, 255)
        distance = (2 * _box_sum(embossed) + 9) // 18  # cv2.blur on 8 bits: rounded to the nearest
        m = (liquid * distance).astype(jnp.float32)
        m = m / jnp.maximum(jnp.max(m), 1.0) * jnp.float32(strength)  # a whole number: 0 (all zero) or >= 1
        out = _clip(rgb + m[..., None] * jnp.asarray(_WATER, jnp.float32))
    return out if image.shape[-1] == 3 else jnp.sum(out * jnp.asarray(LUMA, image.dtype), -1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Geometric.


def _reflect_101(index, size: int):
    """OpenCV's BORDER_REFLECT_101 for integer indices (gfedcb|abcdefgh|gfedcba)."""
    period = 2 * size - 2
    index = jnp.abs(index) % max(period, 1)
    return jnp.where(index >= size, period - index, index)


def _reflect(index, size: int):
    """SciPy's mode 'reflect' (half-sample symmetric) for integer indices (dcba|abcd|dcba)."""
    index = jnp.where(index < 0, -index - 1, index) % (2 * size)
    return jnp.where(index >= size, 2 * size - 1 - index, index)


def _bilinear(image, rows, cols, border):
    """`image` sampled at float coordinates [H, W] (row, column), bilinear, indices outside the
    image mapped by `border`."""
    height, width = image.shape[:2]
    r0, c0 = jnp.floor(rows), jnp.floor(cols)
    fr, fc = (rows - r0)[..., None], (cols - c0)[..., None]
    r0, c0 = r0.astype(jnp.int32), c0.astype(jnp.int32)
    r1, c1 = border(r0 + 1, height), border(c0 + 1, width)
    r0, c0 = border(r0, height), border(c0, width)
    top = image[r0, c0] * (1 - fc) + image[r0, c1] * fc
    bottom = image[r1, c0] * (1 - fc) + image[r1, c1] * fc
    return top * (1 - fr) + bottom * fr


def _reflect_gaussian_matrix(size: int, sigma: float):
    """SciPy's `gaussian_filter1d` with mode 'reflect' and truncate 3 as a matrix (identity at sigma 0)."""
    if sigma <= 0:
        return jnp.eye(size, dtype=jnp.float32)
    return jnp.asarray(_filter_matrix(size, tuple(_gaussian_taps(float(sigma), int(3.0 * sigma + 0.5))), "reflect"))


def elastic_transform(key, image, c):
    """The published elastic transform: a random affine map of three points around the centre (each
    moved by U(-c[2], c[2])), applied as OpenCV's `warpAffine` (bilinear, reflect-101 border), then a
    displacement field of U(-1, 1) noise smoothed by a Gaussian (sigma c[1], truncated at 3 sigma,
    'reflect' border) times c[0], sampled bilinearly with SciPy's 'reflect' border.

    OpenCV interpolates at coordinates rounded to 1/32 pixel; this op at exact ones (the difference
    is a fraction of a level on smooth images)."""
    alpha, sigma, spread = c
    height, width = image.shape[:2]
    affine_key, dx_key, dy_key = jax.random.split(key, 3)
    centre, size = np.float32([height, width]) // 2, min(height, width) // 3
    source = np.float32([centre + size, [centre[0] + size, centre[1] - size], centre - size])  # (x, y)
    target = source + jax.random.uniform(affine_key, (3, 2), jnp.float32, -spread, spread)
    # The affine map taking source to target (OpenCV's getAffineTransform): [x', y'] = A [x, y] + b.
    solved = jnp.linalg.solve(jnp.asarray(np.concatenate([source, np.ones((3, 1), np.float32)], 1)), target)
    linear, shift = solved[:2].T, solved[2]
    ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing="ij")
    # warpAffine fills each output pixel from the inverse map of its position.
    back = jnp.einsum("ij,jhw->ihw", jnp.linalg.inv(linear), jnp.stack([xs, ys]) - shift[:, None, None])
    warped = _bilinear(image, back[1], back[0], _reflect_101)
    rows, cols = _reflect_gaussian_matrix(height, float(sigma)), _reflect_gaussian_matrix(width, float(sigma))
    hp = jax.lax.Precision.HIGHEST

    def displacement(k):
        noise = jax.random.uniform(k, (height, width), jnp.float32, -1.0, 1.0)
        return jnp.einsum("gh,hw,vw->gv", rows, noise, cols, precision=hp) * alpha

    dx, dy = displacement(dx_key), displacement(dy_key)
    return _clip(_bilinear(warped, ys + dy, xs + dx, _reflect))


# ---------------------------------------------------------------------------------------------
# Digital.


@functools.lru_cache(maxsize=None)
def box_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of PIL's BOX resampling along one axis (Pillow's precompute_coeffs)."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 0.5 * filter_scale
    matrix = np.zeros((out_size, in_size))
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        for x in range(xmin, xmax):
            u = (x - center + 0.5) / filter_scale
            matrix[xx, x] = 1.0 if -0.5 < u <= 0.5 else 0.0
        matrix[xx] /= matrix[xx].sum()
    return matrix.astype(np.float32)


def _uint8_levels(x):
    """Rounded to the nearest of 256 levels, halves up, as PIL's 8-bit resampling stores each pass
    (its fixed-point sums make ties such as the mean of two pixels exact; 1e-3 keeps them there)."""
    return jnp.floor(_clip(x) * 255.0 + 0.5 + 1e-3) / 255.0


def _box_resize(image, height: int, width: int):
    rows = jnp.asarray(box_resize_matrix(image.shape[0], height))
    cols = jnp.asarray(box_resize_matrix(image.shape[1], width))
    hp = jax.lax.Precision.HIGHEST
    image = _uint8_levels(jnp.einsum("wv,hvc->hwc", cols, image, precision=hp))  # horizontal pass first
    return _uint8_levels(jnp.einsum("gh,hwc->gwc", rows, image, precision=hp))


def pixelate(key, image, c):
    """PIL BOX resize to int(size * c), then BOX back."""
    del key
    height, width = image.shape[:2]
    small = _box_resize(image, int(height * c), int(width * c))
    return _box_resize(small, height, width)


_LUMA_QUANT = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], np.float32).reshape(8, 8)
_CHROMA_QUANT = np.array([
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99] + [99] * 32, np.float32).reshape(8, 8)


def quantization_table(base: np.ndarray, quality: int) -> np.ndarray:
    """libjpeg's `jpeg_set_quality`: the standard table scaled by quality, clamped to 1..255."""
    quality = min(max(int(quality), 1), 100)
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return np.clip((base.astype(np.int64) * scale + 50) // 100, 1, 255).astype(np.float32)


# libjpeg's integer ("islow") DCT, jfdctint.c and jidctint.c: 13-bit fixed-point constants,
# FIX(x) = round(x * 2^13), and 2 extra bits of precision between the passes.
_CONST_BITS, _PASS1_BITS = 13, 2
_FIX = {name: int(round(value * (1 << _CONST_BITS))) for name, value in (
    ("0_298631336", 0.298631336), ("0_390180644", 0.390180644), ("0_541196100", 0.541196100),
    ("0_765366865", 0.765366865), ("0_899976223", 0.899976223), ("1_175875602", 1.175875602),
    ("1_501321110", 1.501321110), ("1_847759065", 1.847759065), ("1_961570560", 1.961570560),
    ("2_053119869", 2.053119869), ("2_562915447", 2.562915447), ("3_072711026", 3.072711026))}


def _descale(x, bits: int):
    """libjpeg's DESCALE: x / 2^bits rounded, halves up (an arithmetic shift after adding half)."""
    return (x + (1 << (bits - 1))) >> bits


def _odd_part(a, b, c, d):
    """The odd half shared by both DCTs, on the four odd inputs (forward: tmp4..tmp7; inverse: the
    coefficients 7, 5, 3, 1), returning the four products libjpeg combines into its outputs."""
    z1, z2, z3, z4 = a + d, b + c, a + c, b + d
    z5 = (z3 + z4) * _FIX["1_175875602"]
    a, b, c, d = a * _FIX["0_298631336"], b * _FIX["2_053119869"], c * _FIX["3_072711026"], d * _FIX["1_501321110"]
    z1, z2 = z1 * -_FIX["0_899976223"], z2 * -_FIX["2_562915447"]
    z3, z4 = z3 * -_FIX["1_961570560"] + z5, z4 * -_FIX["0_390180644"] + z5
    return a + z1 + z3, b + z2 + z4, c + z2 + z3, d + z1 + z4


def _forward_dct_1d(x, axis: int, first_pass: bool):
    """One pass of jfdctint.c along `axis` (of length 8) of an int32 array."""
    d = [jnp.take(x, i, axis=axis) for i in range(8)]
    tmp0, tmp7, tmp1, tmp6 = d[0] + d[7], d[0] - d[7], d[1] + d[6], d[1] - d[6]
    tmp2, tmp5, tmp3, tmp4 = d[2] + d[5], d[2] - d[5], d[3] + d[4], d[3] - d[4]
    tmp10, tmp13, tmp11, tmp12 = tmp0 + tmp3, tmp0 - tmp3, tmp1 + tmp2, tmp1 - tmp2
    bits = _CONST_BITS - _PASS1_BITS if first_pass else _CONST_BITS + _PASS1_BITS
    out = [None] * 8
    if first_pass:
        out[0], out[4] = (tmp10 + tmp11) << _PASS1_BITS, (tmp10 - tmp11) << _PASS1_BITS
    else:
        out[0], out[4] = _descale(tmp10 + tmp11, _PASS1_BITS), _descale(tmp10 - tmp11, _PASS1_BITS)
    z1 = (tmp12 + tmp13) * _FIX["0_541196100"]
    out[2] = _descale(z1 + tmp13 * _FIX["0_765366865"], bits)
    out[6] = _descale(z1 - tmp12 * _FIX["1_847759065"], bits)
    out[7], out[5], out[3], out[1] = (_descale(v, bits) for v in _odd_part(tmp4, tmp5, tmp6, tmp7))
    return jnp.stack(out, axis)


def _inverse_dct_1d(x, axis: int, first_pass: bool):
    """One pass of jidctint.c along `axis`: columns first (dequantised coefficients in, 2 extra bits
    out), then rows (those in, samples out before the level shift)."""
    c = [jnp.take(x, i, axis=axis) for i in range(8)]
    z1 = (c[2] + c[6]) * _FIX["0_541196100"]
    tmp2, tmp3 = z1 - c[6] * _FIX["1_847759065"], z1 + c[2] * _FIX["0_765366865"]
    tmp0, tmp1 = (c[0] + c[4]) << _CONST_BITS, (c[0] - c[4]) << _CONST_BITS
    tmp10, tmp13, tmp11, tmp12 = tmp0 + tmp3, tmp0 - tmp3, tmp1 + tmp2, tmp1 - tmp2
    odd0, odd1, odd2, odd3 = _odd_part(c[7], c[5], c[3], c[1])
    bits = _CONST_BITS - _PASS1_BITS if first_pass else _CONST_BITS + _PASS1_BITS + 3
    out = [tmp10 + odd3, tmp11 + odd2, tmp12 + odd1, tmp13 + odd0,
           tmp13 - odd0, tmp12 - odd1, tmp11 - odd2, tmp10 - odd3]
    return jnp.stack([_descale(v, bits) for v in out], axis)


def _jpeg_plane(plane, table: np.ndarray):
    """One [H, W] int32 plane of 8-bit samples (H, W multiples of 8) through libjpeg's baseline path
    with its integer DCT: level shift, forward DCT (its output 8 times the orthonormal one),
    quantisation by 8 x the table entry, rounding halves away from zero (jcdctmgr.c), dequantisation,
    inverse DCT, level shift back and the clamp to 0..255."""
    height, width = plane.shape
    blocks = (plane - 128).reshape(height // 8, 8, width // 8, 8).transpose(0, 2, 1, 3)  # [.., row, column]
    coefficients = _forward_dct_1d(_forward_dct_1d(blocks, 3, True), 2, False)
    divisor = jnp.asarray(table, jnp.int32) * 8
    quantised = jnp.sign(coefficients) * ((jnp.abs(coefficients) + divisor // 2) // divisor)
    samples = _inverse_dct_1d(_inverse_dct_1d(quantised * jnp.asarray(table, jnp.int32), 2, True), 3, False)
    samples = jnp.clip(samples + 128, 0, 255)
    return samples.transpose(0, 2, 1, 3).reshape(height, width)


def _pad_to(plane, multiple: int):
    """libjpeg pads the last block row and column by repeating the edge pixels."""
    height, width = plane.shape
    return jnp.pad(plane, ((0, -height % multiple), (0, -width % multiple)), mode="edge")


def _downsample_h2v2(plane):
    """libjpeg's 2x2 chroma averaging in integers, with its alternating rounding bias (1, 2, 1, ...)."""
    height, width = plane.shape
    sums = plane.reshape(height // 2, 2, width // 2, 2).sum((1, 3))
    return (sums + 1 + jnp.arange(width // 2) % 2) >> 2


def _fancy_upsample_h2v2(plane):
    """libjpeg's h2v2 'fancy' (triangle) upsampling of a chroma plane to twice its size, in its
    integer arithmetic: columns sum 3 x the nearer row + the further one, then rows of 3:1 with the
    rounding offsets 8 and 7; the edges repeat the edge sample."""
    above = jnp.concatenate([plane[:1], plane[:-1]])
    below = jnp.concatenate([plane[1:], plane[-1:]])
    colsums = jnp.stack([3 * plane + above, 3 * plane + below], 1).reshape(2 * plane.shape[0], plane.shape[1])
    last = jnp.concatenate([colsums[:, :1], colsums[:, :-1]], 1)
    following = jnp.concatenate([colsums[:, 1:], colsums[:, -1:]], 1)
    even = (3 * colsums + last + 8) >> 4
    odd = (3 * colsums + following + 7) >> 4
    return jnp.stack([even, odd], 2).reshape(colsums.shape[0], 2 * colsums.shape[1])


def jpeg_compression(key, image, c):
    """JPEG at quality c, on the device, as Pillow's libjpeg encodes and decodes it, in its integer
    arithmetic: baseline, the standard tables scaled by quality, 4:2:0 chroma (averaged down, 'fancy'
    upsampled), the integer DCT both ways, the fixed-point colour conversions (jccolor.c, jdcolor.c)."""
    del key
    height, width, channels = image.shape
    pixels = jnp.round(image * 255.0).astype(jnp.int32)
    luma_table, chroma_table = quantization_table(_LUMA_QUANT, c), quantization_table(_CHROMA_QUANT, c)
    if channels == 1:
        y = _jpeg_plane(_pad_to(pixels[..., 0], 8), luma_table)[:height, :width]
        return (y.astype(jnp.float32) / 255.0)[..., None]
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    # jccolor.c: 16-bit fixed point, FIX(x) = round(x * 2^16); chroma rounds with half - 1.
    y = (19595 * r + 38470 * g + 7471 * b + 32768) >> 16
    cb = (-11059 * r - 21709 * g + 32768 * b + (128 << 16) + 32767) >> 16
    cr = (32768 * r - 27439 * g - 5329 * b + (128 << 16) + 32767) >> 16
    y = _jpeg_plane(_pad_to(y, 16), luma_table)
    # jcsample.c repeats the last column at full resolution, jcprepct.c the last row of the 2x2
    # averages (after an odd height's last row is doubled) down to the block boundary.
    chroma_input = lambda p: jnp.pad(p, ((0, height % 2), (0, -width % 16)), mode="edge")
    subsampled = [_pad_to(_downsample_h2v2(chroma_input(p)), 8) for p in (cb, cr)]
    # The upsampler sees the chroma plane's own size, ceil(side / 2), not its padded blocks.
    half_height, half_width = (height + 1) // 2, (width + 1) // 2
    cb, cr = (_fancy_upsample_h2v2(_jpeg_plane(p, chroma_table)[:half_height, :half_width]) for p in subsampled)
    y, cb, cr = y[:height, :width], cb[:height, :width] - 128, cr[:height, :width] - 128
    # jdcolor.c's tables: red and blue rounded on their own, green from the two products' sum.
    red = y + ((91881 * cr + 32768) >> 16)
    green = y + ((-22554 * cb + 32768 - 46802 * cr) >> 16)
    blue = y + ((116130 * cb + 32768) >> 16)
    return jnp.clip(jnp.stack([red, green, blue], -1), 0, 255).astype(jnp.float32) / 255.0


def contrast(key, image, c):
    del key
    means = jnp.mean(image, axis=(0, 1), keepdims=True)
    return _clip((image - means) * c + means)


def _in_hsv(image, change):
    """Applies `change(hsv)` to an RGB image, or to a grey image as grey RGB (back to luma after)."""
    rgb = jnp.repeat(image, 3, -1) if image.shape[-1] == 1 else image
    out = dm_pix.hsv_to_rgb(change(dm_pix.rgb_to_hsv(rgb)))
    if image.shape[-1] == 1:
        out = jnp.sum(out * jnp.asarray(LUMA, out.dtype), -1, keepdims=True)
    return _clip(out)


def brightness(key, image, c):
    del key
    return _in_hsv(image, lambda hsv: hsv.at[..., 2].set(_clip(hsv[..., 2] + c)))


def saturate(key, image, c):
    del key
    return _in_hsv(image, lambda hsv: hsv.at[..., 1].set(_clip(hsv[..., 1] * c[0] + c[1])))


OPS = {name: globals()[name] for name in CORRUPTIONS}  # frost also takes `photos=`


# ---------------------------------------------------------------------------------------------
# Names, severities, batches.


def table_for(table: str, image_size: int) -> str:
    """`auto` picks the ImageNet-C parameters for images of 64 pixels or more, else CIFAR-10-C's."""
    if table == "auto":
        return "imagenet" if image_size >= 64 else "cifar10"
    if table not in TABLES:
        raise ValueError(f"corruption parameters: got {table!r}, expected 'auto' or one of {TABLES}")
    return table


def check(name: str, severity: int | None = None) -> None:
    if name not in CORRUPTIONS:
        raise ValueError(f"corruption: got {name!r}, expected one of {CORRUPTIONS}")
    if severity is not None and severity not in SEVERITIES:
        raise ValueError(f"corruption {name}: got severity {severity!r}, expected one of {SEVERITIES}")


def _op(name: str, table: str, frost_photos: str):
    """The op of `name`, with the photographs of `frost_photos` (a folder) bound where it needs them."""
    if name in NEEDS_PHOTOS:
        return functools.partial(OPS[name], photos=load_frost_photos(frost_photos, table))
    return OPS[name]


def corrupt(key, image, name: str, severity: int, table: str = "cifar10", to_uint8: bool = False,
            frost_photos: str = ""):
    """One image under corruption `name` at `severity` (1-5) with the `table` parameters; frost reads
    its photographs from the folder `frost_photos`."""
    check(name, severity)
    table = table_for(table, image.shape[0])
    out = _op(name, table, frost_photos)(key, image, PARAMS[table][name][severity - 1])
    # The released sets cast with np.uint8, which rounds down; 1e-3 keeps exact levels (k / 255 in
    # float32 times 255 can fall just below k) on their level.
    return jnp.floor(out * 255.0 + 1e-3) / 255.0 if to_uint8 else out


def random_corruption(key, images, names, table: str = "cifar10", frost_photos: str = ""):
    """Training: per image, a corruption drawn from `names` and a severity from 1-5, uniformly."""
    for name in names:
        check(name)
    choice_key, severity_key, noise_key = jax.random.split(key, 3)
    count = images.shape[0]
    table = table_for(table, images.shape[1])
    branches = [functools.partial(_op(name, table, frost_photos), c=PARAMS[table][name][s - 1])
                for name in names for s in SEVERITIES]
    index = (jax.random.randint(choice_key, (count,), 0, len(names)) * len(SEVERITIES)
             + jax.random.randint(severity_key, (count,), 0, len(SEVERITIES)))
    keys = jax.random.split(noise_key, count)
    return jax.vmap(lambda i, k, x: jax.lax.switch(i, branches, k, x))(index, keys, images)
