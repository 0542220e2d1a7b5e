"""launch/slurm/submit.sh against a real one-node Slurm (Debian's slurm-wlm and munge, as local
daemons that this module starts and stops): two tasks join one jax.distributed run of the config
asked for, a TERM mid-run checkpoints and the resubmitted job resumes, and the time-limit signal
requeues the job, which resumes by itself and finishes."""

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from conftest import CONFIGS, REPO, SYNTHETIC_CLASSES, free_port
from pivot_jax import checkpoint

pytestmark = pytest.mark.slow
SUBMIT = REPO / "launch" / "slurm" / "submit.sh"


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"Slurm: {reason} (.ci/run installs slurm-wlm and munge)")
    pytest.skip(f"Slurm: {reason}")


class LocalSlurm:
    """slurmctld and slurmd on this machine: one node with every CPU and 2 GPUs declared over
    placeholder files, so that the launcher's GPU request (--gpus-per-node) runs unchanged."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        host, cpus = socket.gethostname().split(".")[0], os.cpu_count() or 1
        for name in ("state", "spool", "log", "dev", "munge"):
            (root / name).mkdir()
        for gpu in range(2):
            (root / "dev" / f"gpu{gpu}").touch()
        (root / "gres.conf").write_text(f"AutoDetect=off\nNodeName={host} Name=gpu File={root}/dev/gpu[0-1]\n")
        self.conf.write_text("\n".join([
            "ClusterName=pivotjaxtest", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", f"AuthInfo=socket={root}/munge/socket", f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool",
            f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
            f"SlurmctldLogFile={root}/log/slurmctld.log", f"SlurmdLogFile={root}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "MpiDefault=none", "JobAcctGatherType=jobacct_gather/none",
            "ReturnToService=2", "GresTypes=gpu", "SchedulerParameters=sched_interval=1",
            f"NodeName={host} CPUs={cpus} RealMemory=4000 Gres=gpu:2 State=UNKNOWN",
            f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))

    def start(self):
        if not os.path.exists("/etc/munge/munge.key"):
            _unavailable("no /etc/munge/munge.key (the munge package makes it)")
        munge = self.root / "munge"
        started = subprocess.run(["munged", "--force", f"--socket={munge}/socket", f"--pid-file={munge}/munged.pid",
                                  f"--log-file={munge}/munged.log", f"--seed-file={munge}/seed"],
                                 capture_output=True, text=True)
        if started.returncode != 0:
            _unavailable(f"munged did not start: {started.stderr.strip()}")
        subprocess.run(["slurmctld", "-f", str(self.conf)], env=self.env, check=True, capture_output=True)
        subprocess.run(["slurmd", "-f", str(self.conf)], env=self.env, check=True, capture_output=True)
        deadline = time.monotonic() + 60
        while self.run("sinfo", "-h", "-o", "%t").stdout.strip() != "idle":
            if time.monotonic() > deadline:
                _unavailable("the node did not become idle: " + self.logs())
            time.sleep(0.5)

    def stop(self):
        for pid_file in (self.root / "slurmd.pid", self.root / "slurmctld.pid", self.root / "munge" / "munged.pid"):
            if pid_file.exists():
                subprocess.run(["kill", pid_file.read_text().strip()], capture_output=True)

    def logs(self) -> str:
        return "".join(p.read_text()[-2000:] for p in sorted((self.root / "log").glob("*.log")))

    def run(self, *command, **kwargs):
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60, **kwargs)

    def job_state(self, job: str) -> str:
        out = self.run("scontrol", "show", "job", job).stdout
        found = re.search(r"JobState=(\S+)", out)
        return found.group(1) if found else "GONE"

    def wait_for(self, job: str, states: tuple[str, ...], timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while (state := self.job_state(job)) not in states:
            assert time.monotonic() < deadline, f"job {job} still {state}: {self.logs()}"
            time.sleep(0.5)
        return state


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    for tool in ("slurmctld", "slurmd", "munged", "sbatch"):
        if shutil.which(tool) is None:
            _unavailable(f"{tool} is not installed")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def submit(slurm, workdir, folder, cwd, steps):
    """submit.sh with a config argument that has commas, one task per (placeholder) GPU."""
    env = {**slurm.env, "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        ["bash", str(SUBMIT), "--gpus-per-node", "2", "--cpus-per-gpu", "1", "--time", "30:00",
         f"{CONFIGS / 'mnist.py'}:mode=pivot,perturb=noise,smoke", str(workdir),
         "--config.data.name=folder", f"--config.data.folder={folder}",
         f"--config.data.num_classes={SYNTHETIC_CLASSES}", f"--config.num_train_steps={steps}",
         "--config.checkpoint_every_steps=1000", "--config.eval_every_steps=100000", "--config.log_every_steps=1",
         "--distributed_timeout=120"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return re.search(r"Submitted batch job (\d+)", result.stdout).group(1)


def wait_for_training(log: pathlib.Path, since: int, timeout: float = 240):
    """Waits until the job's log shows a training step past `since` lines."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and "train/loss" in "\n".join(log.read_text().splitlines()[since:]):
            return
        time.sleep(0.5)
    raise AssertionError(f"no training step in {log}: {log.read_text()[-3000:] if log.exists() else 'no log'}")


def test_two_tasks_train_stop_on_term_and_resume_on_requeue(slurm, synthetic_folder, tmp_path):
    # At about 4 steps a second here, each part of the run below lasts 5-20 s.
    workdir, steps = tmp_path / "run", 80

    # A job of two tasks: one jax.distributed run of the config asked for.
    job = submit(slurm, workdir, synthetic_folder, tmp_path, steps)
    log = tmp_path / f"pivot_jax-{job}.out"
    wait_for_training(log, 0)
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["loss"]["mode"] == "pivot" and saved["perturb"]["kinds"] == ["noise"]
    assert saved["model"]["name"] == "resnet8" and saved["batch_size"] == 16  # the `smoke` after the comma
    text = log.read_text()
    assert re.search(r"Process 0 of 2 joining SLURM .*local devices \[0\]", text), text[-3000:]
    assert re.search(r"Process 1 of 2 joining SLURM .*local devices \[1\]", text), text[-3000:]
    assert "on 2 devices" in text

    # scancel --signal=TERM mid-run (a preemption): both tasks stop at one step with a checkpoint.
    assert slurm.run("scancel", "--signal=TERM", job).returncode == 0
    assert slurm.wait_for(job, ("COMPLETED", "FAILED", "CANCELLED")) == "COMPLETED", log.read_text()[-3000:]
    stopped = checkpoint.manager(workdir).latest_step()
    assert stopped is not None and 0 < stopped < steps
    assert f"Stopped at step {stopped} for preemption" in log.read_text()

    # The resubmitted job resumes; the time-limit signal (USR1 to the batch script, as --signal=B:USR1@300
    # sends it) checkpoints it and requeues it; the requeued run resumes by itself.
    job = submit(slurm, workdir, synthetic_folder, tmp_path, steps)
    log = tmp_path / f"pivot_jax-{job}.out"
    wait_for_training(log, 0)
    assert f"Resumed from step {stopped} of {workdir}" in log.read_text()
    assert slurm.run("scancel", "--batch", "--signal=USR1", job).returncode == 0
    # Slurm holds a requeued job back for about two minutes (its BeginTime) before it runs again. Once the
    # node is idle again (slurmd done with the killed run: releasing it sooner races slurmd), the test
    # releases it, as an operator would.
    slurm.wait_for(job, ("PENDING",))
    deadline = time.monotonic() + 60
    while slurm.run("sinfo", "-h", "-o", "%t").stdout.strip() != "idle" and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(2)
    assert slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now").returncode == 0
    deadline = time.monotonic() + 420
    while "restart 1" not in (text := log.read_text()):
        assert time.monotonic() < deadline, f"job {job} was not requeued: {text[-3000:]}\n{slurm.logs()}"
        time.sleep(0.5)
    requeued_at = checkpoint.manager(workdir).latest_step()
    assert stopped < requeued_at < steps
    assert slurm.wait_for(job, ("COMPLETED", "FAILED", "CANCELLED"), timeout=600) == "COMPLETED", text[-3000:]
    text = log.read_text()
    assert f"Resumed from step {requeued_at} of {workdir}" in text
    assert checkpoint.manager(workdir).latest_step() == steps
    assert "Test accuracy (%)" in text
