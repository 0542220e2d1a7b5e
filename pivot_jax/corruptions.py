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

import functools

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

from pivot_jax.conditions import CORRUPTIONS, SEVERITIES

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
    """Salt and pepper: each value is replaced with probability c, by 1 or 0 with equal odds."""
    flip_key, salt_key = jax.random.split(key)
    flipped = jax.random.bernoulli(flip_key, c, image.shape)
    salted = jax.random.bernoulli(salt_key, 0.5, image.shape)
    return jnp.where(flipped, salted.astype(image.dtype), image)


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
def _edge_filter_matrix(size: int, taps: tuple[float, ...]) -> np.ndarray:
    """[size, size] matrix of a 1-D correlation with `taps` whose border repeats the edge sample
    (scipy's mode 'nearest'): out = M @ x."""
    radius = len(taps) // 2
    matrix = np.zeros((size, size))
    for i in range(size):
        for k, tap in enumerate(taps):
            matrix[i, min(max(i + k - radius, 0), size - 1)] += tap
    return matrix.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _gaussian_taps(sigma: float, radius: int) -> np.ndarray:
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


def gaussian_blur(key, image, c):
    """scikit-image's `gaussian(sigma=c)`: border 'nearest', kernel truncated at 4 sigma."""
    del key
    taps = tuple(_gaussian_taps(float(c), int(4.0 * c + 0.5)))
    rows = jnp.asarray(_edge_filter_matrix(image.shape[0], taps))
    cols = jnp.asarray(_edge_filter_matrix(image.shape[1], taps))
    hp = jax.lax.Precision.HIGHEST  # separable: one matrix product per axis
    blurred = jnp.einsum("gh,hwc->gwc", rows, jnp.einsum("vw,hwc->hvc", cols, image, precision=hp), precision=hp)
    return _clip(blurred)


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


def defocus_blur(key, image, c):
    del key
    return _clip(_per_channel_filter(image, defocus_kernel(*c), "reflect"))


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


@functools.lru_cache(maxsize=None)
def _dct_matrix() -> np.ndarray:
    n = np.arange(8)
    matrix = np.cos((2 * n[None, :] + 1) * n[:, None] * np.pi / 16) * np.sqrt(2 / 8)
    matrix[0] /= np.sqrt(2)
    return matrix.astype(np.float32)  # orthonormal DCT-II: coefficients = D @ block @ D.T


def _jpeg_plane(plane, table: np.ndarray):
    """One [H, W] plane in 0..255 (H, W multiples of 8): level shift, 8x8 DCT, quantise, round,
    dequantise, inverse DCT."""
    height, width = plane.shape
    dct = jnp.asarray(_dct_matrix())
    hp = jax.lax.Precision.HIGHEST
    blocks = (plane - 128.0).reshape(height // 8, 8, width // 8, 8).transpose(0, 2, 1, 3)
    coefficients = jnp.einsum("ij,abjk,lk->abil", dct, blocks, dct, precision=hp)
    # libjpeg rounds halves away from zero; its integer DCT makes ties exact (a block's DC term is its
    # sum / 8), which the float DCT misses by an ulp: the 1e-4 puts them back on libjpeg's side.
    ratio = coefficients / table
    quantised = jnp.sign(ratio) * jnp.floor(jnp.abs(ratio) + 0.5 + 1e-4) * table
    restored = jnp.einsum("ji,abjk,kl->abil", dct, quantised, dct, precision=hp)
    return restored.transpose(0, 2, 1, 3).reshape(height, width) + 128.0


def _pad_to(plane, multiple: int):
    """libjpeg pads the last block row and column by repeating the edge pixels."""
    height, width = plane.shape
    return jnp.pad(plane, ((0, -height % multiple), (0, -width % multiple)), mode="edge")


def _downsample_h2v2(plane):
    """libjpeg's 2x2 chroma averaging in integers, with its alternating rounding bias (1, 2, 1, ...)."""
    height, width = plane.shape
    sums = plane.reshape(height // 2, 2, width // 2, 2).sum((1, 3))
    bias = 1.0 + (jnp.arange(width // 2) % 2)
    return jnp.floor((sums + bias) / 4.0)


def _fancy_upsample_h2v2(plane):
    """libjpeg's h2v2 'fancy' (triangle) upsampling of a chroma plane to twice its size, in its
    integer arithmetic: columns sum 3 x the nearer row + the further one, then rows of 3:1 with the
    rounding offsets 8 and 7; the edges repeat the edge sample."""
    above = jnp.concatenate([plane[:1], plane[:-1]])
    below = jnp.concatenate([plane[1:], plane[-1:]])
    colsums = jnp.stack([3 * plane + above, 3 * plane + below], 1).reshape(2 * plane.shape[0], plane.shape[1])
    last = jnp.concatenate([colsums[:, :1], colsums[:, :-1]], 1)
    following = jnp.concatenate([colsums[:, 1:], colsums[:, -1:]], 1)
    even = jnp.floor((3 * colsums + last + 8) / 16)
    odd = jnp.floor((3 * colsums + following + 7) / 16)
    return jnp.stack([even, odd], 2).reshape(colsums.shape[0], 2 * colsums.shape[1])


def jpeg_compression(key, image, c):
    """JPEG at quality c, on the device, as PIL's encoder and decoder do it (baseline, 4:2:0 chroma,
    the standard tables scaled by quality). The DCT is exact float, libjpeg's is integer: the two
    differ by rounding (tests/test_corruptions.py measures it)."""
    del key
    height, width, channels = image.shape
    pixels = jnp.round(image * 255.0)
    luma_table, chroma_table = quantization_table(_LUMA_QUANT, c), quantization_table(_CHROMA_QUANT, c)
    if channels == 1:
        y = _jpeg_plane(_pad_to(pixels[..., 0], 8), luma_table)[:height, :width]
        return (jnp.clip(jnp.round(y), 0, 255) / 255.0)[..., None]
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168735892 * r - 0.331264108 * g + 0.5 * b + 128.0
    cr = 0.5 * r - 0.418687589 * g - 0.081312411 * b + 128.0
    y, cb, cr = (jnp.round(p) for p in (y, cb, cr))
    samples = lambda p: jnp.clip(jnp.round(p), 0, 255)  # the decoder's 8-bit samples
    y = samples(_jpeg_plane(_pad_to(y, 16), luma_table))
    subsampled = [_downsample_h2v2(_pad_to(p, 16)) for p in (cb, cr)]
    cb, cr = (_fancy_upsample_h2v2(samples(_jpeg_plane(p, chroma_table))) for p in subsampled)
    y, cb, cr = y[:height, :width], cb[:height, :width] - 128.0, cr[:height, :width] - 128.0
    rgb = jnp.stack([y + 1.402 * cr, y - 0.344136286 * cb - 0.714136286 * cr, y + 1.772 * cb], -1)
    return jnp.clip(jnp.round(rgb), 0, 255) / 255.0


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


OPS = {name: globals()[name] for name in CORRUPTIONS}


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


def corrupt(key, image, name: str, severity: int, table: str = "cifar10", to_uint8: bool = False):
    """One image under corruption `name` at `severity` (1-5) with the `table` parameters."""
    check(name, severity)
    out = OPS[name](key, image, PARAMS[table_for(table, image.shape[0])][name][severity - 1])
    # The released sets cast with np.uint8, which rounds down; 1e-3 keeps exact levels (k / 255 in
    # float32 times 255 can fall just below k) on their level.
    return jnp.floor(out * 255.0 + 1e-3) / 255.0 if to_uint8 else out


def random_corruption(key, images, names, table: str = "cifar10"):
    """Training: per image, a corruption drawn from `names` and a severity from 1-5, uniformly."""
    for name in names:
        check(name)
    choice_key, severity_key, noise_key = jax.random.split(key, 3)
    count = images.shape[0]
    table = table_for(table, images.shape[1])
    branches = [functools.partial(OPS[name], c=PARAMS[table][name][s - 1]) for name in names for s in SEVERITIES]
    index = (jax.random.randint(choice_key, (count,), 0, len(names)) * len(SEVERITIES)
             + jax.random.randint(severity_key, (count,), 0, len(SEVERITIES)))
    keys = jax.random.split(noise_key, count)
    return jax.vmap(lambda i, k, x: jax.lax.switch(i, branches, k, x))(index, keys, images)
