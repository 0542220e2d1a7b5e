"""Image classifiers by name: `get_model(name, num_classes=..., dtype=..., conv=...)`.

`conv` picks the convolution implementation; parameters and checkpoints are the same whichever runs:
- `xla`: `lax.conv_general_dilated`, on every backend;
- `onednn`: oneDNN's convolutions through the XLA FFI (CPU only; `pivot_jax.ops.onednn`);
- `auto`: `onednn` on the CPU backend where it builds, else `xla` (GPU, TPU, no compiler or oneDNN).
"""

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
CONVS = ("auto", "xla", "onednn")


def resolve_conv(conv: str) -> str:
    """`xla` or `onednn`: what `conv` (one of `CONVS`) means on this machine."""
    if conv not in CONVS:
        raise ValueError(f"config.model.conv: got {conv!r}, expected one of {CONVS}")
    if conv == "xla":
        return conv
    import jax

    from pivot_jax.ops import onednn

    usable = jax.default_backend() == "cpu" and onednn.available()
    if conv == "onednn" and not usable:
        raise ValueError("config.model.conv: 'onednn' needs the CPU backend and the oneDNN extension "
                         "(see the log line above); use 'auto' or 'xla'")
    return "onednn" if usable else "xla"


def get_model(name: str, *, num_classes: int, dtype: str = "float32", conv: str = "xla") -> nn.Module:
    """The model `name` (see `MODELS`) computing in `dtype` with the `conv` implementation; parameters
    stay float32."""
    if name not in _REGISTRY:
        raise ValueError(f"config.model.name: got {name!r}, expected one of {MODELS}")
    if dtype not in DTYPES:
        raise ValueError(f"config.model.dtype: got {dtype!r}, expected one of {tuple(DTYPES)}")
    return _REGISTRY[name](num_classes=num_classes, dtype=DTYPES[dtype], conv=resolve_conv(conv))
