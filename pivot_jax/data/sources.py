"""Splits as random-access sources of examples: TFDS data sets or image folders.

Every example is a dict `{"image": uint8 [H, W, C], "label": int32, "box": float32 [4]}`. Small
splits (MNIST, CIFAR) are decoded into memory once; larger ones are decoded on access by grain's
threads, and training reads them still encoded (`{"encoded": bytes, ...}`, `Split.train_source`) so
that its random crop decodes no more than it keeps (`augment.decode_crop`). An image folder is laid
out as `<root>/<split>/<class>/<image>`: its class list is the training split's class folders
(hidden ones ignored), and every other split must have exactly those.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import os
import pathlib
from typing import Any

import grain
import ml_collections
import numpy as np
from PIL import Image

from pivot_jax.data import boxes as boxes_lib
from pivot_jax.data import tfds_prepare
from pivot_jax.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# Splits whose decoded images take at most this many bytes are decoded once into memory.
CACHE_LIMIT_BYTES = 4 << 30


@dataclasses.dataclass
class Split:
    """One split as a random-access source of examples, with what reports need to know of it."""

    source: Any  # grain random-access source (len, __getitem__) of example dicts
    num_examples: int
    num_classes: int
    box_source: str  # where the MR boxes come from, for reports
    class_names: tuple[str, ...] = ()  # label i is class_names[i]
    # What training reads: `source`, or for splits decoded on access the same examples still encoded.
    train_source: Any = None

    def __post_init__(self):
        if self.train_source is None:
            self.train_source = self.source


class ArraySource(grain.sources.RandomAccessDataSource):
    """A split held in memory."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, boxes: np.ndarray):
        self.images, self.labels, self.boxes = images, labels.astype(np.int32), boxes.astype(np.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": self.labels[index], "box": self.boxes[index]}


class LazySource(grain.sources.RandomAccessDataSource):
    """A split read on access (large data sets): `read(i)` -> (image, label), with the image decoded
    (uint8) or, with `name_of` (i -> where example i is, for errors), still encoded (key "encoded")."""

    def __init__(self, length: int, read, boxes: np.ndarray, name_of=None):
        self._length, self._read, self._boxes, self._name_of = length, read, boxes, name_of

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label = self._read(index)
        if self._name_of is None:
            return {"image": image, "label": np.int32(label), "box": self._boxes[index]}
        # The name is for a decoding error's message; the training transform drops it.
        return {"encoded": image, "name": self._name_of(index), "label": np.int32(label),
                "box": self._boxes[index]}


def read_image(data: bytes | str | pathlib.Path, channels: int, name: str | None = None) -> tuple[np.ndarray, str]:
    """(uint8 [H, W, channels], the file's PIL mode) from an encoded image (bytes) or an image file; a
    DataError names the file that cannot be read or decoded. 16-bit grey images are scaled to 8 bits
    (value / 257), as 16-bit colour ones are by PIL itself (PIL's conversion of grey would clip them)."""
    name = name or str(data)
    try:
        with Image.open(data if not isinstance(data, bytes) else io.BytesIO(data)) as image:
            mode = image.mode
            if mode == "I" or mode.startswith("I;16"):
                grey = np.rint(np.clip(np.asarray(image, np.float64), 0, 65535) / 257).astype(np.uint8)
                image = Image.fromarray(grey, "L")
            array = np.asarray(image.convert("L" if channels == 1 else "RGB"), np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read the image {name}: {error}") from None
    return (array[..., None] if channels == 1 else array), mode


def decode_image(data: bytes | str | pathlib.Path, channels: int, name: str | None = None) -> np.ndarray:
    """uint8 [H, W, channels] from an encoded image (bytes) or an image file (`read_image`)."""
    return read_image(data, channels, name)[0]


@functools.cache
def opencv():
    """OpenCV, one thread per call: grain's threads already decode one example each."""
    import cv2

    cv2.setNumThreads(1)
    return cv2


def encoded_size(encoded: bytes, name: str) -> tuple[int, int, str]:
    """(height, width, format) from an encoded image's header, without decoding it."""
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            return image.height, image.width, image.format or ""
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read the image {name}: {error}") from None


def decode_reduced(encoded: bytes, channels: int, reduction: int, name: str) -> np.ndarray:
    """uint8 [H', W', channels]: a JPEG decoded at 1/reduction of its size (libjpeg-turbo's DCT
    scaling, reduction 1, 2, 4 or 8: rounding up, so H' = ceil(H / reduction)) by OpenCV, whose
    full-size colour decoding equals PIL's pixel for pixel; other formats, and grey images (OpenCV and
    PIL compute grey differently), are decoded whole by `decode_image`."""
    if channels != 3:
        return decode_image(encoded, channels, name)
    cv2 = opencv()
    flags = {1: cv2.IMREAD_COLOR_RGB, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
             8: cv2.IMREAD_REDUCED_COLOR_8}[reduction]
    image = cv2.imdecode(np.frombuffer(encoded, np.uint8), flags | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        return decode_image(encoded, channels, name)  # PIL reads more formats, or names the error
    return image if reduction == 1 else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def open_split(data: ml_collections.ConfigDict, split: str, *, use_box_file: bool = False,
               class_names: tuple[str, ...] | None = None) -> Split:
    """Opens `split` of the configured data set.

    `class_names` is the run's class list (saved with it); by default it is the data set's (TFDS) or
    the training split's class folders (image folders).
    """
    if data.name == "folder":
        return _open_folder(data, split, use_box_file, class_names)
    return _open_tfds(data, split, use_box_file)


def _open_tfds(data, split, use_box_file) -> Split:
    import tensorflow_datasets as tfds

    dataset = tfds_prepare.builder(data)
    if split not in dataset.info.splits:
        raise DataError(
            f"config.data: split {split!r} not in {data.name} (it has {sorted(dataset.info.splits)})"
        )
    source = dataset.as_data_source(split=split)
    num_examples = len(source)
    features = dataset.info.features
    label_feature = features["label"]
    class_names = tuple(label_feature.names)
    has_names = "file_name" in features
    image_shape = features["image"].shape
    decoded_bytes = num_examples * int(np.prod([d or 256 for d in image_shape]))
    if decoded_bytes <= CACHE_LIMIT_BYTES:
        # Decode once, in chunks (TFDS decodes a list of records faster than one at a time).
        images, labels, data_boxes, ids = [], [], [], []
        for start in range(0, num_examples, 4096):
            for index, example in enumerate(source.__getitems__(range(start, min(start + 4096, num_examples))), start):
                images.append(example["image"])
                labels.append(example["label"])
                data_boxes.append(boxes_lib.from_tfds_example(example))
                ids.append(example["file_name"].decode() if has_names else str(index))
        boxes, box_source = boxes_lib.resolve(ids, data_boxes, data, use_box_file, split)
        images = _stack(images, [f"{data.name}/{split}[{i}]" for i in range(len(images))], data)
        return Split(ArraySource(images, np.asarray(labels), boxes), num_examples, label_feature.num_classes,
                     box_source, class_names)

    def read(index):
        example = source[index]
        return example["image"], example["label"]

    encoded = dataset.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})

    def read_encoded(index):
        example = encoded[index]
        return example["image"], example["label"]

    # Large data sets (ImageNet) have no boxes in TFDS: only the box file or the default.
    ids = [str(i) for i in range(num_examples)]
    if use_box_file and data.box_file and has_names:
        ids = [encoded[i]["file_name"].decode() for i in range(num_examples)]  # the images stay encoded
    boxes, box_source = boxes_lib.resolve(ids, [None] * num_examples, data, use_box_file, split)
    return Split(LazySource(num_examples, read, boxes), num_examples, label_feature.num_classes, box_source,
                 class_names, train_source=_encoded_for_training(data, num_examples, read_encoded, boxes,
                                                                 lambda i: f"{data.name}/{split}[{i}]"))


def _encoded_for_training(data, length, read_encoded, boxes, name_of):
    """The encoded examples that the ImageNet training crop decodes itself (`augment.decode_crop`), or
    None where training decodes whole images (other augmentations)."""
    return LazySource(length, read_encoded, boxes, name_of) if data.augment == "imagenet" else None


def _stack(images: list[np.ndarray], names: list[str], data) -> np.ndarray:
    """One array of equal-size images, or (ImageNet-style augmentation) an object array of any sizes."""
    if data.augment == "imagenet":
        if len({image.shape for image in images}) == 1:
            return np.stack(images)
        array = np.empty(len(images), object)  # ragged: kept as a list of arrays
        array[:] = images
        return array
    expected = (data.image_size, data.image_size, data.channels)
    for image, name in zip(images, names):
        if image.shape != expected:
            raise DataError(
                f"config.data.image_size / channels: {name} has shape {image.shape}, the config expects "
                f"{expected} (images of other sizes need config.data.augment='imagenet': crop and resize)"
            )
    return np.stack(images)


def folder_classes(root: pathlib.Path) -> tuple[str, ...]:
    """The class folders of one split folder, sorted; hidden ones (`.ipynb_checkpoints`) are ignored."""
    return tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")))


def _open_folder(data, split, use_box_file, class_names) -> Split:
    folder = pathlib.Path(data.folder)
    root = folder / split
    if not root.is_dir():
        raise DataError(f"config.data.folder: {root} is not a directory (expected <folder>/<split>/<class>/*)")
    classes = folder_classes(root)
    if class_names is None:
        train_root = folder / data.train_split
        if not train_root.is_dir():
            raise DataError(f"config.data.folder: {train_root} is not a directory; the class list comes from "
                            "the training split's class folders")
        class_names = folder_classes(train_root)
    class_names = tuple(class_names)
    if not classes:
        raise DataError(f"config.data.folder: {root} has no class folders (expected <folder>/{split}/<class>/*)")
    if classes != class_names:
        missing, extra = sorted(set(class_names) - set(classes)), sorted(set(classes) - set(class_names))
        raise DataError(
            f"config.data.folder: the class folders of {root} differ from the training split's "
            f"{len(class_names)} classes (labels follow their order): "
            + "; ".join(part for part in (f"missing {missing}" if missing else "",
                                          f"not in training {extra}" if extra else "") if part)
        )
    files, labels = [], []
    for label, name in enumerate(class_names):
        found = [p for p in sorted((root / name).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not found:
            raise DataError(f"config.data.folder: the class folder {root / name} has no images "
                            f"({', '.join(IMAGE_SUFFIXES)})")
        files += found
        labels += [label] * len(found)
    ids = [str(path.relative_to(root)) for path in files]
    boxes, box_source = boxes_lib.resolve(ids, [None] * len(files), data, use_box_file, split)
    labels = np.asarray(labels, np.int32)
    # Small images (CIFAR) are decoded once, in threads (PIL releases the GIL).
    if len(files) * data.image_size**2 * data.channels <= CACHE_LIMIT_BYTES and data.augment != "imagenet":
        with concurrent.futures.ThreadPoolExecutor(max(os.cpu_count() or 1, 4)) as pool:
            images = list(pool.map(lambda p: decode_image(p, data.channels), files, chunksize=256))
        images = _stack(images, [str(f) for f in files], data)
        return Split(ArraySource(images, labels, boxes), len(files), len(class_names), box_source, class_names)
    def read_encoded(index):
        try:
            return files[index].read_bytes(), labels[index]
        except OSError as error:
            raise DataError(f"cannot read the image {files[index]}: {error}") from None

    return Split(
        LazySource(len(files), lambda i: (decode_image(files[i], data.channels), labels[i]), boxes),
        len(files), len(class_names), box_source, class_names,
        train_source=_encoded_for_training(data, len(files), read_encoded, boxes, lambda i: str(files[i])),
    )
