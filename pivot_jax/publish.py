"""`python -m pivot_jax.publish --workdir=RUN --out=DIR`: a run's final model, small enough to commit.

DIR receives the run's config.json and classes.json, and `checkpoints/<step>/` holding only what
evaluation and prediction restore (parameters, batch statistics and the input mean:
`checkpoint.MODEL_FIELDS`) with its checksums, without the optimizer state or the data position.
`python -m pivot_jax.evaluate --workdir=DIR` and `python -m pivot_jax.predict --workdir=DIR ...` use
DIR as they use the run (a ResNet-20 is about 1.1 MB).
"""

from __future__ import annotations

import sys

from absl import app, flags
from etils import epath

from pivot_jax import checkpoint, evaluate, runtime, workdirs
from pivot_jax.errors import UserError

RUN_FILES = ("config.json", "classes.json")


def publish(workdir, out) -> tuple[int, int]:
    """Writes the model of `workdir`'s newest intact checkpoint into `out`; returns (step, bytes written)."""
    workdir, out = epath.Path(workdir), epath.Path(out)
    if checkpoint.checkpoint_dir(out).exists():
        raise UserError(f"--out: {checkpoint.checkpoint_dir(out)} exists; publish into a folder without checkpoints")
    for name in RUN_FILES:
        if (out / name).exists() and (workdir / name).exists() and \
                (out / name).read_text() != (workdir / name).read_text():
            raise UserError(f"--out: {out / name} differs from the run's {workdir / name}: another run's folder?")
    config = workdirs.saved_config(workdir)
    _, model_state, step = evaluate.restore_model(config, workdir)
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        if (workdir / name).exists():
            (workdir / name).copy(out / name, overwrite=True)
    mngr = checkpoint.manager(out)
    try:
        checkpoint.save(mngr, out, step, dict(model_state))
        checkpoint.wait_until_finished(mngr, out)
    finally:
        mngr.close()
    written = [checkpoint.checkpoint_dir(out), out / checkpoint.CHECKSUMS]
    size = sum((root / name).stat().length for folder in written for root, _, names in folder.walk() for name in names)
    return step, size


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.configure_cpu_defaults()
    runtime.quiet_library_logs()
    try:
        step, size = publish(flags.FLAGS.workdir, flags.FLAGS.out)
    except UserError as error:
        sys.exit(f"error: {error}")
    print(f"published the model of step {step} of {flags.FLAGS.workdir} in {flags.FLAGS.out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "The run's workdir.")
    flags.DEFINE_string("out", None, "The folder to publish the model in (e.g. beside its committed results).")
    flags.mark_flags_as_required(["workdir", "out"])
    app.run(main)
