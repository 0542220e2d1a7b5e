"""A trained model: evaluation from its workdir alone, classifying image files, the export for edge
devices and publishing. They use the committed MNIST model (`published_mnist_run`), restored as a user
restores it, and a smoke run where a whole training state is needed."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import CONFIGS, REPO
from pivot_jax import checkpoint, config_lib, data, evaluate, export, models, predict, workdirs
from pivot_jax.errors import CheckpointError, ConfigError, DataError


# A published run (final weights and batch statistics, no optimizer state) of the paper's MNIST noise
# setting: 9,000 steps, 99% clean accuracy.
PUBLISHED_RUN = REPO / "docs" / "results" / "mnist_9000" / "noise_pivot_symmetric_lam2_5e-5_seed0"
TRAINED_STEPS = 9000


@pytest.fixture(scope="module")
def published_mnist_run(mnist_data_dir, tmp_path_factory):
    """A copy of the published MNIST model whose saved config reads the prepared MNIST, evaluates on
    1,000 test images and sweeps two conditions. Returns (workdir, config, published results)."""
    workdir = tmp_path_factory.mktemp("mnist_trained") / PUBLISHED_RUN.name
    shutil.copytree(PUBLISHED_RUN, workdir, ignore=shutil.ignore_patterns("eval"))
    saved = json.loads((workdir / "config.json").read_text())
    saved["data"].update(data_dir=mnist_data_dir, download=False, test_examples=1000)
    saved["sweep_evals"] = ["noise_0.1", "lr2_nearest"]
    (workdir / "config.json").write_text(json.dumps(saved, indent=2))
    published = json.loads((PUBLISHED_RUN / "eval" / "results.json").read_text())
    return str(workdir), workdirs.saved_config(workdir), published


@pytest.fixture(scope="module")
def smoke_run(mnist_data_dir, tmp_path_factory):
    """A whole training state (optimizer included) of a seconds-long MNIST run, for `publish`."""
    from pivot_jax import train

    config = config_lib.load_config(f"{CONFIGS / 'mnist.py'}:mode=pivot,perturb=noise,smoke")
    config.data.data_dir, config.data.download, config.sweep_evals = mnist_data_dir, False, ()
    workdir = tmp_path_factory.mktemp("mnist_smoke")
    return str(workdir), config, train.train_and_evaluate(config, str(workdir))


def run_module(module, *args):
    return subprocess.run([sys.executable, "-m", f"pivot_jax.{module}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def direct_logits(workdir, config, images_uint8):
    """The checkpoint's logits computed here from its saved arrays, independently of predict/export."""
    _, state = checkpoint.saved_state(workdir)
    model = models.get_model(config.model.name, num_classes=config.data.num_classes)
    inputs = images_uint8.astype(np.float32) / 255.0 - np.asarray(state["input_mean"])
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    return np.asarray(model.apply(variables, jnp.asarray(inputs), train=False))


@pytest.fixture(scope="module")
def test_images(published_mnist_run):
    _, config, _ = published_mnist_run
    split = data.open_split(config.data, "test")
    return split.source.images[:256], split.source.labels[:256]


def test_evaluate_from_the_workdir_alone_reproduces_the_config(published_mnist_run):
    workdir, config, published = published_mnist_run
    with_config = evaluate.evaluate_checkpoint(config, workdir)
    from_workdir = run_module("evaluate", f"--workdir={workdir}")
    assert from_workdir.returncode == 0, from_workdir.stderr[-3000:]
    saved = json.loads(open(os.path.join(workdir, "eval", "results.json")).read())
    assert saved["step"] == with_config["step"] == TRAINED_STEPS
    assert saved["accuracy"] == pytest.approx(with_config["accuracy"], abs=1e-9)
    assert set(saved["accuracy"]) == set(config.evals) | {"noise_0.1", "lr2_nearest"}
    # On the first 1,000 test images, within 1.5 points of what it published on all 10,000.
    assert abs(saved["accuracy"]["clean"] - published["accuracy"]["clean"]) < 0.015, saved["accuracy"]
    # Overrides still apply to the saved config.
    overridden = run_module("evaluate", f"--workdir={workdir}", "--config.evals=('lr4_nearest',)",
                            "--config.sweep_evals=()", "--config.data.test_examples=100")
    assert overridden.returncode == 0, overridden.stderr[-3000:]
    saved = json.loads(open(os.path.join(workdir, "eval", "results.json")).read())
    assert set(saved["accuracy"]) == {"lr4_nearest"} and saved["num_examples"] == {"lr4_nearest": 100}


def test_saved_config_keeps_types_and_stays_overridable(smoke_run):
    workdir, config, _ = smoke_run
    saved = workdirs.saved_config(workdir)
    assert saved.to_dict() == config.to_dict()
    assert isinstance(saved.evals, tuple) and isinstance(saved.optim.lr_boundaries, tuple)
    saved.data.box_file = "boxes.json"  # None in the file; still a string field
    with pytest.raises(TypeError):
        saved.data.box_file = 3
    config_lib.validate(saved)


def test_a_run_remembers_where_its_data_was(mnist_data_dir, tmp_path):
    """Trained with the data dir only in $TFDS_DATA_DIR, the run is evaluated from its workdir in an
    environment without it; once the data is gone, the error names where training found it and the
    two ways to point at it."""
    workdir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "TFDS_DATA_DIR"}
    trained = subprocess.run([sys.executable, "-m", "pivot_jax.train", f"--config={CONFIGS / 'mnist.py'}:smoke",
                              f"--workdir={workdir}", "--config.num_train_steps=2", "--config.data.test_examples=64"],
                             cwd=REPO, env={**env, "TFDS_DATA_DIR": mnist_data_dir}, capture_output=True, text=True,
                             timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert json.loads((workdir / "config.json").read_text())["data"]["data_dir"] is None  # the config is as given
    assert json.loads((workdir / workdirs.DATA_LOCATION).read_text()) == {"data_dir": mnist_data_dir}
    evaluated = subprocess.run([sys.executable, "-m", "pivot_jax.evaluate", f"--workdir={workdir}",
                                "--config.sweep_evals=()"], cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "Evaluating 6 test conditions: 100%" in evaluated.stderr  # its progress, as plain lines here
    (workdir / workdirs.DATA_LOCATION).write_text(json.dumps({"data_dir": str(tmp_path / "moved")}))
    config = workdirs.saved_config(workdir)
    assert config.data.data_dir == str(tmp_path / "moved")
    config.data.download = False
    with pytest.raises(DataError, match=r"mnist is not prepared in .*moved.*point at it with TFDS_DATA_DIR=DIR or "
                                         r"--config.data.data_dir=DIR"):
        data.open_split(config.data, "test")


def test_predict_gives_the_classes_evaluation_gives(published_mnist_run, test_images, tmp_path):
    workdir, config, _ = published_mnist_run
    images, _ = test_images
    expected = np.argmax(direct_logits(workdir, config, images[:6]), -1)
    paths = []
    for index, image in enumerate(images[:6]):
        paths.append(tmp_path / f"digit_{index}.png")
        Image.fromarray(image[..., 0]).save(paths[-1])
    # An RGB image twice the size: converted and resized the way evaluation would, and said so.
    Image.fromarray(np.repeat(images[0], 3, -1)).resize((56, 56), Image.NEAREST).save(tmp_path / "big_rgb.png")
    result = run_module("predict", f"--workdir={workdir}", "--format=json", "--top_k=3",
                        str(tmp_path / "digit_*.png"), str(tmp_path / "big_rgb.png"))
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(result.stdout)
    assert output["step"] == TRAINED_STEPS and output["perturbation"] == "clean"
    predictions = output["predictions"]
    assert [p["file"] for p in predictions[:6]] == [str(p) for p in paths]
    assert [p["top"][0]["label"] for p in predictions[:6]] == expected.tolist()
    assert [p["top"][0]["class"] for p in predictions[:6]] == [str(label) for label in expected]
    for p in predictions:
        probabilities = [entry["probability"] for entry in p["top"]]
        assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert 0.0 < sum(probabilities) <= 1.0 + 1e-6
    assert predictions[-1]["notes"] == ["converted from RGB to L", "resized from 56x56 to 28x28 (bilinear)"]
    assert predictions[-1]["top"][0]["label"] == expected[0]
    assert predictions[0]["notes"] == []


def test_predict_applies_the_named_perturbation(published_mnist_run, test_images):
    workdir, config, _ = published_mnist_run
    images, _ = test_images
    probabilities, step = predict.predict_probabilities(config, workdir, images[:70], "lr4_nearest")
    assert step == TRAINED_STEPS and probabilities.shape == (70, 10)  # two batches, the second padded
    low_resolution = np.repeat(np.repeat(images[:70, ::4, ::4], 4, 1), 4, 2)
    expected = direct_logits(workdir, config, low_resolution)
    np.testing.assert_allclose(probabilities, np.asarray(jax.nn.softmax(expected)), atol=2e-5)


def test_predict_output_formats():
    image = predict.PreparedImage("a.png", np.zeros((28, 28, 1), np.uint8), ["resized from 1x1 to 28x28 (bilinear)"])
    probabilities = np.array([[0.1, 0.7, 0.2]])
    ranked = predict.rankings(probabilities, ("cat", "dog", "owl"), 2)
    assert ranked == [[{"label": 1, "class": "dog", "probability": 0.7}, {"label": 2, "class": "owl", "probability": 0.2}]]
    csv_lines = predict.render([image], ranked, "csv", "clean", 5).splitlines()
    assert csv_lines[0] == "file,rank,label,class,probability,perturbation,notes"
    assert csv_lines[1] == "a.png,1,1,dog,0.700000,clean,resized from 1x1 to 28x28 (bilinear)"
    text = predict.render([image], ranked, "text", "noise_0.15", 5)
    assert text.splitlines() == ["checkpoint step 5, perturbation: noise_0.15",
                                 "a.png: dog 70.0%, owl 20.0%  [resized from 1x1 to 28x28 (bilinear)]"]


def test_predict_bad_input_is_refused_before_any_compute(published_mnist_run, tmp_path):
    workdir, config, _ = published_mnist_run
    (tmp_path / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:40])
    with pytest.raises(DataError, match="cannot read the image .*notes.txt"):
        predict.prepare_image(str(tmp_path / "notes.txt"), config.data)
    with pytest.raises(DataError, match="cannot read the image .*cut.png"):
        predict.prepare_image(str(tmp_path / "cut.png"), config.data)
    with pytest.raises(DataError, match="missing.png: no such file or directory"):
        predict.expand_paths([str(tmp_path / "ok.png"), str(tmp_path / "missing.png")])
    with pytest.raises(DataError, match="matches no file"):
        predict.expand_paths([str(tmp_path / "*.jpg")])
    with pytest.raises(ConfigError, match="--perturb: got 'blur_3', expected a name of the form"):
        predict.check_flags(config, "blur_3", 5)
    with pytest.raises(ConfigError, match="--top_k"):
        predict.check_flags(config, "clean", 0)
    empty = tmp_path / "no_checkpoint"
    empty.mkdir()
    (empty / "config.json").write_text(open(os.path.join(workdir, "config.json")).read())
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        predict.predict_probabilities(config, str(empty), np.zeros((1, 28, 28, 1), np.uint8))
    with pytest.raises(ConfigError, match="config.json does not exist"):
        workdirs.saved_config(tmp_path)
    # On the command line, a bad file among good ones is named and the others are still classified
    # (like other batch tools); the exit status says that something failed.
    result = run_module("predict", f"--workdir={workdir}", "--format=csv", str(tmp_path / "notes.txt"),
                        str(tmp_path / "ok.png"), str(tmp_path / "cut.png"))
    assert result.returncode == 1
    assert [row.split(",")[0] for row in result.stdout.splitlines()[1:]] == [str(tmp_path / "ok.png")] * 5
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 and "notes.txt" in errors[0] and "cut.png" in errors[1], result.stderr[-2000:]
    assert errors[2] == "error: 2 of 3 files could not be read (each is named above); the others are classified"
    assert "Traceback" not in result.stderr
    only_bad = run_module("predict", f"--workdir={workdir}", str(tmp_path / "notes.txt"))
    assert only_bad.returncode == 1 and only_bad.stdout == ""
    assert only_bad.stderr.strip().splitlines()[-1] == "error: none of the 1 files given could be read as an image"
    no_config = run_module("predict", f"--workdir={tmp_path}", str(tmp_path / "ok.png"))
    assert no_config.returncode != 0 and "config.json does not exist" in no_config.stderr


def test_predict_classifies_a_directory_and_scales_16_bit_images(published_mnist_run, test_images, tmp_path):
    workdir, config, _ = published_mnist_run
    images, _ = test_images
    folder = tmp_path / "digits"
    (folder / "more").mkdir(parents=True)
    Image.fromarray(images[0][..., 0]).save(folder / "a_8bit.png")
    Image.fromarray(images[0][..., 0].astype(np.uint16) * 257).save(folder / "more" / "b_16bit_grey.png")
    rgb16 = np.repeat(images[0], 3, -1).astype(np.uint16) * 257
    ok, encoded = cv2.imencode(".png", rgb16)  # PIL cannot write 16-bit colour
    assert ok
    (folder / "more" / "c_16bit_rgb.png").write_bytes(encoded.tobytes())
    (folder / "readme.txt").write_text("not an image, and not named like one: skipped")
    assert predict.expand_paths([str(folder)]) == [str(folder / "a_8bit.png"), str(folder / "more" / "b_16bit_grey.png"),
                                                   str(folder / "more" / "c_16bit_rgb.png")]
    for path in predict.expand_paths([str(folder)]):  # 16 bits are scaled to 8, not clipped to white
        np.testing.assert_array_equal(predict.prepare_image(path, config.data).pixels, images[0])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty is a directory with no image files"):
        predict.expand_paths([str(tmp_path / "empty")])


@pytest.fixture(scope="module")
def exported(published_mnist_run, tmp_path_factory):
    workdir, config, _ = published_mnist_run
    out = tmp_path_factory.mktemp("export") / "mnist_model"
    manifest = export.export(config, workdir, str(out), calibration_examples=64)
    return out, manifest


def test_export_matches_the_jax_model(published_mnist_run, exported, test_images):
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    workdir, config, _ = published_mnist_run
    out, manifest = exported
    images, labels = test_images
    expected = direct_logits(workdir, config, images)
    assert manifest["step"] == TRAINED_STEPS and manifest["classes"] == [str(i) for i in range(10)]
    assert manifest["input"]["shape"] == ["batch", 28, 28, 1] and manifest["input"]["dtype"] == "uint8"
    assert json.loads((out / "export.json").read_text()) == manifest
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left behind

    serving = tf.saved_model.load(str(out / "saved_model")).signatures[export.SIGNATURE]
    outputs = serving(images=tf.constant(images))
    # Float32 on both sides; the SavedModel runs XLA's convolution, the checkpoint was trained with
    # whichever the run chose: differences are summation order only.
    np.testing.assert_allclose(outputs["logits"].numpy(), expected, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(outputs["probabilities"].numpy(), jax.nn.softmax(expected), atol=1e-5)

    def tflite_logits(name, count):
        runner = Interpreter(model_path=str(out / export.FILES[name])).get_signature_runner(export.SIGNATURE)
        return np.stack([runner(images=images[i : i + 1])["logits"][0] for i in range(count)])

    np.testing.assert_allclose(tflite_logits("float32", 64), expected[:64], rtol=1e-4, atol=1e-3)
    quantized = tflite_logits("int8", 256)
    # int8 changes the numbers, not (mostly) the decisions of a model that has learned.
    agreement = np.mean(np.argmax(quantized, -1) == np.argmax(expected, -1))
    assert agreement >= 0.97, agreement
    assert np.mean(np.argmax(quantized, -1) == labels) >= 0.9
    sizes = manifest["files"]
    assert sizes["int8"]["bytes"] < 0.4 * sizes["float32"]["bytes"]


def test_export_never_overwrites_or_leaves_half_an_export(published_mnist_run, exported, monkeypatch, tmp_path):
    workdir, config, _ = published_mnist_run
    out, _ = exported
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(ConfigError, match="exists; choose another path or pass --overwrite"):
        export.export(config, workdir, str(out))

    def converter_fails(*args, **kwargs):
        raise RuntimeError("converter failed")

    monkeypatch.setattr(export, "_tflite", converter_fails)
    with pytest.raises(RuntimeError, match="converter failed"):
        export.export(config, workdir, str(out), overwrite=True, calibration_examples=8)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # the old export is intact
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    with pytest.raises(ConfigError, match="the folder .* does not exist"):
        export.check_output(tmp_path / "missing" / "model", overwrite=False)


@pytest.mark.parametrize("fails", [False, True])
def test_the_tflite_converters_own_output_is_shown_only_when_it_fails(monkeypatch, capfd, fails):
    """The converter's C++ lines go to file descriptor 2: kept out of the console, and shown whole,
    before its error, when the conversion fails."""
    import tensorflow as tf

    class Converter:
        def convert(self):
            os.write(2, b"input_inference_type: FLOAT32\n")
            if fails:
                raise RuntimeError("conversion failed")
            return b"model"

    monkeypatch.setattr(tf.lite.TFLiteConverter, "from_concrete_functions", lambda *args: Converter())
    monkeypatch.setattr(export, "_tf_module", lambda serve, shape: type(
        "Module", (), {"serve": type("Serve", (), {"get_concrete_function": staticmethod(lambda: None)})})())
    if fails:
        with pytest.raises(RuntimeError, match="conversion failed"):
            export._tflite(None, (28, 28, 1), None)
        assert "input_inference_type: FLOAT32" in capfd.readouterr().err
    else:
        assert export._tflite(None, (28, 28, 1), None) == b"model"
        assert "input_inference_type" not in capfd.readouterr().err


def test_an_export_killed_midway_is_cleaned_up_and_loses_nothing(tmp_path):
    """A killed export leaves `.model.partial-<pid>` (and, killed while swapping, the old export moved
    aside as `.model.replaced-<pid>`): the next export removes the first and puts the second back."""
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()  # a pid that no longer runs
    out = tmp_path / "model"
    (tmp_path / f".model.partial-{dead.pid}").mkdir()
    (tmp_path / f".model.replaced-{dead.pid}").mkdir()
    (tmp_path / f".model.replaced-{dead.pid}" / "export.json").write_text("{}")
    (tmp_path / f".model.partial-{os.getpid()}").mkdir()  # a live export's: left alone
    with pytest.raises(ConfigError, match="exists; choose another path or pass --overwrite"):
        export.check_output(out, overwrite=False)  # the old export is back, so it is not overwritten
    assert (out / "export.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".model.partial-{os.getpid()}", "model"]
    (tmp_path / f".model.partial-{os.getpid()}").rmdir()
    (tmp_path / f".model.replaced-{dead.pid}").mkdir()  # beside a complete new export: removed
    export.check_output(out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_jpeg_on_the_device_is_pils_jpeg_on_real_digits(test_images):
    """The test images JPEG-compressed by Pillow and by pivot_jax.corruptions: the same pixels, so the
    model's accuracy under JPEG is Pillow's (test_corruptions checks this on synthetic images)."""
    import io

    from pivot_jax import corruptions

    images, _ = test_images
    for quality in (25, 10, 7):
        encoded = []
        for image in images:
            buffer = io.BytesIO()
            Image.fromarray(image[..., 0]).save(buffer, "JPEG", quality=quality)
            encoded.append(np.asarray(Image.open(buffer))[..., None])
        on_device = jax.vmap(lambda x: corruptions.jpeg_compression(None, x, quality))(
            jnp.asarray(images / 255.0, jnp.float32))
        ours = np.round(np.asarray(on_device) * 255).astype(np.uint8)
        np.testing.assert_array_equal(ours, np.stack(encoded), err_msg=f"quality {quality}")


def test_a_published_model_evaluates_and_predicts_as_the_run(smoke_run, test_images, tmp_path):
    """`pivot_jax.publish`: the model alone (no optimizer state), restored by evaluate and predict as they
    restore the run, with the run's accuracy; an existing published model is never overwritten."""
    workdir, config, result = smoke_run
    out = tmp_path / "published"
    published = run_module("publish", f"--workdir={workdir}", f"--out={out}")
    assert published.returncode == 0, published.stderr[-3000:]
    assert f"published the model of step {result.step} of {workdir} in {out}" in published.stdout
    _, state = checkpoint.saved_state(out)
    assert set(state) == set(checkpoint.MODEL_FIELDS)  # no opt_state, no step
    _, whole = checkpoint.saved_state(workdir)
    jax.tree.map(np.testing.assert_array_equal, state["params"], whole["params"])
    size = sum(p.stat().st_size for p in (out / "checkpoints").rglob("*") if p.is_file())
    assert size < 0.6 * sum(p.stat().st_size for p in (pathlib.Path(workdir) / "checkpoints" / str(result.step))
                            .rglob("*") if p.is_file())
    evaluated = run_module("evaluate", f"--workdir={out}", "--config.sweep_evals=()")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((out / "eval" / "results.json").read_text())["accuracy"] == result.accuracy
    # predict on the published folder gives the classes of the run's own logits.
    images, _ = test_images
    paths = []
    for index, image in enumerate(images[:4]):
        paths.append(str(tmp_path / f"digit_{index}.png"))
        Image.fromarray(np.asarray(image)[..., 0]).save(paths[-1])
    predicted = run_module("predict", f"--workdir={out}", "--format=json", "--top_k=1", *paths)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    expected = direct_logits(workdir, config, np.asarray(images[:4])).argmax(axis=1)
    assert [p["top"][0]["label"] for p in json.loads(predicted.stdout)["predictions"]] == expected.tolist()
    again = run_module("publish", f"--workdir={workdir}", f"--out={out}")
    assert again.returncode != 0 and "exists; publish into a folder without checkpoints" in again.stderr
