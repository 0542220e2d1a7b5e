"""Clean images for the accelerator: TFDS data sets or image folders, via grain.

Every example is a dict `{"image": uint8 [H, W, C], "label": int32, "box": float32 [4]}`, where `box`
is the (ymin, xmin, ymax, xmax) region that mixed resolution keeps sharp: from the data set where it
has boxes, else from the user's box file, else the configured centred default box.
Perturbations are not applied here: they run on the device, inside the train step.

    tfds_prepare  TFDS data sets prepared offline from the manual dir, or downloaded
    sources       splits as random-access sources (TFDS or <root>/<split>/<class>/*), decoding
    boxes         object boxes: the data set's, the box file's, or the default
    augment       training and test-time augmentation on the host
    batches       per-process training batches (a function of seed and step) and padded test batches
    mean          the training split's mean
"""

from pivot_jax.data.batches import eval_dataset, train_dataset
from pivot_jax.data.mean import input_mean
from pivot_jax.data.sources import ArraySource, Split, open_split
from pivot_jax.errors import DataError

__all__ = ["ArraySource", "DataError", "Split", "eval_dataset", "input_mean", "open_split", "train_dataset"]
