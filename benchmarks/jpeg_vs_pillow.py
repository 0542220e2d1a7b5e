"""`corruptions.jpeg_compression` on the device against Pillow's JPEG, pixel for pixel.

    python benchmarks/jpeg_vs_pillow.py --cifar-folder DIR [--qualities 80,65,58,50,40]

Encodes and decodes every test image of an image folder (DIR/test/<class>/<file>) with Pillow at each
quality and with the device op, and prints how many of the 8-bit values differ.
"""

from __future__ import annotations

import argparse
import io
import pathlib

import numpy as np

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--cifar-folder", required=True)
parser.add_argument("--qualities", default="80,65,58,50,40", help="CIFAR-10-C's five by default")
args = parser.parse_args()

from pivot_jax import runtime  # noqa: E402

runtime.configure_cpu_defaults()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from PIL import Image  # noqa: E402

from pivot_jax import corruptions  # noqa: E402

files = sorted(pathlib.Path(args.cifar_folder, "test").glob("*/*"))
images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
print(f"{len(images)} images from {args.cifar_folder}/test")
for quality in (int(q) for q in args.qualities.split(",")):
    device = jax.jit(jax.vmap(lambda x, q=quality: corruptions.jpeg_compression(None, x, q)))
    differing = 0
    for start in range(0, len(images), 1000):
        batch = images[start : start + 1000]
        ours = np.round(np.asarray(device(jnp.asarray(batch / 255.0, jnp.float32))) * 255).astype(np.uint8)
        for mine, image in zip(ours, batch):
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, "JPEG", quality=quality)
            differing += int(np.sum(mine != np.asarray(Image.open(buffer))))
    print(f"quality {quality}: {differing} of {images.size} values differ")
