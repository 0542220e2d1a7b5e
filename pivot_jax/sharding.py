"""The device mesh and how arrays are laid out on it.

One mesh axis, `data`, spans every device of every process: batches are split along it and the
train state is replicated. A per-process batch becomes one global `jax.Array` in `global_batch`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """One axis, `data`, over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over all devices."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full copy on every device (the train state, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch, mesh: Mesh):
    """This process's rows of a batch (a pytree of numpy arrays) -> global arrays sharded on `data`.

    Process p's rows become rows [p * B/P, (p + 1) * B/P) of the global batch.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
