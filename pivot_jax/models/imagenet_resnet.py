"""ImageNet ResNets (He et al. 2016, Table 1): 18 and 34 with basic blocks, 50 with bottlenecks
(stride on the 3x3 convolution, as torchvision and the Flax ImageNet example do), projection
shortcuts where the shape changes."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from pivot_jax.models import layers

STAGES = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3))}


class ResidualBlock(nn.Module):
    """A basic (two 3x3) or bottleneck (1x1, 3x3, 1x1 x4) block with a projection shortcut where needed."""

    channels: int
    strides: int
    bottleneck: bool
    conv: Any
    norm: Any

    @nn.compact
    def __call__(self, x):
        strides = (self.strides, self.strides)
        if self.bottleneck:
            y = nn.relu(self.norm()(self.conv(self.channels, (1, 1))(x)))
            y = nn.relu(self.norm()(self.conv(self.channels, (3, 3), strides)(y)))
            y = self.conv(self.channels * 4, (1, 1))(y)
        else:
            y = nn.relu(self.norm()(self.conv(self.channels, (3, 3), strides)(x)))
            y = self.conv(self.channels, (3, 3))(y)
        y = self.norm()(y)
        shortcut = x
        if x.shape[-1] != y.shape[-1] or self.strides != 1:
            shortcut = self.norm()(self.conv(y.shape[-1], (1, 1), strides, name="proj_conv")(x))
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """ImageNet ResNet-18/34/50: a 7x7 stem, max pooling, four stages; logits in float32."""

    depth: int
    num_classes: int
    dtype: Any = jnp.float32
    conv: str = "xla"  # the convolution implementation: "xla" or "onednn"

    @nn.compact
    def __call__(self, x, train: bool = False):
        block_kind, stage_sizes = STAGES[self.depth]
        conv, norm = layers.conv_and_norm(self.dtype, train, self.conv)
        x = x.astype(self.dtype)
        x = conv(64, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="stem_conv")(x)
        x = nn.relu(norm(name="stem_bn")(x))
        x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        for stage, num_blocks in enumerate(stage_sizes):
            for block in range(num_blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = ResidualBlock(64 * 2**stage, strides, block_kind == "bottleneck", conv, norm)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
