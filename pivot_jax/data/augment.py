"""Augmentation on the host, per example, in NumPy: the boxes move along with the pixels.

`cifar`: zero-pad to size + 8, random crop back to size, flip. `imagenet`: random crop of area (0.5, 0.8)
and aspect ratio (3/4, 4/3), resize to the configured size, flip; at test time, resize the centre
crop (0.875 of the shorter side). `none`: unchanged (MNIST).

ImageNet training reads its images still encoded: it draws the crop from the header's size, decodes a
JPEG at the smallest DCT scale that keeps the crop at least size x size, and resizes with OpenCV
(docs/performance.md: 2x the images per host core of decoding whole with PIL and resizing with PIL).
"""

from __future__ import annotations

import grain
import ml_collections
import numpy as np
from PIL import Image

from pivot_jax.data import sources


def _crop_box(box: np.ndarray, top: int, left: int, height: int, width: int, full_h: int, full_w: int):
    ymin, xmin, ymax, xmax = box
    out = np.array([(ymin * full_h - top) / height, (xmin * full_w - left) / width,
                    (ymax * full_h - top) / height, (xmax * full_w - left) / width], np.float32)
    return np.clip(out, 0.0, 1.0)


def _flip_box(box: np.ndarray) -> np.ndarray:
    return np.array([box[0], 1.0 - box[3], box[2], 1.0 - box[1]], np.float32)


def padded_crop(image: np.ndarray, top: int, left: int) -> np.ndarray:
    """The image-sized window at (top, left) of the image zero-padded on every side: pixel (i, j) is
    image[i + top, j + left], or 0 outside the image. What `np.pad` then slicing gives, at a third of
    the cost (the CIFAR input pipeline shares the training's cores)."""
    height, width = image.shape[:2]
    out = np.zeros_like(image)
    out[max(0, -top) : height - max(0, top), max(0, -left) : width - max(0, left)] = \
        image[max(0, top) : height + min(0, top), max(0, left) : width + min(0, left)]
    return out


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, C] -> [size, size, C], bilinear."""
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    out = np.asarray(pil.resize((size, size), Image.BILINEAR), np.uint8)
    return out[..., None] if channels == 1 else out


def crop_and_resize(image: np.ndarray, window: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Training's crop window (top, left, height, width) of a uint8 [H, W, C] image, resized to
    [size, size, C] by OpenCV: bilinear when shrinking by less than 2 (what a DCT-scaled decode
    leaves; TensorFlow's ImageNet pipelines resize crops the same way), area-averaging beyond it,
    where bilinear would skip pixels. (Test time resizes with PIL's antialiased bilinear, `resize`.)"""
    cv2 = sources.opencv()
    top, left, height, width = window
    crop = image[top : top + height, left : left + width]
    method = cv2.INTER_AREA if min(height, width) > 2 * size else cv2.INTER_LINEAR
    out = cv2.resize(crop, (size, size), interpolation=method)
    return out[..., None] if out.ndim == 2 else out


def decode_crop(encoded: bytes, window: tuple[int, int, int, int], full: tuple[int, int], jpeg: bool,
                size: int, channels: int, name: str) -> np.ndarray:
    """`crop_and_resize` of an encoded image of size `full` (height, width), decoding a JPEG at the
    smallest DCT scale (1/2, 1/4, 1/8) that keeps the window at least size x size."""
    top, left, height, width = window
    reduction = 1
    while jpeg and reduction < 8 and min(height, width) >= 2 * reduction * size:
        reduction *= 2
    image = sources.decode_reduced(encoded, channels, reduction, name)
    if reduction == 1:
        return crop_and_resize(image, window, size)
    # The window in the reduced image's pixels is fractional: sample it exactly (bilinear, shrinking
    # by less than 2 here), as cropping to whole reduced pixels would shift it by up to 1/reduction.
    cv2 = sources.opencv()
    scale_y, scale_x = image.shape[0] / full[0], image.shape[1] / full[1]
    step_y, step_x = height * scale_y / size, width * scale_x / size
    to_source = np.array([[step_x, 0, left * scale_x + 0.5 * step_x - 0.5],
                          [0, step_y, top * scale_y + 0.5 * step_y - 0.5]])
    out = cv2.warpAffine(image, to_source, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_REPLICATE)
    return out[..., None] if out.ndim == 2 else out


def random_area_crop(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """ImageNet training's crop window (top, left, crop_h, crop_w): area (0.5, 0.8) of the image,
    aspect ratio in [3/4, 4/3] (log-uniform)."""
    area = rng.uniform(0.5, 0.8) * height * width
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    crop_h = int(min(height, max(1, round(np.sqrt(area / aspect)))))
    crop_w = int(min(width, max(1, round(np.sqrt(area * aspect)))))
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    return top, left, crop_h, crop_w


class TrainTransform(grain.transforms.RandomMap):
    """The training augmentation of docs/method.md, with the box moved along with the pixels."""

    def __init__(self, data: ml_collections.ConfigDict):
        self.augment, self.size, self.channels = data.augment, data.image_size, data.channels

    def random_map(self, example: dict, rng: np.random.Generator) -> dict:
        image, box, encoded = example.get("image"), example["box"], example.get("encoded")
        if encoded is not None and self.augment != "imagenet":
            raise ValueError(f"encoded training examples need augment='imagenet', not {self.augment!r}")
        if self.augment == "cifar":  # zero-pad to size + 8, random size x size crop, flip
            height, width = image.shape[:2]
            top, left = rng.integers(0, 9, size=2)
            image = padded_crop(image, int(top) - 4, int(left) - 4)
            box = _crop_box(box, top - 4, left - 4, height, width, height, width)
        elif self.augment == "imagenet":  # random crop of area (0.5, 0.8), resize, flip
            if encoded is not None:  # read on access (ImageNet): decode only what the crop keeps
                height, width, image_format = sources.encoded_size(encoded, example["name"])
            else:
                height, width = image.shape[:2]
            window = random_area_crop(height, width, rng)
            if encoded is not None:
                image = decode_crop(encoded, window, (height, width), image_format == "JPEG", self.size,
                                    self.channels, example["name"])
            else:
                image = crop_and_resize(image, window, self.size)
            box = _crop_box(box, *window, height, width)
        if self.augment != "none" and rng.random() < 0.5:
            image, box = image[:, ::-1], _flip_box(box)
        return {"image": np.ascontiguousarray(image), "label": example["label"], "box": box}


class EvalTransform(grain.transforms.Map):
    """Test-time preprocessing: ImageNet resizes the shorter side to size / 0.875 and crops the centre."""

    def __init__(self, data: ml_collections.ConfigDict):
        self.augment, self.size = data.augment, data.image_size

    def map(self, example: dict) -> dict:
        if self.augment != "imagenet":
            return example
        image, box = example["image"], example["box"]
        height, width = image.shape[:2]
        crop = int(round(min(height, width) * 0.875))
        top, left = (height - crop) // 2, (width - crop) // 2
        image = resize(image[top : top + crop, left : left + crop], self.size)
        box = _crop_box(box, top, left, crop, crop, height, width)
        return {"image": image, "label": example["label"], "box": box}
