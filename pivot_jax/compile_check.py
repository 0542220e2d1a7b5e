"""Will it fit? `python -m pivot_jax.compile_check --config=configs/<dataset>.py[:args] [--devices=N]`.

Lowers and compiles the train step for the configured global batch on the devices present (or on N
fake CPU devices) without reading data or running a step, and prints the per-device memory from
XLA's `memory_analysis` and the FLOPs of one step, so that a batch size can be checked before a pod
is booked. It says whether that peak fits the HBM of a TPU v4 or v5e chip (one JAX device each).
Compiled for fake CPU devices, the figures are XLA:CPU's buffer assignment for the same sharded
program: a TPU compile fuses and lays out differently, so treat a margin under ~20% as not fitting.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags


# HBM per chip, in GiB (Google Cloud TPU documentation, "TPU v4" and "TPU v5e" system architecture).
HBM_GIB = {"TPU v4": 32, "TPU v5e": 16}


def compile_report(config) -> dict:
    """Compiles `config`'s train step against abstract inputs; returns sizes and FLOPs."""
    import jax

    from pivot_jax import config_lib, models, sharding, train_step

    mesh = sharding.make_mesh()
    config_lib.validate(config, num_devices=mesh.size)
    step_fns = train_step.build(config, mesh)  # the step training runs, with its shardings
    state = step_fns.abstract_state()
    compiled = step_fns.step.lower(state, step_fns.abstract_batch()).compile()
    memory = compiled.memory_analysis()
    per_device = {
        "arguments": memory.argument_size_in_bytes,
        "outputs": memory.output_size_in_bytes,
        "aliased": memory.alias_size_in_bytes,
        "temporaries": memory.temp_size_in_bytes,
        "generated_code": memory.generated_code_size_in_bytes,
    }
    per_device["peak_estimate"] = (per_device["arguments"] + per_device["outputs"] - per_device["aliased"]
                                   + per_device["temporaries"] + per_device["generated_code"])
    params = sum(x.size for x in jax.tree.leaves(state.params))
    conv = models.resolve_conv(config.model.conv)
    return {
        "model": config.model.name,
        "devices": mesh.size,
        "platform": jax.devices()[0].platform,
        "global_batch": config.batch_size,
        "clean_images_per_step": config_lib.host_batch_size(config),
        "parameters": int(params),
        "conv": conv,
        # With XLA's convolutions the step just compiled is the one to count; else one is compiled.
        "flops_per_step": (train_step.compiled_flops(compiled, mesh) if conv == "xla"
                           else train_step.flops_per_step(config, mesh)),
        "bytes_per_device": per_device,
        "fits_hbm": {chip: per_device["peak_estimate"] <= gib * 2**30 for chip, gib in HBM_GIB.items()},
    }


def _gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from pivot_jax import errors, runtime

    if flags.FLAGS.devices:  # JAX reads these when its backend starts, at the first computation
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={flags.FLAGS.devices}")
    runtime.configure_cpu_defaults()
    try:
        config = runtime.config_from_flags()
        if flags.FLAGS.devices:
            config.model.conv = "xla"  # the fake devices stand in for accelerators, which run XLA's
        report = compile_report(config)
    except errors.UserError as error:
        sys.exit(f"error: {error}")
    memory = report["bytes_per_device"]
    print(f"{report['model']}: global batch {report['global_batch']} ({report['clean_images_per_step']} clean "
          f"images fed per step) on {report['devices']} {report['platform']} devices, "
          f"{report['parameters'] / 1e6:.2f}M parameters")
    print(f"per device: arguments {_gib(memory['arguments'])}, outputs {_gib(memory['outputs'])} "
          f"(aliased with donated inputs {_gib(memory['aliased'])}), temporaries {_gib(memory['temporaries'])}, "
          f"code {_gib(memory['generated_code'])}; peak estimate {_gib(memory['peak_estimate'])}")
    print(f"FLOPs per step: {report['flops_per_step'] / 1e12:.3f} TFLOP; convolutions: {report['conv']}")
    print("fits one chip's HBM: " + "; ".join(
        f"{chip} ({HBM_GIB[chip]} GiB): {'yes' if fits else 'NO'}" for chip, fits in report["fits_hbm"].items()))
    print(json.dumps(report))


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:args]).")
    flags.DEFINE_integer("devices", None, "Compile for this many fake CPU devices instead of the devices present.")
    flags.mark_flags_as_required(["config"])
    from pivot_jax import runtime

    app.run(main, flags_parser=runtime.parse_flags)
