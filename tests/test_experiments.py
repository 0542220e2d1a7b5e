"""The experiments/ scripts that produce docs/results: their rows are valid configs the report tells
apart, and the paper-tables runner skips, resumes, records divergence and stops on preemption as it
says. The runner is driven with a stand-in for `python`, so no training runs here."""

import json
import os
import re
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from conftest import REPO, report_title_and_columns
from pivot_jax import config_lib, report


def script_rows(script: str) -> list[tuple[str, str, list[str]]]:
    """The (name, config argument, override flags) rows an experiments/ script runs."""
    text = (REPO / "experiments" / script).read_text()
    return [(name, arg, overrides.split()) for name, arg, overrides
            in re.findall(r'^\s*"([^|"\s]+)\|([^|"]*)\|([^"]*)"$', text, flags=re.MULTILINE)]


def parse_like_the_command_line(config_file: str, arg: str, overrides: list[str]) -> dict:
    argv = ["prog", f"--config={config_file}:{arg}", *overrides]
    flag_values = flags.FlagValues()
    # ml_collections finds the override flags in sys_argv (sys.argv unless given).
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    config = flag_values.config
    config_lib.validate(config, num_devices=1)
    return json.loads(config.to_json())


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_every_paper_tables_row_is_a_valid_config_with_its_own_report_row(config_path, dataset):
    """A mistyped flag or a row the report cannot tell from another fails here, not hours into a run."""
    rows = script_rows("paper_tables.sh")
    assert len(rows) >= 10
    seen = {}
    for name, arg, overrides in rows:
        config = parse_like_the_command_line(config_path(dataset), arg, overrides)
        key = (report.row_label(config), tuple(config["perturb"]["kinds"]) if config["loss"]["mode"] != "clean" else ())
        assert key not in seen, f"{name} and {seen.get(key)} land in one report row {key}"
        seen[key] = name
        if name != "clean":
            assert config["perturb"]["kinds"] == [name.split("_")[0]], name


def test_every_divergence_study_variant_changes_the_pivot_setting(config_path):
    rows = script_rows("divergence_study.sh")
    assert len(rows) >= 6
    parsed = {name: parse_like_the_command_line(config_path("mnist"), arg, overrides)
              for name, arg, overrides in rows}
    assert parsed["pivot"]["loss"]["mode"] == "pivot"
    for name, config in parsed.items():
        assert name == "pivot" or config != parsed["pivot"], f"{name} trains the same setting as pivot"


# Stands in for `python`: the training finishes (writing the results of its last step), is preempted
# (returns cleanly without them, as train.py does after SIGTERM) or diverges, as $FAKE_TRAIN says;
# every `python -m` call is recorded in $CALLS.
FAKE_PYTHON = r"""#!/usr/bin/env bash
[[ "$1" == -m ]] || exec "$REAL_PYTHON" "$@"  # the scripts' own summaries run for real
echo "$*" >> "$CALLS"
for arg in "$@"; do
  case "$arg" in --workdir=*) workdir="${arg#--workdir=}" ;; --config.num_train_steps=*) steps="${arg#*=}" ;; esac
done
case "$2" in
  pivot_jax.train)
    mkdir -p "$workdir/eval" && echo '{}' > "$workdir/config.json"
    case "$FAKE_TRAIN" in
      finish) echo "[50] train/grad_norm=1.5, train/l_dist=80.0"
              printf '{\n  "step": %s,\n  "accuracy": {"clean": 0.9}\n}\n' "$steps" > "$workdir/eval/results.json" ;;
      preempt) echo "Stopped at step 40 for preemption" ;;
      diverge) echo "TrainingError: non-finite gradient norm by step 50"; exit 1 ;;
    esac ;;
  pivot_jax.evaluate) touch "$workdir/eval/sweeps.png" ;;
  pivot_jax.publish) out="${4#--out=}" && mkdir -p "$out/checkpoints/100" ;;
esac
"""


@pytest.fixture
def run_script(tmp_path):
    """Runs an experiments/ script with the stand-in `python` and RUN_ROOT = tmp_path/runs; returns
    (exit status, output, the modules it ran in order)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    calls = tmp_path / "calls.txt"

    def run(script: str, args: list[str], fake_train: str, **env):
        calls.write_text("")
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls),
               "REAL_PYTHON": sys.executable, "FAKE_TRAIN": fake_train, **env}
        done = subprocess.run(["bash", str(REPO / "experiments" / script), *args, str(tmp_path / "runs")],
                              env=env, capture_output=True, text=True, timeout=60)
        modules = [line.split()[1] for line in calls.read_text().splitlines()]
        return done.returncode, done.stdout + done.stderr, modules

    return run


@pytest.fixture
def paper_tables(run_script, tmp_path):
    """experiments/paper_tables.sh on MNIST, 100 steps, the given rows, keeping them in tmp_path/keep."""
    return lambda fake_train, rows: run_script("paper_tables.sh", ["mnist", "100"], fake_train, ROWS=rows,
                                               KEEP=str(tmp_path / "keep"))


def test_paper_tables_stops_on_preemption_without_evaluating_the_unfinished_run(paper_tables, tmp_path):
    status, output, modules = paper_tables("preempt", "clean noise_mixed")
    assert status == 75, output
    assert "clean seed 0: " in output and "stopped before step 100 (preempted)" in output
    assert modules == ["pivot_jax.train"]  # no evaluation, and not the next row
    assert not (tmp_path / "keep").exists() or not any((tmp_path / "keep").rglob("results.json"))

    status, output, modules = paper_tables("finish", "clean noise_mixed")  # the same command resumes
    assert status == 0, output
    # Each finished row is kept with its model published beside its results.
    assert modules == ["pivot_jax.train", "pivot_jax.evaluate", "pivot_jax.publish"] * 2 + ["pivot_jax.report"] * 2
    kept = tmp_path / "keep" / "mnist_100"
    assert json.loads((kept / "noise_mixed_seed0" / "eval" / "results.json").read_text())["step"] == 100
    assert (kept / "noise_mixed_seed0" / "checkpoints" / "100").is_dir()

    status, output, modules = paper_tables("finish", "clean noise_mixed")  # nothing left to train
    assert status == 0 and modules == ["pivot_jax.report"] * 2, output
    assert "clean seed 0: done" in output


def test_paper_tables_records_a_diverged_row_and_goes_on(paper_tables, tmp_path):
    status, output, modules = paper_tables("diverge", "noise_pivot noise_mixed")
    assert status == 0, output
    assert modules == ["pivot_jax.train", "pivot_jax.train", "pivot_jax.report"]  # the noise report only
    diverged = tmp_path / "keep" / "mnist_100" / "noise_pivot_seed0" / "diverged.txt"
    assert "non-finite gradient norm by step 50" in diverged.read_text()
    status, output, modules = paper_tables("finish", "noise_pivot")  # a diverged row is not run again
    assert "noise_pivot seed 0: diverged before" in output and "pivot_jax.train" not in modules


@pytest.mark.parametrize("dataset, committed", [("mnist", "mnist_9000"), ("cifar10", "cifar10_40000")])
def test_paper_tables_builds_the_committed_reports_columns_and_titles(run_script, tmp_path, dataset, committed):
    """Rerunning the script rebuilds each table of docs/results as committed, not a narrower one."""
    status, output, modules = run_script("paper_tables.sh", [dataset, "100"], "finish", ROWS="clean noise_mixed lr_mixed",
                                         SEEDS="0", EXTRA_SEEDS="")
    assert status == 0 and modules.count("pivot_jax.report") == 2, output
    calls = [call.split() for call in (tmp_path / "calls.txt").read_text().splitlines()
             if "pivot_jax.report" in call]
    for kind in ("noise", "lr"):
        title, columns = report_title_and_columns(
            (REPO / "docs" / "results" / committed / f"report_{kind}" / "report.md").read_text())
        call = next(call for call in calls if any(arg.endswith(f"/report_{kind}") for arg in call))
        assert f"--columns={','.join(columns)}" in call
        assert " ".join(call).endswith(f"--title={title.replace(committed.split('_')[1], '100')}")


def test_divergence_study_stops_on_preemption_and_resumes_with_its_whole_log(run_script, tmp_path):
    status, output, modules = run_script("divergence_study.sh", ["100"], "preempt", SEEDS="0")
    assert status == 75 and "pivot seed 0: stopped before step 100 (preempted)" in output, output
    assert modules == ["pivot_jax.train"]
    status, output, modules = run_script("divergence_study.sh", ["100"], "finish", SEEDS="0")
    assert status == 0, output
    assert modules == ["pivot_jax.train"] * len(script_rows("divergence_study.sh"))
    log = (tmp_path / "runs" / "divergence_100" / "pivot_seed0.log").read_text()
    assert "Stopped at step 40 for preemption" in log  # the first part of the run, kept
    summary = json.loads((tmp_path / "runs" / "divergence_100" / "summary.json").read_text())
    assert summary["variants"]["pivot"] == [{"seed": 0, "status": "finished", "step": 100, "accuracy": {"clean": 0.9},
                                            "max_logged_l_dist": 80.0}]


def test_divergence_study_runs_the_variants_asked_for_and_plots_their_curves(run_script, tmp_path):
    status, output, modules = run_script("divergence_study.sh", ["100"], "finish", SEEDS="0",
                                         VARIANTS="pivot pivot_lam2_5e-5 pivot_lam2_2.5e-5")
    assert status == 0, output
    assert modules == ["pivot_jax.train"] * 3
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert [c for c in calls if "--config.loss.lam2=2.5e-5" in c and "pivot_lam2_2.5e-5_seed0" in c]
    out = tmp_path / "runs" / "divergence_100"
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["variants"]) == ["pivot", "pivot_lam2_2.5e-5", "pivot_lam2_5e-5"]
    assert (out / "divergence.png").stat().st_size > 5_000
    status, output, _ = run_script("divergence_study.sh", ["100"], "finish", SEEDS="0", VARIANTS="pivot lam2_5e-5")
    assert status == 2 and "VARIANTS: no variant lam2_5e-5; the variants are: pivot mixed_paired" in output


@pytest.mark.parametrize("steps, every", [(100, 10), (9000, 900), (40000, 1000)])
def test_paper_tables_checkpoints_every_tenth_of_the_schedule_at_most_1000_steps_apart(run_script, tmp_path,
                                                                                        steps, every):
    status, output, modules = run_script("paper_tables.sh", ["cifar10", str(steps)], "preempt", ROWS="clean")
    assert status == 75 and modules == ["pivot_jax.train"], output
    assert f"--config.checkpoint_every_steps={every}" in (tmp_path / "calls.txt").read_text().split()


@pytest.mark.parametrize("extra_seeds, trained_seeds", [(None, ["0", "1"]), ("", ["0"]), ("2 3", ["0", "2", "3"])])
def test_paper_tables_extra_seeds_default_to_seed_1_on_cifar10_and_an_empty_value_means_none(
        run_script, tmp_path, monkeypatch, extra_seeds, trained_seeds):
    monkeypatch.delenv("EXTRA_SEEDS", raising=False)
    env = {"ROWS": "noise_mixed"} if extra_seeds is None else {"ROWS": "noise_mixed", "EXTRA_SEEDS": extra_seeds}
    status, output, modules = run_script("paper_tables.sh", ["cifar10", "100"], "finish", **env)
    assert status == 0, output
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    seeds = [arg.split("=")[1] for call in calls if "pivot_jax.train" in call
             for arg in call.split() if arg.startswith("--config.seed=")]
    assert seeds == trained_seeds
