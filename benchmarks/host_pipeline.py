"""ImageNet training input on one host core: decode, random-area crop, flip, resize to 224.

    pip install -e '.[bench]'   # simplejpeg, for its variant (skipped without it)
    python benchmarks/host_pipeline.py [--images 200] [--repeats 5] [--out docs/results/imagenet/host_pipeline.json]

Each variant turns the same synthetic JPEGs (sizes drawn like ImageNet's training photos: mostly 500
pixels on the long side at 4:3, 3:2 or square, some from 200 to 800; smooth content with texture,
quality 90) into 224 x 224 uint8 training inputs, with the crop window and flip of the training
augmentation (`pivot_jax.data.augment.TrainTransform`: area (0.5, 0.8) of the image, aspect in
[3/4, 4/3]), drawn from the same per-example seeds, in one thread:

- `pil`: the path before, training from whole decoded images: PIL decodes the whole image (as TFDS
  did before OpenCV was a dependency), then crop, PIL's bilinear resize, flip.
- `pil_draft`: PIL decodes at the smallest DCT scale (1/2, 1/4, 1/8) that keeps the crop at least 224
  pixels, then crops and resizes the same way.
- `tf_decode_and_crop`: tf.image.decode_and_crop_jpeg (decodes only the crop window's rows and
  columns of blocks), tf.image.resize bilinear, flip; TensorFlow limited to one thread.
- `simplejpeg_scaled`: simplejpeg (libjpeg-turbo) decodes at the smallest DCT scale keeping the crop
  at least 224, then PIL crops and resizes as above.
- `pivot_jax`: what training does now (`TrainTransform` on the encoded bytes): the crop drawn from
  the header's size, OpenCV decodes (at a reduced DCT scale when the crop allows) and resizes the crop
  (bilinear below a 2x shrink), flip.

All are deterministic functions of (image, seed): resuming at a step gives the same batch. Reported:
images per second per core (median of the repeats) and the ratio to the path before (`pil`).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
import platform
import statistics
import time

os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

SIZE = 224


def imagenet_like_jpegs(count: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    jpegs = []
    for _ in range(count):
        if rng.random() < 0.7:
            long_side = 500
        else:
            long_side = int(rng.integers(200, 801))
        aspect = rng.choice([4 / 3, 3 / 2, 1.0, 4 / 3])
        short_side = round(long_side / aspect)
        height, width = (long_side, short_side) if rng.random() < 0.25 else (short_side, long_side)
        # Smooth colour fields (low frequencies, upsampled) plus fine texture: file sizes like photos'.
        coarse = rng.uniform(0, 255, (max(2, height // 32), max(2, width // 32), 3)).astype(np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
        image += rng.normal(0, 12, image.shape)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs


def crop_window(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int, bool]:
    """TrainTransform's draws, in its order: (top, left, crop_h, crop_w, flip)."""
    from pivot_jax.data import augment

    return (*augment.random_area_crop(height, width, rng), bool(rng.random() < 0.5))


def jpeg_size(data: bytes) -> tuple[int, int]:
    width, height = Image.open(io.BytesIO(data)).size
    return height, width


def scaled_crop(image: np.ndarray, full: tuple[int, int], window, flip: bool) -> np.ndarray:
    """Crops `window` (full-size coordinates) from an image decoded at a reduced scale, resizes to 224."""
    scale_h, scale_w = image.shape[0] / full[0], image.shape[1] / full[1]
    top, left, crop_h, crop_w = window
    y0, x0 = int(top * scale_h), int(left * scale_w)
    y1, x1 = max(y0 + 1, int(round((top + crop_h) * scale_h))), max(x0 + 1, int(round((left + crop_w) * scale_w)))
    out = np.asarray(Image.fromarray(np.ascontiguousarray(image[y0:y1, x0:x1])).resize((SIZE, SIZE), Image.BILINEAR))
    return out[:, ::-1] if flip else out


def variant_pil(data, rng):
    from pivot_jax.data import augment

    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    height, width = image.shape[:2]
    top, left, crop_h, crop_w, flip = crop_window(height, width, rng)
    out = augment.resize(image[top: top + crop_h, left: left + crop_w], SIZE)
    return out[:, ::-1] if flip else out


def variant_pil_draft(data, rng):
    pil = Image.open(io.BytesIO(data))
    height, width = pil.size[1], pil.size[0]
    top, left, crop_h, crop_w, flip = crop_window(height, width, rng)
    # The decoder scales by 1/1, 1/2, 1/4 or 1/8, keeping the image at least this size.
    pil.draft("RGB", (math.ceil(width * SIZE / crop_w), math.ceil(height * SIZE / crop_h)))
    return scaled_crop(np.asarray(pil.convert("RGB")), (height, width), (top, left, crop_h, crop_w), flip)


def variant_tf(data, rng):
    import tensorflow as tf

    height, width = jpeg_size(data)
    top, left, crop_h, crop_w, flip = crop_window(height, width, rng)
    image = tf.image.decode_and_crop_jpeg(data, [top, left, crop_h, crop_w], channels=3)
    image = tf.cast(tf.round(tf.image.resize(image, (SIZE, SIZE), "bilinear")), tf.uint8).numpy()
    return image[:, ::-1] if flip else image


def variant_simplejpeg(data, rng):
    import simplejpeg

    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    top, left, crop_h, crop_w, flip = crop_window(height, width, rng)
    image = simplejpeg.decode_jpeg(data, "RGB", min_height=math.ceil(height * SIZE / crop_h),
                                   min_width=math.ceil(width * SIZE / crop_w))
    return scaled_crop(image, (height, width), (top, left, crop_h, crop_w), flip)


@functools.cache
def train_transform():
    import ml_collections

    from pivot_jax.data import augment

    return augment.TrainTransform(ml_collections.ConfigDict({"augment": "imagenet", "image_size": SIZE, "channels": 3}))


def variant_adopted(data, rng):
    return train_transform().random_map({"encoded": data, "name": "", "label": 0, "box": np.zeros(4, np.float32)},
                                        rng)["image"]


VARIANTS = {"pil": variant_pil, "pil_draft": variant_pil_draft,
            "tf_decode_and_crop": variant_tf, "simplejpeg_scaled": variant_simplejpeg,
            "pivot_jax": variant_adopted}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    jpegs = imagenet_like_jpegs(args.images)
    sizes = [jpeg_size(j) for j in jpegs]
    available = {}
    for name, fn in VARIANTS.items():
        try:
            out = fn(jpegs[0], np.random.default_rng(0))
            assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8, out.shape
            again = fn(jpegs[0], np.random.default_rng(0))
            assert np.array_equal(out, again), f"{name} is not deterministic"
            available[name] = fn
        except ImportError as error:
            print(f"{name}: skipped ({error})")
    times = {name: [] for name in available}
    for _ in range(args.repeats):
        for name, fn in available.items():  # interleaved: drifts of a noisy machine hit every variant alike
            start = time.perf_counter()
            for index, data in enumerate(jpegs):
                fn(data, np.random.default_rng(index))
            times[name].append(time.perf_counter() - start)
    rates = {name: args.images / statistics.median(t) for name, t in times.items()}
    base = rates["pil"]
    result = {
        "images": args.images, "repeats": args.repeats,
        "mean_jpeg_kb": round(sum(map(len, jpegs)) / len(jpegs) / 1024, 1),
        "mean_pixels": round(statistics.mean(h * w for h, w in sizes)),
        "images_per_second_per_core": {name: round(rate, 1) for name, rate in rates.items()},
        "ratio_to_before": {name: round(rate / base, 2) for name, rate in rates.items()},
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
    }
    print(f"{args.images} JPEGs, mean {result['mean_jpeg_kb']} KB, {result['mean_pixels']:,} pixels; one thread")
    for name, rate in rates.items():
        print(f"  {name:20s} {rate:7.1f} images/s per core   x{rate / base:.2f}")
    if args.out:
        with open(args.out, "w") as file:
            json.dump(result, file, indent=1)


if __name__ == "__main__":
    main()
