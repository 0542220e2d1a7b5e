"""CIFAR-10 with ResNet-20 (ResNet-110 with --config.model.name=resnet110): the paper's setting.

Run (TFDS `cifar10`, downloaded on first use):
  python -m pivot_jax.train --config=configs/cifar10.py:mode=pivot,perturb=noise --workdir=/tmp/c10_pivot
  python -m pivot_jax.train --config=configs/cifar10.py:mode=clean --workdir=/tmp/c10_clean
  python -m pivot_jax.train --config=configs/cifar10.py:mode=perturbed,perturb=lr --workdir=/tmp/c10_lr
From an image folder laid out as <root>/<split>/<class>/*.jpg instead of TFDS:
  python -m pivot_jax.train --config=configs/cifar10.py:mode=pivot,perturb=noise \
      --config.data.name=folder --config.data.folder=/data/cifar10-images --workdir=/tmp/c10_folder
The paper's schedule is 94k steps. The converged rows of docs/results.md use 40k with the same shape
(lr / 10 at 51% and 77%), where clean-only training gained 0.86 points over 20k:
  python -m pivot_jax.train --config=configs/cifar10.py:mode=pivot,perturb=noise \
      --config.num_train_steps=40000 --workdir=/tmp/c10_pivot_40k
With noise, the paper's stop-gradient pivot (the default) diverged at lr 0.1 in the 40k runs of
docs/results.md (docs/method.md has the seeds), as on MNIST; the converged comparison with `mixed`
uses the released code's symmetric form:
  python -m pivot_jax.train --config=configs/cifar10.py:mode=pivot,perturb=noise \
      --config.num_train_steps=40000 --config.loss.symmetric=True --workdir=/tmp/c10_pivot_sym_40k
Seconds-long smoke test:
  python -m pivot_jax.train --config=configs/cifar10.py:smoke --workdir=/tmp/c10_smoke
"""

from pivot_jax import config_lib


def get_config(arg=None):
    config = config_lib.base_config(arg, batch_size=128)
    config.num_train_steps = 94_000  # lr / 10 at 48k, 72k
    config.optim.lr_boundaries = (48 / 94, 72 / 94)
    config.eval_every_steps = 4000
    config.checkpoint_every_steps = 2000

    config.paper_table = "cifar10"
    config.data.name = "cifar10"
    config.data.num_classes = 10
    config.data.image_size = 32
    config.data.channels = 3
    config.data.augment = "cifar"  # zero-pad to 40, random 32 x 32 crop, horizontal flip
    config.data.mean = "pixel"  # per-pixel mean of the training split
    config.data.eval_batch_size = 512

    config.model.name = "resnet20"
    config.evals = ("clean", "noise_0.05", "noise_0.15", "lr4_nearest", "lr4_bicubic", "mr4_nearest")
    if config.smoke:
        config_lib.apply_smoke(config)
    return config
