"""The oneDNN convolutions against `lax.conv_general_dilated`: every convolution shape of the models,
forward and both gradients, under jit and on 8 fake devices; and the models built on them."""

import functools
import os
import subprocess
import sys

import jax
import jax.test_util
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from conftest import REPO
from pivot_jax import models
from pivot_jax.ops import onednn

pytestmark = pytest.mark.skipif(not onednn.available() and not os.environ.get("CI"),
                                reason="the oneDNN extension did not build here (no compiler or no oneDNN)")

# Both sum in float32, in another order: the error grows with the length of the sum, about
# eps * sqrt(length) (the weight gradient of a 128 x 56 x 56 batch sums 4e5 products: ~8e-5). The
# tolerance is 1e-4 of the largest magnitude of the result.
RTOL = 1e-4


def reference(x, kernel, strides, padding):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def model_conv_shapes(name: str, image_size: int, channels: int) -> set:
    """Every distinct convolution of a model, read off its traced program: (input [H, W, C], kernel
    [KH, KW, I, O], strides, padding)."""
    model = models.get_model(name, num_classes=10, conv="xla")
    jaxpr = jax.make_jaxpr(lambda x: model.init(jax.random.key(0), x))(jnp.zeros((1, image_size, image_size, channels)))
    seen = set()

    def walk(program):
        for eqn in program.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
                seen.add((lhs[1:], rhs, tuple(eqn.params["window_strides"]),
                          tuple(tuple(p) for p in eqn.params["padding"])))
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    walk(inner)

    walk(jaxpr.jaxpr)
    return seen


CIFAR_SHAPES = sorted(set().union(*(model_conv_shapes(n, 32, 3) for n in ("resnet8", "resnet20", "resnet110")),
                                  model_conv_shapes("resnet20", 28, 1)))
RESNET18_SHAPES = sorted(model_conv_shapes("resnet18_imagenet", 224, 3))
RESNET50_ONLY_SHAPES = sorted(model_conv_shapes("resnet50_imagenet", 224, 3) - set(RESNET18_SHAPES))
IMAGENET_SHAPES = RESNET18_SHAPES + RESNET50_ONLY_SHAPES


def check_against_lax(shape, batch, seed=0):
    (h, w, c), kernel_shape, strides, pads = shape
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, h, w, c)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal(kernel_shape) / np.sqrt(np.prod(kernel_shape[:3])), jnp.float32)
    ours = jax.jit(lambda x, k: onednn.conv2d(x, k, strides, pads))
    theirs = jax.jit(lambda x, k: reference(x, k, strides, pads))
    y, y_ref = ours(x, kernel), theirs(x, kernel)
    np.testing.assert_allclose(y, y_ref, atol=RTOL * float(jnp.abs(y_ref).max()))
    cotangent = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    grads = jax.jit(jax.vjp(lambda x, k: onednn.conv2d(x, k, strides, pads), x, kernel)[1])(cotangent)
    grads_ref = jax.jit(jax.vjp(lambda x, k: reference(x, k, strides, pads), x, kernel)[1])(cotangent)
    for name, got, want in zip(("d input", "d kernel"), grads, grads_ref):
        np.testing.assert_allclose(got, want, atol=RTOL * float(jnp.abs(want).max()), err_msg=name)


def test_the_models_have_the_expected_convolutions():
    strides = {s for _, _, s, _ in CIFAR_SHAPES + IMAGENET_SHAPES}
    kernels = {k[:2] for _, k, _, _ in CIFAR_SHAPES + IMAGENET_SHAPES}
    assert strides == {(1, 1), (2, 2)} and kernels == {(1, 1), (3, 3), (7, 7)}
    assert len(CIFAR_SHAPES) >= 6 and len(IMAGENET_SHAPES) >= 15


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 128])
@pytest.mark.parametrize("shape", CIFAR_SHAPES, ids=str)
def test_cifar_and_mnist_convolutions_equal_lax(shape, batch):
    check_against_lax(shape, batch)


# At 224 pixels, batch 32 runs the kernels batch 128 runs (see ResNet-50 below) in a quarter of the time.
@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("shape", RESNET18_SHAPES, ids=str)
def test_resnet18_convolutions_equal_lax(shape, batch):
    check_against_lax(shape, batch)


# ResNet-50's wider layers at batch 128 would add minutes to the suite; batch 16 runs the same kernels
# (oneDNN picks them by layer shape; the batch only sets how many images each thread takes).
@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("shape", RESNET50_ONLY_SHAPES, ids=str)
def test_resnet50_convolutions_equal_lax(shape, batch):
    check_against_lax(shape, batch)


@pytest.mark.parametrize("strides,padding", [((1, 1), "SAME"), ((2, 2), "SAME"), ((2, 2), ((3, 2), (1, 0))),
                                             ((1, 2), "VALID")])
def test_gradients_by_finite_differences(strides, padding):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 7, 6, 3)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 4)) * 0.3, jnp.float32)
    conv = functools.partial(onednn.conv2d, strides=strides, padding=padding)
    jax.test_util.check_grads(conv, (x, kernel), order=1, modes=["rev"], atol=2e-2, rtol=2e-2, eps=1e-2)


def test_bfloat16_matches_lax_to_bfloat16_precision():
    if not onednn.bfloat16_supported():
        # Then conv_general_dilated must use XLA's for bfloat16 (the next test), and conv2d says why not.
        with pytest.raises(TypeError, match="no oneDNN bfloat16 convolution"):
            onednn.conv2d(jnp.ones((1, 4, 4, 2), jnp.bfloat16), jnp.ones((3, 3, 2, 2), jnp.bfloat16))
        pytest.skip("oneDNN has no bfloat16 convolution on this CPU (AVX512-BF16, AMX or AVX2-VNNI-2)")
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((4, 16, 16, 32)), jnp.bfloat16)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 32, 32)) * 0.06, jnp.bfloat16)
    y = onednn.conv2d(x, kernel).astype(jnp.float32)
    y_ref = reference(x.astype(jnp.float32), kernel.astype(jnp.float32), (1, 1), "SAME")
    assert y.dtype == jnp.float32 and float(jnp.abs(y - y_ref).max()) < 0.02 * float(jnp.abs(y_ref).max())


@pytest.mark.slow
def test_bfloat16_falls_back_to_lax_where_the_cpu_has_no_onednn_bfloat16(monkeypatch):
    monkeypatch.setattr(onednn, "bfloat16_supported", lambda: False)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.bfloat16)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 4, 4)), jnp.bfloat16)
    conv = lambda x, k: onednn.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_array_equal(jax.jit(conv)(x, kernel).astype(jnp.float32),
                                  lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                                           dimension_numbers=("NHWC", "HWIO", "NHWC")).astype(jnp.float32))
    model = models.get_model("resnet8", num_classes=3, dtype="bfloat16", conv="onednn")
    images = jnp.ones((2, 16, 16, 3))
    variables = model.init(jax.random.key(0), images)
    grads = jax.grad(lambda p: model.apply({**variables, "params": p}, images).sum())(variables["params"])
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_the_bfloat16_probe_runs_when_first_asked_inside_a_sharded_trace():
    expected = onednn.bfloat16_supported()
    onednn.bfloat16_supported.cache_clear()
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    x = jnp.ones((jax.device_count(), 8, 8, 4), jnp.bfloat16)

    def conv(x, kernel):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # as the train step traces
            return onednn.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    y = jax.jit(conv)(x, jnp.ones((3, 3, 4, 4), jnp.bfloat16))
    assert float(y[0, 4, 4, 0]) == 36.0 and onednn.bfloat16_supported() == expected


def test_unsupported_convolutions_fall_back_to_lax():
    x = jnp.ones((1, 8, 8, 4))
    kernel = jnp.ones((3, 3, 2, 4))  # two groups
    y = onednn.conv_general_dilated(x, kernel, (1, 1), "SAME", feature_group_count=2,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_array_equal(y, lax.conv_general_dilated(x, kernel, (1, 1), "SAME", feature_group_count=2,
                                                              dimension_numbers=("NHWC", "HWIO", "NHWC")))


def test_models_have_the_same_parameters_and_outputs_with_either_implementation():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 32, 32, 3)), jnp.float32)
    xla = models.get_model("resnet20", num_classes=10, conv="xla")
    ours = models.get_model("resnet20", num_classes=10, conv="onednn")
    variables = xla.init(jax.random.key(0), x)
    assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(variables)
    np.testing.assert_allclose(ours.apply(variables, x), xla.apply(variables, x), atol=1e-4)


SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P
from pivot_jax import sharding
from pivot_jax.ops import onednn
mesh = sharding.make_mesh()
assert mesh.size == 8
rng = np.random.default_rng(0)
x = jax.device_put(jnp.asarray(rng.standard_normal((16, 16, 16, 8)), jnp.float32), sharding.batch_sharding(mesh))
k = jax.device_put(jnp.asarray(rng.standard_normal((3, 3, 8, 16)) * 0.1, jnp.float32), sharding.replicated(mesh))

def loss(conv, x, k):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return jnp.sum(jnp.tanh(conv(x, k)))

ours = jax.jit(jax.value_and_grad(lambda x, k: loss(lambda a, b: onednn.conv2d(a, b, (2, 2)), x, k), (0, 1)))
ref = jax.jit(jax.value_and_grad(lambda x, k: loss(lambda a, b: lax.conv_general_dilated(
    a, b, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")), x, k), (0, 1)))
(v, (dx, dk)), (v_ref, (dx_ref, dk_ref)) = ours(x, k), ref(x, k)
np.testing.assert_allclose(v, v_ref, rtol=1e-5)
np.testing.assert_allclose(dx, dx_ref, atol=1e-5)
np.testing.assert_allclose(dk, dk_ref, rtol=1e-4, atol=1e-4)
assert dx.sharding.spec == P("data"), dx.sharding
text = ours.lower(x, k).compile().as_text()
print("custom calls:", text.count("pivot_conv_"))
"""


def test_on_eight_devices_each_shard_runs_its_own_convolution():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", SHARDED], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # One forward, one backward-data and one backward-weights call in the per-device program.
    assert "custom calls: 3" in result.stdout, result.stdout


def test_without_a_compiler_auto_falls_back_to_xla_with_one_line(tmp_path):
    """No compiler (or no oneDNN): one log line says why, and `auto` means XLA's convolution."""
    code = ("from pivot_jax import models; print(models.resolve_conv('auto'));\n"
            "try:\n    models.resolve_conv('onednn')\nexcept ValueError as error:\n    print(error)")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "PIVOT_JAX_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0] == "xla"
    assert "config.model.conv: 'onednn' needs" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if "oneDNN convolutions unavailable" in line]
    assert len(warnings) == 1 and "no-such-compiler" in warnings[0]
    assert "Traceback" not in result.stderr
