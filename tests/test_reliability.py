"""Faults a user meets, each reproduced: damaged checkpoints, two writers, a full disk, bad images,
stale results, folders whose classes do not match. Every one ends in a clear error or a recovery,
and nothing the user had is lost. Synthetic data only, so these run on any machine."""

import json
import os
import re
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import CONFIGS, REPO, run_train, synthetic_config_maker
from pivot_jax import checkpoint, data, evaluate, results, train, workdirs
from pivot_jax.errors import CheckpointError, ConfigError, DataError, TrainingError


def short_run(config, steps=12):
    config.num_train_steps = steps
    config.checkpoint_every_steps = 6
    config.eval_every_steps = 100
    config.log_every_steps = 3
    return config


@pytest.fixture(scope="module")
def trained_once(synthetic_folder, tmp_path_factory):
    """A finished 12-step run, with checkpoints at steps 6 and 12 (tests damage copies of it)."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    train.train_and_evaluate(short_run(synthetic_config_maker(synthetic_folder)()), str(workdir))
    return workdir


@pytest.fixture
def trained(trained_once, tmp_path):
    """This test's own copy of the finished 12-step run."""
    return pathlib.Path(shutil.copytree(trained_once, tmp_path / "run"))


def params_at(workdir, step):
    _, state = checkpoint.saved_state(workdir, step)
    return jax.tree.map(np.asarray, state["params"])


def largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
    """The biggest data file of the saved state (OCDBT keeps array data in `.../d/<hash>`)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints.


def constant_lr(make_config, steps):
    """A short run with the same learning rate at every step, whatever num_train_steps is."""
    config = short_run(make_config(), steps=steps)
    config.optim.lr_boundaries = ()
    return config


@pytest.fixture(scope="module")
def uninterrupted_18(synthetic_folder, tmp_path_factory):
    """The parameters after 18 steps of a run that was never interrupted."""
    whole = tmp_path_factory.mktemp("whole")
    train.train_and_evaluate(constant_lr(synthetic_config_maker(synthetic_folder), 18), str(whole))
    return params_at(whole, 18)


@pytest.fixture(scope="module")
def constant_12(synthetic_folder, tmp_path_factory):
    """The same run stopped after 12 steps (checkpoints at 6 and 12); tests damage copies of it."""
    workdir = tmp_path_factory.mktemp("constant_12") / "run"
    train.train_and_evaluate(constant_lr(synthetic_config_maker(synthetic_folder), 12), str(workdir))
    return workdir


@pytest.mark.parametrize("damage", ["flipped bytes", "truncated file", "emptied step", "deleted iterator"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(synthetic_config, uninterrupted_18, constant_12,
                                                            tmp_path, damage):
    workdir = pathlib.Path(shutil.copytree(constant_12, tmp_path / "run"))  # checkpoints at 6 and 12
    step_dir = workdir / "checkpoints" / "12"
    if damage == "flipped bytes":
        target = largest_array_file(step_dir)
        raw = bytearray(target.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        target.write_bytes(bytes(raw))
    elif damage == "truncated file":
        target = largest_array_file(step_dir)
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 3])
    elif damage == "emptied step":
        for child in step_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    else:
        (step_dir / "data" / "process_0-of-1.json").unlink()

    # Evaluation uses step 6 and says why.
    config = short_run(synthetic_config())
    config.evals, config.sweep_evals = ("clean",), ()
    result = evaluate.evaluate_checkpoint(config, str(workdir))
    assert result["step"] == 6

    # Training resumes from step 6 and ends where an uninterrupted run ends; the damaged step is kept.
    resumed = constant_lr(synthetic_config, 18)
    resumed.allow_config_change = True  # num_train_steps 12 -> 18
    train.train_and_evaluate(resumed, str(workdir))
    assert (workdir / "damaged_checkpoints" / "12").is_dir()
    jax.tree.map(np.testing.assert_array_equal, params_at(workdir, 18), uninterrupted_18)


def test_flipped_bytes_are_detected_even_when_orbax_reads_them(trained):
    workdir = trained
    assert checkpoint.verify(workdir, 12) is None
    target = largest_array_file(workdir / "checkpoints" / "12")
    raw = bytearray(target.read_bytes())
    raw[100] ^= 0x01
    target.write_bytes(bytes(raw))
    assert "does not match its checksum" in checkpoint.verify(workdir, 12)


def flip_a_byte(step_dir: pathlib.Path) -> None:
    target = largest_array_file(step_dir)
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))


@pytest.mark.slow
def test_a_checkpoint_has_its_checksums_the_moment_it_exists(synthetic_folder, synthetic_config, tmp_path):
    """SIGKILL right after a save commits (the usual bad end of a run), then bytes flipped in that
    step: the resumed run finds the damage instead of training on it."""
    args = [f"--config={CONFIGS / 'mnist.py'}:smoke", f"--workdir={tmp_path}", "--config.data.name=folder",
            f"--config.data.folder={synthetic_folder}", "--config.data.num_classes=4",
            "--config.num_train_steps=100000", "--config.checkpoint_every_steps=4",
            "--config.eval_every_steps=100000", "--config.optim.lr_boundaries=()"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    running = subprocess.Popen([sys.executable, "-m", "pivot_jax.train", *args], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (tmp_path / "checkpoints" / "8").exists() and time.time() < deadline:
            time.sleep(0.01)
        running.send_signal(signal.SIGKILL)
        running.wait()
    finally:
        if running.poll() is None:
            running.kill()
    steps = checkpoint.manager(tmp_path, read_only=True).all_steps()
    assert 8 in steps
    for step in steps:  # every listed step, the newest included, has its checksums and matches them
        assert checkpoint.has_checksums(tmp_path, step) and checkpoint.verify(tmp_path, step) is None
    newest = max(steps)
    flip_a_byte(tmp_path / "checkpoints" / str(newest))
    config = short_run(synthetic_config(), steps=newest + 2)
    config.checkpoint_every_steps, config.optim.lr_boundaries = 4, ()
    config.allow_config_change = True  # num_train_steps
    assert train.train_and_evaluate(config, str(tmp_path)).step == newest + 2
    assert (tmp_path / "damaged_checkpoints" / str(newest)).is_dir()


def test_a_step_damaged_again_keeps_every_damaged_copy(synthetic_config, trained):
    workdir = trained  # checkpoints at 6 and 12
    config = short_run(synthetic_config())
    for copy in ("12", "12.1", "12.2"):
        flip_a_byte(workdir / "checkpoints" / "12")
        assert train.train_and_evaluate(config, str(workdir)).step == 12  # resumed from 6, saved 12 again
        assert (workdir / "damaged_checkpoints" / copy).is_dir()
        assert (workdir / "damaged_checkpoints" / f"{copy}.checksums.json").is_file()
    assert checkpoint.verify(workdir, 12) is None
    assert sorted(p.name for p in (workdir / "damaged_checkpoints").iterdir() if p.is_dir()) == ["12", "12.1", "12.2"]


def test_a_step_without_checksums_is_restored_only_if_finite(synthetic_config, trained, caplog):
    """A checkpoint saved before checksums were part of the commit: restored with a warning, unless
    a value is not finite, in which case the older step is used."""
    workdir = trained
    config = short_run(synthetic_config())
    config.evals, config.sweep_evals = ("clean",), ()
    (workdir / "checkpoint_checksums" / "12.json").unlink()
    assert evaluate.evaluate_checkpoint(config, str(workdir))["step"] == 12
    assert "step 12 of" in caplog.text and "has no checksums" in caplog.text
    # A NaN written into step 12 (its size unchanged): now step 6 is used.
    _, state = checkpoint.saved_state(workdir, 12)
    state["params"] = jax.tree.map(lambda x: np.full_like(x, np.nan), state["params"])
    shutil.rmtree(workdir / "checkpoints" / "12")
    mngr = checkpoint.manager(workdir)
    mngr.save(12, args=checkpoint.ocp.args.Composite(state=checkpoint.ocp.args.StandardSave(state)))
    mngr.wait_until_finished()
    mngr.close()
    (workdir / "checkpoint_checksums" / "12.json").unlink()
    assert evaluate.evaluate_checkpoint(config, str(workdir))["step"] == 6


def test_no_intact_checkpoint_is_one_clear_error_and_nothing_is_moved(synthetic_config, trained):
    workdir = trained
    for step in (6, 12):
        (workdir / "checkpoints" / str(step) / "data" / "process_0-of-1.json").unlink()
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be restored \(step 12: .*; step 6: "):
        train.train_and_evaluate(short_run(synthetic_config()), str(workdir))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["12", "6"]
    assert not (workdir / "damaged_checkpoints").exists()


def test_a_damaged_checkpoint_in_the_cli_is_one_line(synthetic_folder, trained, tmp_path):
    workdir = trained
    target = largest_array_file(workdir / "checkpoints" / "12")
    target.write_bytes(target.read_bytes()[:10])
    args = [f"--config={CONFIGS / 'mnist.py'}:smoke", f"--workdir={workdir}", "--config.data.name=folder",
            f"--config.data.folder={synthetic_folder}", "--config.data.num_classes=4",
            "--config.num_train_steps=12", "--config.checkpoint_every_steps=6", "--config.eval_every_steps=100",
            "--config.log_every_steps=3"]
    # The finished run is evaluated again: the damaged step 12 is skipped for step 6.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    evaluated = subprocess.run([sys.executable, "-m", "pivot_jax.evaluate", *args], env=env, cwd=REPO,
                               capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "The checkpoint at step 12 is damaged" in evaluated.stderr
    assert "Traceback" not in evaluated.stderr
    assert json.loads((workdir / "eval" / "step_6" / "results.json").read_text())["step"] == 6


# ---------------------------------------------------------------------------------------------
# Workdir files that are damaged or hand-edited.


def edit_config(workdir: pathlib.Path, edit) -> None:
    saved = json.loads((workdir / "config.json").read_text())
    edit(saved)
    (workdir / "config.json").write_text(json.dumps(saved))


@pytest.mark.parametrize("edit, message", [
    (lambda c: (c["model"].pop("name"), c["data"].pop("image_size")),
     r"config.json: missing fields data.image_size, model.name \(a run saves every field\)"),
    (lambda c: c.update(frobnicate=1), r"config.json: unknown field frobnicate; restore it"),
    (lambda c: c["model"].update(dtyp="float32"), r"unknown field model.dtyp \(did you mean model.dtype\?\)"),
    (lambda c: c.clear() or c.update(model=[]), "config.json: missing fields"),
])
def test_a_hand_edited_config_json_names_the_field(trained, edit, message):
    edit_config(trained, edit)
    with pytest.raises(ConfigError, match=message):
        workdirs.saved_config(trained)


def test_damaged_workdir_files_are_one_clear_error(synthetic_config, trained):
    (trained / "classes.json").write_text('{"a": 1}')
    with pytest.raises(ConfigError, match=r"classes.json: expected a JSON list, got dict"):
        workdirs.saved_class_names(trained)
    (trained / "eval" / "results.json").write_text("[1, 2")
    with pytest.raises(ConfigError, match=r"results.json is not valid JSON \(.*\); move it away to evaluate again"):
        results.read_results(trained / "eval")
    (trained / "config.json").write_text('{"model": ')
    with pytest.raises(ConfigError, match=r"config.json is not valid JSON \(.*\); restore it from a copy"):
        workdirs.check(trained, synthetic_config())


@pytest.mark.slow
@pytest.mark.parametrize("module", ["train", "evaluate"])
def test_a_damaged_config_json_on_the_command_line_is_one_line(synthetic_folder, trained, module):
    args = [f"--workdir={trained}"]
    if module == "train":
        (trained / "config.json").write_text('{"model": ')
        args += [f"--config={CONFIGS / 'mnist.py'}:smoke", "--config.data.name=folder",
                 f"--config.data.folder={synthetic_folder}", "--config.data.num_classes=4"]
        expected = "config.json is not valid JSON"
    else:  # the run's own config, from its workdir
        edit_config(trained, lambda c: (c["model"].pop("name"), c.update(frobnicate=1)))
        expected = "config.json: missing field model.name"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    done = subprocess.run([sys.executable, "-m", f"pivot_jax.{module}", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, done.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Two writers.


@pytest.mark.slow
def test_a_second_training_on_a_busy_workdir_is_refused(synthetic_folder, synthetic_config, tmp_path):
    args = [f"--config={CONFIGS / 'mnist.py'}:smoke", f"--workdir={tmp_path}", "--config.data.name=folder",
            f"--config.data.folder={synthetic_folder}", "--config.data.num_classes=4",
            "--config.num_train_steps=100000", "--config.checkpoint_every_steps=100000",
            "--config.eval_every_steps=100000"]
    first = subprocess.Popen([sys.executable, "-m", "pivot_jax.train", *args], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not list(tmp_path.glob("events.out.tfevents.*")) and time.time() < deadline:
            time.sleep(0.2)
        second = run_train(args, timeout=300)
        assert second.returncode == 1
        assert f"is in use by another training run (process {first.pid} on" in second.stderr
        assert "Traceback" not in second.stderr
        first.send_signal(signal.SIGKILL)  # a killed holder leaves no stuck lock
        first.wait()
        config = short_run(synthetic_config(), steps=100000)
        config.num_train_steps, config.allow_config_change = 2, True
        assert train.train_and_evaluate(config, str(tmp_path)).step == 2
    finally:
        if first.poll() is None:
            first.kill()


def test_a_lease_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path):
    """The lock used where flock does not exist (gs://): a lease the holder keeps refreshing."""
    holder = workdirs.WorkdirLock(tmp_path, lease=True, refresh_seconds=0.05, expiry_seconds=2).acquire()
    with pytest.raises(TrainingError, match=f"in use by another training run \\(process {os.getpid()}"):
        workdirs.WorkdirLock(tmp_path, lease=True, refresh_seconds=0.05).acquire()
    holder.release()
    assert not (tmp_path / ".lock").exists()
    stale = {"host": "gone", "pid": 1, "token": "old", "since": "then", "heartbeat": time.time() - 3600}
    (tmp_path / ".lock").write_text(json.dumps(stale))
    lock = workdirs.WorkdirLock(tmp_path, lease=True, refresh_seconds=0.05).acquire()
    time.sleep(0.2)
    assert json.loads((tmp_path / ".lock").read_text())["heartbeat"] > time.time() - 1  # kept fresh
    lock.release()


# ---------------------------------------------------------------------------------------------
# A full disk.


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        message = f"cannot mount a small tmpfs here ({done.stderr.decode().strip()[:200]}); needs root"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_run_resumes_once_there_is_space(synthetic_folder, tiny_disk, tmp_path):
    workdir = tiny_disk / "run"
    args = [f"--config={CONFIGS / 'mnist.py'}:mode=pivot,perturb=noise,smoke", f"--workdir={workdir}",
            "--config.data.name=folder", f"--config.data.folder={synthetic_folder}", "--config.data.num_classes=4",
            "--config.num_train_steps=40", "--config.checkpoint_every_steps=5", "--config.eval_every_steps=1000",
            "--config.keep_checkpoints=100", "--config.model.name=resnet20"]
    full = run_train(args, timeout=300)
    assert full.returncode == 1
    lines = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "is full (no space left on device)" in lines[0], full.stderr[-3000:]
    assert str(workdir / "checkpoints") in lines[0]
    assert "Traceback" not in full.stderr, full.stderr[-5000:]
    kept = checkpoint.manager(workdir, read_only=True).latest_step()
    assert kept is not None and kept < 40

    # Room again: move the run to a roomy disk and resume it.
    roomy = tmp_path / "roomy"
    shutil.copytree(workdir, roomy)
    args = [a.replace(f"--workdir={workdir}", f"--workdir={roomy}") for a in args]
    resumed = run_train(args, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from step {kept}" in resumed.stderr


# ---------------------------------------------------------------------------------------------
# Data.


def make_folder(root: pathlib.Path, splits: dict[str, list[str]], size=28, per_class=2):
    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                image = rng.integers(0, 255, (size, size), dtype=np.uint8)
                Image.fromarray(image).save(root / split / name / f"{index}.png")
    return root


def folder_config(synthetic_config, root):
    config = synthetic_config()
    config.data.folder = str(root)
    return config


@pytest.mark.parametrize("test_classes,message", [
    (["a", "b"], "missing ['c']"),
    (["a", "b", "c", "d"], "not in training ['d']"),
])
def test_test_classes_that_differ_from_training_are_an_error(synthetic_config, tmp_path, test_classes, message):
    root = make_folder(tmp_path / "data", {"train": ["a", "b", "c"], "test": test_classes})
    config = folder_config(synthetic_config, root)
    config.data.num_classes = 3
    with pytest.raises(DataError, match=re.escape(message)):
        train.train_and_evaluate(config, str(tmp_path / "run"))


def test_hidden_folders_are_ignored_and_labels_follow_training(synthetic_config, tmp_path):
    root = make_folder(tmp_path / "data", {"train": ["a", "b", "c"], "test": ["a", "b", "c"]})
    (root / "test" / ".ipynb_checkpoints").mkdir()
    (root / "train" / ".cache").mkdir()
    config = folder_config(synthetic_config, root)
    split = data.open_split(config.data, "test")
    assert split.class_names == ("a", "b", "c")
    assert split.source.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_an_empty_class_folder_is_an_error(synthetic_config, tmp_path):
    root = make_folder(tmp_path / "data", {"train": ["a", "b"], "test": ["a", "b"]})
    (root / "train" / "c").mkdir()
    with pytest.raises(DataError, match=r"the class folder .*train/c has no images"):
        data.open_split(folder_config(synthetic_config, root).data, "train")


@pytest.mark.slow
def test_the_saved_class_list_is_what_evaluation_uses(synthetic_config, tmp_path):
    workdir = tmp_path / "run"
    train.train_and_evaluate(short_run(synthetic_config()), str(workdir))
    assert workdirs.saved_class_names(workdir) == tuple(f"class_{i}" for i in range(4))
    (workdir / "classes.json").write_text(json.dumps(["class_0", "class_1", "class_2", "other"]))
    config = short_run(synthetic_config())
    config.evals, config.sweep_evals = ("clean",), ()
    with pytest.raises(DataError, match=r"missing \['other'\]; not in training \['class_3'\]"):
        evaluate.evaluate_checkpoint(config, str(workdir))


@pytest.mark.parametrize("content,expected", [
    (b"", "cannot identify image file"),
    (b"not an image at all", "cannot identify image file"),
    ("truncated", "truncated"),
])
def test_a_bad_image_file_is_named(synthetic_config, tmp_path, content, expected):
    root = make_folder(tmp_path / "data", {"train": ["a", "b"], "test": ["a", "b"]})
    bad = root / "train" / "b" / "bad.png"
    if content == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)).save(bad)
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    else:
        bad.write_bytes(content)
    with pytest.raises(DataError, match=f"cannot read the image {re.escape(str(bad))}: .*{expected}"):
        data.open_split(folder_config(synthetic_config, root).data, "train")


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_images_are_scaled_to_8_bits_not_clipped(channels):
    import cv2

    rng = np.random.default_rng(0)
    grey = rng.integers(20, 100, (16, 16), dtype=np.uint8)  # mean about 60: clipping would make it 255
    colour = np.stack([grey, grey // 2, grey // 3], -1)
    expected = {1: grey[..., None], 3: np.repeat(grey[..., None], 3, -1)}[channels]
    encoded = {}
    for name, image in {"grey": grey, "colour": colour}.items():
        ok, png = cv2.imencode(".png", (image.astype(np.uint16) * 257)[..., ::-1] if image.ndim == 3
                               else image.astype(np.uint16) * 257)
        assert ok
        encoded[name] = png.tobytes()
    np.testing.assert_array_equal(data.sources.decode_image(encoded["grey"], channels), expected)
    decoded_colour = data.sources.decode_image(encoded["colour"], 3)
    np.testing.assert_array_equal(decoded_colour, colour)
    if channels == 3:  # ImageNet-style training decodes with OpenCV
        np.testing.assert_array_equal(data.sources.decode_reduced(encoded["colour"], 3, 1, "colour.png"), colour)


def test_an_image_of_another_size_is_named(synthetic_config, tmp_path):
    root = make_folder(tmp_path / "data", {"train": ["a", "b"], "test": ["a", "b"]})
    Image.fromarray(np.zeros((30, 28), np.uint8)).save(root / "train" / "a" / "odd.png")
    with pytest.raises(DataError, match=r"train/a/odd.png has shape \(30, 28, 1\)"):
        data.open_split(folder_config(synthetic_config, root).data, "train")


def test_a_malformed_first_box_row_is_an_error_not_a_header(tmp_path):
    from pivot_jax.data import boxes

    path = tmp_path / "boxes.csv"
    path.write_text("a/0.png,0.1,0.2,zero,0.4\na/1.png,0.1,0.2,0.3,0.4\n")
    with pytest.raises(DataError, match="line 1"):
        boxes.read_box_file(str(path))
    path.write_text("id,ymin,xmin,ymax,xmax\na/1.png,0.1,0.2,0.3,0.4\n")
    assert list(boxes.read_box_file(str(path))) == ["a/1.png"]


# ---------------------------------------------------------------------------------------------
# Results.


def test_results_of_an_older_step_never_replace_newer_ones(tmp_path):
    eval_dir = tmp_path / "eval"
    results.write_results(eval_dir, 300, {"clean": 0.9}, 10, "default")
    out_dir, _ = results.write_results(eval_dir, 200, {"clean": 0.5}, 10, "default")
    assert json.loads((eval_dir / "results.json").read_text())["step"] == 300
    assert "at step 300" in (eval_dir / "results.md").read_text()
    assert out_dir == eval_dir / "step_200"
    assert json.loads((out_dir / "results.json").read_text())["accuracy"] == {"clean": 0.5}
    results.write_results(eval_dir, 400, {"clean": 0.95}, 10, "default")
    assert json.loads((eval_dir / "results.json").read_text())["step"] == 400
    assert not [p for p in eval_dir.iterdir() if ".tmp" in p.name]  # no temporary file left


@pytest.mark.slow
def test_the_non_finite_stop_says_when_no_checkpoint_exists(synthetic_config, tmp_path):
    config = short_run(synthetic_config())
    config.optim.learning_rate = 1e30
    config.log_every_steps = 1
    with pytest.raises(TrainingError, match="no checkpoint had been saved yet") as error:
        train.train_and_evaluate(config, str(tmp_path))
    assert "kept in" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# Flags, configs and the network.


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.parametrize("flags,expected", [
    (["--config.optim.learnin_rate=0.1"], 'error: --config: \'learnin_rate\' Did you mean "learning_rate"'),
    (["--config.perturb.max_sigma=1e9"], "error: config.perturb.max_sigma: got 1000000000.0, expected >= 0 and <= 2.0"),
    ("mode", "error: config argument mode: got 'pivt', expected one of"),
    ("missing", "error: --config: Configuration is not available"),
    ("no get_config", "error: --config: {tmp_path}/settings.py defines no get_config(arg=None)"),
])
def test_bad_flags_and_configs_are_one_line(tmp_path, flags, expected):
    (tmp_path / "settings.py").write_text("learning_rate = 0.1\n")
    expected = expected.format(tmp_path=tmp_path)
    special = {"mode": f"{CONFIGS / 'mnist.py'}:mode=pivt", "missing": str(tmp_path / "nope.py"),
               "no get_config": f"{tmp_path / 'settings.py'}:smoke"}
    config = special[flags] if isinstance(flags, str) else f"{CONFIGS / 'mnist.py'}:smoke"
    args = [f"--config={config}", f"--workdir={tmp_path / 'run'}", *([] if isinstance(flags, str) else flags)]
    result = run_train(args, timeout=120)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(expected), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing was created


def test_the_download_probe_targets_the_data_sets_host_or_the_proxy(monkeypatch):
    from pivot_jax.data import tfds_prepare

    urls = ["https://storage.googleapis.com/cvdf-datasets/mnist/train-images-idx3-ubyte.gz"]
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert tfds_prepare.download_endpoint(urls) == ("storage.googleapis.com", 443)
    assert tfds_prepare.download_endpoint(["http://example.org:8080/a"]) == ("example.org", 8080)
    monkeypatch.setenv("https_proxy", "http://proxy.internal:3128")
    assert tfds_prepare.download_endpoint(urls) == ("proxy.internal", 3128)
    monkeypatch.setenv("no_proxy", "storage.googleapis.com")
    assert tfds_prepare.download_endpoint(urls) == ("storage.googleapis.com", 443)
    assert tfds_prepare.download_endpoint([]) is None
