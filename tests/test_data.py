"""The input pipeline (pivot_jax.data): deterministic, resumable, sharded by process, padded for evaluation."""

import pathlib
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from pivot_jax import config_lib, data
from pivot_jax.data import augment
from conftest import CONFIGS


def data_config(augment="none", size=8, channels=1):
    config = config_lib.load_config(str(CONFIGS / "mnist.py")).data
    config.augment, config.image_size, config.channels = augment, size, channels
    config.num_threads = 2
    return config


def toy_split(n=20, size=8, channels=1):
    # Every pixel of image i holds i, so a batch row says which example it is.
    images = np.repeat(np.arange(n, dtype=np.uint8), size * size * channels).reshape(n, size, size, channels)
    boxes = np.tile(np.asarray([[0.25, 0.25, 0.75, 0.75]], np.float32), (n, 1))
    return data.Split(data.ArraySource(images, np.arange(n) % 10, boxes), n, 10, "test")


def example_ids(batch):
    return batch["image"][:, 0, 0, 0].astype(int).tolist()


def take(dataset, count):
    iterator = iter(dataset)
    return [next(iterator) for _ in range(count)]


def test_training_batches_are_a_function_of_seed_and_step():
    split, config = toy_split(), data_config()
    a = [example_ids(b) for b in take(data.train_dataset(split, config, 5, seed=1), 8)]
    b = [example_ids(b) for b in take(data.train_dataset(split, config, 5, seed=1), 8)]
    c = [example_ids(b) for b in take(data.train_dataset(split, config, 5, seed=2), 8)]
    assert a == b and a != c
    first_epoch, second_epoch = sum(a[:4], []), sum(a[4:], [])
    assert sorted(first_epoch) == sorted(second_epoch) == list(range(20))  # each epoch: every example once
    assert first_epoch != second_epoch  # reshuffled


def test_iterator_state_resumes_exactly():
    split, config = toy_split(), data_config("cifar")
    iterator = iter(data.train_dataset(split, config, 4, seed=0))
    for _ in range(7):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    resumed = iter(data.train_dataset(split, config, 4, seed=0))
    resumed.set_state(state)
    for want, got in zip(expected, [next(resumed) for _ in range(3)]):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_processes_read_disjoint_rows_of_the_same_global_batch(monkeypatch):
    split, config = toy_split(), data_config("cifar")
    whole = take(data.train_dataset(split, config, 6, seed=3), 5)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    parts = []
    for index in range(2):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        parts.append(take(data.train_dataset(split, config, 6, seed=3), 5))
    for step in range(5):
        for key in ("image", "label", "box"):
            np.testing.assert_array_equal(
                np.concatenate([parts[0][step][key], parts[1][step][key]]), whole[step][key])


@pytest.mark.parametrize("processes", [1, 2])
def test_evaluation_pads_and_masks_without_dropping(monkeypatch, processes):
    split, config = toy_split(n=23), data_config()
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    seen = []
    for index in range(processes):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        dataset, count = data.eval_dataset(split, config, global_batch=8)
        assert count == 23
        for batch in dataset:
            assert len(batch["mask"]) == 8 // processes
            seen += [(int(i), example) for i, m, example in zip(batch["index"], batch["mask"], example_ids(batch)) if m]
    assert sorted(seen) == [(i, i) for i in range(23)]  # every example once, in its own row
    if processes == 1:
        dataset, count = data.eval_dataset(split, config, global_batch=8, limit=10)
        assert count == 10 and sum(float(b["mask"].sum()) for b in dataset) == 10


def test_cifar_augmentation_moves_the_box_with_the_pixels():
    image = np.zeros((32, 32, 3), np.uint8)
    image[8:24, 4:16] = 255  # the box (0.25, 0.125, 0.75, 0.5) painted white
    example = {"image": image, "label": np.int32(0), "box": np.asarray([0.25, 0.125, 0.75, 0.5], np.float32)}
    transform = augment.TrainTransform(data_config("cifar", 32, 3))
    flips = 0
    for seed in range(40):
        out = transform.random_map(example, np.random.default_rng(seed))
        ymin, xmin, ymax, xmax = np.round(out["box"] * 32).astype(int)
        white = out["image"][..., 0] == 255
        inside = np.zeros((32, 32), bool)
        inside[ymin:ymax, xmin:xmax] = True
        np.testing.assert_array_equal(white, inside)
        flips += xmin > 16 - xmax  # the white block moved to the right half: flipped
    assert 5 < flips < 35


def test_cifar_crop_equals_cropping_a_zero_padded_copy():
    image = np.random.default_rng(0).integers(1, 256, (32, 32, 3), dtype=np.uint8)
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    for top in range(9):
        for left in range(9):
            np.testing.assert_array_equal(augment.padded_crop(image, top - 4, left - 4),
                                          padded[top : top + 32, left : left + 32])


def test_imagenet_augmentation_output_size():
    rng = np.random.default_rng(0)
    example = {"image": rng.integers(0, 255, (60, 90, 3), dtype=np.uint8), "label": np.int32(1),
               "box": np.asarray([0.1, 0.1, 0.9, 0.9], np.float32)}
    config = data_config("imagenet", 24, 3)
    out = augment.TrainTransform(config).random_map(example, rng)
    assert out["image"].shape == (24, 24, 3) and out["image"].dtype == np.uint8
    assert np.all((0 <= out["box"]) & (out["box"] <= 1))
    assert augment.EvalTransform(config).map(example)["image"].shape == (24, 24, 3)


def photo(height, width, image_format="JPEG", seed=0):
    """Encoded bytes of a smooth colour image with texture (JPEG at quality 90, or PNG)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (height // 32 + 2, width // 32 + 2, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
    image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, image_format, **({"quality": 90} if image_format == "JPEG" else {}))
    return buffer.getvalue()


@pytest.mark.parametrize("image_format", ["JPEG", "PNG"])
def test_imagenet_training_decodes_only_what_its_crop_needs_and_gives_the_same_input(image_format):
    """An encoded example (an ImageNet split read on access) gives the training input that the decoded
    image gives, from the same random numbers: pixel for pixel where the decoder cannot shrink the
    crop (OpenCV's decode equals PIL's), and within a few grey levels where the crop is large enough
    to decode at 1/2, 1/4 or 1/8 of the size; the box moves the same either way."""
    config = data_config("imagenet", 24, 3)
    box = np.asarray([0.2, 0.3, 0.7, 0.9], np.float32)
    for (height, width), size, exact in (((75, 100), 48, True), ((375, 500), 224, True), ((375, 500), 64, False),
                                         ((375, 500), 112, False)):
        config.image_size = size
        transform = augment.TrainTransform(config)
        encoded = photo(height, width, image_format)
        decoded = data.sources.decode_image(encoded, 3)
        for seed in range(6):
            from_bytes = transform.random_map({"encoded": encoded, "name": "x.jpg", "label": np.int32(3), "box": box},
                                              np.random.default_rng(seed))
            from_pixels = transform.random_map({"image": decoded, "label": np.int32(3), "box": box},
                                               np.random.default_rng(seed))
            assert from_bytes["image"].shape == (size, size, 3) and from_bytes["image"].dtype == np.uint8
            np.testing.assert_array_equal(from_bytes["box"], from_pixels["box"])
            difference = np.abs(from_bytes["image"].astype(int) - from_pixels["image"])
            if exact or image_format == "PNG":  # only a JPEG decodes at a reduced scale
                assert difference.max() == 0, (height, width, size, seed)
            else:
                assert difference.mean() < 2.5, (height, width, size, seed, difference.mean())


def test_a_training_image_that_cannot_be_decoded_is_named():
    transform = augment.TrainTransform(data_config("imagenet", 24, 3))
    truncated = photo(75, 100)[:300]
    for encoded in (b"not an image", truncated):
        example = {"encoded": encoded, "name": "train/n01/broken.JPEG", "label": np.int32(0), "box": np.zeros(4, np.float32)}
        with pytest.raises(data.DataError, match="train/n01/broken.JPEG"):
            transform.random_map(example, np.random.default_rng(0))


def test_mean_matches_numpy():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 4, 4, 3), dtype=np.uint8)
    split = data.Split(data.ArraySource(images, np.zeros(50), np.zeros((50, 4))), 50, 10, "")
    config = data_config(size=4, channels=3)
    config.mean = "pixel"
    np.testing.assert_allclose(data.input_mean(split, config), images.mean(0) / 255, rtol=1e-6)
    config.mean = "channel"
    np.testing.assert_allclose(data.input_mean(split, config), images.mean((0, 1, 2)) / 255, rtol=1e-6)


@pytest.fixture
def small_folder(cifar_folder, tmp_path):
    """Three classes x four test images (and two training images) of the CIFAR-10 JPEG copy."""
    for split, count in (("test", 4), ("train", 2)):
        for name in ("cat", "dog", "airplane"):
            target = tmp_path / split / name
            target.mkdir(parents=True)
            for path in sorted((pathlib.Path(cifar_folder) / split / name).iterdir())[:count]:
                shutil.copy(path, target / path.name)
    return tmp_path


def folder_config(root, **fields):
    config = data_config(size=32, channels=3)
    config.name, config.folder = "folder", str(root)
    for key, value in fields.items():
        setattr(config, key, value)
    return config


def test_folder_source_labels_and_boxes(small_folder):
    first = sorted((small_folder / "test" / "cat").iterdir())[0].name
    box_file = small_folder / "boxes.csv"
    box_file.write_text(f"example_id,ymin,xmin,ymax,xmax\ncat/{first},0.1,0.2,0.3,0.4\n")
    split = data.open_split(folder_config(small_folder, box_file=str(box_file)), "test",
                                      use_box_file=True)
    assert split.num_examples == 12 and split.num_classes == 3
    assert split.source.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # airplane, cat, dog
    assert split.source.images.shape == (12, 32, 32, 3)
    np.testing.assert_allclose(split.source.boxes[4], [0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(split.source.boxes[0], [0.25, 0.25, 0.75, 0.75])
    assert "box file" in split.box_source and "11 examples without a box" in split.box_source
    plain = data.open_split(folder_config(small_folder, box_file=str(box_file)), "test")
    assert plain.box_source.startswith("default")  # the box file only where the caller asks for it


def test_one_box_file_serves_both_splits(small_folder):
    """`<split>/<id>` rows tell apart examples whose ids repeat across splits; training reads the box
    file too, and a file without rows for it leaves training on the default box instead of failing."""
    first_test = sorted((small_folder / "test" / "cat").iterdir())[0].name
    first_train = sorted((small_folder / "train" / "cat").iterdir())[0].name
    box_file = small_folder / "boxes.csv"
    box_file.write_text(f"cat/{first_test},0.1,0.2,0.3,0.4\ntest/cat/{first_test},0.2,0.2,0.4,0.4\n"
                        f"train/cat/{first_train},0.5,0.5,0.9,0.9\n")
    config = folder_config(small_folder, box_file=str(box_file))
    test = data.open_split(config, "test", use_box_file=True)
    np.testing.assert_allclose(test.source.boxes[4], [0.2, 0.2, 0.4, 0.4])  # the split's own row wins
    train = data.open_split(config, "train", use_box_file=True)
    np.testing.assert_allclose(train.source.boxes[2], [0.5, 0.5, 0.9, 0.9])  # airplane x 2, then cat
    assert train.box_source.startswith("box file") and "5 examples without a box" in train.box_source

    box_file.write_text(f"test/cat/{first_test},0.2,0.2,0.4,0.4\n")
    train = data.open_split(config, "train", use_box_file=True)
    np.testing.assert_allclose(train.source.boxes, np.tile([0.25, 0.25, 0.75, 0.75], (6, 1)))
    assert "has no row for the train split" in train.box_source
    box_file.write_text(f"train/cat/{first_train},0.5,0.5,0.9,0.9\n")
    with pytest.raises(data.DataError, match="none of its ids matches an example id of the test split"):
        data.open_split(config, "test", use_box_file=True)


@pytest.mark.parametrize("content,expected", [("cat/x.jpg,0.1,0.2\n", "line 1"),
                                              ("cat/x.jpg,0.5,0.2,0.3,0.4\n", "0 <= min <= max <= 1"),
                                              (None, "cannot read")])
def test_bad_box_file(small_folder, content, expected):
    box_file = small_folder / "boxes.csv"
    if content is not None:
        box_file.write_text(content)
    with pytest.raises(data.DataError, match=expected):
        data.open_split(folder_config(small_folder, box_file=str(box_file)), "test", use_box_file=True)


def test_folder_errors(small_folder):
    with pytest.raises(data.DataError, match="is not a directory"):
        data.open_split(folder_config(small_folder), "validation")
    with pytest.raises(data.DataError, match="config.data.image_size"):
        data.open_split(folder_config(small_folder, image_size=28), "test")
