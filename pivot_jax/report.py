"""One table over several runs, in the paper's layout: `python -m pivot_jax.report RUN_DIR... --out=DIR`.

Rows are training modes (runs of the same mode and perturbation with other seeds are averaged),
columns are test conditions, and each cell shows our accuracy beside the paper's where the paper has
that number (docs/method.md). Each run must have been evaluated (`eval/results.json`), or have
stopped on a non-finite loss (`diverged.txt`, written by experiments/paper_tables.sh), which its row
shows. With several seeds a cell is their mean ± sample standard deviation, and a second table lists
every seed. Each pivot row is compared with the mixed row of the same perturbation over the seeds
that both have: the mean paired difference, its 95% interval (Student's t), the paired t-test's p
and a verdict, alone and after Holm's correction over all of the pivot row's comparisons. Writes
`report.md`, `sweeps.png` (every run's sweep curves, a band over seeds) and, for runs evaluated on
the whole common-corruption suite, `corruptions.png` (accuracy per corruption and severity) into `--out`;
for those runs the report also gives the suite's mean and, with `--baseline=RUN` (a run evaluated on
the suite, e.g. clean-only training), each row's mCE and relative mCE against it.

The claims table (`--family=... --into=FILE`) is the other output: one line per claim, data set and
pivot form, each a pivot row compared with a control row seed by seed, with Holm's correction over
the family it is named in on the command line (see `claims_table`).
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections import defaultdict

import numpy as np
import scipy.stats
from absl import app, flags
from etils import epath

from pivot_jax import conditions, results
from pivot_jax.errors import ConfigError

ROW_ORDER = ("Clean only", "Noisy only", "LR only", "MR only", "LR, MR only", "Clean, Noisy", "Clean, LR",
             "Clean, MR", "Clean, LR, MR", "Clean, Noisy, paired", "Clean, LR, paired", "Clean, MR, paired",
             "Clean, LR, MR, paired", "Pivot loss (Ours)", "Pivot loss, symmetric")
_KIND_NAMES = {"noise": "Noisy", "lr": "LR", "mr": "MR"}
PIVOT_LAM2 = 1e-4  # the paper's λ2, every config's default

# The paper's test accuracies (%), by table, row and test condition (docs/method.md).
PAPER = {
    "cifar10": {
        "Clean only": {"clean": 91.6, "noise_0.05": 62.4, "noise_0.15": 16.6, "lr4_nearest": 19.2, "lr4_bicubic": 19.9},
        "Noisy only": {"clean": 89.8, "noise_0.05": 88.9, "noise_0.15": 82.0},
        "Clean, Noisy": {"clean": 90.5, "noise_0.05": 89.1, "noise_0.15": 80.7},
        "LR only": {"clean": 86.9, "lr4_nearest": 75.9, "lr4_bicubic": 72.9},
        "Clean, LR": {"clean": 91.7, "lr4_nearest": 71.5, "lr4_bicubic": 70.7},
        ("Pivot loss (Ours)", "noise"): {"clean": 90.8, "noise_0.05": 89.6, "noise_0.15": 81.7},
        ("Pivot loss (Ours)", "lr"): {"clean": 92.0, "lr4_nearest": 73.5, "lr4_bicubic": 72.7},
    },
    "mnist": {
        "Clean only": {"clean": 99.6, "noise_0.15": 40.9, "lr4_nearest": 50.4, "lr4_bicubic": 57.5},
        ("Pivot loss (Ours)", "noise"): {"clean": 99.5, "noise_0.15": 99.5},
        ("Pivot loss (Ours)", "lr"): {"lr4_nearest": 87.1, "lr4_bicubic": 86.2},
    },
    # The paper's ImageNet LR x 4 column does not say which up-sampling it used: only clean and MR here.
    "imagenet": {
        "Clean only": {"clean": 68.1, "mr4_nearest": 57.8},
        "Clean, LR, MR": {"clean": 67.9, "mr4_nearest": 61.5},
        ("Pivot loss (Ours)", "lr+mr"): {"clean": 67.4, "mr4_nearest": 62.1},
    },
}


def row_label(config: dict) -> str:
    mode, kinds = config["loss"]["mode"], [_KIND_NAMES.get(k, k) for k in config["perturb"]["kinds"]]
    if mode == "clean":
        return "Clean only"
    if mode == "perturbed":
        return f"{', '.join(kinds)} only"
    if mode == "mixed":  # the paired layout without L_dist is its own control row
        return "Clean, " + ", ".join(kinds) + (", paired" if config["loss"].get("paired") else "")
    # The ablation whose L_dist gradient also reaches the clean logits (as in the released code).
    label = "Pivot loss, symmetric" if config["loss"].get("symmetric") else "Pivot loss (Ours)"
    # Another strength of L_dist is another row (the released code's ½·Σ at its λ2 is our Σ at half of it).
    lam2 = config["loss"].get("lam2", PIVOT_LAM2)
    return label if lam2 == PIVOT_LAM2 else f"{label}, λ2 = " + f"{lam2:g}".replace("e-0", "e-")


def _row_rank(row: str) -> tuple[int, str]:
    """The paper's order; a row of another λ2 right after its own form's row."""
    base = row.split(", λ2 = ")[0]
    return (ROW_ORDER.index(base) if base in ROW_ORDER else len(ROW_ORDER), row)


def paper_numbers(config: dict) -> dict[str, float]:
    # Runs saved before `paper_table` was named so call it `dataset`.
    table = PAPER.get(config.get("paper_table", config.get("dataset", "")), {})
    label = row_label(config)
    return table.get(label) or table.get((label, "+".join(config["perturb"]["kinds"])), {})


def load_run(run_dir) -> dict:
    run_dir = epath.Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"{run_dir}: no config.json (train it, then run pivot_jax.evaluate on it)")
    diverged = None
    if not (run_dir / "eval" / "results.json").exists():
        if not (run_dir / "diverged.txt").exists():
            raise FileNotFoundError(f"{run_dir}: no eval/results.json (train it, then run pivot_jax.evaluate on it)")
        diverged = (run_dir / "diverged.txt").read_text().strip()
    config = json.loads((run_dir / "config.json").read_text())
    run_results = (json.loads((run_dir / "eval" / "results.json").read_text()) if diverged is None
                   else {"accuracy": {}, "step": None})
    return {"dir": str(run_dir), "config": config, "row": row_label(config), "diverged": diverged,
            "results": run_results}


def _seeds_cell(seeds: list[str]) -> str:
    """How many seeds, then which: `3: 0, 1, 2`; `1: 0` (a lone seed id 0 would read as none)."""
    return f"{len(seeds)}: {', '.join(seeds)}"


def _diverged_step(run: dict) -> str:
    match = re.search(r"by step (\d+)", run["diverged"] or "")
    return match.group(1) if match else "?"


def paired_difference(a: list[float], b: list[float]) -> dict:
    """Mean of the per-seed differences a - b, its sample standard deviation, the 95% interval, the
    two-sided p-value of the paired t-test and the verdict on "a is better than b": holds, does not
    hold, or cannot be told apart (the interval excludes zero exactly when p < 0.05)."""
    differences = np.asarray(a, float) - np.asarray(b, float)
    n, mean = len(differences), float(np.mean(differences))
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "low": None, "high": None, "p": None,
                "verdict": "cannot be told apart (one seed)"}
    sd = float(np.std(differences, ddof=1))
    standard_error = sd / np.sqrt(n)
    half = float(scipy.stats.t.ppf(0.975, n - 1)) * standard_error
    if standard_error > 0:
        p = float(2 * scipy.stats.t.sf(abs(mean) / standard_error, n - 1))
    else:  # every seed gave the same difference
        p = 1.0 if mean == 0 else 0.0
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half, "p": p,
            "verdict": _verdict(mean, p)}


def _verdict(mean: float, p: float) -> str:
    if p >= 0.05:
        return "cannot be told apart"
    return "holds" if mean > 0 else "does not hold"


def holm_adjusted(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values: a comparison passes at 5% family-wise error over the whole
    list when its adjusted p-value is below 0.05, whichever of the others are true."""
    m = len(p_values)
    adjusted, running = [0.0] * m, 0.0
    for rank, index in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def _comparisons(groups: dict[str, list[dict]], columns: list[str]) -> list[str]:
    """Each pivot row against the mixed row of the same perturbation (unpaired and paired batches),
    seed by seed, and the verdicts again after Holm's correction over the pivot row's comparisons."""
    compared = []  # (pivot row, control row, column, seeds, paired_difference)
    for pivot_row in sorted((row for row in groups if row.startswith("Pivot loss")), key=_row_rank):
        for pivot in groups.get(pivot_row, [])[:1]:
            mixed_row = row_label({**pivot["config"], "loss": {"mode": "mixed", "paired": False}})
            for control_row in (mixed_row, mixed_row + ", paired"):
                by_seed = {m["config"]["seed"]: m for m in groups.get(control_row, []) if not m["diverged"]}
                pairs = [(p, by_seed[p["config"]["seed"]]) for p in groups[pivot_row]
                         if not p["diverged"] and p["config"]["seed"] in by_seed]
                for column in columns:
                    usable = [(p, c) for p, c in pairs
                              if column in p["results"]["accuracy"] and column in c["results"]["accuracy"]]
                    if not usable:
                        continue
                    result = paired_difference([100 * p["results"]["accuracy"][column] for p, _ in usable],
                                               [100 * c["results"]["accuracy"][column] for _, c in usable])
                    seeds = _seeds_cell([str(p["config"]["seed"]) for p, _ in usable])
                    compared.append((pivot_row, control_row, column, seeds, result))
    if not compared:
        return []
    # Each pivot row's comparisons (every control, every condition) test one claim, that row's method:
    # the family-wise error is held at 5% per pivot row.
    for row in dict.fromkeys(pivot_row for pivot_row, *_ in compared):
        family = [result for pivot_row, *_, result in compared if pivot_row == row and result["p"] is not None]
        for result, adjusted in zip(family, holm_adjusted([result["p"] for result in family])):
            result["holm_p"], result["holm"] = adjusted, _verdict(result["mean"], adjusted)
    lines = ["", "Paired comparison (same seeds): accuracy of the pivot row minus the control row, in points; "
             "mean ± sample standard deviation of the differences, 95% interval (Student's t), two-sided p "
             "(paired t-test) and whether \"pivot is better\" holds; then p and the verdict after Holm's "
             "correction over all of that pivot row's comparisons with two or more seeds (5% family-wise "
             "error per pivot row).", "",
             "| pivot row | control row | condition | seeds | difference | 95% interval | p | verdict "
             "| Holm p | Holm verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for pivot_row, control_row, column, seeds, result in compared:
        spread = f" ± {result['sd']:.2f}" if result["sd"] is not None else ""
        interval = f"[{result['low']:+.2f}, {result['high']:+.2f}]" if result["low"] is not None else "–"
        p = f"{result['p']:.3f}" if result["p"] is not None else "–"
        holm_p = f"{result['holm_p']:.3f}" if "holm_p" in result else "–"
        lines.append(f"| {pivot_row} | {control_row} | {column} | {seeds} | {result['mean']:+.2f}{spread} "
                     f"| {interval} | {p} | {result['verdict']} | {holm_p} | {result.get('holm', '–')} |")
    return lines


def _mean_sd(values: list[float]) -> str:
    return f"{np.mean(values):.2f}" + (f" ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else "")


def _corruption_lines(groups: dict[str, list[dict]], rows: list[str], baseline: dict | None) -> list[str]:
    """The rows' runs that were evaluated on the common-corruption suite: the suite's mean accuracy and,
    against a baseline run, mCE and relative mCE (%, 100 = the baseline's)."""
    lines = []
    for row in rows:
        suite_runs = [m for m in groups[row] if not m["diverged"]
                      and conditions.evaluated_suite(m["results"]["accuracy"]) is not None]
        if not suite_runs:
            continue
        if not lines:
            lines += ["", "Common corruptions (%): the mean accuracy over the evaluated suite"
                      + (f"; mCE and relative mCE against `{baseline['run']}` (100 = its own)" if baseline else "")
                      + ".", "",
                      "| training | seeds | corruptions | mean accuracy |"
                      + (" mCE | relative mCE |" if baseline else ""),
                      "|---|---|---|---|" + ("---|---|" if baseline else "")]
        accuracies = [m["results"]["accuracy"] for m in suite_runs]
        suites = {len(conditions.evaluated_suite(a)) for a in accuracies}
        cells = [_seeds_cell([str(m["config"]["seed"]) for m in suite_runs]), "/".join(str(n) for n in sorted(suites)),
                 _mean_sd([100 * conditions.suite_mean(a) for a in accuracies])]
        if baseline:
            for error in (conditions.mean_corruption_error, conditions.relative_mean_corruption_error):
                values = [error(a, baseline["accuracy"]) for a in accuracies]
                cells.append("–" if None in values else _mean_sd([100 * v for v in values]))
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def build_report(runs: list[dict], columns: list[str] | None = None, title: str = "",
                 baseline: dict | None = None) -> str:
    """The Markdown tables: our mean accuracy (with the seeds' spread) beside the paper's, every
    seed, the paired pivot-against-mixed comparison, and for runs evaluated on the common-corruption
    suite its mean (with mCE against `baseline`, from `results.read_baseline`, when given)."""
    finished = [r for r in runs if not r["diverged"]]
    if columns is None:
        reference = finished[0] if finished else runs[0]
        columns = [c for c in reference["config"]["evals"] if all(c in r["results"]["accuracy"] for r in finished)]
    groups: dict[str, list[dict]] = defaultdict(list)  # each row's runs in seed order
    for run in sorted(runs, key=lambda r: r["config"]["seed"]):
        groups[run["row"]].append(run)
    rows = sorted(groups, key=_row_rank)
    lines = [f"## {title}" if title else "", "",
             "Test accuracy (%): ours, then the paper's in parentheses where it reports the cell. "
             "With several seeds: their mean ± sample standard deviation.", "",
             "| training | " + " | ".join(columns) + " | seeds | steps |",
             "|---|" + "---|" * (len(columns) + 2)]
    for row in rows:
        members = groups[row]
        done = [m for m in members if not m["diverged"]]
        paper = paper_numbers(members[0]["config"])
        cells = []
        for column in columns:
            values = [100 * m["results"]["accuracy"][column] for m in done if column in m["results"]["accuracy"]]
            cell = _mean_sd(values) if values else ("diverged" if not done else "–")
            if column in paper:
                cell += f" ({paper[column]:.1f})"
            cells.append(cell)
        seeds = _seeds_cell([str(m["config"]["seed"]) + (" (diverged)" if m["diverged"] else "") for m in members])
        # One step when the seeds agree, else each seed's, in the order of the seeds column.
        ends = [str(m["results"]["step"]) if not m["diverged"] else f"diverged by {_diverged_step(m)}" for m in members]
        steps = ends[0] if len(set(ends)) == 1 else ", ".join(ends)
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {seeds} | {steps} |")
    if any(len(groups[row]) > 1 or groups[row][0]["diverged"] for row in rows):
        lines += ["", "Every seed:", "", "| training | seed | " + " | ".join(columns) + " | step |",
                  "|---|---|" + "---|" * (len(columns) + 1)]
        for row in rows:
            for m in groups[row]:
                if m["diverged"]:
                    lines.append(f"| {row} | {m['config']['seed']} | " + " | ".join("–" for _ in columns)
                                 + f" | diverged by {_diverged_step(m)}: `{m['diverged'][:160]}` |")
                    continue
                accuracy = m["results"]["accuracy"]
                cells = [f"{100 * accuracy[c]:.2f}" if c in accuracy else "–" for c in columns]
                lines.append(f"| {row} | {m['config']['seed']} | " + " | ".join(cells) + f" | {m['results']['step']} |")
    lines += _comparisons(groups, columns)
    lines += _corruption_lines(groups, rows, baseline)
    lines += ["", "Runs: " + ", ".join(f"`{m['dir']}`" for row in rows for m in groups[row]), ""]
    return "\n".join(lines).lstrip("\n")


def write_report(run_dirs: list[str], out_dir, columns: list[str] | None = None, title: str = "",
                 baseline: str | None = None) -> str:
    runs = [load_run(d) for d in run_dirs]
    baseline_results = results.read_baseline(baseline) if baseline else None
    out_dir = epath.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = build_report(runs, columns, title, baseline_results)
    (out_dir / "report.md").write_text(text)
    curves: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        if not run["diverged"]:
            curves[run["row"]].append(run["results"]["accuracy"])
    labelled = {f"{row} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})": seeds for row, seeds in curves.items()}
    results.plot_sweeps(labelled, out_dir / "sweeps.png")
    results.plot_corruptions(labelled, out_dir / "corruptions.png")  # the runs evaluated on the whole suite
    return text

# The claims table. A family is written `NAME: PIVOT vs CONTROL @ CONDITION,...; PIVOT vs CONTROL @ ...`,
# where PIVOT and CONTROL are rows: the runs `<ROW>_seed<N>` (directories, as experiments/paper_tables.sh
# names them). Every comparison of a perturbed condition in a family is one test of Holm's correction;
# a clean condition is the non-inferiority check beside them, outside the family (docs/results.md).
NON_INFERIORITY_MARGIN = 0.5  # points of clean accuracy the pivot may lose and still "keep" it
CLAIMS_BEGIN, CLAIMS_END = "<!-- claims table: begin -->", "<!-- claims table: end -->"
_DATA_NAMES = {"mnist": "MNIST", "cifar10": "CIFAR-10", "imagenet": "ImageNet"}


def parse_family(spec: str) -> tuple[str, list[tuple[str, str, list[str]]]]:
    """`NAME: PIVOT vs CONTROL @ COND,COND; ...` as (name, [(pivot row, control row, conditions)])."""
    name, colon, body = spec.partition(":")
    comparisons = []
    for part in body.split(";") if colon else []:
        rows, at, names = part.partition("@")
        pivot, vs, control = rows.partition(" vs ")
        wanted = [c.strip() for c in names.split(",") if c.strip()]
        if not (at and vs and pivot.strip() and control.strip() and wanted):
            comparisons = []
            break
        comparisons.append((pivot.strip(), control.strip(), wanted))
    if not name.strip() or not comparisons:
        raise ConfigError(f"--family={spec!r}: expected 'NAME: PIVOT_ROW vs CONTROL_ROW @ CONDITION,...' with "
                          "one or more comparisons separated by ';' (a row is the run directories ROW_seed<N>)")
    return name.strip(), comparisons


def load_row(row: str) -> list[dict]:
    """The runs `<row>_seed<N>`, in seed order; a ConfigError names the row when there are none."""
    path = epath.Path(row)
    seeds = {p: p.name.rpartition("_seed")[2] for p in path.parent.glob(f"{path.name}_seed*")}
    # a run's log (ROW_seed0.log) may lie beside it: only ROW_seed<digits> is a run
    runs = [load_run(p) for p in sorted((p for p, seed in seeds.items() if seed.isdigit()), key=lambda p: int(seeds[p]))]
    if not runs:
        raise ConfigError(f"--family: no runs {row}_seed<N> (a row names run directories without their _seed<N>)")
    return runs


def _data_set(config: dict) -> str:
    name = config.get("paper_table") or config["data"]["name"]
    return f"{_DATA_NAMES.get(name, name)}, {config['num_train_steps'] // 1000}k steps"


def _pivot_form(config: dict) -> str:
    form = "symmetric" if config["loss"].get("symmetric") else "stop-gradient"
    mantissa, exponent = f"{config['loss'].get('lam2', PIVOT_LAM2):e}".split("e")
    return f"{form}, λ2 = {mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _control_text(config: dict) -> str:
    if config["loss"]["mode"] == "mixed":
        return ("paired " if config["loss"].get("paired") else "") + "`mixed`"
    return row_label(config)


def _condition_text(name: str) -> str:
    condition = conditions.EvalCondition.parse(name)
    if condition.kind == "noise":
        return f"σ = {condition.sigma:g}"
    if condition.kind in ("lr", "mr"):
        return f"{condition.kind.upper()} ×{condition.factor} {condition.method}"
    return name


def _non_inferiority(result: dict) -> str:
    """Whether the pivot keeps clean accuracy: the one-sided 95% lower bound of the paired difference
    above -NON_INFERIORITY_MARGIN."""
    if result["sd"] is None:
        return "one seed"
    bound = result["mean"] - float(scipy.stats.t.ppf(0.95, result["n"] - 1)) * result["sd"] / np.sqrt(result["n"])
    return f"{'holds' if bound > -NON_INFERIORITY_MARGIN else 'not shown'} (bound {bound:+.2f})"


def claims_table(families: list[str]) -> str:
    """The claims table over `families` (see `parse_family`): per comparison and condition, the paired
    difference pivot − control over the seeds both trained (mean ± sd), its 95% interval, p, Holm's p
    over the family's perturbed conditions and the verdict; a pivot row whose runs diverged says so."""
    lines = ["| claim | data set | pivot form | seeds | pivot − control | 95% interval | p | Holm p (family) | verdict |",
             "|---|---|---|---|---:|---|---:|---|---|"]
    for spec in families:
        name, comparisons = parse_family(spec)
        entries = []  # (claim, data set, form, seeds, result or None, diverged note)
        for pivot_row, control_row, wanted in comparisons:
            pivots, controls = load_row(pivot_row), load_row(control_row)
            control_by_seed = {c["config"]["seed"]: c for c in controls if not c["diverged"]}
            diverged = [p for p in pivots if p["diverged"]]
            pairs = [(p, control_by_seed[p["config"]["seed"]]) for p in pivots
                     if not p["diverged"] and p["config"]["seed"] in control_by_seed]
            control = _control_text(controls[0]["config"])
            config = pivots[0]["config"]
            note = (f"{len(diverged)} of {len(pivots)} seeds diverged (by step "
                    + ", ".join(_diverged_step(p) for p in diverged) + ")") if diverged else ""
            for condition in wanted:
                usable = [(p, c) for p, c in pairs
                          if condition in p["results"]["accuracy"] and condition in c["results"]["accuracy"]]
                claim = (f"keeps clean accuracy against {control}" if condition == "clean"
                         else f"ahead of {control} at {_condition_text(condition)}")
                result = paired_difference([100 * p["results"]["accuracy"][condition] for p, _ in usable],
                                           [100 * c["results"]["accuracy"][condition] for _, c in usable]) if usable else None
                seeds = _seeds_cell([str(p["config"]["seed"]) for p, _ in usable]) if usable else "0"
                entries.append((claim, condition, _data_set(config), _pivot_form(config), seeds, result, note))
        tested = [e[5] for e in entries if e[1] != "clean" and e[5] is not None and e[5]["p"] is not None]
        for result, adjusted in zip(tested, holm_adjusted([r["p"] for r in tested])):
            result["holm_p"] = adjusted
        for claim, condition, data_set, form, seeds, result, note in entries:
            if result is None:
                lines.append(f"| {claim} | {data_set} | {form} | {seeds} | – | – | – | – | {note or 'no runs in common'} |")
                continue
            spread = f" ± {result['sd']:.2f}" if result["sd"] is not None else ""
            interval = f"[{result['low']:+.2f}, {result['high']:+.2f}]" if result["low"] is not None else "–"
            p = f"{result['p']:.3f}" if result["p"] is not None else "–"
            if condition == "clean":
                holm, verdict = "–", _non_inferiority(result)
            elif "holm_p" in result:
                holm = f"{result['holm_p']:.3f} ({name}, {len(tested)})"
                verdict = _verdict(result["mean"], result["holm_p"])
                if verdict != result["verdict"]:
                    verdict += f" ({result['verdict']} alone)"
                if result["n"] == 2 and verdict == "holds":  # Student's t with 1 df: an sd of two numbers
                    verdict += " (two seeds: one degree of freedom)"
            else:
                holm, verdict = "–", result["verdict"]
            if note:
                verdict += f"; {note}"
            lines.append(f"| {claim} | {data_set} | {form} | {seeds} | {result['mean']:+.2f}{spread} | {interval} "
                         f"| {p} | {holm} | {verdict} |")
    return "\n".join(lines)


def claims_command(families: list[str], into: str) -> str:
    """The shell command that builds the claims table into `into`, one family per line."""
    return " \\\n".join(["python -m pivot_jax.report " + shlex.quote(f"--into={into}"),
                         *(f"    {shlex.quote(f'--family={family}')}" for family in families)])


def claims_block(families: list[str], into: str) -> str:
    """The claims table with the command that built it, between the markers `--into` replaces."""
    command = "\n".join("    " + line for line in claims_command(families, into).splitlines())
    return "\n".join([CLAIMS_BEGIN, claims_table(families), "", "Built from the committed runs by:", "",
                      command, CLAIMS_END])


def write_claims(families: list[str], into) -> str:
    """Puts the claims block into the file `into`, in place of the block already between the markers
    (or, when it has none, where a line holds only CLAIMS_BEGIN); returns the block."""
    path = epath.Path(into)
    text = path.read_text()
    if CLAIMS_BEGIN not in text:
        raise ConfigError(f"--into={into}: no line {CLAIMS_BEGIN!r} marks where the claims table goes")
    before, _, rest = text.partition(CLAIMS_BEGIN)
    _, end, after = rest.partition(CLAIMS_END)
    block = claims_block(families, str(into))
    path.write_text(before + block + (after if end else rest))
    return block


def main(argv):
    FLAGS = flags.FLAGS
    try:
        if FLAGS.family:
            if len(argv) > 1 or FLAGS.out:
                raise app.UsageError("the claims table reads its runs from --family: no RUN_DIR or --out with it")
            if FLAGS.into:
                print(write_claims(FLAGS.family, FLAGS.into))
            else:
                print(claims_table(FLAGS.family))
            return
        if len(argv) < 2 or not FLAGS.out:
            raise app.UsageError("usage: python -m pivot_jax.report RUN_DIR... --out=DIR, or "
                                 "python -m pivot_jax.report --family='NAME: PIVOT_ROW vs CONTROL_ROW @ CONDITION,...' "
                                 "... [--into=FILE]")
        print(write_report(argv[1:], FLAGS.out, FLAGS.columns, FLAGS.title, FLAGS.baseline))
    except (FileNotFoundError, KeyError, ConfigError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    flags.DEFINE_string("out", None, "Where report.md and sweeps.png go.")
    flags.DEFINE_multi_string("family", None, "The claims table instead of a report: a Holm family, "
                              "'NAME: PIVOT_ROW vs CONTROL_ROW @ CONDITION,...; ...' (repeat for more families).")
    flags.DEFINE_string("into", None, "With --family: the Markdown file whose claims block (between "
                        f"{CLAIMS_BEGIN!r} and {CLAIMS_END!r}) the table replaces; else it is printed.")
    flags.DEFINE_list("columns", None, "Test conditions to tabulate (default: the runs' config.evals).")
    flags.DEFINE_string("title", "", "A heading for the table.")
    flags.DEFINE_string("baseline", None, "A run evaluated on the common-corruption suite: the report adds each "
                        "row's mCE and relative mCE against it.")
    app.run(main)
