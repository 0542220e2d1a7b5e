"""Shared fixtures: real MNIST prepared offline through TFDS, and the CIFAR-10 JPEG copy.

The data come from `../shared/data` beside the repository (or $PIVOT_JAX_SHARED_DATA), never from
the network. Where they are missing the data tests are skipped, except under CI, where they fail.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SHARED_DATA = pathlib.Path(os.environ.get("PIVOT_JAX_SHARED_DATA", REPO.parent / "shared" / "data"))
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
CIFAR_ARCHIVE = "cifar10/cifar10-jpeg-q75-YoongiKim.tar.gz"


def _require(path: pathlib.Path) -> None:
    if not path.exists():
        message = f"test data {path} missing (set PIVOT_JAX_SHARED_DATA)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def config_path():
    return lambda name: str(CONFIGS / f"{name}.py")


@pytest.fixture(scope="session")
def mnist_data_dir(tmp_path_factory):
    """A TFDS data dir with `mnist` prepared (array_record) from the original files, offline."""
    for name in MNIST_FILES:
        _require(SHARED_DATA / "mnist" / name)
    data_dir = tmp_path_factory.mktemp("tfds")
    manual = data_dir / "downloads" / "manual"
    manual.mkdir(parents=True)
    for name in MNIST_FILES:
        shutil.copy(SHARED_DATA / "mnist" / name, manual / name)
    from pivot_jax import config_lib, input_pipeline

    config = config_lib.load_config(str(CONFIGS / "mnist.py"))
    config.data.data_dir = str(data_dir)
    config.data.download = False
    input_pipeline.open_split(config.data, "test")  # prepares the data set
    return str(data_dir)


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory):
    """The CIFAR-10 JPEG copy unpacked as <root>/<split>/<class>/*.jpg."""
    archive = SHARED_DATA / CIFAR_ARCHIVE
    _require(archive)
    root = tmp_path_factory.mktemp("cifar10")
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
