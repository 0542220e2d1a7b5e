"""pivot_jax: image classifiers robust to pixel-level degradation, trained with the pivot loss."""

import os

__version__ = "0.1.0"

# TensorFlow, which TFDS and the TensorBoard writer load, prints INFO lines from C++ on start-up that say
# nothing about the run. pivot_jax computes nothing with TensorFlow, so its oneDNN kernels (whose
# notice is one of those lines) are not needed. A user's own settings win.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
