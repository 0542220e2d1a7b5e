"""Robustness evaluation: accuracy on the test split, clean and under each configured perturbation.

`Evaluator` is what training runs periodically and what `python -m pivot_jax.evaluate` runs on a
restored checkpoint. It reads the test split once per evaluation, pads the last batch and masks the
padding (no example dropped or counted twice), and perturbs on the device with the same code as
training. Each example's test-time noise is drawn from (eval seed, example index), so the numbers do
not depend on the batch size or the number of devices or processes.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from pivot_jax import config_lib, input_pipeline, sharding
from pivot_jax import perturb as perturb_lib

EVAL_SEED = 2018  # fixed: two evaluations of one model give the same numbers


class Evaluator:
    """Accuracy of a model under every evaluation in `config.evals`."""

    def __init__(self, config: ml_collections.ConfigDict, split: input_pipeline.Split, model, mesh):
        self.config, self.split, self.mesh = config, split, mesh
        self.perturbations = config_lib.eval_perturbations(config)
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


def write_results(workdir, step: int, accuracy: dict[str, float], num_examples: int, box_source: str) -> str:
    """Writes `<workdir>/eval/results.json` (DESIGN section 3) and `results.md`; returns the table."""
    eval_dir = epath.Path(workdir) / "eval"
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
