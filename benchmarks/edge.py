"""An exported model on the edge: accuracy of JAX, float32 TFLite and int8 TFLite, sizes and latency.

    python benchmarks/edge.py --workdir DIR --export PATH [--config.data.data_dir=...] [--json FILE]

PATH is what `python -m pivot_jax.export --workdir=DIR --out=PATH` wrote. Every model sees the same
inputs: the whole test split, clean and under each condition (`--conditions`), perturbed on the device
with evaluation's own code and noise, then rounded to uint8 as a camera would deliver them. Latency is
the median of single-image invocations of the TFLite interpreter (after warm-up), with one thread and
with the interpreter's default.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from etils import epath

from pivot_jax import data, evaluate, export, perturb, runtime, workdirs
from pivot_jax.data import augment

CONDITIONS = ("clean", "noise_0.15", "lr4_nearest", "lr4_bicubic")


def test_split(config, workdir) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The test split as evaluation prepares it: uint8 images, boxes and labels."""
    split = data.open_split(config.data, config.data.test_split, use_box_file=True,
                            class_names=workdirs.saved_class_names(workdir))
    count = split.num_examples if not config.data.test_examples else min(config.data.test_examples, split.num_examples)
    prepare = augment.EvalTransform(config.data)
    examples = [prepare.map(split.source[i]) for i in range(count)]
    return (np.stack([e["image"] for e in examples]), np.stack([e["box"] for e in examples]).astype(np.float32),
            np.asarray([e["label"] for e in examples]))


def perturbed(images: np.ndarray, boxes: np.ndarray, condition: str) -> np.ndarray:
    """`images` under `condition` with evaluation's keys and boxes, rounded to uint8."""
    perturbation = perturb.EvalPerturbation.parse(condition)

    @jax.jit
    def apply(batch, batch_boxes, indices):
        out = perturbation.apply(evaluate.example_keys(indices, perturbation.name), batch.astype(jnp.float32) / 255.0, batch_boxes)
        return jnp.round(jnp.clip(out, 0.0, 1.0) * 255.0).astype(jnp.uint8)

    count = len(images)
    return np.concatenate([np.asarray(apply(images[s : s + 1000], boxes[s : s + 1000], np.arange(s, min(s + 1000, count))))
                           for s in range(0, count, 1000)])


class TFLiteModel:
    def __init__(self, path: epath.Path, num_threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
        self.runner = self.interpreter.get_signature_runner(export.SIGNATURE)

    def logits(self, image: np.ndarray) -> np.ndarray:
        return self.runner(images=image[None])["logits"][0]


def accuracy_jax(serve, images, labels) -> float:
    fn = jax.jit(lambda x: serve(x)["logits"])
    predicted = np.concatenate([np.argmax(np.asarray(fn(images[s : s + 500])), -1) for s in range(0, len(images), 500)])
    return float(np.mean(predicted == labels))


def accuracy_tflite(model: TFLiteModel, images, labels) -> float:
    return float(np.mean([np.argmax(model.logits(image)) == label for image, label in zip(images, labels)]))


def latency_ms(model: TFLiteModel, image: np.ndarray, repeats: int = 300) -> float:
    for _ in range(20):
        model.logits(image)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.logits(image)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv):
    del argv
    runtime.configure_cpu_defaults()
    runtime.quiet_library_logs()
    args = flags.FLAGS
    config = runtime.config_from_flags()
    out = epath.Path(args.export)
    manifest = json.loads((out / "export.json").read_text())
    serve, step = export.serving_function(config, args.workdir, manifest["step"])
    models = {name: TFLiteModel(out / export.FILES[name]) for name in ("float32", "int8")}
    result = {"workdir": args.workdir, "step": step, "model": manifest["model"], "data": manifest["data"],
              "accuracy": {}, "bytes": {name: manifest["files"][name]["bytes"] for name in export.FILES}}
    clean, boxes, labels = test_split(config, args.workdir)  # read once, perturbed per condition
    result["num_examples"] = int(len(labels))
    for condition in args.conditions:
        images = perturbed(clean, boxes, condition)
        result["accuracy"][condition] = {"jax": accuracy_jax(serve, images, labels),
                                         **{name: accuracy_tflite(m, images, labels) for name, m in models.items()}}
        print(condition, result["accuracy"][condition], flush=True)
    image = images[0]
    result["latency_ms"] = {
        f"{name}, {threads or 'default'} thread{'s' if threads != 1 else ''}":
            latency_ms(TFLiteModel(out / export.FILES[name], threads), image)
        for name in ("float32", "int8") for threads in (1, None)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        epath.Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    runtime.define_config_flag(sys.argv)
    flags.DEFINE_string("workdir", None, "The trained run.")
    flags.DEFINE_string("export", None, "Its export (python -m pivot_jax.export --out).")
    flags.DEFINE_list("conditions", list(CONDITIONS), "Test conditions.")
    flags.DEFINE_string("json", None, "Also write the results here.")
    flags.mark_flags_as_required(["workdir", "export"])
    app.run(main, flags_parser=runtime.parse_flags)
