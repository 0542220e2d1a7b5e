"""ImageNet's object-box XML files -> the box file `config.data.box_file` reads, for both splits.

  python -m pivot_jax.boxes_from_xml --xml=ILSVRC2012_bbox_train_v2.tar.gz \
      --xml=ILSVRC2012_bbox_val_v3.tgz --out=imagenet_boxes.csv [--data_dir=TFDS_DATA_DIR] [--overwrite]

Each `--xml` is a folder (searched recursively) or a tar archive (.tar, .tar.gz, .tgz) of the ILSVRC
box files, one PASCAL VOC XML file per image: its `<size>` (width, height) and one `<object>` per
object, each with a `<bndbox>` in pixels. Each file becomes the row `<image>.JPEG,ymin,xmin,ymax,xmax`,
normalised by the image size and clipped to [0, 1], where `<image>` is the XML file's own name: TFDS
names the image `file_name` that way, and the `<filename>` inside the XML is wrong in some files.

Several objects: the row is the smallest box that holds all of them, so mixed resolution keeps every
object sharp, as a region-of-interest coder would. No object (or only empty boxes): no row, and the
image gets the default centred box. The command says how many images fall in each case.

With `--data_dir` (where TFDS prepared `imagenet2012`), every XML file must name an image of its
training or validation split: one that does not is an error naming the XML file, before anything is
written. The box file is written whole or not at all; an existing one is kept unless `--overwrite`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import tarfile
import xml.etree.ElementTree as ElementTree
from typing import Iterator

from absl import app, flags
from etils import epath

from pivot_jax.data.boxes import BOX_FILE_HEADER
from pivot_jax.errors import DataError, UserError

_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclasses.dataclass
class Conversion:
    rows: dict[str, tuple[float, float, float, float]]  # image id -> (ymin, xmin, ymax, xmax)
    several_objects: int = 0  # images whose row is the union of several boxes
    no_object: int = 0  # XML files without a usable box: no row


def xml_documents(source: str) -> Iterator[tuple[str, str, bytes]]:
    """(where the XML file is, its file name, its bytes) for each `.xml` in a folder or a tar archive."""
    path = epath.Path(source)
    if path.is_dir():
        xml_paths = (root / name for root, _, names in path.walk() for name in names if name.endswith(".xml"))
        for xml_path in sorted(xml_paths):  # walk, not rglob: gs:// has no recursive glob
            yield str(xml_path), xml_path.name, xml_path.read_bytes()
    elif path.is_file() and path.name.endswith(_ARCHIVE_SUFFIXES):
        try:
            with path.open("rb") as file, tarfile.open(fileobj=file) as archive:
                for member in archive:
                    if member.isfile() and member.name.endswith(".xml"):
                        name = pathlib.PurePosixPath(member.name).name
                        yield f"{path}:{member.name}", name, archive.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as error:
            raise DataError(f"--xml {source}: cannot read the archive ({error})") from None
    else:
        raise DataError(f"--xml {source}: expected a folder or a tar archive ({', '.join(_ARCHIVE_SUFFIXES)}) "
                        "of ILSVRC box XML files")


def box_of(name: str, document: bytes) -> tuple[tuple[float, float, float, float] | None, int]:
    """The union of the document's object boxes, normalised (None without one), and the object count."""
    try:
        root = ElementTree.fromstring(document)
        width, height = (float(root.findtext(f"size/{side}")) for side in ("width", "height"))
        if width <= 0 or height <= 0:
            raise ValueError(f"image size {width:g} x {height:g}")
        boxes = []
        for bndbox in root.iter("bndbox"):
            xmin, ymin, xmax, ymax = (float(bndbox.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            box = [min(max(v, 0.0), 1.0) for v in (ymin / height, xmin / width, ymax / height, xmax / width)]
            if box[0] < box[2] and box[1] < box[3]:
                boxes.append(box)
    except (ElementTree.ParseError, TypeError, ValueError) as error:
        raise DataError(f"{name}: not an ILSVRC box file (PASCAL VOC XML with <size> and <bndbox>): {error}") from None
    if not boxes:
        return None, 0
    union = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
    return union, len(boxes)


def convert(sources: list[str], known_images: set[str] | None = None) -> Conversion:
    """Reads every XML file of `sources`; with `known_images`, each must name one of them."""
    result = Conversion(rows={})
    for source in sources:
        for name, file_name, document in xml_documents(source):
            image = file_name[: -len(".xml")] + ".JPEG"
            if known_images is not None and image not in known_images:
                raise DataError(f"{name}: box file for image {image}, which is not in the data set's training or "
                                "validation split (wrong archive, or another data set?)")
            box, objects = box_of(name, document)
            if box is None:
                result.no_object += 1
                continue
            result.several_objects += objects > 1
            result.rows[image] = box
    return result


def imagenet_file_names(data_dir: str, name: str = "imagenet2012") -> set[str]:
    """The `file_name` of every training and validation image of the prepared TFDS data set."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        raise DataError(f"--data_dir {data_dir}: {name} is not prepared there (prepare it first, or leave out "
                        "--data_dir to skip the check that each XML file names an image of it)")
    names = set()
    for split in ("train", "validation"):
        if split not in builder.info.splits:
            continue
        source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
        for start in range(0, len(source), 4096):
            chunk = source.__getitems__(range(start, min(start + 4096, len(source))))
            names.update(example["file_name"].decode() for example in chunk)
    return names


def write_box_file(rows: dict, out: str) -> None:
    """Writes the CSV next to `out`, then moves it into place: a reader never sees half a file.
    (The command refuses an existing `out` without --overwrite before reading anything.)"""
    target = epath.Path(out)  # a local path or gs://...
    staging = target.parent / f".{target.name}.partial"
    with staging.open("w") as file:
        file.write(",".join(BOX_FILE_HEADER) + "\n")
        for image, box in sorted(rows.items()):
            file.write(image + "," + ",".join(f"{v:.6f}" for v in box) + "\n")
    staging.replace(target)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    try:
        if not FLAGS.overwrite and epath.Path(FLAGS.out).exists():
            raise UserError(f"--out {FLAGS.out} exists; pass --overwrite to replace it")
        known = imagenet_file_names(FLAGS.data_dir) if FLAGS.data_dir else None
        result = convert(FLAGS.xml, known)
        write_box_file(result.rows, FLAGS.out)
    except UserError as error:
        sys.exit(f"error: {error}")
    print(f"{FLAGS.out}: {len(result.rows)} images with a box ({result.several_objects} of them the union of "
          f"several objects); {result.no_object} XML files without an object (those images keep the default box)")


if __name__ == "__main__":
    flags.DEFINE_multi_string("xml", None, "A folder or tar archive of ILSVRC box XML files (repeatable).")
    flags.DEFINE_string("out", None, "The box file to write (CSV: example_id,ymin,xmin,ymax,xmax).")
    flags.DEFINE_string("data_dir", None, "TFDS data dir with imagenet2012 prepared: check every image exists.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
    flags.mark_flags_as_required(["xml", "out"])
    app.run(main)
