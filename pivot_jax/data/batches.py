"""Per-process batches: training batches that depend only on (seed, step), padded test batches.

grain shuffles each epoch afresh by index and draws each example's augmentation from (seed, position);
process p of P reads only the rows [p * B/P, (p + 1) * B/P) of each global batch, so the global batch
at a step is the same whatever the number of processes or devices. The training iterator's state (a
position) is saved with every checkpoint.
"""

from __future__ import annotations

import grain
import jax
import ml_collections
import numpy as np

from pivot_jax.data.augment import EvalTransform, TrainTransform
from pivot_jax.data.sources import Split
from pivot_jax.errors import DataError


def _process_shard(global_batch: int) -> tuple[int, int]:
    count = jax.process_count()
    if global_batch % count:
        raise DataError(f"a global batch of {global_batch} does not divide over {count} processes")
    return jax.process_index(), global_batch // count


def train_dataset(split: Split, data: ml_collections.ConfigDict, global_batch: int, seed: int):
    """This process's rows of the global training batches, as an infinite, checkpointable dataset."""
    index, per_process = _process_shard(global_batch)
    dataset = (
        grain.MapDataset.source(split.train_source)
        .shuffle(seed=seed)
        .repeat(None)
        .random_map(TrainTransform(data), seed=seed)
        .batch(per_process, drop_remainder=True)
    )
    # Batch j of the stream holds stream rows [j * B_p, (j + 1) * B_p); the global batch at step s is
    # batches s * P ... s * P + P - 1, of which this process takes its own.
    dataset = dataset[index :: jax.process_count()]
    options = grain.ReadOptions(num_threads=data.num_threads, prefetch_buffer_size=data.prefetch)
    return dataset.to_iter_dataset(options)


def eval_dataset(split: Split, data: ml_collections.ConfigDict, global_batch: int, limit: int = 0):
    """This process's rows of the test batches in order, padded to full batches.

    Each row has `index` (its position in the split, which seeds its test-time noise) and `mask`
    (0 for padding), so that no example is dropped and none counts twice.
    """
    index, per_process = _process_shard(global_batch)
    num_examples = min(limit, split.num_examples) if limit else split.num_examples
    num_batches = -(-num_examples // global_batch)
    examples = grain.MapDataset.source(split.source).map(EvalTransform(data))
    size = data.image_size

    def row(position: int) -> dict:
        if position < num_examples:
            example = examples[position]
            return {**example, "index": np.int32(position), "mask": np.float32(1)}
        return {
            "image": np.zeros((size, size, data.channels), np.uint8),
            "label": np.int32(0),
            "box": np.zeros(4, np.float32),
            "index": np.int32(position),
            "mask": np.float32(0),
        }

    rows = grain.MapDataset.range(num_batches * global_batch).map(row).batch(per_process)
    rows = rows[index :: jax.process_count()]
    options = grain.ReadOptions(num_threads=data.num_threads, prefetch_buffer_size=data.prefetch)
    return rows.to_iter_dataset(options), num_examples
