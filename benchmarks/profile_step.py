"""Where the time of a ResNet-20 train step (forward + backward, batch 128, 32x32x3) goes on the CPU.

    python benchmarks/profile_step.py [--xla-default]

Traces three steps with the JAX profiler and sums the time of each XLA operation kind (fusion
names without their numeric suffix). Without --xla-default it uses pivot_jax's CPU XLA flags.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--xla-default", action="store_true", help="profile with XLA's own defaults")
parser.add_argument("--top", type=int, default=12)
args = parser.parse_args()
if not args.xla_default:
    from pivot_jax import runtime

    runtime.configure_cpu_defaults()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pivot_jax import models  # noqa: E402

model = models.get_model("resnet20", num_classes=10)
x = jnp.ones((128, 32, 32, 3))
variables = model.init(jax.random.key(0), x)


def loss(params):
    logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                            mutable=["batch_stats"])
    return logits.sum()


grad = jax.jit(jax.grad(loss))
for _ in range(3):
    jax.block_until_ready(grad(variables["params"]))
with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(3):
            jax.block_until_ready(grad(variables["params"]))
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
print(f"step (wall, median of 3 in the trace): {wall / 3 / 1e3:.1f} ms; traced XLA operations: {traced / 3 / 1e3:.1f} ms")
for kind, micros in by_kind.most_common(args.top):
    print(f"{micros / 3 / 1e3:8.2f} ms {100 * micros / traced:5.1f}%  {kind}")
