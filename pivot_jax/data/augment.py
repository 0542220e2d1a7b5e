"""Augmentation on the host, per example, in NumPy: the boxes move along with the pixels.

`cifar`: zero-pad to size + 8, random crop back to size, flip. `imagenet`: random crop of area (0.5, 0.8)
and aspect ratio (3/4, 4/3), resize to the configured size, flip; at test time, resize the centre
crop (0.875 of the shorter side). `none`: unchanged (MNIST).
"""

from __future__ import annotations

import grain
import ml_collections
import numpy as np
from PIL import Image


def _crop_box(box: np.ndarray, top: int, left: int, height: int, width: int, full_h: int, full_w: int):
    ymin, xmin, ymax, xmax = box
    out = np.array([(ymin * full_h - top) / height, (xmin * full_w - left) / width,
                    (ymax * full_h - top) / height, (xmax * full_w - left) / width], np.float32)
    return np.clip(out, 0.0, 1.0)


def _flip_box(box: np.ndarray) -> np.ndarray:
    return np.array([box[0], 1.0 - box[3], box[2], 1.0 - box[1]], np.float32)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, C] -> [size, size, C], bilinear."""
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    out = np.asarray(pil.resize((size, size), Image.BILINEAR), np.uint8)
    return out[..., None] if channels == 1 else out


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
        self.augment, self.size = data.augment, data.image_size

    def random_map(self, example: dict, rng: np.random.Generator) -> dict:
        image, box = example["image"], example["box"]
        if self.augment == "cifar":  # zero-pad to size + 8, random size x size crop, flip
            height, width = image.shape[:2]
            padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
            top, left = rng.integers(0, 9, size=2)
            image = padded[top : top + height, left : left + width]
            box = _crop_box(box, top - 4, left - 4, height, width, height, width)
        elif self.augment == "imagenet":  # random crop of area (0.5, 0.8), flip, resize
            height, width = image.shape[:2]
            top, left, crop_h, crop_w = random_area_crop(height, width, rng)
            image = resize(image[top : top + crop_h, left : left + crop_w], self.size)
            box = _crop_box(box, top, left, crop_h, crop_w, height, width)
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
