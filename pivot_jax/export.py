"""Export a trained run for serving and edge devices: `python -m pivot_jax.export --workdir=DIR --out=PATH`.

PATH (a new directory; `--overwrite` replaces an existing one, and only once the new export is whole):

    saved_model/            TensorFlow SavedModel. Signature `serving_default`: `images`, uint8
                            [batch, H, W, C] in 0..255 -> `logits` and `probabilities`, float32
                            [batch, classes]. The input mean is inside: feed the camera's pixels.
    model_float32.tflite    TFLite, float32, batch 1, the same signature.
    model_int8.tflite       TFLite with int8 weights and activations (post-training quantisation,
                            calibrated on training images); uint8 input and float32 outputs as above.
    export.json             the model, checkpoint step, classes in label order, the input contract,
                            the calibration, the files and their sizes.

The model is serialised from JAX with jax2tf (StableHLO inside the SavedModel), with XLA's
convolution and float32 compute whatever the run trained with; TensorFlow's converter makes the TFLite
models from the SavedModel.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath

from pivot_jax import config_lib, data, evaluate, runtime, workdirs
from pivot_jax.data import augment
from pivot_jax.errors import ConfigError, UserError

SIGNATURE = "serving_default"
FILES = {"saved_model": "saved_model", "float32": "model_float32.tflite", "int8": "model_int8.tflite"}
CALIBRATION_SEED = 0


def serving_function(config: ml_collections.ConfigDict, workdir, step: int | None = None):
    """`serve(images uint8 [n, H, W, C]) -> {"logits", "probabilities"}` with the run's parameters
    and input mean baked in, on XLA's convolution in float32 (what a SavedModel can hold); and the step."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.conv, config.model.dtype = "xla", "float32"
    model, model_state, step = evaluate.restore_model(config, workdir, step)
    model_state = jax.device_get(model_state)
    variables = {"params": model_state["params"], "batch_stats": model_state["batch_stats"]}
    input_mean = model_state["input_mean"]

    def serve(images):
        inputs = images.astype(jnp.float32) / 255.0 - input_mean
        logits = model.apply(variables, inputs, train=False).astype(jnp.float32)
        return {"logits": logits, "probabilities": jax.nn.softmax(logits)}

    return serve, step


def calibration_images(config: ml_collections.ConfigDict, workdir, count: int) -> np.ndarray:
    """`count` training images (a fixed random choice), prepared as evaluation prepares test images."""
    split = data.open_split(config.data, config.data.train_split, class_names=workdirs.saved_class_names(workdir))
    chosen = np.random.default_rng(CALIBRATION_SEED).choice(split.num_examples, min(count, split.num_examples),
                                                             replace=False)
    prepare = augment.EvalTransform(config.data)
    return np.stack([prepare.map(split.source[int(i)])["image"]
                     for i in runtime.progress(sorted(chosen), desc="Calibration images")])


def _tf_module(serve, input_shape):
    import tensorflow as tf
    from jax.experimental import jax2tf

    module = tf.Module()
    size = ", ".join(str(d) for d in input_shape[1:])
    converted = jax2tf.convert(serve, polymorphic_shapes=[f"(b, {size})"] if input_shape[0] is None else None,
                               with_gradient=False)
    module.serve = tf.function(converted, autograph=False,
                               input_signature=[tf.TensorSpec(input_shape, tf.uint8, name="images")])
    return module


def _tflite(serve, image_shape, calibration: np.ndarray | None) -> bytes:
    """A batch-1 TFLite model (static shapes let the converter fold batch norm into the convolutions)."""
    import tensorflow as tf

    module = _tf_module(serve, (1, *image_shape))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([module.serve.get_concrete_function()], module)
    if calibration is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image[None]] for image in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    # The converter prints its settings from C++ ("input_inference_type: FLOAT32", which reads as wrong
    # for an int8 model whose input is uint8 by export.json): kept out of the console, shown on failure
    # and with --verbosity=1.
    with tempfile.TemporaryFile("w+") as captured:
        saved_stderr = os.dup(2)
        sys.stderr.flush()
        os.dup2(captured.fileno(), 2)
        try:
            model, error = converter.convert(), None
        except Exception as exception:  # raised below, after the converter's output
            model, error = None, exception
        finally:
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)
        captured.seek(0)
        output = captured.read()
    logging.debug("TFLite converter output:\n%s", output)
    if error is not None:
        sys.stderr.write(output)
        raise error
    return model


def _size(path: epath.Path) -> int:
    if not path.is_dir():
        return path.stat().length
    return sum((root / name).stat().length for root, _, names in path.walk() for name in names)


def _copy_tree(source: epath.Path, target: epath.Path) -> None:
    for root, _, names in source.walk():
        folder = target / root.relative_to(source)
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            (root / name).copy(folder / name)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def clean_after_killed_exports(out: epath.Path) -> None:
    """What an export killed midway left beside `out` on a local disk (its process is gone): its
    partial copy is removed, and an old export it had moved aside is put back if the new one never
    took its place. (On gs:// a process cannot be asked whether it lives: leftovers stay, hidden.)"""
    if "://" in str(out) or not out.parent.exists():
        return
    for leftover in sorted(out.parent.glob(f".{out.name}.*-*")):
        kind, _, pid = leftover.name.removeprefix(f".{out.name}.").rpartition("-")
        if kind not in ("partial", "replaced") or not pid.isdigit() or _process_alive(int(pid)):
            continue
        if kind == "replaced" and not out.exists():
            leftover.rename(out)
            logging.warning("Put back the export at %s that an interrupted export (process %s) had moved aside.",
                            out, pid)
        else:
            leftover.rmtree()


def check_output(out, overwrite: bool) -> epath.Path:
    """Refuses an existing `--out` unless `overwrite`; before anything is computed."""
    out = epath.Path(out)
    clean_after_killed_exports(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"--out: {out} exists; choose another path or pass --overwrite to replace it")
    if not out.parent.exists():
        raise ConfigError(f"--out: the folder {out.parent} does not exist")
    return out


def export(config: ml_collections.ConfigDict, workdir, out, *, step: int | None = None, overwrite: bool = False,
           calibration_examples: int = 256) -> dict:
    """Writes the SavedModel, the two TFLite models and export.json into `out` (see the module
    docstring); returns export.json's contents. Nothing is left half-written: the export is made in a
    temporary folder beside `out` and moved into place whole."""
    import tensorflow as tf

    out = check_output(out, overwrite)
    if calibration_examples < 1:
        raise ConfigError(f"--calibration_examples: got {calibration_examples}, expected at least 1")
    config_lib.validate(config)
    serve, step = serving_function(config, workdir, step)
    image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    calibration = calibration_images(config, workdir, calibration_examples)

    # Made on local disk (TensorFlow writes the SavedModel), then copied beside `out` with epath, which
    # reaches gs:// and every store the rest of the project writes to, and moved into place whole.
    local = epath.Path(tempfile.mkdtemp(prefix="pivot_jax_export_"))
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    staging.rmtree(missing_ok=True)
    try:
        module = _tf_module(serve, (None, *image_shape))
        tf.saved_model.save(module, str(local / FILES["saved_model"]),
                            signatures={SIGNATURE: module.serve.get_concrete_function()})
        (local / FILES["float32"]).write_bytes(_tflite(serve, image_shape, None))
        (local / FILES["int8"]).write_bytes(_tflite(serve, image_shape, calibration))
        names = workdirs.saved_class_names(workdir)
        manifest = {
            "model": config.model.name, "workdir": str(workdir), "step": step,
            "data": config.data.name, "classes": list(names) if names else None,
            "input": {"name": "images", "dtype": "uint8", "shape": ["batch", *image_shape], "range": [0, 255],
                      "preprocessing": ("none: the model divides by 255 and subtracts the training mean itself"
                                        + ("; resize the shorter side to size/0.875 and crop the centre"
                                           if config.data.augment == "imagenet" else ""))},
            "outputs": {"logits": "float32 [batch, classes]", "probabilities": "float32 [batch, classes], softmax"},
            "signature": SIGNATURE,
            "tflite": {"batch": 1, "int8_calibration": {"split": config.data.train_split,
                                                         "examples": int(len(calibration)),
                                                         "seed": CALIBRATION_SEED}},
            "files": {name: {"path": path, "bytes": _size(local / path)} for name, path in FILES.items()},
            "versions": {"jax": jax.__version__, "tensorflow": tf.__version__},
        }
        (local / "export.json").write_text(json.dumps(manifest, indent=1) + "\n")
        _copy_tree(local, staging)
        replaced = None
        if out.exists():  # --overwrite: the old export goes only once the new one is complete
            replaced = out.parent / f".{out.name}.replaced-{os.getpid()}"
            out.rename(replaced)
        staging.rename(out)
        if replaced is not None:
            replaced.rmtree()
    except BaseException:
        staging.rmtree(missing_ok=True)
        raise
    finally:
        local.rmtree(missing_ok=True)
    return manifest


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.configure_cpu_defaults()
    runtime.quiet_library_logs()
    args = flags.FLAGS
    try:
        check_output(args.out, args.overwrite)
        manifest = export(runtime.config_from_flags(), args.workdir, args.out, step=args.step,
                          overwrite=args.overwrite, calibration_examples=args.calibration_examples)
    except UserError as error:
        sys.exit(f"error: {error}")
    sizes = ", ".join(f"{name} {entry['bytes'] / 1e6:.2f} MB" for name, entry in manifest["files"].items())
    print(f"exported step {manifest['step']} of {args.workdir} to {args.out}: {sizes}", flush=True)


if __name__ == "__main__":
    runtime.define_config_flag(sys.argv)
    flags.DEFINE_string("workdir", None, "The run's workdir, holding checkpoints/, config.json and classes.json.")
    flags.DEFINE_string("out", None, "A new directory for the exported models.")
    flags.DEFINE_integer("step", None, "The checkpoint step to export (default: the latest).")
    flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")
    flags.DEFINE_integer("calibration_examples", 256, "Training images that calibrate the int8 model.")
    flags.mark_flags_as_required(["workdir", "out"])
    app.run(main, flags_parser=runtime.parse_flags)
