"""Training with the pivot loss: `python -m pivot_jax.train --config=configs/<dataset>.py[:args] --workdir=DIR`.

`train_and_evaluate(config, workdir)` reads top to bottom in stages: checks, mesh, data, model and
optimizer, shardings, step function, checkpoint restore, evaluator, loop. Each step builds
Algorithm 1's batch on the device (the first k clean images perturbed, then the clean ones), runs one
forward pass over all of it (BatchNorm statistics over the whole global batch) and minimises Eq. 1.
"""

from __future__ import annotations

import json
import signal
import sys
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from clu import metric_writers, periodic_actions
from etils import epath
from ml_collections import config_flags

from pivot_jax import checkpoint, config_lib, evaluate, input_pipeline, losses, models, runtime, sharding
from pivot_jax import perturb as perturb_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    input_mean: jax.Array  # the training split's mean, subtracted from every input (after perturbing)

    def model_state(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats, "input_mean": self.input_mean}


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, an incompatible workdir)."""


# ---------------------------------------------------------------------------------------------
# Pieces the loop is built from.


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """SGD with momentum, coupled L2 weight decay on kernels only, piecewise-constant learning rate."""
    boundaries = {round(b * config.num_train_steps): config.optim.lr_decay for b in config.optim.lr_boundaries}
    schedule = optax.piecewise_constant_schedule(config.optim.learning_rate, boundaries)
    kernels_only = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )
    tx = optax.chain(
        optax.add_decayed_weights(config.optim.weight_decay, mask=kernels_only),
        optax.sgd(schedule, momentum=config.optim.momentum),
    )
    return tx, schedule


def input_mean_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    size, channels = config.data.image_size, config.data.channels
    return (size, size, channels) if config.data.mean == "pixel" else (channels,)


def make_state_init(config: ml_collections.ConfigDict, model, tx):
    """`init_state(input_mean) -> TrainState`: the model's initial variables and optimizer state."""
    size, channels = config.data.image_size, config.data.channels

    def init_state(input_mean: jax.Array) -> TrainState:
        variables = model.init(jax.random.key(config.seed), jnp.zeros((1, size, size, channels)), train=False)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            opt_state=tx.init(variables["params"]),
            input_mean=input_mean,
        )

    return init_state


def make_train_step(config: ml_collections.ConfigDict, model, tx, schedule, mesh):
    """The train step for `config`'s mode: (state, clean batch) -> (state, metrics)."""
    spec = config_lib.perturb_spec(config)
    k, m, paired = spec.k, config.batch_size, config_lib.is_paired(config)
    lam, lam2, symmetric = config.loss.lam, config.loss.lam2, config.loss.symmetric
    perturb_key = jax.random.fold_in(jax.random.key(config.seed), 1)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        images = batch["image"].astype(jnp.float32) / 255.0
        labels = batch["label"]
        if k:
            step_key = jax.random.fold_in(perturb_key, state.step)
            perturbed = perturb_lib.perturb_batch(step_key, images[:k], batch["box"][:k], spec)
            if paired:  # Algorithm 1: perturbed copies first, row k + i is the twin of row i
                images = jnp.concatenate([perturbed, images])
                labels = jnp.concatenate([labels[:k], labels])
            else:  # m distinct images, the first k perturbed
                images = jnp.concatenate([perturbed, images[k:]])
        inputs = jax.lax.with_sharding_constraint(images - state.input_mean, sharding.batch_sharding(mesh))

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, inputs, train=True, mutable=["batch_stats"]
            )
            loss, aux = losses.pivot_loss(logits, labels, k=k, lam=lam, lam2=lam2, stop_gradient=not symmetric)
            return loss, (aux, logits, updates["batch_stats"])

        grads, (aux, logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        metrics = {name: aux[name] for name in ("loss", "l_org", "l_perturb")}
        metrics["grad_norm"] = optax.tree.norm(grads)
        if paired:
            metrics["l_dist"] = aux["l_dist"]
        if k < m:
            metrics["accuracy_clean"] = jnp.mean(correct[k:])
        if k:
            metrics["accuracy_perturbed"] = jnp.mean(correct[:k])
        metrics["learning_rate"] = schedule(state.step)
        return new_state, metrics

    return train_step


def check_workdir(workdir: epath.Path, config: ml_collections.ConfigDict) -> None:
    """Refuses a workdir that cannot be written or whose saved config is a different experiment."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_probe_{jax.process_index()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise TrainingError(f"workdir: cannot write to {workdir}: {error}") from None
    saved_path = workdir / "config.json"
    if not saved_path.exists():
        return
    saved = _flatten(json.loads(saved_path.read_text()))
    current = _flatten(json.loads(config.to_json_best_effort()))
    ignored = lambda key: any(key == f or key.startswith(f + ".") for f in config_lib.RUN_FIELDS)
    changed = sorted(k for k in set(saved) | set(current) if not ignored(k) and saved.get(k) != current.get(k))
    if changed and not config.allow_config_change:
        details = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:10])
        raise TrainingError(
            f"workdir {workdir} holds a run with another config ({details}). Use another --workdir, "
            "or resume it anyway with --config.allow_config_change=True."
        )


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _write_config(workdir: epath.Path, config: ml_collections.ConfigDict, step: int) -> None:
    path = workdir / "config.json"
    if path.exists() and path.read_text() != config.to_json_best_effort(indent=2):
        path.rename(workdir / f"config.before_step_{step}.json")  # keep what the run was
    path.write_text(config.to_json_best_effort(indent=2))


class _Preemption:
    """Notes SIGTERM so that the loop saves a checkpoint and exits between steps."""

    def __init__(self):
        self.requested = False
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook's worker): rely on Orbax alone
            pass

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint and stopping after this step.")
        self.requested = True


# ---------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes) the run in `workdir`; returns the final test accuracies."""
    # Checks, before any data is read or any computation starts.
    mesh = sharding.make_mesh()
    config_lib.validate(config, num_devices=mesh.size)
    workdir = epath.Path(workdir)
    check_workdir(workdir, config)
    is_main = jax.process_index() == 0
    host_batch = config_lib.host_batch_size(config)

    # Data.
    train_split = input_pipeline.open_split(config.data, config.data.train_split)
    test_split = input_pipeline.open_split(config.data, config.data.test_split, use_box_file=True)
    if train_split.num_classes != config.data.num_classes:
        raise config_lib.ConfigError(
            f"config.data.num_classes: got {config.data.num_classes}, the data set has {train_split.num_classes}"
        )
    train_data = input_pipeline.train_dataset(train_split, config.data, host_batch, config.seed)
    train_iter = iter(train_data)

    # Model and optimizer.
    model = models.get_model(config.model.name, num_classes=config.data.num_classes, dtype=config.model.dtype)
    tx, schedule = make_optimizer(config)
    init_state = make_state_init(config, model, tx)

    # Shardings: the state is replicated, batches are split over all devices.
    state_sharding = sharding.replicated(mesh)
    batch_sharding = sharding.batch_sharding(mesh)

    # Step function: jitted once with explicit shardings; the old state is donated.
    train_step = jax.jit(
        make_train_step(config, model, tx, schedule, mesh),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, state_sharding),
        donate_argnums=0,
    )

    # Checkpoint restore (or a fresh start, possibly from another run's model).
    mngr = checkpoint.manager(workdir, keep=config.keep_checkpoints)
    latest = mngr.latest_step()
    if latest is not None:
        abstract = jax.eval_shape(init_state, jax.ShapeDtypeStruct(input_mean_shape(config), jnp.float32))
        state = checkpoint.restore(mngr, latest, abstract, state_sharding, train_iter)
        logging.info("Resumed from step %d of %s.", latest, workdir)
    else:
        mean = input_pipeline.input_mean(train_split, config.data, config.data.mean_examples)
        state = jax.jit(init_state, out_shardings=state_sharding)(jnp.asarray(mean))
        if config.init_from:
            restored, from_step = checkpoint.restore_model(config.init_from, state.model_state(), state_sharding)
            state = state.replace(**restored)
            logging.info("Initialised the model from step %d of %s.", from_step, config.init_from)
    initial_step = int(state.step)
    if is_main:
        _write_config(workdir, config, initial_step)

    # Evaluator and reporting.
    evaluator = evaluate.Evaluator(config, test_split, model, mesh)
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main, asynchronous=True)
    if initial_step == 0:
        writer.write_hparams({k: v for k, v in _flatten(json.loads(config.to_json_best_effort())).items()
                              if isinstance(v, (int, float, str, bool))})
    report_progress = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps, writer=writer)
    preemption = _Preemption()
    pending_metrics: list[dict] = []
    accuracy: dict[str, float] = {}

    def flush_metrics(step: int) -> None:
        """Averages the metrics since the last flush; stops on a non-finite loss or gradient.

        The gradient is checked too: a diverging run can overflow its gradient while the loss is still
        finite, and would then train on to a constant classifier without ever failing.
        """
        if not pending_metrics:
            return
        host = jax.device_get(pending_metrics)
        pending_metrics.clear()
        summary = {name: float(np.mean([m[name] for m in host])) for name in host[0]}
        bad = [name for name in ("loss", "grad_norm") if not all(np.isfinite(m[name]) for m in host)]
        if bad:
            raise TrainingError(
                f"non-finite {' and '.join(bad)} by step {step} (loss {summary['loss']}, gradient norm "
                f"{summary['grad_norm']}); the last good checkpoint is kept in {checkpoint.checkpoint_dir(workdir)}. "
                "Lower config.optim.learning_rate, try config.loss.symmetric=True, or check the data."
            )
        writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})

    def run_evaluation(step: int) -> tuple[dict[str, float], int]:
        with report_progress.timed("eval"):
            result, num_examples = evaluator(state.model_state())
        writer.write_scalars(step, {f"eval/{name}": value for name, value in result.items()})
        return result, num_examples

    def save_checkpoint(step: int) -> None:
        flush_metrics(step)  # never save a state whose loss or gradient went non-finite
        with report_progress.timed("checkpoint"):
            checkpoint.save(mngr, step, state, train_iter)

    # Loop.
    logging.info("Training %s from step %d to %d on %d devices.", workdir, initial_step,
                 config.num_train_steps, mesh.size)
    step = initial_step
    try:
        while step < config.num_train_steps:
            batch = sharding.global_batch(next(train_iter), mesh)
            state, metrics = train_step(state, batch)
            step += 1
            pending_metrics.append(metrics)
            report_progress(step)
            if step % config.log_every_steps == 0:
                flush_metrics(step)
            if step % config.eval_every_steps == 0 and step < config.num_train_steps:
                accuracy, _ = run_evaluation(step)
            if step % config.checkpoint_every_steps == 0 or step == config.num_train_steps:
                save_checkpoint(step)
            if preemption.requested or mngr.reached_preemption(step):
                if mngr.latest_step() != step:
                    save_checkpoint(step)
                mngr.wait_until_finished()
                logging.warning("Stopped at step %d for preemption; run the same command to resume.", step)
                return accuracy
        flush_metrics(step)
        if mngr.latest_step() != step:
            save_checkpoint(step)
        accuracy, num_examples = run_evaluation(step)
    finally:
        mngr.wait_until_finished()
        mngr.close()
        writer.flush()
    if is_main:
        table = evaluate.write_results(workdir / "eval", step, accuracy, num_examples, test_split.box_source)
        print(f"\nTest accuracy (%) at step {step} ({workdir}):\n{table}\n", flush=True)
    return accuracy


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.configure_cpu_defaults()
    runtime.quiet_library_logs()
    try:
        runtime.initialize_from_flags()
        train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except (config_lib.ConfigError, input_pipeline.DataError, checkpoint.CheckpointError, TrainingError,
            runtime.DistributedError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    # Flags are defined here, not on import, so that the library modules import side by side.
    config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:args]).")
    flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")
    runtime.define_distributed_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
