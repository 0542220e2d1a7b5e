"""Orbax checkpoints in `<workdir>/checkpoints`: the train state and the data iterator's position.

The state is saved as a nested dict of arrays, so that it restores into whatever shardings the
caller asks for (a checkpoint written on 8 devices restores on 1 and the other way round), and so
that evaluation and fine-tuning can restore only the parts they need.

Damage is detected and survived. The SHA-256 of each file of a checkpoint is written to
`<workdir>/checkpoint_checksums/<step>.json` as part of committing it (before Orbax's rename, or its
commit file on GCS), so every checkpoint that is listed has its checksums, even after a SIGKILL; restoring
checks them first, so flipped bytes or a truncated file are found before Orbax reads anything. A
checkpoint without checksums (written by an older version) is restored unverified, with a warning, and
only if its values are finite. A checkpoint that fails its checksums, or that Orbax cannot read, is
skipped for the newest older one that restores, with a warning that names both; it is never deleted
(training moves it to `<workdir>/damaged_checkpoints/<step>`, then `<step>.1`, ..., so that the step can be
saved again). A full disk is reported as such, on one line.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import serialization

from pivot_jax.errors import CheckpointError, first_line

STATE, DATA = "state", "data"
# What evaluation and fine-tuning need of a train state.
MODEL_FIELDS = ("params", "batch_stats", "input_mean")
CHECKSUMS, DAMAGED = "checkpoint_checksums", "damaged_checkpoints"
# Orbax rewrites this file of a step while committing it (the commit time): it has no checksum.
_COMMIT_METADATA = "_CHECKPOINT_METADATA"


def checkpoint_dir(workdir) -> epath.Path:
    """Where a run's checkpoints live: `<workdir>/checkpoints/<step>/`, as an absolute path (Orbax
    refuses relative ones, so a run given `--workdir=run` would fail at its first save)."""
    path = epath.Path(workdir) / "checkpoints"
    return path if "://" in str(path) else path.resolve()


class _ChecksumsBeforeCommit:
    """Orbax's commit of a step, preceded by writing the step's checksums: a step is listed only once
    it is committed, so no listed step lacks them (a run killed in between leaves an uncommitted step,
    which Orbax removes, and a stale checksum file, which the next save removes)."""

    async def finalize(self):
        await asyncio.to_thread(_record_checksums, self.get(), self.get_final())
        await super().finalize()


class _RenameWithChecksums(_ChecksumsBeforeCommit, ocp.path.atomicity.AtomicRenameTemporaryPath):
    pass


class _CommitFileWithChecksums(_ChecksumsBeforeCommit, ocp.path.atomicity.CommitFileTemporaryPath):
    pass


def manager(workdir, *, keep: int | None = None, read_only: bool = False) -> ocp.CheckpointManager:
    """Asynchronous saves that keep the last `keep`; only complete checkpoints are ever listed."""
    directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=not read_only,
        cleanup_tmp_directories=not read_only,
        # Orbax's own choice for the storage (a commit file on GCS, a rename elsewhere), with checksums.
        temporary_path_class=_CommitFileWithChecksums if str(directory).startswith("gs://") else _RenameWithChecksums,
    )
    return ocp.CheckpointManager(directory, options=options)


def _disk_full(error: BaseException) -> bool:
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _storage_error(error: Exception, workdir, what: str) -> CheckpointError:
    """A one-line CheckpointError for an error while writing checkpoints."""
    where = checkpoint_dir(workdir)
    if _disk_full(error):
        return CheckpointError(f"{what}: the disk holding {where} is full (no space left on device). The "
                               "checkpoints already written are kept; free some space and run the same "
                               "command to resume.")
    return CheckpointError(f"{what} in {where} failed: {first_line(error)}")


def save(mngr: ocp.CheckpointManager, workdir, step: int, state, data_iterator=None) -> None:
    """Starts an asynchronous save of `state` (and the data position) as step `step`, after the
    previous save has finished and its checksums are written."""
    wait_until_finished(mngr, workdir)
    items = {STATE: ocp.args.StandardSave(serialization.to_state_dict(state))}
    if data_iterator is not None:
        items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    try:
        mngr.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as error:  # Orbax and TensorStore raise many kinds; the cause is what matters
        raise _storage_error(error, workdir, f"saving the checkpoint of step {step}") from None


def wait_until_finished(mngr: ocp.CheckpointManager, workdir) -> None:
    """Waits for the pending save, then removes the checksums of checkpoints that are gone."""
    try:
        mngr.wait_until_finished()
    except Exception as error:
        raise _storage_error(error, workdir, "saving a checkpoint") from None
    if jax.process_index() == 0:
        try:
            _remove_stale_checksums(mngr, workdir)
        except OSError as error:
            raise _storage_error(error, workdir, "removing stale checkpoint checksums") from None


def _files(folder: epath.Path) -> list[epath.Path]:
    """Every file below `folder` (epath has no recursive glob: it would be costly on GCS)."""
    found = []
    for child in folder.iterdir():
        found += _files(child) if child.is_dir() else [child]
    return sorted(found)


def _sha256(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _record_checksums(written: epath.Path, final: epath.Path) -> None:
    """Writes the checksums of the step being committed, whose files are in `written` and will be at
    `final` (`<workdir>/checkpoints/<step>`); Orbax calls this on process 0 only."""
    from pivot_jax import results

    if not final.name.isdigit():
        return  # an item of a step (Orbax commits those too), not a step
    workdir = final.parent.parent
    sums = {str(p.relative_to(written)): _sha256(p) for p in _files(written) if p.name != _COMMIT_METADATA}
    folder = workdir / CHECKSUMS
    folder.mkdir(parents=True, exist_ok=True)
    results.write_atomically(folder / f"{final.name}.json", json.dumps(sums, indent=0) + "\n")


def _remove_stale_checksums(mngr: ocp.CheckpointManager, workdir) -> None:
    folder = epath.Path(workdir) / CHECKSUMS
    if not folder.exists():
        return
    steps = set(mngr.all_steps())
    for stale in folder.glob("*.json"):
        if stale.stem.isdigit() and int(stale.stem) not in steps:
            stale.unlink()  # Orbax deleted that checkpoint (keep_checkpoints), or never committed it


def has_checksums(workdir, step: int) -> bool:
    return (epath.Path(workdir) / CHECKSUMS / f"{step}.json").exists()


def verify(workdir, step: int) -> str | None:
    """What is wrong with the checkpoint at `step` by its checksums; None if it matches them (or
    has none: see `has_checksums`)."""
    path = epath.Path(workdir) / CHECKSUMS / f"{step}.json"
    if not path.exists():
        return None
    expected = json.loads(path.read_text())
    step_dir = checkpoint_dir(workdir) / str(step)
    for name, digest in expected.items():
        file = step_dir / name
        if not file.exists():
            return f"{name} is missing"
        if _sha256(file) != digest:
            return f"{name} does not match its checksum"
    return None


def _abstract(tree, sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _restore_state(mngr, step, state, sharding, data_iterator):
    target = serialization.to_state_dict(state)
    items = {STATE: ocp.args.StandardRestore(_abstract(target, sharding))}
    if data_iterator is not None:
        items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
    return serialization.from_state_dict(state, restored[STATE])


def _non_finite(tree, what: str) -> str | None:
    """What is not finite in `tree`'s floating-point arrays (a checkpoint restored unverified)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if jnp.issubdtype(leaf.dtype, jnp.floating) and not bool(jnp.all(jnp.isfinite(leaf))):
            return f"{what}{jax.tree_util.keystr(path)} has non-finite values"
    return None


def _check_unverified(workdir, step: int) -> bool:
    """Whether the checkpoint at `step` is restored without checksums (saying so)."""
    if has_checksums(workdir, step):
        return False
    logging.warning("The checkpoint at step %d of %s has no checksums (saved by an older version of pivot_jax): "
                    "restoring it unverified, and only if its values are finite.", step, workdir)
    return True


def restore(mngr: ocp.CheckpointManager, workdir, state, sharding, data_iterator=None):
    """The newest checkpoint that is intact, as `state` laid out with `sharding` (also rewinds
    `data_iterator`); returns (state, step).

    Newer checkpoints that are damaged are moved to `<workdir>/damaged_checkpoints/` once an older one
    has restored (so that their steps can be saved again); if none restores, nothing is moved.
    """
    damaged: list[tuple[int, str]] = []
    for step in sorted(mngr.all_steps(), reverse=True):
        problem = verify(workdir, step)
        if problem is None:
            unverified = _check_unverified(workdir, step)
            try:
                restored = _restore_state(mngr, step, state, sharding, data_iterator)
            except Exception as error:  # a damaged checkpoint can make Orbax or grain raise anything
                problem = first_line(error)
            else:
                problem = _non_finite(serialization.to_state_dict(restored), "state") if unverified else None
            if problem is None:
                for bad_step, reason in damaged:
                    logging.warning("The checkpoint at step %d is damaged (%s); resuming from step %d instead. "
                                    "It is kept in %s.", bad_step, reason, step, epath.Path(workdir) / DAMAGED)
                _move_aside(mngr, workdir, [s for s, _ in damaged])
                return restored, step
        damaged.append((step, problem))
    details = "; ".join(f"step {s}: {reason}" for s, reason in damaged)
    raise CheckpointError(f"no checkpoint in {checkpoint_dir(workdir)} can be restored ({details}). If the "
                          "config changed, restore it; else move the checkpoints away to start afresh.")


def _free_name(folder: epath.Path, name: str) -> str:
    """`name`, or `name.1`, `name.2`, ...: the first that is not taken in `folder`."""
    candidate, copy = name, 0
    while (folder / candidate).exists() or (folder / f"{candidate}.checksums.json").exists():
        copy += 1
        candidate = f"{name}.{copy}"
    return candidate


def _move_aside(mngr: ocp.CheckpointManager, workdir, steps: list[int]) -> None:
    if not steps:
        return
    if jax.process_index() == 0:
        target = epath.Path(workdir) / DAMAGED
        target.mkdir(parents=True, exist_ok=True)
        for step in steps:  # a step damaged again keeps every earlier copy
            name = _free_name(target, str(step))
            (checkpoint_dir(workdir) / str(step)).rename(target / name)
            checksums = epath.Path(workdir) / CHECKSUMS / f"{step}.json"
            if checksums.exists():
                checksums.rename(target / f"{name}.checksums.json")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("pivot_jax: damaged checkpoints moved aside")
    mngr.reload()


def restore_model(workdir, model_state: dict, sharding, step: int | None = None) -> tuple[dict, int]:
    """Only `MODEL_FIELDS` of the checkpoint at `step` (default: the newest intact one) of `workdir`.

    `model_state` is a dict with those fields (arrays or shape structs) giving the expected shapes.
    """
    mngr = manager(workdir, read_only=True)
    try:
        steps = mngr.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {checkpoint_dir(workdir)}")
        if step is not None and step not in steps:
            raise CheckpointError(f"no checkpoint at step {step} in {checkpoint_dir(workdir)}; it has {sorted(steps)}")
        candidates = [step] if step is not None else sorted(steps, reverse=True)
        target = {field: model_state[field] for field in MODEL_FIELDS}
        restore_args = ocp.args.PyTreeRestore(
            item=_abstract(target, sharding),
            restore_args=jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), target),
            partial_restore=True,
        )
        problems = []
        for candidate in candidates:
            problem = verify(workdir, candidate)
            if problem is None:
                unverified = _check_unverified(workdir, candidate)
                try:
                    restored = mngr.restore(candidate, args=ocp.args.Composite(**{STATE: restore_args}))[STATE]
                except (ValueError, KeyError, TypeError) as error:
                    problem = first_line(error)
                    if not _unreadable(workdir, candidate):  # the files are fine: the model differs
                        raise CheckpointError(
                            f"the checkpoint at step {candidate} in {checkpoint_dir(workdir)} does not fit the "
                            f"config's model (config.model / config.data): {problem}") from None
                except Exception as error:  # a damaged checkpoint can make Orbax raise anything
                    problem = first_line(error)
                else:
                    problem = _non_finite(restored, "model") if unverified else None
                if problem is None:
                    for bad, reason in problems:
                        logging.warning("The checkpoint at step %d is damaged (%s); using step %d instead.",
                                        bad, reason, candidate)
                    return restored, candidate
            problems.append((candidate, problem))
        details = "; ".join(f"step {s}: {reason}" for s, reason in problems)
        raise CheckpointError(f"no checkpoint in {checkpoint_dir(workdir)} can be restored: {details}")
    finally:
        mngr.close()


def _unreadable(workdir, step: int) -> bool:
    """Whether the checkpoint at `step` lacks the files a complete state has."""
    state_dir = checkpoint_dir(workdir) / str(step) / STATE
    return not state_dir.exists() or not any(state_dir.iterdir())


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
