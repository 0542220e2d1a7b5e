"""Shared fixtures: a synthetic image folder made here, real MNIST prepared offline through TFDS, and
the CIFAR-10 JPEG copy.

The synthetic data need nothing but this repository, so the loop, the train step and the evaluator
are tested on any fresh machine. The real data come from `../shared/data` beside the repository (or
$PIVOT_JAX_SHARED_DATA), never from the network. Where they are missing the real-data tests are
skipped with the reason, except under CI, where they fail.
"""

import contextlib
import fcntl
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SHARED_DATA = pathlib.Path(os.environ.get("PIVOT_JAX_SHARED_DATA", REPO.parent / "shared" / "data"))
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
CIFAR_ARCHIVE = "cifar10/cifar10-jpeg-q75-YoongiKim.tar.gz"


SYNTHETIC_CLASSES = 4
# XLA_FLAGS for a training process on 1 or on 8 fake CPU devices.
ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
EIGHT_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"


def pytest_configure(config):
    """One persistent compilation cache for the whole session: the xdist workers and every training
    process the tests start inherit it, so a program compiled once (the smoke train step, its
    evaluation) is loaded by the other tests instead of compiled again. A cache the user set is kept."""
    # The suite's ~100 short training processes would each pay glibc's one-arena start-up cost (about
    # 5 s of compilation) for no gain (runtime.keep_freed_memory); tests that check it turn it on.
    os.environ.setdefault("PIVOT_JAX_KEEP_FREED_MEMORY", "0")
    if os.environ.get("PYTEST_XDIST_WORKER") or os.environ.get(_CACHE_ENV):
        return
    config._pivot_jax_cache = tempfile.mkdtemp(prefix="pivot_jax_test_xla_cache_")
    os.environ[_CACHE_ENV] = config._pivot_jax_cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"


# The files that take longest, longest first (measured with --durations=0). The two xdist workers take
# whole files in collection order, so the long ones are not left for the end, where one worker would
# run them while the other idles (xdist's own order, by number of tests, puts them last).
SLOWEST_FILES = ("test_train.py", "test_slurm.py", "test_use.py", "test_gcs.py", "test_pod.py", "test_distributed.py",
                 "test_onednn.py", "test_reliability.py", "test_imagenet.py", "test_evaluate.py", "test_corruptions.py", "test_loop.py")


# The fast tier (`pytest -m "not slow"`) leaves out what is marked `slow`: explicitly, or here, every
# test of a file that is about whole training runs (multi-process, clusters, storage services, a trained
# model, ImageNet's two stages), every test that reads the real data sets, and every test that uses a
# trained run made by a fixture.
SLOW_FILES = {"test_train.py", "test_distributed.py", "test_slurm.py", "test_gcs.py", "test_pod.py", "test_imagenet.py",
              "test_use.py"}
SLOW_FIXTURES = {"mnist_data_dir", "cifar_folder", "trained_on_eight", "trained_once", "constant_12", "uninterrupted_18"}


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order
    for item in items:
        if item.path.name in SLOW_FILES or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_unconfigure(config):
    cache = getattr(config, "_pivot_jax_cache", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now: tests never share fixed ports (two suites may run at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _require(path: pathlib.Path) -> None:
    if not path.exists():
        message = (f"real test data {path} missing: set PIVOT_JAX_SHARED_DATA to a folder holding mnist/ (MNIST's "
                   f"four *-ubyte.gz files) and {CIFAR_ARCHIVE} (README); the synthetic-data tests cover the same code")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def config_path():
    return lambda name: str(CONFIGS / f"{name}.py")


@pytest.fixture(scope="session")
def synthetic_folder(tmp_path_factory):
    """A learnable image folder made here: 28 x 28 grey PNGs of 4 classes, each class a bright bar at
    its own height over noise; 96 training and 40 test images, as <root>/<split>/<class>/*.png."""
    from PIL import Image

    root = tmp_path_factory.mktemp("synthetic")
    rng = np.random.default_rng(0)
    for split, count in (("train", 96), ("test", 40)):
        for label in range(SYNTHETIC_CLASSES):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True)
            for index in range(count // SYNTHETIC_CLASSES):
                image = rng.integers(0, 60, (28, 28), dtype=np.uint8)
                image[3 + 6 * label : 7 + 6 * label, 4:24] = 220
                Image.fromarray(image).save(folder / f"{index:03d}.png")
    return str(root)


def synthetic_config_maker(folder):
    """make(arg="smoke"): `configs/mnist.py:<arg>` reading the synthetic image folder at `folder`
    (for module fixtures, which cannot use the per-test `synthetic_config`)."""
    from pivot_jax import config_lib

    def make(arg="smoke"):
        config = config_lib.load_config(f"{CONFIGS / 'mnist.py'}:{arg}")
        config.data.name, config.data.folder = "folder", folder
        config.data.num_classes = SYNTHETIC_CLASSES
        return config

    return make


@pytest.fixture
def synthetic_config(synthetic_folder):
    """`configs/mnist.py:<arg>` reading the synthetic image folder."""
    return synthetic_config_maker(synthetic_folder)


@contextlib.contextmanager
def made_once(tmp_path_factory, name):
    """(folder, done): a folder shared by the session's xdist workers, and whether another worker has
    already made it. The first worker makes it while the others wait on the lock, then they reuse it."""
    worker_temp = tmp_path_factory.getbasetemp()
    shared = worker_temp.parent if os.environ.get("PYTEST_XDIST_WORKER") else worker_temp
    folder, marker = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = marker.exists()
        if not done:
            shutil.rmtree(folder, ignore_errors=True)  # a worker that failed halfway
            folder.mkdir()
        yield folder, done
        marker.touch()


@pytest.fixture(scope="session")
def mnist_data_dir(tmp_path_factory):
    """A TFDS data dir with `mnist` prepared (array_record) from the original files, offline."""
    for name in MNIST_FILES:
        _require(SHARED_DATA / "mnist" / name)
    with made_once(tmp_path_factory, "tfds") as (data_dir, done):
        if not done:
            manual = data_dir / "downloads" / "manual"
            manual.mkdir(parents=True)
            for name in MNIST_FILES:
                shutil.copy(SHARED_DATA / "mnist" / name, manual / name)
            from pivot_jax import config_lib, data

            config = config_lib.load_config(str(CONFIGS / "mnist.py"))
            config.data.data_dir = str(data_dir)
            config.data.download = False
            data.open_split(config.data, "test")  # prepares the data set
    return str(data_dir)


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory):
    """The CIFAR-10 JPEG copy unpacked as <root>/<split>/<class>/*.jpg."""
    archive = SHARED_DATA / CIFAR_ARCHIVE
    _require(archive)
    with made_once(tmp_path_factory, "cifar10") as (root, done):
        if not done:
            with tarfile.open(archive) as tar:
                tar.extractall(root, filter="data")
    return str(root)


@pytest.fixture
def mnist_config(mnist_data_dir):
    """`configs/mnist.py:<arg>` reading the prepared MNIST."""
    from pivot_jax import config_lib

    def make(arg="smoke"):
        config = config_lib.load_config(f"{CONFIGS / 'mnist.py'}:{arg}")
        config.data.data_dir = mnist_data_dir
        config.data.download = False
        return config

    return make


def run_train(args, env_extra=None, **kwargs):
    """`python -m pivot_jax.train ARGS` in a fresh process (its own device count and signals)."""
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "pivot_jax.train", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, **kwargs)


def report_title_and_columns(text: str) -> tuple[str, list[str]]:
    """The title and the accuracy columns of a report.md that `pivot_jax.report` wrote."""
    lines = text.splitlines()
    title = lines[0].removeprefix("## ") if lines[0].startswith("## ") else ""
    header = next(line for line in lines if line.startswith("| training | ") and line.endswith(" | seeds | steps |"))
    return title, [cell.strip() for cell in header.split("|")[2:-3]]
