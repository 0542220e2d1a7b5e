"""Robustness evaluation: accuracy on the test split, clean and under each configured perturbation.

`Evaluator` is what training runs periodically and what `python -m pivot_jax.evaluate` runs on a
restored checkpoint. It reads the test split once per evaluation, pads the last batch and masks the
padding (no example dropped or counted twice), and perturbs on the device with the same code as
training. Each example's test-time noise is drawn from (eval seed, example index), so the numbers do
not depend on the batch size or the number of devices or processes.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from pivot_jax import config_lib, input_pipeline, runtime, sharding
from pivot_jax import perturb as perturb_lib

EVAL_SEED = 2018  # fixed: two evaluations of one model give the same numbers


class Evaluator:
    """Accuracy of a model under every evaluation in `config.evals`."""

    def __init__(self, config: ml_collections.ConfigDict, split: input_pipeline.Split, model, mesh,
                 sweeps: bool = False):
        self.config, self.split, self.mesh = config, split, mesh
        self.perturbations = config_lib.eval_perturbations(config, sweeps=sweeps)
        self.names = [p.name for p in self.perturbations]
        base_key = jax.random.key(EVAL_SEED)

        def correct_counts(model_state, batch):
            images = batch["image"].astype(jnp.float32) / 255.0
            keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(batch["index"])
            variables = {"params": model_state["params"], "batch_stats": model_state["batch_stats"]}
            counts = []
            for perturbation in self.perturbations:
                inputs = perturbation.apply(keys, images, batch["box"]) - model_state["input_mean"]
                inputs = jax.lax.with_sharding_constraint(inputs, sharding.batch_sharding(mesh))
                logits = model.apply(variables, inputs, train=False)
                correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
                counts.append(jnp.sum(correct * batch["mask"]))
            return jnp.stack(counts), jnp.sum(batch["mask"])

        self._step = jax.jit(
            correct_counts,
            in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
            out_shardings=sharding.replicated(mesh),
        )

    def __call__(self, model_state: dict) -> tuple[dict[str, float], int]:
        """`model_state` holds `params`, `batch_stats` and `input_mean`; returns accuracies and count."""
        dataset, num_examples = input_pipeline.eval_dataset(
            self.split, self.config.data, self.config.data.eval_batch_size, self.config.data.test_examples
        )
        correct = np.zeros(len(self.names), np.float64)
        counted = 0.0
        for local_batch in dataset:
            batch_correct, batch_count = self._step(model_state, sharding.global_batch(local_batch, self.mesh))
            correct += np.asarray(jax.device_get(batch_correct), np.float64)
            counted += float(batch_count)
        if int(counted) != num_examples:
            raise RuntimeError(f"evaluated {counted} examples, expected {num_examples}")
        return {name: float(c / num_examples) for name, c in zip(self.names, correct)}, num_examples


def markdown_table(accuracy: dict[str, float]) -> str:
    names = list(accuracy)
    return "\n".join([
        "| " + " | ".join(names) + " |",
        "|" + "---|" * len(names),
        "| " + " | ".join(f"{100 * accuracy[n]:.2f}" for n in names) + " |",
    ])


def write_results(eval_dir, step: int, accuracy: dict[str, float], num_examples: int, box_source: str) -> str:
    """Writes `<eval_dir>/results.json` (DESIGN section 3) and `results.md`; returns the table."""
    eval_dir = epath.Path(eval_dir)
    eval_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "step": int(step),
        "accuracy": accuracy,
        "num_examples": {name: int(num_examples) for name in accuracy},
        "mr_boxes": box_source,
    }
    (eval_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_table(accuracy)
    (eval_dir / "results.md").write_text(
        f"Test accuracy (%) at step {step} on {num_examples} examples; MR boxes: {box_source}.\n\n{table}\n"
    )
    return table


def plot_sweeps(curves: dict[str, dict[str, float]], path) -> None:
    """Accuracy against sigma, and against the LR factor (one line per up-sampling method), for
    each run in `curves` ({run label: {eval name: accuracy}}); one PNG with two panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (noise_axis, lr_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (label, accuracy) in enumerate(curves.items()):
        colour = colours[index % len(colours)]
        parsed = [(perturb_lib.EvalPerturbation.parse(name), value) for name, value in accuracy.items()]
        noise = sorted((p.sigma, v) for p, v in parsed if p.kind == "noise")
        clean = accuracy.get("clean")
        if clean is not None and not any(s == 0 for s, _ in noise):
            noise = [(0.0, clean)] + noise
        if noise:
            noise_axis.plot(*zip(*[(s, 100 * v) for s, v in noise]), "o-", color=colour, label=label)
        for method, style in (("nearest", "o-"), ("bicubic", "s--")):
            points = sorted((p.factor, v) for p, v in parsed if p.kind == "lr" and p.method == method)
            if clean is not None and points:
                points = [(1, clean)] + points
            if points:
                lr_axis.plot(*zip(*[(f, 100 * v) for f, v in points]), style, color=colour,
                             label=f"{label}, {method}")
    noise_axis.set(xlabel="Gaussian noise sigma", ylabel="test accuracy (%)", title="Noise", ylim=(0, 100))
    lr_axis.set(xlabel="low-resolution factor", ylabel="test accuracy (%)", title="Low resolution", ylim=(0, 100))
    lr_axis.set_xscale("log", base=2)
    lr_axis.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    lr_axis.minorticks_off()
    for axis in (noise_axis, lr_axis):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> dict:
    """Restores `workdir`'s checkpoint (latest, or `step`) on the devices present and evaluates every
    configured test condition and sweep; writes the report into `<workdir>/eval/` (or, for an
    earlier step, `<workdir>/eval/step_<step>/`) and returns the results."""
    import jax.numpy as jnp

    from pivot_jax import checkpoint, models, train

    mesh = sharding.make_mesh()
    config_lib.validate(config, num_devices=mesh.size)
    latest = checkpoint.manager(workdir, read_only=True).latest_step()
    if latest is None:
        raise checkpoint.CheckpointError(f"no checkpoint in {checkpoint.checkpoint_dir(workdir)}: nothing to evaluate")
    test_split = input_pipeline.open_split(config.data, config.data.test_split, use_box_file=True)
    model = models.get_model(config.model.name, num_classes=config.data.num_classes, dtype=config.model.dtype)
    size, channels = config.data.image_size, config.data.channels
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, channels))))
    template = {"params": variables["params"], "batch_stats": variables["batch_stats"],
                "input_mean": jax.ShapeDtypeStruct(train.input_mean_shape(config), jnp.float32)}
    model_state, step = checkpoint.restore_model(workdir, template, sharding.replicated(mesh), step)

    evaluator = Evaluator(config, test_split, model, mesh, sweeps=True)
    accuracy, num_examples = evaluator(model_state)
    out_dir = epath.Path(workdir) / "eval" / ("" if step == latest else f"step_{step}")
    if jax.process_index() == 0:
        write_results(out_dir, step, accuracy, num_examples, test_split.box_source)
        plot_sweeps({f"step {step}": accuracy}, out_dir / "sweeps.png")
    return {"step": step, "accuracy": accuracy, "num_examples": num_examples, "dir": str(out_dir)}


def main(argv):
    from pivot_jax import checkpoint

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.configure_cpu_defaults()
    runtime.quiet_library_logs()
    try:
        runtime.initialize_from_flags()
        result = evaluate_checkpoint(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.step)
    except (config_lib.ConfigError, input_pipeline.DataError, checkpoint.CheckpointError,
            runtime.DistributedError) as error:
        sys.exit(f"error: {error}")
    if jax.process_index() == 0:
        print((epath.Path(result["dir"]) / "results.md").read_text(), flush=True)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "The run's config file (configs/*.py[:args]).")
    flags.DEFINE_string("workdir", None, "The run's workdir, holding checkpoints/.")
    flags.DEFINE_integer("step", None, "The checkpoint step to evaluate (default: the latest).")
    runtime.define_distributed_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
