"""Classify image files with a trained run: `python -m pivot_jax.predict --workdir=DIR IMAGE_OR_GLOB ...`.

Prints each image's top-k classes by name with their probabilities, as a table, JSON (`--format=json`)
or CSV (`--format=csv`). `--perturb=<test condition>` (`noise_0.15`, `lr4_bicubic`, `mr4_nearest`, ...)
applies that perturbation first, with the same code and the same per-example noise as evaluation
(image i of the command line draws its noise like test example i).

Images are prepared the way evaluation prepares the test split: converted to the run's channel count
(grayscale or RGB) and, when their size differs, resized (ImageNet-style runs: the centre crop of
evaluation; the others: bilinear to the run's size). The output says when either happened. Mixed
resolution keeps the centred box of `config.data.default_box_fraction` sharp: files carry no boxes.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from PIL import Image

from pivot_jax import config_lib, evaluate, perturb, runtime, workdirs
from pivot_jax.data import augment, sources
from pivot_jax.errors import ConfigError, DataError, UserError

FORMATS = ("text", "json", "csv")
BATCH_SIZE = 64  # images per forward pass; the last batch is padded, so one compilation serves all


@dataclasses.dataclass
class PreparedImage:
    path: str
    pixels: np.ndarray  # uint8 [H, W, C] at the run's size and channel count
    notes: list[str]


def expand_paths(patterns: list[str]) -> list[str]:
    """Files named by the arguments, in the order given: globs expanded (`**` included), and a
    directory's image files (by extension, its subdirectories included) in sorted order."""
    if not patterns:
        raise DataError("no images given: pass image files, directories or globs after the flags")
    paths = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if pathlib.Path(p).is_file())
            if not matches:
                raise DataError(f"{pattern!r} matches no file")
            paths.extend(matches)
        elif pathlib.Path(pattern).is_dir():
            extensions = Image.registered_extensions()
            images = sorted(str(p) for p in pathlib.Path(pattern).rglob("*")
                            if p.is_file() and p.suffix.lower() in extensions)
            if not images:
                raise DataError(f"{pattern} is a directory with no image files (by extension) in it")
            paths.extend(images)
        elif pathlib.Path(pattern).is_file():
            paths.append(pattern)
        else:
            raise DataError(f"{pattern}: no such file or directory")
    return paths


def prepare_image(path: str, data: ml_collections.ConfigDict) -> PreparedImage:
    """Reads `path` and brings it to the run's input contract; a DataError names a file that is not a
    readable image."""
    size, channels = data.image_size, data.channels
    pixels, mode = sources.read_image(path, channels)
    height, width = pixels.shape[:2]
    notes = []
    wanted_mode = "L" if channels == 1 else "RGB"
    if mode != wanted_mode:
        notes.append(f"converted from {mode} to {wanted_mode}")
    if data.augment == "imagenet":
        example = {"image": pixels, "label": 0, "box": np.zeros(4, np.float32)}
        pixels = augment.EvalTransform(data).map(example)["image"]
        if (height, width) != (size, size):
            notes.append(f"centre crop of {width}x{height} resized to {size}x{size}")
    elif (height, width) != (size, size):
        pixels = augment.resize(pixels, size)
        notes.append(f"resized from {width}x{height} to {size}x{size} (bilinear)")
    return PreparedImage(path, pixels, notes)


def predict_probabilities(config: ml_collections.ConfigDict, workdir: str, images: np.ndarray,
                          condition: str = "clean", step: int | None = None) -> tuple[np.ndarray, int]:
    """Class probabilities [n, classes] of the run's checkpoint for uint8 `images` [n, H, W, C] under
    the test condition `condition`, and the checkpoint's step."""
    model, model_state, step = evaluate.restore_model(config, workdir, step)
    perturbation = perturb.EvalPerturbation.parse(condition)
    box = jnp.asarray(perturb.centered_box(config.data.default_box_fraction), jnp.float32)

    @jax.jit
    def probabilities(model_state, batch, indices):
        keys = evaluate.example_keys(indices, perturbation.name)
        boxes = jnp.broadcast_to(box, (batch.shape[0], 4))
        inputs = perturbation.apply(keys, batch.astype(jnp.float32) / 255.0, boxes) - model_state["input_mean"]
        variables = {"params": model_state["params"], "batch_stats": model_state["batch_stats"]}
        return jax.nn.softmax(model.apply(variables, inputs, train=False).astype(jnp.float32))

    outputs = []
    for start in range(0, len(images), BATCH_SIZE):
        batch = images[start : start + BATCH_SIZE]
        padded = np.concatenate([batch, np.zeros((BATCH_SIZE - len(batch), *batch.shape[1:]), np.uint8)])
        indices = np.arange(start, start + BATCH_SIZE, dtype=np.int32)
        outputs.append(np.asarray(probabilities(model_state, padded, indices))[: len(batch)])
    return np.concatenate(outputs), step


def class_names(workdir: str, num_classes: int) -> tuple[str, ...]:
    """The run's class names (saved in DIR/classes.json), or `class <i>` for a run without them."""
    names = workdirs.saved_class_names(workdir)
    return names if names is not None else tuple(f"class {i}" for i in range(num_classes))


def rankings(probabilities: np.ndarray, names: tuple[str, ...], top_k: int) -> list[list[dict]]:
    """Per image, its `top_k` classes, most probable first: label, class name and probability."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
    return [[{"label": int(label), "class": names[label], "probability": float(row[label])} for label in labels]
            for row, labels in zip(probabilities, order)]


def render(images: list[PreparedImage], ranked: list[list[dict]], output_format: str, condition: str,
           step: int) -> str:
    if output_format == "json":
        return json.dumps({"step": step, "perturbation": condition, "predictions": [
            {"file": image.path, "notes": image.notes, "top": top} for image, top in zip(images, ranked)]}, indent=1)
    if output_format == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["file", "rank", "label", "class", "probability", "perturbation", "notes"])
        for image, top in zip(images, ranked):
            for rank, entry in enumerate(top, 1):
                writer.writerow([image.path, rank, entry["label"], entry["class"], f"{entry['probability']:.6f}",
                                 condition, "; ".join(image.notes)])
        return buffer.getvalue().rstrip("\n")
    lines = [f"checkpoint step {step}, perturbation: {condition}"]
    for image, top in zip(images, ranked):
        classes = ", ".join(f"{entry['class']} {entry['probability']:.1%}" for entry in top)
        notes = f"  [{'; '.join(image.notes)}]" if image.notes else ""
        lines.append(f"{image.path}: {classes}{notes}")
    return "\n".join(lines)


def check_flags(config: ml_collections.ConfigDict, condition: str, top_k: int) -> None:
    """Bad flags fail here, before any image is read or any model restored."""
    if top_k < 1:
        raise ConfigError(f"--top_k: got {top_k}, expected a positive number of classes")
    try:
        perturb.EvalPerturbation.parse(condition)
    except ValueError as error:
        raise ConfigError(f"--perturb: {str(error).removeprefix('config.evals: ')}") from None
    config_lib.validate(config)


def main(argv):
    runtime.configure_cpu_defaults()
    runtime.quiet_library_logs()
    args = flags.FLAGS
    try:
        config = runtime.config_from_flags()
        check_flags(config, args.perturb, args.top_k)
        paths = expand_paths(argv[1:])
        images, unreadable = [], 0
        for path in paths:  # like other batch tools: every readable file is classified, each other one named
            try:
                images.append(prepare_image(path, config.data))
            except DataError as error:
                print(f"error: {error}", file=sys.stderr, flush=True)
                unreadable += 1
        if not images:
            raise DataError(f"none of the {len(paths)} files given could be read as an image")
        probabilities, step = predict_probabilities(config, args.workdir, np.stack([i.pixels for i in images]),
                                                    args.perturb, args.step)
        names = class_names(args.workdir, probabilities.shape[1])
        ranked = rankings(probabilities, names, min(args.top_k, len(names)))
    except UserError as error:
        sys.exit(f"error: {error}")
    print(render(images, ranked, args.format, args.perturb, step), flush=True)
    if unreadable:
        sys.exit(f"error: {unreadable} of {len(paths)} files could not be read (each is named above); "
                 "the others are classified")


if __name__ == "__main__":
    runtime.define_config_flag(sys.argv)
    flags.DEFINE_string("workdir", None, "The run's workdir, holding checkpoints/, config.json and classes.json.")
    flags.DEFINE_integer("step", None, "The checkpoint step to use (default: the latest).")
    flags.DEFINE_integer("top_k", 5, "Classes to print per image.")
    flags.DEFINE_string("perturb", "clean", "A test condition to apply first: noise_0.15, lr4_bicubic, mr4_nearest, ...")
    flags.DEFINE_enum("format", "text", FORMATS, "Output: a line per image, JSON or CSV.")
    flags.mark_flags_as_required(["workdir"])
    app.run(main, flags_parser=runtime.parse_flags)
