"""ImageNet (ILSVRC-2012) with ResNet-18: the paper's setting, and its pod-scale version.

The paper pre-trains on clean images, then fine-tunes from that model with the perturbations
(k = 32 of m = 64: 16 low-resolution and 16 mixed-resolution rows):
  python -m pivot_jax.train --config=configs/imagenet.py:mode=clean --workdir=gs://BUCKET/in_clean
  python -m pivot_jax.train --config=configs/imagenet.py:mode=pivot,perturb=lr+mr \
      --config.init_from=gs://BUCKET/in_clean --workdir=gs://BUCKET/in_pivot
  python -m pivot_jax.train --config=configs/imagenet.py:mode=mixed,perturb=lr+mr \
      --config.init_from=gs://BUCKET/in_clean --workdir=gs://BUCKET/in_mixed
TFDS `imagenet2012` needs the archives placed in its manual download directory (see the README).
Object boxes for mixed resolution come from the ILSVRC box XML files, turned into a box file once:
  python -m pivot_jax.boxes_from_xml --xml=ILSVRC2012_bbox_train_v2.tar.gz --xml=ILSVRC2012_bbox_val_v3.tgz \
      --out=gs://BUCKET/imagenet_boxes.csv
  ... --config.data.box_file=gs://BUCKET/imagenet_boxes.csv

Pod scale (`pod`, or `pod=<global batch>`): the same two stages and the same epochs at a global batch of
4,096 (128 images per device on a v5e-32, 256 on the 16 chips of a v4-32), computing in bfloat16. The
pre-training rate follows Goyal et al. 2017 (arXiv:1706.02677): 0.1 per 256 images (1.6 at 4,096),
reached by a linear warm-up over the first 5 epochs. The paper's own rate, 0.1 at batch 64, is four times
that per image: scaled linearly it would be 6.4, past the 3.2 (at 8k) up to which Goyal et al. found
linear scaling to hold. Fine-tuning keeps the paper's rate per image (1e-5 per 64), with a 1-epoch
warm-up. On a v4-32 (launch/tpu/pod.sh runs the command on every worker; its variables are in
launch/tpu/config.env):
  CONFIG=configs/imagenet.py:mode=clean,pod WORKDIR=gs://BUCKET/in_clean_pod launch/tpu/pod.sh train
  CONFIG=configs/imagenet.py:mode=pivot,perturb=lr+mr,pod WORKDIR=gs://BUCKET/in_pivot_pod \
      launch/tpu/pod.sh train -- --config.init_from=gs://BUCKET/in_clean_pod
Check that it fits before booking the slice (per-device memory and FLOPs of one step):
  python -m pivot_jax.compile_check --config=configs/imagenet.py:mode=clean,pod --devices=16  # v4-32: 16 chips
"""

from pivot_jax import config_lib

PAPER_BATCH = 64
TRAIN_IMAGES = 1_281_167


def get_config(arg=None):
    pod_batch = config_lib.parse_arg(arg, "lr+mr")["pod"]
    config = config_lib.base_config(arg, batch_size=PAPER_BATCH, default_perturb="lr+mr", has_pod=True)
    if config.loss.mode == "clean":
        config.num_train_steps = 1_100_000  # lr / 10 at 500k, 800k, 1M
        config.optim.learning_rate = 0.1
        config.optim.lr_boundaries = (5 / 11, 8 / 11, 10 / 11)
    else:
        # Fine-tuning of the clean model: 400k steps at 1e-5 (set config.init_from).
        config.num_train_steps = 400_000
        config.optim.learning_rate = 1e-5
        config.optim.lr_boundaries = ()
        config.init_from_required = (
            "this config fine-tunes a clean pre-trained ResNet-18 at lr 1e-5, which from random weights learns "
            "nothing. The paper's two stages: python -m pivot_jax.train --config=configs/imagenet.py:mode=clean "
            "--workdir=DIR_CLEAN, then python -m pivot_jax.train "
            f"--config=configs/imagenet.py:mode={config.loss.mode},perturb=lr+mr --config.init_from=DIR_CLEAN "
            f"--workdir=DIR_{config.loss.mode.upper()}")
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
    config.data.prefetch = 16  # grain: a read buffer smaller than num_threads idles threads

    config.model.name = "resnet18_imagenet"
    config.model.dtype = "float32"  # "bfloat16" computes in bfloat16 with float32 parameters
    config.evals = ("clean", "mr4_nearest", "lr4_nearest", "lr4_bicubic")
    if pod_batch:
        scale_to_pod(config, pod_batch)
    if config.smoke:
        config_lib.apply_smoke(config)
        config.model.name = "resnet18_imagenet"
        config.data.image_size = 64
        config.optim.lr_boundaries = ()
        config.optim.warmup_steps = 0
    return config


def scale_to_pod(config, batch):
    """The paper's schedule at a global batch of `batch`: the same epochs, the steps scaled down."""
    images_per_step = batch / PAPER_BATCH

    def steps(paper_steps):
        return max(1, round(paper_steps / images_per_step))

    def epochs(n):
        return max(1, round(n * TRAIN_IMAGES / batch))

    config.batch_size = batch
    if config.loss.mode in ("mixed", "pivot"):
        config.perturb.k = batch // 2
    config.num_train_steps = steps(config.num_train_steps)
    if config.loss.mode == "clean":
        config.optim.learning_rate = 0.1 * batch / 256  # Goyal et al.'s rule (see the docstring)
        config.optim.warmup_steps = epochs(5)
    else:
        config.optim.learning_rate = 1e-5 * images_per_step  # the paper's rate per image
        config.optim.warmup_steps = epochs(1)
    config.eval_every_steps = steps(config.eval_every_steps)
    config.checkpoint_every_steps = steps(config.checkpoint_every_steps)
    config.checkpoint_every_minutes = 30.0  # a preemption without notice loses at most this much
    config.log_every_steps = max(1, steps(config.log_every_steps))
    config.model.dtype = "bfloat16"
    config.data.eval_batch_size = max(config.data.eval_batch_size, batch // 4)
