"""Results files: `results.json`, the Markdown table and the sweep plots (no JAX here).

`results.json` is `{"step": int, "accuracy": {name: float in [0, 1]}, "num_examples": {name: int},
"mr_boxes": str}` (docs/method.md, "Interfaces"). Files are written atomically (a temporary file, then
a rename), and the results of a step never replace those of a later step: an evaluation of an older
checkpoint that finishes after a newer one goes to `step_<step>/` beside them.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import logging
from etils import epath

from pivot_jax import conditions
from pivot_jax.errors import ConfigError


def markdown_table(accuracy: dict[str, float]) -> str:
    """One header row of test conditions and one row of accuracies in %."""
    names = list(accuracy)
    return "\n".join([
        "| " + " | ".join(names) + " |",
        "|" + "---|" * len(names),
        "| " + " | ".join(f"{100 * accuracy[n]:.2f}" for n in names) + " |",
    ])


def corruption_table(accuracy: dict[str, float]) -> str:
    """Accuracy (%) per corruption of the evaluated suite (rows) and severity (columns), with each
    corruption's mean."""
    lines = ["| corruption | " + " | ".join(str(s) for s in conditions.SEVERITIES) + " | mean |",
             "|---|" + "---:|" * (len(conditions.SEVERITIES) + 1)]
    for name in conditions.evaluated_suite(accuracy):
        values = [accuracy[f"{name}_{s}"] for s in conditions.SEVERITIES]
        lines.append(f"| {name} | " + " | ".join(f"{100 * v:.2f}" for v in values)
                     + f" | {100 * sum(values) / len(values):.2f} |")
    return "\n".join(lines)


def write_atomically(path, text: str) -> None:
    """`path` holds either its old content or `text`, never a part of it."""
    path = epath.Path(path)
    temporary = path.parent / f".{path.name}.tmp-{os.getpid()}"
    temporary.write_text(text)
    temporary.replace(path)


def read_json(path, expected: type, remedy: str):
    """The JSON value in the workdir file `path`, of type `expected` (dict or list): every workdir file
    is read here, so that a damaged one ends in one ConfigError naming it, what is wrong, and `remedy`."""
    path = epath.Path(path)
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON ({error}); {remedy}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file; {remedy}") from None
    if not isinstance(value, expected):
        raise ConfigError(f"{path}: expected a JSON {'object' if expected is dict else 'list'}, got "
                          f"{type(value).__name__} ({str(value)[:60]!r}); {remedy}")
    return value


def read_results(eval_dir) -> dict | None:
    """The `results.json` in `eval_dir`, or None where there is none."""
    path = epath.Path(eval_dir) / "results.json"
    if not path.exists():
        return None
    found = read_json(path, dict, "move it away to evaluate again")
    if not isinstance(found.get("accuracy"), dict):
        raise ConfigError(f"{path}: field accuracy: expected an object of accuracies by test condition; "
                          "move the file away to evaluate again")
    return found


def read_baseline(run_dir) -> dict:
    """The accuracies of a baseline run for mCE (`--baseline`): its `eval/results.json` must hold the
    benchmark's corruptions at every severity, and `clean`; else a ConfigError that says what is missing."""
    found = read_results(epath.Path(run_dir) / "eval")
    if found is None:
        raise ConfigError(f"--baseline={run_dir}: no eval/results.json there; evaluate the baseline run on the "
                          f"suite first (python -m pivot_jax.evaluate --workdir={run_dir} "
                          "--config.sweep_evals=\"('corruptions',)\")")
    accuracy = found["accuracy"]
    needed = ["clean", *conditions.mce_needed_names()]
    missing = [name for name in needed if name not in accuracy]
    if missing:
        raise ConfigError(f"--baseline={run_dir}: its eval/results.json lacks {len(missing)} of the conditions that "
                          f"mCE needs ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); evaluate it "
                          "on the suite ('corruptions') first")
    return {"run": str(run_dir), "accuracy": accuracy}


def results_dir(eval_dir, step: int) -> epath.Path:
    """Where the results of `step` go: `eval_dir`, unless it holds those of a later step."""
    eval_dir = epath.Path(eval_dir)
    existing = read_results(eval_dir)
    if existing is not None and int(existing.get("step", -1)) > step:
        return eval_dir / f"step_{step}"
    return eval_dir


def write_results(eval_dir, step: int, accuracy: dict[str, float], num_examples: int,
                  box_source: str, corruption_params: str = "", baseline: dict | None = None) -> tuple[epath.Path, str]:
    """Writes `results.json` and `results.md` for `step`; returns the folder used and the table.

    `corruption_params` names the corruptions' parameters used ("imagenet" or "cifar10"); with
    ImageNet-C's, the results also give the mean corruption error against AlexNet (mCE). `baseline`
    ({"run": its directory, "accuracy": its accuracies}, from `read_baseline`) adds the mCE and the
    relative mCE against that run, for any data set."""
    out_dir = results_dir(eval_dir, step)
    if out_dir != epath.Path(eval_dir):
        logging.warning("%s holds the results of a later step; the results of step %d go to %s.",
                        eval_dir, step, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "step": int(step),
        "accuracy": accuracy,
        "num_examples": {name: int(num_examples) for name in accuracy},
        "mr_boxes": box_source,
    }
    suite = conditions.evaluated_suite(accuracy)
    suite_names = {f"{n}_{s}" for n in suite or () for s in conditions.SEVERITIES}
    # The suite's conditions get a table of their own below.
    table = markdown_table({n: a for n, a in accuracy.items() if n not in suite_names})
    text = f"Test accuracy (%) at step {step} on {num_examples} examples; MR boxes: {box_source}.\n\n{table}\n"
    if suite is not None:
        results["corruptions_mean"] = conditions.suite_mean(accuracy)
        results["corruptions"] = list(suite)
        text += (f"\nCommon corruptions, mean of {len(suite_names)} conditions ({len(suite)} corruptions x "
                 f"{len(conditions.SEVERITIES)} severities): {100 * results['corruptions_mean']:.2f}\n")
        benchmark = conditions.benchmark_mean(accuracy)
        if benchmark is not None:
            results["corruptions_mean_15"] = benchmark
            text += f"The benchmark's 15 corruptions x 5 severities (RobustBench's corruptions_acc): {100 * benchmark:.2f}\n"
        text += "\n" + corruption_table(accuracy) + "\n"
        mce = conditions.mean_corruption_error(accuracy) if corruption_params == "imagenet" else None
        if mce is not None:
            mce_names = conditions.mce_corruptions(accuracy)
            results["mce"], results["mce_corruptions"] = mce, list(mce_names)
            text += (f"\nmCE (corruption error relative to AlexNet, ImageNet-C) over {len(mce_names)} of its 15 "
                     f"corruptions{'' if len(mce_names) == 15 else ' (frost not evaluated)'}: {100 * mce:.1f}\n")
        if baseline is not None:
            results["mce_baseline"] = against = {
                "run": baseline["run"],
                "mce": conditions.mean_corruption_error(accuracy, baseline["accuracy"]),
                "relative_mce": conditions.relative_mean_corruption_error(accuracy, baseline["accuracy"]),
                "corruptions": list(conditions.mce_corruptions(accuracy, baseline["accuracy"]) or ()),
            }
            shown = {key: "undefined (the baseline makes no error, or loses no accuracy, on a corruption)"
                     if against[key] is None else f"{100 * against[key]:.1f}" for key in ("mce", "relative_mce")}
            text += (f"\nAgainst the baseline run {baseline['run']}, over {len(against['corruptions'])} corruptions: "
                     f"mCE {shown['mce']}, relative mCE {shown['relative_mce']} (100 = the baseline's)\n")
    write_atomically(out_dir / "results.md", text)
    # results.json last: a reader that sees it sees the matching results.md.
    write_atomically(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    return out_dir, table


def plot_sweeps(curves: dict[str, list[dict[str, float]]], path) -> None:
    """Accuracy against sigma, and against the LR factor (one line per up-sampling method), for
    each row in `curves` ({label: [{eval name: accuracy}, one per seed]}): the mean over seeds, with
    a band from the lowest to the highest seed where there are several; one PNG with two panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (noise_axis, lr_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def draw(axis, points_per_seed, style, colour, label):
        xs = sorted(set.intersection(*(set(points) for points in points_per_seed)))
        if not xs:
            return
        values = np.array([[100 * points[x] for x in xs] for points in points_per_seed])
        axis.plot(xs, values.mean(axis=0), style, color=colour, label=label)
        if len(values) > 1:
            axis.fill_between(xs, values.min(axis=0), values.max(axis=0), color=colour, alpha=0.2)

    for index, (label, seeds) in enumerate(curves.items()):
        colour = colours[index % len(colours)]
        noise_per_seed, lr_per_seed = [], {"nearest": [], "bicubic": []}
        for accuracy in seeds:
            parsed = [(conditions.EvalCondition.parse(name), value) for name, value in accuracy.items()]
            clean = accuracy.get("clean")
            noise = {p.sigma: v for p, v in parsed if p.kind == "noise"}
            if clean is not None and 0 not in noise:
                noise[0.0] = clean
            noise_per_seed.append(noise)
            for method in lr_per_seed:
                points = {p.factor: v for p, v in parsed if p.kind == "lr" and p.method == method}
                if clean is not None and points:
                    points[1] = clean
                lr_per_seed[method].append(points)
        draw(noise_axis, noise_per_seed, "o-", colour, label)
        for method, style in (("nearest", "o-"), ("bicubic", "s--")):
            draw(lr_axis, lr_per_seed[method], style, colour, f"{label}, {method}")
    noise_axis.set(xlabel="Gaussian noise sigma", ylabel="test accuracy (%)", title="Noise", ylim=(0, 100))
    lr_axis.set(xlabel="low-resolution factor", ylabel="test accuracy (%)", title="Low resolution", ylim=(0, 100))
    lr_axis.set_xscale("log", base=2)
    lr_axis.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    lr_axis.minorticks_off()
    for axis in (noise_axis, lr_axis):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:  # below the axes: inside, it hid the first points
            axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    _save_figure(figure, path, dpi=110)


def _save_figure(figure, path, dpi: int) -> None:
    """Writes the figure whole or not at all (a temporary file, then a rename), and closes it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    path = epath.Path(path)
    temporary = path.parent / f".{path.name}.tmp-{os.getpid()}.png"
    with temporary.open("wb") as file:  # matplotlib opens plain paths only; epath reaches gs:// too
        figure.savefig(file, dpi=dpi, format="png", bbox_inches="tight")  # legends outside the axes included
    plt.close(figure)
    temporary.replace(path)


def plot_corruptions(curves: dict[str, list[dict[str, float]]], path) -> bool:
    """Accuracy against severity, one panel per corruption, for each row in `curves` ({label: [{eval
    name: accuracy}, one per seed]}) that has the whole suite: the mean over seeds, a band from the
    lowest to the highest seed, the clean accuracy at severity 0. Returns whether anything was drawn."""
    complete = {label: seeds for label, seeds in curves.items()
                if seeds and all(conditions.evaluated_suite(accuracy) is not None for accuracy in seeds)}
    if not complete:
        return False
    # The corruptions every row has (frost only where all of them were evaluated on it).
    names = [n for n in conditions.CORRUPTIONS
             if all(n in conditions.evaluated_suite(accuracy) for seeds in complete.values() for accuracy in seeds)]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 6
    rows = -(-len(names) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.3 * rows), sharex=True, sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    severities = [0, *conditions.SEVERITIES]
    for axis, name in zip(axes.flat, names):
        for index, (label, seeds) in enumerate(complete.items()):
            values = np.array([[100 * accuracy.get("clean", np.nan)]
                               + [100 * accuracy[f"{name}_{s}"] for s in conditions.SEVERITIES] for accuracy in seeds])
            colour = colours[index % len(colours)]
            axis.plot(severities, values.mean(0), "o-", color=colour, markersize=3, label=label)
            if len(values) > 1:
                axis.fill_between(severities, values.min(0), values.max(0), color=colour, alpha=0.2)
        axis.set_title(name, fontsize=9)
        axis.grid(alpha=0.3)
        axis.set_ylim(0, 100)
    for axis in axes.flat[len(names):]:
        axis.axis("off")
    for axis in axes[:, 0]:
        axis.set_ylabel("accuracy (%)")
    for axis in axes[-1]:
        axis.set_xlabel("severity (0: clean)")
    axes.flat[0].legend(fontsize=6)
    _save_figure(figure, path, dpi=100)
    return True
