"""The training loop end to end on the real MNIST: smoke, accuracy, exact resume, devices, errors."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import CONFIGS, ONE_DEVICE, REPO, run_train
from pivot_jax import checkpoint, config_lib, data, train, workdirs
from pivot_jax.data import tfds_prepare
from pivot_jax.ops import onednn


def saved_params(workdir):
    step, state = checkpoint.saved_state(workdir)
    return step, jax.tree.map(np.asarray, state["params"])


def logged_scalars(workdir, tag):
    """{step: value} of a scalar the run wrote to its TensorBoard events."""
    import tensorflow as tf

    values = {}
    for path in pathlib.Path(workdir).glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return values


def test_smoke_trains_end_to_end(mnist_config, tmp_path):
    config = mnist_config("mode=pivot,perturb=noise,smoke")
    accuracy = train.train_and_evaluate(config, str(tmp_path)).accuracy
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["step"] == config.num_train_steps
    assert set(results["accuracy"]) == set(config.evals) == set(accuracy)
    assert all(n == config.data.test_examples for n in results["num_examples"].values())
    assert all(0.0 <= a <= 1.0 for a in accuracy.values())
    assert checkpoint.manager(tmp_path, read_only=True).all_steps() == [6, 12]  # every 6, keep 2
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["loss"]["mode"] == "pivot" and saved["perturb"]["k"] == 8
    for tag in ("l_org", "l_perturb", "l_dist", "loss", "accuracy_clean", "accuracy_perturbed", "learning_rate"):
        # every 4 steps, and at each checkpoint (every 6), where pending metrics are checked first
        assert sorted(logged_scalars(tmp_path, f"train/{tag}")) == [4, 6, 8, 12], tag
    assert set(logged_scalars(tmp_path, "eval/noise_0.15")) == {12}
    assert logged_scalars(tmp_path, "train/learning_rate")[4] == pytest.approx(0.1)


@pytest.mark.parametrize("mode,perturb", [("clean", "noise"), ("perturbed", "lr"), ("mixed", "mr"),
                                          ("pivot", "lr+mr")])
def test_every_mode_trains(mnist_config, tmp_path, mode, perturb):
    config = mnist_config(f"mode={mode},perturb={perturb},smoke")
    config.num_train_steps = config.checkpoint_every_steps = config.eval_every_steps = 4
    train.train_and_evaluate(config, str(tmp_path))
    has_clean, has_perturbed = logged_scalars(tmp_path, "train/accuracy_clean"), logged_scalars(
        tmp_path, "train/accuracy_perturbed")
    assert bool(has_clean) == (mode != "perturbed")
    assert bool(has_perturbed) == (mode != "clean")
    assert bool(logged_scalars(tmp_path, "train/l_dist")) == (mode == "pivot")


def test_cifar10_jpeg_folder_smoke(cifar_folder, config_path, tmp_path):
    """configs/cifar10.py on the CIFAR-10 JPEG copy as an image folder: pad-crop-flip, pixel mean."""
    config = config_lib.load_config(config_path("cifar10") + ":mode=pivot,perturb=lr+mr,smoke")
    config.data.name, config.data.folder = "folder", cifar_folder
    config.num_train_steps = config.checkpoint_every_steps = config.eval_every_steps = 4
    accuracy = train.train_and_evaluate(config, str(tmp_path)).accuracy
    assert set(accuracy) == set(config.evals)
    _, state = checkpoint.saved_state(tmp_path)
    mean = np.asarray(state["input_mean"])
    assert mean.shape == (32, 32, 3)
    # CIFAR-10's well-known channel means (0.491, 0.482, 0.447); this JPEG copy is within 0.01.
    np.testing.assert_allclose(mean.mean((0, 1)), [0.491, 0.482, 0.447], atol=0.01)

    # predict on a few of the test JPEGs gives the classes the model gives them, by their folder names.
    from pivot_jax import models, predict

    files = sorted(pathlib.Path(cifar_folder, "test").glob("*/*.jpg"))[::1000][:8]
    images = np.stack([predict.prepare_image(str(f), config.data).pixels for f in files])
    probabilities, step = predict.predict_probabilities(config, str(tmp_path), images)
    model = models.get_model(config.model.name, num_classes=10)
    logits = model.apply({"params": state["params"], "batch_stats": state["batch_stats"]},
                         images.astype(np.float32) / 255.0 - mean, train=False)
    assert step == 4
    np.testing.assert_array_equal(np.argmax(probabilities, -1), np.argmax(np.asarray(logits), -1))
    names = predict.class_names(str(tmp_path), 10)
    assert names == tuple(sorted(p.name for p in pathlib.Path(cifar_folder, "train").iterdir()))
    assert [r[0]["class"] for r in predict.rankings(probabilities, names, 1)] == [
        names[i] for i in np.argmax(np.asarray(logits), -1)]


def _resume_args(workdir, mnist_data_dir):
    return [f"--config={CONFIGS / 'mnist.py'}:mode=pivot,perturb=noise,smoke", f"--workdir={workdir}",
            "--config.num_train_steps=30", "--config.checkpoint_every_steps=5", "--config.log_every_steps=5",
            "--config.eval_every_steps=30", f"--config.data.data_dir={mnist_data_dir}"]


@pytest.fixture(scope="module")
def uninterrupted_30(mnist_data_dir, tmp_path_factory):
    """A 30-step smoke run never interrupted: the reference of the resume test, and a pre-trained model."""
    whole = tmp_path_factory.mktemp("uninterrupted") / "whole"
    done = run_train(_resume_args(whole, mnist_data_dir), ONE_DEVICE, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return whole


def test_sigkill_then_resume_equals_uninterrupted_run(mnist_data_dir, uninterrupted_30, tmp_path):
    """Bit-exact: the resumed run restores the state, the data position and the step, and runs the
    same compiled step on the same inputs, and XLA on the CPU is deterministic for a fixed program."""
    whole, killed = uninterrupted_30, tmp_path / "killed"

    env = {**os.environ, **ONE_DEVICE}
    process = subprocess.Popen([sys.executable, "-m", "pivot_jax.train", *_resume_args(killed, mnist_data_dir)],
                               env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "15").is_dir() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted_at = checkpoint.manager(killed, read_only=True).latest_step()
    assert interrupted_at is not None and 15 <= interrupted_at < 30

    resumed = run_train(_resume_args(killed, mnist_data_dir), ONE_DEVICE, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from step {interrupted_at}" in resumed.stderr
    if onednn.available():  # the default on the CPU: the oneDNN path resumes bit-exact too
        assert "Convolutions: onednn" in resumed.stderr
    step_a, params_a = saved_params(whole)
    step_b, params_b = saved_params(killed)
    assert step_a == step_b == 30
    jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
    assert json.loads((whole / "eval/results.json").read_text()) == json.loads((killed / "eval/results.json").read_text())


def test_sigterm_saves_a_checkpoint_and_stops(mnist_data_dir, tmp_path):
    args = [*_resume_args(tmp_path, mnist_data_dir), "--config.num_train_steps=400",
            "--config.checkpoint_every_steps=1000", "--config.log_every_steps=1", "--config.eval_every_steps=1000"]
    env = {**os.environ, **ONE_DEVICE}
    process = subprocess.Popen([sys.executable, "-m", "pivot_jax.train", *args], env=env, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not list(tmp_path.glob("events.out.tfevents.*")) and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(3)  # a few steps into training
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-3000:]
    stopped = checkpoint.manager(tmp_path, read_only=True).latest_step()
    assert stopped is not None and 0 < stopped < 400  # saved where it stopped, not at a scheduled step
    assert f"Stopped at step {stopped} for preemption" in stderr


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error before compute, nothing the user had overwritten.


def test_unknown_data_set(mnist_config, tmp_path):
    config = mnist_config()
    config.data.name = "no_such_data_set"
    with pytest.raises(data.DataError, match="config.data.name: 'no_such_data_set'"):
        train.train_and_evaluate(config, str(tmp_path))


def test_data_not_prepared_says_how_to_prepare_offline(mnist_config, tmp_path):
    config = mnist_config()
    config.data.data_dir = str(tmp_path / "empty")
    with pytest.raises(data.DataError) as error:
        train.train_and_evaluate(config, str(tmp_path / "work"))
    message = str(error.value)
    assert "not prepared" in message and str(tmp_path / "empty" / "downloads" / "manual") in message


def test_no_network_is_detected_quickly():
    start = time.time()
    assert not tfds_prepare.network_reachable("127.0.0.1", 9, timeout=5)  # nothing listens on port 9
    assert time.time() - start < 5


def test_unwritable_workdir(mnist_config, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    with pytest.raises(train.TrainingError, match="workdir: cannot write"):
        train.train_and_evaluate(mnist_config(), str(blocker / "run"))
    assert blocker.read_text() == "keep me"


def test_cli_reports_errors_without_traceback(mnist_data_dir, tmp_path):
    result = run_train([f"--config={CONFIGS / 'mnist.py'}:smoke", f"--workdir={tmp_path}",
                        "--config.data.name=no_such_data_set", f"--config.data.data_dir={mnist_data_dir}"],
                       timeout=120)
    assert result.returncode == 1
    assert "error: config.data.name: 'no_such_data_set'" in result.stderr
    assert "Traceback" not in result.stderr


def test_incompatible_resume_is_refused_and_nothing_is_overwritten(mnist_config, tmp_path):
    train.train_and_evaluate(mnist_config(), str(tmp_path))
    saved_config = (tmp_path / "config.json").read_text()
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").iterdir()}

    changed = mnist_config()
    changed.loss.lam = 0.5
    changed.num_train_steps = 24
    with pytest.raises(train.TrainingError) as error:
        train.train_and_evaluate(changed, str(tmp_path))
    assert "loss.lam: 0.3 -> 0.5" in str(error.value) and "num_train_steps" in str(error.value)
    assert "allow_config_change" in str(error.value)
    assert (tmp_path / "config.json").read_text() == saved_config
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").iterdir()} == before

    # Fields that do not change the experiment may differ.
    harmless = mnist_config()
    harmless.log_every_steps = 3
    harmless.data.eval_batch_size = 64
    workdirs.check(pathlib.Path(tmp_path), harmless)


def test_non_finite_loss_stops_and_keeps_the_good_checkpoint(mnist_config, tmp_path):
    train.train_and_evaluate(mnist_config(), str(tmp_path))
    good_step, good_params = saved_params(tmp_path)

    diverging = mnist_config()
    diverging.num_train_steps = 24
    diverging.optim.learning_rate = 1e30
    diverging.allow_config_change = True
    with pytest.raises(train.TrainingError, match="non-finite loss"):
        train.train_and_evaluate(diverging, str(tmp_path))
    step, params = saved_params(tmp_path)
    assert step == good_step == 12
    jax.tree.map(np.testing.assert_array_equal, params, good_params)
    assert (tmp_path / "config.before_step_12.json").exists()  # the run's earlier config is kept


def test_init_from_starts_from_another_runs_model(mnist_config, uninterrupted_30, tmp_path):
    """Fine-tuning (the ImageNet recipe): a fresh run initialised from another run's latest model."""
    _, pretrained = saved_params(uninterrupted_30)
    finetune = mnist_config("mode=mixed,perturb=lr,smoke")
    finetune.init_from = str(uninterrupted_30)
    finetune.num_train_steps = finetune.checkpoint_every_steps = finetune.eval_every_steps = 2
    finetune.optim.learning_rate = 1e-12  # two steps that cannot move the weights measurably
    train.train_and_evaluate(finetune, str(tmp_path / "finetuned"))
    step, finetuned = saved_params(tmp_path / "finetuned")
    assert step == 2
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), finetuned, pretrained)
