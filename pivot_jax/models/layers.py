"""The convolution and BatchNorm every ResNet here is built from."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn


def conv_and_norm(dtype: Any, train: bool, conv: str = "xla"):
    """Bias-free convolutions with He et al.'s initialisation for ReLU networks, and BatchNorm with
    the usual momentum 0.9 and epsilon 1e-5 (batch statistics in training, running ones otherwise).

    `conv` is `xla` or `onednn` (`pivot_jax.models.resolve_conv`); both have the same parameters."""
    implementation = None
    if conv == "onednn":
        from pivot_jax.ops import onednn

        implementation = onednn.conv_general_dilated
    conv = functools.partial(
        nn.Conv, use_bias=False, padding="SAME", dtype=dtype, kernel_init=nn.initializers.he_normal(),
        conv_general_dilated=implementation,
    )
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)
    return conv, norm
