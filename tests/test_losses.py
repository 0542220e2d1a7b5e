"""Eq. 1 against a direct NumPy computation, and where its gradients go."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pivot_jax import losses


def numpy_eq1(logits, labels, k, lam, lam2):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    ce = -log_probs[np.arange(len(labels)), labels]
    m = len(labels)
    l_perturb, l_org = ce[:k].sum(), ce[k:].sum()
    pairs = min(k, m - k)
    l_dist = ((logits[:pairs] - logits[k : k + pairs]) ** 2).sum()
    return (l_org + lam * l_perturb) / ((m - k) + lam * k) + lam2 * l_dist, l_org, l_perturb, l_dist


@pytest.mark.parametrize(
    "m,k,lam,lam2",
    [(8, 4, 0.3, 1e-4), (16, 4, 0.3, 1e-4), (10, 5, 1.0, 0.5), (7, 3, 0.0, 1e-2),
     (8, 0, 0.3, 0.0),  # clean mode
     (8, 8, 0.3, 0.0),  # perturbed mode: every row perturbed, no pairs
     (12, 6, 0.3, 0.0)],  # mixed mode
)
def test_pivot_loss_matches_numpy(m, k, lam, lam2):
    rng = np.random.default_rng(m * 100 + k)
    logits = rng.normal(size=(m, 10)).astype(np.float32) * 3
    labels = rng.integers(0, 10, size=m)
    loss, aux = losses.pivot_loss(jnp.asarray(logits), jnp.asarray(labels), k=k, lam=lam, lam2=lam2)
    expected, l_org, l_perturb, l_dist = numpy_eq1(logits, labels, k, lam, lam2)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(aux["loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(aux["l_org"], l_org, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["l_perturb"], l_perturb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["l_dist"], l_dist, rtol=1e-5, atol=1e-6)


def test_perturbed_mode_is_mean_cross_entropy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=6)
    loss, _ = losses.pivot_loss(jnp.asarray(logits), jnp.asarray(labels), k=6, lam=0.3, lam2=1e-4)
    np.testing.assert_allclose(loss, losses.cross_entropy(logits, labels).mean(), rtol=1e-6)


def _dist_grad(logits, symmetric):
    labels = jnp.zeros(logits.shape[0], jnp.int32)

    def dist(x):
        return losses.pivot_loss(x, labels, k=3, lam=0.3, lam2=1.0, stop_gradient=not symmetric)[1]["l_dist"]

    return jax.grad(dist)(logits)


def test_no_gradient_reaches_clean_logits():
    logits = jax.random.normal(jax.random.key(0), (6, 4))
    grad = _dist_grad(logits, symmetric=False)
    assert np.all(np.asarray(grad[3:]) == 0.0)
    np.testing.assert_allclose(grad[:3], 2 * (logits[:3] - logits[3:]), rtol=1e-6)


def test_symmetric_ablation_lets_gradient_reach_clean_logits():
    logits = jax.random.normal(jax.random.key(0), (6, 4))
    grad = _dist_grad(logits, symmetric=True)
    np.testing.assert_allclose(grad[3:], -2 * (logits[:3] - logits[3:]), rtol=1e-6)
    assert np.abs(np.asarray(grad[3:])).max() > 0


def test_bad_k_is_rejected():
    with pytest.raises(ValueError, match="k = 9"):
        losses.pivot_loss(jnp.zeros((8, 3)), jnp.zeros(8, jnp.int32), k=9, lam=0.3, lam2=0.0)
