"""Test conditions by name, as `config.evals` and `results.json` write them (no JAX here).

`clean`, `noise_<sigma>`, `lr<factor>_<method>`, `mr<factor>_<method>` and the common corruptions
`<corruption>_<severity 1-5>`, e.g. `noise_0.15`, `lr4_bicubic`, `mr4_nearest`, `jpeg_compression_3`.
The name `corruptions` stands for the whole suite (every corruption at every severity).
`pivot_jax.perturb.EvalPerturbation` adds how each is applied on the device; reports and plots only
need to read the names.
"""

from __future__ import annotations

import dataclasses
import re

METHODS = ("nearest", "bicubic")
# The common-corruption suite (Hendrycks & Dietterich 2019) that pivot_jax.corruptions implements, in
# the published order. Frost blends crops of the published photographs, which this package does not
# ship: it joins the suite only where `config.perturb.frost_photos` gives their folder.
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "gaussian_blur", "defocus_blur",
               "glass_blur", "motion_blur", "zoom_blur", "snow", "frost", "fog", "spatter", "elastic_transform",
               "pixelate", "jpeg_compression", "contrast", "brightness", "saturate")
NEEDS_PHOTOS = ("frost",)
# Joined the suite after runs had been evaluated on the others: a results.json without it still holds
# a suite (its `corruptions` list says which), as one without frost does.
ADDED_LATER = ("spatter",)
SEVERITIES = (1, 2, 3, 4, 5)
# AlexNet's top-1 error on ImageNet-C per corruption, averaged over the five severities: the baseline of
# the corruption error CE and its mean, mCE (Hendrycks & Dietterich 2019; google-research/augmix).
ALEXNET_ERRORS = {
    "gaussian_noise": .886428, "shot_noise": .894468, "impulse_noise": .922640, "defocus_blur": .819880,
    "glass_blur": .826268, "motion_blur": .785948, "zoom_blur": .798360, "snow": .866816, "frost": .826572,
    "fog": .819324, "brightness": .564592, "contrast": .853204, "elastic_transform": .646056,
    "pixelate": .717840, "jpeg_compression": .606500,
}
# The benchmark's 15 corruptions (ImageNet-C's mCE, RobustBench's `corruptions_acc`); the suite's other
# four (speckle_noise, gaussian_blur, spatter, saturate) are the published extras.
BENCHMARK_CORRUPTIONS = tuple(name for name in CORRUPTIONS if name in ALEXNET_ERRORS)
# The published extras: training on them (with noise, LR and MR, `perturb=corruptions`) leaves the
# benchmark's 15 unseen until the test, the protocol of AugMix and of the benchmark's authors.
EXTRAS = tuple(name for name in CORRUPTIONS if name not in ALEXNET_ERRORS)
SUITE = "corruptions"  # in config.evals / sweep_evals: every corruption at every severity
_NAME = re.compile(r"^(?:(clean)|noise_(\d+(?:\.\d+)?)|(lr|mr)(\d+)_(nearest|bicubic)|"
                   rf"({'|'.join(CORRUPTIONS)})_([1-5]))$")
NAME_FORMS = ("'clean', 'noise_<sigma>', 'lr<factor>_<method>', 'mr<factor>_<method>', "
              f"'<corruption>_<1-5>' (corruption one of {', '.join(CORRUPTIONS)}), or '{SUITE}'")


def suite_corruptions(photos: bool = False) -> tuple[str, ...]:
    """The suite's corruptions: all of them with the frost photographs, else all but frost."""
    return tuple(name for name in CORRUPTIONS if photos or name not in NEEDS_PHOTOS)


def suite_names(photos: bool = False) -> list[str]:
    """Every corruption of the suite at every severity, in the suite's order."""
    return [f"{name}_{severity}" for name in suite_corruptions(photos) for severity in SEVERITIES]


def expand(names, photos: bool = False) -> list[str]:
    """`names` with `corruptions` replaced by the whole suite (frost with `photos`), each name once, in order."""
    out = []
    for name in names:
        for item in suite_names(photos) if name == SUITE else [name]:
            if item not in out:
                out.append(item)
    return out


def _complete(accuracy: dict[str, float], names) -> bool:
    return all(f"{name}_{s}" in accuracy for name in names for s in SEVERITIES)


def _mean_over(accuracy: dict[str, float], names) -> float:
    return sum(accuracy[f"{n}_{s}"] for n in names for s in SEVERITIES) / (len(names) * len(SEVERITIES))


def evaluated_suite(accuracy: dict[str, float]) -> tuple[str, ...] | None:
    """The suite `accuracy` holds every condition of, or None: frost where frost was evaluated, spatter
    where the run was evaluated after it joined the suite, every other corruption always."""
    optional = NEEDS_PHOTOS + ADDED_LATER
    names = tuple(name for name in CORRUPTIONS if name not in optional or _complete(accuracy, (name,)))
    return names if _complete(accuracy, names) else None


def suite_mean(accuracy: dict[str, float]) -> float | None:
    """The mean accuracy over the evaluated suite's conditions (`evaluated_suite`), else None."""
    names = evaluated_suite(accuracy)
    return None if names is None else _mean_over(accuracy, names)


def benchmark_mean(accuracy: dict[str, float]) -> float | None:
    """RobustBench's `corruptions_acc`: the mean over the benchmark's 15 corruptions x 5 severities,
    when all 75 were evaluated (frost among them), else None."""
    return _mean_over(accuracy, BENCHMARK_CORRUPTIONS) if _complete(accuracy, BENCHMARK_CORRUPTIONS) else None


def mce_corruptions(accuracy: dict[str, float], baseline: dict[str, float] | None = None) -> tuple[str, ...] | None:
    """The corruptions mCE is taken over: the benchmark's 15, or its 14 without frost where frost was
    not evaluated (in `accuracy` or in the `baseline` run's); None when any of their severities is missing."""
    runs = (accuracy,) if baseline is None else (accuracy, baseline)
    names = tuple(n for n in BENCHMARK_CORRUPTIONS if n not in NEEDS_PHOTOS or all(_complete(r, (n,)) for r in runs))
    return names if all(_complete(r, names) for r in runs) else None


def mce_needed_names() -> list[str]:
    """The conditions every run in an mCE against a baseline run must hold: the benchmark's corruptions
    but frost (optional) at every severity."""
    return [f"{c}_{s}" for c in BENCHMARK_CORRUPTIONS if c not in NEEDS_PHOTOS for s in SEVERITIES]


def _error_sum(accuracy: dict[str, float], corruption: str) -> float:
    return sum(1 - accuracy[f"{corruption}_{s}"] for s in SEVERITIES)


def mean_corruption_error(accuracy: dict[str, float], baseline: dict[str, float] | None = None) -> float | None:
    """mCE over `mce_corruptions(accuracy)` (else None): the mean over corruptions c of CE_c = the sum
    over severities of the error / the same sum for the baseline. The baseline is another run's
    accuracies (`baseline`; over the corruptions both runs hold; None if it makes no error on one), by
    default AlexNet's published ImageNet-C errors, comparable with published mCE only on ImageNet with
    ImageNet-C's parameters, and over all 15."""
    names = mce_corruptions(accuracy, baseline)
    if names is None:
        return None
    if baseline is None:
        errors = [_error_sum(accuracy, c) / (len(SEVERITIES) * ALEXNET_ERRORS[c]) for c in names]
    elif any(_error_sum(baseline, c) <= 0 for c in names):  # a flawless baseline leaves no ratio
        return None
    else:
        errors = [_error_sum(accuracy, c) / _error_sum(baseline, c) for c in names]
    return sum(errors) / len(errors)


def relative_mean_corruption_error(accuracy: dict[str, float], baseline: dict[str, float]) -> float | None:
    """Relative mCE against a baseline run (Hendrycks & Dietterich 2019): the mean over corruptions c of
    the accuracy each corruption costs, summed over severities, over what it costs the baseline:
    sum_s (E_s,c - E_clean) / sum_s (E_s,c - E_clean) of the baseline. None where either run lacks a
    condition (`clean` included), or where a corruption costs the baseline nothing (no ratio)."""
    names = mce_corruptions(accuracy, baseline)
    if names is None or "clean" not in accuracy or "clean" not in baseline:
        return None
    cost = lambda run, c: _error_sum(run, c) - len(SEVERITIES) * (1 - run["clean"])  # noqa: E731
    costs = [(cost(accuracy, c), cost(baseline, c)) for c in names]
    if any(base <= 0 for _, base in costs):
        return None
    return sum(ours / base for ours, base in costs) / len(costs)


@dataclasses.dataclass(frozen=True)
class EvalCondition:
    """One test condition: its name and the perturbation's parameters parsed from it."""

    name: str
    kind: str  # "clean", "noise", "lr", "mr" or "corruption"
    sigma: float = 0.0
    factor: int = 1
    method: str = "nearest"
    corruption: str = ""
    severity: int = 0

    @classmethod
    def parse(cls, name: str):
        """The condition called `name`; a ValueError lists the forms a name can take."""
        match = _NAME.match(name)
        if not match:
            raise ValueError(
                f"config.evals: got {name!r}, expected a name of the form {NAME_FORMS}; "
                "method nearest or bicubic"
            )
        clean, sigma, kind, factor, method, corruption, severity = match.groups()
        if corruption:
            return cls(name, "corruption", corruption=corruption, severity=int(severity))
        if clean:
            return cls(name, "clean")
        if sigma is not None:
            return cls(name, "noise", sigma=float(sigma))
        if int(factor) < 1:
            raise ValueError(f"config.evals: {name!r} has factor {factor}, expected >= 1")
        return cls(name, kind, factor=int(factor), method=method)
