"""JAX's own cluster detection, fed the environment each platform really sets: every process of a
TPU VM slice (its metadata server, stubbed on 127.0.0.1), of a GKE TPU slice and of a SLURM job (one
process per GPU, and one per node) joins one `jax.distributed` run with the right process id, count
and local devices (`pivot_jax.runtime.initialize_distributed`)."""

import http.server
import json
import os
import subprocess
import sys
import threading

import pytest

from conftest import REPO, free_port

# What each process runs: the project's own set-up, then what jax.distributed made of it.
_JOIN = r"""
import json, os
import jax
# JAX_FORCE_TPU_INIT makes JAX take this machine for a Cloud TPU VM; with no TPU chips it also sets
# TPU_SKIP_MDS_QUERY, which a real TPU VM does not have: drop it so the metadata server is asked.
if os.environ.get("UNSET_TPU_SKIP_MDS_QUERY"):
    os.environ.pop("TPU_SKIP_MDS_QUERY", None)
from pivot_jax import runtime
where = runtime.initialize_distributed(timeout_seconds=60)
print(json.dumps({"where": where, "process_index": jax.process_index(), "process_count": jax.process_count(),
                  "visible_devices": jax.config.values["jax_cuda_visible_devices"], "devices": len(jax.devices())}))
"""


def join(envs: list[dict]) -> list[dict]:
    """Starts one process per environment, all at once; returns what each printed."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "TPU_", "MEGASCALE_", "OMPI_", "JAX_LOCAL_DEVICE_IDS", "KUBERNETES_"))}
    base.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
                JAX_COORDINATOR_PORT=str(free_port()))
    processes = [subprocess.Popen([sys.executable, "-c", _JOIN], env={**base, **env}, cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for env in envs]
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=180)
        assert process.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    return outputs


class _MetadataServer(http.server.ThreadingHTTPServer):
    """The part of a TPU VM's metadata server that JAX reads: instance attributes, by key."""

    def __init__(self, attributes: dict[str, str]):
        self.attributes = attributes
        super().__init__(("127.0.0.1", 0), _MetadataHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _MetadataHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        prefix = "/computeMetadata/v1/instance/attributes/"
        key = self.path.removeprefix(prefix)
        if not self.path.startswith(prefix) or key not in self.server.attributes or \
                self.headers.get("Metadata-Flavor") != "Google":
            self.send_error(404)
            return
        body = self.server.attributes[key].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_tpu_vm_slice_joins_through_the_metadata_server():
    """A slice made by `pod.sh create`: no TPU_WORKER_HOSTNAMES, the peers come from the metadata server."""
    servers = [_MetadataServer({"agent-worker-number": str(worker),
                                "worker-network-endpoints": "w-0:0:127.0.0.1,w-1:1:127.0.0.1",
                                "tpu-env": "ACCELERATOR_TYPE: 'v4-16'\nMEGASCALE_NUM_SLICES: '1'\n"})
               for worker in range(2)]
    try:
        outputs = join([{"JAX_FORCE_TPU_INIT": "1", "UNSET_TPU_SKIP_MDS_QUERY": "1", "GCE_METADATA_IP": s.address}
                        for s in servers])
    finally:
        for server in servers:
            server.shutdown()
    assert [o["process_index"] for o in outputs] == [0, 1]
    assert all(o["process_count"] == 2 and o["devices"] == 2 for o in outputs)
    assert all("TPU VM slice" in o["where"] for o in outputs)
    assert all(o["visible_devices"] == "all" for o in outputs)  # JAX never narrows a TPU host's chips


def test_gke_tpu_slice_joins_through_its_environment():
    server = _MetadataServer({"tpu-env": ""})  # GKE nodes have a metadata server too; JAX asks it for slices
    try:
        outputs = join([{"JAX_FORCE_TPU_INIT": "1", "GCE_METADATA_IP": server.address,
                         "TPU_WORKER_HOSTNAMES": "127.0.0.1,localhost", "TPU_WORKER_ID": str(worker)}
                        for worker in range(2)])
    finally:
        server.shutdown()
    assert [o["process_index"] for o in outputs] == [0, 1]
    assert all(o["process_count"] == 2 and "GKE" in o["where"] for o in outputs)


def slurm_env(procid: int, localid: int, nodes: str, **extra) -> dict:
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": nodes, "SLURM_NTASKS": "2",
            "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid), **extra}


def test_slurm_one_process_per_gpu_drives_its_own_gpu():
    outputs = join([slurm_env(i, i, "127.0.0.1") for i in range(2)])
    assert [o["process_index"] for o in outputs] == [0, 1]
    assert all(o["process_count"] == 2 and "SLURM" in o["where"] for o in outputs)
    # Each task sees every GPU of the node (Slurm's CUDA_VISIBLE_DEVICES); JAX keeps device SLURM_LOCALID.
    assert [o["visible_devices"] for o in outputs] == ["0", "1"]


def test_slurm_one_process_per_node_drives_every_gpu_of_its_node():
    """Two nodes, one task each: launch/slurm/train.sbatch names the node's GPUs in JAX_LOCAL_DEVICE_IDS,
    without which JAX would keep only device SLURM_LOCALID = 0 on every node."""
    outputs = join([slurm_env(i, 0, "127.0.0.1,127.0.0.2", JAX_LOCAL_DEVICE_IDS="0,1,2,3") for i in range(2)])
    assert [o["process_index"] for o in outputs] == [0, 1]
    assert [o["visible_devices"] for o in outputs] == ["0,1,2,3", "0,1,2,3"]


def test_a_single_process_under_a_cluster_does_not_start_jax_distributed():
    (output,) = join([{**slurm_env(0, 0, "127.0.0.1"), "SLURM_NTASKS": "1"}])
    assert output["process_count"] == 1 and output["where"] == "SLURM"


def test_no_cluster_no_distributed():
    (output,) = join([{}])
    assert output["where"] is None and output["process_count"] == 1
