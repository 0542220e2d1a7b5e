"""The perturbations of docs/method.md, each against an independent reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from pivot_jax import perturb


def random_image(seed, shape=(32, 32, 3)):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


@pytest.mark.parametrize("sigma", [0.05, 0.15, 0.3])
def test_noise_has_requested_sigma(sigma):
    # On a mid-grey image clipping at 0 and 1 is more than 0.5 / sigma >= 1.6 standard deviations
    # away, so use a large image and measure the std of the unclipped pixels' noise.
    image = jnp.full((256, 256, 3), 0.5, jnp.float32)
    out = np.asarray(perturb.gaussian_noise(jax.random.key(0), image, sigma))
    noise = out - 0.5
    inside = (out > 0) & (out < 1)
    if sigma <= 0.15:  # clipping is beyond 3.3 sigma: practically never
        assert inside.mean() > 0.999
        # std of 196,608 samples: its standard error is sigma / sqrt(2n) ~ 0.16% of sigma; allow 1%.
        assert abs(noise.std() / sigma - 1) < 0.01
    assert abs(noise.mean()) < 0.01 * sigma + 1e-3
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_noise_is_clipped_to_unit_range_and_deterministic():
    image = jnp.asarray(random_image(0))
    a = perturb.gaussian_noise(jax.random.key(3), image, 0.5)
    b = perturb.gaussian_noise(jax.random.key(3), image, 0.5)
    c = perturb.gaussian_noise(jax.random.key(4), image, 0.5)
    assert float(a.min()) == 0.0 and float(a.max()) == 1.0  # sigma 0.5 reaches both bounds
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 0.1


@pytest.mark.parametrize("factor", [2, 4, 8])
@pytest.mark.parametrize("shape", [(32, 32, 3), (28, 28, 1)])
def test_nearest_is_block_replication(factor, shape):
    x = random_image(factor, shape)
    expected = np.repeat(np.repeat(x[::factor, ::factor], factor, 0), factor, 1)[: shape[0], : shape[1]]
    out = perturb.low_resolution(jnp.asarray(x), factor, "nearest")
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("factor", [2, 4])
def test_bicubic_matches_pil(factor):
    # PIL's BICUBIC and jax.image.resize both use Keys' cubic with a = -0.5, half-pixel centres and,
    # at the border, drop the taps that fall outside and renormalise; so they agree to float32 rounding.
    x = random_image(10 + factor)
    small = x[::factor, ::factor]
    ref = np.stack(
        [np.asarray(Image.fromarray(small[..., c], mode="F").resize((32, 32), Image.BICUBIC))
         for c in range(3)],
        axis=-1,
    )
    out = np.asarray(perturb.low_resolution(jnp.asarray(x), factor, "bicubic"))
    np.testing.assert_allclose(out, np.clip(ref, 0, 1), atol=1e-5)
    assert out.min() >= 0 and out.max() <= 1  # bicubic overshoots; the result is clipped


def test_low_resolution_factor_one_is_identity_and_bad_args_fail():
    x = jnp.asarray(random_image(2))
    np.testing.assert_array_equal(perturb.low_resolution(x, 1, "bicubic"), x)
    with pytest.raises(ValueError, match="method"):
        perturb.low_resolution(x, 2, "bilinear")
    with pytest.raises(ValueError, match="factor"):
        perturb.low_resolution(x, 0, "nearest")


@pytest.mark.parametrize("method", ["nearest", "bicubic"])
def test_mixed_resolution_keeps_box_and_is_lr_outside(method):
    x = jnp.asarray(random_image(5))
    box = jnp.array([0.25, 0.125, 0.75, 0.5])  # rows 8..23, columns 4..15 of 32
    out = np.asarray(perturb.mixed_resolution(x, box, 4, method))
    lr = np.asarray(perturb.low_resolution(x, 4, method))
    inside = np.zeros((32, 32), bool)
    inside[8:24, 4:16] = True
    np.testing.assert_array_equal(out[inside], np.asarray(x)[inside])
    np.testing.assert_array_equal(out[~inside], lr[~inside])


def test_centered_box():
    assert perturb.centered_box(0.5) == (0.25, 0.25, 0.75, 0.75)
    with pytest.raises(ValueError, match="fraction"):
        perturb.centered_box(0.0)


@pytest.mark.slow
def test_batched_versions_equal_per_image_functions():
    images = jnp.asarray(np.stack([random_image(i) for i in range(6)]))
    boxes = jnp.asarray([[0.1, 0.2, 0.6, 0.9]] * 3 + [[0.0, 0.0, 0.5, 0.5]] * 3, jnp.float32)
    key = jax.random.key(7)

    out = jax.jit(perturb.random_noise, static_argnums=2)(key, images, 0.15)
    sigma_key, noise_key = jax.random.split(key)
    sigmas = jax.random.uniform(sigma_key, (6,), jnp.float32, 0.0, 0.15)
    keys = jax.random.split(noise_key, 6)
    for i in range(6):
        np.testing.assert_allclose(out[i], perturb.gaussian_noise(keys[i], images[i], sigmas[i]), atol=1e-6)

    factors, methods = (2, 4), ("nearest", "bicubic")
    lr = jax.jit(perturb.random_low_resolution, static_argnums=(2, 3))(key, images, factors, methods)
    mr = jax.jit(perturb.random_mixed_resolution, static_argnums=(3, 4))(key, images, boxes, factors, methods)
    combos = [(f, m) for f in factors for m in methods]
    chosen = set()
    for i in range(6):
        matches = [c for c in combos
                   if np.allclose(lr[i], perturb.low_resolution(images[i], *c), atol=1e-6)]
        assert len(matches) == 1, f"image {i}: {matches}"
        chosen.add(matches[0])
        # MR draws the same (factor, method) as LR for the same key
        np.testing.assert_allclose(mr[i], perturb.mixed_resolution(images[i], boxes[i], *matches[0]), atol=1e-6)
    assert len(chosen) >= 2  # the choice varies per image


def test_perturb_batch_applies_kinds_in_row_order():
    images = jnp.asarray(np.stack([random_image(i) for i in range(4)]))
    boxes = jnp.tile(jnp.asarray([[0.25, 0.25, 0.75, 0.75]]), (4, 1))
    spec = perturb.PerturbSpec(kinds=("lr", "mr"), counts=(2, 2), factors=(4,), methods=("nearest",))
    out = jax.jit(perturb.perturb_batch, static_argnums=3)(jax.random.key(0), images, boxes, spec)
    for i in range(2):
        np.testing.assert_array_equal(out[i], perturb.low_resolution(images[i], 4, "nearest"))
    for i in range(2, 4):
        np.testing.assert_array_equal(out[i], perturb.mixed_resolution(images[i], boxes[i], 4, "nearest"))
    noise = perturb.PerturbSpec(kinds=("noise",), counts=(4,), max_sigma=0.15)
    a = perturb.perturb_batch(jax.random.key(1), images, boxes, noise)
    b = perturb.perturb_batch(jax.random.key(1), images, boxes, noise)
    np.testing.assert_array_equal(a, b)
    assert 0 < float(jnp.abs(a - images).max()) < 1


def test_perturb_spec_rejects_unknown_kind():
    with pytest.raises(ValueError, match="perturb.kinds"):
        perturb.PerturbSpec(kinds=("blur",), counts=(4,))


@pytest.mark.parametrize(
    "name,kind,sigma,factor,method",
    [("clean", "clean", 0.0, 1, "nearest"), ("noise_0.15", "noise", 0.15, 1, "nearest"),
     ("lr4_bicubic", "lr", 0.0, 4, "bicubic"), ("mr8_nearest", "mr", 0.0, 8, "nearest")],
)
def test_eval_names_parse(name, kind, sigma, factor, method):
    spec = perturb.EvalPerturbation.parse(name)
    assert (spec.kind, spec.sigma, spec.factor, spec.method) == (kind, sigma, factor, method)


@pytest.mark.parametrize("name", ["noise", "lr4", "lr4_bilinear", "blur_2", "lr0_nearest"])
def test_bad_eval_names_fail(name):
    with pytest.raises(ValueError, match="config.evals"):
        perturb.EvalPerturbation.parse(name)
