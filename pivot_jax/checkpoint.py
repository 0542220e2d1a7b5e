"""Orbax checkpoints in `<workdir>/checkpoints`: the train state and the data iterator's position.

The state is saved as a nested dict of arrays, so that it restores into whatever shardings the
caller asks for (a checkpoint written on 8 devices restores on 1 and the other way round), and so
that evaluation and fine-tuning can restore only the parts they need.
"""

from __future__ import annotations

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import serialization

from pivot_jax.errors import CheckpointError

STATE, DATA = "state", "data"
# What evaluation and fine-tuning need of a train state.
MODEL_FIELDS = ("params", "batch_stats", "input_mean")


def checkpoint_dir(workdir) -> epath.Path:
    """Where a run's checkpoints live: `<workdir>/checkpoints/<step>/`."""
    return epath.Path(workdir) / "checkpoints"


def manager(workdir, *, keep: int | None = None, read_only: bool = False) -> ocp.CheckpointManager:
    """Asynchronous saves that keep the last `keep`; only complete checkpoints are ever listed."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=not read_only,
        cleanup_tmp_directories=not read_only,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, data_iterator=None) -> None:
    """Starts an asynchronous save of `state` (and the data position) as step `step`."""
    items = {STATE: ocp.args.StandardSave(serialization.to_state_dict(state))}
    if data_iterator is not None:
        items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    mngr.save(step, args=ocp.args.Composite(**items), force=True)


def _abstract(tree, sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def restore(mngr: ocp.CheckpointManager, step: int, state, sharding, data_iterator=None):
    """The state saved at `step`, laid out with `sharding`; also rewinds `data_iterator`."""
    target = serialization.to_state_dict(state)
    items = {STATE: ocp.args.StandardRestore(_abstract(target, sharding))}
    if data_iterator is not None:
        items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
    return serialization.from_state_dict(state, restored[STATE])


def restore_model(workdir, model_state: dict, sharding, step: int | None = None) -> tuple[dict, int]:
    """Only `MODEL_FIELDS` of the checkpoint at `step` (default: the latest) of `workdir`.

    `model_state` is a dict with those fields (arrays or shape structs) giving the expected shapes.
    """
    mngr = manager(workdir, read_only=True)
    steps = mngr.all_steps()
    if not steps:
        raise CheckpointError(f"no checkpoint in {checkpoint_dir(workdir)}")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise CheckpointError(f"no checkpoint at step {step} in {checkpoint_dir(workdir)}; it has {sorted(steps)}")
    target = {field: model_state[field] for field in MODEL_FIELDS}
    restore_args = ocp.args.PyTreeRestore(
        item=_abstract(target, sharding),
        restore_args=jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), target),
        partial_restore=True,
    )
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(**{STATE: restore_args}))[STATE]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"the checkpoint at step {step} in {checkpoint_dir(workdir)} does not fit the config's "
            f"model (config.model / config.data): {str(error).splitlines()[0][:500]}"
        ) from None
    finally:
        mngr.close()
    return restored, step


def saved_state(workdir, step: int | None = None) -> tuple[int, dict]:
    """The whole saved state as a nested dict, on this process's first device, whatever the device
    count it was written with: for inspecting and comparing runs."""
    mngr = manager(workdir, read_only=True)
    step = mngr.latest_step() if step is None else step
    mngr.close()
    if step is None:
        raise CheckpointError(f"no checkpoint in {checkpoint_dir(workdir)}")
    path = checkpoint_dir(workdir) / str(step) / STATE
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path).item_metadata
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
        return step, checkpointer.restore(path, target)
