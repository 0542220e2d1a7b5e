"""Evaluation: restore on any device count, no example dropped, exact accuracy, clear errors; and the report."""

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from conftest import CONFIGS, EIGHT_DEVICES, ONE_DEVICE, REPO, report_title_and_columns, run_train
from pivot_jax import checkpoint, config_lib, data, evaluate, models, perturb, report, results, workdirs
from test_train import logged_scalars, saved_params


@pytest.fixture(scope="module")
def trained_on_eight(mnist_data_dir, tmp_path_factory):
    """A smoke run trained on 8 fake devices, and its evaluation in that 8-device setting; and the same
    run on one device. Returns (workdir, results.json of the 8-device run, workdir of the 1-device run)."""
    workdir, on_one = tmp_path_factory.mktemp("eight"), tmp_path_factory.mktemp("one")
    args = [f"--config={CONFIGS / 'mnist.py'}:mode=pivot,perturb=noise,smoke", "--config.log_every_steps=1",
            f"--config.data.data_dir={mnist_data_dir}"]
    for devices, env, run_dir in ((8, EIGHT_DEVICES, workdir), (1, ONE_DEVICE, on_one)):
        result = run_train([*args, f"--workdir={run_dir}"], env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"on {devices} devices" in result.stderr
    env = {**os.environ, **EIGHT_DEVICES}
    evaluated = subprocess.run([sys.executable, "-m", "pivot_jax.evaluate", *args, f"--workdir={workdir}"], env=env,
                               cwd=REPO, capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    return workdir, json.loads((workdir / "eval" / "results.json").read_text()), on_one


def test_eight_devices_train_like_one(trained_on_eight):
    """Same global batch (and the same per-example noise) on 1 and on 8 fake devices: only the order of
    float reductions differs."""
    eight, _, one = trained_on_eight
    losses = {name: logged_scalars(path, "train/loss") for name, path in (("one", one), ("eight", eight))}
    assert sorted(losses["one"]) == list(range(1, 13))
    np.testing.assert_allclose([losses["eight"][s] for s in range(1, 13)], [losses["one"][s] for s in range(1, 13)],
                               rtol=2e-4)
    (_, on_one), (_, on_eight) = saved_params(one), saved_params(eight)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4, rtol=2e-3), on_one, on_eight)


def smoke_config(mnist_config):
    return mnist_config("mode=pivot,perturb=noise,smoke")


def test_checkpoint_from_eight_devices_evaluates_the_same_on_one(trained_on_eight, mnist_config):
    workdir, on_eight, _ = trained_on_eight
    assert jax.device_count() == 1
    on_one = evaluate.evaluate_checkpoint(smoke_config(mnist_config), str(workdir))
    assert on_one["step"] == on_eight["step"] == 12
    assert set(on_one["accuracy"]) == set(config_lib.load_config(str(CONFIGS / "mnist.py")).evals) | set(
        config_lib.load_config(str(CONFIGS / "mnist.py")).sweep_evals)
    assert on_one["accuracy"] == pytest.approx(on_eight["accuracy"], abs=1.5 / 256)  # at most one example
    assert (workdir / "eval" / "sweeps.png").stat().st_size > 10_000
    assert "MR boxes: default centred box" in (workdir / "eval" / "results.md").read_text()


@pytest.mark.slow
def test_whole_split_is_evaluated_when_the_batch_does_not_divide_it(trained_on_eight, mnist_config):
    workdir, _, _ = trained_on_eight
    config = smoke_config(mnist_config)
    config.data.test_examples = 0  # the whole test split: 10,000 examples
    config.data.eval_batch_size = 768  # 13 batches, the last one padded
    config.evals, config.sweep_evals = ("clean",), ()
    result = evaluate.evaluate_checkpoint(config, str(workdir))
    assert result["num_examples"] == 10_000
    saved = json.loads((workdir / "eval" / "results.json").read_text())
    assert saved["num_examples"] == {"clean": 10_000}


@pytest.mark.slow
def test_accuracy_equals_a_direct_computation(trained_on_eight, mnist_config):
    workdir, _, _ = trained_on_eight
    config = smoke_config(mnist_config)
    config.data.test_examples = 300
    config.data.eval_batch_size = 128
    config.evals, config.sweep_evals = ("clean", "lr4_nearest", "mr2_nearest"), ()
    result = evaluate.evaluate_checkpoint(config, str(workdir))

    _, state = checkpoint.saved_state(workdir)
    split = data.open_split(config.data, "test")
    images = split.source.images[:300].astype(np.float32) / 255.0
    labels = split.source.labels[:300]
    lr = np.repeat(np.repeat(images[:, ::4, ::4], 4, 1), 4, 2)
    mr = np.repeat(np.repeat(images[:, ::2, ::2], 2, 1), 2, 2)
    mr[:, 7:21, 7:21] = images[:, 7:21, 7:21]  # the default box: the centre half of each side
    model = models.get_model(config.model.name, num_classes=10)
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    for name, inputs in (("clean", images), ("lr4_nearest", lr), ("mr2_nearest", mr)):
        logits = np.asarray(model.apply(variables, jnp.asarray(inputs - np.asarray(state["input_mean"]))))
        assert result["accuracy"][name] == np.mean(logits.argmax(-1) == labels), name


def test_each_test_condition_draws_its_own_noise_the_same_in_any_batch():
    """Severities (and σ of the noise sweep) draw independently, as the published corruption sets do, and
    an example's draws depend on its index and condition only: not on the batch it is evaluated in."""
    images, boxes = jnp.full((8, 16, 16, 1), 0.5), jnp.zeros((8, 4))

    def noise(name, indices):
        keys = evaluate.example_keys(jnp.asarray(indices, jnp.int32), name)
        return np.asarray(perturb.EvalPerturbation.parse(name).apply(keys, images[: len(indices)], boxes)) - 0.5

    weak, strong = noise("noise_0.05", range(8)), noise("noise_0.1", range(8))
    assert abs(np.corrcoef(weak.ravel(), strong.ravel())[0, 1]) < 0.2  # one draw scaled would give 1
    np.testing.assert_array_equal(noise("noise_0.05", [5, 6]), weak[5:7])
    corruption = [np.asarray(perturb.EvalPerturbation.parse(f"gaussian_noise_{s}").apply(
        evaluate.example_keys(jnp.arange(8), f"gaussian_noise_{s}"), images, boxes)) for s in (1, 2)]
    assert abs(np.corrcoef(*(c.ravel() - 0.5 for c in corruption))[0, 1]) < 0.2


@pytest.mark.slow
def test_evaluation_errors(trained_on_eight, mnist_config, tmp_path):
    workdir, _, _ = trained_on_eight
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in"):
        evaluate.evaluate_checkpoint(smoke_config(mnist_config), str(tmp_path))
    with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint at step 7 .* it has \[6, 12\]"):
        evaluate.evaluate_checkpoint(smoke_config(mnist_config), str(workdir), step=7)
    other_model = smoke_config(mnist_config)
    other_model.model.name = "resnet20"
    with pytest.raises(checkpoint.CheckpointError, match="does not fit the config's model"):
        evaluate.evaluate_checkpoint(other_model, str(workdir))
    unreadable = smoke_config(mnist_config)
    unreadable.data.box_file = str(tmp_path / "missing.csv")
    with pytest.raises(data.DataError, match="config.data.box_file: cannot read"):
        evaluate.evaluate_checkpoint(unreadable, str(workdir))
    # mCE against a baseline run needs this run on the suite, and a baseline evaluated on it.
    with pytest.raises(evaluate.ConfigError, match="add 'corruptions' to config.sweep_evals"):
        evaluate.evaluate_checkpoint(smoke_config(mnist_config), str(workdir), baseline=str(tmp_path))
    on_suite = smoke_config(mnist_config)
    on_suite.sweep_evals = ("corruptions",)
    with pytest.raises(evaluate.ConfigError, match="no eval/results.json there"):
        evaluate.evaluate_checkpoint(on_suite, str(workdir), baseline=str(tmp_path))
    assert not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_earlier_step_goes_to_its_own_folder(trained_on_eight, mnist_config):
    workdir, _, _ = trained_on_eight
    config = smoke_config(mnist_config)
    config.evals, config.sweep_evals = ("clean",), ()
    result = evaluate.evaluate_checkpoint(config, str(workdir), step=6)
    assert result["step"] == 6
    assert json.loads((workdir / "eval" / "step_6" / "results.json").read_text())["step"] == 6


def fake_run(path, dataset, mode, kinds, seed, accuracy, symmetric=False, paired=False, diverged=None):
    path.mkdir(parents=True)
    config = config_lib.load_config(f"{CONFIGS / (dataset + '.py')}:mode={mode},perturb={'+'.join(kinds) or 'noise'}")
    config.seed = seed
    config.loss.symmetric = symmetric
    config.loss.paired = paired
    (path / "config.json").write_text(config.to_json_best_effort())
    if diverged:
        (path / "diverged.txt").write_text(diverged)
        return str(path)
    (path / "eval").mkdir()
    (path / "eval" / "results.json").write_text(json.dumps({"step": 100, "accuracy": accuracy,
                                                            "num_examples": {k: 10 for k in accuracy}}))
    return str(path)


def test_report_rows_seeds_and_paper_numbers(tmp_path):
    base = {"clean": 0.9, "noise_0.05": 0.8, "noise_0.15": 0.5, "lr4_nearest": 0.2, "lr4_bicubic": 0.25,
            "mr4_nearest": 0.6}
    runs = [
        fake_run(tmp_path / "clean", "cifar10", "clean", (), 0, base),
        fake_run(tmp_path / "pivot0", "cifar10", "pivot", ("noise",), 0, {**base, "noise_0.15": 0.70}),
        fake_run(tmp_path / "pivot1", "cifar10", "pivot", ("noise",), 1, {**base, "noise_0.15": 0.74}),
        fake_run(tmp_path / "mixed", "cifar10", "mixed", ("noise",), 0, base),
        fake_run(tmp_path / "symmetric", "cifar10", "pivot", ("noise",), 0, {**base, "noise_0.15": 0.60}, True),
    ]
    text = report.write_report(runs, tmp_path / "out", columns=["clean", "noise_0.05", "noise_0.15"], title="Noise")
    assert "| Clean only | 90.00 (91.6) | 80.00 (62.4) | 50.00 (16.6) | 1: 0 |" in text
    # Two seeds: mean ± sample standard deviation (70 and 74: 2.83), and each seed in its own table.
    assert "| Pivot loss (Ours) | 90.00 ± 0.00 (90.8) | 80.00 ± 0.00 (89.6) | 72.00 ± 2.83 (81.7) | 2: 0, 1 |" in text
    assert "| Pivot loss (Ours) | 1 | 90.00 | 80.00 | 74.00 | 100 |" in text
    assert "| Clean, Noisy | 90.00 (90.5)" in text
    main_table = text.split("Every seed:")[0]
    order = [line.split(" | ")[0] for line in main_table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    # The symmetric ablation is a row of its own, without the paper's numbers.
    assert "| Pivot loss, symmetric | 90.00 | 80.00 | 60.00 | 1: 0 |" in text
    assert order == ["| Clean only", "| Clean, Noisy", "| Pivot loss (Ours)", "| Pivot loss, symmetric"]
    assert (tmp_path / "out" / "sweeps.png").stat().st_size > 10_000
    (tmp_path / "out" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no eval/results.json"):
        report.load_run(tmp_path / "out")


def test_report_compares_pivot_with_mixed_seed_by_seed_and_shows_diverged_runs(tmp_path):
    base = {"clean": 0.9, "noise_0.05": 0.8, "noise_0.15": 0.5}
    runs = []
    # Pivot beats mixed by 2, 3 and 4 points at sigma 0.15 (a clear gain), by -1, +1, 0 on clean inputs.
    for seed, (gain, clean) in enumerate(((0.02, -0.01), (0.03, 0.01), (0.04, 0.0))):
        runs.append(fake_run(tmp_path / f"mixed{seed}", "cifar10", "mixed", ("noise",), seed, base))
        runs.append(fake_run(tmp_path / f"sym{seed}", "cifar10", "pivot", ("noise",), seed,
                             {**base, "noise_0.15": 0.5 + gain, "clean": 0.9 + clean}, symmetric=True))
    runs.append(fake_run(tmp_path / "paired0", "cifar10", "mixed", ("noise",), 0, {**base, "noise_0.15": 0.6},
                         paired=True))
    runs.append(fake_run(tmp_path / "pivot0", "cifar10", "pivot", ("noise",), 0, {},
                         diverged="error: non-finite loss by step 450 (loss nan, gradient norm inf)"))
    text = report.write_report(runs, tmp_path / "out", columns=["clean", "noise_0.15"])
    assert "| Pivot loss (Ours) | diverged (90.8) | diverged (81.7) | 1: 0 (diverged) | diverged by 450 |" in text
    assert "| Clean, Noisy, paired | 90.00 | 60.00 | 1: 0 | 100 |" in text
    lines = {tuple(cell.strip() for cell in line.split("|")[1:4]): line for line in text.splitlines()
             if line.startswith("| Pivot loss, symmetric | Clean")}
    # Mean +3.00, sd 1.00, t(2) 4.303: interval 3 ± 2.48, above zero, p 0.035. Holm over the row's two
    # comparisons with seeds (clean: p 1) doubles the smaller p: 0.070, no longer below 0.05.
    assert ("+3.00 ± 1.00 | [+0.52, +5.48] | 0.035 | holds | 0.070 | cannot be told apart |"
            in lines[("Pivot loss, symmetric", "Clean, Noisy", "noise_0.15")])
    assert "| 1.000 | cannot be told apart | 1.000 | cannot be told apart |" in lines[
        ("Pivot loss, symmetric", "Clean, Noisy", "clean")]
    # Against the paired control only seed 0 exists: 52 - 60 = -8 points, but one seed tells nothing.
    assert "| 1: 0 | -8.00 | – | – | cannot be told apart (one seed) | – | – |" in lines[
        ("Pivot loss, symmetric", "Clean, Noisy, paired", "noise_0.15")]
    assert (tmp_path / "out" / "sweeps.png").stat().st_size > 10_000


def test_report_gives_each_seeds_end_in_seed_order_when_they_differ(tmp_path):
    base = {"clean": 0.9, "noise_0.15": 0.5}
    runs = [fake_run(tmp_path / "pivot1", "cifar10", "pivot", ("noise",), 1, {},
                     diverged="error: non-finite grad_norm by step 300 (loss nan, gradient norm nan)"),
            fake_run(tmp_path / "pivot0", "cifar10", "pivot", ("noise",), 0, {},
                     diverged="error: non-finite grad_norm by step 450 (loss nan, gradient norm nan)"),
            fake_run(tmp_path / "pivot2", "cifar10", "pivot", ("noise",), 2, base)]
    text = report.write_report(runs, tmp_path / "out", columns=["clean", "noise_0.15"])
    assert "| 3: 0 (diverged), 1 (diverged), 2 | diverged by 450, diverged by 300, 100 |" in text


@pytest.mark.slow
def test_report_gives_the_suite_mean_and_mce_against_a_baseline(tmp_path):
    from pivot_jax import conditions
    from pivot_jax.errors import ConfigError

    def suite(clean, corrupted):
        accuracy = {"clean": clean, "noise_0.15": corrupted}
        accuracy.update({name: corrupted for name in conditions.suite_names()})
        return accuracy

    clean_run = fake_run(tmp_path / "clean", "cifar10", "clean", (), 0, suite(0.9, 0.6))
    runs = [clean_run,
            fake_run(tmp_path / "pivot0", "cifar10", "pivot", ("shot_noise",), 0, suite(0.95, 0.8)),
            fake_run(tmp_path / "pivot1", "cifar10", "pivot", ("shot_noise",), 1, suite(0.95, 0.7)),
            fake_run(tmp_path / "mixed", "cifar10", "mixed", ("noise",), 0, {"clean": 0.9, "noise_0.15": 0.7})]
    text = report.write_report(runs, tmp_path / "out", columns=["clean", "noise_0.15"], baseline=clean_run)
    # Seeds 0 and 1: suite means 80 and 70; mCE 20/40 and 30/40; relative mCE 15/30 and 25/30 (of 100).
    assert "| Pivot loss (Ours) | 2: 0, 1 | 18 | 75.00 ± 7.07 | 62.50 ± 17.68 | 66.67 ± 23.57 |" in text
    assert "| Clean only | 1: 0 | 18 | 60.00 | 100.00 | 100.00 |" in text
    assert "| Clean, Noisy |" not in text.split("Common corruptions")[1]  # not evaluated on the suite
    assert (tmp_path / "out" / "corruptions.png").stat().st_size > 10_000
    without = report.write_report(runs, tmp_path / "out2", columns=["clean"])
    assert "| Pivot loss (Ours) | 2: 0, 1 | 18 | 75.00 ± 7.07 |\n" in without and "relative mCE" not in without
    with pytest.raises(ConfigError, match="--baseline=.*mixed: its eval/results.json lacks 70 of the"):
        report.write_report(runs, tmp_path / "out3", baseline=str(tmp_path / "mixed"))


def named_runs(report_text: str) -> list[str]:
    """The run directories a report.md names on its closing "Runs:" line."""
    return re.findall(r"`([^`]+)`", next(line for line in report_text.splitlines() if line.startswith("Runs: ")))


@pytest.mark.parametrize("committed", sorted(str(path.relative_to(REPO))
                                              for path in (REPO / "docs" / "results").glob("**/report.md")))
def test_the_committed_reports_are_what_their_runs_give(committed, monkeypatch):
    """docs/results: each report.md, rebuilt from the run directories, title, columns and baseline it
    names, is the text committed; a run added or changed without rerunning the report fails here."""
    monkeypatch.chdir(REPO)  # the reports name their runs relative to the repository
    text = (REPO / committed).read_text()
    title, columns = report_title_and_columns(text)
    run_dirs = named_runs(text)
    baseline = re.search(r"mCE and relative mCE against `([^`]+)`", text)
    rebuilt = report.build_report([report.load_run(d) for d in run_dirs], columns, title,
                                  results.read_baseline(baseline.group(1)) if baseline else None)
    assert rebuilt == text


def test_every_committed_run_beside_a_report_is_in_one():
    reports = list((REPO / "docs" / "results").glob("**/report.md"))
    assert reports
    for folder in {path.parent.parent for path in reports}:
        named = {pathlib.PurePosixPath(d).name for path in folder.glob("*/report.md")
                 for d in named_runs(path.read_text())}
        runs = {path.parent.name for path in folder.glob("*/config.json")}
        assert runs and runs <= named, f"{folder}: runs in no report: {sorted(runs - named)}"


def test_paired_difference_verdicts():
    assert report.paired_difference([1, 2, 3], [3, 4, 5.5])["verdict"] == "does not hold"
    assert report.paired_difference([1, 2, 3], [1, 2, 3])["verdict"] == "cannot be told apart"
    assert report.paired_difference([1, 2, 3], [1, 2, 3])["p"] == 1.0


def test_paired_difference_is_the_paired_t_test():
    """The p-value is scipy's paired t-test, and the 95% interval excludes zero exactly when p < 0.05."""
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 12):
        for shift in (0.0, 0.5, 2.0, -2.0):
            a, b = rng.normal(size=n) + shift, rng.normal(size=n)
            result = report.paired_difference(a, b)
            assert result["p"] == pytest.approx(scipy.stats.ttest_rel(a, b).pvalue, rel=1e-9)
            assert (result["low"] > 0 or result["high"] < 0) == (result["p"] < 0.05), (n, shift, result)
            assert (result["verdict"] != "cannot be told apart") == (result["p"] < 0.05)


def test_holm_adjusted_p_values():
    # Holm: sorted p times (m - rank), made monotone; 0.03 * 2 = 0.06 carries over to 0.04.
    assert report.holm_adjusted([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert report.holm_adjusted([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert report.holm_adjusted([]) == []


def test_holm_families_are_per_pivot_row(tmp_path):
    """The symmetric row on three conditions: one gain clear enough to survive Holm's correction over
    the three, one that holds alone (p < 0.05) but not after it (0.025 <= p), one at zero. The paper's
    pivot row, compared on the same seeds, is a family of its own and does not weaken those verdicts."""
    mixed = {"clean": [0.800, 0.810, 0.820], "noise_0.05": [0.8925, 0.8955, 0.9055], "noise_0.15": [0.5, 0.6, 0.7]}
    symmetric = {"clean": [0.900, 0.910, 0.920], "noise_0.05": [0.900, 0.905, 0.910], "noise_0.15": [0.5, 0.6, 0.7]}
    runs = []
    for seed in range(3):
        runs.append(fake_run(tmp_path / f"mixed{seed}", "mnist", "mixed", ("noise",), seed,
                             {c: v[seed] for c, v in mixed.items()}))
        runs.append(fake_run(tmp_path / f"sym{seed}", "mnist", "pivot", ("noise",), seed,
                             {c: v[seed] for c, v in symmetric.items()}, symmetric=True))
        runs.append(fake_run(tmp_path / f"pivot{seed}", "mnist", "pivot", ("noise",), seed,
                             {c: 0.5 + 0.001 * seed for c in mixed}))
    text = report.write_report(runs, tmp_path / "out", columns=list(mixed))
    lines = {line.split(" | ")[2]: line for line in text.splitlines()
             if line.startswith("| Pivot loss, symmetric | Clean, Noisy |")}
    p_noise = report.paired_difference([90, 90.5, 91], [89.25, 89.55, 90.55])["p"]
    assert 0.05 / 2 <= p_noise < 0.05  # what the case is built to show
    assert lines["clean"].endswith("| holds | 0.000 | holds |")
    assert lines["noise_0.05"].endswith(f"| {p_noise:.3f} | holds | {2 * p_noise:.3f} | cannot be told apart |")
    assert lines["noise_0.15"].endswith("| 1.000 | cannot be told apart | 1.000 | cannot be told apart |")


PUBLISHED = sorted(path.parent.parent.parent for path in (REPO / "docs" / "results").glob("*/*/checkpoints/*/state"))


def claims_rows(root, accuracies: dict[str, dict[str, list[float]]], **pivot_options):
    """Rows `root/<name>_seed<s>` from {name: {condition: per-seed accuracy}}; names starting with
    "pivot" are pivot runs (with `pivot_options`), the others mixed."""
    for name, by_condition in accuracies.items():
        for seed in range(len(next(iter(by_condition.values())))):
            mode = "pivot" if name.startswith("pivot") else "mixed"
            fake_run(root / f"{name}_seed{seed}", "cifar10", mode, ("noise",), seed,
                     {c: v[seed] for c, v in by_condition.items()}, **(pivot_options if mode == "pivot" else {}))


def test_claims_table_corrects_each_family_and_checks_clean_accuracy_as_non_inferiority(tmp_path):
    """A family's perturbed conditions share Holm's correction (clean is the non-inferiority check
    beside them, outside it); another family's tests do not weaken them; diverged seeds are named."""
    claims_rows(tmp_path, {"mixed": {"noise_0.15": [0.50, 0.60, 0.70], "noise_0.05": [0.80, 0.80, 0.80],
                                     "clean": [0.900, 0.910, 0.920]},
                           "pivot": {"noise_0.15": [0.520, 0.621, 0.719], "noise_0.05": [0.81, 0.80, 0.83],
                                     "clean": [0.899, 0.910, 0.9195]}}, symmetric=True)
    claims_rows(tmp_path, {"other_mixed": {"noise_0.15": [0.5, 0.6]}, "pivot_other": {"noise_0.15": [0.4, 0.7]}})
    fake_run(tmp_path / "pivot_diverging_seed0", "cifar10", "pivot", ("noise",), 0, {}, diverged="non-finite by step 700")
    fake_run(tmp_path / "pivot_diverging_seed1", "cifar10", "pivot", ("noise",), 1, {"noise_0.15": 0.62})
    rows = {name: str(tmp_path / name) for name in ("mixed", "pivot", "other_mixed", "pivot_other", "pivot_diverging")}
    table = report.claims_table([
        f"A: {rows['pivot']} vs {rows['mixed']} @ noise_0.15,noise_0.05,clean; {rows['pivot_diverging']} vs {rows['mixed']} @ noise_0.15",
        f"B: {rows['pivot_other']} vs {rows['other_mixed']} @ noise_0.15"]).splitlines()
    strong = report.paired_difference([52.0, 62.1, 71.9], [50, 60, 70])
    weak = report.paired_difference([81, 80, 83], [80, 80, 80])
    holm_strong, holm_weak = report.holm_adjusted([strong["p"], weak["p"]])
    line = next(row for row in table if "at σ = 0.15" in row and "symmetric" in row)
    assert f"| {strong['p']:.3f} | {holm_strong:.3f} (A, 2) | holds |" in line and "3: 0, 1, 2 | +2.00 ± 0.10" in line
    line = next(row for row in table if "at σ = 0.05" in row)
    assert f"| {holm_weak:.3f} (A, 2) | cannot be told apart |" in line
    # Clean: -0.03 ± 0.06 over 3 seeds; one-sided 95% bound -0.03 - 2.92 * 0.058 / sqrt(3) = -0.13 > -0.5.
    line = next(row for row in table if "keeps clean accuracy against `mixed`" in row)
    assert line.endswith("| – | holds (bound -0.13) |") and "stop-gradient" not in line
    line = next(row for row in table if "stop-gradient" in row and "(A" not in row and "| 1: 1 |" in row)
    assert line.endswith("cannot be told apart (one seed); 1 of 2 seeds diverged (by step 700) |")
    assert "(B, 1)" in next(row for row in table if "| 2: 0, 1 |" in row)


def test_claims_family_errors(tmp_path):
    from pivot_jax.errors import ConfigError

    for spec in ("no colon here", "A: x vs y", "A: x @ clean", "A:  vs y @ clean", ": x vs y @ clean"):
        with pytest.raises(ConfigError, match="expected 'NAME: PIVOT_ROW vs CONTROL_ROW @ CONDITION"):
            report.parse_family(spec)
    with pytest.raises(ConfigError, match=f"no runs {tmp_path}/nothing_seed<N>"):
        report.claims_table([f"A: {tmp_path}/nothing vs {tmp_path}/nothing @ clean"])
    claims_rows(tmp_path, {"mixed": {"clean": [0.9, 0.9]}, "pivot": {"clean": [0.9, 0.91]}})
    (tmp_path / "pivot_seed0.log").write_text("a run's log beside it is not a run\n")
    assert "| 2: 0, 1 |" in report.claims_table([f"A: {tmp_path}/pivot vs {tmp_path}/mixed @ clean"])
    (tmp_path / "notes.md").write_text("# Results\n\nbefore\n")
    family = f"A: {tmp_path}/pivot vs {tmp_path}/mixed @ clean"
    with pytest.raises(ConfigError, match="no line '<!-- claims table: begin -->'"):
        report.write_claims([family], tmp_path / "notes.md")
    (tmp_path / "notes.md").write_text(f"before\n{report.CLAIMS_BEGIN}\nafter\n")
    first = report.write_claims([family], tmp_path / "notes.md")
    assert (tmp_path / "notes.md").read_text() == f"before\n{first}\nafter\n"
    report.write_claims([family], tmp_path / "notes.md")  # again: the block is replaced, nothing else moves
    assert (tmp_path / "notes.md").read_text() == f"before\n{first}\nafter\n"


def committed_claims_families(text: str) -> tuple[str, list[str]]:
    """The --into file and the families of the command written under the claims table of `text`."""
    block = text.split(report.CLAIMS_BEGIN)[1].split(report.CLAIMS_END)[0]
    command = block.split("Built from the committed runs by:")[1].replace("\\\n", " ")
    arguments = shlex.split(command)
    assert arguments[:3] == ["python", "-m", "pivot_jax.report"]
    into = next(a.removeprefix("--into=") for a in arguments if a.startswith("--into="))
    return into, [a.removeprefix("--family=") for a in arguments if a.startswith("--family=")]


def test_the_committed_claims_table_is_what_its_runs_give(monkeypatch):
    """docs/results.md's claims table, rebuilt from the committed runs with the families its own command
    names, is the text committed: a run added or changed without rebuilding the table fails here."""
    monkeypatch.chdir(REPO)
    text = (REPO / "docs" / "results.md").read_text()
    into, families = committed_claims_families(text)
    assert into == "docs/results.md" and len(families) >= 4
    committed = report.CLAIMS_BEGIN + text.split(report.CLAIMS_BEGIN)[1].split(report.CLAIMS_END)[0] + report.CLAIMS_END
    assert report.claims_block(families, into) == committed


def markdown_table(lines: list[str]) -> dict[str, dict[str, str]]:
    """The rows of the Markdown table at the start of `lines`, by their first cell, as {column: cell}."""
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_the_paper_tables_in_results_md_are_their_reports_rows():
    """Each table of docs/results.md marked `<!-- rows from: REPORT, ... -->` has, in every cell, what
    the first table of one of those generated reports has in the same row and column."""
    lines = (REPO / "docs" / "results.md").read_text().splitlines()
    marked = [i for i, line in enumerate(lines) if line.startswith("<!-- rows from: ")]
    assert len(marked) == 4
    for i in marked:
        reported = {}
        for source in lines[i].removeprefix("<!-- rows from: ").removesuffix(" -->").split(", "):
            report_lines = (REPO / source).read_text().splitlines()
            reported.update(markdown_table(report_lines[next(j for j, line in enumerate(report_lines)
                                                             if line.startswith("| training |")):]))
        table = markdown_table(lines[i + 1 :])
        assert len(table) >= 5, lines[i]
        for row, cells in table.items():
            assert row in reported, (lines[i], row)
            assert {c: v for c, v in cells.items()} == {c: reported[row][c] for c in cells}, (lines[i], row)


def test_relative_links_in_the_documentation_lead_to_files():
    """Every relative link of README.md and docs/ names a file or folder of the repository."""
    for page in [REPO / "README.md", *(REPO / "docs").glob("**/*.md")]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path = target.split("#")[0]
            if not path or re.match(r"[a-z]+:", path):
                continue
            assert (page.parent / path).exists(), f"{page.relative_to(REPO)}: {target}"


def test_every_published_model_has_its_checksums_and_no_optimizer_state():
    assert PUBLISHED, "docs/results publishes at least one model"
    for run in PUBLISHED:
        (step,) = [p.name for p in (run / "checkpoints").iterdir()]
        assert (run / checkpoint.CHECKSUMS / f"{step}.json").exists() and checkpoint.verify(run, int(step)) is None
        assert json.loads((run / "eval" / "results.json").read_text())["step"] == int(step)
        assert not list((run / "checkpoints").rglob("*opt_state*"))


@pytest.mark.slow
def test_a_published_mnist_model_gives_its_committed_clean_accuracy(mnist_data_dir, tmp_path):
    """The committed weights, restored as `pivot_jax.evaluate --workdir=<run dir>` restores them, on the
    real MNIST test split: the accuracy its results.json publishes."""
    run = next(p for p in PUBLISHED if p.parent.name.startswith("mnist"))
    shutil.copytree(run, tmp_path / run.name)  # evaluation writes eval/: not into the repository
    config = workdirs.saved_config(tmp_path / run.name)
    config.data.data_dir, config.data.download = mnist_data_dir, False
    config.evals, config.sweep_evals = ("clean",), ()
    again = evaluate.evaluate_checkpoint(config, str(tmp_path / run.name))
    published = json.loads((run / "eval" / "results.json").read_text())
    assert again["step"] == published["step"] and again["num_examples"] == published["num_examples"]["clean"] == 10_000
    assert abs(again["accuracy"]["clean"] - published["accuracy"]["clean"]) <= 0.0005  # 5 of 10,000 images
