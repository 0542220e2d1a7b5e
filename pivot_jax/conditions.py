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
# The common-corruption suite (Hendrycks & Dietterich 2019) that pivot_jax.corruptions implements.
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "gaussian_blur", "defocus_blur",
               "glass_blur", "motion_blur", "zoom_blur", "snow", "fog", "elastic_transform", "pixelate",
               "jpeg_compression", "contrast", "brightness", "saturate")
SEVERITIES = (1, 2, 3, 4, 5)
# AlexNet's top-1 error on ImageNet-C per corruption, averaged over the five severities: the baseline of
# the corruption error CE and its mean, mCE (Hendrycks & Dietterich 2019; google-research/augmix).
ALEXNET_ERRORS = {
    "gaussian_noise": .886428, "shot_noise": .894468, "impulse_noise": .922640, "defocus_blur": .819880,
    "glass_blur": .826268, "motion_blur": .785948, "zoom_blur": .798360, "snow": .866816, "frost": .826572,
    "fog": .819324, "brightness": .564592, "contrast": .853204, "elastic_transform": .646056,
    "pixelate": .717840, "jpeg_compression": .606500,
}
# The ImageNet-C corruptions implemented here, over which mCE is taken (14 of its 15).
MCE_CORRUPTIONS = tuple(name for name in CORRUPTIONS if name in ALEXNET_ERRORS)
SUITE = "corruptions"  # in config.evals / sweep_evals: every corruption at every severity
_NAME = re.compile(r"^(?:(clean)|noise_(\d+(?:\.\d+)?)|(lr|mr)(\d+)_(nearest|bicubic)|"
                   rf"({'|'.join(CORRUPTIONS)})_([1-5]))$")
NAME_FORMS = ("'clean', 'noise_<sigma>', 'lr<factor>_<method>', 'mr<factor>_<method>', "
              f"'<corruption>_<1-5>' (corruption one of {', '.join(CORRUPTIONS)}), or '{SUITE}'")


def suite_names() -> list[str]:
    """Every corruption at every severity, in the suite's order."""
    return [f"{name}_{severity}" for name in CORRUPTIONS for severity in SEVERITIES]


def expand(names) -> list[str]:
    """`names` with `corruptions` replaced by the whole suite, each name once, in order."""
    out = []
    for name in names:
        for item in suite_names() if name == SUITE else [name]:
            if item not in out:
                out.append(item)
    return out


def suite_mean(accuracy: dict[str, float]) -> float | None:
    """The suite's mean accuracy (RobustBench's `corruptions_acc`), when every condition was evaluated."""
    names = suite_names()
    return sum(accuracy[n] for n in names) / len(names) if all(n in accuracy for n in names) else None


def mean_corruption_error(accuracy: dict[str, float]) -> float | None:
    """ImageNet-C's mCE over MCE_CORRUPTIONS, when all their severities were evaluated (else None):
    the mean over corruptions c of CE_c = sum over severities of the error / the same sum for AlexNet.
    Comparable with published mCE only on ImageNet with ImageNet-C's parameters, and over these 8."""
    if not all(f"{c}_{s}" in accuracy for c in MCE_CORRUPTIONS for s in SEVERITIES):
        return None
    errors = [sum(1 - accuracy[f"{c}_{s}"] for s in SEVERITIES) / (len(SEVERITIES) * ALEXNET_ERRORS[c])
              for c in MCE_CORRUPTIONS]
    return sum(errors) / len(errors)


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
