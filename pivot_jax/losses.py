"""Cross-entropy and the pivot loss (Eq. 1 of docs/method.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy [m] from un-normalised logits [m, C] and integer labels [m]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def pivot_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    k: int,
    lam: float,
    lam2: float,
    stop_gradient: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Eq. 1: `(L_org + lam * L_perturb) / ((m - k) + lam * k) + lam2 * L_dist`.

    `logits` [m, C] are in the batch layout of Algorithm 1: rows [:k] perturbed, rows [k:] clean, and
    row k + i is the clean twin of row i. L_org and L_perturb are sums of cross-entropy over the clean
    and perturbed rows; L_dist is the plain sum of squared logit differences over the pairs (no 1/2,
    no mean). There are min(k, m - k) pairs: with k = m (the `perturbed` mode) there are none and the
    loss is the mean cross-entropy.

    With `stop_gradient` (the paper) the clean logits are the pivot and get no gradient from L_dist;
    without it (`config.loss.symmetric`) the gradient flows both ways, as in the authors' released code.
    """
    m = logits.shape[0]
    if not 0 <= k <= m:
        raise ValueError(f"pivot_loss: k = {k} rows perturbed out of m = {m}; expected 0 <= k <= m")
    logits = logits.astype(jnp.float32)
    ce = cross_entropy(logits, labels)
    l_perturb = jnp.sum(ce[:k])
    l_org = jnp.sum(ce[k:])
    pairs = min(k, m - k)
    clean = logits[k : k + pairs]
    if stop_gradient:
        clean = jax.lax.stop_gradient(clean)
    l_dist = jnp.sum(jnp.square(logits[:pairs] - clean))
    loss = (l_org + lam * l_perturb) / ((m - k) + lam * k) + lam2 * l_dist
    aux = {
        "loss": loss,
        "l_org": l_org,
        "l_perturb": l_perturb,
        "l_dist": l_dist,
        "ce_clean": l_org / max(m - k, 1),
        "ce_perturbed": l_perturb / max(k, 1),
    }
    return loss, aux
