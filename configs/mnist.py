"""MNIST with ResNet-20: the paper's MNIST setting.

Run (any mode x perturbation; data from TFDS, downloaded on first use):
  python -m pivot_jax.train --config=configs/mnist.py:mode=pivot,perturb=noise --workdir=/tmp/mnist_pivot
  python -m pivot_jax.train --config=configs/mnist.py:mode=clean --workdir=/tmp/mnist_clean
  python -m pivot_jax.train --config=configs/mnist.py:mode=mixed,perturb=lr --workdir=/tmp/mnist_mixed_lr
A short run with the paper's schedule shape:
  python -m pivot_jax.train --config=configs/mnist.py:mode=pivot,perturb=noise \
      --config.num_train_steps=600 --workdir=/tmp/mnist_short
With noise at the full 9,000 steps the paper's stop-gradient pivot (the default) diverged at lr 0.1 in
docs/results.md (docs/method.md has the seeds); the released code's symmetric form trains:
  python -m pivot_jax.train --config=configs/mnist.py:mode=pivot,perturb=noise \
      --config.loss.symmetric=True --workdir=/tmp/mnist_pivot_sym
Seconds-long smoke test:
  python -m pivot_jax.train --config=configs/mnist.py:smoke --workdir=/tmp/mnist_smoke
Evaluate a trained workdir:
  python -m pivot_jax.evaluate --config=configs/mnist.py:mode=pivot,perturb=noise --workdir=/tmp/mnist_pivot
"""

from pivot_jax import config_lib


def get_config(arg=None):
    config = config_lib.base_config(arg, batch_size=128)
    config.num_train_steps = 9000  # lr / 10 at 4k, 6k, 8k
    config.optim.lr_boundaries = (4 / 9, 6 / 9, 8 / 9)

    config.paper_table = "mnist"
    config.data.name = "mnist"
    config.data.num_classes = 10
    config.data.image_size = 28
    config.data.channels = 1
    config.data.augment = "none"
    config.data.mean = "none"  # inputs in [0, 1]
    config.data.eval_batch_size = 1024

    config.model.name = "resnet20"
    config.evals = ("clean", "noise_0.05", "noise_0.15", "lr4_nearest", "lr4_bicubic", "mr4_nearest")
    if config.smoke:
        config_lib.apply_smoke(config)
    return config
