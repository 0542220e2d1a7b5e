"""Object boxes for mixed resolution: from the data set, from the user's box file, or a default.

A box is (ymin, xmin, ymax, xmax) in [0, 1], as TFDS writes them. The box file is a CSV of rows
`example_id,ymin,xmin,ymax,xmax`, with an optional header row naming those columns (a first row of
other text is an error, not a header).
"""

from __future__ import annotations

import csv
import io

import ml_collections
import numpy as np
from etils import epath

from pivot_jax import perturb
from pivot_jax.errors import DataError

BOX_FILE_HEADER = ("example_id", "ymin", "xmin", "ymax", "xmax")


def from_tfds_example(example: dict) -> np.ndarray | None:
    """The example's ground-truth box where the data set has one (the first object's)."""
    if "bbox" in example:
        return np.asarray(example["bbox"], np.float32).reshape(-1, 4)[0]
    objects = example.get("objects")
    if isinstance(objects, dict) and len(objects.get("bbox", ())):
        return np.asarray(objects["bbox"], np.float32)[0]
    return None


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def read_box_file(path: str) -> dict[str, np.ndarray]:
    """{example_id: box} from the CSV at `path`; a DataError names the line of any bad row."""
    boxes = {}
    try:
        text = epath.Path(path).read_text()  # a local path, gs://, or any store epath reads
        for line_number, row in enumerate(csv.reader(io.StringIO(text, newline="")), 1):
            if not row:
                continue
            if line_number == 1 and tuple(v.strip().lower() for v in row[1:]) == BOX_FILE_HEADER[1:]:
                continue  # the header: any id column name, then the four coordinates by name
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


def resolve(ids, data_boxes, data: ml_collections.ConfigDict, use_box_file: bool,
            split: str = "") -> tuple[np.ndarray, str]:
    """Per example: the data's box, else the box file's, else the default; and which was used.

    A box file row's id is the example's id, or `<split>/<id>` where one file serves several splits
    whose ids repeat (image folders, TFDS split indices); the latter wins. A box file with no row for
    the test split is an error (a wrong file); for the training split it is not (a file of test boxes).
    """
    default = np.asarray(perturb.centered_box(data.default_box_fraction), np.float32)
    boxes = np.tile(default, (len(ids), 1))
    have_data = np.asarray([b is not None for b in data_boxes], bool)
    for i in np.flatnonzero(have_data):
        boxes[i] = data_boxes[i]
    source = f"default centred box ({data.default_box_fraction:g} of each side)"
    if have_data.all() and len(ids):
        return boxes, "data set"
    if use_box_file and data.box_file:
        file_boxes = read_box_file(data.box_file)
        found = 0
        for i, example_id in enumerate(ids):
            if have_data[i]:
                continue
            box = file_boxes.get(f"{split}/{example_id}", file_boxes.get(example_id))
            if box is not None:
                boxes[i] = box
                found += 1
        if not found:
            if split != data.train_split:
                raise DataError(
                    f"config.data.box_file {data.box_file}: none of its ids matches an example id of the "
                    f"{split or 'test'} split (ids look like {ids[0]!r} or {split}/{ids[0]!r})"
                )
            return boxes, f"{source}: the box file {data.box_file} has no row for the {split} split"
        source = f"box file {data.box_file}" + (
            f" ({len(ids) - found - have_data.sum()} examples without a box use the {source})"
            if found + have_data.sum() < len(ids) else "")
    elif have_data.any():
        source = f"data set ({(~have_data).sum()} examples without a box use the {source})"
    return boxes, source
