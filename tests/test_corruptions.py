"""The common corruptions against references written here from the published formulas with NumPy, PIL
and SciPy (never by calling the JAX ops), the random ones by their statistics; names and severities."""

import colorsys
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from PIL import Image

from pivot_jax import conditions, config_lib, corruptions, perturb


def rng_for(*args):
    """A generator seeded by the call's own arguments, so what a test draws does not depend on which
    tests ran before it in the same process (xdist splits and -k selections stay reproducible)."""
    return np.random.default_rng(args)


def smooth_images(count, size=32, channels=3):
    """Natural-looking test images: upsampled random colour fields with a little pixel noise (not
    JPEG-decoded, see test_jpeg_on_images_that_were_jpeg_compressed_before)."""
    rng = rng_for(count, size, channels)
    small = rng.uniform(0, 255, (count, 8, 8, 3)).astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(s).resize((size, size), Image.BICUBIC)) for s in small]).astype(int)
    images = np.clip(images + rng.integers(-3, 4, images.shape), 0, 255).astype(np.uint8)
    return images if channels == 3 else images[..., :1]


def ours(name, c, images_uint8, key=jax.random.key(0)):
    fn = jax.jit(jax.vmap(lambda k, x: corruptions.OPS[name](k, x, c)))
    keys = jax.random.split(key, len(images_uint8))
    return np.asarray(fn(keys, jnp.asarray(images_uint8 / 255.0, jnp.float32)), np.float64)


# ---------------------------------------------------------------------------------------------
# Deterministic ops: exact or within a stated tolerance.


@pytest.mark.parametrize("sigma", [0.4, 1.0, 3.0])
def test_gaussian_blur_is_scikit_images_gaussian(sigma):
    """skimage.filters.gaussian = scipy.ndimage.gaussian_filter with mode 'nearest', truncate 4."""
    images = smooth_images(4)
    expected = np.stack([scipy.ndimage.gaussian_filter(x / 255.0, sigma=(sigma, sigma, 0), mode="nearest",
                                                       truncate=4.0) for x in images])
    np.testing.assert_allclose(ours("gaussian_blur", sigma, images), expected, atol=2e-6)


def _opencv_gaussian_kernel(size, sigma):
    x = np.arange(size) - (size - 1) / 2
    taps = np.exp(-(x**2) / (2 * sigma**2))
    return taps / taps.sum()


@pytest.mark.parametrize("radius,alias", [(0.3, 0.4), (1, 0.2), (1.5, 0.1), (3, 0.1), (10, 0.5)])
def test_defocus_blur_is_the_published_disk(radius, alias):
    # The disk of the published script, built here: grid, normalise, OpenCV's separable Gaussian
    # blur of the kernel (reflect-101 border), then filter2D per channel (reflect-101 border).
    grid = np.arange(-8, 9) if radius <= 8 else np.arange(-radius, radius + 1)
    size = 3 if radius <= 8 else 5
    xx, yy = np.meshgrid(grid, grid)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    g = _opencv_gaussian_kernel(size, alias)
    kernel = scipy.ndimage.correlate(disk, np.outer(g, g), mode="mirror")
    np.testing.assert_allclose(corruptions.defocus_kernel(radius, alias), kernel, atol=1e-7)
    images = smooth_images(2, size=40)
    expected = np.stack([np.clip(np.stack([scipy.ndimage.correlate(x[..., ch] / 255.0, kernel, mode="mirror")
                                           for ch in range(3)], -1), 0, 1) for x in images])
    np.testing.assert_allclose(ours("defocus_blur", (radius, alias), images), expected, atol=2e-6)


@pytest.mark.parametrize("size,c", [(32, 0.95), (32, 0.85), (32, 0.65), (224, 0.6), (224, 0.25), (28, 0.75)])
def test_pixelate_is_pils_box_resize(size, c):
    images = smooth_images(3, size=size)
    small = int(size * c)
    expected = np.stack([np.asarray(Image.fromarray(x).resize((small, small), Image.BOX).resize((size, size), Image.BOX))
                         for x in images]) / 255.0
    got = ours("pixelate", c, images)
    # PIL keeps each pass in 8 bits with fixed-point weights; the two agree to the level, except for
    # values that fall within rounding of a half level.
    assert np.abs(got - expected).max() <= 1 / 255 + 1e-6
    assert np.mean(np.abs(got - expected) > 1e-6) < 0.01


def test_pixelate_at_imagenet_severity_5_is_an_exact_4x_box():
    images = smooth_images(2, size=224)
    got = ours("pixelate", 0.25, images)
    blocks = np.round(images.reshape(2, 56, 4, 56, 4, 3).mean((2, 4))) / 255.0
    np.testing.assert_allclose(got, np.repeat(np.repeat(blocks, 4, 1), 4, 2), atol=1 / 255 + 1e-6)


def _pil_jpeg(images, quality):
    out = []
    for x in images:
        buffer = io.BytesIO()
        Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x).save(buffer, "JPEG", quality=quality)
        decoded = np.asarray(Image.open(buffer))
        out.append(decoded[..., None] if x.shape[-1] == 1 else decoded)
    return np.stack(out) / 255.0


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("quality", [80, 50, 40, 15, 7])
def test_jpeg_is_pils_encoder_and_decoder_bit_for_bit(quality, channels):
    """libjpeg's integer DCT, quantisation, colour conversion and chroma sampling: every pixel equal,
    on smooth images, on noise (every coefficient busy) and at sizes that leave partial blocks."""
    noise = rng_for(quality, channels).integers(0, 256, (4, 32, 32, channels), dtype=np.uint8)
    images = [*smooth_images(8, channels=channels), *noise]
    levels = lambda x: np.round(x * 255).astype(int)  # noqa: E731
    np.testing.assert_array_equal(levels(ours("jpeg_compression", quality, np.stack(images))),
                                  levels(_pil_jpeg(np.stack(images), quality)))
    for height, width in ((28, 28), (21, 30), (9, 40)) if quality == 50 else ():
        odd = smooth_images(2, size=40, channels=channels)[:, :height, :width]
        np.testing.assert_array_equal(levels(ours("jpeg_compression", quality, odd)), levels(_pil_jpeg(odd, quality)))


def test_jpeg_on_images_that_were_jpeg_compressed_before():
    """Re-quantising a quality-75 JPEG at quality 50, whose tables are twice quality 75's, puts many
    coefficients exactly on a rounding tie: libjpeg's integer DCT decides them, and so does ours."""
    once = (_pil_jpeg(smooth_images(16), 75) * 255).round().astype(np.uint8)
    for quality in (50, 40, 80):
        np.testing.assert_array_equal(np.round(ours("jpeg_compression", quality, once) * 255),
                                      np.round(_pil_jpeg(once, quality) * 255))


def test_jpeg_quality_tables_are_libjpegs():
    for quality in (7, 25, 50, 80, 95):
        buffer = io.BytesIO()
        Image.fromarray(smooth_images(1)[0]).save(buffer, "JPEG", quality=quality)
        tables = Image.open(buffer).quantization
        np.testing.assert_array_equal(corruptions.quantization_table(corruptions._LUMA_QUANT, quality).ravel(),
                                      np.asarray(tables[0]))
        np.testing.assert_array_equal(corruptions.quantization_table(corruptions._CHROMA_QUANT, quality).ravel(),
                                      np.asarray(tables[1]))


@pytest.mark.parametrize("c", [0.75, 0.15, 0.05])
def test_contrast(c):
    images = smooth_images(4)
    x = images / 255.0
    means = x.mean((1, 2), keepdims=True)
    np.testing.assert_allclose(ours("contrast", c, images), np.clip((x - means) * c + means, 0, 1), atol=1e-6)


def _hsv_reference(images, change):
    x = images / 255.0
    out = np.empty_like(x)
    for index in np.ndindex(x.shape[:3]):
        h, s, v = change(*colorsys.rgb_to_hsv(*x[index]))
        out[index] = colorsys.hsv_to_rgb(h, s, v)
    return out


@pytest.mark.parametrize("c", [0.05, 0.3, 0.5])
def test_brightness_adds_to_the_hsv_value(c):
    images = smooth_images(2)
    expected = _hsv_reference(images, lambda h, s, v: (h, s, min(max(v + c, 0.0), 1.0)))
    np.testing.assert_allclose(ours("brightness", c, images), expected, atol=2e-5)


@pytest.mark.parametrize("c", [(0.3, 0), (1.5, 0), (2.5, 0.2), (20, 0.2)])
def test_saturate_scales_the_hsv_saturation(c):
    images = smooth_images(2)
    expected = _hsv_reference(images, lambda h, s, v: (h, min(max(s * c[0] + c[1], 0.0), 1.0), v))
    np.testing.assert_allclose(ours("saturate", c, images), expected, atol=2e-5)


def test_colour_ops_on_grey_images_stay_grey():
    grey = smooth_images(2, channels=1)
    out = ours("brightness", 0.2, grey)
    expected = np.clip(grey / 255.0 + 0.2, 0, 1)  # V of a grey pixel is its value; S = 0
    np.testing.assert_allclose(out, expected, atol=2e-5)
    assert ours("saturate", (2.5, 0.2), grey).shape == grey.shape


# ---------------------------------------------------------------------------------------------
# Random ops: statistics with stated tolerances; keys; jit(vmap) = per image.

GREY = np.full((64, 64, 64, 3), 128, np.uint8)  # far from the clip bounds


def test_gaussian_and_speckle_noise_statistics():
    x = 128 / 255
    residual = ours("gaussian_noise", 0.08, GREY) - x
    assert abs(residual.mean()) < 1e-3 and abs(residual.std() - 0.08) < 1e-3
    relative = (ours("speckle_noise", 0.2, GREY) - x) / x
    assert abs(relative.mean()) < 2e-3 and abs(relative.std() - 0.2) < 2e-3


def test_shot_noise_is_poisson():
    c, x = 60, 128 / 255
    counts = ours("shot_noise", c, GREY) * c
    assert abs(counts.mean() - x * c) < 0.05 and abs(counts.var() / (x * c) - 1) < 0.02
    assert np.allclose(counts, np.round(counts), atol=1e-4)  # whole counts


@pytest.mark.slow
@pytest.mark.parametrize("c,level", [(60, 128), (3, 40), (500, 250), (50, 0)])
def test_shot_noise_counts_follow_the_poisson_distribution(c, level):
    import scipy.stats

    image = np.full((1, 128, 128, 3), level, np.uint8)
    counts = np.round(ours("shot_noise", c, image) * c).astype(int).ravel()
    counts = counts[counts < c]  # below the clip at 1.0
    lam = level / 255 * c
    values, observed = np.unique(counts, return_counts=True)
    expected = scipy.stats.poisson.pmf(values, lam) * counts.size / scipy.stats.poisson.cdf(c - 1, lam)
    frequent = expected > 50  # chi-square over the well-populated values
    chi2 = np.sum((observed[frequent] - expected[frequent]) ** 2 / expected[frequent])
    assert chi2 < scipy.stats.chi2.ppf(0.999, max(1, frequent.sum() - 1)), (chi2, frequent.sum())


def test_impulse_noise_replaces_a_fraction_c_half_salt_half_pepper():
    out = ours("impulse_noise", 0.09, GREY)
    salt, pepper = np.mean(out == 1.0), np.mean(out == 0.0)
    assert abs(salt + pepper - 0.09) < 2e-3 and abs(salt - pepper) < 2e-3
    assert np.all((out == 1.0) | (out == 0.0) | np.isclose(out, 128 / 255))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur",
                                  "fog", "elastic_transform", "motion_blur", "snow", "spatter"])
def test_random_ops_depend_on_the_key_only(name):
    image = jnp.asarray(smooth_images(1)[0] / 255.0, jnp.float32)
    c = corruptions.PARAMS["cifar10"][name][2]
    op = corruptions.OPS[name]
    a, b = op(jax.random.key(1), image, c), op(jax.random.key(1), image, c)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, op(jax.random.key(2), image, c))
    keys = jax.random.split(jax.random.key(3), 4)
    images = jnp.stack([image] * 4)
    batched = jax.jit(jax.vmap(lambda k, x: op(k, x, c)))(keys, images)
    for i in range(4):
        if name in ("motion_blur", "snow", "glass_blur"):
            # They store 8-bit levels midway: jit's fused float sums can put a rare value one level over.
            difference = np.abs(np.asarray(batched[i]) - np.asarray(op(keys[i], images[i], c)))
            assert np.mean(difference > 1e-6) < 0.002 and difference.max() < 1.5 / 255
        else:
            np.testing.assert_allclose(batched[i], op(keys[i], images[i], c), atol=1e-6)


def test_to_uint8_rounds_down_as_the_released_sets_do():
    image = jnp.full((32, 32, 3), 0.5)
    out = corruptions.corrupt(jax.random.key(0), image, "contrast", 1, to_uint8=True)
    assert float(out[0, 0, 0]) == pytest.approx(127 / 255, abs=1e-7)  # 127.5 -> 127


def _published_clipped_zoom(image, zoom):
    """The published helper, with SciPy's order-1 zoom."""
    size = image.shape[0]
    crop = int(np.ceil(size / zoom))
    top = (size - crop) // 2
    zoomed = scipy.ndimage.zoom(image[top:top + crop, top:top + crop], (zoom, zoom, 1), order=1)
    trim = (zoomed.shape[0] - size) // 2
    return zoomed[trim:trim + size, trim:trim + size]


@pytest.mark.parametrize("table,size", [("cifar10", 32), ("imagenet", 224)])
def test_zoom_blur_is_the_published_clipped_zoom_mean(table, size):
    image = smooth_images(1, size=size)[0] / 255.0
    for severity, factors in enumerate(corruptions.PARAMS[table]["zoom_blur"], 1):
        assert len(factors) == len(np.arange(1, factors[-1] + 1e-9, factors[1] - factors[0]))
        total = image.copy()
        for zoom in factors:
            total += _published_clipped_zoom(image, zoom)
        expected = np.clip(total / (len(factors) + 1), 0, 1)
        np.testing.assert_allclose(ours("zoom_blur", factors, image[None] * 255.0)[0], expected, atol=1e-6,
                                   err_msg=f"severity {severity}")


def _skimage_gaussian(image, sigma):
    return scipy.ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0), mode="nearest", truncate=4.0)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_glass_blur_is_the_published_shuffle_with_the_same_offsets(severity):
    sigma, delta, passes = c = corruptions.PARAMS["cifar10"]["glass_blur"][severity - 1]
    image = smooth_images(1)[0]
    key = jax.random.key(7)
    # The published loop, as its NumPy code runs (the tuple assignment through views), with the offsets
    # drawn from the same random numbers as the op (it draws them all at once, in loop order).
    count = passes * (32 - 2 * delta) ** 2
    offsets = np.asarray(jax.random.randint(key, (count, 2), -delta, delta))
    x = np.uint8(_skimage_gaussian(image / 255.0, sigma) * 255)
    i = 0
    for _ in range(passes):
        for h in range(32 - delta, delta, -1):
            for w in range(32 - delta, delta, -1):
                dx, dy = offsets[i]
                i += 1
                h_prime, w_prime = h + dy, w + dx
                x[h, w], x[h_prime, w_prime] = x[h_prime, w_prime], x[h, w]
    expected = np.clip(_skimage_gaussian(x / 255.0, sigma), 0, 1)
    got = np.asarray(corruptions.glass_blur(key, jnp.asarray(image / 255.0, jnp.float32), c))
    # One uint8 level apart where the float32 blur lands on the other side of a level (rare).
    assert np.mean(np.abs(got - expected) > 1e-5) < 0.01 and np.abs(got - expected).max() < 1.5 / 255


def _published_plasma(key, mapsize, decay):
    """The published diamond-square (numpy, float64), fed the same uniforms as the op draws."""
    heights = np.zeros((mapsize, mapsize))
    step, wibble, level = mapsize, 100.0, 0

    def wibbled(array, part):
        u = np.asarray(jax.random.uniform(jax.random.fold_in(key, 3 * level + part), array.shape, jnp.float32,
                                          -1.0, 1.0), np.float64)
        return array / 4 + wibble * (wibble * u)  # wibble * U(-wibble, wibble)

    while step >= 2:
        corner = heights[0:mapsize:step, 0:mapsize:step]
        square = corner + np.roll(corner, shift=-1, axis=0)
        square += np.roll(square, shift=-1, axis=1)
        heights[step // 2:mapsize:step, step // 2:mapsize:step] = wibbled(square, 0)
        dr = heights[step // 2:mapsize:step, step // 2:mapsize:step]
        ul = heights[0:mapsize:step, 0:mapsize:step]
        heights[0:mapsize:step, step // 2:mapsize:step] = wibbled(dr + np.roll(dr, 1, axis=0) + ul + np.roll(ul, -1, axis=1), 1)
        heights[step // 2:mapsize:step, 0:mapsize:step] = wibbled(dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=0), 2)
        step //= 2
        wibble /= decay
        level += 1
    heights -= heights.min()
    return heights / heights.max()


@pytest.mark.slow
@pytest.mark.parametrize("table,size", [("cifar10", 32), ("imagenet", 224)])
def test_fog_is_the_published_plasma_haze(table, size):
    image = smooth_images(1, size=size)[0] / 255.0
    key = jax.random.key(3)
    for strength, decay in corruptions.PARAMS[table]["fog"][::2]:
        mapsize = 32 if size == 32 else 256  # the published maps: 32 for CIFAR-10-C, 256 for ImageNet-C
        haze = _published_plasma(key, mapsize, decay)[:size, :size, None]
        peak = image.max()
        expected = np.clip((image + strength * haze) * peak / (peak + strength), 0, 1)
        got = np.asarray(corruptions.fog(key, jnp.asarray(image, jnp.float32), (strength, decay)))
        np.testing.assert_allclose(got, expected, atol=2e-5)


@pytest.mark.parametrize("table,size", [("cifar10", 32), ("imagenet", 224)])
def test_elastic_transform_is_the_published_affine_and_displacement(table, size):
    """OpenCV's getAffineTransform and warpAffine (reflect-101) written with NumPy and SciPy's
    affine_transform (mode 'mirror' is reflect-101), then SciPy's gaussian and map_coordinates as
    published, from the same random numbers as the op (three keys split from its key: affine,
    dx, dy). OpenCV itself would round coordinates to 1/32 pixel (not reproduced by either)."""
    image = smooth_images(1, size=size)[0] / 255.0
    key = jax.random.key(5)
    for alpha, sigma, spread in corruptions.PARAMS[table]["elastic_transform"][::2]:
        affine_key, dx_key, dy_key = jax.random.split(key, 3)
        centre, third = np.float32([size, size]) // 2, size // 3
        source = np.float32([centre + third, [centre[0] + third, centre[1] - third], centre - third])
        target = source + np.asarray(jax.random.uniform(affine_key, (3, 2), jnp.float32, -spread, spread))
        affine = np.linalg.solve(np.c_[source, np.ones(3)].astype(np.float64), target.astype(np.float64)).T
        inverse = np.linalg.inv(affine[:, :2])
        swap = np.array([[0, 1], [1, 0]])  # (x, y) <-> (row, column)
        warped = np.stack([scipy.ndimage.affine_transform(image[..., k], swap @ inverse @ swap,
                                                          offset=-(swap @ inverse @ affine[:, 2]), order=1,
                                                          mode="mirror") for k in range(3)], -1)

        def displacement(k):
            noise = np.asarray(jax.random.uniform(k, (size, size), jnp.float32, -1.0, 1.0), np.float64)
            return scipy.ndimage.gaussian_filter(noise, sigma, mode="reflect", truncate=3) * alpha

        dx, dy = displacement(dx_key)[..., None], displacement(dy_key)[..., None]
        x, y, z = np.meshgrid(np.arange(size), np.arange(size), np.arange(3))
        indices = np.reshape(y + dy, (-1, 1)), np.reshape(x + dx, (-1, 1)), np.reshape(z, (-1, 1))
        expected = np.clip(scipy.ndimage.map_coordinates(warped, indices, order=1, mode="reflect").reshape(
            image.shape), 0, 1)
        got = np.asarray(corruptions.elastic_transform(key, jnp.asarray(image, jnp.float32), (alpha, sigma, spread)))
        np.testing.assert_allclose(got, expected, atol=2e-5)
        assert np.abs(got - image).mean() > 1e-3  # it did move the pixels


def _imagemagick_motion_blur(image, radius, sigma, angle):
    """ImageMagick 6's MotionBlurImage (effect.c) in NumPy: 2 ceil(radius) + 1 one-sided Gaussian
    taps, tap i at column + ceil(i cos - 0.5), row + ceil(i sin - 0.5), edge pixels past the border;
    image in 0..255, result 8-bit as it writes it (rounded down)."""
    taps = np.arange(int(2 * np.ceil(radius) + 1))
    weights = np.exp(-(taps**2) / (2.0 * sigma**2))
    weights /= weights.sum()
    height, width = image.shape[:2]
    total = np.zeros(image.shape)
    for i, weight in zip(taps, weights):
        columns = np.clip(np.arange(width) + int(np.ceil(i * np.cos(np.deg2rad(angle)) - 0.5)), 0, width - 1)
        rows = np.clip(np.arange(height) + int(np.ceil(i * np.sin(np.deg2rad(angle)) - 0.5)), 0, height - 1)
        total += weight * image[rows][:, columns]
    return np.floor(total + 2e-3)


def _real_imagemagick():
    import shutil

    for name in ("convert-im6.q16", "magick"):
        if shutil.which(name) and "ImageMagick" in __import__("subprocess").run(
                [name, "-version"], capture_output=True, text=True).stdout:
            return shutil.which(name)
    return None


@pytest.mark.skipif(_real_imagemagick() is None, reason="ImageMagick is not installed (apt-get install imagemagick)")
def test_the_motion_blur_reference_is_imagemagicks_own(tmp_path):
    import subprocess

    image = smooth_images(1)[0]
    Image.fromarray(image).save(tmp_path / "in.png")
    for radius, sigma, angle in [(6, 1.5, 30.0), (9, 2.5, -40.0), (10, 4, 0.0), (15, 5, 12.5)]:
        subprocess.run([_real_imagemagick(), str(tmp_path / "in.png"), "-motion-blur", f"{radius}x{sigma}{angle:+g}",
                        str(tmp_path / "out.png")], check=True)
        real = np.asarray(Image.open(tmp_path / "out.png").convert("RGB")).astype(float)
        difference = np.abs(_imagemagick_motion_blur(image.astype(float), radius, sigma, angle) - real)
        # Equal but where a sum sits within ImageMagick's 16-bit quantum of an 8-bit level (rare).
        assert np.mean(difference > 0) < 0.002 and difference.max() <= 1


@pytest.mark.parametrize("table,size", [("cifar10", 32), ("imagenet", 224)])
def test_motion_blur_is_imagemagicks_at_the_drawn_angle(table, size):
    image = smooth_images(1, size=size)[0]
    key = jax.random.key(11)
    angle = float(jax.random.uniform(key, (), jnp.float32, -45.0, 45.0))
    for radius, sigma in corruptions.PARAMS[table]["motion_blur"][::2]:
        expected = _imagemagick_motion_blur(image.astype(float), radius, sigma, angle) / 255.0
        got = np.asarray(corruptions.motion_blur(key, jnp.asarray(image / 255.0, jnp.float32), (radius, sigma)))
        # float32 against float64 trigonometry can move one tap's offset when it sits on a half pixel.
        assert np.mean(np.abs(got - expected) > 1e-5) < 0.002 and np.abs(got - expected).max() < 1.5 / 255


@pytest.mark.parametrize("table,size", [("cifar10", 32), ("imagenet", 224)])
def test_snow_is_the_published_layers_from_the_same_random_numbers(table, size):
    image = smooth_images(1, size=size)[0] / 255.0
    key = jax.random.key(13)
    layer_key, angle_key = jax.random.split(key)
    angle = float(jax.random.uniform(angle_key, (), jnp.float32, -135.0, -45.0))
    for c in corruptions.PARAMS[table]["snow"][::2]:
        mean, spread, zoom, threshold, radius, sigma, keep = c
        layer = mean + spread * np.asarray(jax.random.normal(layer_key, (size, size), jnp.float32), np.float64)
        layer = _published_clipped_zoom(layer[..., None], zoom)
        layer[layer < threshold] = 0
        layer = (np.clip(layer.squeeze(), 0, 1) * 255).astype(np.uint8)[..., None].astype(float)
        layer = _imagemagick_motion_blur(layer, radius, sigma, angle) / 255.0
        grey = (image @ np.array([0.299, 0.587, 0.114]))[..., None]  # OpenCV's RGB2GRAY
        brightened = keep * image + (1 - keep) * np.maximum(image, grey * 1.5 + 0.5)
        expected = np.clip(brightened + layer + np.rot90(layer, k=2), 0, 1)
        got = np.asarray(corruptions.snow(key, jnp.asarray(image, jnp.float32), c))
        assert np.mean(np.abs(got - expected) > 1e-4) < 0.01, c  # a level where float32 sits on a boundary
        assert np.abs(got - image).mean() > 1e-3


def _published_spatter(x_uint8, c, normal):
    """The published spatter (CIFAR-10-C's and ImageNet-C's scripts are the same code), with its
    N(0, 1) draws given and scikit-image's `gaussian` written as SciPy's filter it calls."""
    import cv2

    def gaussian(a, sigma):
        return scipy.ndimage.gaussian_filter(a, sigma, mode="nearest", truncate=4.0)

    x = np.array(x_uint8, dtype=np.float32) / 255.
    liquid_layer = gaussian(c[0] + c[1] * normal.astype(np.float64), sigma=c[2])
    liquid_layer[liquid_layer < c[3]] = 0
    if c[5] == 0:
        liquid_layer = (liquid_layer * 255).astype(np.uint8)
        dist = cv2.distanceTransform(255 - cv2.Canny(liquid_layer, 50, 150), cv2.DIST_L2, 5)
        _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
        dist = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
        dist = cv2.filter2D(dist, cv2.CV_8U, np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]]))
        dist = cv2.blur(dist, (3, 3)).astype(np.float32)
        m = cv2.cvtColor(liquid_layer * dist, cv2.COLOR_GRAY2BGRA)
        m /= np.max(m, axis=(0, 1))
        m *= c[4]
        color = np.concatenate([v / 255. * np.ones_like(m[..., :1]) for v in (175, 238, 238)], axis=2)
        color, x = cv2.cvtColor(color, cv2.COLOR_BGR2BGRA), cv2.cvtColor(x, cv2.COLOR_BGR2BGRA)
        return cv2.cvtColor(np.clip(x + m * color, 0, 1), cv2.COLOR_BGRA2BGR)
    m = gaussian(np.where(liquid_layer > c[3], 1, 0).astype(np.float32), sigma=c[4])
    m[m < 0.8] = 0
    color = np.concatenate([v / 255. * np.ones_like(x[..., :1]) for v in (63, 42, 20)], axis=2)
    return np.clip(x * (1 - m[..., np.newaxis]) + color * m[..., np.newaxis], 0, 1)


@pytest.mark.parametrize("table,size", [("cifar10", 32), ("imagenet", 64)])
def test_spatter_is_the_published_liquid_and_mud_from_the_same_random_numbers(table, size):
    """Every severity (liquid at 1-3: OpenCV's Canny, distance transform, histogram equalisation and
    filters on the device; mud at 4-5) against the published code run on the op's own N(0, 1) draws."""
    images = smooth_images(4, size=size)
    op = jax.jit(corruptions.spatter, static_argnums=2)
    for c in corruptions.PARAMS[table]["spatter"]:
        for i, image in enumerate(images):
            key = jax.random.key(i)
            normal = np.asarray(jax.random.normal(key, (size, size), jnp.float32))
            expected = _published_spatter(image, c, normal)
            got = np.asarray(op(key, jnp.asarray(image / 255.0, jnp.float32), c))
            difference = np.abs(got - expected)
            # float32 where the scripts blur the layer in float64: a rare value crosses a threshold
            assert np.mean(difference > 1e-5) < 0.005 and difference.max() < 0.01, (c, i)
            assert np.mean(np.abs(expected - image / 255.0) > 1e-3) > 0.01, (c, i)  # the op did something


def test_spatters_opencv_steps_on_edge_cases():
    """Canny's ties and hysteresis, the chamfer distance and equalisation against OpenCV on layers made
    to hit them: flat, a single step, a ridge, sparse dots and noise."""
    import cv2

    rng = np.random.default_rng(5)
    layers = [np.zeros((24, 24), np.uint8), np.full((24, 24), 180, np.uint8),
              np.where(np.arange(24)[None, :] < 11, 0, 200).repeat(24, 0).astype(np.uint8),
              np.where(np.abs(np.arange(24)[:, None] - np.arange(24)[None, :]) < 2, 220, 30).astype(np.uint8),
              (rng.random((24, 24)) < 0.02).astype(np.uint8) * 255, rng.integers(0, 256, (24, 24)).astype(np.uint8),
              np.clip(rng.normal(120, 60, (24, 24)), 0, 255).astype(np.uint8)]
    for layer in layers:
        edges = np.asarray(corruptions._canny(jnp.asarray(layer, jnp.int32), 50, 150))
        np.testing.assert_array_equal(edges, cv2.Canny(layer, 50, 150) == 255)
        expected = cv2.threshold(cv2.distanceTransform(255 - cv2.Canny(layer, 50, 150), cv2.DIST_L2, 5), 20, 20,
                                 cv2.THRESH_TRUNC)[1]
        distance = corruptions._chamfer_distance(jnp.asarray(edges), 20)
        np.testing.assert_array_equal(np.asarray(distance), expected)
        np.testing.assert_array_equal(corruptions._blurred_levels(distance), cv2.blur(expected, (3, 3)).astype(np.uint8))
        levels = (layer // 12).astype(np.uint8)
        np.testing.assert_array_equal(corruptions._equalize_histogram(jnp.asarray(levels, jnp.int32)),
                                      cv2.equalizeHist(levels))


def test_spatters_blurred_distance_rounds_as_opencvs_float64_blur():
    """Distances summed from the chamfer steps in float32 often sit a hair below a whole level after
    cv2.blur; OpenCV's float64 sum and float32 store lift some of them to the level, which rounding
    the exact mean down would miss."""
    import cv2

    rng = np.random.default_rng(0)
    steps, lifted = np.float32([1.0, 1.4, 2.1969]), 0
    for _ in range(100):
        counts = rng.integers(0, 12, (16, 16, 3))
        plane = np.zeros((16, 16), np.float32)
        for k, step in enumerate(steps):
            for r in range(12):
                plane = np.where(counts[..., k] > r, plane + step, plane).astype(np.float32)
        plane = np.minimum(plane, np.float32(20))
        expected = cv2.blur(plane, (3, 3)).astype(np.uint8)
        np.testing.assert_array_equal(corruptions._blurred_levels(jnp.asarray(plane)), expected)
        exact = np.floor(scipy.ndimage.uniform_filter(plane.astype(np.float64), 3, mode="mirror") + 1e-12)
        lifted += int(np.sum(expected != exact))
    assert lifted > 10  # the case this rounding exists for did occur


# ---------------------------------------------------------------------------------------------
# Names, severities, tables; test conditions and training.


def test_tables_are_picked_by_image_size_and_can_be_overridden():
    assert corruptions.table_for("auto", 32) == "cifar10" and corruptions.table_for("auto", 224) == "imagenet"
    assert corruptions.table_for("imagenet", 32) == "imagenet"
    assert corruptions.PARAMS["cifar10"]["gaussian_noise"][4] == 0.10  # CIFAR-10-C s5 is exactly sigma 0.1
    assert set(corruptions.PARAMS["imagenet"]) == set(corruptions.CORRUPTIONS)


def test_bad_names_and_severities_list_what_exists():
    with pytest.raises(ValueError, match="expected one of .*jpeg_compression"):
        corruptions.check("jpeg")
    with pytest.raises(ValueError, match=r"severity 6, expected one of \(1, 2, 3, 4, 5\)"):
        corruptions.check("contrast", 6)
    with pytest.raises(ValueError, match="got 'jpeg_compression_6'.*'<corruption>_<1-5>'.*jpeg_compression"):
        conditions.EvalCondition.parse("jpeg_compression_6")
    with pytest.raises(ValueError, match="gaussian_blur"):
        conditions.EvalCondition.parse("blur_3")


def test_conditions_name_every_corruption_and_severity():
    condition = conditions.EvalCondition.parse("jpeg_compression_3")
    assert (condition.kind, condition.corruption, condition.severity) == ("corruption", "jpeg_compression", 3)
    suite = conditions.expand(["clean", conditions.SUITE])
    assert suite[0] == "clean" and len(suite) == 1 + 18 * 5 and "saturate_5" in suite and "spatter_5" in suite


def test_a_run_evaluated_before_spatter_joined_keeps_its_suite():
    """Spatter and frost are optional in a saved result: without them the suite mean is over the rest."""
    everything = {name: 0.5 for name in conditions.suite_names(photos=True)}
    before_spatter = {name: v for name, v in everything.items() if not name.startswith("spatter")}
    assert conditions.evaluated_suite(everything) == conditions.CORRUPTIONS
    assert conditions.evaluated_suite(before_spatter) == tuple(c for c in conditions.CORRUPTIONS if c != "spatter")
    no_frost = {name: v for name, v in before_spatter.items() if not name.startswith("frost")}
    assert len(conditions.evaluated_suite(no_frost)) == 17 and conditions.suite_mean(no_frost) == 0.5
    assert conditions.evaluated_suite({k: v for k, v in no_frost.items() if k != "fog_3"}) is None  # a hole


def test_eval_perturbation_applies_the_corruption_as_uint8(synthetic_config):
    config = synthetic_config()
    config.evals = ("clean", "pixelate_5")
    (_, pixelated) = config_lib.eval_perturbations(config)
    images = smooth_images(2, size=28, channels=1)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(2))
    out = np.asarray(pixelated.apply(keys, jnp.asarray(images / 255.0, jnp.float32), jnp.zeros((2, 4))))
    small = int(28 * 0.65)
    expected = np.stack([np.asarray(Image.fromarray(x[..., 0]).resize((small, small), Image.BOX).resize((28, 28), Image.BOX))
                         for x in images])[..., None] / 255.0
    assert np.abs(out - expected).max() <= 1 / 255 + 1e-6
    np.testing.assert_allclose(np.round(out * 255), out * 255, atol=1e-4)  # stored as uint8


@pytest.mark.slow
def test_training_draws_a_corruption_and_severity_per_image(synthetic_config):
    config = synthetic_config("mode=pivot,perturb=jpeg_compression,smoke")
    config_lib.validate(config)
    spec = config_lib.perturb_spec(config)
    assert spec.kinds == ("jpeg_compression",)
    images = jnp.asarray(smooth_images(spec.k, size=28, channels=1) / 255.0, jnp.float32)
    out = perturb.perturb_batch(jax.random.key(0), images, jnp.zeros((spec.k, 4)), spec)
    # Each row is the image at one of the five qualities (on the device, the same op as evaluation).
    candidates = [np.asarray(jax.vmap(lambda x, q=q: corruptions.jpeg_compression(None, x, q))(images))
                  for q in corruptions.PARAMS["cifar10"]["jpeg_compression"]]
    chosen = [next(i for i, c in enumerate(candidates) if np.allclose(out[row], c[row], atol=1e-6))
              for row in range(spec.k)]
    assert len(set(chosen)) >= 3  # severities vary across the rows


def test_training_on_corruptions_holds_out_the_benchmarks_15(synthetic_config, monkeypatch):
    """`perturb=corruptions` trains on noise, LR, MR and the published extras, a quarter of the rows
    each: none of the benchmark's 15 corruptions, which stay for the test."""
    assert conditions.EXTRAS == ("speckle_noise", "gaussian_blur", "spatter", "saturate")
    assert not set(conditions.EXTRAS) & set(conditions.BENCHMARK_CORRUPTIONS)
    config = synthetic_config("mode=pivot,perturb=corruptions,smoke")
    config_lib.validate(config)
    spec = config_lib.perturb_spec(config)
    assert spec.kinds == ("noise", "lr", "mr", "extras") and len(set(spec.counts)) == 1
    drawn_from = []
    real = corruptions.random_corruption
    monkeypatch.setattr(corruptions, "random_corruption",
                        lambda key, images, names, *rest: drawn_from.append(names) or real(key, images, names, *rest))
    images = jnp.asarray(smooth_images(spec.k, size=28, channels=1) / 255.0, jnp.float32)
    out = perturb.perturb_batch(jax.random.key(0), images, jnp.zeros((spec.k, 4)), spec)
    assert drawn_from == [conditions.EXTRAS] and out.shape == images.shape
    extras = out[-spec.counts[-1]:]
    assert float(jnp.abs(extras - images[-spec.counts[-1]:]).mean()) > 1e-3


def test_results_hold_the_suite_mean_a_table_and_a_plot_per_corruption_and_severity(tmp_path):
    import json

    from pivot_jax import results

    names = conditions.suite_names()
    accuracy = {"clean": 0.9, **{name: 0.3 + 0.005 * i for i, name in enumerate(names)}}
    results.write_results(tmp_path, 10, accuracy, 100, "default box")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["corruptions_mean"] == pytest.approx(np.mean([0.3 + 0.005 * i for i in range(len(names))]))
    text = (tmp_path / "results.md").read_text()
    first = names.index("jpeg_compression_1")  # 0.3 + 0.005 * (first .. first + 4)
    cells = " | ".join(f"{100 * (0.3 + 0.005 * (first + s)):.2f}" for s in range(5))
    assert f"| jpeg_compression | {cells} | {100 * (0.3 + 0.005 * (first + 2)):.2f} |" in text
    # One panel per corruption: two runs, the second with two seeds (a band).
    other = {name: value - 0.1 for name, value in accuracy.items()}
    assert results.plot_corruptions({"a": [accuracy], "b": [other, accuracy]}, tmp_path / "corruptions.png")
    assert (tmp_path / "corruptions.png").stat().st_size > 20_000
    del accuracy["saturate_5"]  # an incomplete suite has no mean, and no plot
    results.write_results(tmp_path, 11, accuracy, 100, "default box")
    assert "corruptions_mean" not in json.loads((tmp_path / "results.json").read_text())
    assert not results.plot_corruptions({"a": [accuracy]}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_mce_is_relative_to_alexnet_and_only_with_imagenet_c_parameters(tmp_path):
    import json

    from pivot_jax import results

    # Errors at exactly AlexNet's on every corruption: every CE is 1, so mCE is 1 (100 in the paper's unit).
    accuracy = {f"{c}_{s}": 1 - conditions.ALEXNET_ERRORS.get(c, 0.5) for c in conditions.suite_corruptions()
                for s in conditions.SEVERITIES}
    assert conditions.mean_corruption_error(accuracy) == pytest.approx(1.0)
    # Without frost evaluated, mCE is over the other 14 of the benchmark's 15.
    assert conditions.mce_corruptions(accuracy) == ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur",
                                                    "glass_blur", "motion_blur", "zoom_blur", "snow", "fog",
                                                    "elastic_transform", "pixelate", "jpeg_compression", "contrast",
                                                    "brightness")
    # Half AlexNet's error on pixelate alone: its CE is 0.5, the mean over the 14 falls by 0.5 / 14.
    accuracy.update({f"pixelate_{s}": 1 - conditions.ALEXNET_ERRORS["pixelate"] / 2 for s in conditions.SEVERITIES})
    assert conditions.mean_corruption_error(accuracy) == pytest.approx(1 - 0.5 / 14)

    results.write_results(tmp_path, 10, accuracy, 100, "default box", "imagenet")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["mce"] == pytest.approx(1 - 0.5 / 14) and len(saved["mce_corruptions"]) == 14
    assert "corruptions_mean_15" not in saved  # RobustBench's mean needs frost
    assert "mCE (corruption error relative to AlexNet, ImageNet-C) over 14 of its 15 corruptions (frost not " \
           "evaluated)" in (tmp_path / "results.md").read_text()
    results.write_results(tmp_path, 11, accuracy, 100, "default box", "cifar10")  # no AlexNet baseline there
    assert "mce" not in json.loads((tmp_path / "results.json").read_text())

    # With frost at AlexNet's error too: all 15 count, the pixelate CE of 0.5 now moves the mean by 0.5 / 15.
    accuracy.update({f"frost_{s}": 1 - conditions.ALEXNET_ERRORS["frost"] for s in conditions.SEVERITIES})
    assert conditions.mce_corruptions(accuracy) == conditions.BENCHMARK_CORRUPTIONS
    assert conditions.mean_corruption_error(accuracy) == pytest.approx(1 - 0.5 / 15)
    results.write_results(tmp_path, 12, accuracy, 100, "default box", "imagenet")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["mce_corruptions"]) == 15 and len(saved["corruptions"]) == 19
    benchmark = [accuracy[f"{c}_{s}"] for c in conditions.BENCHMARK_CORRUPTIONS for s in conditions.SEVERITIES]
    assert saved["corruptions_mean_15"] == pytest.approx(np.mean(benchmark)) and len(benchmark) == 75
    assert saved["corruptions_mean"] == pytest.approx(np.mean([accuracy[n] for n in conditions.suite_names(True)]))
    assert "| frost | " in (tmp_path / "results.md").read_text()
    del accuracy["contrast_3"]
    assert conditions.mean_corruption_error(accuracy) is None


def _suite_accuracy(clean, corrupted, photos=False, **per_corruption):
    accuracy = {"clean": clean}
    for name in conditions.suite_corruptions(photos):
        accuracy.update({f"{name}_{s}": per_corruption.get(name, corrupted) for s in conditions.SEVERITIES})
    return accuracy


def test_mce_against_a_baseline_run(tmp_path):
    import json

    from pivot_jax import results
    from pivot_jax.errors import ConfigError

    # The baseline: 90% clean, 60% under every corruption. Ours: 95% clean, 80% corrupted (half the error,
    # half the cost), but pixelate at the baseline's 60% (CE 1, cost 0.35 / 0.3).
    baseline = _suite_accuracy(0.9, 0.6)
    ours = _suite_accuracy(0.95, 0.8, photos=True, pixelate=0.6)
    # Frost is in our suite only: both means are over the 14 corruptions the two runs share.
    assert conditions.mce_corruptions(ours, baseline) == tuple(c for c in conditions.BENCHMARK_CORRUPTIONS
                                                              if c != "frost")
    assert conditions.mean_corruption_error(ours, baseline) == pytest.approx((13 * 0.5 + 1) / 14)
    assert conditions.relative_mean_corruption_error(ours, baseline) == pytest.approx((13 * 0.5 + 0.35 / 0.3) / 14)
    # A baseline with frost too: all 15 count.
    with_frost = _suite_accuracy(0.9, 0.6, photos=True)
    assert conditions.mean_corruption_error(ours, with_frost) == pytest.approx((14 * 0.5 + 1) / 15)
    # A corruption that costs the baseline nothing leaves no relative CE; a missing condition, no mCE.
    assert conditions.relative_mean_corruption_error(ours, {**baseline, **_suite_accuracy(0.9, 0.9)}) is None
    flawless = {**baseline, **{f"fog_{s}": 1.0 for s in conditions.SEVERITIES}}
    assert conditions.mean_corruption_error(ours, flawless) is None
    results.write_results(tmp_path / "flawless", 500, ours, 100, "default box", "cifar10",
                          {"run": "flawless", "accuracy": flawless})
    assert "mCE undefined (the baseline makes no error" in (tmp_path / "flawless" / "results.md").read_text()
    incomplete = dict(baseline)
    del incomplete["fog_4"]
    assert conditions.mean_corruption_error(ours, incomplete) is None

    # The baseline is read from its run directory, and results.json / results.md carry both figures.
    run = tmp_path / "baseline_run"
    results.write_results(run / "eval", 500, baseline, 100, "default box", "cifar10")
    read = results.read_baseline(run)
    assert read == {"run": str(run), "accuracy": baseline}
    results.write_results(tmp_path / "ours", 500, ours, 100, "default box", "cifar10", read)
    saved = json.loads((tmp_path / "ours" / "results.json").read_text())["mce_baseline"]
    assert saved["run"] == str(run) and len(saved["corruptions"]) == 14
    assert saved["mce"] == pytest.approx((13 * 0.5 + 1) / 14)
    assert saved["relative_mce"] == pytest.approx((13 * 0.5 + 0.35 / 0.3) / 14)
    assert (f"Against the baseline run {run}, over 14 corruptions: mCE 53.6, relative mCE 54.8 (100 = the "
            "baseline's)") in (tmp_path / "ours" / "results.md").read_text()
    # Errors that name the flag: no results there, or results without the suite.
    with pytest.raises(ConfigError, match="--baseline=.*nowhere: no eval/results.json there"):
        results.read_baseline(tmp_path / "nowhere")
    results.write_results(tmp_path / "partial" / "eval", 500, incomplete, 100, "default box")
    with pytest.raises(ConfigError, match=r"lacks 1 of the conditions that mCE needs \(fog_4\)"):
        results.read_baseline(tmp_path / "partial")


# ---------------------------------------------------------------------------------------------
# Frost: the published photographs' crops. Tests use photographs made here, written under the published
# names; a decoy frost6.jpg (the published sixth file, never drawn) checks that only the first five are.


def write_photos(folder, sizes, make):
    """`make(index, height, width)` -> uint8 RGB photo for frost1..5 (and the decoy, index 5), stored as
    RGBA PNG for the first three like the published ones (alpha dropped on reading) and JPEG for the rest
    unless `lossless`, in which case every file holds PNG data (the decoder reads the content, not the name)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (height, width) in enumerate(sizes):
        name = (*corruptions.FROST_FILES, "frost6.jpg")[index]
        rgb = make(index, height, width)
        if name.endswith(".png") or make.lossless:
            alpha = rng_for(1, index, height, width).integers(0, 256, (height, width, 1), dtype=np.uint8)
            rgba = np.concatenate([rgb, alpha], -1)
            Image.fromarray(rgba, "RGBA").save(folder / name, format="PNG")
        else:
            Image.fromarray(rgb).save(folder / name, format="JPEG", quality=90)
    return str(folder)


def _random_photo(index, height, width):
    small = rng_for(index, height, width).integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC))


_random_photo.lossless = False
# Sizes over the image side at both tables' scales (CIFAR-10-C's fifth: 46 to 66 > 32), all different.
PHOTO_SIZES = [(330, 260), (240, 300), (250, 310), (230, 285), (245, 290), (300, 300)]


@pytest.fixture(scope="module")
def frost_folder(tmp_path_factory):
    return write_photos(tmp_path_factory.mktemp("frost"), PHOTO_SIZES, _random_photo)


@pytest.mark.slow
@pytest.mark.parametrize("table,size", [("cifar10", 32), ("imagenet", 224)])
def test_frost_is_the_published_blend_of_a_photo_crop(frost_folder, table, size):
    import cv2

    images = smooth_images(3, size=size) / 255.0
    for index, c in enumerate(corruptions.PARAMS[table]["frost"]):
        key = jax.random.key(100 + index)
        # The random numbers, drawn as the op documents: photo, first row, first column.
        pick_key, row_key, column_key = jax.random.split(key, 3)
        pick = int(jax.random.randint(pick_key, (), 0, 5))
        photo = cv2.imread(f"{frost_folder}/{corruptions.FROST_FILES[pick]}")  # the published reading: BGR
        if table == "cifar10":
            photo = cv2.resize(photo, (0, 0), fx=0.2, fy=0.2)
        row = int(jax.random.randint(row_key, (), 0, photo.shape[0] - size))
        column = int(jax.random.randint(column_key, (), 0, photo.shape[1] - size))
        crop = photo[row:row + size, column:column + size][..., [2, 1, 0]]
        expected = np.clip(c[0] * images[0] * 255 + c[1] * crop, 0, 255) / 255
        got = np.asarray(corruptions.corrupt(key, jnp.asarray(images[0], jnp.float32), "frost", index + 1, table,
                                             frost_photos=frost_folder))
        np.testing.assert_allclose(got, expected, atol=1e-6)
        # Grey images: the blend of the grey RGB image, back to grey with ITU-R 601 luma.
        grey = images[0, ..., :1]
        expected_grey = np.clip(c[0] * grey * 255 + c[1] * crop, 0, 255) @ np.array(corruptions.LUMA) / 255
        got_grey = corruptions.corrupt(key, jnp.asarray(grey, jnp.float32), "frost", index + 1, table,
                                       frost_photos=frost_folder)
        np.testing.assert_allclose(np.asarray(got_grey)[..., 0], expected_grey, atol=1e-5)
    # The same key gives the same image, and jit(vmap) equals the per-image op.
    photos = corruptions.load_frost_photos(frost_folder, table)
    c = corruptions.PARAMS[table]["frost"][2]
    keys = jax.random.split(jax.random.key(7), 3)
    batched = jax.jit(jax.vmap(lambda k, x: corruptions.frost(k, x, c, photos)))(keys, jnp.asarray(images, jnp.float32))
    for i in range(3):
        np.testing.assert_allclose(batched[i], corruptions.frost(keys[i], jnp.asarray(images[i], jnp.float32), c, photos),
                                   atol=1e-6)
    assert not np.allclose(batched[0], corruptions.frost(keys[1], jnp.asarray(images[0], jnp.float32), c, photos))


def test_frost_draws_the_first_five_photos_uniformly_at_every_position(tmp_path):
    # Each photo codes itself in red and its pixels' row and column in green and blue; the decoy is red 250.
    def coded(index, height, width):
        rows, columns = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
        return np.stack([np.full((height, width), 40 * index + 10), rows, columns], -1).astype(np.uint8)

    coded.lossless = True
    sizes = [(14, 20), (12, 12), (20, 13), (16, 18), (11, 25), (30, 30)]
    photos = corruptions.load_frost_photos(write_photos(tmp_path, sizes, coded), "imagenet")  # whole photos
    count, size = 4000, 8
    keys = jax.random.split(jax.random.key(0), count)
    out = jax.jit(jax.vmap(lambda k: corruptions.frost(k, jnp.zeros((size, size, 3)), (0.0, 1.0), photos)))(keys)
    corner = np.round(np.asarray(out)[:, 0, 0] * 255).astype(int)
    picks = (corner[:, 0] - 10) // 40
    assert set(picks) == {0, 1, 2, 3, 4}  # never the sixth file
    assert np.all(np.abs(np.bincount(picks) - count / 5) < 5 * np.sqrt(count * 0.2 * 0.8))
    for pick, (height, width) in enumerate(sizes[:5]):
        rows, columns = corner[picks == pick, 1], corner[picks == pick, 2]
        # The published randint(0, side - size): every start from 0 to side - size - 1, and no other.
        assert set(rows) == set(range(height - size)) and set(columns) == set(range(width - size))
    # The crop is the photo's block at that start.
    whole = np.asarray(out)[0] * 255
    np.testing.assert_allclose(whole[..., 1] - whole[0, 0, 1], np.arange(size)[:, None] * np.ones(size), atol=1e-3)
    np.testing.assert_allclose(whole[..., 2] - whole[0, 0, 2], np.arange(size)[None, :] * np.ones((size, 1)), atol=1e-3)


def test_frost_needs_its_photographs_and_names_the_field(tmp_path, synthetic_config, frost_folder):
    from pivot_jax.errors import ConfigError

    image = jnp.zeros((32, 32, 3))
    with pytest.raises(ConfigError, match=r"config\.perturb\.frost_photos: .*got no folder.*frost1\.png.*frost5\.jpg"):
        corruptions.corrupt(jax.random.key(0), image, "frost", 1)
    write_photos(tmp_path / "partial", PHOTO_SIZES[:3], _random_photo)
    with pytest.raises(ConfigError, match=r"config\.perturb\.frost_photos: got .*partial.*lacks frost4\.jpg, frost5\.jpg"):
        corruptions.load_frost_photos(str(tmp_path / "partial"), "cifar10")
    small = write_photos(tmp_path / "small", [(100, 100)] * 5, _random_photo)  # a fifth of them is 20 pixels
    with pytest.raises(ValueError, match=r"frost_photos: .*frost1\.png 20x20.*larger than the 32x32 images"):
        corruptions.corrupt(jax.random.key(0), image, "frost", 1, frost_photos=small)
    # Before anything runs: a test condition or a training kind that needs them, and photos too small.
    config = synthetic_config()
    config.evals = ("clean", "frost_3")
    with pytest.raises(ConfigError, match=r"config\.perturb\.frost_photos: .*got no folder"):
        config_lib.validate(config)
    config = synthetic_config("mode=pivot,perturb=frost,smoke")
    with pytest.raises(ConfigError, match=r"config\.perturb\.frost_photos"):
        config_lib.validate(config)
    config.perturb.frost_photos = small
    config.perturb.corruption_table = "imagenet"  # whole photos: 100 pixels, enough for 28
    config_lib.validate(config)
    config.data.image_size = 100
    with pytest.raises(ConfigError, match=r"larger than the 100x100 images"):
        config_lib.validate(config)


@pytest.mark.slow
def test_with_its_photographs_frost_joins_the_suite_in_evaluation_and_training(synthetic_config, tmp_path):
    # Photos of one colour each: a frosted constant image is clip(a v + b colour) for one severity's (a, b).
    def flat(index, height, width):
        return np.full((height, width, 3), (30 + 50 * index, 200 - 30 * index, 90), np.uint8)

    flat.lossless = True
    folder = write_photos(tmp_path, PHOTO_SIZES[:5], flat)
    config = synthetic_config("mode=pivot,perturb=frost,smoke")
    config.evals = ("clean", "corruptions")
    config.perturb.frost_photos = ""
    assert "frost_1" not in [e.name for e in config_lib.eval_perturbations(config)]  # without the photos
    config.perturb.frost_photos = folder
    config_lib.validate(config)
    evals = config_lib.eval_perturbations(config)
    names = [e.name for e in evals]
    assert len(names) == 1 + 19 * 5 and names.index("frost_1") == names.index("snow_5") + 1
    # The test condition: one of the five photos at severity 2's weights, stored as uint8 (rounded down).
    value, (a, b) = 0.4, corruptions.PARAMS["cifar10"]["frost"][1]
    keys = jax.random.split(jax.random.key(1), 16)
    out = np.asarray(evals[names.index("frost_2")].apply(keys, jnp.full((16, 28, 28, 1), value), jnp.zeros((16, 4))))
    allowed = [np.floor(np.clip(a * value + b * flat(p, 1, 1)[0, 0] / 255, 0, 1) @ np.array(corruptions.LUMA) * 255
                        + 1e-3) / 255 for p in range(5)]
    assert all(any(np.allclose(row, level, atol=1e-6) for level in allowed) for row in out)
    assert len({round(float(row[0, 0, 0]), 4) for row in out}) >= 3

    config.perturb.kinds = ("frost",)
    spec = config_lib.perturb_spec(config)
    images = jnp.full((spec.k, 28, 28, 1), value, jnp.float32)
    out = np.asarray(perturb.perturb_batch(jax.random.key(0), images, jnp.zeros((spec.k, 4)), spec))
    candidates = {(severity, pick): np.clip(a * value + b * flat(pick, 1, 1)[0, 0] / 255, 0, 1) @ np.array(corruptions.LUMA)
                  for severity, (a, b) in enumerate(corruptions.PARAMS["cifar10"]["frost"]) for pick in range(5)}
    chosen = [next(k for k, v in candidates.items() if np.allclose(out[row], v, atol=1e-5)) for row in range(spec.k)]
    assert len({severity for severity, _ in chosen}) >= 3 and len({pick for _, pick in chosen}) >= 3
