"""Model shapes, parameter counts against the published ones, and the registry."""

import jax
import jax.numpy as jnp
import pytest

from pivot_jax import models


def count_params(name, size, num_classes, channels=3):
    model = models.get_model(name, num_classes=num_classes)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, channels))))
    return sum(x.size for x in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize(
    "name,size,num_classes,published,tolerance",
    [("resnet20", 32, 10, 0.27e6, 0.01e6), ("resnet110", 32, 10, 1.7e6, 0.05e6),
     ("resnet18_imagenet", 224, 1000, 11.7e6, 0.05e6), ("resnet50_imagenet", 224, 1000, 25.6e6, 0.05e6)],
)
def test_parameter_counts(name, size, num_classes, published, tolerance):
    assert abs(count_params(name, size, num_classes) - published) <= tolerance


def test_resnet_depths_grow_with_blocks():
    counts = [count_params(f"resnet{d}", 32, 10) for d in (20, 32, 44, 56)]
    # each extra block per stage adds the same number of parameters: the 6n + 2 structure
    steps = {b - a for a, b in zip(counts, counts[1:])}
    assert len(steps) == 1


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cifar_resnet_output_and_dtype(dtype):
    model = models.get_model("resnet8", num_classes=7, dtype=dtype)
    x = jnp.ones((3, 28, 28, 1))
    variables = model.init(jax.random.key(0), x)
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    # training updates the BatchNorm statistics
    before = jax.tree.leaves(variables["batch_stats"])
    after = jax.tree.leaves(updates["batch_stats"])
    assert any(float(jnp.abs(a - b).max()) > 0 for a, b in zip(before, after))


@pytest.mark.slow
def test_imagenet_resnet_output_shape():
    model = models.get_model("resnet18_imagenet", num_classes=5)
    x = jnp.ones((2, 64, 64, 3))
    variables = model.init(jax.random.key(0), x)
    assert model.apply(variables, x).shape == (2, 5)


def test_unknown_model_and_dtype():
    with pytest.raises(ValueError, match="config.model.name"):
        models.get_model("vgg16", num_classes=10)
    with pytest.raises(ValueError, match="config.model.dtype"):
        models.get_model("resnet20", num_classes=10, dtype="float16")
