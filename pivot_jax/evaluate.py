"""Robustness evaluation: accuracy on the test split, clean and under each configured perturbation.

`Evaluator` is what training runs periodically and what `python -m pivot_jax.evaluate` runs on a
restored checkpoint. It reads the test split once per evaluation, pads the last batch and masks the
padding (no example dropped or counted twice), and perturbs on the device with the same code as
training. Each example's test-time randomness is drawn from (eval seed, test condition, example
index): the numbers do not depend on the batch size or the number of devices or processes, and each
condition (every σ, every corruption at every severity) has its own draws, as the published
corruption sets do.
"""

from __future__ import annotations

import sys
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from etils import epath

from pivot_jax import (checkpoint, conditions, config_lib, corruptions, data, results, runtime, sharding, train_state,
                       workdirs)
from pivot_jax.errors import CheckpointError, ConfigError, UserError

EVAL_SEED = 2018  # fixed: two evaluations of one model give the same numbers


def example_keys(indices: jax.Array, condition: str) -> jax.Array:
    """One key per test example under the test condition named `condition`, from the example's index
    (its draws are the same in any batch) and the condition's name: conditions draw independently of
    each other (sharing draws would give every severity of a corruption the same luck), and a
    condition's draws do not depend on which other conditions are evaluated beside it."""
    condition_key = jax.random.fold_in(jax.random.key(EVAL_SEED), zlib.crc32(condition.encode()) & 0x7FFFFFFF)
    return jax.vmap(lambda i: jax.random.fold_in(condition_key, i))(indices)


class Evaluator:
    """Accuracy of a model under every evaluation in `config.evals`."""

    def __init__(self, config: ml_collections.ConfigDict, split: data.Split, model, mesh,
                 sweeps: bool = False):
        self.config, self.split, self.mesh = config, split, mesh
        self.perturbations = config_lib.eval_perturbations(config, sweeps=sweeps)
        self.names = [p.name for p in self.perturbations]

        def correct_counts(model_state, batch):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # see train_step: per-shard layers
                return _correct_counts(model_state, batch)

        def _correct_counts(model_state, batch):
            images = batch["image"].astype(jnp.float32) / 255.0
            variables = {"params": model_state["params"], "batch_stats": model_state["batch_stats"]}
            counts = []
            for perturbation in self.perturbations:
                keys = example_keys(batch["index"], perturbation.name)
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
        dataset, num_examples = data.eval_dataset(
            self.split, self.config.data, self.config.data.eval_batch_size, self.config.data.test_examples
        )
        correct = np.zeros(len(self.names), np.float64)
        counted = 0.0
        conditions_named = self.names[0] if len(self.names) == 1 else f"{len(self.names)} test conditions"
        with runtime.progress(total=num_examples, desc=f"Evaluating {conditions_named}") as bar:
            for local_batch in dataset:
                batch_correct, batch_count = self._step(model_state, sharding.global_batch(local_batch, self.mesh))
                correct += np.asarray(jax.device_get(batch_correct), np.float64)
                counted += float(batch_count)
                bar.update(int(batch_count))
        if int(counted) != num_examples:
            raise RuntimeError(f"evaluated {counted} examples, expected {num_examples}")
        return {name: float(c / num_examples) for name, c in zip(self.names, correct)}, num_examples


def restore_model(config: ml_collections.ConfigDict, workdir, step: int | None = None, mesh=None):
    """The config's model and the `model_state` (params, batch_stats, input_mean) of `workdir`'s
    checkpoint at `step` (default: the newest intact one), replicated over `mesh` (default: this
    process's first device); returns (model, model_state, step)."""
    mesh = sharding.make_mesh(jax.local_devices()[:1]) if mesh is None else mesh
    model = train_state.get_model(config)
    template = train_state.model_state_template(config, model)
    model_state, step = checkpoint.restore_model(workdir, template, sharding.replicated(mesh), step)
    return model, model_state, step


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, step: int | None = None,
                        baseline: str | None = None) -> dict:
    """Restores `workdir`'s checkpoint (latest, or `step`) on the devices present and evaluates every
    configured test condition and sweep; writes the report into `<workdir>/eval/` (or, for an
    earlier step, `<workdir>/eval/step_<step>/`) and returns the results. `baseline`, another run
    evaluated on the common-corruption suite, adds the mCE and relative mCE against it."""
    mesh = sharding.make_mesh()
    config_lib.validate(config, num_devices=mesh.size)
    baseline_results = None
    if baseline:
        names = [p.name for p in config_lib.eval_perturbations(config, sweeps=True)]
        if not all(name in names for name in conditions.mce_needed_names()):
            raise ConfigError(f"--baseline={baseline}: mCE needs this run evaluated on the common-corruption suite; "
                              "add 'corruptions' to config.sweep_evals (or config.evals)")
        baseline_results = results.read_baseline(baseline)
    latest = checkpoint.manager(workdir, read_only=True).latest_step()
    if latest is None:
        raise CheckpointError(f"no checkpoint in {checkpoint.checkpoint_dir(workdir)}: nothing to evaluate")
    test_split = data.open_split(config.data, config.data.test_split, use_box_file=True,
                                 class_names=workdirs.saved_class_names(workdir))
    model, model_state, step = restore_model(config, workdir, step, mesh)

    evaluator = Evaluator(config, test_split, model, mesh, sweeps=True)
    accuracy, num_examples = evaluator(model_state)
    out_dir = epath.Path(workdir) / "eval" / ("" if step == latest else f"step_{step}")
    if jax.process_index() == 0:
        table = corruptions.table_for(config.perturb.corruption_table, config.data.image_size)
        out_dir, _ = results.write_results(out_dir, step, accuracy, num_examples, test_split.box_source, table,
                                           baseline_results)
        results.plot_sweeps({f"step {step}": [accuracy]}, out_dir / "sweeps.png")
        results.plot_corruptions({f"step {step}": [accuracy]}, out_dir / "corruptions.png")
    return {"step": step, "accuracy": accuracy, "num_examples": num_examples, "dir": str(out_dir)}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.configure_cpu_defaults()
    runtime.quiet_library_logs()
    try:
        runtime.initialize_from_flags()
        result = evaluate_checkpoint(runtime.config_from_flags(), flags.FLAGS.workdir, flags.FLAGS.step,
                                     flags.FLAGS.baseline)
        runtime.finish_peer_watch()
    except UserError as error:
        sys.exit(f"error: {error}")
    except Exception as error:
        runtime.wait_for_lost_peer(error)
        raise
    if jax.process_index() == 0:
        print((epath.Path(result["dir"]) / "results.md").read_text(), flush=True)


if __name__ == "__main__":
    runtime.define_config_flag(sys.argv)
    flags.DEFINE_string("workdir", None, "The run's workdir, holding checkpoints/ and config.json.")
    flags.DEFINE_integer("step", None, "The checkpoint step to evaluate (default: the latest).")
    flags.DEFINE_string("baseline", None, "A run evaluated on the common-corruption suite (its workdir): the "
                        "results add the mCE and relative mCE against it.")
    runtime.define_distributed_flags()
    flags.mark_flags_as_required(["workdir"])
    app.run(main, flags_parser=runtime.parse_flags)
