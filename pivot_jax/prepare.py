"""`python -m pivot_jax.prepare --config=configs/<dataset>.py[:args]`: prepares a config's TFDS data set.

Training prepares a data set that is not prepared yet by itself (on process 0, while the other
processes wait). For ImageNet that takes hours, so a pod prepares it once ahead of training, on one
host (`launch/tpu/pod.sh prepare`), into the `TFDS_DATA_DIR` that every host then reads.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from pivot_jax import config_lib, data, runtime
from pivot_jax.errors import UserError


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.quiet_library_logs()
    try:
        config = runtime.config_from_flags()
        config_lib.validate(config)
        if config.data.name == "folder":
            print(f"{config.data.folder}: an image folder needs no preparation.")
            return
        for split in (config.data.train_split, config.data.test_split):
            opened = data.open_split(config.data, split)
            logging.info("%s %s: %d examples.", config.data.name, split, opened.num_examples)
        print(f"{config.data.name} is prepared ({config.data.train_split}, {config.data.test_split}).")
    except UserError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:args]).")
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=runtime.parse_flags)
