"""Every config, in every mode x perturbation, builds and validates; bad ones name the field."""

import json

import pytest

from pivot_jax import conditions, config_lib
from pivot_jax.errors import ConfigError

DATASETS = ("mnist", "cifar10", "imagenet")


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("mode", config_lib.MODES)
@pytest.mark.parametrize("perturb", tuple(config_lib.PERTURBS))
@pytest.mark.parametrize("smoke", [False, True])
def test_every_config_validates(config_path, dataset, mode, perturb, smoke):
    arg = f"mode={mode},perturb={perturb}" + (",smoke" if smoke else "")
    config = config_lib.load_config(f"{config_path(dataset)}:{arg}")
    if perturb in conditions.NEEDS_PHOTOS and mode != "clean":
        # Frost's photographs are not shipped: refused until config.perturb.frost_photos names them.
        with pytest.raises(ConfigError, match=r"config\.perturb\.frost_photos: .*got no folder"):
            config_lib.validate(config, num_devices=8)
        return
    config_lib.validate(config, num_devices=8)
    spec = config_lib.perturb_spec(config)
    assert config.loss.mode == mode
    if mode == "clean":
        assert spec.k == 0 and config.loss.lam2 == 0
    else:
        assert spec.kinds == config_lib.PERTURBS[perturb]
        assert spec.k == config.perturb.k
    if mode == "perturbed":
        assert spec.k == config.batch_size
    if mode == "pivot":
        assert config.loss.lam2 == 1e-4 and config_lib.is_paired(config)
        assert config_lib.host_batch_size(config) == config.batch_size - config.perturb.k


def test_paper_defaults(config_path):
    mnist = config_lib.load_config(config_path("mnist"))
    assert (mnist.batch_size, mnist.perturb.k, mnist.loss.lam, mnist.loss.lam2) == (128, 64, 0.3, 1e-4)
    assert mnist.num_train_steps == 9000
    assert [round(b * 9000) for b in mnist.optim.lr_boundaries] == [4000, 6000, 8000]
    cifar = config_lib.load_config(config_path("cifar10"))
    assert [round(b * 94000) for b in cifar.optim.lr_boundaries] == [48000, 72000]
    imagenet = config_lib.load_config(config_path("imagenet") + ":mode=pivot")
    assert config_lib.perturb_spec(imagenet).counts == (16, 16)
    assert imagenet.batch_size == 64 and imagenet.perturb.kinds == ("lr", "mr")


def test_warmup_then_the_paper_schedule(config_path):
    from pivot_jax import train_state

    config = config_lib.load_config(config_path("mnist"))
    config.optim.warmup_steps = 100
    _, schedule = train_state.make_optimizer(config)
    rates = {step: float(schedule(step)) for step in (0, 50, 100, 3999, 4000, 6000, 8000)}
    assert rates == pytest.approx({0: 0.0, 50: 0.05, 100: 0.1, 3999: 0.1, 4000: 0.01, 6000: 1e-3, 8000: 1e-4})


def test_perturbed_k_follows_batch_size_override(config_path):
    config = config_lib.load_config(config_path("cifar10") + ":mode=perturbed,perturb=lr")
    config.batch_size = 48
    config_lib.validate(config)
    assert config.perturb.k == 48


def _bad(config_path, change, dataset="mnist", arg="mode=pivot", devices=None):
    config = config_lib.load_config(f"{config_path(dataset)}:{arg}")
    change(config)
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(config, num_devices=devices)
    return str(error.value)


@pytest.mark.parametrize(
    "field,change,expected",
    [
        ("perturb.k", lambda c: setattr(c.perturb, "k", 65), "between 1"),
        ("loss.mode", lambda c: setattr(c.loss, "mode", "adversarial"), "one of"),
        ("perturb.kinds", lambda c: setattr(c.perturb, "kinds", ("blur",)), "distinct kinds"),
        ("perturb.max_sigma", lambda c: setattr(c.perturb, "max_sigma", -0.1), ">= 0"),
        ("perturb.factors", lambda c: setattr(c.perturb, "factors", (0, 2)), "ints >= 1"),
        ("perturb.methods", lambda c: setattr(c.perturb, "methods", ("bilinear",)), "some of"),
        ("model.name", lambda c: setattr(c.model, "name", "vgg"), "one of"),
        ("data.name", lambda c: setattr(c.data, "name", ""), "TFDS"),
        ("data.augment", lambda c: setattr(c.data, "augment", "autoaugment"), "one of"),
        ("optim.lr_boundaries", lambda c: setattr(c.optim, "lr_boundaries", (0.8, 0.4)), "increasing"),
        ("evals", lambda c: setattr(c, "evals", ("clean", "noise")), "noise_<sigma>"),
        ("num_train_steps", lambda c: setattr(c, "num_train_steps", 0), ">= 1"),
        ("optim.warmup_steps", lambda c: setattr(c.optim, "warmup_steps", 4000), "first learning-rate decay at step 4000"),
    ],
)
def test_bad_config_names_field(config_path, field, change, expected):
    message = _bad(config_path, change)
    assert f"config.{field}" in message and expected in message


def test_batch_must_divide_over_devices(config_path):
    message = _bad(config_path, lambda c: setattr(c, "batch_size", 100), arg="mode=clean", devices=8)
    assert "config.batch_size" in message and "8 devices" in message


def test_lam2_outside_pivot_is_rejected(config_path):
    message = _bad(config_path, lambda c: setattr(c.loss, "lam2", 1e-4), arg="mode=mixed")
    assert "config.loss.lam2" in message


def test_bad_config_argument(config_path):
    with pytest.raises(config_lib.ConfigError, match="mode"):
        config_lib.load_config(config_path("mnist") + ":mode=adversarial")
    with pytest.raises(config_lib.ConfigError, match="perturb"):
        config_lib.load_config(config_path("mnist") + ":perturb=blur")
    with pytest.raises(config_lib.ConfigError, match="expected mode="):
        config_lib.load_config(config_path("mnist") + ":fast")


def test_imagenet_pod_keeps_the_papers_epochs_at_a_pod_batch(config_path):
    paper = {mode: config_lib.load_config(config_path("imagenet") + f":mode={mode}") for mode in ("clean", "pivot")}
    for mode, arg in (("clean", "mode=clean,pod"), ("pivot", "mode=pivot,perturb=lr+mr,pod=8192")):
        pod = config_lib.load_config(config_path("imagenet") + ":" + arg)
        config_lib.validate(pod, num_devices=32)
        batch = 4096 if arg.endswith(",pod") else 8192
        assert pod.batch_size == batch and pod.model.dtype == "bfloat16"
        images = pod.batch_size * pod.num_train_steps
        assert images == pytest.approx(paper[mode].batch_size * paper[mode].num_train_steps, rel=1e-3)
        assert pod.optim.lr_boundaries == paper[mode].optim.lr_boundaries
        if mode == "clean":  # Goyal et al.: 0.1 per 256 images, 5 warm-up epochs
            assert pod.optim.learning_rate == pytest.approx(0.1 * batch / 256)
            assert pod.optim.warmup_steps * batch == pytest.approx(5 * 1_281_167, rel=1e-3)
        else:  # the paper's fine-tuning rate per image; half the rows perturbed as in the paper
            assert pod.optim.learning_rate == pytest.approx(1e-5 * batch / 64)
            assert pod.perturb.k == batch // 2
    with pytest.raises(config_lib.ConfigError, match="config argument pod: this config has no pod-scale"):
        config_lib.load_config(config_path("cifar10") + ":pod")
    with pytest.raises(config_lib.ConfigError, match="config argument pod: got 'big'"):
        config_lib.load_config(config_path("imagenet") + ":pod=big")


def test_a_config_saved_before_a_field_existed_reads_with_its_default(config_path, tmp_path):
    from pivot_jax import workdirs

    config = config_lib.load_config(config_path("mnist") + ":mode=pivot")
    old = json.loads(config.to_json_best_effort())
    del old["optim"]["warmup_steps"]  # as runs saved it before warm-up existed
    (tmp_path / "config.json").write_text(json.dumps(old))
    saved = workdirs.saved_config(tmp_path)
    assert saved.optim.warmup_steps == 0 and saved.to_dict() == config.to_dict()
    workdirs.check(tmp_path, config)  # resuming it with today's config is not a config change
    config.optim.warmup_steps = 10
    with pytest.raises(workdirs.TrainingError, match="optim.warmup_steps: 0 -> 10"):
        workdirs.check(tmp_path, config)


def test_relative_paths_become_absolute_and_others_stay(config_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = config_lib.load_config(config_path("mnist"))
    config.data.folder, config.data.data_dir, config.init_from = "images", "gs://bucket/tfds", "/runs/a"
    resolved = config_lib.with_absolute_paths(config)
    assert resolved.data.folder == str(tmp_path / "images")
    assert (resolved.data.data_dir, resolved.init_from, resolved.data.box_file) == ("gs://bucket/tfds", "/runs/a",
                                                                                     config.data.box_file)
    assert config.data.folder == "images"
