"""How fast pivot_jax trains, what its own parts cost, and how that compares with the hardware and a peer.

    python benchmarks/run.py [--quick] [--json FILE] [--mnist-data-dir DIR] [--cifar-folder DIR]

Each figure is the median over repeated steps after compilation. Every step measurement runs in a
fresh worker process (one at a time), so that each has its own XLA flags and device count and
all are measured side by side in one invocation. Rows whose inputs are missing (torch, data) are
skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
PEER = REPO.parent / "shared" / "peers" / "resnet20_torch.py"
YNN_CONV_OFF = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def _median_time(fn, steps: int, warmup: int = 2) -> float:
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# Workers (run in their own process).


def worker_step(args) -> dict:
    """The real train step of a config on synthetic clean images."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pivot_jax import config_lib, runtime, sharding, train_step, train_state

    if args.malloc == "kept":  # as the CLIs do (runtime.configure_cpu_defaults); "system": glibc's defaults
        runtime.keep_freed_memory()
    if args.num_processes > 1:
        runtime.initialize_distributed(f"127.0.0.1:{args.port}", args.num_processes, args.process_id, 120)
    config = config_lib.load_config(f"{REPO / 'configs' / args.dataset}.py:mode={args.mode},perturb={args.perturb}")
    config.batch_size = args.batch
    if config.loss.mode in ("mixed", "pivot"):
        config.perturb.k = args.batch // 2
    config.model.dtype = args.dtype
    config.model.conv = args.conv
    if args.model:
        config.model.name = args.model
    if args.image_size:
        config.data.image_size = args.image_size
    mesh = sharding.make_mesh()
    config_lib.validate(config, num_devices=mesh.size)
    # The training step itself (train_step.build), on synthetic clean images; the input mean has the
    # config's shape (per pixel for CIFAR), as in training.
    step_fns = train_step.build(config, mesh)
    state = step_fns.init_state(jnp.zeros(train_state.input_mean_shape(config), jnp.float32))
    size, channels = config.data.image_size, config.data.channels
    host = config_lib.host_batch_size(config) // jax.process_count()  # this process's rows
    rng = np.random.default_rng(jax.process_index())
    batch = sharding.global_batch({
        "image": rng.integers(0, 256, (host, size, size, channels), dtype=np.uint8),
        "label": rng.integers(0, config.data.num_classes, host).astype(np.int32),
        "box": np.tile(np.float32([0.25, 0.25, 0.75, 0.75]), (host, 1)),
    }, mesh)
    compiled = step_fns.step.lower(state, batch).compile()
    flops = train_step.flops_per_step(config, mesh)  # counted with XLA's convolutions: the same arithmetic
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics["loss"]

    seconds = _median_time(run, args.steps)
    return {"step_ms": 1e3 * seconds, "images_per_s": args.batch / seconds, "gflop_per_step": flops / 1e9,
            "gflops_per_s": flops / seconds / 1e9, "devices": jax.device_count()}


def worker_matmul(args) -> dict:
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    seconds = _median_time(lambda: matmul(a), max(args.steps, 10))
    return {"matmul_gflops": 2 * n**3 / seconds / 1e9}


def worker_perturb(args) -> dict:
    """The training perturbations of k = 64 CIFAR-sized images on the device, and on the host."""
    import jax
    import numpy as np
    from PIL import Image

    from pivot_jax import perturb

    rng = np.random.default_rng(0)
    images_u8 = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    images = jax.device_put(images_u8.astype(np.float32) / 255)
    boxes = jax.device_put(np.tile(np.float32([0.25, 0.25, 0.75, 0.75]), (64, 1)))
    result = {}
    for kind in ("noise", "lr", "mr"):
        spec = perturb.PerturbSpec(kinds=(kind,), counts=(64,))
        fn = jax.jit(lambda key, x, b, spec=spec: perturb.perturb_batch(key, x, b, spec))
        result[f"device_{kind}_ms"] = 1e3 * _median_time(lambda: fn(jax.random.key(1), images, boxes), args.steps * 5)

    def host(kind):  # the same work in NumPy / PIL, per image as a host pipeline would do it
        x = images_u8.astype(np.float32) / 255
        out = []
        for image in x:
            if kind == "noise":
                out.append(np.clip(image + rng.uniform(0, 0.15) * rng.standard_normal(image.shape), 0, 1))
                continue
            factor, method = rng.choice([2, 4]), rng.choice([Image.NEAREST, Image.BICUBIC])
            small = image[::factor, ::factor]
            up = np.stack([np.asarray(Image.fromarray(small[..., c], "F").resize((32, 32), method))
                           for c in range(3)], -1)
            if kind == "mr":
                up[8:24, 8:24] = image[8:24, 8:24]
            out.append(np.clip(up, 0, 1))
        return np.stack(out)

    for kind in ("noise", "lr", "mr"):
        times = []
        for _ in range(args.steps * 2):
            start = time.perf_counter()
            host(kind)
            times.append(time.perf_counter() - start)
        result[f"host_{kind}_ms"] = 1e3 * statistics.median(times)
    return result


def worker_loop(args) -> dict:
    """Images/s of the whole training loop (input pipeline, metrics, checkpoints) in its steady state:
    one run of `loop_long` steps, timed from the metrics it writes after step `loop_short` to those
    after its last step (each written once the steps before it have finished), so that start-up,
    compilation, the first steps and the final evaluation are left out."""
    import tensorflow as tf

    from pivot_jax import config_lib, runtime, train

    runtime.configure_cpu_defaults()
    config = config_lib.load_config(f"{REPO / 'configs' / args.dataset}.py:mode=pivot,perturb=noise")
    config.model.conv = args.conv
    if args.dataset == "mnist":
        config.data.data_dir = args.mnist_data_dir
    else:
        config.data.name, config.data.folder = "folder", args.cifar_folder
    config.num_train_steps = args.loop_long
    config.checkpoint_every_steps = 100  # more often than the configs do: a conservative figure
    config.log_every_steps = math.gcd(args.loop_short, args.loop_long)
    config.eval_every_steps = 10 * args.loop_long  # the loop only; evaluation is measured separately
    config.evals = ("clean",)
    config.data.test_examples = 512
    with tempfile.TemporaryDirectory() as workdir:
        train.train_and_evaluate(config, workdir)
        written = {}  # step -> when the training metrics of the steps up to it were written
        for path in pathlib.Path(workdir).glob("events.out.tfevents.*"):
            for event in tf.compat.v1.train.summary_iterator(str(path)):
                if any(value.tag == "train/loss" for value in event.summary.value):
                    written[event.step] = event.wall_time
    seconds_per_step = (written[args.loop_long] - written[args.loop_short]) / (args.loop_long - args.loop_short)
    return {"loop_images_per_s": config.batch_size / seconds_per_step, "loop_step_ms": 1e3 * seconds_per_step}


def worker_eval(args) -> dict:
    """The full MNIST test split under every evaluation of configs/mnist.py (training's evals)."""
    import jax
    import jax.numpy as jnp

    from pivot_jax import config_lib, data, evaluate, models, sharding

    config = config_lib.load_config(str(REPO / "configs" / "mnist.py"))
    config.data.data_dir = args.mnist_data_dir
    mesh = sharding.make_mesh()
    split = data.open_split(config.data, "test")
    model = models.get_model(config.model.name, num_classes=10, conv=args.conv)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    state = {"params": variables["params"], "batch_stats": variables["batch_stats"], "input_mean": jnp.zeros((1,))}
    evaluator = evaluate.Evaluator(config, split, model, mesh)
    evaluator(state)  # compile
    start = time.perf_counter()
    _, count = evaluator(state)
    seconds = time.perf_counter() - start
    return {"eval_images_per_s": count * len(config.evals) / seconds, "eval_conditions": len(config.evals),
            "eval_seconds": seconds}


WORKERS = {"step": worker_step, "matmul": worker_matmul, "perturb": worker_perturb, "loop": worker_loop,
           "eval": worker_eval}


# ---------------------------------------------------------------------------------------------
# Orchestration.


def run_worker(name: str, xla_flags: str = "", env: dict | None = None, **options) -> dict:
    env = {**os.environ, "XLA_FLAGS": xla_flags, **(env or {})}
    command = [sys.executable, __file__, f"--worker={name}"]
    for key, value in options.items():
        command.append(f"--{key.replace('_', '-')}={value}")
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    if result.returncode:
        raise RuntimeError(f"worker {name} {options} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_worker_processes(name: str, processes: int, devices_each: int, **options) -> dict:
    """The worker in `processes` processes on 127.0.0.1, each with its own fake CPU devices, joined by
    jax.distributed; returns process 0's figures."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{YNN_CONV_OFF} --xla_force_host_platform_device_count={devices_each}"}
    command = [sys.executable, __file__, f"--worker={name}", f"--num-processes={processes}"]
    command += [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
    running = [subprocess.Popen([*command, f"--process-id={i}"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(processes)]
    outputs = [p.communicate() for p in running]
    for process, (_, stderr) in zip(running, outputs):
        if process.returncode:
            raise RuntimeError(f"worker {name} x {processes} processes failed:\n{stderr[-3000:]}")
    return json.loads(outputs[0][0].strip().splitlines()[-1])


def run_peer(batch: int, steps: int) -> dict | None:
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    if not PEER.exists():
        return None
    result = subprocess.run([sys.executable, str(PEER), "--batch", str(batch), "--channels-last", "--steps", str(steps)],
                            capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else None


def in_rounds(workers: dict, rounds: int, on_round=None) -> list[dict]:
    """`rounds` rounds in each of which every worker (name -> callable returning its figures, or None
    when it cannot run) runs once, in turn, the order reversed every other round so that neither side
    always runs first on a machine whose speed drifts. Returns each round's {name: figures}, in the
    workers' order; `on_round(index, figures)` is called as each round ends."""
    by_round = []
    for round_index in range(rounds):
        order = list(workers) if round_index % 2 == 0 else list(reversed(workers))
        figures = {name: workers[name]() for name in order}
        figures = {name: figures[name] for name in workers if figures[name] is not None}
        by_round.append(figures)
        if on_round:
            on_round(round_index, figures)
    return by_round


def head_to_head(rounds: int, steps: int, note) -> dict:
    """The headline figures: the ResNet-20 pivot and clean steps (batch 128, oneDNN, freed memory kept)
    and the PyTorch peer, `in_rounds` of fresh processes. Returns each round's figures and the medians
    over rounds; the peer is left out when torch is missing."""
    def ours(mode):
        return lambda: run_worker("step", YNN_CONV_OFF, mode=mode, steps=steps, conv="onednn", malloc="kept")

    names = ("peer", "pivot", "clean")

    def report(round_index, figures):
        note(f"round {round_index + 1} of {rounds} (images/s)",
             " / ".join(f"{name} {figures[name]['images_per_s']:.0f}" for name in names if name in figures))

    by_round = in_rounds({"peer": lambda: run_peer(128, steps), "pivot": ours("pivot"), "clean": ours("clean")},
                         rounds, report)
    measured = [name for name in names if all(name in r for r in by_round)]  # the peer can fail in a round
    median = {name: {key: statistics.median(r[name][key] for r in by_round)
                     for key in ("images_per_s", "step_ms") + (("gflops_per_s", "gflop_per_step") if name != "peer" else ())}
              for name in measured}
    return {"rounds": [{name: r[name]["images_per_s"] for name in r} for r in by_round], "median": median,
            "peer_version": by_round[0]["peer"]["version"] if "peer" in measured else None}


def machine() -> dict:
    import jax
    import jaxlib

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "xla_flags_default": YNN_CONV_OFF, "platform": platform.platform()}


def measure_headline(args, steps: int, figures: dict, note) -> None:
    """The figures with a goal: matmul FLOP/s, then the pivot and clean steps against the peer in rounds."""
    figures["matmul_gflops"] = run_worker("matmul", YNN_CONV_OFF, steps=steps)["matmul_gflops"]
    note("f32 matmul 2048^3 (GFLOP/s)", f"{figures['matmul_gflops']:.0f}")

    headline = head_to_head(args.rounds, steps, note)
    figures["head_to_head"] = headline
    ours = headline["median"]
    figures["step_images_per_s"]["resnet20_b128"] = {m: ours[m]["images_per_s"] for m in ("clean", "pivot")}
    figures["gflop_per_step"] = ours["pivot"]["gflop_per_step"]
    figures["mfu"] = ours["pivot"]["gflops_per_s"] / figures["matmul_gflops"]
    figures["pivot_over_clean"] = ours["pivot"]["step_ms"] / ours["clean"]["step_ms"]
    note(f"ResNet-20 b128 pivot / clean, oneDNN, medians of {args.rounds} (images/s)",
         f"{ours['pivot']['images_per_s']:.0f} / {ours['clean']['images_per_s']:.0f}")
    note("mfu (pivot step FLOP/s over matmul FLOP/s)", f"{figures['mfu']:.3f}")
    note("pivot_over_clean (step time)", f"{figures['pivot_over_clean']:.3f}")
    if "peer" in ours:
        figures["peer"] = {"version": headline["peer_version"], **ours["peer"]}
        figures["ratio_to_peer"] = ours["pivot"]["images_per_s"] / ours["peer"]["images_per_s"]
        by_round = [r["pivot"] / r["peer"] for r in headline["rounds"]]
        note(f"PyTorch {headline['peer_version']} peer, channels_last, median (images/s)",
             f"{ours['peer']['images_per_s']:.0f}")
        note("ratio_to_peer (pivot_jax pivot / PyTorch; medians, then each round)",
             f"{figures['ratio_to_peer']:.2f} ({', '.join(f'{r:.2f}' for r in by_round)})")
    else:
        figures["skipped"]["peer"] = "torch is not installed (pip install torch==2.13.0)"
        note("PyTorch peer", "skipped: torch not installed")


def measure_parts(args, steps: int, figures: dict, note) -> None:
    """What each part buys and how the step scales: one run a row."""
    # Train-step throughput: what each part buys, in order (XLA's defaults; the YNNPACK convolution
    # fusion off; oneDNN's convolutions; glibc keeping freed memory), both modes. One run each: these
    # rows compare parts; the headline above has the medians.
    variants = (("xla_defaults", "XLA defaults", "", "xla", "system"),
                ("xla_system_malloc", "XLA, YNNPACK conv off", YNN_CONV_OFF, "xla", "system"),
                ("onednn_system_malloc", "oneDNN conv", YNN_CONV_OFF, "onednn", "system"),
                ("onednn", "oneDNN conv, freed memory kept", YNN_CONV_OFF, "onednn", "kept"),
                ("xla", "XLA, YNNPACK conv off, freed memory kept", YNN_CONV_OFF, "xla", "kept"))
    steps_by = {}
    for key, label, flags, conv, malloc in variants:
        for mode in ("clean", "pivot"):
            result = run_worker("step", flags, mode=mode, steps=steps, conv=conv, malloc=malloc)
            steps_by[(key, mode)] = result
            note(f"ResNet-20 b128 32x32 {mode}, {label} (images/s)", f"{result['images_per_s']:.0f}")
    for key in ("onednn", "xla", "xla_defaults", "xla_system_malloc", "onednn_system_malloc"):
        figures["step_images_per_s"][f"resnet20_b128_{key}"] = {
            m: steps_by[(key, m)]["images_per_s"] for m in ("clean", "pivot")}
    figures["mfu_xla"] = steps_by[("xla", "pivot")]["gflops_per_s"] / figures["matmul_gflops"]
    note("mfu of XLA's convolution (pivot step, one run)", f"{figures['mfu_xla']:.3f}")
    bf16 = run_worker("step", YNN_CONV_OFF, mode="pivot", dtype="bfloat16", steps=steps, conv="onednn")
    figures["step_images_per_s"]["resnet20_b128"]["pivot_bfloat16"] = bf16["images_per_s"]
    note("ResNet-20 b128 pivot, bfloat16 compute, oneDNN (images/s)", f"{bf16['images_per_s']:.0f}")

    # oneDNN's OpenMP threads beside XLA's: the thread count and whether idle threads spin.
    figures["threads"] = {}
    for threads, policy in (("1", "PASSIVE"), ("2", "PASSIVE"), ("2", "ACTIVE")):
        env = {"OMP_NUM_THREADS": threads, "OMP_WAIT_POLICY": policy}
        for devices in (1, 8):
            flags = f"{YNN_CONV_OFF} --xla_force_host_platform_device_count={devices}"
            result = run_worker("step", flags, env=env, mode="pivot", steps=steps, conv="onednn")
            figures["threads"][f"{devices}_devices_omp{threads}_{policy.lower()}"] = result["images_per_s"]
            note(f"ResNet-20 b128 pivot, oneDNN, {devices} devices, OMP_NUM_THREADS={threads} {policy} (images/s)",
                 f"{result['images_per_s']:.0f}")

    for conv in ("xla", "onednn"):
        result = run_worker("step", YNN_CONV_OFF, mode="pivot", model="resnet110", steps=max(3, steps // 4), conv=conv)
        figures["step_images_per_s"].setdefault("resnet110_b128", {})[f"pivot_{conv}"] = result["images_per_s"]
        note(f"ResNet-110 b128 pivot, {conv} (images/s)", f"{result['images_per_s']:.0f}")

    if not args.quick:
        for conv in ("xla", "onednn"):
            for mode in ("clean", "pivot"):
                result = run_worker("step", YNN_CONV_OFF, dataset="imagenet", mode=mode, perturb="lr+mr", batch=16,
                                    steps=3, conv=conv)
                figures["step_images_per_s"].setdefault("resnet18_b16_224", {})[f"{mode}_{conv}"] = result["images_per_s"]
                note(f"ResNet-18 b16 224x224 {mode}, {conv} (images/s)", f"{result['images_per_s']:.1f}")

    perturb = run_worker("perturb", YNN_CONV_OFF, steps=steps)
    figures["perturb_ms"] = perturb
    for kind in ("noise", "lr", "mr"):
        note(f"perturb 64 images, {kind}: device / host NumPy+PIL (ms)",
             f"{perturb[f'device_{kind}_ms']:.2f} / {perturb[f'host_{kind}_ms']:.2f}")

    figures["scaling"] = {}
    for devices in (1, 2, 8) if args.quick else (1, 2, 4, 8):
        result = run_worker("step", f"{YNN_CONV_OFF} --xla_force_host_platform_device_count={devices}",
                            mode="pivot", steps=steps)
        figures["scaling"][f"{devices}_devices"] = result["images_per_s"]
        note(f"ResNet-20 b128 pivot on {devices} fake CPU devices (images/s)", f"{result['images_per_s']:.0f}")
    result = run_worker_processes("step", 2, 1, mode="pivot", steps=steps)
    figures["scaling"]["2_processes_x_1_device"] = result["images_per_s"]
    note("ResNet-20 b128 pivot on 2 processes x 1 device (images/s)", f"{result['images_per_s']:.0f}")


def measure_loops(args, steps: int, figures: dict, note) -> None:
    """The whole training loop against the bare step (loop_over_step)."""
    figures["loop_over_step"] = {}
    loop_rows = (("mnist", args.mnist_data_dir, "--mnist-data-dir"), ("cifar10", args.cifar_folder, "--cifar-folder"))
    for dataset, source, flag in loop_rows:
        if not source:
            figures["skipped"][f"loop_{dataset}"] = f"no {flag}"
            note(f"loop_over_step {dataset}", f"skipped: no {flag}")
            continue
        options = {"mnist_data_dir": source} if dataset == "mnist" else {"cifar_folder": source}
        if args.quick:
            options.update(loop_short=20, loop_long=120)
        for conv in ("xla", "onednn"):
            # The default (oneDNN) carries the goal: medians over the rounds, loop and bare step in turn.
            by_round = in_rounds({
                "loop": lambda: run_worker("loop", "", dataset=dataset, conv=conv, **options)["loop_images_per_s"],
                "bare": lambda: run_worker("step", YNN_CONV_OFF, dataset=dataset, mode="pivot", steps=steps,
                                           conv=conv)["images_per_s"],
            }, args.rounds if conv == "onednn" else 1)
            loops, bares = [r["loop"] for r in by_round], [r["bare"] for r in by_round]
            loop, bare = statistics.median(loops), statistics.median(bares)
            ratio = loop / bare
            figures["loop_over_step"][dataset if conv == "onednn" else f"{dataset}_xla"] = ratio
            figures.setdefault("loop_images_per_s", {})[f"{dataset}_{conv}"] = loop
            figures.setdefault("loop_rounds", {})[f"{dataset}_{conv}"] = {"loop": loops, "bare_step": bares}
            note(f"{dataset} pivot loop, {conv}: loop / bare step (images/s{', medians' if len(loops) > 1 else ''})",
                 f"{loop:.0f} / {bare:.0f} = {ratio:.3f}")


def measure_evaluation(args, steps: int, figures: dict, note) -> None:
    """Evaluation throughput over the MNIST test split."""
    if args.mnist_data_dir:
        figures["eval"] = {}
        for conv in ("xla", "onednn"):
            evaluation = run_worker("eval", YNN_CONV_OFF, mnist_data_dir=args.mnist_data_dir, conv=conv)
            figures["eval"][conv] = evaluation
            note(f"MNIST test split x {evaluation['eval_conditions']} conditions, {conv} (images/s)",
                 f"{evaluation['eval_images_per_s']:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps, no ResNet-18 at 224; under 5 minutes")
    parser.add_argument("--json", help="write the figures and the machine description here")
    parser.add_argument("--mnist-data-dir", help="a TFDS data dir with mnist prepared (loop and eval rows)")
    parser.add_argument("--cifar-folder", help="the CIFAR-10 JPEG copy unpacked (CIFAR loop row)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of the headline comparison (pivot and clean steps against the PyTorch "
                             "peer), whose medians give ratio_to_peer, mfu and pivot_over_clean")
    parser.add_argument("--only", choices=("headline", "loop"),
                        help="only the headline (matmul, then the rounds of steps and peer; about a minute and a "
                             "half a round) or only the loop rows")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", default="cifar10", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="clean", help=argparse.SUPPRESS)
    parser.add_argument("--perturb", default="noise", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--conv", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--malloc", default="kept", choices=("kept", "system"), help=argparse.SUPPRESS)
    parser.add_argument("--model", default="", help=argparse.SUPPRESS)
    parser.add_argument("--image-size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--num-processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=12371, help=argparse.SUPPRESS)
    parser.add_argument("--loop-short", type=int, default=40, help=argparse.SUPPRESS)
    parser.add_argument("--loop-long", type=int, default=240, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")

    steps = 8 if args.quick else 20
    figures: dict = {"machine": machine(), "quick": args.quick, "step_images_per_s": {}, "skipped": {}}

    def note(label, value):
        print(f"{label:60s} {value}", flush=True)

    sections = {"headline": (measure_headline,), "loop": (measure_loops,),
                None: (measure_headline, measure_parts, measure_loops, measure_evaluation)}[args.only]
    for measure in sections:
        measure(args, steps, figures, note)

    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
