"""The training loop, the train step and the evaluator on synthetic data: these need no data beside
the repository, so they run on any fresh machine (the real-data versions are in test_train.py)."""

import argparse
import ast
import dataclasses
import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, SYNTHETIC_CLASSES
from pivot_jax import checkpoint, data, evaluate, sharding, train, train_state, train_step, workdirs
from test_train import logged_scalars, saved_params


def short_run(config, steps=12):
    config.num_train_steps = steps
    config.checkpoint_every_steps = config.eval_every_steps = 6
    config.log_every_steps = 3
    return config


@pytest.mark.slow
def test_loop_learns_the_synthetic_classes(synthetic_config, tmp_path):
    config = short_run(synthetic_config("mode=pivot,perturb=noise,smoke"), steps=60)
    config.checkpoint_every_steps = config.eval_every_steps = 30
    result = train.train_and_evaluate(config, str(tmp_path))
    assert result.finished and result.step == 60
    assert result.accuracy["clean"] >= 0.9, result.accuracy  # chance is 0.25
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["step"] == 60 and saved["num_examples"]["clean"] == 40  # the whole test split
    assert json.loads((tmp_path / "classes.json").read_text()) == [f"class_{i}" for i in range(SYNTHETIC_CLASSES)]
    assert sorted(logged_scalars(tmp_path, "train/l_dist")) == list(range(3, 61, 3))


@pytest.mark.slow
def test_a_crash_after_a_checkpoint_resumes_bit_exact(synthetic_config, tmp_path, monkeypatch):
    """A run that dies after its step-6 checkpoint and is started again ends with the same
    parameters as a run that was never interrupted."""
    train.train_and_evaluate(short_run(synthetic_config("mode=pivot,perturb=lr+mr,smoke")), str(tmp_path / "whole"))

    real_global_batch, calls = sharding.global_batch, []

    def dies_at_step_7(batch, mesh):
        calls.append("mask" not in batch)  # training batches; test batches have a mask
        if sum(calls) == 7 and calls[-1]:
            raise KeyboardInterrupt  # the process is killed while it trains step 7
        return real_global_batch(batch, mesh)

    monkeypatch.setattr(sharding, "global_batch", dies_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(short_run(synthetic_config("mode=pivot,perturb=lr+mr,smoke")), str(tmp_path / "cut"))
    assert checkpoint.manager(tmp_path / "cut", read_only=True).latest_step() == 6
    monkeypatch.setattr(sharding, "global_batch", real_global_batch)
    result = train.train_and_evaluate(short_run(synthetic_config("mode=pivot,perturb=lr+mr,smoke")),
                                      str(tmp_path / "cut"))
    assert result.finished and result.step == 12
    (_, whole), (_, cut) = saved_params(tmp_path / "whole"), saved_params(tmp_path / "cut")
    jax.tree.map(np.testing.assert_array_equal, whole, cut)


@pytest.mark.slow
def test_a_relative_workdir_trains_and_resumes(synthetic_config, tmp_path, monkeypatch):
    """Orbax wants absolute paths: `--workdir=run` from the current folder must checkpoint all the same;
    and a relative data folder is saved absolute, so the run evaluates from anywhere."""
    config = short_run(synthetic_config())
    folder = pathlib.Path(config.data.folder)
    monkeypatch.chdir(folder.parent)
    config.data.folder = folder.name
    result = train.train_and_evaluate(config, str(pathlib.Path(os.path.relpath(tmp_path)) / "run"))
    assert result.finished and checkpoint.manager(tmp_path / "run", read_only=True).all_steps() == [6, 12]
    assert (tmp_path / "run" / "eval" / "results.json").exists()
    assert workdirs.saved_config(tmp_path / "run").data.folder == str(folder)
    assert config.data.folder == folder.name  # the caller's config is left as it was


@pytest.mark.slow
def test_checkpoints_by_time_as_well_as_by_steps(synthetic_config, tmp_path):
    """checkpoint_every_minutes saves at the logging steps once that long has passed since the last save."""
    config = short_run(synthetic_config())
    config.checkpoint_every_steps, config.keep_checkpoints = 1000, 10
    by_steps = train.train_and_evaluate(config.copy_and_resolve_references(), str(tmp_path / "steps"))
    assert by_steps.finished and checkpoint.manager(tmp_path / "steps", read_only=True).all_steps() == [12]
    config.checkpoint_every_minutes = 1e-9  # always passed when looked at: at each logging step (3, 6, 9)
    train.train_and_evaluate(config, str(tmp_path / "minutes"))
    assert checkpoint.manager(tmp_path / "minutes", read_only=True).all_steps() == [3, 6, 9, 12]


def test_preemption_returns_what_happened(synthetic_config, tmp_path, monkeypatch):
    """SIGTERM during training: a checkpoint at the step it stopped at, and a result that says the run
    did not finish (no stale accuracies)."""
    real_global_batch, calls = sharding.global_batch, []

    def sigterm_at_step_4(batch, mesh):
        calls.append("mask" not in batch)  # training batches; test batches have a mask
        if sum(calls) == 4 and calls[-1]:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_global_batch(batch, mesh)

    monkeypatch.setattr(sharding, "global_batch", sigterm_at_step_4)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        result = train.train_and_evaluate(short_run(synthetic_config()), str(tmp_path))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result == train.RunResult(step=4, finished=False, accuracy={})
    assert checkpoint.manager(tmp_path, read_only=True).latest_step() == 4
    assert not (tmp_path / "eval" / "results.json").exists()


@pytest.mark.slow
def test_hparams_keep_sequences_and_the_profile_is_written(synthetic_config, tmp_path):
    import tensorflow as tf
    from tensorboard.plugins.hparams import plugin_data_pb2

    config = short_run(synthetic_config(), steps=14)
    config.profile_steps = 2
    train.train_and_evaluate(config, str(tmp_path))
    hparams = {}
    for path in tmp_path.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    plugin = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    hparams.update({k: v.string_value or v.number_value
                                    for k, v in plugin.session_start_info.hparams.items()})
    assert hparams["evals.5"] == "mr4_nearest" and hparams["optim.lr_boundaries.2"] == pytest.approx(8 / 9)
    assert hparams["loss.lam"] == pytest.approx(0.3)
    assert list(tmp_path.glob("plugins/profile/*/*.xplane.pb")), "no profile trace"


@pytest.mark.slow
def test_evaluator_counts_every_example_once(synthetic_config):
    """40 test examples in batches of 16 (the last one padded): the evaluator's accuracy equals a
    direct computation for clean, LR and MR inputs."""
    config = synthetic_config()
    config.data.eval_batch_size = 16
    config.evals, config.sweep_evals = ("clean", "lr4_nearest", "mr2_nearest"), ()
    mesh = sharding.make_mesh()
    split = data.open_split(config.data, "test")
    model = train_state.get_model(config)
    variables = model.init(jax.random.key(3), jnp.zeros((1, 28, 28, 1)))
    # Shift the classifier's bias so that predictions are not all one class.
    variables["params"]["Dense_0"]["bias"] = jnp.arange(SYNTHETIC_CLASSES, dtype=jnp.float32) * 0.01
    state = {"params": variables["params"], "batch_stats": variables["batch_stats"],
             "input_mean": jnp.full((1,), 0.1)}
    accuracy, count = evaluate.Evaluator(config, split, model, mesh)(state)
    assert count == 40
    images = split.source.images.astype(np.float32) / 255.0
    lr = np.repeat(np.repeat(images[:, ::4, ::4], 4, 1), 4, 2)
    mr = np.repeat(np.repeat(images[:, ::2, ::2], 2, 1), 2, 2)
    mr[:, 7:21, 7:21] = images[:, 7:21, 7:21]  # the default box: the centre half of each side
    for name, inputs in (("clean", images), ("lr4_nearest", lr), ("mr2_nearest", mr)):
        logits = np.asarray(model.apply(variables, jnp.asarray(inputs - 0.1)))
        assert accuracy[name] == np.mean(logits.argmax(-1) == split.source.labels), name


def test_train_step_lowers_the_loss_on_a_fixed_batch(synthetic_config):
    config = synthetic_config("mode=pivot,perturb=noise,smoke")
    mesh = sharding.make_mesh()
    step_fns = train_step.build(config, mesh)
    state = step_fns.init_state(jnp.zeros((1,), jnp.float32))
    split = data.open_split(config.data, "train")
    rows = slice(0, 8)  # m - k = 8 clean images; the step perturbs copies of them
    batch = sharding.global_batch({"image": split.source.images[rows], "label": split.source.labels[rows],
                                   "box": split.source.boxes[rows]}, mesh)
    losses = []
    for _ in range(8):
        state, metrics = step_fns.step(state, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 8
    assert losses[-1] < 0.5 * losses[0], losses
    assert {"l_org", "l_perturb", "l_dist", "grad_norm", "accuracy_clean", "accuracy_perturbed"} <= set(metrics)


@pytest.fixture
def benchmark_script():
    """benchmarks/run.py as a module (it is a script, outside the package), loaded afresh for each test."""
    spec = importlib.util.spec_from_file_location("benchmark_run", REPO / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_benchmark_runs_the_training_step(benchmark_script, monkeypatch):
    """benchmarks/run.py measures the step that `train_step.build` makes, nothing of its own."""
    built, real_build = [], train_step.build

    class RecordingStep:
        def __init__(self, jitted):
            self.jitted, self.lowered = jitted, 0

        def lower(self, *args):
            self.lowered += 1
            return self.jitted.lower(*args)

    def recording_build(config, mesh):
        step_fns = real_build(config, mesh)
        step_fns = dataclasses.replace(step_fns, step=RecordingStep(step_fns.step))
        built.append((config, step_fns))
        return step_fns

    monkeypatch.setattr(train_step, "build", recording_build)
    args = argparse.Namespace(num_processes=1, dataset="cifar10", mode="pivot", perturb="noise",
                              batch=16, dtype="float32", image_size=0, steps=2, conv="auto",
                              model="", malloc="system")
    figures = benchmark_script.worker_step(args)
    # The step it times, and the same step with XLA's convolutions for counting FLOPs.
    (config, step_fns), = [(c, s) for c, s in built if c.model.conv == args.conv]
    assert config.loss.mode == "pivot" and config.batch_size == 16 and config.data.mean == "pixel"
    assert step_fns.step.lowered == 1  # the benchmark compiled (and then timed) this very function
    assert figures["images_per_s"] > 0


def test_the_benchmark_headline_alternates_its_order_and_takes_medians(benchmark_script, monkeypatch):
    """ratio_to_peer comes from medians over rounds whose order alternates, so that neither side always
    runs first on a machine whose speed drifts; without torch the peer is left out."""
    calls, speeds = [], {"pivot": iter([400, 500, 300]), "clean": iter([410, 520, 390]),
                         "peer": iter([450, 420, 600])}

    def figures(name):
        calls.append(name)
        images = next(speeds[name])
        return {"images_per_s": images, "step_ms": 128e3 / images, "gflops_per_s": images / 10, "gflop_per_step": 29.0}

    monkeypatch.setattr(benchmark_script, "run_worker", lambda worker, flags, mode, **options: figures(mode))
    monkeypatch.setattr(benchmark_script, "run_peer", lambda batch, steps: {**figures("peer"), "version": "x"})
    headline = benchmark_script.head_to_head(3, 5, lambda label, value: None)
    assert calls == ["peer", "pivot", "clean", "clean", "pivot", "peer", "peer", "pivot", "clean"]
    assert headline["rounds"][1] == {"clean": 520, "pivot": 500, "peer": 420}
    assert headline["median"]["pivot"]["images_per_s"] == 400 and headline["median"]["peer"]["images_per_s"] == 450
    assert headline["median"]["clean"]["images_per_s"] == 410 and headline["peer_version"] == "x"

    speeds.update(pivot=iter([100]), clean=iter([100]))
    monkeypatch.setattr(benchmark_script, "run_peer", lambda batch, steps: None)
    headline = benchmark_script.head_to_head(1, 5, lambda label, value: None)
    assert set(headline["median"]) == {"pivot", "clean"} and headline["peer_version"] is None


def test_the_benchmark_loop_rows_alternate_their_order_and_take_medians(benchmark_script, monkeypatch):
    """loop_over_step is the median loop over the median bare step, the two run in turn, the order
    reversed every other round; the XLA rows run one round."""
    calls, speeds = [], {"loop": iter([90, 100, 80, 70]), "step": iter([100, 50, 200, 100])}

    def worker(name, flags, dataset, conv, **options):
        calls.append((name, conv))
        return {"loop_images_per_s" if name == "loop" else "images_per_s": next(speeds[name])}

    monkeypatch.setattr(benchmark_script, "run_worker", worker)
    args = argparse.Namespace(mnist_data_dir="", cifar_folder="/folder", quick=False, rounds=3)
    figures = {"skipped": {}}
    benchmark_script.measure_loops(args, 5, figures, lambda label, value: None)
    assert calls == [("loop", "xla"), ("step", "xla"), ("loop", "onednn"), ("step", "onednn"),
                     ("step", "onednn"), ("loop", "onednn"), ("loop", "onednn"), ("step", "onednn")]
    assert figures["loop_over_step"] == {"cifar10_xla": 0.9, "cifar10": 80 / 100}
    assert figures["loop_rounds"]["cifar10_onednn"] == {"loop": [100, 80, 70], "bare_step": [50, 200, 100]}
    assert figures["skipped"] == {"loop_mnist": "no --mnist-data-dir"}


def _imports(path: pathlib.Path) -> set[str]:
    """The pivot_jax modules a file imports, at any depth of the file (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n.startswith("pivot_jax")}


def test_the_import_graph_has_no_cycle():
    package = REPO / "pivot_jax"
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {name: {i for i in _imports(path) if i in modules and i != name} for name, path in modules.items()}
    # A package's __init__ re-exports its submodules: count "pkg -> pkg.sub" edges, not the reverse.
    graph = {name: {i for i in edges if not name.startswith(i + ".")} for name, edges in graph.items()}
    visiting, done = [], set()

    def visit(name):
        if name in visiting:
            pytest.fail("import cycle: " + " -> ".join(visiting[visiting.index(name):] + [name]))
        if name in done:
            return
        visiting.append(name)
        for target in sorted(graph[name]):
            visit(target)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert "pivot_jax.train" not in graph["pivot_jax.evaluate"]


def test_the_report_imports_no_jax():
    code = ("import sys, pivot_jax.report; heavy = [m for m in ('jax', 'grain', 'tensorflow', 'flax') "
            "if m in sys.modules]; print(heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
