"""The train state, the optimizer, and the model template that checkpoints restore into.

Training, evaluation, fine-tuning (`config.init_from`), the compile check and the benchmarks all
build their state here, so that a checkpoint written by one restores in the others.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from pivot_jax import models


@flax.struct.dataclass
class TrainState:
    """Everything a training run needs to go on from `step`, and nothing else.

    `input_mean` is the training split's mean in [0, 1] units, subtracted from every input after it is
    perturbed: [H, W, C] per pixel (CIFAR), [C] per channel (ImageNet), or zeros (MNIST).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    input_mean: jax.Array

    def model_state(self) -> dict:
        """What evaluation and fine-tuning need: `params`, `batch_stats`, `input_mean`."""
        return {"params": self.params, "batch_stats": self.batch_stats, "input_mean": self.input_mean}


def get_model(config: ml_collections.ConfigDict):
    """The config's model (`config.model`), with one output per class."""
    return models.get_model(config.model.name, num_classes=config.data.num_classes, dtype=config.model.dtype,
                            conv=config.model.conv)


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """SGD with momentum, coupled L2 weight decay on kernels only, piecewise-constant learning rate
    (after `config.optim.warmup_steps` of linear warm-up from 0, when set)."""
    warmup = config.optim.warmup_steps
    boundaries = {round(b * config.num_train_steps) - warmup: config.optim.lr_decay for b in config.optim.lr_boundaries}
    schedule = optax.piecewise_constant_schedule(config.optim.learning_rate, boundaries)
    if warmup:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, config.optim.learning_rate, warmup), schedule], [warmup])
    kernels_only = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )
    tx = optax.chain(
        optax.add_decayed_weights(config.optim.weight_decay, mask=kernels_only),
        optax.sgd(schedule, momentum=config.optim.momentum),
    )
    return tx, schedule


def input_mean_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """[H, W, C] for a per-pixel mean, [C] otherwise (a zero mean keeps the per-channel shape)."""
    size, channels = config.data.image_size, config.data.channels
    return (size, size, channels) if config.data.mean == "pixel" else (channels,)


def make_state_init(config: ml_collections.ConfigDict, model, tx):
    """`init_state(input_mean) -> TrainState`: the model's initial variables and optimizer state."""
    size, channels = config.data.image_size, config.data.channels

    def init_state(input_mean: jax.Array) -> TrainState:
        variables = model.init(jax.random.key(config.seed), jnp.zeros((1, size, size, channels)), train=False)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            opt_state=tx.init(variables["params"]),
            input_mean=input_mean,
        )

    return init_state


def model_state_template(config: ml_collections.ConfigDict, model) -> dict:
    """The shapes and dtypes of `TrainState.model_state()` for `config`, without computing anything."""
    size, channels = config.data.image_size, config.data.channels
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, channels))))
    return {"params": variables["params"], "batch_stats": variables["batch_stats"],
            "input_mean": jax.ShapeDtypeStruct(input_mean_shape(config), jnp.float32)}
