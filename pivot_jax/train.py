"""Training with the pivot loss: `python -m pivot_jax.train --config=configs/<dataset>.py[:args] --workdir=DIR`.

`train_and_evaluate(config, workdir)` reads top to bottom in stages: checks, mesh, data, model,
optimizer and step (one factory, `pivot_jax.train_step.build`, decides the shardings), checkpoint
restore, evaluator and reporting, loop. `main` only parses flags and calls it, so tests and notebooks
run the same loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from clu import metric_writers, parameter_overview, periodic_actions
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import config_flags

from pivot_jax import (checkpoint, config_lib, corruptions, data, evaluate, results, runtime, sharding, train_step,
                       workdirs)
from pivot_jax.errors import ConfigError, TrainingError, UserError


@dataclasses.dataclass(frozen=True)
class RunResult:
    """How `train_and_evaluate` ended.

    `finished`: the run reached `config.num_train_steps` and `accuracy` holds the final evaluation at
    `step`. Otherwise it stopped at `step` for preemption (a checkpoint is saved there; run the same
    command to resume) and `accuracy` is empty: no evaluation belongs to that step.
    """

    step: int
    finished: bool
    accuracy: dict[str, float]


class _Preemption:
    """Tells the loop when to save and stop because the run is being preempted (SIGTERM).

    One process: a Python SIGTERM handler. Several processes: JAX's preemption sync manager, which
    `jax.distributed.initialize` starts, catches SIGTERM itself, tells every process, and they agree on
    the step at which all of them save (`CheckpointManager.reached_preemption`). A Python handler there
    would replace JAX's, so that processes stop at different steps and hang in a collective.
    """

    def __init__(self, mngr, initial_step: int):
        self.mngr, self.initial_step = mngr, initial_step
        self.requested = False
        if jax.process_count() == 1:
            try:
                signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook's worker): rely on Orbax alone
                pass

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint and stopping after this step.")
        self.requested = True

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step`; every process must ask at every step.

        JAX's sync manager counts calls from 0 and, when the notice comes before its first call (while
        the run starts), sets the sync point to 1: a run resumed at step N would never reach it. So it
        is given the steps of this process's run (1, 2, ...), which all processes count alike because
        they resume from the same checkpoint.
        """
        return self.mngr.reached_preemption(step - self.initial_step) or self.requested


def _has_checkpoints(workdir: epath.Path) -> bool:
    folder = checkpoint.checkpoint_dir(workdir)
    return folder.is_dir() and any(path.name.isdigit() for path in folder.iterdir())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
    """Trains (or resumes) the run in `workdir`; returns how it ended, with the final test accuracies."""
    # Checks, before any data is read or any computation starts; then the workdir is ours alone.
    mesh = sharding.make_mesh()
    config_lib.validate(config, num_devices=mesh.size)
    config = config_lib.with_absolute_paths(config)  # config.json must find the data from any folder
    workdir = epath.Path(workdir)
    workdirs.check(workdir, config)
    if config.init_from_required and not config.init_from and not _has_checkpoints(workdir):
        raise ConfigError(f"config.init_from: not set; {config.init_from_required}")
    is_main = jax.process_index() == 0
    with workdirs.WorkdirLock(workdir) if is_main else contextlib.nullcontext():
        return _train(config, workdir, mesh, is_main)


def _train(config: ml_collections.ConfigDict, workdir: epath.Path, mesh, is_main: bool) -> RunResult:
    host_batch = config_lib.host_batch_size(config)

    # Data: the class list comes from the training split and is saved with the run.
    train_split = data.open_split(config.data, config.data.train_split, use_box_file=True)
    logging.info("Training MR boxes: %s.", train_split.box_source)
    if train_split.num_classes != config.data.num_classes:
        raise ConfigError(
            f"config.data.num_classes: got {config.data.num_classes}, the data set has {train_split.num_classes}"
        )
    saved_classes = workdirs.saved_class_names(workdir)
    if saved_classes is not None and saved_classes != train_split.class_names:
        raise TrainingError(
            f"workdir {workdir} was trained with other classes ({workdir / 'classes.json'}); the training split "
            f"now has {list(train_split.class_names)[:10]}. Use another --workdir or restore the data."
        )
    test_split = data.open_split(config.data, config.data.test_split, use_box_file=True,
                                 class_names=train_split.class_names)
    train_iter = iter(data.train_dataset(train_split, config.data, host_batch, config.seed))

    # Model, optimizer, shardings and the jitted step (state replicated, batches split, state donated).
    step_fns = train_step.build(config, mesh)
    logging.info("Convolutions: %s (config.model.conv=%r).", step_fns.model.conv, config.model.conv)

    # Checkpoint restore (or a fresh start, possibly from another run's model).
    mngr = checkpoint.manager(workdir, keep=config.keep_checkpoints)
    if mngr.latest_step() is not None:
        try:
            state, restored_step = checkpoint.restore(mngr, workdir, step_fns.abstract_state(),
                                                      step_fns.state_sharding, train_iter)
        except BaseException:
            mngr.close()
            raise
        logging.info("Resumed from step %d of %s.", restored_step, workdir)
    else:
        mean = data.input_mean(train_split, config.data, config.data.mean_examples)
        state = step_fns.init_state(jnp.asarray(mean))
        if config.init_from:
            restored, from_step = checkpoint.restore_model(config.init_from, state.model_state(),
                                                           step_fns.state_sharding)
            state = state.replace(**restored)
            logging.info("Initialised the model from step %d of %s.", from_step, config.init_from)
    initial_step = int(state.step)
    if is_main:
        workdirs.write_config(workdir, config, initial_step)
        workdirs.save_class_names(workdir, train_split.class_names)
        workdirs.save_data_location(workdir, config.data)
        results.write_atomically(workdir / "parameters.txt",
                                 parameter_overview.get_parameter_overview(state.params) + "\n")
        logging.info("%s: %s parameters (each one's shape and statistics: %s).", config.model.name,
                     f"{sum(x.size for x in jax.tree.leaves(state.params)):,}", workdir / "parameters.txt")

    # Evaluator and reporting.
    evaluator = evaluate.Evaluator(config, test_split, step_fns.model, mesh)
    writer = metric_writers.create_default_writer(config.tensorboard_dir or workdir, just_logging=not is_main,
                                                  asynchronous=True)
    if initial_step == 0:
        writer.write_hparams(config.to_dict())  # CLU flattens nested fields and sequences
    report_progress = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps, writer=writer)
    periodic = [report_progress]
    if config.profile_steps and is_main:
        periodic.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=config.profile_steps,
                                                 profile_duration_ms=None, first_profile=initial_step + 10,
                                                 every_secs=None))
    preemption = _Preemption(mngr, initial_step)
    pending_metrics: list[dict] = []

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
            good = mngr.latest_step()
            kept = (f"the last good checkpoint (step {good}) is kept in {checkpoint.checkpoint_dir(workdir)}"
                    if good is not None else "no checkpoint had been saved yet")
            raise TrainingError(
                f"non-finite {' and '.join(bad)} by step {step} (loss {summary['loss']}, gradient norm "
                f"{summary['grad_norm']}); {kept}. "
                "Lower config.optim.learning_rate, try config.loss.symmetric=True, or check the data."
            )
        writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})

    def run_evaluation(step: int) -> tuple[dict[str, float], int]:
        with report_progress.timed("eval"):
            accuracy, num_examples = evaluator(state.model_state())
        writer.write_scalars(step, {f"eval/{name}": value for name, value in accuracy.items()})
        return accuracy, num_examples

    last_save = time.monotonic()

    def save_checkpoint(step: int) -> None:
        nonlocal last_save
        flush_metrics(step)  # never save a state whose loss or gradient went non-finite
        with report_progress.timed("checkpoint"):
            checkpoint.save(mngr, workdir, step, state, train_iter)
        last_save = time.monotonic()
        runtime.Progress.checkpoint = step

    def checkpoint_due(step: int) -> bool:
        """By steps, or by `checkpoint_every_minutes` (checked at the logging steps). Every process must
        save the same step, so process 0's clock decides for all."""
        if step % config.checkpoint_every_steps == 0 or step == config.num_train_steps:
            return True
        if not config.checkpoint_every_minutes or step % config.log_every_steps:
            return False
        due = time.monotonic() - last_save >= 60 * config.checkpoint_every_minutes
        if jax.process_count() > 1:
            due = bool(multihost_utils.broadcast_one_to_all(np.asarray(due)))
        return due

    # Loop.
    logging.info("Training %s from step %d to %d on %d devices.", workdir, initial_step,
                 config.num_train_steps, mesh.size)
    step = initial_step
    runtime.Progress.step, runtime.Progress.checkpoint = step, (step or None)
    try:
        while step < config.num_train_steps:
            batch = sharding.global_batch(next(train_iter), mesh)
            state, metrics = step_fns.step(state, batch)
            step += 1
            runtime.Progress.step = step
            pending_metrics.append(metrics)
            for action in periodic:
                action(step)
            if step % config.log_every_steps == 0:
                flush_metrics(step)
            if step % config.eval_every_steps == 0 and step < config.num_train_steps:
                run_evaluation(step)
            if checkpoint_due(step):
                save_checkpoint(step)
            if step < config.num_train_steps and preemption.reached(step):
                if mngr.latest_step() != step:
                    save_checkpoint(step)
                checkpoint.wait_until_finished(mngr, workdir)
                logging.warning("Stopped at step %d for preemption; run the same command to resume.", step)
                return RunResult(step=step, finished=False, accuracy={})
        flush_metrics(step)
        if mngr.latest_step() != step:
            save_checkpoint(step)
        accuracy, num_examples = run_evaluation(step)
        checkpoint.wait_until_finished(mngr, workdir)
    finally:
        # On the way out of an error: the error in flight is the one to report, not a second one.
        for close in (mngr.close, writer.close):
            try:
                close()
            except Exception as error:  # noqa: BLE001
                logging.debug("while stopping: %s", error)
    if is_main:
        _, table = results.write_results(workdir / "eval", step, accuracy, num_examples, test_split.box_source,
                                         corruptions.table_for(config.perturb.corruption_table, config.data.image_size))
        print(f"\nTest accuracy (%) at step {step} ({workdir}):\n{table}\n", flush=True)
    return RunResult(step=step, finished=True, accuracy=accuracy)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.configure_cpu_defaults()
    runtime.quiet_library_logs()
    try:
        runtime.initialize_from_flags()
        train_and_evaluate(runtime.config_from_flags(), flags.FLAGS.workdir)
        runtime.finish_peer_watch()
    except UserError as error:
        sys.exit(f"error: {error}")
    except Exception as error:
        runtime.wait_for_lost_peer(error)
        raise


if __name__ == "__main__":
    # Flags are defined here, not on import, so that the library modules import side by side.
    config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:args]).")
    flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")
    runtime.define_distributed_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=runtime.parse_flags)
