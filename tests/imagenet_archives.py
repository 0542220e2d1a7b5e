"""Small synthetic ILSVRC-2012 archives in exactly the layout TFDS's `imagenet2012` builder reads from its
manual directory, and box XML files in the layout of the ILSVRC box archives.

- `ILSVRC2012_img_train.tar`: one `<synset>.tar` per class, each holding `<synset>_<n>.JPEG`.
- `ILSVRC2012_img_val.tar`: `ILSVRC2012_val_<8 digits>.JPEG`. TFDS labels the i-th file (sorted) with
  the i-th line of its `validation_labels.txt`, so the classes here are the synsets of the first
  validation labels: every validation image belongs to a class that has training images.
- Box XML (PASCAL VOC, as in `ILSVRC2012_bbox_train_v2.tar.gz` / `ILSVRC2012_bbox_val_v3.tgz`).

The JPEGs are real, of varied sizes and aspect ratios; each class has its own colour, so a model can
tell the classes apart after a few steps.
"""

from __future__ import annotations

import io
import pathlib
import tarfile

import numpy as np
from PIL import Image

# The shapes of ImageNet photos (height, width) in miniature, landscape, portrait and square.
SMALL_SIZES = ((60, 80), (96, 64), (72, 72), (50, 90), (112, 84))
# Around ImageNet's typical 375 x 500, for the test at 224.
LARGE_SIZES = ((256, 341), (300, 240), (280, 280))


def validation_synsets(count: int) -> list[str]:
    import tensorflow_datasets as tfds

    path = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt")
    return path.read_text().split()[:count]


def _jpeg(rng: np.random.Generator, label: int, size: tuple[int, int]) -> bytes:
    colour = np.asarray([(label * 67) % 256, (label * 151) % 256, (label * 29 + 90) % 256], np.float32)
    image = colour + rng.normal(0, 25, (*size, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _add(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    archive.addfile(info, io.BytesIO(payload))


def make_manual_dir(manual: pathlib.Path, num_val: int = 8, train_per_class: int = 3, sizes=SMALL_SIZES,
                    val_sizes=LARGE_SIZES, seed: int = 0) -> dict:
    """Writes both archives into `manual`; returns {"synsets", "train": {file: (h, w)}, "val": {...}}."""
    rng = np.random.default_rng(seed)
    manual.mkdir(parents=True, exist_ok=True)
    val_synsets = validation_synsets(num_val)
    synsets = sorted(set(val_synsets))
    made = {"synsets": synsets, "train": {}, "val": {}}
    with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as outer:
        for label, synset in enumerate(synsets):
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for n in range(1, train_per_class + 1):
                    size = sizes[(label + n) % len(sizes)]
                    _add(inner, f"{synset}_{n}.JPEG", _jpeg(rng, label, size))
                    made["train"][f"{synset}_{n}.JPEG"] = size
            _add(outer, f"{synset}.tar", inner_bytes.getvalue())
    with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as archive:
        for index, synset in enumerate(val_synsets, 1):
            size = val_sizes[index % len(val_sizes)]
            name = f"ILSVRC2012_val_{index:08d}.JPEG"
            _add(archive, name, _jpeg(rng, synsets.index(synset), size))
            made["val"][name] = size
    return made


def box_xml(image_stem: str, size: tuple[int, int], boxes: list[tuple[int, int, int, int]],
            synset: str = "n00000000", filename: str | None = None) -> str:
    """An ILSVRC box file: `boxes` as (xmin, ymin, xmax, ymax) pixels of an image of `size` (h, w)."""
    objects = "".join(
        f"<object><name>{synset}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
        f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for x0, y0, x1, y1 in boxes)
    return (f"<annotation><folder>{synset}</folder><filename>{filename or image_stem}</filename>"
            f"<source><database>ILSVRC_2012</database></source><size><width>{size[1]}</width>"
            f"<height>{size[0]}</height><depth>3</depth></size><segmented>0</segmented>{objects}</annotation>")


def write_box_archive(path: pathlib.Path, documents: dict[str, str]) -> None:
    """A .tar.gz of `{member path: XML text}`, like the ILSVRC box archives."""
    with tarfile.open(path, "w:gz") as archive:
        for name, text in documents.items():
            _add(archive, name, text.encode())


if __name__ == "__main__":
    # python tests/imagenet_archives.py DIR: writes the two small archives into DIR (a TFDS manual dir).
    import argparse

    parser = argparse.ArgumentParser(description="Writes small synthetic ILSVRC-2012 archives into DIR, in the "
                                                 "layout TFDS's imagenet2012 reads from its manual directory.")
    parser.add_argument("dir", type=pathlib.Path, help="the manual directory, e.g. DATA_DIR/downloads/manual")
    parser.add_argument("--val", type=int, default=8, help="validation images (their classes get training images)")
    parser.add_argument("--train-per-class", type=int, default=3)
    args = parser.parse_args()
    made = make_manual_dir(args.dir, num_val=args.val, train_per_class=args.train_per_class)
    print(f"{args.dir}: ILSVRC2012_img_train.tar ({len(made['synsets'])} classes, {len(made['train'])} images) and "
          f"ILSVRC2012_img_val.tar ({len(made['val'])} images). The archive check counts the classes: prepare them "
          "with `python -m pivot_jax.prepare --config=configs/imagenet.py:mode=clean,smoke --config.data.data_dir=... "
          f"--config.data.num_classes={len(made['synsets'])}`; training then reads them with TFDS's 1,000 classes.")
