"""What every `configs/<dataset>.py` shares: the argument parser, the common fields, and `validate`.

A config file builds `base_config(...)` with its data set's paper settings and applies the argument
(`mode=...,perturb=...,smoke`). `validate(config)` runs before anything else does and raises a
`ConfigError` naming the field, its value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import ml_collections

from pivot_jax import conditions, corruptions
from pivot_jax import perturb as perturb_lib
from pivot_jax.errors import ConfigError

MODES = ("clean", "perturbed", "mixed", "pivot")
PERTURBS = {"noise": ("noise",), "lr": ("lr",), "mr": ("mr",), "lr+mr": ("lr", "mr"),
            # a common corruption, severity drawn per image
            **{name: (name,) for name in conditions.CORRUPTIONS},
            # robustness to the suite without training on its benchmark corruptions: noise, LR, MR and
            # the published extras (a quarter of the k rows each)
            conditions.SUITE: ("noise", "lr", "mr", "extras")}
AUGMENTS = ("none", "cifar", "imagenet")
# Noise far beyond the pixel range turns every image into clipped noise: a typo, not an experiment.
MAX_SIGMA = 2.0
MEANS = ("none", "pixel", "channel")
# The global batch of `pod`: 128 images per device on 32 devices (a v5e-32), 256 on a v4-32's 16 chips.
POD_BATCH = 4096
# Fields that do not change the experiment: a resumed run may change these (a field listed here
# covers its sub-fields).
FIELDS_A_RESUME_MAY_CHANGE = (
    "log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints",
    "allow_config_change", "evals", "sweep_evals", "data.data_dir", "data.manual_dir", "data.folder",
    "data.num_threads", "data.prefetch", "data.download", "data.eval_batch_size", "data.test_examples",
    "profile_steps", "model.conv", "perturb.frost_photos", "checkpoint_every_minutes", "tensorboard_dir",
    "init_from_required",
)

# Fields added after runs were already saved, with the value that gives those runs' behaviour: a
# config.json without them reads as if it had them (evaluation, export, and resuming such a run).
FIELDS_ADDED_LATER = {"optim.warmup_steps": 0, "perturb.corruption_table": "auto", "perturb.frost_photos": "",
                      "checkpoint_every_minutes": 0.0, "tensorboard_dir": "", "init_from_required": ""}


@functools.cache
def field_names() -> frozenset[str]:
    """Every config field by dotted name (every config file starts from `base_config`, adding none)."""
    from flax import traverse_util

    config = base_config(None, batch_size=8)
    return frozenset(traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep="."))


def parse_arg(arg: str | None, default_perturb: str = "noise") -> dict[str, str | bool | int]:
    """`"mode=pivot,perturb=noise,smoke"` -> {"mode": "pivot", "perturb": "noise", "smoke": True, "pod": 0}.

    `pod` (or `pod=<global batch>`) asks for the pod-scale setting of the configs that have one; its
    value is the global batch, 0 without it.
    """
    parsed: dict[str, str | bool | int] = {"mode": "pivot", "perturb": default_perturb, "smoke": False, "pod": 0}
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if key == "smoke" and not sep:
            parsed["smoke"] = True
        elif key == "pod":
            if sep and not (value.isdigit() and int(value) > 0):
                raise ConfigError(f"config argument pod: got {value!r}, expected a global batch size (an int > 0)")
            parsed["pod"] = int(value) if sep else POD_BATCH
        elif key in ("mode", "perturb") and sep:
            parsed[key] = value
        else:
            raise ConfigError(
                f"config argument: got {item!r}, expected mode=<{'|'.join(MODES)}>, "
                f"perturb=<{'|'.join(PERTURBS)}>, smoke or pod[=<global batch>]"
            )
    if parsed["mode"] not in MODES:
        raise ConfigError(f"config argument mode: got {parsed['mode']!r}, expected one of {MODES}")
    if parsed["perturb"] not in PERTURBS:
        raise ConfigError(
            f"config argument perturb: got {parsed['perturb']!r}, expected one of {tuple(PERTURBS)}"
        )
    return parsed


def base_config(
    arg: str | None, *, batch_size: int, k: int | None = None, default_perturb: str = "noise", has_pod: bool = False
) -> ml_collections.ConfigDict:
    """The fields every data set has, with the training mode and perturbation from `arg`.

    `has_pod`: the config has a pod-scale setting (`pod` in `arg`), which it applies itself.

    `k` is the number of perturbed rows in the `mixed` and `pivot` modes (default m / 2). In the
    `perturbed` mode k follows `batch_size`, so overriding the batch size keeps every row perturbed.
    """
    args = parse_arg(arg, default_perturb)
    if args["pod"] and not has_pod:
        raise ConfigError("config argument pod: this config has no pod-scale setting (configs/imagenet.py has)")
    config = ml_collections.ConfigDict()
    # Which of the paper's tables reports compare this experiment with: mnist, cifar10, imagenet or "".
    config.paper_table = ""
    config.seed = 0
    config.num_train_steps = 9000
    config.batch_size = batch_size  # m, the rows of one forward pass over all devices
    config.log_every_steps = 100
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 1000
    # Also save when this many minutes passed since the last save (0: by steps only); checked at the
    # logging steps. At pod scale steps can be seconds apart and a fixed step count hours.
    config.checkpoint_every_minutes = 0.0
    config.keep_checkpoints = 2
    # Where the TensorBoard event files go ("": the workdir). TensorFlow writes them, with its own GCS
    # client for gs:// (the one path in a run that epath does not write).
    config.tensorboard_dir = ""
    config.allow_config_change = False
    # A workdir (or checkpoint directory) whose latest parameters initialise a fresh run (fine-tuning).
    config.init_from = ml_collections.FieldReference(None, field_type=str)
    # A config that fine-tunes (a small learning rate meant for a trained model) says how to get the
    # model here; training from random weights is then refused with these commands.
    config.init_from_required = ""
    # Steps to trace with the JAX profiler (TensorBoard's profile tab), from the 10th step on; 0: none.
    config.profile_steps = 0
    config.smoke = args["smoke"]

    config.data = ml_collections.ConfigDict()
    config.data.name = ""  # a TFDS name, or "folder" for root/<split>/<class>/*
    config.data.data_dir = ml_collections.FieldReference(None, field_type=str)  # None: $TFDS_DATA_DIR
    config.data.manual_dir = ml_collections.FieldReference(None, field_type=str)
    config.data.download = True  # let TFDS download a data set that is not prepared yet
    config.data.folder = ml_collections.FieldReference(None, field_type=str)
    config.data.train_split = "train"
    config.data.test_split = "test"
    config.data.num_classes = 10
    config.data.image_size = 32
    config.data.channels = 3
    config.data.augment = "none"
    config.data.mean = "none"
    config.data.mean_examples = 0  # training examples the mean is computed from; 0: all
    config.data.default_box_fraction = 0.5  # centred box for MR where the data has no boxes
    config.data.box_file = ml_collections.FieldReference(None, field_type=str)
    config.data.eval_batch_size = 512
    config.data.test_examples = 0  # 0: the whole test split
    config.data.num_threads = 2
    config.data.prefetch = 4

    config.model = ml_collections.ConfigDict()
    config.model.name = "resnet20"
    config.model.dtype = "float32"
    # The convolution implementation: "auto" (oneDNN on the CPU where it builds, else XLA), "xla" or
    # "onednn". Checkpoints are the same whichever runs.
    config.model.conv = "auto"

    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 0.1
    config.optim.momentum = 0.9
    config.optim.weight_decay = 1e-4  # coupled L2, kernels only
    config.optim.lr_boundaries = (4 / 9, 6 / 9, 8 / 9)  # fractions of num_train_steps
    config.optim.lr_decay = 0.1
    config.optim.warmup_steps = 0  # linear warm-up from 0 to learning_rate over these first steps

    mode = args["mode"]
    config.loss = ml_collections.ConfigDict()
    config.loss.mode = mode
    config.loss.lam = 0.3
    config.loss.lam2 = 1e-4 if mode == "pivot" else 0.0
    config.loss.symmetric = False  # True: gradient of L_dist also reaches the clean logits
    config.loss.paired = False  # mixed mode only: the pivot layout, with lam2 = 0

    config.perturb = ml_collections.ConfigDict()
    config.perturb.kinds = () if mode == "clean" else PERTURBS[args["perturb"]]
    if mode == "clean":
        config.perturb.k = 0
    elif mode == "perturbed":
        config.perturb.k = config.get_ref("batch_size")
    else:
        config.perturb.k = batch_size // 2 if k is None else k
    config.perturb.max_sigma = 0.15
    config.perturb.factors = (2, 4)
    config.perturb.methods = perturb_lib.METHODS
    # The common corruptions' parameters (training and test conditions): "cifar10" (CIFAR-10-C),
    # "imagenet" (ImageNet-C), or "auto": ImageNet-C's for images of 64 pixels or more.
    config.perturb.corruption_table = "auto"
    # The folder of the published frost photographs (frost1.png ... frost5.jpg), which this package
    # does not ship: frost (as a training kind or test condition) needs it, and with it the suite
    # `corruptions` includes frost.
    config.perturb.frost_photos = ""

    config.evals = ("clean",)  # evaluated periodically in training and by `pivot_jax.evaluate`
    # Severity sweeps, evaluated by `pivot_jax.evaluate` (not during training).
    config.sweep_evals = (
        *(f"noise_{sigma:g}" for sigma in (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)),
        *(f"lr{factor}_{method}" for factor in (2, 4, 8) for method in perturb_lib.METHODS),
    )
    return config


def apply_smoke(config: ml_collections.ConfigDict) -> None:
    """A seconds-long version of the experiment, for tests: tiny model, batch and schedule."""
    config.model.name = "resnet8"
    config.num_train_steps = 12
    config.batch_size = 16
    if config.loss.mode in ("mixed", "pivot"):
        config.perturb.k = 8
    config.log_every_steps = 4
    config.eval_every_steps = 12
    config.checkpoint_every_steps = 6
    config.data.eval_batch_size = 128
    config.data.test_examples = 256


# The config's paths to files and folders, read again by evaluate, predict and export from config.json.
PATH_FIELDS = ("data.data_dir", "data.folder", "data.manual_dir", "data.box_file", "init_from", "perturb.frost_photos",
               "tensorboard_dir")


def with_absolute_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` whose relative local paths are absolute (from the current folder), so that
    the config a run saves finds its data again from any folder."""
    import os

    config = config.copy_and_resolve_references()
    for field in PATH_FIELDS:
        parent, _, name = field.rpartition(".")
        holder = config[parent] if parent else config
        value = holder[name]
        if isinstance(value, str) and value and "://" not in value and not os.path.isabs(value):
            holder[name] = os.path.abspath(os.path.expanduser(value))
    return config


def host_batch_size(config: ml_collections.ConfigDict) -> int:
    """Clean images the input pipeline feeds per step: m - k in the paired layout, else m."""
    return config.batch_size - config.perturb.k if is_paired(config) else config.batch_size


def is_paired(config: ml_collections.ConfigDict) -> bool:
    """Whether the batch is Algorithm 1's layout, perturbed copies of the first k clean images."""
    return config.loss.mode == "pivot" or (config.loss.mode == "mixed" and config.loss.paired)


def perturb_spec(config: ml_collections.ConfigDict) -> perturb_lib.PerturbSpec:
    """The training perturbation: k rows split as evenly as possible across the kinds, in order."""
    kinds, k = tuple(config.perturb.kinds), config.perturb.k
    counts = tuple(k // len(kinds) + (i < k % len(kinds)) for i in range(len(kinds))) if kinds else ()
    return perturb_lib.PerturbSpec(
        kinds=kinds,
        counts=counts,
        max_sigma=config.perturb.max_sigma,
        factors=tuple(config.perturb.factors),
        methods=tuple(config.perturb.methods),
        corruption_table=config.perturb.corruption_table,
        frost_photos=config.perturb.frost_photos,
    )


def eval_perturbations(config: ml_collections.ConfigDict, sweeps: bool = False) -> list[perturb_lib.EvalPerturbation]:
    """The configured test conditions, in order; with `sweeps`, followed by the sweeps' other ones."""
    photos = config.perturb.frost_photos
    names = conditions.expand([*config.evals, *(config.sweep_evals if sweeps else ())], photos=bool(photos))
    table = corruptions.table_for(config.perturb.corruption_table, config.data.image_size)
    return [dataclasses.replace(perturb_lib.EvalPerturbation.parse(name), corruption_table=table, frost_photos=photos)
            for name in names]


def _require(ok: bool, field: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}: got {value!r}, expected {expected}")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Checks `config` before any data is read or any computation starts.

    `num_devices`, when given, is the number of devices the batch is sharded over.
    """
    from pivot_jax import models  # the registry imports Flax; keep `configs/` import-light

    c = config
    _require(isinstance(c.seed, int) and c.seed >= 0, "seed", c.seed, "an int >= 0")
    for field in ("num_train_steps", "batch_size", "log_every_steps", "eval_every_steps",
                  "checkpoint_every_steps", "keep_checkpoints"):
        _require(isinstance(c[field], int) and c[field] >= 1, field, c[field], "an int >= 1")
    minutes = c.checkpoint_every_minutes
    _require(isinstance(minutes, (int, float)) and minutes >= 0, "checkpoint_every_minutes", minutes,
             "a number of minutes >= 0 (0: by steps only)")
    _require(isinstance(c.profile_steps, int) and c.profile_steps >= 0, "profile_steps", c.profile_steps,
             "an int >= 0 (0: no profile)")

    _require(bool(c.data.name), "data.name", c.data.name, "a TFDS data set name or 'folder'")
    if c.data.name == "folder":
        _require(bool(c.data.folder), "data.folder", c.data.folder,
                 "the root of <root>/<split>/<class>/* when data.name is 'folder'")
    _require(c.data.augment in AUGMENTS, "data.augment", c.data.augment, f"one of {AUGMENTS}")
    _require(c.data.mean in MEANS, "data.mean", c.data.mean, f"one of {MEANS}")
    _require(c.data.num_classes >= 2, "data.num_classes", c.data.num_classes, "an int >= 2")
    _require(c.data.image_size >= 1, "data.image_size", c.data.image_size, "an int >= 1")
    _require(c.data.channels in (1, 3), "data.channels", c.data.channels, "1 or 3")
    _require(0.0 < c.data.default_box_fraction <= 1.0, "data.default_box_fraction",
             c.data.default_box_fraction, "a fraction in (0, 1]")
    _require(c.data.eval_batch_size >= 1, "data.eval_batch_size", c.data.eval_batch_size,
             "an int >= 1")
    _require(c.data.test_examples >= 0, "data.test_examples", c.data.test_examples,
             "an int >= 0 (0: the whole split)")

    _require(c.model.name in models.MODELS, "model.name", c.model.name, f"one of {models.MODELS}")
    _require(c.model.dtype in models.DTYPES, "model.dtype", c.model.dtype,
             f"one of {tuple(models.DTYPES)}")
    _require(c.model.conv in models.CONVS, "model.conv", c.model.conv, f"one of {models.CONVS}")

    _require(c.optim.learning_rate > 0, "optim.learning_rate", c.optim.learning_rate, "> 0")
    _require(0 <= c.optim.momentum < 1, "optim.momentum", c.optim.momentum, "in [0, 1)")
    _require(c.optim.weight_decay >= 0, "optim.weight_decay", c.optim.weight_decay, ">= 0")
    bounds = tuple(c.optim.lr_boundaries)
    _require(all(0 < b < 1 for b in bounds) and list(bounds) == sorted(set(bounds)),
             "optim.lr_boundaries", bounds, "increasing fractions of num_train_steps in (0, 1)")
    first_decay = round(min(bounds, default=1.0) * c.num_train_steps)
    _require(0 <= c.optim.warmup_steps < first_decay, "optim.warmup_steps", c.optim.warmup_steps,
             f"0 (none) or a number of steps below the first learning-rate decay at step {first_decay}")

    mode, m, k = c.loss.mode, c.batch_size, c.perturb.k
    _require(mode in MODES, "loss.mode", mode, f"one of {MODES}")
    _require(c.loss.lam >= 0, "loss.lam", c.loss.lam, ">= 0")
    _require(c.loss.lam2 >= 0, "loss.lam2", c.loss.lam2, ">= 0")
    kinds = tuple(c.perturb.kinds)
    _require(all(kind in perturb_lib.KINDS for kind in kinds) and len(set(kinds)) == len(kinds),
             "perturb.kinds", kinds, f"distinct kinds from {perturb_lib.KINDS}")
    if mode == "clean":
        _require(k == 0, "perturb.k", k, "0 in mode 'clean'")
    else:
        _require(bool(kinds), "perturb.kinds", kinds, f"at least one kind in mode {mode!r}")
        if mode == "perturbed":
            _require(k == m, "perturb.k", k, f"batch_size ({m}) in mode 'perturbed'")
        else:
            _require(len(kinds) <= k <= m // 2, "perturb.k", k,
                     f"between {len(kinds)} (one row per kind) and batch_size / 2 = {m // 2}")
    if mode == "pivot" or c.loss.paired:
        _require(mode in ("pivot", "mixed"), "loss.paired", c.loss.paired,
                 "False outside the modes 'mixed' and 'pivot'")
    if mode != "pivot":
        _require(c.loss.lam2 == 0, "loss.lam2", c.loss.lam2, f"0 in mode {mode!r} (no pivot term)")
    _require(0 <= c.perturb.max_sigma <= MAX_SIGMA, "perturb.max_sigma", c.perturb.max_sigma,
             f">= 0 and <= {MAX_SIGMA} (pixels are in [0, 1])")
    _require(len(c.perturb.factors) > 0 and all(isinstance(f, int) and f >= 1 for f in c.perturb.factors),
             "perturb.factors", tuple(c.perturb.factors), "ints >= 1")
    _require(len(c.perturb.methods) > 0 and all(x in perturb_lib.METHODS for x in c.perturb.methods),
             "perturb.methods", tuple(c.perturb.methods), f"some of {perturb_lib.METHODS}")
    if "mr" in kinds or any(name.startswith("mr") for name in c.evals):
        _require(c.data.image_size >= 2, "data.image_size", c.data.image_size, ">= 2 for MR")

    _require(c.perturb.corruption_table in ("auto", *corruptions.TABLES), "perturb.corruption_table",
             c.perturb.corruption_table, f"'auto' or one of {corruptions.TABLES}")
    _require(len(c.evals) > 0, "evals", tuple(c.evals), "at least one evaluation")
    try:
        evals = eval_perturbations(c, sweeps=True)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if c.perturb.frost_photos or any(kind in conditions.NEEDS_PHOTOS for kind in kinds) or any(
            e.corruption in conditions.NEEDS_PHOTOS for e in evals):
        table = corruptions.table_for(c.perturb.corruption_table, c.data.image_size)
        photos = corruptions.load_frost_photos(c.perturb.frost_photos, table)  # a ConfigError names the field
        try:
            photos.check_fits(c.data.image_size, c.data.image_size)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    if num_devices is not None:
        host_batch = host_batch_size(c)
        for field, value in (("batch_size", m), ("data.eval_batch_size", c.data.eval_batch_size)):
            _require(value % num_devices == 0, field, value, f"a multiple of the {num_devices} devices")
        _require(host_batch % num_devices == 0, "perturb.k", k,
                 f"a value for which batch_size - k = {host_batch} clean images per step divide "
                 f"evenly over the {num_devices} devices")


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`"configs/mnist.py:mode=pivot,smoke"` -> that file's `get_config("mode=pivot,smoke")`.

    The same as `--config=` on the command line, for tests, notebooks and scripts.
    """
    import importlib.util
    import pathlib

    path, _, arg = spec.partition(":")
    if not pathlib.Path(path).is_file():
        raise ConfigError(f"config file: {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem + "_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)
