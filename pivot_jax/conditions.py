"""Test conditions by name, as `config.evals` and `results.json` write them (no JAX here).

`clean`, `noise_<sigma>`, `lr<factor>_<method>` and `mr<factor>_<method>`, e.g. `noise_0.15`,
`lr4_bicubic`, `mr4_nearest`. `pivot_jax.perturb.EvalPerturbation` adds how each is applied on the
device; reports and plots only need to read the names.
"""

from __future__ import annotations

import dataclasses
import re

METHODS = ("nearest", "bicubic")
_NAME = re.compile(r"^(?:(clean)|noise_(\d+(?:\.\d+)?)|(lr|mr)(\d+)_(nearest|bicubic))$")
NAME_FORMS = "'clean', 'noise_<sigma>', 'lr<factor>_<method>', 'mr<factor>_<method>'"


@dataclasses.dataclass(frozen=True)
class EvalCondition:
    """One test condition: its name and the perturbation's parameters parsed from it."""

    name: str
    kind: str  # "clean", "noise", "lr" or "mr"
    sigma: float = 0.0
    factor: int = 1
    method: str = "nearest"

    @classmethod
    def parse(cls, name: str):
        """The condition called `name`; a ValueError lists the forms a name can take."""
        match = _NAME.match(name)
        if not match:
            raise ValueError(
                f"config.evals: got {name!r}, expected a name of the form {NAME_FORMS} "
                "with method nearest or bicubic"
            )
        clean, sigma, kind, factor, method = match.groups()
        if clean:
            return cls(name, "clean")
        if sigma is not None:
            return cls(name, "noise", sigma=float(sigma))
        if int(factor) < 1:
            raise ValueError(f"config.evals: {name!r} has factor {factor}, expected >= 1")
        return cls(name, kind, factor=int(factor), method=method)
