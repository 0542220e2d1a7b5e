"""launch/tpu/pod.sh end to end, with a stand-in `gcloud` that runs each worker command on this machine
as one worker (its own home directory): setup, train detached from the SSH session, status, logs and
evaluate. The commands with extra arguments are checked as printed (dry runs) in test_distributed.py."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

from conftest import CONFIGS, REPO, SYNTHETIC_CLASSES

pytestmark = pytest.mark.slow
POD = REPO / "launch" / "tpu" / "pod.sh"

# What each `gcloud` call does here: it is recorded; `tpu-vm ssh --command=C` runs C in a login-like
# shell of the one worker; `describe` finds no slice; the rest succeed.
STAND_IN_GCLOUD = r"""#!/usr/bin/env bash
echo "$*" >> "$GCLOUD_CALLS"
command=""
for arg in "$@"; do
  case "$arg" in --command=*) command="${arg#--command=}" ;; esac
done
case " $* " in
  *" ssh "*) cd "$WORKER_HOME" && HOME="$WORKER_HOME" exec bash -c "$command" ;;
  *" describe "*) exit 1 ;;
  *) exit 0 ;;
esac
"""


@pytest.fixture(scope="module")
def pod(tmp_path_factory, synthetic_folder):
    """The stand-in gcloud, a worker home, the repository to clone (this working tree, committed), and a
    config file that reads the synthetic image folder."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("the worker borrows this suite's virtual environment; run the suite in one")
    root = tmp_path_factory.mktemp("pod")
    bin_dir, worker, origin = root / "bin", root / "worker", root / "origin"
    for folder in (bin_dir, worker, origin):
        folder.mkdir()
    (bin_dir / "gcloud").write_text(STAND_IN_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (origin / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, origin / name)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(origin)]
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "the tree under test"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    config_file = root / "pod_config.py"
    config_file.write_text(
        "from pivot_jax import config_lib\n\n\ndef get_config(arg=None):\n"
        f"    config = config_lib.load_config({str(CONFIGS / 'mnist.py')!r} + ':' + (arg or 'smoke'))\n"
        f"    config.data.name, config.data.folder = 'folder', {synthetic_folder!r}\n"
        f"    config.data.num_classes = {SYNTHETIC_CLASSES}\n    return config\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "GCLOUD_CALLS": str(root / "calls.txt"),
           "WORKER_HOME": str(worker), "REPO_URL": str(origin), "TFDS_DATA_DIR": str(root / "tfds"),
           "CONFIG": f"{config_file}:mode=pivot,perturb=noise,smoke", "PROJECT": "proj", "TPU_NAME": "pod1",
           "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return root, worker, env


def pod_sh(env, *args, timeout=300):
    result = subprocess.run(["bash", str(POD), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def wait_until_ended(env, name, timeout=300):
    deadline = time.monotonic() + timeout
    while f"{name}: running" in (status := pod_sh(env, "status")):
        assert time.monotonic() < deadline, status
        time.sleep(1)
    assert f"{name}: ended" in status, status
    return status


def test_setup_train_status_logs_evaluate(pod):
    root, worker, env = pod
    # setup: the clone and a virtual environment of Python >= 3.11 with the package installed in it. The
    # package's dependencies are this suite's own (jax[tpu] would take minutes): PIP_NO_DEPS skips them.
    pod_sh({**env, "PIP_NO_DEPS": "1"}, "setup", timeout=600)
    checkout = worker / "pivot_jax"
    assert (checkout / "launch" / "tpu" / "pod.sh").is_file()
    version = subprocess.run([checkout / ".venv" / "bin" / "python", "-c",
                              "import sys, importlib.metadata as m; print(sys.version_info >= (3, 11), "
                              "m.version('pivot-jax'))"], capture_output=True, text=True, check=True).stdout
    assert version.split() == ["True", "0.1.0"]
    # The worker then borrows this suite's environment, which has the dependencies.
    shutil.rmtree(checkout / ".venv")
    (checkout / ".venv").symlink_to(sys.prefix)

    # train, no extra arguments: started detached, so the SSH command returns while it runs.
    started = time.monotonic()
    out = pod_sh({**env, "WORKDIR": str(root / "run")}, "train")
    assert "train started (pid" in out and time.monotonic() - started < 60
    status = wait_until_ended(env, "train")
    log = (worker / "pivot_jax_logs" / "train.log").read_text()
    assert "Test accuracy (%) at step 12" in log and "unexpected arguments" not in log
    assert "Test accuracy (%) at step 12" in pod_sh(env, "logs")
    assert "train: ended" in status and "evaluate: not started" in status

    # evaluate: with the run's own config (no --config on its command line), detached like train.
    (root / "run" / "eval" / "results.json").unlink()
    out = pod_sh({**env, "WORKDIR": str(root / "run")}, "evaluate")
    assert "evaluate started (pid" in out
    wait_until_ended(env, "evaluate")
    results = json.loads((root / "run" / "eval" / "results.json").read_text())
    assert results["step"] == 12 and "mr4_nearest" in results["accuracy"]
    evaluate_call = next(line for line in (root / "calls.txt").read_text().splitlines() if "pivot_jax.evaluate" in line)
    assert "--config=" not in evaluate_call.split("pivot_jax.evaluate")[1]
