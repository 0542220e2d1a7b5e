"""Where the time of the ResNet-20 pivot train step (CIFAR-10 config, batch 128) goes on the CPU.

    python benchmarks/profile_step.py [--conv onednn|xla] [--xla-default]

Builds the training step itself (`train_step.build`), traces five steps with the JAX profiler and sums
the time of each XLA operation kind (fusion names without their numeric suffix; oneDNN's convolutions
show as their custom-call targets). Without --xla-default it uses pivot_jax's CPU XLA flags.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import pathlib
import re
import tempfile

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--conv", default="auto", choices=("auto", "xla", "onednn"))
parser.add_argument("--xla-default", action="store_true", help="profile with XLA's own defaults")
parser.add_argument("--top", type=int, default=14)
args = parser.parse_args()
if not args.xla_default:
    from pivot_jax import runtime

    runtime.configure_cpu_defaults()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pivot_jax import config_lib, sharding, train_state, train_step  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
config = config_lib.load_config(f"{REPO / 'configs' / 'cifar10.py'}:mode=pivot,perturb=noise")
config.model.conv = args.conv
mesh = sharding.make_mesh()
step_fns = train_step.build(config, mesh)
state = step_fns.init_state(jnp.zeros(train_state.input_mean_shape(config), jnp.float32))
host = config_lib.host_batch_size(config)
rng = np.random.default_rng(0)
batch = sharding.global_batch({
    "image": rng.integers(0, 256, (host, 32, 32, 3), dtype=np.uint8),
    "label": rng.integers(0, 10, host).astype(np.int32),
    "box": np.tile(np.float32([0.25, 0.25, 0.75, 0.75]), (host, 1)),
}, mesh)
step = step_fns.step.lower(state, batch).compile()
for _ in range(3):
    state, metrics = step(state, batch)
jax.block_until_ready(metrics)
STEPS = 5
with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(STEPS):
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
    (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    events = json.load(gzip.open(path))
events = events["traceEvents"] if isinstance(events, dict) else events
by_kind, wall = collections.Counter(), 0.0
for event in events:
    if event.get("ph") != "X" or "dur" not in event:
        continue
    if event["name"] == "ThunkExecutor::Execute (wait for completion)":
        wall += event["dur"]
    elif not event["name"].startswith(("Thunk", "$", "PjitFunction")):
        by_kind[re.sub(r"\.\d+$", "", event["name"])] += event["dur"]
traced = sum(by_kind.values())
print(f"conv {args.conv}: step (wall, mean of {STEPS} in the trace): {wall / STEPS / 1e3:.1f} ms; traced XLA operations: {traced / STEPS / 1e3:.1f} ms")
for kind, micros in by_kind.most_common(args.top):
    print(f"{micros / STEPS / 1e3:8.2f} ms {100 * micros / traced:5.1f}%  {kind}")
