"""ImageNet end to end, offline: TFDS's `imagenet2012` prepared from synthetic archives made here, the
paper's two stages chained (clean pre-training on 1 device, then pivot fine-tuning from it with ILSVRC
boxes on 8 fake devices), evaluation at 64 and at 224 pixels; the box XML command; a bad manual dir."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from conftest import CONFIGS, EIGHT_DEVICES, ONE_DEVICE, REPO, run_train
from imagenet_archives import box_xml, make_manual_dir, write_box_archive
from pivot_jax import boxes_from_xml, config_lib, data, evaluate
from pivot_jax.data import boxes, tfds_prepare
from pivot_jax.errors import DataError


def imagenet_config(data_dir, arg="mode=clean,smoke"):
    config = config_lib.load_config(f"{CONFIGS / 'imagenet.py'}:{arg}")
    config.data.data_dir, config.data.download = str(data_dir), False
    return config


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """A TFDS data dir with `imagenet2012` prepared, offline, from archives made here."""
    data_dir = tmp_path_factory.mktemp("imagenet") / "tfds"
    made = make_manual_dir(data_dir / "downloads" / "manual")
    config = imagenet_config(data_dir)
    config.data.num_classes = len(made["synsets"])  # the preparation checks the archive's class count
    splits = {name: data.open_split(config.data, name) for name in ("train", "validation")}  # prepares
    return data_dir, made, splits


def test_the_archives_prepare_as_tfds_imagenet2012(imagenet):
    _, made, splits = imagenet
    assert splits["train"].num_examples == len(made["train"]) == 24
    assert splits["validation"].num_examples == len(made["val"]) == 8
    assert splits["train"].num_classes == 1000 and splits["train"].class_names[0] == "n01440764"
    # Every validation label (from TFDS's list, by file name) is one of the classes trained on.
    val_labels = {int(splits["validation"].source[i]["label"]) for i in range(8)}
    train_labels = {int(splits["train"].source[i]["label"]) for i in range(24)}
    assert val_labels == train_labels and len(val_labels) == len(made["synsets"])
    heights = {splits["validation"].source[i]["image"].shape[0] for i in range(8)}
    assert heights == {h for h, _ in made["val"].values()}  # each kept at its own size


def test_training_reads_a_large_split_encoded_and_decodes_only_its_crops(imagenet, monkeypatch):
    """A split too large for memory (ImageNet's) is trained on from its encoded JPEGs, each decoded at
    the smallest DCT scale its crop allows: the same batches, from the same examples, as from the
    decoded images, up to the decoder's scaling."""
    data_dir, _, splits = imagenet
    config = imagenet_config(data_dir)
    monkeypatch.setattr(data.sources, "CACHE_LIMIT_BYTES", 0)
    lazy = data.open_split(config.data, "train")
    assert "encoded" in lazy.train_source[0] and "image" in lazy.source[0]  # evaluation still decodes whole

    def batches(split):
        iterator = iter(data.train_dataset(split, config.data, 8, seed=0))
        return [next(iterator) for _ in range(3)]

    from_encoded, from_decoded = batches(lazy), batches(splits["train"])
    for encoded, decoded in zip(from_encoded, from_decoded):
        assert encoded["image"].shape == (8, 64, 64, 3)
        np.testing.assert_array_equal(encoded["label"], decoded["label"])
        np.testing.assert_array_equal(encoded["box"], decoded["box"])
        assert np.abs(encoded["image"].astype(int) - decoded["image"]).mean() < 3
    # A resumed iterator gives the same batches (the crops are drawn from the example's seed).
    iterator = iter(data.train_dataset(lazy, config.data, 8, seed=0))
    next(iterator)
    resumed = iter(data.train_dataset(lazy, config.data, 8, seed=0))
    resumed.set_state(iterator.get_state())
    for want in from_encoded[1:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def write_boxes(root, made):
    """ILSVRC-style box XML for some images: a train archive of synset folders, a val folder."""
    synset = made["synsets"][0]
    (stem_a, size_a), (stem_b, size_b), (stem_c, size_c) = [
        (name[:-5], made["train"][name]) for name in sorted(made["train"]) if name.startswith(synset)]
    write_box_archive(root / "bbox_train.tar.gz", {
        f"{synset}/{stem_a}.xml": box_xml(stem_a, size_a, [(10, 5, 30, 20)], synset),
        # Two objects: the union. The <filename> inside is wrong on purpose; the XML's own name counts.
        f"{synset}/{stem_b}.xml": box_xml(stem_b, size_b, [(0, 0, 16, 16), (32, 24, 48, 40)], synset,
                                          filename="wrong_name"),
        f"{synset}/{stem_c}.xml": box_xml(stem_c, size_c, [], synset),  # no object
    })
    (root / "bbox_val" / "val").mkdir(parents=True)
    for name, size in made["val"].items():
        (root / "bbox_val" / "val" / f"{name[:-5]}.xml").write_text(
            box_xml(name[:-5], size, [(size[1] // 4, size[0] // 4, 3 * size[1] // 4, 3 * size[0] // 4)]))
    return {"single": (stem_a, size_a), "union": (stem_b, size_b), "none": stem_c}


def test_box_xml_command(imagenet, tmp_path):
    data_dir, made, _ = imagenet
    stems = write_boxes(tmp_path, made)
    out = tmp_path / "boxes.csv"
    command = [sys.executable, "-m", "pivot_jax.boxes_from_xml", f"--xml={tmp_path / 'bbox_train.tar.gz'}",
               f"--xml={tmp_path / 'bbox_val'}", f"--out={out}", f"--data_dir={data_dir}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "10 images with a box (1 of them the union of several objects); 1 XML files without an object" in done.stdout
    rows = {row.split(",")[0]: [float(v) for v in row.split(",")[1:]] for row in out.read_text().splitlines()[1:]}
    stem, (height, width) = stems["single"]
    np.testing.assert_allclose(rows[f"{stem}.JPEG"], [5 / height, 10 / width, 20 / height, 30 / width], atol=1e-6)
    stem, (height, width) = stems["union"]
    np.testing.assert_allclose(rows[f"{stem}.JPEG"], [0, 0, 40 / height, 48 / width], atol=1e-6)
    assert f"{stems['none']}.JPEG" not in rows and "ILSVRC2012_val_00000008.JPEG" in rows
    assert boxes.read_box_file(str(out)).keys() == rows.keys()  # what training and evaluation read

    # An existing box file is kept; an XML for an image the data set does not have is named.
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "exists; pass --overwrite" in again.stderr
    (tmp_path / "bbox_val" / "val" / "ILSVRC2012_val_00000099.xml").write_text(box_xml("x", (10, 10), [(1, 1, 5, 5)]))
    before = out.read_text()
    unknown = subprocess.run([*command, "--overwrite"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert unknown.returncode != 0 and "Traceback" not in unknown.stderr
    assert ("ILSVRC2012_val_00000099.xml: box file for image ILSVRC2012_val_00000099.JPEG, which is not in"
            in unknown.stderr)
    assert out.read_text() == before


def test_bad_box_xml_is_named(tmp_path):
    (tmp_path / "a.xml").write_text("<annotation><size><width>10</width></size></annotation>")
    with pytest.raises(DataError, match=r"a.xml: not an ILSVRC box file"):
        boxes_from_xml.convert([str(tmp_path)])
    with pytest.raises(DataError, match="expected a folder or a tar archive"):
        boxes_from_xml.convert([str(tmp_path / "missing.zip")])


@pytest.mark.slow
def test_pretrain_clean_then_finetune_pivot_with_boxes_on_eight_devices(imagenet, tmp_path):
    """The paper's recipe, scaled down: configs/imagenet.py's own commands with smoke settings."""
    data_dir, made, _ = imagenet
    write_boxes(tmp_path, made)
    box_file = tmp_path / "boxes.csv"
    boxes_from_xml.write_box_file(
        boxes_from_xml.convert([str(tmp_path / "bbox_train.tar.gz"), str(tmp_path / "bbox_val")]).rows, box_file)
    common = [f"--config.data.data_dir={data_dir}", "--config.data.download=False"]
    clean = run_train([f"--config={CONFIGS / 'imagenet.py'}:mode=clean,smoke", f"--workdir={tmp_path / 'clean'}",
                       *common], ONE_DEVICE, timeout=600)
    assert clean.returncode == 0, clean.stderr[-3000:]

    pivot_args = [f"--config={CONFIGS / 'imagenet.py'}:mode=pivot,perturb=lr+mr,smoke", *common,
                  f"--config.init_from={tmp_path / 'clean'}", f"--config.data.box_file={box_file}"]
    pivot = run_train([*pivot_args, f"--workdir={tmp_path / 'pivot'}"], EIGHT_DEVICES, timeout=600)
    assert pivot.returncode == 0, pivot.stderr[-3000:]
    assert "on 8 devices" in pivot.stderr
    assert f"Initialised the model from step 12 of {tmp_path / 'clean'}" in pivot.stderr
    assert f"Training MR boxes: box file {box_file} (22 examples without a box" in pivot.stderr
    on_eight = json.loads((tmp_path / "pivot" / "eval" / "results.json").read_text())
    assert on_eight["step"] == 12 and set(on_eight["num_examples"].values()) == {8}  # no image dropped
    assert on_eight["mr_boxes"] == f"box file {box_file}"  # every validation image has its box

    # Evaluated again here, on 1 device, at the paper's 224 pixels (the full-size validation JPEGs resized
    # and centre-cropped to 224; the model pools globally, so the 64-pixel checkpoint runs at 224).
    config = imagenet_config(data_dir, "mode=pivot,perturb=lr+mr,smoke")
    config.data.box_file, config.data.image_size, config.sweep_evals = str(box_file), 224, ()
    config.evals = ("clean", "mr4_nearest")  # MR reads the boxes, cropped with the image
    at_224 = evaluate.evaluate_checkpoint(config, str(tmp_path / "pivot"))
    assert at_224["step"] == 12 and at_224["num_examples"] == 8
    assert set(at_224["accuracy"]) == set(config.evals) and all(0 <= a <= 1 for a in at_224["accuracy"].values())


def test_a_missing_or_truncated_archive_is_named_before_preparing(imagenet, tmp_path):
    data_dir, _, _ = imagenet
    manual = tmp_path / "tfds" / "downloads" / "manual"
    config = imagenet_config(tmp_path / "tfds")
    never = (r"TFDS never downloads imagenet2012; it prepares it from ILSVRC2012_img_train.tar and "
             r"ILSVRC2012_img_val.tar put there .*image-net.org.*python -m pivot_jax.boxes_from_xml")
    # No manual dir at all, then one with other files only, then one with one archive of the two: each
    # time the archives, where they go and the box file are named (never the network).
    with pytest.raises(DataError, match=r"ILSVRC2012_img_train.tar is missing from .*manual. " + never):
        data.open_split(config.data, "validation")
    manual.mkdir(parents=True)
    (manual / "notes.txt").write_text("unrelated")
    with pytest.raises(DataError, match=r"ILSVRC2012_img_train.tar is missing from .*manual. " + never):
        data.open_split(config.data, "validation")
    shutil.copy(data_dir / "downloads" / "manual" / "ILSVRC2012_img_val.tar", manual)
    with pytest.raises(DataError, match=r"ILSVRC2012_img_train.tar is missing from .*manual. " + never):
        data.open_split(config.data, "validation")
    train = (data_dir / "downloads" / "manual" / "ILSVRC2012_img_train.tar").read_bytes()
    (manual / "ILSVRC2012_img_train.tar").write_bytes(train[: len(train) // 2])
    with pytest.raises(DataError, match=r"ILSVRC2012_img_train.tar is truncated: its member n\d+.tar ends at byte"):
        data.open_split(config.data, "validation")
    assert not list((tmp_path / "tfds").glob("imagenet2012/*/*.array_record*"))  # nothing was prepared
    tfds_prepare.check_manual_archives("imagenet2012", data_dir / "downloads" / "manual")  # the whole ones pass


def test_an_archive_cut_at_a_member_boundary_or_short_of_classes_is_named(imagenet, tmp_path):
    """tarfile reads a copy cut exactly after a member as a whole, smaller archive: TFDS would then
    prepare it with the classes after the cut silently missing."""
    data_dir, made, _ = imagenet
    manual = tmp_path / "manual"
    manual.mkdir()
    shutil.copy(data_dir / "downloads" / "manual" / "ILSVRC2012_img_val.tar", manual)
    whole = data_dir / "downloads" / "manual" / "ILSVRC2012_img_train.tar"
    with tarfile.open(whole) as archive:
        members = archive.getmembers()
    cut = members[1].offset  # the second class's header starts right after the first class's data
    (manual / "ILSVRC2012_img_train.tar").write_bytes(whole.read_bytes()[:cut])
    with pytest.raises(DataError, match=r"ILSVRC2012_img_train.tar is truncated: it ends after its member 1 at "
                                        r"byte [\d,]+, without tar's end-of-archive blocks"):
        tfds_prepare.check_manual_archives("imagenet2012", manual, len(made["synsets"]))
    # A whole archive (with its end blocks) that holds fewer classes than the config's.
    with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as short, tarfile.open(whole) as archive:
        for member in members[:-1]:
            short.addfile(member, archive.extractfile(member))
    with pytest.raises(DataError, match=rf"holds {len(members) - 1} classes \(one archive each\), "
                                        rf"config.data.num_classes is {len(made['synsets'])}"):
        tfds_prepare.check_manual_archives("imagenet2012", manual, len(made["synsets"]))
    shutil.copy(whole, manual / "ILSVRC2012_img_train.tar")
    tfds_prepare.check_manual_archives("imagenet2012", manual, len(made["synsets"]))


def test_only_process_0_prepares_while_the_others_wait(imagenet, tmp_path, monkeypatch):
    """Several hosts preparing one data set at once race in TFDS's renames and all lose the work."""
    import threading

    import tensorflow_datasets as tfds

    data_dir, made, _ = imagenet
    shutil.copytree(data_dir / "downloads", tmp_path / "tfds" / "downloads")
    config = imagenet_config(tmp_path / "tfds")
    config.data.num_classes = len(made["synsets"])
    # The main thread is process 1 of 2; a second thread, started a moment later, is process 0.
    monkeypatch.setattr(tfds_prepare, "_process_index",
                        lambda: 1 if threading.current_thread() is threading.main_thread() else 0)
    monkeypatch.setattr(tfds_prepare, "WAIT_POLL_SECONDS", 0.2)
    preparers = []
    original = tfds.core.DatasetBuilder.download_and_prepare

    def counted(self, *args, **kwargs):
        preparers.append(threading.current_thread().name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", counted)
    process_0 = threading.Timer(1.0, tfds_prepare.builder, (config.data,))
    process_0.name = "process-0"
    process_0.start()
    dataset = tfds_prepare.builder(config.data)  # waits for process 0
    process_0.join()
    assert dataset.is_prepared() and preparers == ["process-0"]


def test_fine_tuning_from_random_weights_is_refused_with_the_two_stage_commands(tmp_path):
    """`configs/imagenet.py` alone is the paper's pivot fine-tuning (lr 1e-5): without a pre-trained model
    it would spend days learning nothing."""
    result = run_train([f"--config={CONFIGS / 'imagenet.py'}", f"--workdir={tmp_path / 'run'}"], ONE_DEVICE, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "error: config.init_from: not set; this config fine-tunes a clean pre-trained ResNet-18" in result.stderr
    assert "--config=configs/imagenet.py:mode=clean --workdir=DIR_CLEAN" in result.stderr
    assert "--config=configs/imagenet.py:mode=pivot,perturb=lr+mr --config.init_from=DIR_CLEAN" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
