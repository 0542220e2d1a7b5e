"""CIFAR ResNets (He et al. 2016, section 4.2 and Table 6): depth 6n + 2, three stages of 16, 32 and
64 channels, and the parameter-free option-A shortcut as the method's released code implements it
(2x2 average pooling and zero channel padding)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from pivot_jax.models import layers

DEPTHS = (8, 20, 32, 44, 56, 110)  # 8: the smoke configs' tiny model


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a parameter-free shortcut (option A)."""

    channels: int
    strides: int
    conv: Any
    norm: Any

    @nn.compact
    def __call__(self, x):
        y = self.conv(self.channels, (3, 3), (self.strides, self.strides))(x)
        y = nn.relu(self.norm()(y))
        y = self.conv(self.channels, (3, 3))(y)
        y = self.norm()(y)
        shortcut = x
        if self.strides != 1:
            # s x s average pooling as a mean over reshaped blocks: the same numbers as nn.avg_pool,
            # and an op that TFLite's int8 quantiser supports (its reduce_window is not).
            n, h, w, c = shortcut.shape
            s = self.strides
            shortcut = jnp.mean(shortcut.reshape(n, h // s, s, w // s, s, c), axis=(2, 4))
        extra = self.channels - x.shape[-1]
        if extra:
            shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (0, extra)))
        return nn.relu(y + shortcut)


class CifarResNet(nn.Module):
    """ResNet-`depth` for 32x32 (or 28x28) inputs: `depth` = 6n + 2, n blocks per stage; logits in float32."""

    depth: int
    num_classes: int
    dtype: Any = jnp.float32
    conv: str = "xla"  # the convolution implementation: "xla" or "onednn"

    @nn.compact
    def __call__(self, x, train: bool = False):
        if (self.depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {self.depth}")
        blocks_per_stage = (self.depth - 2) // 6
        conv, norm = layers.conv_and_norm(self.dtype, train, self.conv)
        x = x.astype(self.dtype)
        x = nn.relu(norm()(conv(16, (3, 3))(x)))
        for stage, channels in enumerate((16, 32, 64)):
            for block in range(blocks_per_stage):
                strides = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(channels, strides, conv, norm)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
