"""Image classifiers by name: `get_model(name, num_classes=..., dtype=...)`."""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from pivot_jax.models import cifar_resnet, imagenet_resnet

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{depth}": functools.partial(cifar_resnet.CifarResNet, depth=depth)
       for depth in cifar_resnet.DEPTHS},
    **{f"resnet{depth}_imagenet": functools.partial(imagenet_resnet.ResNet, depth=depth)
       for depth in imagenet_resnet.STAGES},
}
MODELS = tuple(_REGISTRY)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def get_model(name: str, *, num_classes: int, dtype: str = "float32") -> nn.Module:
    """The model `name` (see `MODELS`) computing in `dtype`; parameters stay float32."""
    if name not in _REGISTRY:
        raise ValueError(f"config.model.name: got {name!r}, expected one of {MODELS}")
    if dtype not in DTYPES:
        raise ValueError(f"config.model.dtype: got {dtype!r}, expected one of {tuple(DTYPES)}")
    return _REGISTRY[name](num_classes=num_classes, dtype=DTYPES[dtype])
