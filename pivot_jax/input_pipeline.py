"""Clean images for the accelerator: TFDS data sets or image folders, via grain.

Every example is a dict `{"image": uint8 [H, W, C], "label": int32, "box": float32 [4]}`, where `box`
is the (ymin, xmin, ymax, xmax) region that mixed resolution keeps sharp: from the data set where it
has boxes, else (test split only) from the user's box file, else the configured centred default box.

Training batches are a pure function of (seed, step): grain shuffles each epoch afresh by index,
draws each example's augmentation from (seed, position), and process p of P reads only the rows
[p * B/P, (p + 1) * B/P) of each global batch, so the global batch at a step is the same whatever the
number of processes or devices. The iterator's state (a position) is saved with every checkpoint.

Perturbations are not applied here: they run on the device, inside the train step.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
import os
import pathlib
import socket
from typing import Any, Sequence

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

from pivot_jax import perturb

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# Splits of at most this many examples are decoded once into memory; larger ones are streamed.
CACHE_LIMIT_BYTES = 4 << 30


class DataError(RuntimeError):
    """The data a config asks for cannot be read; the message says why and how to fix it."""


@dataclasses.dataclass
class Split:
    """One split as a random-access source of examples."""

    source: Any  # grain random-access source (len, __getitem__) of example dicts
    num_examples: int
    num_classes: int
    box_source: str  # where the MR boxes come from, for reports


# ---------------------------------------------------------------------------------------------
# Sources.


class ArraySource(grain.sources.RandomAccessDataSource):
    """A split held in memory."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, boxes: np.ndarray):
        self.images, self.labels, self.boxes = images, labels.astype(np.int32), boxes.astype(np.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": self.labels[index], "box": self.boxes[index]}


class _LazySource(grain.sources.RandomAccessDataSource):
    """A split decoded on access (large data sets): `read(i)` -> (uint8 image, label, box or None)."""

    def __init__(self, length: int, read, boxes: np.ndarray):
        self._length, self._read, self._boxes = length, read, boxes

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label = self._read(index)
        return {"image": image, "label": np.int32(label), "box": self._boxes[index]}


def _decode(data: bytes | str | pathlib.Path, channels: int) -> np.ndarray:
    with Image.open(data if not isinstance(data, bytes) else io.BytesIO(data)) as image:
        image = image.convert("L" if channels == 1 else "RGB")
        array = np.asarray(image, np.uint8)
    return array[..., None] if channels == 1 else array


def network_reachable(host: str = "storage.googleapis.com", port: int = 443, timeout: float = 10.0) -> bool:
    """Whether a TCP connection to TFDS's download host opens within `timeout` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _tfds_builder(data: ml_collections.ConfigDict):
    import tensorflow_datasets as tfds

    data_dir = data.data_dir or os.environ.get("TFDS_DATA_DIR")
    try:
        builder = tfds.builder(data.name, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError as error:
        raise DataError(
            f"config.data.name: {data.name!r} is not a TFDS data set ({str(error).splitlines()[0]}); "
            "use a TFDS name or 'folder' with config.data.folder"
        ) from None
    manual_dir = pathlib.Path(data.manual_dir or pathlib.Path(builder.data_dir_root) / "downloads" / "manual")
    how_offline = (
        f"To prepare it offline, put the data set's original files in {manual_dir} (or point "
        f"--config.data.manual_dir at them) and run again: TFDS then prepares it without the network."
    )
    if builder.is_prepared():
        if builder.info.file_format is not None and builder.info.file_format.value != "array_record":
            raise DataError(
                f"{data.name} is prepared in {builder.data_dir} as {builder.info.file_format.value}; "
                "random access needs array_record. Convert it with `tfds convert_format "
                f"--dataset_version_dir={builder.data_dir} --out_file_format=array_record`, or prepare "
                "it again in another --config.data.data_dir."
            )
        return builder
    has_manual = manual_dir.is_dir() and any(manual_dir.iterdir())
    if not has_manual:
        if not data.download:
            raise DataError(
                f"{data.name} is not prepared in {builder.data_dir} and config.data.download is False. "
                + how_offline
            )
        if not network_reachable():
            raise DataError(
                f"{data.name} is not prepared in {builder.data_dir} and cannot be downloaded: the "
                "network is unreachable. " + how_offline
            )
    try:
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)),
        )
    except Exception as error:  # TFDS raises many kinds; all mean the same to the user
        raise DataError(f"preparing {data.name} in {builder.data_dir} failed: {error}. " + how_offline) from error
    return builder


def _tfds_box(example: dict) -> np.ndarray | None:
    """The example's ground-truth box where the data set has one (the first object's)."""
    if "bbox" in example:
        return np.asarray(example["bbox"], np.float32).reshape(-1, 4)[0]
    objects = example.get("objects")
    if isinstance(objects, dict) and len(objects.get("bbox", ())):
        return np.asarray(objects["bbox"], np.float32)[0]
    return None


def _read_box_file(path: str) -> dict[str, np.ndarray]:
    """CSV rows `example_id, ymin, xmin, ymax, xmax` (a header row is allowed)."""
    boxes = {}
    try:
        with open(path, newline="") as file:
            for line_number, row in enumerate(csv.reader(file), 1):
                if not row or (line_number == 1 and not _is_number(row[-1])):
                    continue
                if len(row) != 5 or not all(_is_number(v) for v in row[1:]):
                    raise DataError(
                        f"config.data.box_file {path}, line {line_number}: expected "
                        f"'example_id,ymin,xmin,ymax,xmax' with numbers, got {','.join(row)!r}"
                    )
                box = np.asarray([float(v) for v in row[1:]], np.float32)
                if not (0 <= box[0] <= box[2] <= 1 and 0 <= box[1] <= box[3] <= 1):
                    raise DataError(
                        f"config.data.box_file {path}, line {line_number}: box {box.tolist()} is not "
                        "(ymin, xmin, ymax, xmax) with 0 <= min <= max <= 1"
                    )
                boxes[row[0].strip()] = box
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"config.data.box_file: cannot read {path!r}: {error}") from None
    return boxes


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _resolve_boxes(ids, data_boxes, data, use_box_file):
    """Per example: the data's box, else the box file's, else the default; and which was used."""
    default = np.asarray(perturb.centered_box(data.default_box_fraction), np.float32)
    boxes = np.tile(default, (len(ids), 1))
    have_data = np.asarray([b is not None for b in data_boxes], bool)
    for i in np.flatnonzero(have_data):
        boxes[i] = data_boxes[i]
    source = f"default centred box ({data.default_box_fraction:g} of each side)"
    if have_data.all() and len(ids):
        return boxes, "data set"
    if use_box_file and data.box_file:
        file_boxes = _read_box_file(data.box_file)
        found = 0
        for i, example_id in enumerate(ids):
            if not have_data[i] and example_id in file_boxes:
                boxes[i] = file_boxes[example_id]
                found += 1
        if not found:
            raise DataError(
                f"config.data.box_file {data.box_file}: none of its ids matches an example id of the "
                f"split (ids look like {ids[0]!r})"
            )
        source = f"box file {data.box_file}" + (
            f" ({len(ids) - found - have_data.sum()} examples without a box use the {source})"
            if found + have_data.sum() < len(ids) else "")
    elif have_data.any():
        source = f"data set ({(~have_data).sum()} examples without a box use the {source})"
    return boxes, source


def open_split(data: ml_collections.ConfigDict, split: str, *, use_box_file: bool = False) -> Split:
    """Opens `split` of the configured data set; small splits are decoded into memory once."""
    if data.name == "folder":
        return _open_folder(data, split, use_box_file)
    builder = _tfds_builder(data)
    if split not in builder.info.splits:
        raise DataError(
            f"config.data: split {split!r} not in {data.name} (it has {sorted(builder.info.splits)})"
        )
    source = builder.as_data_source(split=split)
    num_examples = len(source)
    features = builder.info.features
    num_classes = features["label"].num_classes
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
                data_boxes.append(_tfds_box(example))
                ids.append(example["file_name"].decode() if has_names else str(index))
        boxes, box_source = _resolve_boxes(ids, data_boxes, data, use_box_file)
        images = _stack_images(images, data, f"{data.name}/{split}")
        return Split(ArraySource(images, np.asarray(labels), boxes), num_examples, num_classes, box_source)

    def read(index):
        example = source[index]
        return example["image"], example["label"]

    # Large data sets (ImageNet) have no boxes in TFDS: only the box file or the default.
    ids = [str(i) for i in range(num_examples)]
    if use_box_file and data.box_file and has_names:
        ids = [source[i]["file_name"].decode() for i in range(num_examples)]
    boxes, box_source = _resolve_boxes(ids, [None] * num_examples, data, use_box_file)
    return Split(_LazySource(num_examples, read, boxes), num_examples, num_classes, box_source)


def _stack_images(images: list[np.ndarray], data, where: str) -> np.ndarray:
    shapes = {image.shape for image in images}
    if len(shapes) == 1:
        (shape,) = shapes
        if data.augment != "imagenet" and shape != (data.image_size, data.image_size, data.channels):
            raise DataError(
                f"config.data.image_size / channels: {where} has images of shape {shape}, the config "
                f"expects {(data.image_size, data.image_size, data.channels)}"
            )
        return np.stack(images)
    if data.augment != "imagenet":
        raise DataError(f"{where}: images of several shapes {sorted(shapes)[:3]}; they need "
                        "config.data.augment='imagenet' (crop and resize)")
    array = np.empty(len(images), object)  # ragged: kept as a list of arrays
    array[:] = images
    return array


def _open_folder(data, split, use_box_file) -> Split:
    root = pathlib.Path(data.folder) / split
    if not root.is_dir():
        raise DataError(f"config.data.folder: {root} is not a directory (expected <folder>/<split>/<class>/*)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"config.data.folder: {root} has no class folders (expected <folder>/{split}/<class>/*)")
    files, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                files.append(path)
                labels.append(label)
    if not files:
        raise DataError(f"config.data.folder: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    ids = [str(path.relative_to(root)) for path in files]
    boxes, box_source = _resolve_boxes(ids, [None] * len(files), data, use_box_file)
    labels = np.asarray(labels, np.int32)
    # Small images (CIFAR) are decoded once, in threads (PIL releases the GIL).
    if len(files) * data.image_size**2 * data.channels <= CACHE_LIMIT_BYTES and data.augment != "imagenet":
        with concurrent.futures.ThreadPoolExecutor(max(os.cpu_count() or 1, 4)) as pool:
            images = list(pool.map(lambda p: _decode(p, data.channels), files, chunksize=256))
        images = _stack_images(images, data, str(root))
        return Split(ArraySource(images, labels, boxes), len(files), len(classes), box_source)
    return Split(
        _LazySource(len(files), lambda i: (_decode(files[i], data.channels), labels[i]), boxes),
        len(files), len(classes), box_source,
    )


# ---------------------------------------------------------------------------------------------
# Augmentation (host, per example, numpy).


def _crop_box(box: np.ndarray, top: int, left: int, height: int, width: int, full_h: int, full_w: int):
    ymin, xmin, ymax, xmax = box
    out = np.array([(ymin * full_h - top) / height, (xmin * full_w - left) / width,
                    (ymax * full_h - top) / height, (xmax * full_w - left) / width], np.float32)
    return np.clip(out, 0.0, 1.0)


def _flip_box(box: np.ndarray) -> np.ndarray:
    return np.array([box[0], 1.0 - box[3], box[2], 1.0 - box[1]], np.float32)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    out = np.asarray(pil.resize((size, size), Image.BILINEAR), np.uint8)
    return out[..., None] if channels == 1 else out


class TrainTransform(grain.transforms.RandomMap):
    """DESIGN section 1's training augmentation, with the box moved along with the pixels."""

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
            area = rng.uniform(0.5, 0.8) * height * width
            aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            crop_h = int(min(height, max(1, round(np.sqrt(area / aspect)))))
            crop_w = int(min(width, max(1, round(np.sqrt(area * aspect)))))
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            image = _resize(image[top : top + crop_h, left : left + crop_w], self.size)
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
        image = _resize(image[top : top + crop, left : left + crop], self.size)
        box = _crop_box(box, top, left, crop, crop, height, width)
        return {"image": image, "label": example["label"], "box": box}


# ---------------------------------------------------------------------------------------------
# Batches.


def _process_shard(global_batch: int) -> tuple[int, int]:
    count = jax.process_count()
    if global_batch % count:
        raise DataError(f"a global batch of {global_batch} does not divide over {count} processes")
    return jax.process_index(), global_batch // count


def train_dataset(split: Split, data: ml_collections.ConfigDict, global_batch: int, seed: int):
    """This process's rows of the global training batches, as an infinite, checkpointable dataset."""
    index, per_process = _process_shard(global_batch)
    dataset = (
        grain.MapDataset.source(split.source)
        .shuffle(seed=seed)
        .repeat(None)
        .random_map(TrainTransform(data), seed=seed)
        .batch(per_process, drop_remainder=True)
    )
    # Batch j of the stream holds stream rows [j * B_p, (j + 1) * B_p); the global batch at step s is
    # batches s * P ... s * P + P - 1, of which this process takes its own.
    dataset = dataset[index :: jax.process_count()]
    options = grain.ReadOptions(num_threads=data.num_threads, prefetch_buffer_size=data.prefetch)
    return dataset.to_iter_dataset(options)


def eval_dataset(split: Split, data: ml_collections.ConfigDict, global_batch: int, limit: int = 0):
    """This process's rows of the test batches in order, padded to full batches.

    Each row has `index` (its position in the split, which seeds its test-time noise) and `mask`
    (0 for padding), so that no example is dropped and none counts twice.
    """
    index, per_process = _process_shard(global_batch)
    num_examples = min(limit, split.num_examples) if limit else split.num_examples
    num_batches = -(-num_examples // global_batch)
    examples = grain.MapDataset.source(split.source).map(EvalTransform(data))
    size = data.image_size

    def row(position: int) -> dict:
        if position < num_examples:
            example = examples[position]
            return {**example, "index": np.int32(position), "mask": np.float32(1)}
        return {
            "image": np.zeros((size, size, data.channels), np.uint8),
            "label": np.int32(0),
            "box": np.zeros(4, np.float32),
            "index": np.int32(position),
            "mask": np.float32(0),
        }

    rows = grain.MapDataset.range(num_batches * global_batch).map(row).batch(per_process)
    rows = rows[index :: jax.process_count()]
    options = grain.ReadOptions(num_threads=data.num_threads, prefetch_buffer_size=data.prefetch)
    return rows.to_iter_dataset(options), num_examples


def input_mean(split: Split, data: ml_collections.ConfigDict, max_examples: int = 0) -> np.ndarray:
    """The training split's mean in [0, 1] units: [H, W, C] per pixel, [C] per channel, or 0."""
    shape = (data.image_size, data.image_size, data.channels) if data.mean == "pixel" else (data.channels,)
    if data.mean == "none":
        return np.zeros(shape, np.float32)
    count = min(max_examples, split.num_examples) if max_examples else split.num_examples
    source = split.source
    if isinstance(source, ArraySource) and source.images.dtype != object:
        images = source.images[:count]
        axes = (0,) if data.mean == "pixel" else (0, 1, 2)
        # Sum in float64 over chunks: exact and memory-light.
        total = sum(images[i : i + 8192].astype(np.float64).sum(axis=axes) for i in range(0, count, 8192))
        per = count if data.mean == "pixel" else count * images.shape[1] * images.shape[2]
        return (total / per / 255.0).astype(np.float32).reshape(shape)
    if data.mean == "pixel":
        raise DataError("config.data.mean 'pixel' needs images of one size; use 'channel'")
    # Streamed, variable-size images: the mean over the examples of each image's channel mean.
    step = max(1, split.num_examples // count)
    means = [source[i]["image"].reshape(-1, data.channels).mean(axis=0) for i in range(0, split.num_examples, step)[:count]]
    return (np.mean(means, axis=0) / 255.0).astype(np.float32)
