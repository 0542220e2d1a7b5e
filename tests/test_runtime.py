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
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    runtime.initialize_distributed()  # returns without starting jax.distributed
    assert runtime._launcher() is None
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert runtime._launcher() == "slurm"


def test_coordinator_needs_process_count_and_id():
    with pytest.raises(runtime.DistributedError, match="--num_processes and --process_id"):
        runtime.initialize_distributed("127.0.0.1:1234")
