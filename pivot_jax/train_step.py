"""The jitted train step, built once from a config and a mesh.

`build(config, mesh)` is the one place where the step's shardings and donation are decided: training,
`pivot_jax.compile_check` and `benchmarks/run.py` all run what it returns, so the benchmark measures
exactly the step that trains. Each step builds the batch layout of docs/method.md on the device (the
first k clean images perturbed, then the clean ones), runs one forward pass over all of it (BatchNorm
statistics over the whole global batch) and minimises Eq. 1.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding

from pivot_jax import config_lib, losses, sharding, train_state
from pivot_jax import perturb as perturb_lib
from pivot_jax.train_state import TrainState


def _step_function(config: ml_collections.ConfigDict, model, tx, schedule, mesh: Mesh):
    """The train step for `config`'s mode: (state, clean batch) -> (state, metrics)."""
    spec = config_lib.perturb_spec(config)
    k, m, paired = spec.k, config.batch_size, config_lib.is_paired(config)
    lam, lam2, symmetric = config.loss.lam, config.loss.lam2, config.loss.symmetric
    perturb_key = jax.random.fold_in(jax.random.key(config.seed), 1)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        # Traced under the mesh, so that layers XLA cannot split itself (the oneDNN convolutions) run
        # once per batch shard.
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return _train_step(state, batch)

    def _train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        images = batch["image"].astype(jnp.float32) / 255.0
        labels = batch["label"]
        if k:
            step_key = jax.random.fold_in(perturb_key, state.step)
            perturbed = perturb_lib.perturb_batch(step_key, images[:k], batch["box"][:k], spec)
            if paired:  # perturbed copies first, row k + i is the twin of row i
                images = jnp.concatenate([perturbed, images])
                labels = jnp.concatenate([labels[:k], labels])
            else:  # m distinct images, the first k perturbed
                images = jnp.concatenate([perturbed, images[k:]])
        inputs = jax.lax.with_sharding_constraint(images - state.input_mean, sharding.batch_sharding(mesh))

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, inputs, train=True, mutable=["batch_stats"]
            )
            loss, aux = losses.pivot_loss(logits, labels, k=k, lam=lam, lam2=lam2, stop_gradient=not symmetric)
            return loss, (aux, logits, updates["batch_stats"])

        grads, (aux, logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        metrics = {name: aux[name] for name in ("loss", "l_org", "l_perturb")}
        metrics["grad_norm"] = optax.tree.norm(grads)
        if paired:
            metrics["l_dist"] = aux["l_dist"]
        if k < m:
            metrics["accuracy_clean"] = jnp.mean(correct[k:])
        if k:
            metrics["accuracy_perturbed"] = jnp.mean(correct[:k])
        metrics["learning_rate"] = schedule(state.step)
        return new_state, metrics

    return train_step


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """A config's train step on a mesh, with its state's initialiser and their shardings.

    The state is replicated and batches are split over every device; `step` donates the old state.
    """

    config: ml_collections.ConfigDict
    model: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_sharding: NamedSharding
    batch_sharding: NamedSharding
    init_state: Callable[[jax.Array], TrainState]  # jitted: input mean -> the initial, sharded state
    step: Callable[[TrainState, dict], tuple[TrainState, dict]]  # jitted: (state, batch) -> (state, metrics)

    def abstract_state(self) -> TrainState:
        """The state's shapes, dtypes and shardings, for restoring and compiling without computing."""
        mean = jax.ShapeDtypeStruct(train_state.input_mean_shape(self.config), jnp.float32)
        shapes = jax.eval_shape(self.init_state, mean)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.state_sharding), shapes)

    def abstract_batch(self) -> dict:
        """The global batch of clean images the input pipeline feeds per step."""
        rows = config_lib.host_batch_size(self.config)
        size, channels = self.config.data.image_size, self.config.data.channels
        split = self.batch_sharding
        return {
            "image": jax.ShapeDtypeStruct((rows, size, size, channels), jnp.uint8, sharding=split),
            "label": jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=split),
            "box": jax.ShapeDtypeStruct((rows, 4), jnp.float32, sharding=split),
        }


def build(config: ml_collections.ConfigDict, mesh: Mesh) -> TrainStep:
    """The jitted train step of `config` on `mesh`: what training, the compile check and the benchmark run."""
    model = train_state.get_model(config)
    tx, schedule = train_state.make_optimizer(config)
    state_sharding, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    init_state = jax.jit(train_state.make_state_init(config, model, tx), out_shardings=state_sharding)
    step = jax.jit(
        _step_function(config, model, tx, schedule, mesh),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, state_sharding),
        donate_argnums=0,
    )
    return TrainStep(config, model, tx, schedule, state_sharding, batch_sharding, init_state, step)


def flops_per_step(config: ml_collections.ConfigDict, mesh: Mesh) -> float:
    """FLOPs of one train step on all devices, from XLA's cost analysis.

    XLA counts a custom call (the oneDNN convolutions) as zero FLOPs, so the count comes from the same
    step built with XLA's convolutions: the arithmetic is the same.
    """
    xla_config = copy.deepcopy(config)
    xla_config.model.conv = "xla"
    step_fns = build(xla_config, mesh)
    return compiled_flops(step_fns.step.lower(step_fns.abstract_state(), step_fns.abstract_batch()).compile(), mesh)


def compiled_flops(compiled, mesh: Mesh) -> float:
    """FLOPs of a step compiled with XLA's convolutions, on all devices of `mesh`."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) * mesh.size  # the cost analysis counts one device's share
