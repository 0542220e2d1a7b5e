"""Process set-up: the CPU XLA default and who wins when the user sets XLA_FLAGS."""

import os

import pytest

from pivot_jax import runtime


def test_cpu_default_is_added(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    runtime.configure_cpu_defaults()
    assert runtime.CPU_XLA_FLAGS[0] in os.environ["XLA_FLAGS"].split()
    assert "--xla_force_host_platform_device_count=8" in os.environ["XLA_FLAGS"].split()
    # 8 fake devices share the cores: each device's oneDNN convolution gets cores / 8 threads, at least 1.
    assert os.environ["OMP_NUM_THREADS"] == str(max(1, os.cpu_count() // 8))


def test_one_device_keeps_every_thread_and_the_users_thread_count_wins(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    runtime.configure_cpu_defaults()
    assert "OMP_NUM_THREADS" not in os.environ
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    runtime.configure_cpu_defaults()
    assert os.environ["OMP_NUM_THREADS"] == "3"


def test_users_own_setting_wins(monkeypatch):
    mine = "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"
    monkeypatch.setenv("XLA_FLAGS", mine)
    runtime.configure_cpu_defaults()
    assert os.environ["XLA_FLAGS"] == mine


def test_single_process_needs_no_coordinator(monkeypatch):
    for name in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "OMPI_MCA_orte_hnp_uri",
                 "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(name, raising=False)
    assert runtime.detect_cluster() is None
    assert runtime.initialize_distributed() is None  # returns without starting jax.distributed


def test_coordinator_needs_process_count_and_id():
    with pytest.raises(runtime.DistributedError, match="--num_processes and --process_id"):
        runtime.initialize_distributed("127.0.0.1:1234")


_FAULTS_PER_CALL = r"""
import resource
from pivot_jax import runtime
runtime.configure_cpu_defaults()
import jax, jax.numpy as jnp
from jax import lax

def step(x):  # two 64 MB temporaries
    y = lax.optimization_barrier(jnp.sin(x) + 1.0)
    return (lax.optimization_barrier(y[::-1] * 2.0) * y).sum()

step = jax.jit(step)
x = jnp.ones((4096, 4096), jnp.float32)
faults = []
for _ in range(40):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(step(x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[10:]))  # the fewest of a call once the heap had time to reach its steady state
"""


@pytest.mark.slow
@pytest.mark.skipif(not runtime.sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_memory_is_kept_so_steps_do_not_fault_their_temporaries_in_again(tmp_path):
    import subprocess
    import sys

    temporary_pages = 2 * 4096 * 4096 * 4 // 4096

    def faults_per_call(**env):
        environment = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **env}
        result = subprocess.run([sys.executable, "-c", _FAULTS_PER_CALL], env=environment, capture_output=True,
                                text=True, check=True)
        return float(result.stdout.strip().splitlines()[-1])

    # A user's own glibc malloc tuning wins (this one is glibc's default), and the switch turns it off:
    # each call maps its temporary anew and faults in every page of it.
    on = {"PIVOT_JAX_KEEP_FREED_MEMORY": "1"}
    assert faults_per_call(**on, GLIBC_TUNABLES="glibc.malloc.tcache_count=7") > temporary_pages / 2
    assert faults_per_call(PIVOT_JAX_KEEP_FREED_MEMORY="0") > temporary_pages / 2
    assert faults_per_call(**on) < temporary_pages / 20


def test_users_own_malloc_tuning_wins(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")
    assert runtime.keep_freed_memory() is False
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("MALLOC_ARENA_MAX_", "2")
    assert runtime.keep_freed_memory() is False


def test_cpu_backend_detection(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    assert runtime._cpu_is_the_backend() is False
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert runtime._cpu_is_the_backend() is True


def test_progress_in_a_log_file_is_plain_lines(capsys):
    """Not a terminal (a log file, CI): whole lines, no carriage-return redraws, the last one complete."""
    for _ in runtime.progress(range(300), desc="Evaluating 3 test conditions"):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert lines and not any("\r" in line for line in lines)
    assert lines[-1].startswith("Evaluating 3 test conditions: 100%") and "300/300" in lines[-1], lines
