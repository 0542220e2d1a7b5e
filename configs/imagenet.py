"""ImageNet (ILSVRC-2012) with ResNet-18: the paper's setting.

The paper pre-trains on clean images, then fine-tunes from that model with the perturbations
(k = 32 of m = 64: 16 low-resolution and 16 mixed-resolution rows):
  python -m pivot_jax.train --config=configs/imagenet.py:mode=clean --workdir=gs://BUCKET/in_clean
  python -m pivot_jax.train --config=configs/imagenet.py:mode=pivot,perturb=lr+mr \
      --config.init_from=gs://BUCKET/in_clean --workdir=gs://BUCKET/in_pivot
  python -m pivot_jax.train --config=configs/imagenet.py:mode=mixed,perturb=lr+mr \
      --config.init_from=gs://BUCKET/in_clean --workdir=gs://BUCKET/in_mixed
TFDS `imagenet2012` needs the archives placed in its manual download directory (see the README).
On a pod, start the same command on every worker (launch/tpu/).
"""

from pivot_jax import config_lib


def get_config(arg=None):
    config = config_lib.base_config(arg, batch_size=64, default_perturb="lr+mr")
    if config.loss.mode == "clean":
        config.num_train_steps = 1_100_000  # lr / 10 at 500k, 800k, 1M
        config.optim.learning_rate = 0.1
        config.optim.lr_boundaries = (5 / 11, 8 / 11, 10 / 11)
    else:
        # Fine-tuning of the clean model: 400k steps at 1e-5 (set config.init_from).
        config.num_train_steps = 400_000
        config.optim.learning_rate = 1e-5
        config.optim.lr_boundaries = ()
    config.eval_every_steps = 50_000
    config.checkpoint_every_steps = 5_000
    config.log_every_steps = 500

    config.paper_table = "imagenet"
    config.data.name = "imagenet2012"
    config.data.test_split = "validation"
    config.data.num_classes = 1000
    config.data.image_size = 224
    config.data.channels = 3
    config.data.augment = "imagenet"  # random crop of area (0.5, 0.8), flip, resize to 224
    config.data.mean = "channel"  # per-channel mean of the training split
    config.data.mean_examples = 10_000  # a spread-out sample: decoding all 1.28M images takes hours
    config.data.eval_batch_size = 256
    config.data.num_threads = 16
    config.data.prefetch = 8

    config.model.name = "resnet18_imagenet"
    config.model.dtype = "float32"  # "bfloat16" computes in bfloat16 with float32 parameters
    config.evals = ("clean", "mr4_nearest", "lr4_nearest", "lr4_bicubic")
    if config.smoke:
        config_lib.apply_smoke(config)
        config.model.name = "resnet18_imagenet"
        config.data.image_size = 64
        config.optim.lr_boundaries = ()
    return config
